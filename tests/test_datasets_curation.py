"""Tests of echocare.datasets.curation (`echocare curate`): crop, dedup, mapping, privacy,
failures, resume after a kill, and a run on a mix of real data."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_helpers import write_dicom as write_grey_dicom

from echocare.datasets.curation import (
    CurationError,
    HashIndex,
    curate,
    detect_echo_region,
    hamming,
    load_mapping,
    perceptual_hash,
    resolve_anatomy,
)
from echocare.phantoms.renderer import make_phantom_image

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
QUIET = {"progress": False}


# ------------------------------------------------------------------------- helpers


def phantom(seed: int, size: int = 96, geometry: str | None = None, organ: str = "other") -> np.ndarray:
    image, _ = make_phantom_image(np.random.default_rng(seed), size, geometry=geometry, organ=organ)
    return image


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def with_ui(image: np.ndarray, top: int = 60, left: int = 70, h: int = 300, w: int = 380) -> np.ndarray:
    """``image`` (grey) pasted at (top, left) into an RGB screenshot with a synthetic UI:
    text-like bright bars at the top and left, a colour bar at the right, a flat banner."""
    canvas = np.zeros((h, w, 3), np.uint8)
    canvas[:14, :] = (30, 60, 110)  # flat coloured banner across the top
    for k in range(4):  # "text": lines of short bright bars (glyphs) in the top-left
        y = 20 + 9 * k
        for x in range(6, 150, 7):
            canvas[y:y + 5, x:x + 4] = 230
    for k in range(5):  # "parameters" down the left side
        y = top + 10 + 14 * k
        canvas[y:y + 6, 8:50:3] = 255
    bar = np.linspace(255, 40, 110).astype(np.uint8)  # colour bar (gradient) at the right
    canvas[top + 20:top + 130, w - 22:w - 12] = np.stack([bar, 255 - bar, np.full_like(bar, 128)], axis=-1)[:, None]
    canvas[h - 16:h - 12, 60:300] = 200  # a thin horizontal scale line at the bottom
    ih, iw = image.shape
    canvas[top:top + ih, left:left + iw] = image[..., None]
    return canvas


def box_of(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(image)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def write_dicom(path: Path, arr: np.ndarray, **attrs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_grey_dicom(path, arr, "MONOCHROME2", **attrs)


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    import av

    h, w = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "12"}
        for img in frames:
            rgb = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def load_outputs(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "datalist.json").read_text()), json.loads((out / "report.json").read_text())


def all_items(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"]


def dropped_files(report: dict, reason: str) -> list[str]:
    return [Path(d["file"]).name for d in report["dropped"][reason]]


def build_mixed(root: Path) -> dict[str, list[str]]:
    """Two source folders with images, a DICOM, a video, a zip, duplicates, near
    duplicates, blanks and corrupt files. Returns what each file is expected to give."""
    a, b = root / "breast", root / "abdomen"
    rng = np.random.default_rng(0)
    imgs = [phantom(s, 96) for s in range(6)]
    save(a / "img0.png", imgs[0])
    save(a / "img1.png", imgs[1])
    save(a / "sub" / "img2.png", with_ui(imgs[2], 40, 50, 200, 240))
    save(a / "sub" / "img3.jpg", np.repeat(imgs[3][..., None], 3, axis=-1))
    # near duplicate of img1: a little noise and a brightness change
    noisy = np.clip(imgs[1].astype(np.int16) + rng.integers(-4, 5, imgs[1].shape) + 6, 0, 255).astype(np.uint8)
    noisy[imgs[1] == 0] = 0
    save(b / "near_img1.png", noisy)
    shutil.copy(a / "img0.png", b / "copy_of_img0.png")  # exact duplicate, other source
    save(b / "blank.png", np.zeros((80, 80), np.uint8))
    few = np.zeros((80, 80), np.uint8)
    few[10:20, 10:30] = 120  # 200 non-zero pixels: blank too
    save(b / "almost_blank.png", few)
    (b / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (b / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02" * 50)
    (b / "notes.txt").write_text("not an image\n")
    write_dicom(b / "scan.dcm", imgs[4])
    video = [phantom(100 + k // 10, 64, organ="abdomen/liver") for k in range(25)]
    write_video(b / "clip.mp4", video)  # frames 0, 10, 20: three different scenes
    with zipfile.ZipFile(b / "archive.zip", "w") as zf:
        zf.writestr("inner/img5.png", _png_bytes(imgs[5]))
        zf.writestr("inner/dup_img0.png", (a / "img0.png").read_bytes())
        zf.writestr("inner/broken.bmp", b"BM" + b"\x00" * 30)
    return {
        "kept": ["img0.png", "img1.png", "img2.png", "img3.jpg", "scan.dcm", "clip.mp4#0", "clip.mp4#10",
                 "clip.mp4#20", "archive.zip!inner/img5.png"],
        "exact_duplicate": ["copy_of_img0.png", "archive.zip!inner/dup_img0.png"],
        "near_duplicate": ["near_img1.png"],
        "blank": ["blank.png", "almost_blank.png"],
        "failed": ["corrupt.png", "corrupt.dcm", "archive.zip!inner/broken.bmp"],
        "skipped": ["notes.txt"],
    }


def build_small(root: Path, video: bool = False) -> dict[str, list[str]]:
    """Two source folders of 8 small PNGs (80x80) for the engine and format tests: five scans, an
    exact and a near duplicate, a blank; with ``video`` also a 21-frame clip (frames 0, 10, 20:
    three scenes). Returns what each file is expected to give."""
    a, b = root / "breast", root / "abdomen"
    imgs = [phantom(50 + s, 80) for s in range(5)]
    for name, img in zip(["s0.png", "s1.png", "sub/s2.png", "sub/s3.png"], imgs):
        save(a / name, img)
    save(b / "s4.png", imgs[4])
    noisy = np.clip(imgs[1].astype(np.int16) + np.random.default_rng(0).integers(-4, 5, imgs[1].shape) + 6,
                    0, 255).astype(np.uint8)
    noisy[imgs[1] == 0] = 0
    save(b / "near_s1.png", noisy)
    shutil.copy(a / "s0.png", b / "copy_of_s0.png")
    save(b / "blank.png", np.zeros((80, 80), np.uint8))
    expected = {"kept": ["s0.png", "s1.png", "s2.png", "s3.png", "s4.png"], "exact_duplicate": ["copy_of_s0.png"],
                "near_duplicate": ["near_s1.png"], "blank": ["blank.png"]}
    if video:
        write_video(b / "clip.mp4", [phantom(60 + k // 10, 64, organ="abdomen/liver") for k in range(21)])
        expected["kept"] += ["clip.mp4#0", "clip.mp4#10", "clip.mp4#20"]
    return expected


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def snapshot(out: Path) -> dict[str, bytes]:
    """Every output file (except the journal) by relative path -> bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "progress.jsonl" and p.name != "report.png"}


