"""Report-generation phantom (``echocare demo-data --task usreport``): cases of two images
whose templated report states what the images show, so that a model that looks at the
images beats a constant report.

Each case is one organ (liver: convex sector probe, homogeneous parenchyma with small
vessels; thyroid: linear probe, two lobes around the trachea, whose air shadows the middle;
breast: linear probe, fat / gland / muscle layers) and one lesion state: none, a solid
hypoechoic nodule (irregular, grey, shadowing) or an anechoic cyst (round, black, posterior
enhancement), small or large. Both images of a case show the same organ and lesion in two
independent views (other speckle, probe and position). The report is one organ sentence and
one lesion sentence from fixed templates, in English (``language="en"``) or Chinese
(``"zh"``)::

    The liver is normal in size with homogeneous echotexture. A large anechoic cyst is seen
    with posterior enhancement.
    肝脏大小正常，回声均匀。可见一较大无回声囊肿，后方回声增强。

The findings of these sentences are what ``bundles/usreport/configs/findings.yaml`` looks
for (organ, lesion, solid nodule, cyst, small, large; negated "no focal lesion" /
"未见明显占位"). Files are written in the R2Gen-style release layout that
:func:`echocare.datasets.converters.convert_usreport` reads (``out/usreport/annotation.json``
with ``train``/``val``/``test`` lists of ``{"id", "report", "image_path": [p1, p2],
"split"}``, images under ``out/usreport/images/<id>/``), then converted; the datalist's
paths are relative to ``out``.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import numpy as np

from echocare.datasets.converters import DATALIST_CONVERTERS
from echocare.phantoms.renderer import Canvas, save_png, draw_skin_layers, make_canvas, render_bmode
from echocare.phantoms.layout import fresh_phantom_dir

__all__ = ["REPORT_LESIONS", "REPORT_ORGANS", "generate_usreport", "make_report_image", "phantom_report"]

REPORT_ORGANS = ("liver", "thyroid", "breast")
#: Lesion states; "none" twice so that normal cases are the most common, as in clinics.
REPORT_LESIONS = ("none", "none", "solid_small", "solid_large", "cyst_small", "cyst_large")

_ORGAN_SENTENCE = {
    "en": {
        "liver": "The liver is normal in size with homogeneous echotexture.",
        "thyroid": "The thyroid gland is normal in size with homogeneous echotexture.",
        "breast": "The breast shows normal fibroglandular tissue.",
    },
    "zh": {"liver": "肝脏大小正常，回声均匀。", "thyroid": "甲状腺大小正常，回声均匀。", "breast": "乳腺腺体结构正常。"},
}
_SIZE = {"en": {"small": "small", "large": "large"}, "zh": {"small": "较小", "large": "较大"}}


def phantom_report(organ: str, lesion: str, language: str = "en") -> str:
    """The templated report of a case (``organ`` of :data:`REPORT_ORGANS`, ``lesion`` of
    :data:`REPORT_LESIONS`, ``language`` ``en`` or ``zh``)."""
    if language not in _ORGAN_SENTENCE:
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    first = _ORGAN_SENTENCE[language][organ]
    if lesion == "none":
        return first + (" No focal lesion is seen." if language == "en" else "未见明显占位。")
    kind, size = lesion.split("_")
    s = _SIZE[language][size]
    if language == "en":
        second = f"A {s} hypoechoic solid nodule is seen." if kind == "solid" else f"A {s} anechoic cyst is seen with posterior enhancement."
        return f"{first} {second}"
    return first + (f"可见一{s}低回声实性结节。" if kind == "solid" else f"可见一{s}无回声囊肿，后方回声增强。")


def _organ_scene(c: Canvas, rng: np.random.Generator, organ: str) -> tuple[float, float]:
    """Paint the organ's background scene; returns the (depth, lateral) fractions where a
    lesion sits in that organ."""
    if organ == "liver":
        c.texture = 0.06
        top = draw_skin_layers(c, rng, muscle=True)
        c.paint(c.layer(top, 1.1), "parenchyma", None, rng.uniform(0.9, 1.1))
        c.paint(c.layer(top, top + 0.012), "fascia")
        for _ in range(rng.integers(3, 6)):  # small vessels
            y, x = c.at(rng.uniform(top + 0.1, 0.9), rng.uniform(-0.8, 0.8))
            r = c.px(rng.uniform(0.012, 0.03))
            c.paint(c.ellipse(y, x, r, r * rng.uniform(1, 2), rng.uniform(0, 180)), "fluid")
        return rng.uniform(0.45, 0.6), rng.uniform(-0.3, 0.3)
    if organ == "thyroid":
        c.texture = 0.12
        c.fill("tissue", rng.uniform(0.5, 0.7))
        top = draw_skin_layers(c, rng, muscle=True)
        ly = top + rng.uniform(0.14, 0.2)
        side = 1 if rng.random() < 0.5 else -1
        for s in (-1, 1):
            y, x = c.at(ly, s * rng.uniform(0.4, 0.46))
            c.paint(c.ellipse(y, x, c.px(rng.uniform(0.14, 0.17)), c.px(rng.uniform(0.2, 0.24)), s * rng.uniform(5, 15)), "gland", None, 1.2)
        ty, tx = c.at(ly + 0.05, 0.0)
        rt = c.px(rng.uniform(0.1, 0.12))
        c.paint(c.ellipse(ty, tx, rt, rt * 1.1), "muscle")
        c.paint(c.ellipse(ty + 3, tx, rt - 2, rt * 1.1 - 2), "air")
        return ly + rng.uniform(-0.02, 0.02), side * 0.43
    # breast
    c.texture = 0.3
    d_fat = rng.uniform(0.15, 0.25)
    d_gland = d_fat + rng.uniform(0.3, 0.4)
    c.paint(c.layer(0, 0.02), "skin")
    c.paint(c.layer(0.02, d_fat, rng, 0.03), "fat")
    c.paint(c.layer(d_fat, d_gland, rng, 0.04), "gland")
    c.paint(c.layer(d_gland, d_gland + 0.12, rng, 0.02), "muscle")
    c.paint(c.layer(d_gland + 0.12, 1.1), "tissue", None, 0.7)
    return (d_fat + d_gland) / 2, rng.uniform(-0.4, 0.4)


def make_report_image(rng: np.random.Generator, size: int, organ: str, lesion: str) -> np.ndarray:
    """One (size, size) uint8 view of ``organ`` showing ``lesion`` (see the module docstring)."""
    geometry = "sector" if organ == "liver" else "linear"
    c = make_canvas(rng, size, geometry, "convex" if organ == "liver" else None)
    depth, lateral = _organ_scene(c, rng, organ)
    if lesion != "none":
        kind, s = lesion.split("_")
        y, x = c.at(depth, lateral)
        r = c.px(rng.uniform(0.06, 0.08) if s == "small" else rng.uniform(0.13, 0.16))
        if kind == "solid":
            irregular = [(rng.uniform(0.08, 0.15), rng.uniform(0, 6.3)) for _ in range(3)]
            c.paint(c.ellipse(y, x, r * rng.uniform(0.8, 1.1), r, rng.uniform(-30, 30), irregular), "hypo", None, 0.8, atten=2.5)
        else:
            c.paint(c.ellipse(y, x, r, r * rng.uniform(1.0, 1.2)), "fluid")
    return render_bmode(c, rng)


def generate_usreport(
    out: Path, n: int, seed: int, image_size: int, val_fraction: float, language: str = "en", test_fraction: float = 0.0
) -> dict:
    """Write ``n`` two-image cases with templated reports in the release layout under
    ``out/usreport/`` and return the converted datalist (paths relative to ``out``).

    Cases cycle through every (organ, lesion state) pair in a seeded order, so the classes
    are balanced; ``round(n * val_fraction)`` cases (at least one) go to ``val`` and
    ``round(n * test_fraction)`` to ``test``. Options: ``language`` (``en`` or ``zh``),
    ``test_fraction``. Case ``i`` depends only on ``(seed, i)`` and ``n``'s split.
    """
    if n < 2:
        raise ValueError("usreport needs n >= 2 (one training and one validation case)")
    phantom_report("liver", "none", language)  # validates language early
    root = fresh_phantom_dir(Path(out) / "usreport")
    master = np.random.default_rng([seed, 5])
    combos = [(o, l) for o in REPORT_ORGANS for l in REPORT_LESIONS]
    order = np.concatenate([master.permutation(len(combos)) for _ in range(n // len(combos) + 1)])[:n]
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    n_test = min(int(round(n * test_fraction)), n - 1 - n_val)
    split_of = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)[master.permutation(n)]
    annotation: dict[str, list] = {"train": [], "val": [], "test": []}
    for i in range(n):
        organ, lesion = combos[int(order[i])]
        case = f"case{i:04d}"
        paths = []
        for view in range(2):
            rng = np.random.default_rng([seed, 5, i, view])
            save_png(make_report_image(rng, image_size, organ, lesion), root / "images" / case / f"{view}.png")
            paths.append(f"{case}/{view}.png")
        split = str(split_of[i])
        annotation[split].append({"id": case, "report": phantom_report(organ, lesion, language), "image_path": paths, "split": split})
    (root / "annotation.json").write_text(json.dumps(annotation, ensure_ascii=False, indent=1), encoding="utf-8")
    datalist = DATALIST_CONVERTERS["usreport"](root, None, None, seed)
    for key in ("training", "validation", "test"):
        for item in datalist.get(key, []):
            item["images"] = [posixpath.join("usreport", p) for p in item["images"]]
    if not datalist.get("test"):
        datalist.pop("test", None)
    datalist["description"] = (
        f"PHANTOM data (echocare demo-data --task usreport, seed {seed}, language {language}) in the "
        f"R2Gen-style release layout under usreport/: {n} cases of two views, reports templated from the "
        f"organ and lesion shown. Converter: {datalist.get('description', '')}"
    )
    return datalist
