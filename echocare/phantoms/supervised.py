"""Learnable phantoms of the benchmarks that have no redistributable data, written in
each dataset's download layout and converted by its own converter.

``abdomen_seg``, ``musv_seg``, ``thyroid_cls`` and ``fll_cls`` (registered in
:data:`echocare.phantoms.demo.TASKS`, so ``echocare demo-data --task NAME`` and
:func:`echocare.phantoms.generate_demo_data` write them) each

1. draw their scenes with the phantom renderer of :mod:`echocare.phantoms.renderer`
   (tissue maps on a :class:`~echocare.phantoms.renderer.Canvas`, speckle, attenuation, probe
   geometry by :func:`~echocare.phantoms.renderer.render_bmode`);
2. write the files exactly as the official download lays them out, in a folder of their
   own under ``out`` (``out/abdomen/``, ``out/musv/``, ``out/thyroid_cine/``,
   ``out/fll_ceus/``);
3. run the converter of :mod:`echocare.datasets.converters` on that folder (the thyroid
   converter with ``out``, so clips become multi-page TIFFs in ``out/thyroid_cine_clips/``);
4. return its datalist with every path made relative to ``out`` (the bundles'
   ``dataset_dir``), the converter's ``class_names`` kept.

Splits: the converters split 8:2 by patient with a seed; here items are re-split with the
same function (:func:`~echocare.datasets.converters.grouped_split`, ``val_fraction``) using the
first seed from ``seed`` on that puts every class in training and, where the number of
patients allows, in validation too (tiny ``n`` would otherwise leave a class out of
training); the datalist records it as ``split_seed``. A case or patient is never on both
sides and the validation list is never empty.

Each item depends only on ``(seed, task, case, item)``. A folder written here holds a
hidden ``.echocare_phantom`` marker and is replaced on the next run; an existing folder of
the same name without the marker is never touched (``FileExistsError``).

What separates the classes (what a network has to learn):

* abdomen: liver (large, mid-grey, fine texture, small anechoic vessels), kidney (ellipse:
  dark cortex and pyramids, bright central sinus, bright perirenal fat), pancreas
  (elongated band, brighter than liver, coarse texture, splenic vein behind it), bladder
  (anechoic rounded box, bright wall, posterior enhancement), spleen (crescent, brighter
  and more homogeneous than liver). Views: right upper (liver + kidney), left upper
  (spleen + kidney), epigastric (left liver lobe + pancreas), pelvis (bladder).
* Mus-V: artery = round anechoic lumen with a thick bright wall, radius pulsating over
  the frames of a subject; vein = larger oval (wider than tall), thin wall, compressed
  by a varying probe pressure.
* thyroid: malignant nodules are hypoechoic, taller than wide, with a spiculated margin,
  punctate bright microcalcifications and some posterior attenuation; benign ones are
  iso- to hyperechoic, wider than tall, smooth, often with a halo and cystic parts.
* FLL CEUS (one lesion, centred, 40-60 % of the image wide): HCC arterial hyperenhancement then
  washout (darker than the liver late);
  HEM peripheral nodular enhancement filling in centripetally, sustained; FNH early
  central and spoke-wheel enhancement spreading outwards, sustained (central scar late).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from echocare.phantoms.layout import case_indices, describe_phantom, fresh_phantom_dir, rebase_paths, resplit_by_case, run_converter, scanner_settings
from echocare.phantoms.renderer import (
    TISSUES,
    Canvas,
    Tissue,
    save_png,
    draw_skin_layers,
    smooth_noise,
    make_canvas,
    render_bmode,
)

__all__ = [
    "ABDOMEN_CLASSES",
    "ABDOMEN_VIEWS",
    "FLL_CLASSES",
    "MUSV_CLASSES",
    "THYROID_CLASSES",
    "generate_abdomen_seg",
    "generate_fll_cls",
    "generate_musv_seg",
    "generate_thyroid_cls",
    "make_abdomen_image",
    "make_fll_clip",
    "make_musv_frame",
    "make_thyroid_clip",
]

ABDOMEN_CLASSES = ["background", "liver", "kidney", "pancreas", "bladder", "spleen"]
LIVER, KIDNEY, PANCREAS, BLADDER, SPLEEN = 1, 2, 3, 4, 5
#: View -> organs it shows (classes of :data:`ABDOMEN_CLASSES`).
ABDOMEN_VIEWS: dict[str, tuple[int, ...]] = {
    "right_upper": (LIVER, KIDNEY),  # the kidney is out of view in ~15 % of images
    "left_upper": (SPLEEN, KIDNEY),  # idem
    "epigastric": (LIVER, PANCREAS),
    "pelvis": (BLADDER,),
}
MUSV_CLASSES = ["background", "artery", "vein"]
ARTERY, VEIN = 1, 2
THYROID_CLASSES = ["benign", "malignant"]
FLL_CLASSES = ["HCC", "HEM", "FNH"]

_TAG = {"abdomen": 11, "musv": 12, "thyroid": 13, "fll": 14}  # separates the tasks' streams


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**32))


def _mottle(c: Canvas, mask: np.ndarray, rng: np.random.Generator, strength: float, cell: float) -> None:
    """Coarse echogenicity variation inside ``mask`` only (a lobular or granular organ)."""
    noise = smooth_noise(rng, c.size, max(2, int(round(cell))))
    c.echo[mask] *= np.maximum(1.0 + strength * noise[mask], 0.15)


def _random_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float] | None:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    k = int(idx[rng.integers(idx.size)])
    return float(k // mask.shape[1]), float(k % mask.shape[1])


def _angle_of(ty: float, tx: float) -> float:
    """Canvas.ellipse angle (degrees) that lays its ``rx`` axis along screen direction
    (tx, ty) (y down)."""
    return math.degrees(math.atan2(-ty, tx))


# --------------------------------------------------------------------------------------
# Abdomen (liver, kidney, pancreas, bladder, spleen)
# --------------------------------------------------------------------------------------


def _abdomen_patient(rng: np.random.Generator) -> dict:
    """Patient-level properties shared by all images of a case."""
    return {
        "liver": rng.uniform(0.95, 1.1),
        "spleen": rng.uniform(1.4, 1.7),
        "pancreas": rng.uniform(3.2, 4.0),
        "cortex": rng.uniform(0.45, 0.6),
        "bowel": rng.uniform(0.35, 0.5),
        "scale": rng.uniform(0.9, 1.1),
    }


def _paint_liver(c: Canvas, rng, y, x, ry, rx, ang, gain, top, n_vessels) -> np.ndarray:
    irr = [(rng.uniform(0, 0.05), rng.uniform(0, 6.3)) for _ in range(3)]
    liver = c.ellipse(y, x, ry, rx, ang, irr) & c.layer(top, 1.2)
    c.paint(liver, "parenchyma", LIVER, gain)
    c.paint(c.ring(y, x, ry, rx, 1.5, ang, irregular=irr) & liver, "fascia", None, 0.8)  # capsule
    inner = c.ellipse(y, x, ry * 0.8, rx * 0.8, ang) & liver
    for _ in range(n_vessels):  # hepatic / portal branches: part of the liver's mask
        p = _random_point(inner, rng)
        if p is None:
            break
        r = c.px(rng.uniform(0.01, 0.03))
        e, a = rng.uniform(1.0, 2.2), rng.uniform(0, 180)
        if rng.random() < 0.5:
            c.paint(c.ellipse(p[0], p[1], r + 1.5, r * e + 1.5, a) & liver, "fascia", None, 0.9)
        c.paint(c.ellipse(p[0], p[1], r, r * e, a) & liver, "fluid", None)
    return liver


def _paint_kidney(c: Canvas, rng, y, x, ry, rx, ang, cortex) -> None:
    fat = max(2.0, c.px(0.025))
    c.paint(c.ellipse(y, x, ry + fat, rx + fat, ang), "bright", 0, 0.75)  # perirenal fat
    irr = [(rng.uniform(0, 0.04), rng.uniform(0, 6.3))]
    kid = c.ellipse(y, x, ry, rx, ang, irr)
    c.paint(kid, "parenchyma", KIDNEY, cortex)
    a = math.radians(ang)
    for k in range(int(rng.integers(4, 7))):  # pyramids
        phi = 2 * math.pi * (k + rng.uniform(-0.2, 0.2)) / 6
        u, v = 0.62 * rx * math.cos(phi), 0.55 * ry * math.sin(phi)
        py, px_ = y - u * math.sin(a) + v * math.cos(a), x + u * math.cos(a) + v * math.sin(a)
        c.paint(c.ellipse(py, px_, c.px(0.025), c.px(0.03), rng.uniform(0, 180)) & kid, "hypo", KIDNEY, 0.7)
    irr2 = [(rng.uniform(0.05, 0.15), rng.uniform(0, 6.3)) for _ in range(3)]
    c.paint(c.ellipse(y, x, ry * 0.42, rx * 0.55, ang, irr2) & kid, "bright", KIDNEY, rng.uniform(1.1, 1.5))
    c.paint(c.ring(y, x, ry, rx, 1.2, ang, irregular=irr), "fascia", KIDNEY, 0.7)  # capsule


def _view_right_upper(c: Canvas, rng, p: dict, top: float) -> None:
    s = p["scale"]
    y, x = c.at(top + rng.uniform(0.2, 0.27), rng.uniform(-0.5, -0.2))
    liver = _paint_liver(c, rng, y, x, c.px(rng.uniform(0.3, 0.36)) * s, c.px(rng.uniform(0.48, 0.58)) * s,
                         rng.uniform(-25, 0), p["liver"], top, int(rng.integers(3, 7)))
    # Diaphragm: a bright curve behind the liver's deep surface (not labelled).
    dia = c.ring(y, x, c.px(0.36) * s + 5, c.px(0.6) * s + 5, 3, 0) & ~liver & (c.yy > y) & (c.xx < x)
    c.paint(dia, "fascia", 0, 0.9)
    if rng.random() < 0.85:
        ky, kx = c.at(rng.uniform(0.64, 0.72), rng.uniform(0.15, 0.45))
        _paint_kidney(c, rng, ky, kx, c.px(rng.uniform(0.12, 0.15)) * s, c.px(rng.uniform(0.21, 0.26)) * s,
                      rng.uniform(-35, -10), p["cortex"])


def _view_left_upper(c: Canvas, rng, p: dict, top: float) -> None:
    s = p["scale"]
    lat = rng.uniform(-0.45, -0.1)
    y, x = c.at(top + rng.uniform(0.2, 0.26), lat)
    ry, rx, ang = c.px(rng.uniform(0.2, 0.24)) * s, c.px(rng.uniform(0.34, 0.42)) * s, rng.uniform(-20, 5)
    irr = [(rng.uniform(0, 0.04), rng.uniform(0, 6.3)) for _ in range(2)]
    outer = c.ellipse(y, x, ry, rx, ang, irr)
    a = math.radians(ang)
    dv, du = 0.85 * ry, 0.3 * rx  # the concave hilar side faces deep and medial
    iy, ix = y + dv * math.cos(a) - du * math.sin(a), x + dv * math.sin(a) + du * math.cos(a)
    inner = c.ellipse(iy, ix, ry * 0.95, rx * 0.85, ang)
    spleen = outer & ~inner & c.layer(top, 1.2)
    c.paint(c.ring(y, x, ry + 2.5, rx + 2.5, 2.5, ang, irregular=irr) & ~inner, "fascia", 0, 1.0)
    c.paint(spleen, "parenchyma", SPLEEN, p["spleen"])
    edge = c.ring(iy, ix, ry * 0.95 + 3, rx * 0.85 + 3, 3, ang) & ~outer
    for _ in range(int(rng.integers(1, 4))):  # hilar vessels
        q = _random_point(edge, rng)
        if q is not None:
            c.paint(c.ellipse(q[0], q[1], c.px(0.018), c.px(0.03), rng.uniform(0, 180)) & ~spleen, "fluid", 0)
    if rng.random() < 0.85:
        ky, kx = c.at(rng.uniform(0.65, 0.74), lat + rng.uniform(0.5, 0.75))
        _paint_kidney(c, rng, ky, kx, c.px(rng.uniform(0.12, 0.15)) * s, c.px(rng.uniform(0.21, 0.26)) * s,
                      rng.uniform(-40, -15), p["cortex"])


def _view_epigastric(c: Canvas, rng, p: dict, top: float) -> None:
    s = p["scale"]
    y, x = c.at(top + rng.uniform(0.1, 0.15), rng.uniform(-0.3, 0.1))
    _paint_liver(c, rng, y, x, c.px(rng.uniform(0.13, 0.17)) * s, c.px(rng.uniform(0.45, 0.6)) * s,
                 rng.uniform(-8, 8), p["liver"], top, int(rng.integers(1, 3)))
    # Pancreas: a band arched over the great vessels, head (screen left) thickest.
    d0 = top + rng.uniform(0.4, 0.46)
    shift, bend, span = rng.uniform(-0.1, 0.1), rng.uniform(0.03, 0.08), rng.uniform(0.55, 0.7)
    us = np.linspace(-1, 1, 31)
    thick = np.interp(us, [-1, -0.5, 0.3, 1], [0.075, 0.05, 0.045, 0.05]) * rng.uniform(0.9, 1.15)
    pts = [c.at(d0 - bend * (1 - u * u), shift + span * u) for u in us]
    panc = np.zeros_like(c.fov)
    vein = np.zeros_like(c.fov)
    vr = c.px(0.016)
    for k, ((py, px_), th) in enumerate(zip(pts, thick)):
        a, b = pts[max(k - 1, 0)], pts[min(k + 1, len(pts) - 1)]
        ty, tx = b[0] - a[0], b[1] - a[1]
        ang = _angle_of(ty, tx)
        r = c.px(th) * s
        panc |= c.ellipse(py, px_, r, r * 1.7, ang)
        if us[k] > -0.45:  # splenic vein along the posterior border of body and tail
            nrm = math.hypot(ty, tx) or 1.0
            oy, ox = tx / nrm, -ty / nrm  # normal pointing down for a left-to-right tangent
            vein |= c.ellipse(py + oy * (r + vr * 0.5), px_ + ox * (r + vr * 0.5), vr, vr * 2.2, ang)
    c.paint(panc, "parenchyma", PANCREAS, p["pancreas"])
    _mottle(c, panc, rng, 0.45, c.size / 48)
    c.paint(vein, "fluid", 0)
    # Aorta (round, bright wall), IVC (oval) and the vertebral body (bone, shadow) behind.
    ay, ax = c.at(d0 + rng.uniform(0.14, 0.19), shift + rng.uniform(0.05, 0.2))
    ra = c.px(rng.uniform(0.04, 0.05))
    c.paint(c.ellipse(ay, ax, ra + 2, ra + 2), "fascia", 0)
    c.paint(c.ellipse(ay, ax, ra, ra), "fluid", 0)
    vy, vx = ay + rng.uniform(-2, 4), ax - c.px(rng.uniform(0.14, 0.2))
    c.paint(c.ellipse(vy, vx, ra * 0.7, ra * 1.5, rng.uniform(-10, 10)), "fluid", 0)
    sy = ay + ra + c.px(rng.uniform(0.1, 0.14))
    c.paint(c.ellipse(sy + c.px(0.08), ax, c.px(0.08), c.px(0.12)), "bone", 0, atten=30.0)
    if rng.random() < 0.4:  # gas in the stomach or colon, lateral, with a dirty shadow
        # (deeper than the pancreas, so its shadow never hides a labelled organ)
        gy, gx = c.at(d0 + rng.uniform(0.12, 0.2), rng.choice([-1, 1]) * rng.uniform(0.8, 0.95))
        c.paint(c.ellipse(gy, gx, c.px(0.035), c.px(0.06)), "air", 0, atten=rng.uniform(20, 50))


def _view_pelvis(c: Canvas, rng, p: dict, top: float) -> None:
    s = p["scale"]
    y, x = c.at(top + rng.uniform(0.25, 0.32), rng.uniform(-0.15, 0.15))
    ry, rx = c.px(rng.uniform(0.15, 0.21)) * s, c.px(rng.uniform(0.24, 0.33)) * s
    ang, pw = rng.uniform(-10, 10), rng.uniform(2.3, 3.5)
    wall = max(2.0, c.px(0.014))
    c.paint(c.ellipse(y, x, ry + wall, rx + wall, ang, power=pw), "fascia", 0, 1.1)
    c.paint(c.ellipse(y, x, ry, rx, ang, power=pw), "fluid", BLADDER)
    c.paint(c.ellipse(y + ry + wall + c.px(0.09), x, c.px(0.075), c.px(rng.uniform(0.12, 0.18)), ang),
            "parenchyma", 0, 0.8)  # uterus / prostate
    for side in (-1, 1):  # bowel gas lateral to the bladder
        if rng.random() < 0.5:
            by, bx = c.at(rng.uniform(0.3, 0.5), side * rng.uniform(0.82, 0.95))
            c.paint(c.ellipse(by, bx, c.px(0.035), c.px(0.05)), "air", 0, atten=rng.uniform(20, 50))


_ABDOMEN_PAINTERS = {
    "right_upper": _view_right_upper,
    "left_upper": _view_left_upper,
    "epigastric": _view_epigastric,
    "pelvis": _view_pelvis,
}


def make_abdomen_image(
    rng: np.random.Generator, size: int = 256, view: str = "right_upper", patient: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One abdominal image (convex probe) of ``view`` (:data:`ABDOMEN_VIEWS`).

    Returns ``(image, mask)``: uint8 (size, size) each; the mask holds the classes of
    :data:`ABDOMEN_CLASSES` exactly where the organs were painted (0 outside the fan).
    ``patient``: patient-level properties (organ echogenicity, body size) shared by the
    images of a case; drawn from ``rng`` when None.
    """
    if view not in _ABDOMEN_PAINTERS:
        raise ValueError(f"unknown abdomen view {view!r}; known: {sorted(_ABDOMEN_PAINTERS)}")
    p = patient or _abdomen_patient(rng)
    c = make_canvas(rng, size, "sector", "convex")
    c.texture = 0.08
    c.fill("tissue", p["bowel"])  # mesentery, bowel, fat around the organs: darker, blotchy
    _mottle(c, np.ones_like(c.fov), rng, 0.5, size / 14)
    for _ in range(int(rng.integers(8, 16))):  # bowel walls: small bright rings (organs paint over)
        y, x = c.at(rng.uniform(0.1, 1.0), rng.uniform(-1, 1))
        r = c.px(rng.uniform(0.02, 0.05))
        c.paint(c.ring(y, x, r, r * rng.uniform(1, 1.8), 1.5, rng.uniform(0, 180)), "fascia", 0, rng.uniform(0.5, 0.9))
    top = draw_skin_layers(c, rng, muscle=True)
    _ABDOMEN_PAINTERS[view](c, rng, p, top)
    image = render_bmode(c, rng)
    mask = np.where(c.fov, c.label, 0).astype(np.uint8)
    return image, mask