# ----------------------------------------------------------------------------- crop


@pytest.mark.parametrize("geometry", ["sector", "linear"])
def test_crop_recovers_the_echo_region_from_a_screenshot(tmp_path, geometry):
    image = phantom(3, 200, geometry=geometry, organ="abdomen/liver")
    screen = with_ui(image, top=60, left=70)
    (y0, y1, x0, x1), mask = detect_echo_region(screen)
    ty0, ty1, tx0, tx1 = box_of(image)
    expected = (ty0 + 60, ty1 + 60, tx0 + 70, tx1 + 70)
    assert np.allclose((y0, y1, x0, x1), expected, atol=3), ((y0, y1, x0, x1), expected)
    # nothing of the UI is inside the region; the echo data is
    assert not mask[:40].any() and not mask[:, :55].any() and not mask[:, -30:].any()
    assert mask[60:260, 70:270][image > 0].mean() > 0.97

    # through the pipeline: the written image is the crop, and the overlay exists
    save(tmp_path / "src" / "screen.png", screen)
    dl = curate([str(tmp_path / "src")], None, str(tmp_path / "out"), size=SIZE, overlay=True, **QUIET)
    (item,) = all_items(json.loads(dl.read_text()))
    name = Path(item["image"]).name
    assert (tmp_path / "out" / "overlays" / name).is_file()
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / name))
    assert overlay.shape == screen.shape
    written = np.asarray(Image.open(tmp_path / "out" / item["image"]))
    assert written.shape == (SIZE, SIZE)  # grey kept grey; the UI colour bar is gone
    direct = curate([str(tmp_path / "src")], None, str(tmp_path / "out_nocrop"), size=SIZE, crop=False, **QUIET)
    uncropped = np.asarray(Image.open(tmp_path / "out_nocrop" / all_items(json.loads(direct.read_text()))[0]["image"]))
    assert uncropped.ndim == 3  # without the crop the colour UI stays in


def test_crop_of_an_image_without_interface_keeps_it_whole():
    image = np.repeat(phantom(5, 128, geometry="linear")[..., None], 3, axis=-1)
    (y0, y1, x0, x1), mask = detect_echo_region(image)
    ty0, ty1, tx0, tx1 = box_of(image.max(axis=2))
    assert abs(y0 - ty0) <= 2 and abs(y1 - ty1) <= 2 and abs(x0 - tx0) <= 2 and abs(x1 - tx1) <= 2


# --------------------------------------------------------------------------- hashes


