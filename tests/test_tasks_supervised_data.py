"""Datalists, label maps, clips and inference inputs of the fine-tuning bundles (echocare.tasks.supervised.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from echocare.tasks.supervised import (
    ClassLabeld,
    EvalSpacingd,
    LabelMapError,
    LoadClipd,
    LoadFramed,
    LoadLabelMapd,
    class_weights,
    clip_frame_count,
    expand_frames,
    load_task_datalist,
    mask_values_for,
    read_clip,
    read_label_map,
    subsample_training,
)
from echocare.datasets import DatalistError
from echocare.io import LoadUltrasoundd
from dicom_helpers import write_dicom


def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)  # a bool array is saved as a 1-bit ("1" mode) PNG
    return str(path)


@pytest.fixture
def seg_dataset(tmp_path: Path) -> Path:
    """6 training and 2 validation images (40x48) with 0/255 nodule masks."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        image = (rng.random((40, 48)) * 255).astype(np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        if i % 2 == 0:
            mask[10:20, 10 + i : 25 + i] = 255
        _png(tmp_path / "images" / f"im{i}.png", image)
        _png(tmp_path / "masks" / f"im{i}.png", mask)
        items.append({"image": f"images/im{i}.png", "label": f"masks/im{i}.png", "case": f"P{i}"})
    content = {"mask_values": {"background": 0, "nodule": 255}, "training": items[:6], "validation": items[6:]}
    (tmp_path / "datalist.json").write_text(json.dumps(content))
    return tmp_path


def test_read_label_map_values_and_binary_conventions(tmp_path: Path) -> None:
    raw = np.zeros((6, 7), np.uint8)
    raw[1:3, 2:5] = 255
    path = _png(tmp_path / "m.png", raw)
    assert read_label_map(path, num_classes=2).sum() == 6  # 0/255 two-class mask reads as 0/1
    assert read_label_map(path, values=[0, 255]).max() == 1
    with pytest.raises(LabelMapError, match=r"m\.png.*\[255\].*outside the class list"):
        read_label_map(path, num_classes=3)  # 255 is not a class of a 3-class task
    with pytest.raises(LabelMapError, match=r"outside the class list \(stored values \[0, 128\]\)"):
        read_label_map(path, values=[0, 128])
    bits = _png(tmp_path / "bits.png", raw > 0)
    assert Image.open(bits).mode == "1"
    np.testing.assert_array_equal(read_label_map(bits, num_classes=2), (raw > 0).astype(np.int64))
    multi = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    np.testing.assert_array_equal(read_label_map(_png(tmp_path / "c.png", multi), num_classes=3), multi)
    np.save(tmp_path / "n.npy", multi)
    np.testing.assert_array_equal(read_label_map(tmp_path / "n.npy", num_classes=3), multi)


def test_read_label_map_nifti_is_row_column(tmp_path: Path) -> None:
    import nibabel

    mask = np.zeros((5, 8), np.uint8)
    mask[1, 6] = 2
    nibabel.save(nibabel.Nifti1Image(mask.T[:, :, None], np.eye(4)), str(tmp_path / "m.nii.gz"))
    np.testing.assert_array_equal(read_label_map(tmp_path / "m.nii.gz", num_classes=3), mask)


def test_load_task_datalist_segmentation(seg_dataset: Path) -> None:
    values = mask_values_for(seg_dataset / "datalist.json", ["background", "nodule"])
    assert values == [0, 255]
    items = load_task_datalist(seg_dataset / "datalist.json", "training", "segmentation", ["background", "nodule"], mask_values=values)
    assert len(items) == 6
    assert items[0]["image"] == str(seg_dataset / "images" / "im0.png")
    assert items[0]["label"] == str(seg_dataset / "masks" / "im0.png")
    assert items[0]["case"] == "P0"
    assert np.isnan(items[0]["spacing"]).all()
    assert "classes_present" not in items[0]  # lists of varying length would not collate


