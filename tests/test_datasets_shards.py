"""Tests of echocare.datasets.shards (`echocare curate --format webdataset`): shards read back by
the webdataset library, the index split as the datalist, resume after a killed driver, and
fsspec (memory://) sources."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_datasets_curation import QUIET, SIZE, build_small, curate_killed_when, phantom, save, snapshot

from echocare.datasets.curation import curate

MAPPING = "breast: thorax/breast\nabdomen: abdomen\n"


SHARD_SIZE = 2
ARGS = dict(size=SIZE, val_fraction=0.3, **QUIET)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], str]:
    """(sources, mapping): 8 small PNGs in two source folders (5 kept, one exact and one near
    duplicate, a blank), each folder mapped to an anatomy."""
    root = tmp_path_factory.mktemp("corpus")
    build_small(root / "in")
    mapping = root / "mapping.yaml"
    mapping.write_text(MAPPING)
    return [str(root / "in" / "breast"), str(root / "in" / "abdomen")], str(mapping)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> dict[str, Path]:
    """One uninterrupted run of the corpus per format, format -> OUT."""
    sources, mapping = corpus
    root = tmp_path_factory.mktemp("reference")
    images, shards = root / "images", root / "shards"
    curate(sources, mapping, str(images), **ARGS)
    curate(sources, mapping, str(shards), format="webdataset", shard_size=SHARD_SIZE, **ARGS)
    return {"images": images, "webdataset": shards}


def test_shards_hold_the_datalist_split_and_read_back_with_webdataset(reference):
    import webdataset as wds

    images, shards = reference["images"], reference["webdataset"]
    index_path = shards / "shards.json"
    datalist = json.loads((images / "datalist.json").read_text())
    index = json.loads(index_path.read_text())
    assert json.loads((shards / "report.json").read_text())["kept"] == json.loads(
        (images / "report.json").read_text())["kept"] == 5
    assert (shards / "report.png").is_file() and not (shards / "images").exists()
    for split in ("training", "validation"):
        expected = {Path(it["image"]).stem: it.get("anatomy") for it in datalist[split]}
        assert expected, split
        entries = index[split]
        assert [e["samples"] for e in entries[:-1]] == [SHARD_SIZE] * (len(entries) - 1)
        assert 1 <= entries[-1]["samples"] <= SHARD_SIZE
        assert index["samples"][split] == len(expected)
        urls = [str(shards / e["path"]) for e in entries]  # paths relative to shards.json
        seen = {}
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            seen[sample["__key__"]] = meta["anatomy"]
            assert meta["source"] in ("breast", "abdomen")
            # the PNG is the images format's file, byte for byte
            assert sample["png"] == (images / "images" / f"{sample['__key__']}.png").read_bytes()
        assert seen == expected
        counts = {}
        for anatomy in expected.values():
            counts[anatomy or "(none)"] = counts.get(anatomy or "(none)", 0) + 1
        assert index["anatomy"][split] == dict(sorted(counts.items()))
    assert set(index["anatomy"]["training"]) | set(index["anatomy"]["validation"]) == {"abdomen", "thorax/breast"}
    assert index["settings"]["shard_size"] == SHARD_SIZE and index["settings"]["val_fraction"] == 0.3
    assert sorted(os.listdir(shards / "shards")) == sorted(Path(e["path"]).name for s in ("training", "validation")
                                                           for e in index[s])


def test_a_split_left_empty_by_the_hash_rule_gets_one_file_as_the_datalist_does(tmp_path):
    src = tmp_path / "src"
    for k in range(6):
        save(src / f"scan{k}.png", phantom(400 + k, 80))
    images, shards = tmp_path / "images", tmp_path / "shards"
    curate([str(src)], None, str(images), size=SIZE, val_fraction=1e-9, **QUIET)
    curate([str(src)], None, str(shards), size=SIZE, val_fraction=1e-9, format="webdataset", shard_size=4, **QUIET)
    datalist = json.loads((images / "datalist.json").read_text())
    index = json.loads((shards / "shards.json").read_text())
    assert len(datalist["validation"]) == 1
    for split in ("training", "validation"):
        keys = [k for e in index[split] for k, _, _ in _read(shards / e["path"])]
        assert sorted(keys) == sorted(Path(it["image"]).stem for it in datalist[split])
    # Rerunning the finished run changes nothing.
    before = snapshot(shards)
    curate([str(src)], None, str(shards), size=SIZE, val_fraction=1e-9, format="webdataset", shard_size=4, **QUIET)
    assert snapshot(shards) == before


def _read(path: Path):
    from echocare.datasets.shards import read_shard

    return list(read_shard(path))


def test_a_killed_driver_resumes_into_the_same_shards(tmp_path, corpus, reference):
    sources, mapping = corpus
    args = dict(size=SIZE, val_fraction=0.3, format="webdataset", shard_size=SHARD_SIZE)
    out = tmp_path / "out"
    # killed with a shard committed and another open
    curate_killed_when(sources, mapping, out, tmp_path,
                       lambda journal: journal.count('"shard"') >= 1 and journal.count('"st":"kept"') >= 3,
                       workers=1, delay=0.3, **args)
    assert not (out / "shards.json").exists()
    committed = sorted(p.name for p in (out / "shards").glob("shard-*.tar"))
    assert committed and len(committed) < len(list((reference["webdataset"] / "shards").glob("shard-*.tar")))
    curate(sources, mapping, str(out), workers=2, **args, **QUIET)
    assert snapshot(out) == snapshot(reference["webdataset"])  # the same shards, byte for byte, and the same index
    assert not [n for n in os.listdir(out / "shards") if n.endswith(".tmp")]


def test_memory_url_sources_give_the_local_result(tmp_path):
    import fsspec

    src = tmp_path / "scans"
    fs = fsspec.filesystem("memory")
    for k, name in enumerate(["b.png", "a/c.png", "a/d.png", "z.jpg"]):
        arr = phantom(500 + k, 80)
        save(src / name, arr)
        fs.pipe(f"/curate_test/scans/{name}", (src / name).read_bytes())
    fs.pipe("/curate_test/scans/.hidden.png", (src / "b.png").read_bytes())
    fs.pipe("/curate_test/scans/notes.txt", b"notes")
    (src / "notes.txt").write_bytes(b"notes")
    try:
        local, remote = tmp_path / "local", tmp_path / "remote"
        curate([str(src)], None, str(local), size=SIZE, **QUIET)
        curate(["memory://curate_test/scans"], None, str(remote), size=SIZE, **QUIET)
        assert json.loads((remote / "datalist.json").read_text()) == json.loads((local / "datalist.json").read_text())
        assert snapshot(remote / "images") == snapshot(local / "images")
        report = json.loads((remote / "report.json").read_text())
        assert report["kept"] == 4
        assert report["skipped"] == [{"file": "memory://curate_test/scans/notes.txt",
                                      "reason": "not an image, video or DICOM (.txt)"}]
        grey = np.asarray(Image.open(io.BytesIO(snapshot(remote / "images")[sorted(snapshot(remote / "images"))[0]])))
        assert grey.shape[:2] == (SIZE, SIZE)
    finally:
        fs.rm("/curate_test", recursive=True)