def test_perceptual_hash_and_index():
    rng = np.random.default_rng(1)
    a, b = phantom(1, 128), phantom(2, 128)
    noisy = np.clip(a + rng.normal(0, 4, a.shape) + 8, 0, 255).astype(np.uint8)
    ha, hb, hn = perceptual_hash(a), perceptual_hash(b), perceptual_hash(noisy)
    assert hamming(ha, hn) <= 6 < hamming(ha, hb)
    index = HashIndex(6)
    index.add(ha, "a")
    assert index.query(hn)[0] == "a"
    assert index.query(hb) is None
    # the multi-index probe finds every hash within the radius (vs. a linear scan)
    hashes = [int(h) for h in rng.integers(0, 2**63, 300, dtype=np.int64)]
    index = HashIndex(7)
    for k, h in enumerate(hashes):
        index.add(h, str(k))
    for k in range(0, 300, 7):
        q = hashes[k] ^ sum(1 << int(bit) for bit in rng.choice(64, 7, replace=False))
        assert index.query(q) == (str(k), 7)


def _flip_bits(h: int, rng: np.random.Generator, k: int) -> int:
    for bit in rng.choice(64, k, replace=False):
        h ^= 1 << int(bit)
    return h


@pytest.mark.parametrize("threshold", [0, 3, 6, 10])
def test_hash_index_takes_the_decisions_of_a_brute_force_search(threshold):
    """Random, clustered and near-duplicate hashes (signed, as perceptual_hash gives them), queried
    while they are added (before the first merge into the rows, between merges, with long rows):
    the same first match and distance as a linear scan, or None where it finds none."""
    rng = np.random.default_rng(threshold)
    mask = (1 << 64) - 1
    centres = [int(h) for h in rng.integers(-2**63, 2**63 - 1, 20, dtype=np.int64)]
    common_top = int(rng.integers(0, 2**32)) << 32  # bands 2 and 3 shared: two long rows
    hashes = []
    for k in range(6000):
        kind = k % 3
        if kind == 0:
            h = int(rng.integers(-2**63, 2**63 - 1, dtype=np.int64))
        elif kind == 1:
            h = _flip_bits(centres[int(rng.integers(20))], rng, int(rng.integers(0, threshold + 3)))
        else:
            h = common_top | int(rng.integers(0, 2**32))
        hashes.append(h)

    def brute_force(added: list[int], q: int) -> tuple[str, int] | None:
        x = np.array([(h ^ q) & mask for h in added], np.uint64)
        distances = np.unpackbits(x.view(np.uint8)).reshape(-1, 64).sum(axis=1)
        within = np.flatnonzero(distances <= threshold)
        return (str(within[0]), int(distances[within[0]])) if within.size else None

    index = HashIndex(threshold)
    found = 0
    for k, h in enumerate(hashes):
        if k in (1, 50, 700) or (k and k % 900 == 0):
            for _ in range(25):
                if rng.random() < 0.3:
                    q = int(rng.integers(-2**63, 2**63 - 1, dtype=np.int64))
                else:  # an added hash, up to a little beyond the threshold away
                    q = _flip_bits(hashes[int(rng.integers(k))], rng, int(rng.integers(0, threshold + 3)))
                expected = brute_force(hashes[:k], q)
                assert index.query(q) == expected, (k, q)
                found += expected is not None
        index.add(h, str(k))
    assert len(index) == 6000 and 0 < found < 8 * 25  # both outcomes met
    assert hamming(-1, 0) == 64 and hamming(-(2**63), 2**63) == 0  # bit patterns, whatever the sign


# -------------------------------------------------------------------------- mapping


def test_mapping_is_validated_and_resolved(tmp_path):
    good = tmp_path / "mapping.yaml"
    good.write_text("breast: thorax/breast\nabdomen: abdomen\nabdomen/liver_scans: Abdomen/Liver\n"
                    "'*heart*': thorax/heart/apical four-chamber\narchive.zip/inner: pelvis\n")
    amap = load_mapping(good)
    assert resolve_anatomy(amap, "breast", "sub/x.png") == "thorax/breast"
    assert resolve_anatomy(amap, "abdomen", "liver_scans/x.png") == "abdomen/liver"
    assert resolve_anatomy(amap, "abdomen", "liver_scans_2/x.png") == "abdomen"
    assert resolve_anatomy(amap, "abdomen", "a4c_heart_1.png") == "thorax/heart/apical four-chamber"
    assert resolve_anatomy(amap, "breast", "archive.zip!inner/a.png") == "pelvis"
    assert resolve_anatomy(amap, "other", "x.png") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("breast: thorax/breast\nkidneys: abdomen/kidnee\n")
    with pytest.raises(CurationError, match=r"bad\.yaml: key 'kidneys': unknown anatomy path 'abdomen/kidnee'"):
        load_mapping(bad)
    (tmp_path / "src").mkdir()
    with pytest.raises(CurationError, match=r"bad\.yaml"):
        curate([str(tmp_path / "src")], str(bad), str(tmp_path / "out"), **QUIET)
    with pytest.raises(CurationError, match="unknown curate option"):
        curate([str(tmp_path / "src")], None, str(tmp_path / "out"), bogus=1)


# ------------------------------------------------------------------ the whole thing