def test_segmentation_bad_input_names_file_and_problem(seg_dataset: Path) -> None:
    _png(seg_dataset / "masks" / "im1.png", np.zeros((30, 48), np.uint8))
    _png(seg_dataset / "masks" / "im3.png", np.full((40, 48), 7, np.uint8))
    with pytest.raises(DatalistError) as error:
        load_task_datalist(seg_dataset / "datalist.json", "training", "segmentation", ["background", "nodule"], mask_values=[0, 255])
    message = str(error.value)
    assert "2 problem(s)" in message
    assert "im1.png is 30x48 pixels but its image" in message and "is 40x48" in message
    assert "im3.png: mask values [7] are outside the class list" in message


def test_empty_validation_split_is_an_error(seg_dataset: Path) -> None:
    content = json.loads((seg_dataset / "datalist.json").read_text())
    content["validation"] = []
    (seg_dataset / "datalist.json").write_text(json.dumps(content))
    with pytest.raises(DatalistError, match=r"the list 'validation' is empty"):
        load_task_datalist(seg_dataset / "datalist.json", "validation", "segmentation", ["background", "nodule"])


def test_classification_labels_checked(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((32, 32), np.uint8))
    items = [{"image": "a.png", "label": 0}, {"image": "a.png", "label": 4}, {"image": "a.png", "label": "x"}, {"image": "a.png"}]
    (tmp_path / "d.json").write_text(json.dumps({"training": items}))
    with pytest.raises(DatalistError) as error:
        load_task_datalist(tmp_path / "d.json", "training", "classification", ["a", "b", "c"])
    message = str(error.value)
    assert "label 4 is outside the class list ['a', 'b', 'c'] (indices 0..2)" in message
    assert "label 'x' is not a class index" in message
    assert "label None is not a class index" in message


def test_label_key_reads_another_key(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((32, 32), np.uint8))
    items = [{"image": "a.png", "label": 3, "malignant": 1}, {"image": "a.png", "label": 0, "malignant": 0}]
    (tmp_path / "d.json").write_text(json.dumps({"training": items}))
    got = load_task_datalist(tmp_path / "d.json", "training", "classification", ["benign", "malignant"], label_key="malignant")
    assert [item["label"] for item in got] == [1, 0]


def test_subsample_training_is_stratified_and_seeded() -> None:
    items = [{"label": 0, "i": i} for i in range(80)] + [{"label": 1, "i": 80 + i} for i in range(20)]
    half = subsample_training(items, 0.25, seed=3)
    assert sum(item["label"] == 0 for item in half) == 20
    assert sum(item["label"] == 1 for item in half) == 5
    assert half == subsample_training(items, 0.25, seed=3)
    assert half != subsample_training(items, 0.25, seed=4)
    assert [item["i"] for item in half] == sorted(item["i"] for item in half)  # original order kept
    tiny = subsample_training(items, 0.01, seed=0)
    assert {item["label"] for item in tiny} == {0, 1}  # every class keeps at least one item
    assert subsample_training(items, 1.0) == items
    with pytest.raises(ValueError, match="train_fraction must be in"):
        subsample_training(items, 0.0)


def test_class_weights_inverse_frequency() -> None:
    items = [{"label": 0}] * 6 + [{"label": 1}] * 2
    torch.testing.assert_close(class_weights(items, 3), torch.tensor([8 / 18, 8 / 6, 0.0]))


