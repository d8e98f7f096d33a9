"""Small fixtures that mimic each dataset's download layout (see echocare/datasets/converters.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _png(path: Path, size=(64, 48), value=None, mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8) if value is None else np.full((size[1], size[0]), value, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def make_camus(root: Path, with_split: bool = True) -> Path:
    """CAMUS NIfTI release: database_nifti/patientXXXX/..., database_split/*.txt."""
    import nibabel as nib

    efs = {}
    for i in range(1, 6):
        pid = f"patient{i:04d}"
        d = root / "database_nifti" / pid
        d.mkdir(parents=True)
        for view in ("2CH", "4CH"):
            seq = np.zeros((32, 24, 10), np.uint8)
            nib.save(nib.Nifti1Image(seq, np.eye(4)), d / f"{pid}_{view}_half_sequence.nii.gz")
            for ph in ("ED", "ES"):
                nib.save(nib.Nifti1Image(seq[..., 0], np.eye(4)), d / f"{pid}_{view}_{ph}.nii.gz")
                nib.save(nib.Nifti1Image(seq[..., 0], np.eye(4)), d / f"{pid}_{view}_{ph}_gt.nii.gz")
            ef = 40.0 + i
            efs[pid] = ef
            (d / f"Info_{view}.cfg").write_text(
                f"ED: 1\nES: {8 + i % 2}\nNbFrame: 10\nSex: F\nAge: 60\nImageQuality: Good\n"
                f"LVedv: 100.0\nLVesv: {100 - ef:.1f}\nLVef: {ef:.1f}\n"
            )
    if with_split:
        s = root / "database_split"
        s.mkdir()
        (s / "subgroup_training.txt").write_text("patient0001\npatient0002\npatient0003\n")
        (s / "subgroup_validation.txt").write_text("patient0004\n")
        (s / "subgroup_testing.txt").write_text("patient0005\n")
    return root


def make_paired(root: Path, names: list[str], classes=(0, 1, 2)) -> Path:
    """images/<name>.png + masks/<name>.png with integer classes."""
    for n in names:
        _png(root / "images" / f"{n}.png")
        m = np.zeros((48, 64), np.uint8)
        for k, c in enumerate(classes[1:]):
            m[5 + 10 * k : 12 + 10 * k, 5:20] = c
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "masks" / f"{n}.png")
    return root


def make_abdomen(root: Path) -> Path:
    names = [f"img{i:02d}" for i in range(10)]
    make_paired(root, names, classes=(0, 1, 2, 3, 4, 5))
    (root / "cases.csv").write_text("image,case\n" + "".join(f"{n}.png,P{i // 2}\n" for i, n in enumerate(names)))
    return root


def make_thyroid_cine(root: Path) -> Path:
    """Stanford AIMI: dataset.hdf5 (image, mask, annot_id, frame_num) + metadata.csv."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    clips = {"10_": 3, "14_": 4, "103_": 2, "104_": 3, "106_": 2}
    ids, frames, imgs = [], [], []
    # interleave clips and shuffle frame order to check the converter sorts by frame_num
    for aid, n in clips.items():
        for k in reversed(range(n)):
            ids.append(aid)
            frames.append(k)
            imgs.append(np.full((16, 20), 10 * k + len(ids) % 7, np.uint8))
    with h5py.File(root / "dataset.hdf5", "w") as f:
        f["image"] = np.stack(imgs)
        f["mask"] = (np.stack(imgs) > 15).astype(np.uint8) * 255
        f["annot_id"] = np.array(ids, dtype="S")
        f["frame_num"] = np.array(frames)
    diag = {"10_": "Benign", "14_": "Malignant", "103_": "Papillary thyroid carcinoma", "104_": "benign follicular nodule", "106_": "nondiagnostic"}
    rows = ["annot_id,sex,age,location,size_x,size_y,size_z,ti-rads_level,histopath_diagnosis"]
    rows += [f"{a},F,50,left,1,1,1,{3 + i % 3},{d}" for i, (a, d) in enumerate(diag.items())]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def make_fll_ceus(root: Path) -> Path:
    for cname, pats in (("HCC", ["p01", "p02", "p03"]), ("HEM", ["p04", "p05"]), ("FNH", ["p06", "p07"])):
        for p in pats:
            d = root / cname / f"{p}_lesion1"
            for k in range(3):
                _png(d / f"frame_{k:03d}.png")
    (root / "HEM" / "p08_clip.mp4").write_bytes(b"\x00" * 16)
    return root


def make_focus(root: Path, splits: bool = True) -> Path:
    parts = {"train": ["c01_1", "c02_1", "c03_1"], "val": ["c04_1"], "test": ["c05_1"]} if splits else {"": [f"c{i:02d}_1" for i in range(10)]}
    for s, names in parts.items():
        base = root / s if s else root
        for n in names:
            _png(base / "images" / f"{n}.png", size=(200, 160))
            (base / "annotations").mkdir(parents=True, exist_ok=True)
            (base / "annotations" / f"{n}.txt").write_text("thorax 100 80 60 50 10\nheart 95 75 30 20 -35\n")
    return root


def make_brain_landmark(root: Path, k: int = 24) -> Path:
    names = [f"s{i:02d}_plane" for i in range(6)]
    header = ["image", "case"] + [c for j in range(1, k + 1) for c in (f"x{j}", f"y{j}")]
    lines = [",".join(header)]
    for i, n in enumerate(names):
        _png(root / "images" / f"{n}.png")
        lines.append(",".join([f"{n}.png", f"S{i // 2}"] + [f"{j + 0.5},{j * 2 + i}" for j in range(1, k + 1) for _ in [0]]))
    (root / "landmarks.csv").write_text("\n".join(lines) + "\n")
    return root


def make_usenhance(root: Path) -> Path:
    for organ in ("breast", "thyroid"):
        for i in range(1, 6):
            _png(root / "train_datasets" / organ / "low_quality" / f"{i}.png")
            _png(root / "train_datasets" / organ / "high_quality" / f"{i}.png")
        _png(root / "test_datasets" / organ / "low_quality" / "101.png")
    return root


def make_usreport(root: Path) -> Path:
    ann = {"train": [], "val": [], "test": []}
    for i in range(6):
        split = "train" if i < 4 else ("val" if i == 4 else "test")
        paths = [f"{i:03d}/0.png", f"{i:03d}/1.png"]
        for p in paths:
            _png(root / "images" / p)
        ann[split].append({"id": f"{i:03d}", "report": f"The liver is normal in size. Case {i}.", "image_path": paths, "split": split})
    (root / "annotation.json").write_text(json.dumps(ann))
    return root


def make_hc18_official(root: Path) -> tuple[Path, dict]:
    """training_set/<id>_HC.png + <id>_HC_Annotation.png (outline) + the CSV of pixel sizes."""
    from echocare.datasets.converters import ramanujan_perimeter

    ts = root / "training_set"
    ts.mkdir(parents=True)
    truth = {}
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    for i, (name, (cx, cy, a, b, ang)) in enumerate(
        {"001_HC": (150, 110, 90, 60, 30), "001_2HC": (140, 100, 70, 55, -20), "002_HC": (160, 120, 100, 80, 80), "003_HC": (150, 115, 60, 58, 0), "004_HC": (145, 105, 80, 50, -60)}.items()
    ):
        _png(ts / f"{name}.png", size=(300, 230))
        canvas = Image.new("L", (300, 230), 0)
        t = np.radians(np.linspace(0, 360, 721))
        xs = cx + a * np.cos(t) * np.cos(np.radians(ang)) - b * np.sin(t) * np.sin(np.radians(ang))
        ys = cy + a * np.cos(t) * np.sin(np.radians(ang)) + b * np.sin(t) * np.cos(np.radians(ang))
        ImageDraw.Draw(canvas).line(list(zip(xs, ys)), fill=255, width=2)
        canvas.save(ts / f"{name}_Annotation.png")
        ps = 0.1 + 0.01 * i
        hc = ramanujan_perimeter(a, b) * ps
        truth[name] = (cx, cy, a, b, ang, ps, hc)
        rows.append(f"{name}.png,{ps},{hc:.2f}")
    (root / "training_set_pixel_size_and_HC.csv").write_text("\n".join(rows) + "\n")
    return root, truth


def make_ddti_original(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for case, tirads in (("1", "4a"), ("2", "3"), ("3", "5"), ("4", "2"), ("5", "4b")):
        marks = ""
        for k in (1, 2):
            _png(root / f"{case}_{k}.jpg", size=(120, 90), mode="RGB")
            pts = [{"x": 20 + k, "y": 20}, {"x": 80, "y": 25}, {"x": 70, "y": 70}, {"x": 25, "y": 60}]
            svg = json.dumps([{"points": pts, "annotation": {}, "regionType": "freehand"}])
            marks += f"<mark><image>{k}</image><svg>{svg}</svg></mark>"
        (root / f"{case}.xml").write_text(
            f"<?xml version='1.0' encoding='utf-8'?><case><number>{case}</number><age>50</age><sex>F</sex>"
            f"<composition>solid</composition><echogenicity/><margins/><calcifications/><tirads>{tirads}</tirads>"
            f"<reportbacaf/><reporteco/>{marks}</case>"
        )
    return root