def test_mixed_sources_keep_drop_fail_and_map(tmp_path):
    expected = build_mixed(tmp_path / "in")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("breast: thorax/breast\nabdomen: abdomen\n'clip.mp4': abdomen/liver\n")
    out = tmp_path / "out"
    dl_path = curate([str(tmp_path / "in" / "breast"), str(tmp_path / "in" / "abdomen")], str(mapping), str(out),
                     size=SIZE, workers=2, frame_step=10, val_fraction=0.3, overlay=True, **QUIET)
    datalist, report = load_outputs(out)
    assert dl_path == out / "datalist.json"
    items = all_items(datalist)
    assert report["kept"] == len(items) == len(expected["kept"])
    assert datalist["training"] and datalist["validation"]
    names = [it["image"] for it in items]
    assert len(set(names)) == len(names)
    assert sorted(os.listdir(out / "images")) == sorted(Path(n).name for n in names)
    assert sorted(os.listdir(out / "overlays")) == sorted(Path(n).name for n in names)
    for it in items:
        img = np.asarray(Image.open(out / it["image"]))
        assert img.shape[:2] == (SIZE, SIZE)
        assert it["anatomy"] in ("thorax/breast", "abdomen", "abdomen/liver")
    for reason in ("exact_duplicate", "near_duplicate", "blank"):
        got = sorted(Path(d["file"]).name if "!" not in d["file"] else "archive.zip!" + d["file"].split("!")[1]
                     for d in report["dropped"][reason])
        assert got == sorted(expected[reason]), reason
    assert report["dropped"]["exact_duplicate"][0]["duplicate_of"] in names
    failed = {Path(f["file"].split("!")[0]).name + ("!" + f["file"].split("!")[1] if "!" in f["file"] else ""): f["reason"]
              for f in report["failed"]}
    assert sorted(failed) == sorted(expected["failed"])
    assert all(reason for reason in failed.values())
    assert [Path(s["file"]).name for s in report["skipped"]] == ["notes.txt"]
    counts = report["counts"]
    assert counts["source"] == {"abdomen": 5, "breast": 4}
    assert counts["modality"] == {"dicom": 1, "image": 5, "video": 3}
    assert counts["region"] == {"abdomen": 5, "thorax": 4}
    assert counts["organ"] == {"(none)": 2, "abdomen/liver": 3, "thorax/breast": 4}
    assert (out / "report.png").stat().st_size > 1000
    # frames of one video stay on one side of the split
    clip = [it for it in items if it.get("anatomy") == "abdomen/liver"]
    sides = {("validation" if it in datalist["validation"] else "training") for it in clip}
    assert len(clip) == 3 and len(sides) == 1

    # The same inputs with 1 worker (and a rerun into the finished folder) give the same result.
    out1 = tmp_path / "out1"
    curate([str(tmp_path / "in" / "breast"), str(tmp_path / "in" / "abdomen")], str(mapping), str(out1),
           size=SIZE, workers=1, frame_step=10, val_fraction=0.3, overlay=True, **QUIET)
    assert snapshot(out1) == snapshot(out)
    curate([str(tmp_path / "in" / "breast"), str(tmp_path / "in" / "abdomen")], str(mapping), str(out1),
           size=SIZE, workers=1, frame_step=10, val_fraction=0.3, overlay=True, **QUIET)
    assert snapshot(out1) == snapshot(out)
    # other settings into the same folder are refused, not mixed
    with pytest.raises(CurationError, match="other settings"):
        curate([str(tmp_path / "in" / "breast")], None, str(out1), size=SIZE, **QUIET)


def test_no_patient_attribute_in_any_output(tmp_path, capsys, caplog):
    secrets = ["Doe^Jane", "Doe", "Jane", "123456789", "Secret Hospital", "20240101", "ACC998877"]
    src = tmp_path / "src"
    write_dicom(src / "study" / "image.dcm", phantom(7, 96), PatientName="Doe^Jane", PatientID="123456789",
                InstitutionName="Secret Hospital", StudyDate="20240101", PatientBirthDate="20240101",
                AccessionNumber="ACC998877")
    multi = np.stack([phantom(8 + k, 96) for k in range(3)])
    write_dicom(src / "study" / "cine.dcm", multi, PatientName="Doe^Jane", PatientID="123456789",
                InstitutionName="Secret Hospital", StudyDate="20240101", NumberOfFrames=3)
    broken = (src / "study" / "image.dcm").read_bytes()[:600]  # header with the name, no pixels
    (src / "study" / "broken.dcm").write_bytes(broken)
    out = tmp_path / "out"
    caplog.set_level("DEBUG")
    curate([str(src)], None, str(out), size=SIZE, frame_step=1, overlay=True, progress=True, val_fraction=0.5)
    datalist, report = load_outputs(out)
    assert report["kept"] == 4 and len(report["failed"]) == 1
    logs = capsys.readouterr()
    texts = [logs.out, logs.err, caplog.text]
    for p in out.rglob("*"):
        texts.append(str(p.relative_to(out)))
        if p.is_file():
            texts.append(p.read_bytes().decode("latin-1"))
    for secret in secrets:
        for text in texts:
            assert secret not in text, secret