def test_label_map_transform_checks_size_and_eval_spacing(seg_dataset: Path) -> None:
    data = {"image": str(seg_dataset / "images" / "im0.png"), "label": str(seg_dataset / "masks" / "im0.png"), "spacing": [0.5, 0.25]}
    d = LoadUltrasoundd("image")(data)
    d = LoadLabelMapd("label", values=[0, 255], num_classes=2)(d)
    assert d["label"].shape == (1, 40, 48) and d["label"].sum() == 150
    d = EvalSpacingd((20, 24))(d)
    torch.testing.assert_close(d["eval_spacing"], torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert d["original_size"].tolist() == [40, 48]
    no_spacing = EvalSpacingd((20, 24))({**d, "spacing": [float("nan"), float("nan")]})
    torch.testing.assert_close(no_spacing["eval_spacing"], torch.tensor([2.0, 2.0], dtype=torch.float64))
    _png(seg_dataset / "masks" / "small.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(LabelMapError, match=r"small\.png: mask is 20x20 pixels but its image .*im0\.png is 40x48"):
        LoadLabelMapd("label", num_classes=2)({**LoadUltrasoundd("image")(data), "label": str(seg_dataset / "masks" / "small.png")})


def test_class_label_transform() -> None:
    out = ClassLabeld("label", num_classes=3)({"label": 2})
    assert out["label"].dtype == torch.long and int(out["label"]) == 2
    with pytest.raises(ValueError, match="label 3 is outside the class list"):
        ClassLabeld("label", num_classes=3)({"label": 3, "image": "x.png"})


def test_clips_from_folders_tiffs_dicoms_and_stills(tmp_path: Path) -> None:
    for k in range(5):
        _png(tmp_path / "clip" / f"frame_{k:03d}.png", np.full((24, 32), 40 * k, np.uint8))
    assert clip_frame_count(tmp_path / "clip") == 5
    frames = read_clip(tmp_path / "clip", [4, 0])
    assert frames.shape == (2, 24, 32, 3)
    np.testing.assert_allclose(frames[:, 0, 0, 0], [160 / 255, 0.0], atol=1e-6)
    pages = [Image.fromarray(np.full((24, 32), 30 * k, np.uint8)) for k in range(6)]
    pages[0].save(tmp_path / "clip.tif", save_all=True, append_images=pages[1:])
    d = LoadClipd("image", num_frames=3, spatial_size=(32, 32))({"image": str(tmp_path / "clip.tif")})
    assert d["image"].shape == (3, 3, 32, 32)
    # segment centres of 6 frames in 3 segments: frames 1, 3, 5
    np.testing.assert_allclose(d["image"][:, 0, 0, 0].numpy(), [30 / 255, 90 / 255, 150 / 255], atol=1e-6)
    assert d["image"].meta["frame_indices"] == [1, 3, 5]
    randomised = LoadClipd("image", num_frames=3, spatial_size=(32, 32), random=True, seed=1)({"image": str(tmp_path / "clip.tif")})
    picked = randomised["image"].meta["frame_indices"]
    assert all(2 * s <= f < 2 * s + 2 for s, f in enumerate(picked))  # one frame from each segment
    still = LoadClipd("image", num_frames=4, spatial_size=(32, 32))({"image": str(tmp_path / "clip" / "frame_002.png")})
    assert still["image"].shape == (4, 3, 32, 32) and torch.equal(still["image"][0], still["image"][3])
    write_dicom(tmp_path / "cine.dcm", np.stack([np.full((24, 32), 50 * k, np.uint8) for k in range(3)]), "MONOCHROME2")
    assert clip_frame_count(tmp_path / "cine.dcm") == 3


def test_expand_frames_one_item_per_frame_and_keeps_bad_files_for_their_row(tmp_path: Path) -> None:
    write_dicom(tmp_path / "cine.dcm", np.stack([np.full((24, 32), 50 * k, np.uint8) for k in range(3)]), "MONOCHROME2")
    _png(tmp_path / "still.png", np.zeros((24, 32), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = [{"image": str(tmp_path / n)} for n in ("cine.dcm", "broken.png", "still.png")]
    out = expand_frames(items)
    # the broken file stays one item: the inference dataset skips it and lists it with its reason
    assert [(Path(i["image"]).name, i["frame"], i["num_frames"]) for i in out] == [
        ("cine.dcm", 0, 3), ("cine.dcm", 1, 3), ("cine.dcm", 2, 3), ("broken.png", 0, 1), ("still.png", 0, 1)
    ]
    frame = LoadFramed("image")(out[2])
    assert frame["image"].shape == (3, 24, 32)
    np.testing.assert_allclose(float(frame["image"][0, 0, 0]), 100 / 255, atol=1e-6)
    assert [(i["frame"], i["num_frames"]) for i in expand_frames(items[:1], per_frame=False)] == [(0, 1)]
