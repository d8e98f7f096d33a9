"""Benchmark datalist converters: from each dataset's download layout to a MONAI datalist.

Public API
----------
``convert_datalist(name, root, out=None, fold=None, seed=0, split=None) -> dict``
    Build the datalist of benchmark ``name`` from the dataset folder ``root``; write it as
    JSON to ``out`` when given. ``split``: a ``data_lists/<name>.json`` split file whose parts
    replace the converter's own (:mod:`echocare.datasets.splits`). Files a converter derives (filled HC18 masks, rasterised DDTI
    polygons, exported thyroid cine clips) are written beside ``out`` in
    ``<out dir>/<name>_masks/`` or ``<out dir>/<name>_clips/``.
``DATALIST_CONVERTERS``
    name -> converter ``f(root: Path, out: Path | None, fold: int | None, seed: int) -> dict``.
``DatasetLayoutError``
    raised (a ``ValueError``) when a folder does not hold the expected layout; the message
    names the folder, what was expected and what was found.

Datalist conventions (docs/architecture.md, "Datalist keys"): paths are relative to the dataset
root (``dataset_dir``), coordinates are in pixels of the original image (x right, y down),
angles in degrees (from +x towards +y, i.e. clockwise on screen). Every item carries a
``case`` key (patient, case or recording id). Splits are deterministic: the sorted case ids
are shuffled with ``random.Random(seed)`` and 20 % of the cases (at least one when there
are two or more) go to ``validation``; a case is never on both sides. Datasets that fix a
split (BUS-BRA folds, CAMUS ``database_split``, USenhance train/test, USreport
``annotation.json``) use it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from echocare.datasets.splits import apply_split, assign_cases, load_split

__all__ = [
    "DATALIST_CONVERTERS",
    "DatasetLayoutError",
    "convert_datalist",
    "fit_ellipse",
    "ramanujan_perimeter",
    "grouped_split",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".dcm", ".nii", ".nii.gz")


class DatasetLayoutError(ValueError):
    """A dataset folder does not hold the layout a converter reads."""

    def __init__(self, folder: str | Path, expected: str, found: str | None = None):
        folder = Path(folder)
        if found is None:
            found = _describe_folder(folder)
        self.folder, self.expected, self.found = folder, expected, found
        super().__init__(f"{folder}: expected {expected}; found {found}")


# ----------------------------------------------------------------------------- helpers


def _describe_folder(folder: Path, limit: int = 12) -> str:
    if not folder.exists():
        return "no such folder"
    if not folder.is_dir():
        return "a file, not a folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return "an empty folder"
    shown = ", ".join(entries[:limit])
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"{len(entries)} entries: {shown}{more}"


def _check_dir(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(root, "a dataset folder", "no such folder" if not root.exists() else None)
    return root


def _require(root: Path, expected: Iterable[str], what: str) -> None:
    missing = [e for e in expected if not (root / e).exists()]
    if missing:
        raise DatasetLayoutError(root, f"{what} (missing: {', '.join(missing)})")


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


def _files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes) and not p.name.startswith(".")
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]


def _side_dir(out: Path | None, name: str, kind: str) -> Path | None:
    if out is None:
        return None
    d = Path(out).resolve().parent / f"{name}_{kind}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def grouped_split(items: list[dict], seed: int = 0, val_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Split items by their ``case`` key: a seeded shuffle of the sorted case ids, 20 % of
    the cases (at least one when there are two or more) to validation."""
    part = assign_cases((it["case"] for it in items), seed, {"training": 1.0 - val_fraction, "validation": val_fraction})
    train = [it for it in items if part[str(it["case"])] == "training"]
    val = [it for it in items if part[str(it["case"])] == "validation"]
    return train, val


def _datalist(name: str, description: str, training, validation, test=None, **extra) -> dict:
    d = {"name": name, "description": description, **extra, "training": training, "validation": validation}
    if test:
        d["test"] = test
    return d


# ----------------------------------------------------------------------------- geometry