# ------------------------------------------------------------------- kill and resume


def curate_killed_when(sources: list[str], mapping: str | None, out: Path, cwd: Path, ready, workers: int,
                       delay: float, **args) -> None:
    """``curate`` into ``out`` in a child process, killed with SIGKILL (as an out-of-memory kill
    would) as soon as ``ready(journal text)``; fails when the run ends before that."""
    code = ("from echocare.datasets.curation import curate\n"
            f"curate({sources!r}, {mapping!r}, {str(out)!r}, workers={workers}, progress=False, _delay={delay}, "
            f"**{args!r})\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=cwd)
    journal = out / "progress.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if ready(journal.read_text() if journal.exists() else ""):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_run_resumes_to_the_same_result(tmp_path):
    expected = build_mixed(tmp_path / "in")
    for k in range(8):  # more files, so that the kill lands mid-run
        save(tmp_path / "in" / "breast" / "more" / f"extra{k}.png", phantom(50 + k, 80))
    sources = [str(tmp_path / "in" / "breast"), str(tmp_path / "in" / "abdomen")]
    args = dict(size=SIZE, frame_step=10, val_fraction=0.3, overlay=True)

    reference = tmp_path / "reference"
    curate(sources, None, str(reference), workers=1, **args, **QUIET)

    out = tmp_path / "out"
    curate_killed_when(sources, None, out, tmp_path, lambda journal: journal.count('"fr"') >= 4, workers=2, delay=0.25,
                       **args)
    journal = out / "progress.jsonl"
    assert not (out / "datalist.json").exists()
    done_before = journal.read_text().count('"done":true')
    assert done_before < 20

    curate(sources, None, str(out), workers=1, **args, **QUIET)
    assert snapshot(out) == snapshot(reference)
    datalist, report = load_outputs(out)
    assert report["kept"] == len(expected["kept"]) + 8
    # the rerun did not redo the files finished before the kill
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    finished = [r["k"] for r in lines if r.get("done")]
    assert len(finished) == len(set(finished))


# ------------------------------------------------------------------------ real data


def test_real_data_mix(tmp_path, real_data_dir):
    """Real images, the real DICOMs, a generated MP4, a zip, duplicates, near duplicates,
    blanks and corrupt files: every valid image kept once, every duplicate, blank and
    corrupt file accounted for."""
    src = tmp_path / "real"
    picked = []
    for folder, pattern, n in (("busbra", "Images/*.png", 3), ("hc18", "*.png", 3), ("carotid", "*.png", 2),
                               ("ddti", "*.png", 3)):
        files = sorted(p for p in (real_data_dir / folder).rglob(pattern) if "mask" not in str(p).lower())
        if folder == "carotid":  # one frame per recording: frames of one recording are near duplicates
            files = list({p.name.split("_slice")[0]: p for p in reversed(files)}.values())
        (src / folder).mkdir(parents=True)
        for p in files[:n]:
            picked.append(p)
            shutil.copy(p, src / folder / p.name)
    assert len(picked) >= 8
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(picked[0], extra / "same_as_first.png")  # exact duplicate
    a = np.asarray(Image.open(picked[1]).convert("L")).astype(np.int16)
    rng = np.random.default_rng(0)
    save(extra / "near.png", np.clip(a + rng.integers(-3, 4, a.shape) + 5, 0, 255).astype(np.uint8))
    save(extra / "blank.png", np.zeros((100, 120), np.uint8))
    (extra / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    write_video(extra / "clip.mp4", [phantom(200 + k // 10, 64, organ="thorax/heart") for k in range(15)])
    with zipfile.ZipFile(extra / "more.zip", "w") as zf:
        zf.write(picked[2], "zipped/dup.png")  # duplicate inside an archive
        zf.writestr("zipped/new.png", _png_bytes(phantom(300, 96)))
    dicom_dir = real_data_dir / "dicom_us"
    out = tmp_path / "out"
    curate([str(src), str(dicom_dir), str(extra)], None, str(out), size=SIZE, workers=2, frame_step=10,
           **QUIET)
    datalist, report = load_outputs(out)
    kept_units = report["kept"]
    exact = dropped_files(report, "exact_duplicate")
    assert "same_as_first.png" in exact
    assert any(d["file"].endswith("more.zip!zipped/dup.png") for d in report["dropped"]["exact_duplicate"])
    assert "near.png" in dropped_files(report, "near_duplicate")
    assert dropped_files(report, "blank") == ["blank.png"]
    assert [Path(f["file"]).name for f in report["failed"] if "extra" in f["file"]] == ["corrupt.jpg"]
    # every real image kept once; every DICOM accounted for (kept, dropped or failed)
    assert report["counts"]["source"]["real"] == len(picked)
    reported = {Path(d["file"]).name for v in report["dropped"].values() for d in v}
    reported |= {Path(f["file"]).name for f in report["failed"]}
    dicoms = sorted(p.name for p in dicom_dir.glob("*.dcm"))
    kept_dicom = report["counts"]["modality"].get("dicom", 0)
    assert kept_dicom >= 5
    for name in ("OBXXXX1A_2frame.dcm", "OBXXXX1A_rle.dcm", "gdcm-US-ALOKA-16_big.dcm"):
        assert name in exact  # the same pixels in another encoding
    assert set(dicoms) - reported, "some DICOM must have been kept"
    assert kept_units == len(all_items(datalist)) == len(os.listdir(out / "images"))


# ----------------------------------------------------------------------- data safety


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def test_out_that_is_not_a_curation_folder_or_overlaps_a_source_is_refused(tmp_path):
    src = tmp_path / "src"
    for k in range(2):
        save(src / f"scan{k}.png", phantom(60 + k, 80))
    dataset = tmp_path / "dataset"  # somebody's dataset: must come out untouched
    for k in range(2):
        save(dataset / "images" / f"case{k}.png", phantom(70 + k, 80))
    (dataset / "labels.csv").write_text("case0,1\n")
    before = tree(dataset)
    with pytest.raises(CurationError) as info:
        curate([str(src)], None, str(dataset), size=SIZE, **QUIET)
    message = str(info.value)
    assert message.startswith(f"{dataset}: ") and "not empty" in message and "\n" not in message
    assert tree(dataset) == before

    originals = tree(src)
    cases = {
        str(src): "is the source folder",  # --src D --out D
        str(src / "curated"): "inside the source folder",  # out inside a source
    }
    link = tmp_path / "link_to_src"
    link.symlink_to(src, target_is_directory=True)
    cases[str(link)] = "is the source folder"  # the same folder through a link
    for out, problem in cases.items():
        with pytest.raises(CurationError, match=problem) as info:
            curate([str(src)], None, out, size=SIZE, **QUIET)
        assert str(info.value).startswith(f"{out}: ") and "\n" not in str(info.value)
        assert tree(src) == originals
    assert not (src / "curated").exists()

    # A curation folder (it holds a journal) that contains a source: refused too.
    out = tmp_path / "out"
    curate([str(src)], None, str(out), size=SIZE, **QUIET)
    done = tree(out)
    with pytest.raises(CurationError, match="^" + re.escape(f"{out}: contains the source folder")):
        curate([str(out / "images")], None, str(out), size=SIZE, **QUIET)
    assert tree(out) == done
    file_out = tmp_path / "a_file"
    file_out.write_text("mine\n")
    with pytest.raises(CurationError, match="not a folder"):
        curate([str(src)], None, str(file_out), size=SIZE, **QUIET)
    assert file_out.read_text() == "mine\n"


def test_only_files_the_journal_records_are_removed(tmp_path):
    src_a, src_b = tmp_path / "a", tmp_path / "b"
    for k in range(2):
        save(src_a / f"scan{k}.png", phantom(80 + k, 80))
    save(src_b / "other.png", phantom(90, 80))
    shutil.copy(src_a / "scan0.png", src_b / "dup.png")  # dropped: its written image is removed
    out = tmp_path / "out"
    curate([str(src_a), str(src_b)], None, str(out), size=SIZE, overlay=True, **QUIET)
    datalist, report = load_outputs(out)
    kept = sorted(Path(it["image"]).name for it in all_items(datalist))
    assert report["kept"] == 3 and len(report["dropped"]["exact_duplicate"]) == 1
    assert sorted(os.listdir(out / "images")) == kept
    # A user's files beside the outputs, and a temporary file a killed worker left for
    # a journaled output.
    (out / "images" / "mine.png").write_bytes(b"user data")
    (out / "overlays" / "notes.txt").write_text("user notes\n")
    stray = out / "images" / f".{kept[0]}.12345.tmp"
    stray.write_bytes(b"partial")
    curate([str(src_a), str(src_b)], None, str(out), size=SIZE, overlay=True, **QUIET)  # resume
    assert (out / "images" / "mine.png").read_bytes() == b"user data"
    assert (out / "overlays" / "notes.txt").read_text() == "user notes\n"
    assert not stray.exists()
    assert sorted(os.listdir(out / "images")) == sorted(kept + ["mine.png"])
    # A restart discards what the old journal wrote, and nothing else.
    curate([str(src_a)], None, str(out), size=SIZE, overlay=True, restart=True, **QUIET)
    datalist, report = load_outputs(out)
    kept_a = sorted(Path(it["image"]).name for it in all_items(datalist))
    assert report["kept"] == 2 and set(kept_a) < set(kept)
    assert sorted(os.listdir(out / "images")) == sorted(kept_a + ["mine.png"])
    assert (out / "overlays" / "notes.txt").read_text() == "user notes\n"


def _dying_process(real, marker: Path):
    def process(task, cfg):
        if task.key.endswith("killer.png"):
            with open(marker, "a") as fh:
                fh.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)  # as an out-of-memory kill would
        return real(task, cfg)

    return process


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_file_is_retried_once_then_reported_and_the_job_finishes(tmp_path, monkeypatch):
    import echocare.datasets.curation as curation

    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("the patched per-file function reaches the workers through fork")
    src = tmp_path / "src"
    for k in range(6):
        save(src / f"scan{k}.png", phantom(100 + k, 80))
    save(src / "killer.png", phantom(110, 80))
    attempts = tmp_path / "attempts"
    monkeypatch.setattr(curation, "_process", _dying_process(curation._process, attempts))
    out = tmp_path / "out"
    t0 = time.monotonic()
    curate([str(src)], None, str(out), size=SIZE, workers=2, **QUIET)
    assert time.monotonic() - t0 < 60
    datalist, report = load_outputs(out)
    assert len(attempts.read_text().split()) == 2  # tried, then retried once alone
    assert [Path(f["file"]).name for f in report["failed"]] == ["killer.png"]
    assert "worker process" in report["failed"][0]["reason"]
    assert report["kept"] == 6 and len(os.listdir(out / "images")) == 6
    journal = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert sorted(Path(r["d"]).name for r in journal if r.get("done")) == sorted(
        [f"scan{k}.png" for k in range(6)] + ["killer.png"])


def test_symlink_loops_in_a_source_are_reported_and_skipped(tmp_path):
    src = tmp_path / "src"
    save(src / "a.png", phantom(120, 80))
    save(src / "sub" / "b.png", phantom(121, 80))
    (src / "sub" / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    (src / "self").symlink_to("self")  # a link to itself
    out = tmp_path / "out"
    curate([str(src)], None, str(out), size=SIZE, **QUIET)
    datalist, report = load_outputs(out)
    assert report["kept"] == 2 and report["units"] == 2
    assert report["dropped_counts"]["exact_duplicate"] == 0  # the loop was not walked
    skipped = {Path(s["file"]).relative_to(src).as_posix(): s["reason"] for s in report["skipped"]}
    assert sorted(skipped) == ["self", "sub/up"]
    assert all("symbolic link loop" in reason for reason in skipped.values())
    # a --src that is itself a looping link: one line naming it, not a RuntimeError
    with pytest.raises(CurationError, match="^" + re.escape(f"{src / 'self'}: source not found (a broken or looping "
                                                             "symbolic link)") + "$"):
        curate([str(src / "self")], None, str(tmp_path / "out2"), **QUIET)


def test_unsafe_zip_member_names_are_listed_as_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with zipfile.ZipFile(src / "scans.zip", "w") as zf:
        zf.writestr("../evil.png", _png_bytes(phantom(130, 80)))
        zf.writestr("/abs.png", _png_bytes(phantom(131, 80)))
        zf.writestr("inner/ok.png", _png_bytes(phantom(132, 80)))
    out = tmp_path / "out"
    curate([str(src)], None, str(out), size=SIZE, **QUIET)
    datalist, report = load_outputs(out)
    assert report["kept"] == 1 and report["failed"] == []
    skipped = {s["file"].split("!", 1)[1]: s["reason"] for s in report["skipped"]}
    assert sorted(skipped) == ["../evil.png", "/abs.png"]
    assert all("unsafe name" in reason for reason in skipped.values())
    assert not (tmp_path / "evil.png").exists() and not Path("/abs.png").exists()


def test_overlay_shows_no_source_pixel_outside_the_echo_region(tmp_path):
    screen = with_ui(phantom(3, 200, geometry="sector", organ="abdomen/liver"), top=60, left=70)
    _, mask = detect_echo_region(screen)
    save(tmp_path / "src" / "screen.png", screen)
    dl = curate([str(tmp_path / "src")], None, str(tmp_path / "out"), size=SIZE, overlay=True, **QUIET)
    (item,) = all_items(json.loads(dl.read_text()))
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / Path(item["image"]).name))
    outside = overlay[~mask]
    colours = {tuple(int(c) for c in px) for px in np.unique(outside, axis=0)}
    colours.discard((255, 0, 0))  # the region's box
    assert len(colours) == 1, sorted(colours)[:5]  # one flat colour: no text, bar or banner left
    assert (overlay[20:50, 6:150] == overlay[0, 0]).all()  # the burned-in "text"
    assert (overlay[mask] == screen[mask]).all(axis=-1).mean() > 0.9  # the echo data is shown


def test_hide_source_paths_keeps_source_names_out_of_every_output(tmp_path):
    src = tmp_path / "DoeJane_1970"
    save(src / "Smith^John" / "DoeJane_scan.png", phantom(140, 80))
    save(src / "Smith^John" / "DoeJane_second.png", phantom(141, 80))
    shutil.copy(src / "Smith^John" / "DoeJane_scan.png", src / "DoeJane_copy.png")
    (src / "Smith^John" / "DoeJane_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (src / "DoeJane_notes.txt").write_text("notes\n")
    with zipfile.ZipFile(src / "DoeJane.zip", "w") as zf:
        zf.writestr("DoeJane_zipped.png", _png_bytes(phantom(142, 80)))
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("DoeJane_1970: thorax/breast\n")
    out = tmp_path / "out"
    curate([str(src)], str(mapping), str(out), size=SIZE, overlay=True, hide_source_paths=True,
           val_fraction=0.5, **QUIET)
    datalist, report = load_outputs(out)
    assert report["kept"] == 3 and len(report["failed"]) == 1
    assert {it["anatomy"] for it in all_items(datalist)} == {"thorax/breast"}  # the mapping still applies
    # sha256("<source folder name>/<path inside it>")[:16]; DoeJane_copy.png comes first (sorted)
    assert report["failed"][0]["file"] == hidden_name("DoeJane_1970/Smith^John/DoeJane_broken.png")
    assert report["dropped"]["exact_duplicate"][0]["file"] == hidden_name("DoeJane_1970/Smith^John/DoeJane_scan.png")
    assert report["skipped"][0]["file"] == hidden_name("DoeJane_1970/DoeJane_notes.txt")
    assert list(report["counts"]["source"]) == [hidden_name("DoeJane_1970")]
    for p in out.rglob("*"):
        for text in (str(p.relative_to(out)), p.read_bytes().decode("latin-1") if p.is_file() else ""):
            for secret in ("DoeJane", "Smith", str(tmp_path)):
                assert secret not in text, (p, secret)
    first = snapshot(out)
    curate([str(src)], str(mapping), str(out), size=SIZE, overlay=True, hide_source_paths=True,
           val_fraction=0.5, **QUIET)  # a rerun resumes from the hidden journal
    assert snapshot(out) == first


def huge_png(path: Path, side: int, level: int = 128) -> Path:
    """A single-colour ``side`` x ``side`` grey PNG, written row by row (no big array): a few
    hundred KB on disk that decode to ``side**2`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(6), b"\x00" + bytes([level]) * side  # filter byte, then the pixels
    idat = b"".join(packer.compress(row * min(500, side - y)) for y in range(0, side, 500)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _rss_kb(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` (peak) of this process in kB, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def test_max_pixels_refuses_a_huge_image_before_decoding_and_the_batch_goes_on(tmp_path, capsys):
    from echocare.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    for k in range(2):
        save(src / f"scan{k}.png", phantom(150 + k, 80))
    huge = huge_png(src / "huge.png", 12000)  # 144 M pixels: 1.7 GB as float32 RGB, 144 MB as 8-bit grey
    assert huge.stat().st_size < 1_000_000
    try:  # reset the peak RSS (VmHWM) to the current RSS, so the peak below is this run's
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _rss_kb("VmRSS")
    except OSError:
        before = None
    with pytest.raises(SystemExit) as exited:  # through the command line: --max-pixels reaches the reader
        main(["curate", "--src", str(src), "--out", str(out), "--size", str(SIZE), "--progress", "false",
              "--max-pixels", "20000000"])
    if before is not None:
        grown_mb = (_rss_kb("VmHWM") - before) / 1024
        assert grown_mb < 100, grown_mb
    assert exited.value.code == 1  # a batch with a failed item
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("failed:")] == [
        f"failed: {huge}: frame of 12000x12000 = 144,000,000 pixels is over the max_pixels limit of 20,000,000 "
        "pixels per frame"]
    datalist, report = load_outputs(out)
    assert [Path(f["file"]).name for f in report["failed"]] == ["huge.png"]
    assert report["kept"] == 2 and len(os.listdir(out / "images")) == 2
    # The limit is a setting of the run: resuming with another one (here the default) is refused,
    # with the same one it is the finished run again.
    before = sorted(os.listdir(out / "images"))
    with pytest.raises(CurationError, match="other settings"):
        curate([str(src)], None, str(out), size=SIZE, **QUIET)
    for limit in (None, 10**9):
        with pytest.raises(CurationError, match="other settings"):
            curate([str(src)], None, str(out), size=SIZE, max_pixels=limit or "none", **QUIET)
    assert sorted(os.listdir(out / "images")) == before
    with pytest.raises(SystemExit) as exited:
        main(["curate", "--src", str(src), "--out", str(out), "--size", str(SIZE), "--progress", "false",
              "--max-pixels", "20000000"])
    assert exited.value.code == 1
    assert load_outputs(out)[1]["kept"] == 2
    with pytest.raises(CurationError, match="max_pixels"):
        curate([str(src)], None, str(tmp_path / "out2"), max_pixels=0, **QUIET)