def generate_abdomen_seg(
    out: Path,
    n: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    images_per_case: int = 3,
    views: Sequence[str] | None = None,
) -> dict:
    """Abdominal multi-organ phantoms in the generic abdomen layout (``convert_abdomen``)::

        out/abdomen/images/abd_<i>.png     8-bit grey, image_size x image_size
        out/abdomen/masks/abd_<i>.png      0 bg, 1 liver, 2 kidney, 3 pancreas, 4 bladder, 5 spleen
        out/abdomen/cases.csv              image,case  (P<k>: images_per_case images each)

    Views are cycled (seeded order) over the images, so a case shows several views and
    every organ appears once n >= 4. Options: ``images_per_case`` (default 3; lowered so
    that there are at least 4 cases), ``views`` (subset of :data:`ABDOMEN_VIEWS`).
    """
    if n < 2:
        raise ValueError("abdomen_seg needs n >= 2 (two cases, one to validate)")
    views = list(views or ABDOMEN_VIEWS)
    unknown = set(views) - set(ABDOMEN_VIEWS)
    if unknown:
        raise ValueError(f"unknown abdomen views {sorted(unknown)}; known: {list(ABDOMEN_VIEWS)}")
    root = fresh_phantom_dir(Path(out) / "abdomen")
    master = np.random.default_rng([seed, _TAG["abdomen"]])
    order = [views[k] for k in master.permutation(len(views))]
    case_of = case_indices(n, images_per_case, 4)
    patients = {k: _abdomen_patient(np.random.default_rng([seed, _TAG["abdomen"], 0, k])) for k in set(case_of)}
    classes: dict[str, set] = {}
    rows = ["image,case"]
    for i in range(n):
        rng = np.random.default_rng([seed, _TAG["abdomen"], 1, i])
        image, mask = make_abdomen_image(rng, image_size, order[i % len(order)], patients[case_of[i]])
        name = f"abd_{i:04d}.png"
        save_png(image, root / "images" / name)
        save_png(mask, root / "masks" / name)
        classes[f"images/{name}"] = set(np.unique(mask).tolist()) - {0}
        rows.append(f"{name},P{case_of[i]:03d}")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    dl = run_converter("abdomen", root, Path(out), seed)
    dl = resplit_by_case(dl, seed, val_fraction, lambda it: classes[it["image"]])
    dl = rebase_paths(dl, "abdomen")
    return describe_phantom(dl, "abdomen_seg", "abdomen", seed, f"{n} images of {len(patients)} cases, views {views}.")


