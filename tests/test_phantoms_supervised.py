"""Tests of the benchmark phantoms written in the official download layouts
(echocare/phantoms/supervised.py): layout, conversion, readability, masks where the
organs are, classes separable by a hand-made statistic, determinism."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from echocare.io import read_ultrasound
from echocare.phantoms import supervised as pt
from echocare.datasets.converters import _pathology_label, convert_datalist
from echocare.phantoms import TASKS, generate_demo_data
from echocare.phantoms.layout import PHANTOM_MARKER

#: task -> (dataset folder under out, converter name, generate_demo_data arguments)
SPECS = {
    "abdomen_seg": ("abdomen", "abdomen", {"n": 12, "image_size": 96}),
    "musv_seg": ("musv", "musv", {"n": 12, "image_size": 128}),
    "thyroid_cls": ("thyroid_cine", "thyroid_cine", {"n": 12, "image_size": 96, "frames": 4}),
    "fll_cls": ("fll_ceus", "fll_ceus", {"n": 12, "image_size": 64, "frames": 6}),
}
CLASS_NAMES = {
    "abdomen_seg": ["background", "liver", "kidney", "pancreas", "bladder", "spleen"],
    "musv_seg": ["background", "artery", "vein"],
    "thyroid_cls": ["benign", "malignant"],
    "fll_cls": ["HCC", "HEM", "FNH"],
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each task written once (seed 0): task -> (out, datalist)."""
    result = {}
    for task, (_, _, kw) in SPECS.items():
        out = tmp_path_factory.mktemp(task)
        path = generate_demo_data(task, out, seed=0, **kw)
        assert path == out / "datalist.json"
        result[task] = (out, json.loads(path.read_text()))
    return result


