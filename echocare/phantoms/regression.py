"""A learnable CAMUS phantom: apical 2D+t half sequences (end-diastole to end-systole) of a
beating left-ventricle-like cavity, with ejection fractions known by construction.

``echocare demo-data --task camus_ef`` (registered in :data:`echocare.phantoms.demo.TASKS`)
writes the CAMUS NIfTI release layout that :func:`echocare.datasets.converters.convert_camus`
reads, under ``out/camus/``::

    database_nifti/patientXXXX/patientXXXX_{2CH|4CH}_half_sequence.nii.gz   (X=col, Y=row, T) uint8
                               patientXXXX_{2CH|4CH}_{ED,ES}.nii.gz           first / last frame
                               patientXXXX_{2CH|4CH}_{ED,ES}_gt.nii.gz        0 background, 1 LV cavity,
                                                                             2 myocardium, 3 left atrium
                               Info_{2CH|4CH}.cfg   ED, ES, NbFrame, Sex, Age, ImageQuality,
                                                    FrameRate, LVedv, LVesv (ml), LVef (%)
    database_split/subgroup_{training,validation,testing}.txt

and returns the converter's datalist with paths relative to ``out``. Each patient has one
view (2CH and 4CH alternate). NIfTI voxel axes are (column, row, frame) with the pixel size
in mm in the header, the order :func:`echocare.io.readers.read_ultrasound` reads.

The scene (drawn with :mod:`echocare.phantoms.renderer`'s canvas and B-mode renderer, phased-array
sector): the LV cavity is an ellipse hanging from a fixed apex near the probe, long axis
``L`` (apex to base) and short semi-axis ``b``; from end-diastole (frame 0) to end-systole
(last frame) ``L`` shortens a little and ``b`` shrinks along a half cosine, the wall
thickens, the left atrium (and, in 4CH, the right heart) sits below and beside it.

Ground truth, as in CAMUS, comes from the ED and ES masks by the single-plane area-length
method (:func:`area_length_volume`): ``V = 8 A^2 / (3 pi L)`` with ``A`` the cavity area
(mm^2) and ``L`` its long-axis length (mm); ``LVef = 100 (V_ED - V_ES) / V_ED``. The target
EF of a patient is drawn uniformly in ``ef_range``; the written ``LVef`` is the formula on
the rendered masks (within about a point of the target).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from echocare.datasets.converters import DATALIST_CONVERTERS
from echocare.phantoms.renderer import LABEL_FLUID, Canvas, draw_skin_layers, make_canvas, render_bmode
from echocare.phantoms.layout import describe_phantom, fresh_phantom_dir, scanner_settings

__all__ = ["CAMUS_LABELS", "area_length_volume", "generate_camus_ef", "make_camus_sequence"]

#: Classes of the ``_gt`` masks (CAMUS's convention).
CAMUS_LABELS = {0: "background", 1: "lv_cavity", 2: "myocardium", 3: "left_atrium"}

_TAG = 15  # separates this task's random streams from the other phantoms'
_DEPTH_MM = 150.0  # imaging depth of the sector: pixel size = depth / image side


def area_length_volume(mask: np.ndarray, pixel_mm: float) -> tuple[float, float, float]:
    """Single-plane area-length volume of a cavity mask.

    ``A`` = number of pixels x pixel area; ``L`` = extent of the pixel centres along the
    mask's principal (long) axis plus one pixel, i.e. apex to base; ``V = 8 A^2 / (3 pi L)``
    (exact for an ellipsoid of revolution seen in a plane through its long axis).

    Args:
        mask: (H, W) boolean or 0/1 cavity mask (square pixels).
        pixel_mm: pixel size in mm.

    Returns:
        ``(A in mm^2, L in mm, V in ml)``.

    Raises:
        ValueError: an empty mask.
    """
    rows, cols = np.nonzero(np.asarray(mask))
    if rows.size == 0:
        raise ValueError("empty cavity mask: no area-length volume")
    points = np.stack([cols, rows], axis=1).astype(np.float64)
    centred = points - points.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    along = centred @ vectors[:, -1]  # the eigenvector of the largest eigenvalue
    area = rows.size * pixel_mm * pixel_mm
    length = (along.max() - along.min() + 1.0) * pixel_mm
    return float(area), float(length), float(8.0 * area * area / (3.0 * math.pi * length) / 1000.0)


def _ventricle_params(rng: np.random.Generator, ef_target: float) -> dict[str, Any]:
    """Shape of one patient's ventricle at ED and ES, as fractions of the imaging depth."""
    # End-diastolic size varies less between patients than end-systolic size (+-6 % here),
    # so that EF shows mostly in how far the cavity contracts.
    length_ed = rng.uniform(0.46, 0.52)
    b_ed = length_ed * rng.uniform(0.28, 0.32)
    shortening = rng.uniform(0.86, 0.92)  # long-axis shortening L_ES / L_ED
    length_es = length_ed * shortening
    # Area-length: V ~ A^2 / L, so A_ES = A_ED sqrt((1 - EF) L_ES / L_ED), A = pi (L / 2) b.
    area_es = math.pi * (length_ed / 2) * b_ed * math.sqrt((1 - ef_target / 100.0) * shortening)
    b_es = area_es / (math.pi * length_es / 2)
    return {
        "apex_depth": rng.uniform(0.1, 0.15),
        "apex_lat": rng.uniform(-0.12, 0.12),
        "tilt": rng.uniform(-10, 10),
        "length": (length_ed, length_es),
        "b": (b_ed, b_es),
        "wall": (rng.uniform(0.035, 0.045), rng.uniform(0.055, 0.07)),
        "la": rng.uniform(0.1, 0.13),
        "myo_gain": rng.uniform(0.9, 1.2),
        "lung_gain": rng.uniform(0.5, 0.8),
        "rv_side": 1 if rng.random() < 0.5 else -1,
        "speckle_seed": int(rng.integers(2**31)),
    }


