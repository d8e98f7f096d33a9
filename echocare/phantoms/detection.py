"""Fetal four-chamber-view phantoms for ``focus_det``, written in the FOCUS layout.

``echocare demo-data --task focus_det`` (registered in :data:`echocare.phantoms.demo.TASKS`)
draws transverse sections of a fetal thorax with the renderer of
:mod:`echocare.phantoms.renderer` (convex probe, speckle, attenuation): maternal wall, amniotic
fluid, the thorax (lungs brighter than the fluid, a skin line, rib echoes with their
shadows, the spine), and the heart inside it (myocardium, four anechoic chambers divided by
the septa). The cardiothoracic ratio (heart over thorax circumference, Ramanujan) is drawn
uniformly from ``ctr_range``, so it varies from image to image.

Files, as :func:`echocare.datasets.converters.convert_focus` reads them::

    out/focus/train/images/<case>_<n>.png       8-bit grey
    out/focus/train/annotations/<case>_<n>.txt  "thorax cx cy a b angle" and "heart cx cy a b angle"
    out/focus/val/...                           (the same; cases never on both sides)

(pixels, x right, y down, ``a`` the semi-major axis, ``angle`` of the major axis in
degrees from +x towards +y). The returned datalist is the converter's, paths relative to
``out``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from echocare.datasets.converters import FOCUS_CLASSES, ramanujan_perimeter
from echocare.phantoms.renderer import Canvas, save_png, draw_skin_layers, make_canvas, render_bmode
from echocare.phantoms.layout import case_indices, fresh_phantom_dir, rebase_paths, run_converter

__all__ = ["FOCUS_PHANTOM_TAG", "generate_focus_det", "make_focus_image"]

FOCUS_PHANTOM_TAG = 21  # separates this task's random streams from the other phantoms'


def _paint(c: Canvas, mask: np.ndarray, tissue: str, gain: float = 1.0, atten: float | None = None) -> None:
    c.paint(mask, tissue, None, gain, atten)


def _ellipse(c: Canvas, e: list[float], scale: float = 1.0) -> np.ndarray:
    """Filled mask of ellipse ``[cx, cy, a, b, angle]`` (FOCUS convention), semi-axes scaled.

    ``Canvas.ellipse`` turns its ``rx`` axis counter-clockwise on screen, i.e. by minus the
    FOCUS angle (which turns from +x towards +y, y down)."""
    cx, cy, a, b, angle = e
    return c.ellipse(cy, cx, b * scale, a * scale, -angle)


def make_focus_image(
    rng: np.random.Generator,
    size: int = 256,
    ctr_range: tuple[float, float] = (0.38, 0.62),
    thorax_size: tuple[float, float] = (0.22, 0.3),
    depth_range: tuple[float, float] = (0.5, 0.6),
    lateral_range: tuple[float, float] = (-0.15, 0.15),
) -> tuple[np.ndarray, list[float], list[float]]:
    """One four-chamber-like phantom.

    Args:
        rng: random generator.
        size: side in pixels.
        ctr_range: the cardiothoracic ratio is uniform in it.
        thorax_size: the thorax's semi-major axis is uniform in it (fractions of the side).
        depth_range, lateral_range: the thorax centre, as fractions of the imaging depth and
            of the fan's half-width (-1 left edge, 1 right edge), uniform in them.

    Returns:
        ``(image (size, size) uint8, thorax [cx, cy, a, b, angle], heart [cx, cy, a, b, angle])``,
        pixels, FOCUS angle convention, ``a >= b``.
    """
    c = make_canvas(rng, size, "sector", probe="convex")
    c.texture = 0.15
    top = draw_skin_layers(c, rng, muscle=True)
    d_ut = top + rng.uniform(0.05, 0.09)
    _paint(c, c.layer(top, d_ut, rng, 0.02), "muscle", 1.2)  # myometrium
    _paint(c, c.layer(d_ut, 1.1), "fluid")  # amniotic fluid everywhere below
    if rng.random() < 0.5:  # placenta along the anterior wall
        band = c.layer(d_ut, d_ut + rng.uniform(0.06, 0.12), rng, 0.03)
        _paint(c, band & (c.xx < size * rng.uniform(0.3, 0.9)), "gland", 0.9)

    # Thorax: centre inside the fan, semi-axes 22-30 % of the side, any orientation.
    y, x = c.at(rng.uniform(*depth_range), rng.uniform(*lateral_range))
    a_t = size * rng.uniform(*thorax_size)
    b_t = a_t * rng.uniform(0.78, 0.95)
    angle_t = rng.uniform(-90, 90)
    thorax = [x, y, a_t, b_t, angle_t]
    # Fetal body around the thorax (the abdomen/arms beyond it), then the thorax itself.
    _paint(c, _ellipse(c, [x, y, a_t * 1.08, b_t * 1.08, angle_t]), "skin", 0.8)
    _paint(c, _ellipse(c, thorax), "tissue", rng.uniform(1.2, 1.6))  # lungs
    ring = _ellipse(c, thorax) & ~_ellipse(c, thorax, 0.93)
    th = math.radians(angle_t)
    u, v = np.array([math.cos(th), math.sin(th)]), np.array([-math.sin(th), math.cos(th)])
    # Rib echoes: short bright arcs on the chest wall, each casting a partial shadow.
    polar = np.arctan2((c.yy - y) * u[0] - (c.xx - x) * u[1], (c.xx - x) * u[0] + (c.yy - y) * u[1])
    for phi in rng.uniform(-math.pi, math.pi, int(rng.integers(3, 6))):
        arc = ring & (np.abs(np.angle(np.exp(1j * (polar - phi)))) < 0.18)
        _paint(c, arc, "bone", 1.0, atten=rng.uniform(2.0, 4.0))
    # Spine: a bright round echo just inside the posterior wall, on one side of the heart.
    side = -1.0 if rng.random() < 0.5 else 1.0
    spine_at = np.array([x, y]) + side * 0.75 * b_t * v
    _paint(c, c.ellipse(spine_at[1], spine_at[0], 0.12 * b_t, 0.12 * b_t), "bone", 1.0, atten=rng.uniform(3.0, 5.0))

    # Heart: circumference = CTR x thorax circumference; shifted away from the spine.
    ratio = rng.uniform(*ctr_range)
    k = rng.uniform(0.72, 0.92)  # b / a of the heart
    a_h = ratio * ramanujan_perimeter(a_t, b_t) / ramanujan_perimeter(1.0, k)
    b_h = k * a_h
    room = max(b_t - a_h, 0.0)
    shift = -side * rng.uniform(0.15, 0.45) * room * v + rng.uniform(-0.3, 0.3) * max(a_t - a_h, 0.0) * u
    hx, hy = x + shift[0], y + shift[1]
    angle_h = angle_t + rng.uniform(-40, 40)
    heart = [hx, hy, a_h, b_h, (angle_h + 90.0) % 180.0 - 90.0]
    _paint(c, _ellipse(c, heart), "muscle", rng.uniform(1.4, 2.0))  # myocardium
    # Four chambers: anechoic blobs in the quadrants of the heart's own frame.
    hth = math.radians(angle_h)
    hu, hv = np.array([math.cos(hth), math.sin(hth)]), np.array([-math.sin(hth), math.cos(hth)])
    for su in (-1, 1):
        for sv in (-1, 1):
            centre = np.array([hx, hy]) + su * 0.42 * a_h * hu + sv * 0.4 * b_h * hv
            chamber = [centre[0], centre[1], 0.36 * a_h * rng.uniform(0.85, 1.1), 0.33 * b_h * rng.uniform(0.85, 1.1), angle_h]
            _paint(c, _ellipse(c, chamber), "fluid")
    image = render_bmode(c, rng)
    return image, [float(v) for v in thorax], [float(v) for v in heart]


def generate_focus_det(
    out: Path,
    n: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    images_per_case: int = 2,
    ctr_range: tuple[float, float] = (0.38, 0.62),
    thorax_size: tuple[float, float] = (0.22, 0.3),
    depth_range: tuple[float, float] = (0.5, 0.6),
    lateral_range: tuple[float, float] = (-0.15, 0.15),
) -> dict:
    """Write ``n`` four-chamber phantoms in the FOCUS layout under ``out/focus`` and convert them.

    ``ctr_range``, ``thorax_size``, ``depth_range``, ``lateral_range``: see
    :func:`make_focus_image` (a wider spread of positions makes the mean-ellipse baseline
    weak, as in the bundle's tests).

    Cases hold ``images_per_case`` images (lowered so there are at least 4 cases); a
    ``val_fraction`` of the cases (at least one) go to ``val/``, the rest to ``train/``.
    Item ``i`` depends only on ``(seed, case, image in case)``.
    """
    if n < 2:
        raise ValueError("focus_det needs n >= 2 (one case to train on, one to validate)")
    root = fresh_phantom_dir(Path(out) / "focus")
    case_of = case_indices(n, images_per_case, 4)
    cases = sorted(set(case_of))
    order = np.random.default_rng([seed, FOCUS_PHANTOM_TAG, 0]).permutation(cases)
    n_val = min(max(1, int(round(val_fraction * len(cases)))), len(cases) - 1)
    val_cases = {int(k) for k in order[:n_val]}
    image_no: dict[int, int] = {}
    for i in range(n):
        k = case_of[i]
        j = image_no[k] = image_no.get(k, -1) + 1
        rng = np.random.default_rng([seed, FOCUS_PHANTOM_TAG, 1, k, j])
        image, thorax, heart = make_focus_image(
            rng, image_size, tuple(ctr_range), tuple(thorax_size), tuple(depth_range), tuple(lateral_range)
        )
        split = "val" if k in val_cases else "train"
        stem = f"case{k:03d}_{j:02d}"
        save_png(image, root / split / "images" / f"{stem}.png")
        lines = [f"{name} " + " ".join(f"{v:.3f}" for v in e) for name, e in zip(FOCUS_CLASSES, (thorax, heart))]
        (root / split / "annotations").mkdir(parents=True, exist_ok=True)
        (root / split / "annotations" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    dl = rebase_paths(run_converter("focus", root, Path(out), seed), "focus")
    dl["description"] = (
        f"PHANTOM data (echocare demo-data --task focus_det, seed {seed}) in the FOCUS layout under focus/: "
        f"{n} images of {len(cases)} cases, cardiothoracic ratio uniform in {list(ctr_range)}, {n_val} case(s) "
        f"in val/. Converter: {dl.get('description', '')}"
    )
    return dl
