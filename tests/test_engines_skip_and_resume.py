"""One bad input never costs an inference batch; a resumed training keeps its better model (issue #15).

The shared mechanism (:class:`echocare.datasets.SkipUnreadableDataset` and the prediction
writers' skipped rows) on a bare engine, then bundle inference of a segmentation, a
classification and an enhancement bundle on a folder with one truncated PNG; the best-model
state saved in training checkpoints (:class:`echocare.engines.BestModelState`) through a
tiny ``ddti_seg`` run resumed twice; and a resume refused when no checkpoint can be read.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.data import DataLoader, decollate_batch
from monai.transforms import Compose, Resized
from PIL import Image

from bundle_helpers import REPO, bundles_in_one_process
from echocare.datasets import DatalistError, SkipUnreadableDataset, list_inputs
from echocare.tasks.supervised import LoadFramed, expand_frames
from echocare.engines import ResumeError, find_resume_checkpoint
from echocare.engines.writers import PredictionWriter


def _inputs(folder: Path, good: int = 2) -> Path:
    """``good`` grey 48x56 PNGs ``good<i>.png`` and ``cut.png``, a PNG cut short in its pixel
    data (its header still reads, decoding fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (48, 56), dtype=np.uint8)).save(folder / f"good{i}.png")
    whole = (folder / "good0.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    return folder


class _JsonWriter(PredictionWriter):
    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        path, name, frame = self._name(source)
        (self.output_dir / f"{name}.json").write_text(json.dumps({"mean": output["mean"]}))
        return {"image": path, "frame": frame or 0, "mean": output["mean"]}


def test_dataset_skips_unreadable_items_and_writer_lists_them(tmp_path: Path) -> None:
    folder = _inputs(tmp_path / "in")
    (folder / "not_an_image.png").write_bytes(b"no PNG signature")  # its header fails already
    items = expand_frames(list_inputs(folder))
    assert [Path(i["image"]).name for i in items] == ["cut.png", "good0.png", "good1.png", "not_an_image.png"]
    dataset = SkipUnreadableDataset(items, Compose([LoadFramed("image"), Resized("image", (32, 32))]))
    loaded = [dataset[i] for i in range(len(dataset))]
    assert [bool(item["skipped"]) for item in loaded] == [True, False, False, True]
    # a skipped item carries the tensors of the first item after it that loads, so batches keep their shape
    assert torch.equal(loaded[0]["image"], loaded[1]["image"]) and loaded[3]["image"].shape == (3, 32, 32)

    def step(engine: Engine, batch: dict[str, Any]) -> list[dict[str, Any]]:
        engine.state.batch = decollate_batch(batch)
        return [{"mean": round(float(item["image"].mean()), 4)} for item in engine.state.batch]

    engine = Engine(step)
    writer = _JsonWriter(tmp_path / "out", class_names=[])
    writer.attach(engine)
    engine.run(DataLoader(dataset, batch_size=3, num_workers=0), max_epochs=1)

    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [(Path(r["image"]).name, r.get("status")) for r in records] == [
        ("cut.png", "skipped"), ("good0.png", None), ("good1.png", None), ("not_an_image.png", "skipped")
    ]
    cut, bad = records[0], records[3]
    assert set(cut) == {"image", "frame", "status", "reason"}
    assert cut["reason"].startswith(str(folder / "cut.png")) and "truncated" in cut["reason"]
    assert bad["reason"].startswith(str(folder / "not_an_image.png"))
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "frame", "mean", "status", "reason"]  # the outputs' columns first
    assert [(Path(r["image"]).name, r["status"], r["reason"]) for r in rows] == [
        (Path(r["image"]).name, r.get("status", ""), r.get("reason", "")) for r in records
    ]
    # skipped inputs get no files; the good ones get theirs
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == ["good0.json", "good1.json", "predictions.json"]


def test_dataset_with_no_readable_item_names_them(tmp_path: Path) -> None:
    folder = _inputs(tmp_path / "in", good=1)
    (folder / "good0.png").unlink()
    dataset = SkipUnreadableDataset(expand_frames(list_inputs(folder)), LoadFramed("image"))
    with pytest.raises(DatalistError, match=r"^none of the 1 inputs can be read: .*cut\.png: .*truncated"):
        dataset[0]


