"""Tests of LoadUltrasoundd / LoadUltrasound in MONAI pipelines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, Resized, SaveImaged, ScaleIntensityd
from PIL import Image

from dicom_helpers import write_dicom

from echocare.io.readers import UltrasoundReadError
from echocare.io.loaders import LoadUltrasound, LoadUltrasoundd


def make_png(path: Path, h: int = 40, w: int = 60) -> Path:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 4] = [255, 0, 0]  # red band at the top
    Image.fromarray(a).save(path)
    return path


def make_cine(path: Path, n: int = 6, h: int = 20, w: int = 30) -> Path:
    frames = np.stack([np.full((h, w), 40 * k, np.uint8) for k in range(n)])
    return write_dicom(path, frames, "MONOCHROME2", PatientName="Doe^Jane", FrameTime=20.0, PixelSpacing=[0.25, 0.5])


def frame_values(t: torch.Tensor) -> list[int]:
    """Grey level (0-255) of each frame of an (F, 3, H, W) tensor."""
    return [round(float(f[0, 0, 0]) * 255) for f in t]


def test_single_frame_png(tmp_path):
    p = make_png(tmp_path / "a.png")
    out = LoadUltrasoundd("image")({"image": str(p), "label": 3})
    img = out["image"]
    assert isinstance(img, MetaTensor)
    assert img.shape == (3, 40, 60) and img.dtype == torch.float32
    assert img[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0])  # red band on top
    assert img[:, -1, 0].tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert img.meta["filename_or_obj"] == str(p)
    assert list(img.meta["spatial_shape"]) == [40, 60]
    assert img.meta["original_channel_dim"] == 0
    assert out["label"] == 3


@pytest.mark.parametrize(
    "frames,shape,values",
    [
        ("first", (3, 20, 30), [0]),
        ("middle", (3, 20, 30), [120]),
        ("last", (3, 20, 30), [200]),
        (2, (3, 20, 30), [80]),
        (-2, (3, 20, 30), [160]),
        ("all", (6, 3, 20, 30), [0, 40, 80, 120, 160, 200]),
        (("every", 2), (3, 3, 20, 30), [0, 80, 160]),
        ([5, 0], (2, 3, 20, 30), [200, 0]),
    ],
)
def test_frame_selection(tmp_path, frames, shape, values):
    p = make_cine(tmp_path / "cine.dcm")
    img = LoadUltrasoundd("image", frames=frames)({"image": p})["image"]
    assert tuple(img.shape) == shape
    got = frame_values(img if img.ndim == 4 else img[None])
    assert got == values
    assert list(img.meta["spatial_shape"]) == list(shape[-img.ndim + 1:])


def test_all_on_a_still_image_keeps_the_frame_axis(tmp_path):
    img = LoadUltrasound(frames="all")(make_png(tmp_path / "a.png"))
    assert img.shape == (1, 3, 40, 60)


def test_metadata(tmp_path):
    p = make_cine(tmp_path / "cine.dcm")
    img = LoadUltrasoundd("image", with_metadata=True)({"image": p})["image"]
    m = img.meta
    assert m["pixel_spacing_mm"].tolist() == pytest.approx([0.25, 0.5])
    assert m["frame_time_ms"] == pytest.approx(20.0)
    assert m["num_frames"] == 6
    assert m["source_format"] == "dicom"
    assert m["photometric_interpretation"] == "MONOCHROME2"
    assert "Doe" not in repr(dict(m))
    # the spacing is in the affine too, so MONAI's Spacingd can use it
    assert torch.diag(img.affine)[:2].tolist() == pytest.approx([0.25, 0.5])
    png = LoadUltrasoundd("image", with_metadata=True)({"image": make_png(tmp_path / "a.png")})["image"]
    assert all(math.isnan(v) for v in png.meta["pixel_spacing_mm"].tolist())
    assert math.isnan(png.meta["frame_time_ms"])


def test_compose_with_resized(tmp_path):
    p = make_png(tmp_path / "a.png")
    single = Compose([LoadUltrasoundd("image"), Resized("image", spatial_size=(64, 64))])({"image": p})
    assert single["image"].shape == (3, 64, 64)
    assert single["image"][0, 0, 0] == pytest.approx(1.0)  # red still on top after resizing
    assert single["image"][0, -1, 0] == pytest.approx(0.0)
    cine = make_cine(tmp_path / "cine.dcm")
    multi = Compose([
        LoadUltrasoundd("image", frames="all"),
        Resized("image", spatial_size=(3, 64, 64)),
        ScaleIntensityd("image"),
    ])({"image": cine})
    assert multi["image"].shape == (6, 3, 64, 64)


def test_dataloader_batches_with_metadata(tmp_path):
    files = [{"image": make_png(tmp_path / f"{k}.png")} for k in range(2)]
    files.append({"image": make_cine(tmp_path / "cine.dcm", h=40, w=60)})
    ds = Dataset(files, Compose([LoadUltrasoundd("image", with_metadata=True),
                                 Resized("image", spatial_size=(32, 32))]))
    batch = next(iter(DataLoader(ds, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 3, 32, 32)
    assert batch["image"].meta["pixel_spacing_mm"].shape == (3, 2)


def test_save_image_keeps_orientation(tmp_path):
    p = make_png(tmp_path / "a.png")
    saver = SaveImaged("image", output_dir=tmp_path / "out", output_ext=".png", output_postfix="s",
                       separate_folder=False, scale=255, print_log=False)
    saver.set_options(write_kwargs={"reverse_indexing": False})
    Compose([LoadUltrasoundd("image"), saver])({"image": p})
    saved = np.asarray(Image.open(tmp_path / "out" / "a_s.png"))
    assert saved.shape == (40, 60, 3)
    assert saved[0, 0].tolist() == [255, 0, 0] and saved[-1, 0].tolist() == [0, 0, 0]


def test_errors_and_missing_keys(tmp_path):
    with pytest.raises(UltrasoundReadError, match=r"missing\.png: file not found"):
        LoadUltrasoundd("image")({"image": str(tmp_path / "missing.png")})
    with pytest.raises(KeyError):
        LoadUltrasoundd(["image", "other"])({"image": make_png(tmp_path / "a.png")})
    out = LoadUltrasoundd(["image", "other"], allow_missing_keys=True)({"image": make_png(tmp_path / "a.png")})
    assert out["image"].shape == (3, 40, 60) and "other" not in out
    with pytest.raises(ValueError, match="frames must be"):
        LoadUltrasoundd("image", frames="sometimes")


def test_real_dicom_cine(real_data_dir):
    p = real_data_dir / "dicom_us" / "pydicom_examples_ybr_color.dcm"
    img = Compose([LoadUltrasoundd("image", frames=("every", 10), with_metadata=True),
                   Resized("image", spatial_size=(3, 64, 64))])({"image": p})["image"]
    assert img.shape == (3, 3, 64, 64)
    assert img.meta["num_frames"] == 30
    assert img.meta["frame_time_ms"] == pytest.approx(33.333, abs=1e-3)