# --------------------------------------------------------------------------------------
# Mus-V (artery, vein)
# --------------------------------------------------------------------------------------


def _musv_subject(rng: np.random.Generator) -> dict:
    """Anatomy of one subject, fixed over its frames (only pulsation, pressure and probe
    position change)."""
    return {
        "geo": _seed(rng),
        "scene": _seed(rng),
        "scanner": scanner_settings(rng),
        "depth": rng.uniform(0.4, 0.58),
        "lat": rng.uniform(-0.3, 0.3),
        "r_a": rng.uniform(0.055, 0.075),  # artery lumen radius, fraction of the image side
        "wall": rng.uniform(0.28, 0.38),  # artery wall thickness, fraction of its radius
        "wall_gain": rng.uniform(1.3, 1.7),
        "vein_ratio": rng.uniform(1.5, 1.9),  # vein half-width over the artery radius
        "vein_flat": rng.uniform(0.5, 0.68),  # vein height over width, uncompressed
        "vein_echo": rng.uniform(0.03, 0.08),  # slow flow: faint echoes in the vein
        "side": float(rng.choice([-1.0, 1.0])),
        "vein_dy": rng.uniform(-0.5, 0.2),
        "vein_tilt": rng.uniform(-12, 12),
        "second_vein": bool(rng.random() < 0.25),
        "nerve": bool(rng.random() < 0.5),
        "bone": bool(rng.random() < 0.4),
        "period": rng.uniform(3.0, 6.0),  # frames per cardiac cycle
        "phase": rng.uniform(0, 2 * math.pi),
    }


