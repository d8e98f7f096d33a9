"""Fetal brain landmark phantoms (``echocare demo-data --task brain_landmark``).

Axial fetal head scenes drawn on the phantom renderer of :mod:`echocare.phantoms.renderer`
(the ``fetus/fetal head`` scene: maternal wall, amniotic fluid, skull ring, brain, midline
echo, thalami) with the structures that carry the 24 landmarks of
:data:`BRAIN_LANDMARK_NAMES` added inside: the cavum septi pellucidi (anechoic box on the
midline, anterior third), the lateral ventricles (thin anechoic bands parallel to the
midline, widening into the atria posteriorly) with the bright choroid plexus in each
atrium, the cerebellar hemispheres and vermis in the posterior fossa and the cisterna
magna (fluid) behind them. The midline echo (falx) runs from the frontal bone to the
posterior fossa. Every landmark is an end, tip or centre of a visible structure.

Head coordinates: ``u`` along the fronto-occipital axis (+1 = the anterior end of the
outer skull), ``v`` across it (+1 = the hemisphere nearer the probe), in units of the
outer semi-axes. The head faces left or right at random (``facing``), so which skull end
is anterior is told by the content (cavum and thalami anterior, cerebellum posterior),
not by the position; "near" is the hemisphere closer to the probe (the head is rotated
by at most 40 degrees, so near is always the upper one).

Written in the layout :func:`echocare.datasets.converters.convert_brain_landmark` reads::

    out/brain_landmark/images/bl_<i>.png    8-bit grey, image_size x image_size
    out/brain_landmark/landmarks.csv        image,case,x1,y1,...,x24,y24 (pixels, 2 decimals)

then converted by it; the datalist keeps the converter's split (by case), re-split like
the other phantoms, and names the landmarks anatomically (``landmark_names``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from echocare.phantoms.renderer import (
    LABEL_BRIGHT,
    LABEL_FLUID,
    Canvas,
    draw_fetal_head,
    save_png,
    make_canvas,
    render_bmode,
)
from echocare.phantoms.layout import case_indices, describe_phantom, fresh_phantom_dir, rebase_paths, resplit_by_case, run_converter
from echocare.tasks.landmarks.data import BRAIN_LANDMARK_NAMES

__all__ = ["BRAIN_LANDMARK_NAMES", "generate_brain_landmark", "make_brain_landmark_image"]

_TAG = 15  # separates this phantom's random streams from the other tasks'

#: (u, v) head coordinates of each landmark of :data:`BRAIN_LANDMARK_NAMES`, as fractions of
#: the inner semi-axes (outer ones for the outer skull table and the thalami, which the base
#: scene places on them).
_LANDMARK_UV: dict[str, tuple[float, float]] = {
    "skull_outer_anterior": (1.0, 0.0),
    "skull_outer_posterior": (-1.0, 0.0),
    "skull_outer_near": (0.0, 1.0),
    "skull_outer_far": (0.0, -1.0),
    "skull_inner_anterior": (1.0, 0.0),
    "skull_inner_posterior": (-1.0, 0.0),
    "skull_inner_near": (0.0, 1.0),
    "skull_inner_far": (0.0, -1.0),
    "falx_anterior": (0.86, 0.0),
    "falx_posterior": (-0.46, 0.0),
    "csp_anterior": (0.52, 0.0),
    "csp_posterior": (0.26, 0.0),
    "thalamus_near": (0.0, 0.18),
    "thalamus_far": (0.0, -0.18),
    "frontal_horn_near": (0.58, 0.36),
    "frontal_horn_far": (0.58, -0.36),
    "atrium_near": (-0.58, 0.36),
    "atrium_far": (-0.58, -0.36),
    "choroid_plexus_near": (-0.40, 0.36),
    "choroid_plexus_far": (-0.40, -0.36),
    "cerebellum_near": (-0.64, 0.15),
    "cerebellum_far": (-0.64, -0.15),
    "vermis": (-0.66, 0.0),
    "cisterna_magna": (-0.84, 0.0),
}
#: The landmarks in datalist order (the column order of landmarks.csv), with their coordinates.
_LANDMARKS: list[tuple[str, float, float]] = [(name, *_LANDMARK_UV[name]) for name in BRAIN_LANDMARK_NAMES]


def _head_frame(head: dict, facing: int):
    """Screen (x, y) of head coordinates: ``to_screen(u, v, ru, rv)`` with ``u``/``v``
    scaled by the semi-axes ``ru``/``rv`` (pixels)."""
    a = math.radians(head["angle"])
    # Canvas.ellipse's rx axis points along (cos a, -sin a) on screen, its ry axis along
    # (sin a, cos a) (downwards when a = 0): anterior = facing * rx axis, near = up.
    ux, uy = facing * math.cos(a), -facing * math.sin(a)
    vx, vy = -math.sin(a), -math.cos(a)

    def to_screen(u: float, v: float, ru: float, rv: float) -> tuple[float, float]:
        return head["x"] + u * ru * ux + v * rv * vx, head["y"] + u * ru * uy + v * rv * vy

    return to_screen


def _paint_brain(c: Canvas, rng: np.random.Generator, head: dict, facing: int) -> None:
    """Shorten the midline echo to the falx and add the cavum, ventricles, choroid plexus,
    cerebellum and cisterna magna (all in head coordinates of the inner skull)."""
    to_screen = _head_frame(head, facing)
    ri, rj = head["rx"] - head["thickness"], head["ry"] - head["thickness"]  # inner semi-axes
    ang = head["angle"]

    def blob(u, v, su, sv, tissue, label=None, gain=1.0):
        x, y = to_screen(u, v, ri, rj)
        c.paint(c.ellipse(y, x, sv * rj, su * ri, ang), tissue, label, gain)

    # The base scene's midline echo spans the whole head: brain again beyond the falx ends.
    for u0, u1 in ((0.86, 1.0), (-1.0, -0.46)):
        blob((u0 + u1) / 2, 0.0, (u1 - u0) / 2, 0.06, "hypo", None, head["brain_gain"])
    # Posterior fossa: cerebellar hemispheres (brighter than brain), vermis (bright), cisterna magna.
    for s in (-1, 1):
        blob(-0.64, 0.15 * s, 0.13, 0.12, "parenchyma", None, rng.uniform(1.0, 1.4))
    blob(-0.66, 0.0, 0.07, 0.05, "bright", LABEL_BRIGHT, rng.uniform(0.8, 1.2))
    blob(-0.84, 0.0, 0.06, 0.13, "fluid", LABEL_FLUID)
    # Lateral ventricles: thin bands from the frontal horn tip (u 0.58) back to the atrium
    # (wider, posterior tip u -0.58) holding the choroid plexus.
    for s in (-1, 1):
        blob(0.1, 0.36 * s, 0.48, 0.035, "fluid", LABEL_FLUID)
        blob(-0.45, 0.36 * s, 0.13, 0.09, "fluid", LABEL_FLUID)
        blob(-0.40, 0.36 * s, 0.055, 0.06, "bright", LABEL_BRIGHT, rng.uniform(0.9, 1.3))
    # Cavum septi pellucidi: anechoic box on the midline between u 0.26 and 0.52.
    blob(0.39, 0.0, 0.13, 0.07, "fluid", LABEL_FLUID)


def make_brain_landmark_image(
    rng: np.random.Generator, size: int = 256, facing: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One fetal head phantom and its 24 landmarks.

    Args:
        rng: random generator (the same state gives the same image).
        size: side length in pixels.
        facing: +1 anterior to the right of the head's rotated axis, -1 to the left;
            random when None.

    Returns:
        ``(image, landmarks)``: uint8 (size, size) image; (24, 2) float64 (x, y) pixels
        in the order of :data:`BRAIN_LANDMARK_NAMES`.
    """
    facing = int(facing if facing is not None else (1 if rng.random() < 0.5 else -1))
    if facing not in (-1, 1):
        raise ValueError(f"facing must be +1 or -1, got {facing}")
    c = make_canvas(rng, size, "sector", "convex")
    head = draw_fetal_head(c, rng)
    _paint_brain(c, rng, head, facing)
    image = render_bmode(c, rng)
    to_screen = _head_frame(head, facing)
    th = head["thickness"]
    points = []
    for name, u, v in _LANDMARKS:
        if name.startswith(("skull_outer", "thalamus")):  # the base scene draws thalami on the outer axes
            points.append(to_screen(u, v, head["rx"], head["ry"]))
        else:  # everything else is inside the inner table
            points.append(to_screen(u, v, head["rx"] - th, head["ry"] - th))
    return image, np.asarray(points, dtype=np.float64)