def _paint_frame(c: Canvas, rng: np.random.Generator, p: dict, phase: float, four_chamber: bool) -> np.ndarray:
    """Paint the heart at ``phase`` (0 = ED, 1 = ES) on ``c``; returns the (H, W) uint8
    CAMUS mask (:data:`CAMUS_LABELS`)."""
    s = (1 - math.cos(math.pi * phase)) / 2  # slow at ED and ES, fastest mid-systole
    depth = c.max_depth
    length = depth * (p["length"][0] + s * (p["length"][1] - p["length"][0]))
    b = depth * (p["b"][0] + s * (p["b"][1] - p["b"][0]))
    wall = depth * (p["wall"][0] + s * (p["wall"][1] - p["wall"][0]))
    tilt = p["tilt"]
    ay, ax = c.at(p["apex_depth"], p["apex_lat"])
    dx, dy = math.sin(math.radians(tilt)), math.cos(math.radians(tilt))  # long axis, downwards
    cy, cx = ay + dy * length / 2, ax + dx * length / 2
    c.texture = 0.2
    c.fill("tissue", p["lung_gain"])
    draw_skin_layers(c, rng, muscle=True)
    myocardium = c.ellipse(cy, cx, length / 2 + wall, b + wall, tilt)
    cavity = c.ellipse(cy, cx, length / 2, b, tilt)
    la_r = depth * p["la"]
    ly, lx = ay + dy * (length + wall + la_r), ax + dx * (length + wall + la_r)
    atrium = c.ellipse(ly, lx, la_r, la_r * 1.1, tilt)
    if four_chamber:  # right ventricle and atrium beside the left heart, their own wall
        off = p["rv_side"] * (b + 2 * wall + depth * 0.08)  # across the long axis
        vy, vx = cy - dx * off, cx + dy * off
        c.paint(c.ellipse(vy, vx, length / 2.2 + wall, b * 0.7 + wall, tilt), "parenchyma", None, p["myo_gain"])
        c.paint(c.ellipse(vy, vx, length / 2.2, b * 0.7, tilt), "fluid", LABEL_FLUID)
        c.paint(c.ellipse(ly - dx * off, lx + dy * off, la_r * 0.9, la_r, tilt), "fluid", LABEL_FLUID)
    c.paint(myocardium, "parenchyma", None, p["myo_gain"])
    c.paint(c.ring(cy, cx, length / 2 + wall, b + wall, 2.0, tilt), "fascia", None, 0.8)  # epicardium
    c.paint(atrium, "fluid", LABEL_FLUID)
    c.paint(cavity, "fluid", LABEL_FLUID)
    mask = np.zeros((c.size, c.size), np.uint8)
    mask[myocardium & ~cavity] = 2
    mask[atrium & ~myocardium] = 3
    mask[cavity] = 1
    mask[~c.fov] = 0
    return mask