def _checkpoint(name: str, path: Path) -> str:
    """A tiny untrained network of bundle ``name`` saved as its inference checkpoint."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "inference.yaml"))
    parser.update({"network_size": "tiny"})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return str(path)


def test_bundle_inference_skips_a_truncated_png(tmp_path: Path) -> None:
    folder = _inputs(tmp_path / "in")
    names = ("ddti_seg", "busbra_cls", "usenhance")  # segmentation, classification, image-to-image
    commands = [
        ["inferring", "--config_file", str(REPO / "bundles" / name / "configs" / "inference.yaml"), "--input_dir",
         str(folder), "--output_dir", str(tmp_path / name), "--checkpoint", _checkpoint(name, tmp_path / f"{name}.pt"),
         "--network_size", "tiny", "--image_size", "64", "--batch_size", "2", "--num_workers", "0"]
        for name in names
    ]
    result = bundles_in_one_process(*commands)
    assert (result.stdout + result.stderr).count(f"skipped {folder / 'cut.png'}: ") == len(names)  # the warning names the file
    outputs = {"ddti_seg": ("mask_png", "mask_nifti"), "busbra_cls": ("predicted",), "usenhance": ("enhanced_png",)}
    for name in names:
        predictions = tmp_path / name / "predictions"
        records = {Path(r["image"]).name: r for r in json.loads((predictions / "predictions.json").read_text())}
        assert set(records) == {"cut.png", "good0.png", "good1.png"}, name
        cut = records.pop("cut.png")
        assert cut["status"] == "skipped" and cut["reason"].startswith(f"{folder / 'cut.png'}: "), name
        for record in records.values():  # the good inputs have their outputs
            assert "status" not in record and all(record[key] for key in outputs[name]), name
            if name != "busbra_cls":
                assert Path(record[outputs[name][0]]).is_file(), name
        with (predictions / "predictions.csv").open() as handle:
            rows = {Path(r["image"]).name: r for r in csv.DictReader(handle)}
        assert rows["cut.png"]["status"] == "skipped" and rows["cut.png"]["reason"] == cut["reason"], name
        assert not (predictions / "cut.png").exists() and not (predictions / "cut.json").exists(), name


_RESUME = """
import hashlib, json, sys
from pathlib import Path

import fire, torch
from monai.bundle import run

args, models = json.loads(sys.argv[1]), Path(sys.argv[2])


def train(*extra):
    fire.Fire({"run": run}, command=["run", *args, *extra])


def set_best(score):
    # what earlier validations left behind, as a resumed run reads it from the checkpoints
    for path in models.glob("checkpoint*.pt"):
        state = torch.load(path, weights_only=True)
        state["best_model"].update(best_metric=score, saved=[[score, "model.pt"]])
        torch.save(state, path)


def digest():
    return hashlib.sha256((models / "model.pt").read_bytes()).hexdigest()


train("--max_epochs", "1")
digests = [digest()]
set_best(2.0)  # a better model than any Dice can make
train("--max_epochs", "2", "--resume", "true")
digests.append(digest())
set_best(-1.0)  # a worse model than any Dice
train("--max_epochs", "3", "--resume", "true")
digests.append(digest())
print("DIGESTS", json.dumps(digests))
"""


def _segmentation_set(root: Path) -> Path:
    """Two training and one validation 48x56 images of a bright ellipse, masks 0/255."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:48, :56]
    items = []
    for i in range(3):
        inside = ((yy - 24) / (6 + 3 * (i % 3))) ** 2 + ((xx - 28) / 8) ** 2 <= 1
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.clip(rng.normal(60, 20, (48, 56)) + 120 * inside, 0, 255).astype(np.uint8)).save(root / "images" / f"b{i}.png")
        Image.fromarray((inside * 255).astype(np.uint8)).save(root / "masks" / f"b{i}.png")
        items.append({"image": f"images/b{i}.png", "label": f"masks/b{i}.png"})
    content = {"training": items[:2], "validation": items[2:], "mask_values": {"background": 0, "nodule": 255}}
    (root / "datalist.json").write_text(json.dumps(content))
    return root


def test_resume_keeps_a_better_model_and_replaces_a_worse_one(tmp_path: Path) -> None:
    data, out = _segmentation_set(tmp_path / "data"), tmp_path / "run"
    args = ["training", "--config_file", str(REPO / "bundles" / "ddti_seg" / "configs" / "train.yaml"),
            "--network_size", "tiny", "--image_size", "64", "--batch_size", "2", "--num_workers", "0",
            "--progress_bar", "False", "--dataset_dir", str(data), "--datalist", str(data / "datalist.json"),
            "--output_dir", str(out)]
    result = subprocess.run([sys.executable, "-c", _RESUME, json.dumps(args), str(out / "models")],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-5000:]
    trained, kept, replaced = json.loads(result.stdout.split("DIGESTS", 1)[1])
    assert kept == trained  # epoch 2's Dice (<= 1) does not beat the restored 2.0: model.pt untouched
    assert replaced != kept  # epoch 3's Dice beats the restored -1.0: model.pt is the new best
    assert "resume: best validation 2 at epoch 1;" in result.stdout + result.stderr
    final = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 3 and final["best_model"]["best_metric_epoch"] == 3  # one iteration per epoch
    assert final["best_model"]["saved"][0][0] == pytest.approx(final["best_model"]["best_metric"])
    assert 0.0 <= final["best_model"]["best_metric"] <= 1.0


def test_resume_refuses_when_no_checkpoint_can_be_read(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path, resume=True) is None  # nothing to resume: a fresh start
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"cut short by a crash")
    torch.save({"model": {}}, tmp_path / "checkpoint_final.pt")  # a file, but no trainer state
    assert find_resume_checkpoint(tmp_path, resume=False) is None
    with pytest.raises(ResumeError) as raised:
        find_resume_checkpoint(tmp_path, resume=True)
    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith(f"{tmp_path}: cannot resume, none of its 2 checkpoints can be read: ")
    assert "checkpoint_epoch=3.pt cannot be read (UnpicklingError" in first_line
    assert "checkpoint_final.pt holds no trainer state" in first_line