def generate_brain_landmark(
    out: Path,
    n: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    images_per_case: int = 2,
    facing: int | None = None,
) -> dict:
    """Fetal brain landmark phantoms in ``out/brain_landmark/`` (see the module docstring),
    converted by ``convert_brain_landmark`` and re-split by case. Options:
    ``images_per_case`` (default 2; lowered so there are at least 4 cases), ``facing``
    (+1/-1 for all images; default random per image)."""
    if n < 2:
        raise ValueError("brain_landmark needs n >= 2 (two cases, one to validate)")
    root = fresh_phantom_dir(Path(out) / "brain_landmark")
    case_of = case_indices(n, images_per_case, 4)
    header = ["image", "case"] + [f"{a}{k + 1}" for k in range(len(_LANDMARKS)) for a in ("x", "y")]
    rows = [",".join(header)]
    for i in range(n):
        rng = np.random.default_rng([seed, _TAG, i])
        image, points = make_brain_landmark_image(rng, image_size, facing)
        name = f"bl_{i:04d}.png"
        save_png(image, root / "images" / name)
        rows.append(",".join([name, f"F{case_of[i]:03d}", *(f"{v:.2f}" for v in points.reshape(-1))]))
    (root / "landmarks.csv").write_text("\n".join(rows) + "\n")
    dl = run_converter("brain_landmark", root, Path(out), seed)
    dl = resplit_by_case(dl, seed, val_fraction, lambda it: set())
    dl = rebase_paths(dl, "brain_landmark")
    dl["landmark_names"] = list(BRAIN_LANDMARK_NAMES)
    return describe_phantom(dl, "brain_landmark", "brain_landmark", seed,
                     f"{n} axial fetal head images of {len(set(case_of))} cases, 24 landmarks.")