def fit_ellipse(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    """Ellipse of a filled binary mask from its second moments: (cx, cy, semi_major,
    semi_minor, angle_deg); x right, y down, angle of the major axis from +x towards +y in
    [-90, 90). For a filled ellipse the variance along an axis is (semi-axis)^2 / 4."""
    ys, xs = np.nonzero(mask)
    if xs.size < 5:
        raise ValueError("mask has too few foreground pixels to fit an ellipse")
    cx, cy = xs.mean(), ys.mean()
    cov = np.cov(np.stack([xs - cx, ys - cy]).astype(np.float64))
    evals, evecs = np.linalg.eigh(cov)  # ascending
    # +1/12 per axis: the pixel-grid variance of a continuous area is slightly larger.
    a = 2.0 * math.sqrt(max(evals[1], 0.0) + 1.0 / 12)
    b = 2.0 * math.sqrt(max(evals[0], 0.0) + 1.0 / 12)
    vx, vy = evecs[:, 1]
    angle = math.degrees(math.atan2(vy, vx))
    angle = (angle + 90.0) % 180.0 - 90.0
    return float(cx), float(cy), float(a), float(b), float(angle)


def ellipse_axis_ends(cx: float, cy: float, a: float, b: float, angle_deg: float) -> list[list[float]]:
    """The four axis ends [major+, major-, minor+, minor-] as [[x, y], ...]."""
    t = math.radians(angle_deg)
    ux, uy = math.cos(t), math.sin(t)  # major axis direction
    vx, vy = -uy, ux  # minor axis direction
    return [
        [cx + a * ux, cy + a * uy],
        [cx - a * ux, cy - a * uy],
        [cx + b * vx, cy + b * vy],
        [cx - b * vx, cy - b * vy],
    ]


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ramanujan's first approximation of an ellipse's perimeter from its semi-axes."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def _load_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def _save_mask(mask: np.ndarray, path: Path, value: int = 1) -> None:
    from PIL import Image

    Image.fromarray((mask > 0).astype(np.uint8) * value).save(path)


# ----------------------------------------------------------------------------- BUS-BRA

BIRADS_CLASSES = ["BI-RADS 2", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5"]


def convert_busbra(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """BUS-BRA (Gómez-Flores et al., Med Phys 2023; Zenodo 10.5281/zenodo.7730709).

    Layout read (the official release)::

        Images/bus_<case>-<side>.png
        Masks/mask_<case>-<side>.png
        bus_data.csv     ID, Case, Histology, Pathology, BIRADS (2..5), Device, ..., BBOX
        5-fold-cv.csv    ID, Pathology, kFold (the image's test fold), valid_1..valid_5

    Split (the paper's protocol): ``fold`` K (default: the smallest fold present) puts every
    present image whose ``kFold`` is K in ``validation`` and all other present images in
    ``training`` (folds are patient-level). Items: ``image``, ``label`` (BI-RADS 2/3/4/5 ->
    0..3), ``pathology`` ("benign"/"malignant"), ``malignant`` (0/1), ``mask``, ``kfold``,
    ``case`` (the ``Case`` column). Only images present in ``Images/`` are listed.
    """
    root = _check_dir(root)
    _require(root, ["Images", "Masks", "bus_data.csv", "5-fold-cv.csv"], "the BUS-BRA layout: Images/, Masks/, bus_data.csv, 5-fold-cv.csv")
    meta = {r["ID"]: r for r in _read_csv(root / "bus_data.csv")}
    folds = {r["ID"]: r for r in _read_csv(root / "5-fold-cv.csv")}
    if not meta or "BIRADS" not in next(iter(meta.values())):
        raise DatasetLayoutError(root / "bus_data.csv", "columns ID, Case, Pathology, BIRADS", "other columns")
    if not folds or "kFold" not in next(iter(folds.values())):
        raise DatasetLayoutError(root / "5-fold-cv.csv", "columns ID, kFold", "other columns")
    images = _files(root / "Images")
    if not images:
        raise DatasetLayoutError(root / "Images", "bus_*.png images")
    items = []
    for img in images:
        iid = img.stem
        if iid not in meta or iid not in folds:
            continue
        m = meta[iid]
        mask = root / "Masks" / f"mask_{iid[len('bus_'):]}.png" if iid.startswith("bus_") else root / "Masks" / f"mask_{iid}.png"
        birads = int(float(m["BIRADS"]))
        item = {
            "image": _rel(img, root),
            "label": birads - 2,
            "birads": birads,
            "pathology": m["Pathology"].lower(),
            "malignant": int(m["Pathology"].lower() == "malignant"),
            "kfold": int(float(folds[iid]["kFold"])),
            "case": str(m.get("Case") or iid.split("-")[0]),
        }
        if mask.exists():
            item["mask"] = _rel(mask, root)
        items.append(item)
    if not items:
        raise DatasetLayoutError(root, "images in Images/ listed in bus_data.csv and 5-fold-cv.csv", "none matching")
    present = sorted({it["kfold"] for it in items})
    k = present[0] if fold is None else int(fold)
    if k not in present:
        raise DatasetLayoutError(root / "5-fold-cv.csv", f"images with kFold {k}", f"only folds {present} among the present images")
    train = [it for it in items if it["kfold"] != k]
    val = [it for it in items if it["kfold"] == k]
    return _datalist(
        "busbra",
        f"BUS-BRA breast ultrasound, BI-RADS 2/3/4/5 -> 0..3; official 5-fold CV, fold {k} validates "
        f"(folds present: {present}). Gómez-Flores et al., Med Phys 2023, doi:10.5281/zenodo.7730709.",
        train,
        val,
        class_names=BIRADS_CLASSES,
        fold=k,
    )


# ----------------------------------------------------------------------------- DDTI


def _ddti_polygons(svg_text: str) -> list[list[tuple[float, float]]]:
    try:
        regions = json.loads(svg_text)
    except (json.JSONDecodeError, TypeError):
        return []
    polys = []
    for region in regions if isinstance(regions, list) else [regions]:
        pts = [(float(p["x"]), float(p["y"])) for p in region.get("points", [])]
        if len(pts) >= 3:
            polys.append(pts)
    return polys


def convert_ddti(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """DDTI thyroid nodules (Pedraza et al., SPIE 2015), two layouts.

    Preprocessed release (as in ``shared/data/ddti``)::

        images/<case>_<nodule>[(<k>)].png    nodule-centred crops
        masks/<same stem>.gif                 0/255 nodule mask
        diagnosis.csv                         case_nodule, tirads, suspicious (1, 0 or blank)

    Original release (cimalab): ``<case>.xml`` (``<number>``, ``<tirads>``, ... and one
    ``<mark>`` per annotated image, with ``<image>`` (index) and ``<svg>`` (JSON list of
    regions with ``points`` [{"x", "y"}, ...])) beside ``<case>_<image>.jpg``. Polygons are
    rasterised (0/255) into ``<out dir>/ddti_masks/<case>_<image>.png`` when ``out`` is
    given (``label`` then points there); without ``out`` items carry ``polygons`` only.

    Items: ``image``, ``label`` (mask), ``tirads``, ``suspicious`` (0/1 or null), ``case``
    (text before the first ``_``). Split 8:2 by case, seeded.
    """
    root = _check_dir(root)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        items = _ddti_preprocessed(root)
        layout = "preprocessed release (crops, GIF masks)"
    elif list(root.glob("*.xml")):
        items = _ddti_original(root, _side_dir(out, "ddti", "masks"))
        layout = "original release (XML polygons)"
    else:
        raise DatasetLayoutError(
            root, "either images/ + masks/ (+ diagnosis.csv) or <case>.xml files beside <case>_<k>.jpg images"
        )
    if not items:
        raise DatasetLayoutError(root, "annotated DDTI images", "no image with a mask or polygon")
    train, val = grouped_split(items, seed)
    return _datalist(
        "ddti",
        f"DDTI thyroid nodule segmentation, {layout}; 8:2 split by case (seed {seed}). "
        "Pedraza et al., SPIE 2015.",
        train,
        val,
        mask_values={"background": 0, "nodule": 255},
    )


def _ddti_preprocessed(root: Path) -> list[dict]:
    diag = {}
    if (root / "diagnosis.csv").exists():
        for r in _read_csv(root / "diagnosis.csv"):
            diag[r.get("case_nodule", "")] = r
    masks = {p.stem: p for p in _files(root / "masks")}
    items = []
    for img in _files(root / "images"):
        mask = masks.get(img.stem)
        if mask is None:
            continue
        d = diag.get(img.stem, {})
        sus = d.get("suspicious", "")
        tirads = d.get("tirads", "")
        items.append(
            {
                "image": _rel(img, root),
                "label": _rel(mask, root),
                "tirads": None if tirads in ("", "None") else tirads,
                "suspicious": int(float(sus)) if sus not in ("", "None") else None,
                "case": img.stem.split("_")[0],
            }
        )
    return items


def _ddti_original(root: Path, mask_dir: Path | None) -> list[dict]:
    from PIL import Image, ImageDraw

    items = []
    for xml in sorted(root.glob("*.xml")):
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise DatasetLayoutError(xml, "a DDTI case XML", f"unparsable XML ({e})") from e
        number = (tree.findtext("number") or xml.stem).strip()
        tirads = (tree.findtext("tirads") or "").strip() or None
        by_image: dict[str, list] = {}
        for mark in tree.findall("mark"):
            idx = (mark.findtext("image") or "").strip()
            by_image.setdefault(idx, []).extend(_ddti_polygons(mark.findtext("svg") or ""))
        for idx, polys in sorted(by_image.items()):
            img = next((root / f"{number}_{idx}{s}" for s in (".jpg", ".png", ".jpeg") if (root / f"{number}_{idx}{s}").exists()), None)
            if img is None or not polys:
                continue
            item = {
                "image": _rel(img, root),
                "polygons": [[[round(x, 2), round(y, 2)] for x, y in p] for p in polys],
                "tirads": tirads,
                "suspicious": None if tirads is None else int(tirads.lower() not in ("1", "2", "3")),
                "case": number,
            }
            if mask_dir is not None:
                with Image.open(img) as im:
                    size = im.size
                canvas = Image.new("L", size, 0)
                draw = ImageDraw.Draw(canvas)
                for p in polys:
                    draw.polygon(p, fill=255)
                mpath = mask_dir / f"{number}_{idx}.png"
                canvas.save(mpath)
                item["label"] = _rel(mpath, root)
            items.append(item)
    return items


# ----------------------------------------------------------------------------- HC18


def convert_hc18(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """HC18 fetal head circumference (van den Heuvel et al., PLoS One 2018; Zenodo 1327317).

    Official layout: ``training_set/<id>_HC.png`` with ``<id>_HC_Annotation.png`` (the
    ellipse outline) and ``training_set_pixel_size_and_HC.csv`` (``filename``, ``pixel
    size(mm)``, ``head circumference (mm)``) in the root (or in ``training_set/``); ``root``
    may also be ``training_set`` itself. Outlines are filled (scipy binary_fill_holes); the
    filled masks are written (0/1 PNG) to ``<out dir>/hc18_masks/<id>_HC_Mask.png`` when
    ``out`` is given and ``label`` points there; without ``out`` items have no ``label``
    but keep ``annotation`` (the outline) and all geometry.

    Filled-mask layout (``shared/data/hc18``): ``images/<id>_HC.png``,
    ``masks/<id>_HC_Mask.png``, ``pixel_size_and_HC.csv`` (same columns).

    Items: ``image``, ``label`` (filled mask), ``ellipses`` [[cx, cy, a, b, angle]] fitted
    from the filled mask (second moments), ``classes`` [0] (head), ``landmarks`` the four
    axis ends [major+, major-, minor+, minor-], ``value`` (CSV HC in mm), ``hc_fit_mm``
    (Ramanujan perimeter of the fit times pixel size), ``spacing`` [ps, ps], ``case`` (the
    number before ``_``; ``010_2HC`` and ``010_HC`` share a case). Split 8:2 by case.
    """
    root = _check_dir(root)
    from scipy.ndimage import binary_fill_holes

    if (root / "images").is_dir() and (root / "masks").is_dir():
        layout, img_dir = "filled-mask", root / "images"
        csvs = sorted(root.glob("*pixel_size_and_HC.csv"))
    else:
        img_dir = root / "training_set" if (root / "training_set").is_dir() else root
        layout = "official"
        if not list(img_dir.glob("*_HC_Annotation.png")):
            raise DatasetLayoutError(
                root,
                "images/ + masks/<id>_HC_Mask.png + pixel_size_and_HC.csv, or training_set/ with "
                "<id>_HC.png and <id>_HC_Annotation.png + training_set_pixel_size_and_HC.csv",
            )
        csvs = sorted(set(root.glob("*pixel_size_and_HC.csv")) | set(img_dir.glob("*pixel_size_and_HC.csv")))
    if not csvs:
        raise DatasetLayoutError(root, "a *pixel_size_and_HC.csv file (filename, pixel size(mm), head circumference (mm))")
    rows = _read_csv(csvs[0])
    mask_dir = _side_dir(out, "hc18", "masks") if layout == "official" else None
    items = []
    for r in rows:
        fname = r.get("filename", "")
        ps = float(r.get("pixel size(mm)") or r.get("pixel size (mm)") or "nan")
        hc = float(r.get("head circumference (mm)") or "nan")
        img = img_dir / fname
        if not img.exists():
            continue
        stem = Path(fname).stem
        item = {"image": _rel(img, root)}
        if layout == "filled-mask":
            mpath = root / "masks" / f"{stem}_Mask.png"
            if not mpath.exists():
                continue
            mask = _load_mask(mpath)
            item["label"] = _rel(mpath, root)
        else:
            apath = img_dir / f"{stem}_Annotation.png"
            if not apath.exists():
                continue
            mask = binary_fill_holes(_load_mask(apath))
            item["annotation"] = _rel(apath, root)
            if mask_dir is not None:
                mpath = mask_dir / f"{stem}_Mask.png"
                _save_mask(mask, mpath)
                item["label"] = _rel(mpath, root)
        cx, cy, a, b, ang = fit_ellipse(mask)
        item.update(
            {
                "ellipses": [[round(cx, 2), round(cy, 2), round(a, 2), round(b, 2), round(ang, 2)]],
                "classes": [0],
                "landmarks": [[round(x, 2), round(y, 2)] for x, y in ellipse_axis_ends(cx, cy, a, b, ang)],
                "value": hc,
                "hc_fit_mm": round(ramanujan_perimeter(a, b) * ps, 3),
                "spacing": [ps, ps],
                "case": re.match(r"\d+", stem).group(0) if re.match(r"\d+", stem) else stem,
            }
        )
        items.append(item)
    if not items:
        raise DatasetLayoutError(root, f"images listed in {csvs[0].name} with their masks/annotations", "none")
    train, val = grouped_split(items, seed)
    return _datalist(
        "hc18",
        f"HC18 fetal head ({layout} layout): mask, fitted ellipse, 4 axis-end landmarks, HC in mm; "
        f"8:2 split by case (seed {seed}). van den Heuvel et al., PLoS One 2018, Zenodo 1327317 (CC BY 4.0).",
        train,
        val,
        class_names=["head"],
        landmark_names=["major_axis_end_1", "major_axis_end_2", "minor_axis_end_1", "minor_axis_end_2"],
    )


# ----------------------------------------------------------------------------- generic image/mask pairs


def _paired(root: Path, img_dir: Path, mask_dir: Path, case_of: Callable[[Path], str]) -> list[dict]:
    masks = {p.stem: p for p in _files(mask_dir)}
    items = []
    for img in _files(img_dir):
        m = masks.get(img.stem)
        if m is not None:
            items.append({"image": _rel(img, root), "label": _rel(m, root), "case": case_of(img)})
    return items


def convert_carotid(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """Common carotid artery (Momot, Mendeley Data d4xt63mgjm, CC BY 4.0).

    Layout: ``images/<recording>_slice_<n>.png`` with ``masks/<same name>`` (0/255 lumen),
    as in ``shared/data/carotid``; the Mendeley folder names ``US images/`` and ``Expert mask
    images/`` are accepted too. ``case`` = the recording (text before ``_slice``); split 8:2
    by recording (at least one recording validates), never by frame.
    """
    root = _check_dir(root)
    for i, m in (("images", "masks"), ("US images", "Expert mask images")):
        if (root / i).is_dir() and (root / m).is_dir():
            break
    else:
        raise DatasetLayoutError(root, "images/ and masks/ (or 'US images/' and 'Expert mask images/')")
    items = _paired(root, root / i, root / m, lambda p: p.stem.split("_slice")[0])
    if not items:
        raise DatasetLayoutError(root / i, "images with a same-named mask in " + m)
    train, val = grouped_split(items, seed)
    return _datalist(
        "carotid",
        f"Common carotid artery lumen segmentation; 8:2 split by recording (seed {seed}). "
        "Momot, Mendeley Data d4xt63mgjm (CC BY 4.0).",
        train,
        val,
        mask_values={"background": 0, "lumen": 255},
    )


def convert_musv(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """Mus-V artery/vein segmentation.

    No public description of the release layout was found; the layout read (documented
    assumption) is ``images/<subject>_<rest>.png`` with ``masks/<same stem>.png`` (integer
    classes: 0 background, 1 artery, 2 vein). ``case`` = the subject (text before the first
    ``_``); split 8:2 by subject.
    """
    root = _check_dir(root)
    _require(root, ["images", "masks"], "images/<subject>_<n>.png and masks/<same stem>.png (0 bg, 1 artery, 2 vein)")
    items = _paired(root, root / "images", root / "masks", lambda p: p.stem.split("_")[0])
    if not items:
        raise DatasetLayoutError(root / "images", "images with a same-named mask in masks/")
    train, val = grouped_split(items, seed)
    return _datalist(
        "musv",
        f"Mus-V artery/vein segmentation; 8:2 split by subject (seed {seed}).",
        train,
        val,
        class_names=["background", "artery", "vein"],
    )


def convert_abdomen(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """Abdominal multi-organ segmentation (the release layout is not public).

    Generic documented layout: ``images/<name>.<ext>``, ``masks/<name>.png`` (integer
    classes 0 background, 1 liver, 2 kidney, 3 pancreas, 4 bladder, 5 spleen) and
    ``cases.csv`` with columns ``image`` (file name in images/) and ``case`` (patient).
    Images missing from ``cases.csv`` are an error. Split 8:2 by case.
    """
    root = _check_dir(root)
    _require(root, ["images", "masks", "cases.csv"], "images/, masks/ and cases.csv (image, case)")
    rows = _read_csv(root / "cases.csv")
    if not rows or not {"image", "case"} <= set(rows[0]):
        raise DatasetLayoutError(root / "cases.csv", "columns image, case", f"columns {sorted(rows[0]) if rows else 'none'}")
    case_of = {Path(r["image"]).name: r["case"] for r in rows}
    missing = [p.name for p in _files(root / "images") if p.name not in case_of]
    if missing:
        raise DatasetLayoutError(root / "cases.csv", "a row for every image", f"no row for {', '.join(missing[:5])}")
    items = _paired(root, root / "images", root / "masks", lambda p: case_of[p.name])
    if not items:
        raise DatasetLayoutError(root / "images", "images with a same-named mask in masks/")
    train, val = grouped_split(items, seed)
    return _datalist(
        "abdomen",
        f"Abdominal multi-organ segmentation (generic layout); 8:2 split by case (seed {seed}).",
        train,
        val,
        class_names=["background", "liver", "kidney", "pancreas", "bladder", "spleen"],
    )


# ----------------------------------------------------------------------------- CAMUS


def _read_cfg(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def convert_camus(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """CAMUS (Leclerc et al., IEEE TMI 2019), the NIfTI release::

        database_nifti/patientXXXX/patientXXXX_{2CH,4CH}_half_sequence.nii.gz
                                   patientXXXX_{2CH,4CH}_{ED,ES}.nii.gz, ..._{ED,ES}_gt.nii.gz
                                   Info_{2CH,4CH}.cfg   (ED, ES, NbFrame, ..., LVedv, LVesv, LVef)
        database_split/subgroup_{training,validation,testing}.txt   (official split, optional)

    ``root`` may be the release folder or ``database_nifti`` itself. One item per patient and
    view with a half sequence: ``image`` (half sequence), ``ef`` (``LVef``, percent),
    ``ed_frame``/``es_frame`` (0-based indices into the half sequence; the cfg's ED/ES are
    1-based), ``view``, ``ed_image``/``ed_label``/``es_image``/``es_label`` when present,
    ``case`` (patient). Split: the official subgroups when ``database_split`` is present
    (training / validation / test), else 8:2 by patient.
    """
    root = _check_dir(root)
    nifti = root / "database_nifti" if (root / "database_nifti").is_dir() else root
    patients = sorted(p for p in nifti.iterdir() if p.is_dir() and p.name.startswith("patient"))
    if not patients:
        raise DatasetLayoutError(root, "database_nifti/patientXXXX/ folders")
    items = []
    for pdir in patients:
        pid = pdir.name
        for view in ("2CH", "4CH"):
            seq = pdir / f"{pid}_{view}_half_sequence.nii.gz"
            cfg = pdir / f"Info_{view}.cfg"
            if not seq.exists():
                continue
            if not cfg.exists():
                raise DatasetLayoutError(pdir, f"Info_{view}.cfg beside {seq.name}")
            info = _read_cfg(cfg)
            if "LVef" not in info or "ED" not in info or "ES" not in info:
                raise DatasetLayoutError(cfg, "keys ED, ES, LVef", f"keys {sorted(info)}")
            item = {
                "image": _rel(seq, root),
                "ef": float(info["LVef"]),
                "ed_frame": int(info["ED"]) - 1,
                "es_frame": int(info["ES"]) - 1,
                "view": view,
            }
            for ph in ("ED", "ES"):
                for suffix, key in (("", "image"), ("_gt", "label")):
                    f = pdir / f"{pid}_{view}_{ph}{suffix}.nii.gz"
                    if f.exists():
                        item[f"{ph.lower()}_{key}"] = _rel(f, root)
            for k in ("ImageQuality", "NbFrame", "FrameRate"):
                if k in info:
                    item[k[0].lower() + k[1:]] = info[k]
            item["case"] = pid
            items.append(item)
    if not items:
        raise DatasetLayoutError(nifti, "patientXXXX_{2CH,4CH}_half_sequence.nii.gz files", "none")
    split_dir = root / "database_split"
    if split_dir.is_dir():
        groups = {}
        for part in ("training", "validation", "testing"):
            f = split_dir / f"subgroup_{part}.txt"
            if not f.exists():
                raise DatasetLayoutError(split_dir, f"subgroup_{part}.txt")
            groups[part] = {line.strip() for line in f.read_text().splitlines() if line.strip()}
        train = [it for it in items if it["case"] in groups["training"]]
        val = [it for it in items if it["case"] in groups["validation"]]
        test = [it for it in items if it["case"] in groups["testing"]]
        how = "official database_split subgroups"
    else:
        (train, val), test = grouped_split(items, seed), []
        how = f"8:2 split by patient (seed {seed})"
    return _datalist(
        "camus",
        f"CAMUS left-ventricle EF from 2D+t half sequences (2CH and 4CH); {how}. Leclerc et al., IEEE TMI 2019.",
        train,
        val,
        test,
    )


# ----------------------------------------------------------------------------- thyroid cine (Stanford AIMI)

_MALIGNANT_WORDS = ("malignan", "carcinoma", "cancer", "papillary", "medullary", "anaplastic", "lymphoma")
_BENIGN_WORDS = ("benign", "adenoma", "hyperplas", "colloid", "thyroiditis", "follicular nodular")


def _pathology_label(text: str) -> int | None:
    t = text.strip().lower()
    if t in ("1", "malignant"):
        return 1
    if t in ("0", "benign"):
        return 0
    if any(w in t for w in _MALIGNANT_WORDS) and "benign" not in t:
        return 1
    if any(w in t for w in _BENIGN_WORDS):
        return 0
    return None


def convert_thyroid_cine(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """Thyroid ultrasound cine-clip (Stanford AIMI, doi:10.71718/7m5n-rh16).

    Layout::

        dataset.hdf5   image (N, H, W) uint8, mask (N, H, W) 0/255, annot_id (N,) str,
                       frame_num (N,) -- every frame of every clip, stacked
        metadata.csv   annot_id, sex, age, location, size_x/y/z, ti-rads_*, ti-rads_level,
                       histopath_diagnosis

    One item per clip (``annot_id``): ``label`` 0 benign / 1 malignant from
    ``histopath_diagnosis`` (keyword match; clips whose diagnosis maps to neither are left
    out and counted in ``skipped``), ``tirads_level``, ``rows`` (the HDF5 row indices of the
    clip in frame order), ``case`` (text of ``annot_id`` before ``_``: the patient). When
    ``out`` is given each clip is exported losslessly as multi-page TIFF to
    ``<out dir>/thyroid_cine_clips/<annot_id>.tif`` (+ ``<annot_id>_mask.tif``), and
    ``image``/``mask`` point there; without ``out``, ``image`` is ``dataset.hdf5`` and the
    clip is given by ``rows``. Split 8:2 by patient.
    """
    root = _check_dir(root)
    _require(root, ["dataset.hdf5", "metadata.csv"], "dataset.hdf5 and metadata.csv (Stanford AIMI release)")
    import h5py

    meta = {r["annot_id"].strip(): r for r in _read_csv(root / "metadata.csv") if "annot_id" in r}
    clip_dir = _side_dir(out, "thyroid_cine", "clips")
    items, skipped = [], []
    with h5py.File(root / "dataset.hdf5", "r") as f:
        missing = [k for k in ("image", "annot_id", "frame_num") if k not in f]
        if missing:
            raise DatasetLayoutError(root / "dataset.hdf5", "datasets image, mask, annot_id, frame_num", f"keys {sorted(f.keys())}")
        ids = [a.decode() if isinstance(a, bytes) else str(a) for a in f["annot_id"][()]]
        frames = np.asarray(f["frame_num"][()]).astype(int)
        order: dict[str, list[int]] = {}
        for row, aid in enumerate(ids):
            order.setdefault(aid.strip(), []).append(row)
        for aid in sorted(order):
            rows = sorted(order[aid], key=lambda r: frames[r])
            m = meta.get(aid, {})
            label = _pathology_label(m.get("histopath_diagnosis", ""))
            if label is None:
                skipped.append(aid)
                continue
            item = {
                "image": "dataset.hdf5",
                "label": label,
                "tirads_level": m.get("ti-rads_level") or None,
                "histopath_diagnosis": m.get("histopath_diagnosis", ""),
                "rows": [int(r) for r in rows],
                "case": aid.split("_")[0] or aid,
            }
            if clip_dir is not None:
                from PIL import Image

                idx = np.asarray(rows)
                for key, suffix in (("image", ""), ("mask", "_mask")):
                    if key not in f:
                        continue
                    arr = np.asarray(f[key][np.sort(idx)])[np.argsort(np.argsort(idx))]
                    pages = [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in arr]
                    path = clip_dir / f"{aid}{suffix}.tif"
                    pages[0].save(path, save_all=True, append_images=pages[1:])
                    item[key] = _rel(path, root)
            items.append(item)
    if not items:
        raise DatasetLayoutError(root, "clips whose histopath_diagnosis is benign or malignant", f"{len(skipped)} unmapped clips")
    train, val = grouped_split(items, seed)
    return _datalist(
        "thyroid_cine",
        f"Stanford AIMI thyroid cine clips, benign (0) / malignant (1); 8:2 split by patient (seed {seed}).",
        train,
        val,
        class_names=["benign", "malignant"],
        skipped=skipped,
    )


# ----------------------------------------------------------------------------- FLL CEUS

FLL_CLASSES = ["HCC", "HEM", "FNH"]


def convert_fll_ceus(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """Focal liver lesions on contrast-enhanced ultrasound (HCC / HEM / FNH).

    No public description of a release layout was found; documented assumption: one folder
    per class, ``HCC/``, ``HEM/``, ``FNH/`` (case-insensitive), each holding one clip per
    lesion, either a video/DICOM/NIfTI file or a folder of frames, named
    ``<patient>_<rest>`` (or just ``<patient>``). ``label`` = index in [HCC, HEM, FNH];
    ``case`` = the patient (text before the first ``_``). Split 8:2 by patient.
    """
    root = _check_dir(root)
    dirs = {p.name.upper(): p for p in root.iterdir() if p.is_dir()}
    if not any(c in dirs for c in FLL_CLASSES):
        raise DatasetLayoutError(root, "class folders HCC/, HEM/, FNH/")
    items = []
    for label, cname in enumerate(FLL_CLASSES):
        d = dirs.get(cname)
        if d is None:
            continue
        for clip in sorted(d.iterdir()):
            if clip.name.startswith("."):
                continue
            if clip.is_dir() and not _files(clip):
                continue
            if clip.is_file() and not clip.name.lower().endswith(VIDEO_SUFFIXES + IMAGE_SUFFIXES):
                continue
            stem = clip.name.split(".")[0]
            items.append({"image": _rel(clip, root), "label": label, "case": stem.split("_")[0]})
    if not items:
        raise DatasetLayoutError(root, "clips (video files or frame folders) in HCC/, HEM/, FNH/", "none")
    train, val = grouped_split(items, seed)
    return _datalist(
        "fll_ceus",
        f"Focal liver lesion CEUS classification HCC/HEM/FNH; 8:2 split by patient (seed {seed}).",
        train,
        val,
        class_names=FLL_CLASSES,
    )


# ----------------------------------------------------------------------------- FOCUS

FOCUS_CLASSES = ["thorax", "heart"]


def convert_focus(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """FOCUS fetal four-chamber view: thorax and heart as ellipses.

    No public description of the release layout was found; documented assumption::

        [<split>/]images/<case>_<n>.png
        [<split>/]annotations/<same stem>.txt   one line per object:
                                                <class> <cx> <cy> <semi_major> <semi_minor> <angle_deg>

    with ``<class>`` ``thorax``/``heart`` (or 0/1), pixels, x right, y down, angle from +x
    towards +y. ``<split>`` folders ``train``/``val``/``test`` (when present) are the fixed
    split; otherwise 8:2 by case (text before the first ``_``). Items: ``image``,
    ``ellipses``, ``classes``, ``ctr`` (heart over thorax circumference, Ramanujan), ``case``.
    """
    root = _check_dir(root)
    splits = [s for s in ("train", "val", "test") if (root / s / "images").is_dir()]
    bases = [root / s for s in splits] if splits else [root]
    for b in bases:
        if not (b / "images").is_dir() or not (b / "annotations").is_dir():
            raise DatasetLayoutError(b, "images/ and annotations/ (or train/, val/, test/ holding them)")
    parts: dict[str, list] = {}
    for b, s in zip(bases, splits or [""]):
        items = []
        for img in _files(b / "images"):
            ann = b / "annotations" / f"{img.stem}.txt"
            if not ann.exists():
                continue
            ellipses, classes = [], []
            for line in ann.read_text().splitlines():
                tok = line.replace(",", " ").split()
                if not tok:
                    continue
                if len(tok) != 6:
                    raise DatasetLayoutError(ann, "lines '<class> cx cy semi_major semi_minor angle'", f"line {line!r}")
                c = tok[0].lower()
                cls = FOCUS_CLASSES.index(c) if c in FOCUS_CLASSES else (1 if c == "cardiac" else int(float(c)))
                ellipses.append([float(t) for t in tok[1:]])
                classes.append(cls)
            item = {"image": _rel(img, root), "ellipses": ellipses, "classes": classes, "case": img.stem.split("_")[0]}
            if 0 in classes and 1 in classes:
                th, he = ellipses[classes.index(0)], ellipses[classes.index(1)]
                item["ctr"] = round(ramanujan_perimeter(he[2], he[3]) / ramanujan_perimeter(th[2], th[3]), 4)
            items.append(item)
        parts[s] = items
    if not any(parts.values()):
        raise DatasetLayoutError(root, "images with a same-stem .txt in annotations/", "none")
    if splits:
        train, val, test = parts.get("train", []), parts.get("val", []), parts.get("test", [])
        how = "the release's train/val/test folders"
    else:
        (train, val), test = grouped_split(parts[""], seed), []
        how = f"8:2 split by case (seed {seed})"
    return _datalist(
        "focus",
        f"FOCUS fetal thorax and heart ellipses, cardiothoracic ratio; {how}.",
        train,
        val,
        test,
        class_names=FOCUS_CLASSES,
    )


# ----------------------------------------------------------------------------- fetal brain landmarks


def convert_brain_landmark(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """Fetal brain landmarks (24 points).

    No public description of the release layout was found; documented assumption:
    ``images/<name>.png`` and ``landmarks.csv`` with columns ``image`` (file name in
    images/), optional ``case`` (patient; default the text before the first ``_``), then
    ``x1, y1, ..., x24, y24`` (pixels, x right, y down). Landmarks keep the column order.
    Split 8:2 by case.
    """
    root = _check_dir(root)
    _require(root, ["images", "landmarks.csv"], "images/ and landmarks.csv (image, [case,] x1, y1, ..., xK, yK)")
    rows = _read_csv(root / "landmarks.csv")
    cols = list(rows[0]) if rows else []
    xs = sorted((c for c in cols if re.fullmatch(r"x\d+", c)), key=lambda c: int(c[1:]))
    if not rows or "image" not in cols or not xs or any(f"y{c[1:]}" not in cols for c in xs):
        raise DatasetLayoutError(root / "landmarks.csv", "columns image, x1, y1, ..., xK, yK", f"columns {cols}")
    items = []
    for r in rows:
        img = root / "images" / Path(r["image"]).name
        if not img.exists():
            raise DatasetLayoutError(root / "images", f"{img.name} (listed in landmarks.csv)")
        pts = [[float(r[c]), float(r["y" + c[1:]])] for c in xs]
        items.append({"image": _rel(img, root), "landmarks": pts, "case": r.get("case") or img.stem.split("_")[0]})
    train, val = grouped_split(items, seed)
    return _datalist(
        "brain_landmark",
        f"Fetal brain landmarks ({len(xs)} points); 8:2 split by case (seed {seed}).",
        train,
        val,
        landmark_names=[f"L{c[1:]}" for c in xs],
    )


# ----------------------------------------------------------------------------- USenhance


def convert_usenhance(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """USenhance 2023 (MICCAI challenge): low/high-quality pairs per organ::

        train_datasets/<organ>/low_quality/<name>.png
        train_datasets/<organ>/high_quality/<name>.png    (same name)
        test_datasets/<organ>/low_quality/<name>.png       (optional; no target)

    ``root`` may also be ``train_datasets`` itself. Items: ``image`` (low quality),
    ``target`` (high quality), ``organ``, ``case`` (``<organ>/<stem>``: the release has no
    patient id, so each pair is its own case). Training pairs split 8:2 (seeded); the test
    images, when present, go to ``test`` with ``image`` only.
    """
    root = _check_dir(root)
    train_root = root / "train_datasets" if (root / "train_datasets").is_dir() else root
    organs = sorted(p for p in train_root.iterdir() if p.is_dir() and (p / "low_quality").is_dir())
    if not organs:
        raise DatasetLayoutError(root, "train_datasets/<organ>/low_quality/ and high_quality/")
    items = []
    for o in organs:
        if not (o / "high_quality").is_dir():
            raise DatasetLayoutError(o, "low_quality/ and high_quality/")
        for lq in _files(o / "low_quality"):
            hq = o / "high_quality" / lq.name
            if hq.exists():
                items.append({"image": _rel(lq, root), "target": _rel(hq, root), "organ": o.name, "case": f"{o.name}/{lq.stem}"})
    if not items:
        raise DatasetLayoutError(train_root, "same-named images in <organ>/low_quality and high_quality", "no pair")
    train, val = grouped_split(items, seed)
    test = []
    if (root / "test_datasets").is_dir():
        for o in sorted(p for p in (root / "test_datasets").iterdir() if (p / "low_quality").is_dir()):
            test += [{"image": _rel(p, root), "organ": o.name, "case": f"{o.name}/{p.stem}"} for p in _files(o / "low_quality")]
    return _datalist(
        "usenhance",
        f"USenhance 2023 low- to high-quality enhancement; training pairs 8:2 (seed {seed}), release test set as test.",
        train,
        val,
        test,
    )


# ----------------------------------------------------------------------------- USreport


def convert_usreport(root: Path, out: Path | None = None, fold: int | None = None, seed: int = 0) -> dict:
    """Ultrasound report generation (liver / breast / thyroid).

    Layout read: the R2Gen-style release used by ultrasound report datasets,
    ``annotation.json`` = ``{"train": [...], "val": [...], "test": [...]}`` with entries
    ``{"id", "report", "image_path": [p1, p2, ...], "split"}`` and image paths relative to
    ``images/`` (or to the root). The release's split is kept. Items: ``images`` (the first
    two paths; one image is repeated), ``report``, ``case`` (``id``; a ``patient``/
    ``uid`` field wins when present). ``root`` may hold one such folder per organ
    (``liver/``, ``breast/``, ``thyroid/``), which are merged with an ``organ`` key.
    """
    root = _check_dir(root)
    if (root / "annotation.json").exists():
        sets = [(root, None)]
    else:
        sets = [(p, p.name) for p in sorted(root.iterdir()) if (p / "annotation.json").exists()]
    if not sets:
        raise DatasetLayoutError(root, "annotation.json (train/val/test lists), or <organ>/annotation.json")
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for base, organ in sets:
        try:
            ann = json.loads((base / "annotation.json").read_text())
        except json.JSONDecodeError as e:
            raise DatasetLayoutError(base / "annotation.json", "valid JSON", str(e)) from e
        if not isinstance(ann, dict) or not any(k in ann for k in parts):
            raise DatasetLayoutError(base / "annotation.json", "keys train, val, test", f"{type(ann).__name__} {list(ann)[:5] if isinstance(ann, dict) else ''}")
        for split in parts:
            for e in ann.get(split, []):
                paths = e.get("image_path") or []
                if isinstance(paths, str):
                    paths = [paths]
                resolved = []
                for p in paths:
                    cand = [base / "images" / p, base / p]
                    hit = next((c for c in cand if c.exists()), None)
                    if hit is None:
                        raise DatasetLayoutError(base / "images", f"{p} (listed in annotation.json)")
                    resolved.append(_rel(hit, root))
                if not resolved:
                    continue
                images = (resolved + resolved)[:2]
                item = {"images": images, "report": e.get("report", ""), "case": str(e.get("patient") or e.get("uid") or e.get("id"))}
                if organ:
                    item["organ"] = organ
                    item["case"] = f"{organ}/{item['case']}"
                parts[split].append(item)
    return _datalist(
        "usreport",
        "Ultrasound report generation from two images; the release's train/val/test split.",
        parts["train"],
        parts["val"],
        parts["test"],
    )


# ----------------------------------------------------------------------------- registry

DATALIST_CONVERTERS: dict[str, Callable[..., dict]] = {
    "busbra": convert_busbra,
    "ddti": convert_ddti,
    "hc18": convert_hc18,
    "carotid": convert_carotid,
    "camus": convert_camus,
    "musv": convert_musv,
    "abdomen": convert_abdomen,
    "thyroid_cine": convert_thyroid_cine,
    "fll_ceus": convert_fll_ceus,
    "focus": convert_focus,
    "brain_landmark": convert_brain_landmark,
    "usenhance": convert_usenhance,
    "usreport": convert_usreport,
}


def convert_datalist(
    name: str,
    root: str | Path,
    out: str | Path | None = None,
    fold: int | None = None,
    seed: int = 0,
    split: str | Path | None = None,
) -> dict:
    """Build the datalist of benchmark ``name`` from ``root``; write JSON to ``out`` if given.

    ``split``: a split file (``data_lists/<name>.json``, see :mod:`echocare.datasets.splits`)
    whose parts replace the converter's own; the datalist then carries ``split_file`` and
    ``split_report`` (one line per case count the file does not cover, empty when exact).
    The split file is read before any conversion, so a bad one costs nothing.
    """
    key = name.lower().replace("-", "_")
    if key not in DATALIST_CONVERTERS:
        raise ValueError(f"unknown datalist {name!r}; known: {', '.join(sorted(DATALIST_CONVERTERS))}")
    dataset_split = load_split(split) if split is not None else None
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    datalist = DATALIST_CONVERTERS[key](Path(root), out_path, fold, seed)
    if dataset_split is not None:
        datalist, report = apply_split(datalist, dataset_split, fold=fold, root=root)
        datalist["split_report"] = report.lines()
    if out_path is not None:
        out_path.write_text(json.dumps(datalist, indent=1) + "\n")
    return datalist