def make_camus_sequence(
    rng: np.random.Generator, size: int, frames: int, ef_target: float, four_chamber: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One half sequence, end-diastole (frame 0) to end-systole (frame ``frames - 1``).

    Args:
        rng: random generator of the patient (geometry, scanner settings, speckle).
        size: image side in pixels.
        frames: frames in the sequence (>= 2).
        ef_target: the EF (percent) the shapes are built for.
        four_chamber: 4CH view (right heart beside the left), else 2CH.

    Returns:
        ``(sequence (T, H, W) uint8, masks (T, H, W) uint8 CAMUS classes, parameters)``.
    """
    if frames < 2:
        raise ValueError(f"a half sequence needs at least 2 frames (ED and ES), got {frames}")
    p = _ventricle_params(rng, ef_target)
    probe = make_canvas(rng, size, "sector", "phased")
    geometry = {k: getattr(probe, k) for k in ("apex_y", "apex_x", "half_angle", "r_min", "r_max")}
    scanner = scanner_settings(rng, atten_db=(30.0, 40.0))
    images, masks = [], []
    for t in range(frames):
        c = _with_geometry(probe, size, geometry)  # the same probe for every frame
        frame_rng = np.random.default_rng([p["speckle_seed"], t])
        masks.append(_paint_frame(c, frame_rng, p, t / (frames - 1), four_chamber))
        images.append(render_bmode(c, frame_rng, **scanner))
    return np.stack(images), np.stack(masks), p


def _with_geometry(probe: Canvas, size: int, g: dict[str, float]) -> Canvas:
    """A fresh canvas (soft tissue) with the sector geometry ``g`` (apex, opening, radii) of ``probe``."""
    yy, xx = probe.yy, probe.xx
    ry, rx = yy - g["apex_y"], xx - g["apex_x"]
    r = np.sqrt(ry * ry + rx * rx)
    theta = np.arctan2(rx, ry)
    fov = (r >= g["r_min"]) & (r <= g["r_max"]) & (np.abs(theta) <= g["half_angle"])
    return Canvas(
        size=size, geometry="sector", yy=yy, xx=xx,
        depth=np.clip(r - g["r_min"], 0, None).astype(np.float32), theta=theta.astype(np.float32), fov=fov,
        echo=np.ones((size, size), np.float32), atten=np.ones((size, size), np.float32),
        imped=np.ones((size, size), np.float32), label=np.zeros((size, size), np.uint8), **g,
    )


def _save_nifti(array: np.ndarray, path: Path, pixel_mm: float) -> None:
    """(H, W) or (T, H, W) uint8 -> NIfTI with voxel axes (column, row[, frame]), mm units."""
    import nibabel

    data = array.T if array.ndim == 2 else array.transpose(2, 1, 0)
    image = nibabel.Nifti1Image(np.ascontiguousarray(data), np.diag([pixel_mm, pixel_mm, 1.0, 1.0]))
    image.header.set_xyzt_units("mm", "sec")
    nibabel.save(image, str(path))


def generate_camus_ef(
    out: Path,
    n: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    frames: int = 10,
    ef_range: tuple[float, float] = (20.0, 75.0),
) -> dict:
    """``n`` patients (one half sequence each) in the CAMUS NIfTI layout under ``out/camus``
    (see the module docstring), converted by ``convert_camus``; the official-style split files
    put ``round(n * val_fraction)`` patients (at least one) in validation, none in testing.

    Options: ``frames`` per half sequence (default 10), ``ef_range`` (percent) of the targets.
    Returns the datalist with every path relative to ``out``.
    """
    if n < 2:
        raise ValueError("camus_ef needs n >= 2 (one patient to train on, one to validate)")
    root = fresh_phantom_dir(Path(out) / "camus")
    pixel_mm = _DEPTH_MM / image_size
    master = np.random.default_rng([seed, _TAG])
    targets = master.uniform(*ef_range, n)
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    validation = set(master.permutation(n)[:n_val].tolist())
    groups: dict[str, list[str]] = {"training": [], "validation": [], "testing": []}
    for i in range(n):
        pid = f"patient{i + 1:04d}"
        view = "4CH" if i % 2 else "2CH"
        rng = np.random.default_rng([seed, _TAG, i])
        sequence, masks, _ = make_camus_sequence(rng, image_size, frames, float(targets[i]), view == "4CH")
        folder = root / "database_nifti" / pid
        folder.mkdir(parents=True)
        _save_nifti(sequence, folder / f"{pid}_{view}_half_sequence.nii.gz", pixel_mm)
        volumes = {}
        for phase, t in (("ED", 0), ("ES", frames - 1)):
            _save_nifti(sequence[t], folder / f"{pid}_{view}_{phase}.nii.gz", pixel_mm)
            _save_nifti(masks[t], folder / f"{pid}_{view}_{phase}_gt.nii.gz", pixel_mm)
            volumes[phase] = area_length_volume(masks[t] == 1, pixel_mm)[2]
        ef = 100.0 * (volumes["ED"] - volumes["ES"]) / volumes["ED"]
        (folder / f"Info_{view}.cfg").write_text(
            f"ED: 1\nES: {frames}\nNbFrame: {frames}\nSex: {'F' if rng.random() < 0.5 else 'M'}\n"
            f"Age: {int(rng.integers(20, 90))}\nImageQuality: Good\nFrameRate: 25\n"
            f"LVedv: {volumes['ED']:.4f}\nLVesv: {volumes['ES']:.4f}\nLVef: {ef:.4f}\n"
        )
        groups["validation" if i in validation else "training"].append(pid)
    split = root / "database_split"
    split.mkdir()
    for part, pids in groups.items():
        (split / f"subgroup_{part}.txt").write_text("".join(f"{pid}\n" for pid in pids))
    datalist = DATALIST_CONVERTERS["camus"](root, None, None, seed)
    for part in ("training", "validation", "test"):
        for item in datalist.get(part, []):
            for key in ("image", "ed_image", "ed_label", "es_image", "es_label"):
                if isinstance(item.get(key), str):
                    item[key] = f"camus/{item[key]}"
    datalist["split_seed"] = seed
    return describe_phantom(
        datalist, "camus_ef", "camus", seed,
        f"{n} patients, one half sequence of {frames} frames each (ED first, ES last), EF targets uniform in "
        f"{ef_range[0]:g}-{ef_range[1]:g} %, LVef by area-length on the written ED/ES masks; pixel {pixel_mm:.3f} mm.",
    )