def _items(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"]


def _grey(path: Path) -> np.ndarray:
    """(F, H, W) uint8-valued float frames of a file, or of a folder of frame files."""
    if path.is_dir():
        frames = np.concatenate([read_ultrasound(p) for p in sorted(path.iterdir()) if not p.name.startswith(".")])
    else:
        frames = read_ultrasound(path)
    assert np.allclose(frames[..., 0], frames[..., 2], atol=2 / 255)  # grey stored as grey
    return frames[..., 0] * 255.0


# ------------------------------------------------------------------ layout and datalist


def test_tasks_registered():
    assert {"pretrain", "abdomen_seg", "musv_seg", "thyroid_cls", "fll_cls"} <= set(TASKS)


@pytest.mark.parametrize("task", list(SPECS))
def test_datalist_converts_and_every_file_reads(task, generated):
    out, dl = generated[task]
    folder, converter, kw = SPECS[task]
    assert dl["class_names"] == CLASS_NAMES[task]
    assert dl["training"] and dl["validation"]
    items = _items(dl)
    assert len(items) == kw["n"]
    train_cases = {it["case"] for it in dl["training"]}
    assert train_cases.isdisjoint({it["case"] for it in dl["validation"]})
    # The official layout converts on its own (what a user with the real download runs).
    again = convert_datalist(converter, out / folder)
    assert len(_items(again)) == kw["n"]
    size = kw["image_size"]
    for it in items:
        for key in ("image", "label", "mask"):
            value = it.get(key)
            if not isinstance(value, str):
                continue
            assert not value.startswith("/") and ".." not in value.split("/")
            frames = _grey(out / value)
            n_frames = kw.get("frames", 1)
            assert frames.shape == (n_frames, size, size), (value, frames.shape)
    if task in ("abdomen_seg", "musv_seg"):
        assert all(it["image"].startswith(f"{folder}/images/") and it["label"].startswith(f"{folder}/masks/") for it in items)
    else:
        labels = {it["label"] for it in dl["training"]}
        assert labels == set(range(len(CLASS_NAMES[task])))  # every class in training


def test_abdomen_layout(generated):
    out, dl = generated["abdomen_seg"]
    rows = list(csv.DictReader((out / "abdomen" / "cases.csv").open()))
    names = sorted(p.name for p in (out / "abdomen" / "images").glob("*.png"))
    assert sorted(r["image"] for r in rows) == names
    assert sorted(p.name for p in (out / "abdomen" / "masks").glob("*.png")) == names
    per_case = {}
    for r in rows:
        per_case[r["case"]] = per_case.get(r["case"], 0) + 1
    assert min(per_case.values()) >= 2  # several images per case


def test_thyroid_layout(generated):
    import h5py

    out, dl = generated["thyroid_cls"]
    root = out / "thyroid_cine"
    with h5py.File(root / "dataset.hdf5", "r") as f:
        image, mask = f["image"][()], f["mask"][()]
        ids, frame_num = f["annot_id"][()], f["frame_num"][()]
    assert image.dtype == np.uint8 and image.shape == (12 * 4, 96, 96)
    assert mask.shape == image.shape and set(np.unique(mask)) == {0, 255}
    assert ids.dtype.kind == "S" and all(re.fullmatch(rb"\d+_\d*", a) for a in ids)
    assert frame_num.shape == (48,)
    meta = list(csv.DictReader((root / "metadata.csv").open()))
    for col in ("annot_id", "sex", "age", "location", "size_x", "size_y", "size_z", "ti-rads_level", "histopath_diagnosis"):
        assert col in meta[0]
    assert {m["annot_id"] for m in meta} == {a.decode() for a in ids}
    patients = {m["annot_id"].split("_")[0] for m in meta}
    assert len(patients) < len(meta)  # several clips per patient
    label_of = {m["annot_id"]: _pathology_label(m["histopath_diagnosis"]) for m in meta}
    assert set(label_of.values()) == {0, 1}
    for it in _items(dl):
        aid = Path(it["image"]).stem
        assert it["image"] == f"thyroid_cine_clips/{aid}.tif"
        assert it["label"] == label_of[aid]
        # the TIFF clip holds exactly the HDF5 frames of the clip, in frame order
        clip = _grey(out / it["image"])
        assert np.array_equal(clip.round().astype(np.uint8), image[it["rows"]])
        level = int(next(m for m in meta if m["annot_id"] == aid)["ti-rads_level"])
        assert level == 5 if it["label"] else level <= 3  # TI-RADS as drawn: TR5 vs TR2-3


def test_fll_layout_mixes_videos_and_frame_folders(generated):
    out, dl = generated["fll_cls"]
    paths = [out / it["image"] for it in _items(dl)]
    assert any(p.suffix == ".mp4" and p.is_file() for p in paths)
    assert any(p.is_dir() for p in paths)
    for it, p in zip(_items(dl), paths):
        assert p.parent.name == CLASS_NAMES["fll_cls"][it["label"]]
        assert re.fullmatch(r"P\d{3}_lesion\d+", p.name.split(".")[0])
        assert it["case"] == p.name.split("_")[0]
        # the written clip is the phantom clip (videos within the codec's loss)
        pidx, k = map(int, re.findall(r"\d+", p.name.split(".")[0]))
        rng = np.random.default_rng([0, pt._TAG["fll"], 1, pidx, k])
        clip, _, _ = pt.make_fll_clip(rng, 64, 6, p.parent.name)
        got = _grey(p)
        if p.is_dir():
            assert np.array_equal(got.round(), clip)
        else:
            assert np.abs(got - clip).mean() < 4


# ------------------------------------------------------------------ masks and learnability


def test_abdomen_masks_mark_the_organs(generated):
    out, dl = generated["abdomen_seg"]
    seen = set()
    for it in _items(dl):
        img = _grey(out / it["image"])[0]
        mask = _grey(out / it["label"])[0].round().astype(int)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(6)) and len(values) >= 2
        seen |= values
        deep = (img > 0) & (mask == 0)
        deep[: img.shape[0] // 4] = False  # the bowel and fat around the organs, under the abdominal wall
        ref = img[deep].mean()
        if 4 in values:
            assert img[mask == 4].mean() < 0.5 * ref  # bladder: anechoic
        if 1 in values:
            assert img[mask == 1].mean() > 1.05 * ref  # liver brighter than the bowel around it
        if 5 in values:
            assert img[mask == 5].mean() > 1.2 * ref  # spleen brighter still
        if 3 in values:
            assert img[mask == 3].mean() > 1.3 * ref and img[mask == 3].mean() > 1.03 * img[mask == 1].mean()
        if 2 in values:  # kidney: bright central sinus, darker cortex
            d = ndimage.distance_transform_edt(mask == 2)
            assert img[d > 0.55 * d.max()].mean() > 1.08 * img[(mask == 2) & (d < 0.3 * d.max())].mean()
    assert seen == set(range(6))


def test_musv_masks_artery_and_vein(generated):
    out, dl = generated["musv_seg"]
    for it in _items(dl):
        img = _grey(out / it["image"])[0]
        mask = _grey(out / it["label"])[0].round().astype(int)
        assert set(np.unique(mask).tolist()) == {0, 1, 2}
        walls, shapes = {}, {}
        for k in (1, 2):
            m = mask == k
            lab, _ = ndimage.label(m)
            vessel = lab == np.bincount(lab.ravel())[1:].argmax() + 1  # the largest vein if two
            d = ndimage.distance_transform_edt(vessel)
            core = d > 0.5 * d.max()
            near = ndimage.binary_dilation(m, iterations=2) & ~m & (mask == 0)
            around = ndimage.binary_dilation(m, iterations=8) & ~ndimage.binary_dilation(m, iterations=3) & (mask == 0)
            assert img[core].mean() < (0.35 if k == 1 else 0.5) * img[around].mean()  # anechoic lumen
            walls[k] = img[near].mean()
            ys, xs = np.nonzero(vessel)
            shapes[k] = (np.ptp(xs) + 1, np.ptp(ys) + 1)
        assert walls[1] > walls[2] + 15  # thick bright arterial wall, thin venous wall
        assert 0.85 < shapes[1][0] / shapes[1][1] < 1.15  # round artery
        assert shapes[2][0] / shapes[2][1] > 1.4  # oval vein, wider than tall
        assert shapes[2][0] > shapes[1][0]  # and wider than the artery


def _thyroid_stats(images: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """(aspect = height/width of the nodule, echogenicity = nodule / surrounding median),
    averaged over the frames of a clip."""
    aspect, echo = [], []
    for im, m in zip(images.astype(float), masks > 0):
        ys, xs = np.nonzero(m)
        aspect.append(ys.std() / xs.std())
        ring = ndimage.binary_dilation(m, iterations=4) & ~ndimage.binary_dilation(m, iterations=1)
        echo.append(np.median(im[m]) / np.median(im[ring]))
    return float(np.mean(aspect)), float(np.mean(echo))


def test_thyroid_classes_separate_by_shape_and_echogenicity(generated):
    import h5py

    # The written clips (labels from the converter) ...
    out, dl = generated["thyroid_cls"]
    with h5py.File(out / "thyroid_cine" / "dataset.hdf5", "r") as f:
        image, mask = f["image"][()], f["mask"][()]
    stats = [(_thyroid_stats(image[it["rows"]], mask[it["rows"]]), it["label"]) for it in _items(dl)]
    # ... and more clips straight from the generator, at a larger size.
    for s in range(6):
        for malignant in (0, 1):
            imgs, masks, _ = pt.make_thyroid_clip(np.random.default_rng(100 + s), 96, 4, bool(malignant))
            stats.append((_thyroid_stats(imgs, masks), malignant))
    for (aspect, echo), label in stats:
        if label:  # malignant: taller than wide, hypoechoic
            assert aspect > 1.1 and echo < 0.67, (aspect, echo)
        else:  # benign: wider than tall, iso/hyperechoic (cystic parts are small)
            assert aspect < 0.9 and echo > 0.67, (aspect, echo)


def _fll_features(clip: np.ndarray, lesion: np.ndarray, times: np.ndarray) -> tuple[float, float]:
    """(late lesion - liver, early core - rim): mean grey levels."""
    c = clip.astype(float)
    dist = ndimage.distance_transform_edt(lesion)
    core, rim = dist > 0.6 * dist.max(), lesion & (dist < 0.3 * dist.max())
    r = int(dist.max())
    liver = ndimage.binary_dilation(lesion, iterations=int(2.5 * r)) & ~ndimage.binary_dilation(lesion, iterations=r // 2 + 1)
    liver &= c.max(0) > 0
    les = np.array([f[lesion].mean() for f in c])
    liv = np.array([np.median(f[liver]) for f in c])
    early, late = (times > 0.08) & (times < 0.35), times > 0.7
    cr = np.array([f[core].mean() - f[rim].mean() for f in c])
    return float((les - liv)[late].mean()), float(cr[early].mean())


def _fll_rule(late_contrast: float, early_core_minus_rim: float) -> str:
    if late_contrast < -20:
        return "HCC"  # washout
    return "FNH" if early_core_minus_rim > 0 else "HEM"  # centrifugal vs centripetal


def test_fll_classes_separate_by_time_intensity():
    for kind in pt.FLL_CLASSES:
        for s in range(4):
            clip, lesion, times = pt.make_fll_clip(np.random.default_rng(s), 80, 8, kind)
            assert clip.shape == (8, 80, 80) and clip.dtype == np.uint8
            assert clip[0][lesion].mean() < 40  # before the bubbles arrive: dark
            late, early = _fll_features(clip, lesion, times)
            assert _fll_rule(late, early) == kind, (kind, s, late, early)
            if kind != "HCC":
                assert late > 0  # sustained enhancement


# ------------------------------------------------------------------ determinism, options, errors


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", list(SPECS))
def test_same_seed_same_bytes(task, tmp_path):
    kw = {"n": 4, "image_size": 64} | ({"frames": 3} if task in ("thyroid_cls", "fll_cls") else {})
    trees = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_demo_data(task, tmp_path / name, seed=seed, **kw)
        trees.append(_tree(tmp_path / name))
    a, b, c = trees
    assert a == b
    assert a.keys() != c.keys() or any(a[k] != c[k] for k in a if k != "datalist.json" and not k.endswith(PHANTOM_MARKER))


def test_small_n_keeps_validation_and_every_class_in_training(tmp_path):
    for task, kw in (("thyroid_cls", {"frames": 2}), ("fll_cls", {"frames": 3}), ("abdomen_seg", {}), ("musv_seg", {})):
        n = 4 if task != "thyroid_cls" else 3
        dl = json.loads(generate_demo_data(task, tmp_path / task, n=n, seed=1, image_size=64, **kw).read_text())
        assert dl["training"] and dl["validation"]
        if task in ("thyroid_cls", "fll_cls"):
            assert {it["label"] for it in dl["training"]} == set(range(len(dl["class_names"])))


def test_rerun_replaces_own_folder_but_not_foreign_data(tmp_path):
    generate_demo_data("musv_seg", tmp_path, n=6, seed=0, image_size=64)
    generate_demo_data("musv_seg", tmp_path, n=3, seed=0, image_size=64)  # fewer: stale files removed
    assert len(list((tmp_path / "musv" / "images").glob("*.png"))) == 3
    foreign = tmp_path / "x"
    (foreign / "abdomen").mkdir(parents=True)
    (foreign / "abdomen" / "real.png").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="not written by the phantom"):
        generate_demo_data("abdomen_seg", foreign, n=4, image_size=64)
    assert (foreign / "abdomen" / "real.png").read_bytes() == b"keep me"


def test_options_and_errors(tmp_path):
    dl = json.loads(generate_demo_data("fll_cls", tmp_path / "f", n=6, image_size=64, frames=3, clip_format="png").read_text())
    assert all((tmp_path / "f" / it["image"]).is_dir() for it in _items(dl))
    dl = json.loads(generate_demo_data("abdomen_seg", tmp_path / "a", n=4, image_size=64, views=["pelvis"]).read_text())
    for it in _items(dl):
        assert set(np.unique(_grey(tmp_path / "a" / it["label"]).round()).tolist()) == {0, 4}
    with pytest.raises(ValueError, match="even"):
        generate_demo_data("fll_cls", tmp_path / "g", n=6, image_size=63)
    with pytest.raises(ValueError, match="n >= 2"):
        generate_demo_data("musv_seg", tmp_path / "h", n=1, image_size=64)
    with pytest.raises(ValueError, match="views"):
        generate_demo_data("abdomen_seg", tmp_path / "i", n=4, image_size=64, views=["thorax"])