def make_musv_frame(
    subject: dict, frame: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``frame`` of a subject (see :func:`_musv_subject`): linear probe over muscle,
    an artery (class 1: the lumen) and an accompanying vein (class 2: the lumen).
    ``rng`` draws what changes between frames (probe pressure and position, speckle)."""
    s = subject
    c = make_canvas(np.random.default_rng(s["geo"]), size, "linear")
    srng = np.random.default_rng(s["scene"])
    c.texture = 0.15
    top = draw_skin_layers(c, srng, muscle=False)
    c.paint(c.layer(top, 1.1), "muscle", None, srng.uniform(0.9, 1.2))
    for _ in range(int(srng.integers(6, 12))):  # perimysium: thin oblique bright striations
        y, x = c.at(srng.uniform(top + 0.03, 0.95), srng.uniform(-1, 1))
        c.paint(c.ellipse(y, x, 0.7, c.px(srng.uniform(0.3, 0.7)), srng.uniform(-12, 12)), "fascia", None, 0.5)
    dy, dx = rng.normal(0, 0.006 * size), rng.normal(0, 0.012 * size)
    ay, ax = c.at(s["depth"], s["lat"])
    ay, ax = ay + dy, ax + dx
    pulse = math.sin(2 * math.pi * frame / s["period"] + s["phase"])
    r = c.px(s["r_a"]) * (1 + 0.09 * pulse)
    w = max(2.0, c.px(s["r_a"]) * s["wall"])
    press = rng.uniform(0.55, 1.0)  # 1 = no probe pressure on the vein
    rxv = c.px(s["r_a"]) * s["vein_ratio"] * (1 + 0.3 * (1 - press))
    ryv = rxv * s["vein_flat"] * press
    vy = ay + s["vein_dy"] * r
    vx = ax + s["side"] * (r + w + 2 + rxv)
    # Neurovascular sheath: brighter connective tissue between the muscle bellies.
    sheath_x = (ax + vx) / 2
    c.paint(c.ellipse(ay, sheath_x, r + w + c.px(0.05), abs(vx - ax) / 2 + rxv + c.px(0.07), 0), "bright", 0, 0.45)
    for sign in (-1, 1):  # fascia planes above and below the bundle
        fy = ay + sign * (r + w + c.px(0.06))
        c.paint(c.ellipse(fy, sheath_x, 1.0, c.px(0.8), srng.uniform(-4, 4)), "fascia", 0, 0.8)
    if s["nerve"]:  # honeycomb nerve on the other side of the artery: a distractor
        ny, nx = ay - r * 0.3, ax - s["side"] * (r + w + c.px(0.07))
        rn = c.px(0.045)
        c.paint(c.ellipse(ny, nx, rn, rn * 1.3), "fascia", 0, 0.9)
        nrng = np.random.default_rng(s["scene"] + 1)
        for _ in range(5):
            fy_, fx_ = ny + nrng.uniform(-0.5, 0.5) * rn, nx + nrng.uniform(-0.6, 0.6) * rn
            c.paint(c.ellipse(fy_, fx_, rn * 0.3, rn * 0.3), "hypo", 0, 1.0)
    c.paint(c.ellipse(ay, ax, r + w, r + w), "fascia", 0, s["wall_gain"])  # thick bright wall
    c.paint(c.ellipse(ay, ax, r, r), "fluid", ARTERY)
    vein_tissue = Tissue(s["vein_echo"], 0.05, 0.97)
    veins = [(vy, vx)]
    if s["second_vein"]:  # venae comitantes: a second, smaller vein on the other side
        veins.append((ay + 0.2 * r, ax - s["side"] * (r + w + 2 + 0.7 * rxv)))
    for k, (yy, xx) in enumerate(veins):
        f = 1.0 if k == 0 else 0.7
        c.paint(c.ellipse(yy, xx, ryv * f + 1, rxv * f + 1, s["vein_tilt"]), "fascia", 0, 0.45)  # thin wall
        c.paint(c.ellipse(yy, xx, ryv * f, rxv * f, s["vein_tilt"]), vein_tissue, VEIN)
    if s["bone"]:  # bone surface deep: bright line and shadow
        c.paint(c.layer(0.86, 0.9, srng, 0.02), "bone", 0)
    image = render_bmode(c, rng, **s["scanner"])
    return image, np.where(c.fov, c.label, 0).astype(np.uint8)


def generate_musv_seg(
    out: Path, n: int, seed: int, image_size: int, val_fraction: float, frames_per_subject: int = 4
) -> dict:
    """Artery/vein phantoms in the Mus-V layout (``convert_musv``)::

        out/musv/images/s<subject>_<frame>.png    8-bit grey (linear probe)
        out/musv/masks/s<subject>_<frame>.png     0 bg, 1 artery, 2 vein

    A subject's frames share the anatomy; the artery pulsates, the vein is compressed
    by a varying probe pressure. Option: ``frames_per_subject`` (default 4; lowered so
    that there are at least 4 subjects).
    """
    if n < 2:
        raise ValueError("musv_seg needs n >= 2 (two subjects, one to validate)")
    root = fresh_phantom_dir(Path(out) / "musv")
    subj_of = case_indices(n, frames_per_subject, 4)
    subjects = {k: _musv_subject(np.random.default_rng([seed, _TAG["musv"], 0, k])) for k in set(subj_of)}
    frame_no: dict[int, int] = {}
    for i in range(n):
        k = subj_of[i]
        f = frame_no[k] = frame_no.get(k, -1) + 1
        rng = np.random.default_rng([seed, _TAG["musv"], 1, k, f])
        image, mask = make_musv_frame(subjects[k], f, image_size, rng)
        name = f"s{k:03d}_{f:03d}.png"
        save_png(image, root / "images" / name)
        save_png(mask, root / "masks" / name)
    dl = run_converter("musv", root, Path(out), seed)
    dl = resplit_by_case(dl, seed, val_fraction, lambda it: {ARTERY, VEIN})
    dl = rebase_paths(dl, "musv")
    return describe_phantom(dl, "musv_seg", "musv", seed, f"{n} frames of {len(subjects)} subjects.")


# --------------------------------------------------------------------------------------
# Thyroid cine clips (benign / malignant)
# --------------------------------------------------------------------------------------

_MALIGNANT_DX = [
    "Papillary thyroid carcinoma",
    "Papillary carcinoma, follicular variant",
    "Medullary thyroid carcinoma",
]
_BENIGN_DX = ["Benign", "Benign follicular nodule", "Follicular adenoma", "Colloid nodule", "Nodular hyperplasia"]


def _thyroid_params(rng: np.random.Generator, size: int, malignant: bool, frames: int) -> dict:
    """Everything fixed over one clip: anatomy, the nodule as an ellipsoid, the sweep."""
    ax = rng.uniform(0.08, 0.13) * size if malignant else rng.uniform(0.11, 0.18) * size
    ay = ax * (rng.uniform(1.25, 1.6) if malignant else rng.uniform(0.55, 0.8))
    p = {
        "geo": _seed(rng),
        "scene": _seed(rng),
        "scanner": scanner_settings(rng),
        "malignant": malignant,
        "trachea_dir": float(rng.choice([-1.0, 1.0])),
        "lobe_lat": rng.uniform(-0.15, 0.15),
        "lobe_rx": max(rng.uniform(0.3, 0.4) * size, 1.35 * ax),
        "lobe_ry": max(rng.uniform(0.17, 0.22) * size, 1.3 * ay),
        "lobe_ang": rng.uniform(-8, 8),
        "gland": rng.uniform(1.0, 1.25),
        "ax": ax,
        "ay": ay,
        "az": rng.uniform(0.9, 1.3) * max(ax, ay),
        "ang": rng.uniform(-10, 10),
        "drift": rng.uniform(-0.03, 0.03) * size,
        "z": np.clip(np.linspace(-0.6, 0.6, frames) + rng.uniform(-0.05, 0.05, frames), -0.7, 0.7),
    }
    p["off"] = (rng.uniform(-0.2, 0.2) * (p["lobe_ry"] - ay), rng.uniform(-0.3, 0.3) * (p["lobe_rx"] - ax))
    if malignant:
        p["irr"] = [(rng.uniform(0.0, 0.04), rng.uniform(0, 6.3))] + [
            (rng.uniform(0.03, 0.07 if k < 4 else 0.09), rng.uniform(0, 6.3)) for k in range(3, 10)
        ]
        p["echo"] = rng.uniform(0.55, 1.1)  # x TISSUES["hypo"].echo: 0.17-0.33, gland ~1.5-1.9
        p["atten"] = rng.uniform(1.3, 2.5)  # posterior attenuation
        p["calcs"] = rng.uniform(-0.7, 0.7, (int(rng.integers(5, 11)), 3))  # (u, v, w) in the ellipsoid
        p["composition"], p["halo"] = "solid", False
    else:
        p["irr"] = [(rng.uniform(0.0, 0.03), rng.uniform(0, 6.3)) for _ in range(2)]
        hyper = bool(rng.random() < 0.5)  # relative to the gland: hyperechoic, or isoechoic with a halo
        p["echo"] = rng.uniform(1.4, 2.0) if hyper else rng.uniform(0.95, 1.15)
        p["atten"] = None
        p["calcs"] = np.zeros((0, 3))
        p["halo"] = bool(rng.random() < 0.4) if hyper else True
        p["mottle"] = _seed(rng)
        p["composition"] = str(rng.choice(["solid", "mixed", "spongiform"], p=[0.55, 0.3, 0.15]))
        p["cyst"] = (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.35, 0.55), rng.uniform(0.35, 0.55))
        p["microcysts"] = rng.uniform(-0.6, 0.6, (int(rng.integers(5, 10)), 2))
    return p


def _paint_thyroid_frame(c: Canvas, p: dict, z: float) -> None:
    """Transverse slice ``z`` (-1..1 along the nodule's length) of the lobe sweep."""
    srng = np.random.default_rng(p["scene"])
    c.texture = 0.1
    c.fill("tissue", srng.uniform(0.55, 0.7))
    top = draw_skin_layers(c, srng, muscle=True)  # the muscle layer stands for the strap muscles
    shift = p["drift"] * z
    s_l = 1.0 - 0.08 * z * z
    ly0, lx = c.at(top, p["lobe_lat"])
    ly = ly0 + p["lobe_ry"] + c.px(0.03)
    lx += shift
    rx_l, ry_l = p["lobe_rx"] * s_l, p["lobe_ry"] * s_l
    td = p["trachea_dir"]
    # Carotid (round, bright wall) and jugular (oval) lateral to the lobe; trachea medial.
    rc = c.px(srng.uniform(0.06, 0.075))
    cy, cx = ly + 0.35 * ry_l, lx - td * (rx_l + rc + 3)
    c.paint(c.ellipse(cy, cx, rc + 2.5, rc + 2.5), "fascia", 0)
    c.paint(c.ellipse(cy, cx, rc, rc), "fluid", 0)
    c.paint(c.ellipse(cy - rc, cx - td * rc * 1.2, rc * 0.55, rc * 1.3), "fluid", 0)
    rt = c.px(srng.uniform(0.07, 0.09))
    ty, tx = ly + 0.1 * ry_l, lx + td * (rx_l + rt)  # its shadow stays off the lobe
    c.paint(c.ellipse(ty, tx, rt, rt * 1.1), "muscle", 0)
    c.paint(c.ellipse(ty + 3, tx, rt - 3, rt * 1.1 - 3), "air", 0)
    c.paint(c.ellipse(ly, lx, ry_l + 2, rx_l + 2, p["lobe_ang"]), "fascia", 0, 0.8)  # capsule
    c.paint(c.ellipse(ly, lx, ry_l, rx_l, p["lobe_ang"]), "gland", 0, p["gland"])
    # The nodule: an ellipsoid cut at z.
    s = math.sqrt(max(1.0 - z * z, 0.05))
    ny, nx = ly + p["off"][0], lx + p["off"][1]
    ry, rx = p["ay"] * s, p["ax"] * s
    nod = c.ellipse(ny, nx, ry, rx, p["ang"], p["irr"])
    a = math.radians(p["ang"])

    def at(u: float, v: float) -> tuple[float, float]:  # nodule coordinates -> pixels
        return ny - u * rx * math.sin(a) + v * ry * math.cos(a), nx + u * rx * math.cos(a) + v * ry * math.sin(a)

    if p["malignant"]:
        c.paint(nod, "hypo", 1, p["echo"], atten=p["atten"])
        rd = max(1.0, c.px(0.009))
        for u, v, w in p["calcs"]:  # punctate echogenic foci, no shadow
            if abs(w - z) < 0.2 and u * u + v * v < 0.6:
                yy, xx = at(u, v)
                c.paint(c.ellipse(yy, xx, rd, rd) & nod, Tissue(TISSUES["bright"].echo * 1.6, 1.2, 1.0), 1)
    else:
        c.paint(nod, "gland", 1, p["gland"] * p["echo"])
        _mottle(c, nod, np.random.default_rng(p["mottle"]), 0.35, c.size / 40)  # coarser than the gland
        if p["composition"] == "mixed":
            cu, cv, fu, fv = p["cyst"]
            yy, xx = at(cu, cv)
            c.paint(c.ellipse(yy, xx, ry * fv, rx * fu, p["ang"]) & nod, "fluid", 1)
        elif p["composition"] == "spongiform":
            for u, v in p["microcysts"]:
                yy, xx = at(u, v)
                r = max(1.5, 0.12 * min(rx, ry))
                c.paint(c.ellipse(yy, xx, r, r * 1.2) & nod, "fluid", 1)
        if p["halo"]:
            c.paint(c.ring(ny, nx, ry, rx, max(2.0, c.px(0.018)), p["ang"], irregular=p["irr"]), "hypo", 1, 0.7)


def make_thyroid_clip(
    rng: np.random.Generator, size: int = 256, frames: int = 8, malignant: bool = False
) -> tuple[np.ndarray, np.ndarray, dict]:
    """A transverse sweep over one thyroid lobe with a nodule (linear probe).

    Returns ``(images, masks, params)``: uint8 (frames, size, size), masks 0/255 (the
    nodule's cross-section in each frame), and the clip's parameters (nodule semi-axes in
    pixels ``ax`` horizontal, ``ay`` vertical, ``az`` along the sweep, ``composition``,
    ``halo``, ...).
    """
    p = _thyroid_params(rng, size, malignant, frames)
    images, masks = [], []
    for k, z in enumerate(p["z"]):
        c = make_canvas(np.random.default_rng(p["geo"]), size, "linear")
        _paint_thyroid_frame(c, p, float(z))
        images.append(render_bmode(c, np.random.default_rng([p["scene"], k]), **p["scanner"]))
        masks.append(np.where(c.fov & (c.label == 1), 255, 0).astype(np.uint8))
    return np.stack(images), np.stack(masks), p


def _tirads(p: dict) -> dict:
    """ACR TI-RADS descriptors and level of a clip's nodule as drawn."""
    if p["malignant"]:
        comp, cp = "solid", 2
        echo, ep = ("very hypoechoic", 3) if p["echo"] < 0.8 else ("hypoechoic", 2)
        shape, sp, margin, mp = "taller-than-wide", 3, "lobulated or irregular", 2
        foci, fp = "punctate echogenic foci", 3
    else:
        comp, cp = {
            "solid": ("solid", 2),
            "mixed": ("mixed cystic and solid", 1),
            "spongiform": ("spongiform", 0),
        }[p["composition"]]
        echo, ep = ("hyperechoic", 1) if p["echo"] > 1.3 else ("isoechoic", 1)
        shape, sp, margin, mp, foci, fp = "wider-than-tall", 0, "smooth", 0, "none", 0
    pts = cp + ep + sp + mp + fp
    level = 1 if pts == 0 else 2 if pts <= 2 else 3 if pts == 3 else 4 if pts <= 6 else 5
    return {
        "ti-rads_composition": comp,
        "ti-rads_echogenicity": echo,
        "ti-rads_shape": shape,
        "ti-rads_margin": margin,
        "ti-rads_echogenicfoci": foci,
        "ti-rads_level": level,
    }


def generate_thyroid_cls(
    out: Path,
    n: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    frames: int = 8,
    clips_per_patient: int = 2,
) -> dict:
    """Thyroid nodule cine clips in the Stanford AIMI layout (``convert_thyroid_cine``)::

        out/thyroid_cine/dataset.hdf5   image (N, H, W) uint8, mask (N, H, W) 0/255,
                                        annot_id (N,) bytes b"<patient>_" (first clip of a
                                        patient) or b"<patient>_<k>", frame_num (N,)
        out/thyroid_cine/metadata.csv   annot_id, sex, age, location, size_x, size_y, size_z
                                        (cm), ti-rads_composition, ..._echogenicity, ..._shape,
                                        ..._margin, ..._echogenicfoci, ti-rads_level,
                                        histopath_diagnosis (text the converter maps)

    converted with ``out`` so each clip is ``out/thyroid_cine_clips/<annot_id>.tif``
    (multi-page, one page per frame; ``<annot_id>_mask.tif`` beside it): the datalist's
    ``image`` is the clip. ``n`` clips; patients alternate benign/malignant (all clips of
    a patient share the class). Options: ``frames`` per clip (default 8),
    ``clips_per_patient`` (default 2; lowered so there are at least 4 patients).
    """
    import h5py

    if n < 3:
        raise ValueError("thyroid_cls needs n >= 3 (both classes in training and one patient to validate)")
    root = fresh_phantom_dir(Path(out) / "thyroid_cine")
    fresh_phantom_dir(Path(out) / "thyroid_cine_clips")
    master = np.random.default_rng([seed, _TAG["thyroid"]])
    first = int(master.integers(2))
    pat_of = case_indices(n, clips_per_patient, 4)
    mm_per_px = 40.0 / image_size  # a 4 cm deep field of view
    images, masks, ids, frame_num = [], [], [], []
    meta = []
    clip_k: dict[int, int] = {}
    for i in range(n):
        pidx = pat_of[i]
        k = clip_k[pidx] = clip_k.get(pidx, -1) + 1
        malignant = bool((pidx + first) % 2)
        prng = np.random.default_rng([seed, _TAG["thyroid"], 0, pidx])
        sex, age = ("F" if prng.random() < 0.75 else "M"), int(prng.integers(22, 82))
        pid = 10 + 3 * pidx + int(prng.integers(3))  # real ids are sparse integers
        aid = f"{pid}_" if k == 0 else f"{pid}_{k}"
        rng = np.random.default_rng([seed, _TAG["thyroid"], 1, pidx, k])
        clip, mclip, p = make_thyroid_clip(rng, image_size, frames, malignant)
        images.append(clip)
        masks.append(mclip)
        ids += [aid] * frames
        frame_num += list(range(frames))
        dx = _MALIGNANT_DX if malignant else _BENIGN_DX
        meta.append(
            {
                "annot_id": aid,
                "sex": sex,
                "age": age,
                "location": "right" if p["trachea_dir"] > 0 else "left",  # the trachea is medial
                "size_x": round(2 * p["ax"] * mm_per_px / 10, 2),
                "size_y": round(2 * p["ay"] * mm_per_px / 10, 2),
                "size_z": round(2 * p["az"] * mm_per_px / 10, 2),
                **_tirads(p),
                "histopath_diagnosis": dx[int(rng.integers(len(dx)))],
            }
        )
    with h5py.File(root / "dataset.hdf5", "w") as f:
        kw = {"compression": "gzip", "compression_opts": 4, "chunks": (1, image_size, image_size), "track_times": False}
        f.create_dataset("image", data=np.concatenate(images), **kw)
        f.create_dataset("mask", data=np.concatenate(masks), **kw)
        f.create_dataset("annot_id", data=np.array(ids, dtype="S"), track_times=False)
        f.create_dataset("frame_num", data=np.array(frame_num, dtype=np.int64), track_times=False)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(meta[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(meta)
    (root / "metadata.csv").write_text(buf.getvalue())
    dl = run_converter("thyroid_cine", root, Path(out), seed)
    dl = resplit_by_case(dl, seed, val_fraction, lambda it: {it["label"]})
    dl = rebase_paths(dl, "thyroid_cine")
    return describe_phantom(
        dl, "thyroid_cls", "thyroid_cine", seed,
        f"{n} clips of {frames} frames, {len(set(pat_of))} patients; clips exported to thyroid_cine_clips/.",
    )


# --------------------------------------------------------------------------------------
# Focal liver lesions on contrast-enhanced ultrasound (HCC / HEM / FNH)
# --------------------------------------------------------------------------------------


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def make_fll_clip(
    rng: np.random.Generator, size: int = 128, frames: int = 12, kind: str = "HCC"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A contrast-mode CEUS clip of a liver lesion (convex probe), from before the
    bubbles arrive (black) through the arterial, portal and late phases.

    The canvas's backscatter is the microbubble concentration (tissue signal suppressed);
    the liver enhances slowly (portal supply), vessels early and brightly, the lesion by
    its class (``kind`` in :data:`FLL_CLASSES`):

    * HCC: arterial hyperenhancement (whole lesion, early), then washout below the liver.
    * HEM: peripheral nodular enhancement at the rim, filling in centripetally; sustained.
    * FNH: central (spoke-wheel) enhancement, early, spreading outwards; sustained, with a
      dark central scar late.

    Returns ``(clip, lesion, times)``: uint8 (frames, size, size), the lesion mask (size,
    size) bool and the time of each frame (0..1 of the examination).
    """
    if kind not in FLL_CLASSES:
        raise ValueError(f"unknown lesion kind {kind!r}; known: {FLL_CLASSES}")
    geo = _seed(rng)
    c = make_canvas(np.random.default_rng(geo), size, "sector", "convex")
    c.texture = 0.0
    c.atten[:] = 1.0
    c.imped[:] = 1.0
    # Contrast mode: a narrower displayed range (tissue without bubbles stays black).
    scanner = scanner_settings(rng, atten_db=(15.0, 25.0), saturation_db=(6.0, 10.0), dynamic_range_db=(30.0, 36.0))
    # The examiner centres the lesion and sets the depth on it (a CEUS examination follows one
    # lesion), so it fills a good part of the view; a small lesion anywhere in the sector left the
    # tiny test network nothing to learn from 20 clips (it memorised vessels and speckle).
    ly, lx = c.at(rng.uniform(0.45, 0.55), rng.uniform(-0.15, 0.15))
    R = rng.uniform(0.2, 0.3) * size
    ell, ang = rng.uniform(0.85, 1.15), math.radians(rng.uniform(0, 180))
    dy, dx = c.yy - ly, c.xx - lx
    u = (dx * math.cos(ang) - dy * math.sin(ang)) / R
    v = (dx * math.sin(ang) + dy * math.cos(ang)) / (R * ell)
    phi = np.arctan2(v, u)
    rho = np.sqrt(u * u + v * v) / (1 + 0.04 * np.cos(3 * phi + rng.uniform(0, 6.3)))
    lesion = (rho <= 1) & c.fov
    het = np.maximum(1 + 0.15 * smooth_noise(rng, size, max(4, size // 16)), 0.3)
    het_l = np.maximum(1 + 0.2 * smooth_noise(rng, size, max(2, size // 40)), 0.3)
    vessels = np.zeros_like(c.fov)
    for _ in range(int(rng.integers(2, 5))):  # portal / hepatic branches
        vy, vx = c.at(rng.uniform(0.15, 0.9), rng.uniform(-0.9, 0.9))
        vessels |= c.ellipse(vy, vx, c.px(rng.uniform(0.008, 0.015)), c.px(rng.uniform(0.1, 0.25)), rng.uniform(0, 180))
    vessels &= rho > 1.3
    outside = np.zeros_like(c.fov)
    if rng.random() < 0.5:  # diaphragm and lung, or kidney, deep: no bubbles in the liver's sense
        oy, ox = c.at(rng.uniform(1.0, 1.2), rng.uniform(-0.6, 0.6))
        outside = c.ellipse(oy + c.px(0.5), ox, c.px(0.62), c.px(0.9)) & (rho > 1.4)
    a = rng.uniform(0.06, 0.1)  # bubble arrival
    # Denser early, as recordings are: the arterial phase lasts seconds, the late phase minutes.
    times = 0.03 + 0.95 * (np.arange(frames) / max(frames - 1, 1)) ** 1.5
    peak = rng.uniform(1.0, 1.4)
    if kind == "HCC":
        tau = rng.uniform(0.2, 0.33)
    elif kind == "HEM":
        k_nod, ph, D = int(rng.integers(4, 8)), rng.uniform(0, 6.3), rng.uniform(0.55, 0.75)
        m = 0.5 + 0.5 * np.cos(k_nod * phi + ph)
    else:
        n_sp, ph, G = int(rng.integers(4, 7)), rng.uniform(0, 6.3), rng.uniform(0.12, 0.2)
        spoke = np.maximum(np.cos(n_sp * phi + ph), 0) ** 8
        scar = rho < rng.uniform(0.12, 0.18)
    clip = []
    for k, t in enumerate(times):
        arr = lambda d, w: float(_sig((t - a - d) / w))  # noqa: E731
        liver = 0.02 + 0.05 * arr(0.05, 0.03) + 0.45 * arr(0.25, 0.07)  # mostly portal supply
        perf = (liver * het).astype(np.float32)
        perf[vessels] = 0.02 + 1.2 * arr(0.0, 0.02) * (1 - 0.3 * arr(0.4, 0.1))
        perf[outside] = 0.01
        if kind == "HCC":
            les = 0.02 + peak * arr(0.02, 0.02) * math.exp(-max(0.0, t - a - 0.15) / tau) * het_l
        elif kind == "HEM":
            f = min(max((t - a - 0.03) / D, 0.0), 1.0)
            depth = 0.95 * f * (0.7 + 0.3 * m) + 0.2 * m * arr(0.03, 0.02)
            val = peak * arr(0.03, 0.02) * (1 - 0.15 * min(max(t - 0.5, 0.0), 1.0))
            les = np.where(1 - rho < depth, val * het_l, 0.02)
        else:
            g = min(max((t - a) / G, 0.0), 1.0)
            on = (rho < 1.05 * g) | ((spoke > 0.35) & (rho < 2.5 * g)) | ((rho < 0.15) & (t > a))
            val = peak * arr(0.0, 0.015) * (1 - 0.3 * min(max((t - a - 0.2) / 0.5, 0.0), 1.0))
            les = np.where(on, val * het_l, 0.02)
            if t > a + 0.35:
                les = np.where(scar, 0.08, les)
        perf[lesion] = np.broadcast_to(les, perf.shape)[lesion]
        c.echo = perf
        clip.append(render_bmode(c, np.random.default_rng([geo, k]), **scanner))
    return np.stack(clip), lesion, times


def _write_mp4(frames: np.ndarray, path: Path, fps: int = 8) -> None:
    """Grey frames (T, H, W) uint8 -> H.264 MP4 (near-lossless, single-threaded so the
    bytes are reproducible)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "8", "preset": "medium", "threads": "1"}
        stream.codec_context.thread_count = 1
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.repeat(f[..., None], 3, axis=-1), format="rgb24")
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def generate_fll_cls(
    out: Path,
    n: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    frames: int = 12,
    clips_per_patient: int = 1,
    clip_format: str = "mixed",
    fps: int = 8,
) -> dict:
    """Focal liver lesion CEUS clips in the class-folder layout (``convert_fll_ceus``)::

        out/fll_ceus/HCC/P<patient>_lesion<k>.mp4            an H.264 video, or
        out/fll_ceus/HEM/P<patient>_lesion<k>/<frame>.png    a folder of 8-bit frames
        out/fll_ceus/FNH/...

    ``n`` clips; patients cycle through HCC, HEM, FNH (seeded order; a patient's lesions
    share the class). Options: ``frames`` per clip (default 12), ``clips_per_patient``
    (default 1), ``clip_format`` ``"mixed"`` (even clips MP4, odd clips frame folders),
    ``"mp4"`` or ``"png"``, ``fps`` of the MP4s. ``image_size`` must be even (H.264).
    Note: :func:`echocare.io.read_ultrasound` reads files, so a frame folder is read
    frame by frame; ``clip_format="mp4"`` gives one readable file per item.
    """
    if clip_format not in ("mixed", "mp4", "png"):
        raise ValueError(f"clip_format must be 'mixed', 'mp4' or 'png', got {clip_format!r}")
    if image_size % 2:
        raise ValueError(f"fll_cls needs an even image_size (H.264), got {image_size}")
    if n < 4:
        raise ValueError("fll_cls needs n >= 4 (every class in training and one patient to validate)")
    root = fresh_phantom_dir(Path(out) / "fll_ceus")
    master = np.random.default_rng([seed, _TAG["fll"]])
    order = [FLL_CLASSES[k] for k in master.permutation(len(FLL_CLASSES))]
    pat_of = case_indices(n, clips_per_patient, 6)
    lesion_k: dict[int, int] = {}
    for i in range(n):
        pidx = pat_of[i]
        k = lesion_k[pidx] = lesion_k.get(pidx, 0) + 1
        kind = order[pidx % len(order)]
        rng = np.random.default_rng([seed, _TAG["fll"], 1, pidx, k])
        clip, _, _ = make_fll_clip(rng, image_size, frames, kind)
        stem = f"P{pidx:03d}_lesion{k}"
        as_mp4 = clip_format == "mp4" or (clip_format == "mixed" and i % 2 == 0)
        if as_mp4:
            _write_mp4(clip, root / kind / f"{stem}.mp4", fps)
        else:
            for t, frame in enumerate(clip):
                save_png(frame, root / kind / stem / f"{t:04d}.png")
    dl = run_converter("fll_ceus", root, Path(out), seed)
    dl = resplit_by_case(dl, seed, val_fraction, lambda it: {it["label"]})
    dl = rebase_paths(dl, "fll_ceus")
    return describe_phantom(
        dl, "fll_cls", "fll_ceus", seed,
        f"{n} clips of {frames} frames ({clip_format}), {len(set(pat_of))} patients.",
    )
