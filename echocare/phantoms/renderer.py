"""Synthetic ultrasound-like phantoms: the embedded default data for the demo and tests.

A phantom is drawn in two steps:

1. A *scene recipe* (one per anatomy path, see :data:`SCENE_RECIPES`) paints tissue
   property maps on a :class:`Canvas`: backscatter amplitude (how much a tissue scatters,
   relative to normal soft tissue), attenuation (relative to soft tissue; fluid barely
   attenuates, bone and air almost stop the beam), acoustic impedance (whose jumps give
   specular reflections) and an integer label mask of the organ-like structures.
2. :func:`render_bmode` turns those maps into a B-mode image the way a scanner would:
   a Rayleigh speckle envelope (magnitude of a complex Gaussian field smoothed
   anisotropically on the beam grid, i.e. the axial/lateral resolution cell) multiplies
   the backscatter; specular echoes appear where the impedance changes along the beam;
   the beam loses energy with the attenuation integrated along each ray (so fluid gives
   posterior enhancement and bone/air give shadows), a time-gain curve compensates part of
   the mean loss; the envelope is log-compressed to 8 bits and everything outside the
   field of view (the fan of a sector probe) is black.

All lengths are in pixels unless stated; scene positions are given as fractions of the
imaging depth and of the lateral half-width so that one recipe works for both geometries
and for any image size. Everything is vectorised numpy/scipy: about 9-16 ms per 256x256
image on one CPU core.

Public API: :func:`make_phantom_image`, :func:`render_bmode`, :class:`Canvas`,
:data:`PRETRAIN_ANATOMIES`, :data:`SCENE_RECIPES`, :data:`LABEL_NAMES`, and the helpers the
task phantoms share (:func:`save_png`, :func:`draw_skin_layers`, :func:`smooth_noise`,
:func:`draw_fetal_head`). The demo-data registry is :mod:`echocare.phantoms.demo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "LABEL_NAMES",
    "PRETRAIN_ANATOMIES",
    "SCENE_RECIPES",
    "TISSUES",
    "Canvas",
    "Tissue",
    "coarsen_anatomy",
    "draw_fetal_head",
    "draw_skin_layers",
    "make_canvas",
    "make_phantom_image",
    "render_bmode",
    "save_png",
    "smooth_noise",
]

# --------------------------------------------------------------------------------------
# Labels and tissues
# --------------------------------------------------------------------------------------

#: Meaning of the integer classes of the returned label mask (tissue type, the same for
#: every anatomy, so a mask is interpretable without knowing the recipe). Layers (skin,
#: fat, muscle) and unstructured tissue stay 0.
LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "fluid",  # anechoic: cysts, vessels, heart chambers, bladder, amniotic fluid
    2: "lesion",  # hypoechoic focal lesion or nodule
    3: "organ",  # organ parenchyma: liver, kidney cortex, thyroid, myocardium, brain
    4: "bright",  # strong reflector: bone, renal sinus, trachea/air
}
LABEL_FLUID, LABEL_LESION, LABEL_ORGAN, LABEL_BRIGHT = 1, 2, 3, 4


@dataclass(frozen=True)
class Tissue:
    """Acoustic properties of a tissue, all relative to normal soft tissue.

    Attributes:
        echo: backscatter amplitude (soft tissue 1; fluid ~0.02, i.e. -34 dB).
        atten: attenuation per unit path length (soft tissue 1; bone ~40, air ~200).
        imped: acoustic impedance (soft tissue 1); a jump along the beam gives a
            specular echo proportional to its size.
    """

    echo: float
    atten: float
    imped: float


TISSUES: dict[str, Tissue] = {
    "tissue": Tissue(1.0, 1.0, 1.00),
    "skin": Tissue(2.2, 1.0, 1.06),
    "fat": Tissue(0.45, 0.8, 0.94),
    "muscle": Tissue(0.55, 1.1, 1.02),
    "fascia": Tissue(2.5, 1.3, 1.07),  # thin bright septa, capsules, vessel walls
    "parenchyma": Tissue(1.0, 1.0, 1.01),
    "gland": Tissue(1.5, 1.0, 1.02),  # thyroid, fibroglandular breast: brighter than muscle
    "fluid": Tissue(0.02, 0.05, 0.96),  # blood, urine, amniotic fluid: anechoic, no loss
    "hypo": Tissue(0.3, 1.0, 0.98),  # hypoechoic lesion
    "bright": Tissue(2.5, 1.5, 1.04),  # renal sinus fat, fibrous tissue
    "bone": Tissue(4.0, 40.0, 1.60),  # strong echo then acoustic shadow
    "air": Tissue(5.0, 30.0, 0.30),  # trachea/bowel gas: bright line, total shadow
}


# --------------------------------------------------------------------------------------
# Canvas: probe geometry and tissue maps
# --------------------------------------------------------------------------------------


@dataclass
class Canvas:
    """Probe geometry and tissue property maps of one phantom (all arrays (H, W)).

    Geometry: for ``"sector"`` the beams diverge from an apex at ``(apex_y, apex_x)``
    (pixels; ``apex_y <= 0``, above the top edge) over ``[-half_angle, half_angle]``
    radians from the downward vertical, between radii ``r_min`` and ``r_max``; for
    ``"linear"`` the beams are vertical and the field of view is the whole rectangle.

    Attributes:
        size: side length in pixels.
        geometry: ``"sector"`` or ``"linear"``.
        yy, xx: pixel row/column coordinates (float32).
        depth: distance from the probe face along the beam (pixels).
        theta: beam angle of each pixel (radians, 0 = straight down; 0 for linear).
        fov: field of view (bool); the image is black outside.
        echo, atten, imped: tissue maps (see :class:`Tissue`), float32.
        label: integer classes of :data:`LABEL_NAMES`, uint8.
        texture: relative strength of low-frequency echogenicity variation (0 = none).
    """

    size: int
    geometry: str
    yy: np.ndarray
    xx: np.ndarray
    depth: np.ndarray
    theta: np.ndarray
    fov: np.ndarray
    echo: np.ndarray
    atten: np.ndarray
    imped: np.ndarray
    label: np.ndarray
    apex_y: float = 0.0
    apex_x: float = 0.0
    half_angle: float = 0.0
    r_min: float = 0.0
    r_max: float = 0.0
    texture: float = 0.1

    @property
    def max_depth(self) -> float:
        """Imaging depth in pixels (from the probe face to the deepest sample)."""
        return self.r_max - self.r_min if self.geometry == "sector" else float(self.size - 1)

    @cached_property
    def depth_frac(self) -> np.ndarray:
        """Depth as a fraction of the imaging depth (H, W), float32."""
        return self.depth * np.float32(1.0 / self.max_depth)

    @cached_property
    def lateral(self) -> np.ndarray:
        """Lateral position, -1 (left edge of the field of view) to 1 (right), as a
        (1, W) row for linear probes (beams are columns) or (H, W) for sectors."""
        if self.geometry == "sector":
            return self.theta * np.float32(1.0 / self.half_angle)
        return (np.arange(self.size, dtype=np.float32) * (2.0 / (self.size - 1)) - 1)[None, :]

    def at(self, depth_frac: float, lat_frac: float) -> tuple[float, float]:
        """Pixel (y, x) of a point at a fraction of the imaging depth and of the lateral
        half-width (-1 = left edge of the field of view, 1 = right edge)."""
        if self.geometry == "sector":
            r = self.r_min + depth_frac * (self.r_max - self.r_min)
            t = lat_frac * self.half_angle
            return self.apex_y + r * math.cos(t), self.apex_x + r * math.sin(t)
        return depth_frac * (self.size - 1), (0.5 + 0.5 * lat_frac) * (self.size - 1)

    def px(self, frac: float) -> float:
        """A length given as a fraction of the image side, in pixels."""
        return frac * self.size

    # ---- shapes (boolean masks (H, W)) --------------------------------------------

    def ellipse(
        self,
        cy: float,
        cx: float,
        ry: float,
        rx: float,
        angle: float = 0.0,
        irregular: Sequence[tuple[float, float]] = (),
        power: float = 2.0,
    ) -> np.ndarray:
        """Filled ellipse centred at ``(cy, cx)`` with semi-axes ``ry`` (vertical before
        rotation) and ``rx`` pixels, rotated by ``angle`` degrees (counter-clockwise on
        screen). ``irregular``: (amplitude, phase) of radial harmonics 2, 3, ... that
        make a lobulated blob. ``power`` > 2 gives a rounded rectangle (superellipse).
        Computed on the bounding box only, so small shapes are cheap."""
        mask = np.zeros((self.size, self.size), dtype=bool)
        extent = max(ry, rx) * (1.0 + sum(abs(a) for a, _ in irregular)) + 1.0
        y0, y1 = max(int(cy - extent), 0), min(int(cy + extent) + 2, self.size)
        x0, x1 = max(int(cx - extent), 0), min(int(cx + extent) + 2, self.size)
        if y0 >= y1 or x0 >= x1:
            return mask
        dy = self.yy[y0:y1, x0:x1] - cy
        dx = self.xx[y0:y1, x0:x1] - cx
        a = math.radians(angle)
        u = (dx * math.cos(a) - dy * math.sin(a)) / max(rx, 1e-3)  # along rx
        v = (dx * math.sin(a) + dy * math.cos(a)) / max(ry, 1e-3)  # along ry
        if power == 2.0:
            rho = np.sqrt(u * u + v * v)
        else:
            rho = (np.abs(u) ** power + np.abs(v) ** power) ** (1.0 / power)
        limit = 1.0
        if irregular:
            phi = np.arctan2(v, u)
            limit = 1.0 + sum(amp * np.cos(k * phi + ph) for k, (amp, ph) in enumerate(irregular, 2))
        mask[y0:y1, x0:x1] = rho <= limit
        return mask

    def ring(self, cy, cx, ry, rx, thickness, angle=0.0, **kw) -> np.ndarray:
        """Elliptic ring (wall, capsule, skull) of ``thickness`` pixels, inside the
        ellipse of the same parameters."""
        outer = self.ellipse(cy, cx, ry, rx, angle, **kw)
        inner = self.ellipse(cy, cx, ry - thickness, rx - thickness, angle, **kw)
        return outer & ~inner

    def layer(
        self,
        top: float,
        bottom: float,
        rng: np.random.Generator | None = None,
        wave: float = 0.0,
    ) -> np.ndarray:
        """Band between depths ``top`` and ``bottom`` (fractions of the imaging depth),
        following the probe face (arcs for a sector probe), with boundaries that undulate
        by up to ``wave`` (fraction of depth) when ``rng`` is given."""
        d = self.depth_frac
        lo, hi = np.float32(top), np.float32(bottom)
        if rng is not None and wave > 0:
            # Undulation as a function of the lateral position only: evaluated on one
            # row of beam positions, then looked up (a sine per pixel costs more).
            grid = np.linspace(-1, 1, 257, dtype=np.float32)
            f1, f2 = rng.uniform(1.0, 3.0, 2)
            p1, p2 = rng.uniform(0, 2 * np.pi, 2)
            idx = self._lateral_index
            lo = lo + (wave * np.sin(f1 * np.pi * grid + p1)).astype(np.float32)[idx]
            hi = hi + (wave * np.sin(f2 * np.pi * grid + p2)).astype(np.float32)[idx]
        return (d >= lo) & (d < hi)

    @cached_property
    def _lateral_index(self) -> np.ndarray:
        """Index of :attr:`lateral` on a 257-point grid over [-1, 1]."""
        return np.clip(np.rint((self.lateral + 1) * 128), 0, 256).astype(np.intp)

    # ---- painting -----------------------------------------------------------------

    def paint(
        self,
        mask: np.ndarray,
        tissue: str | Tissue,
        label: int | None = None,
        echo_gain: float = 1.0,
        atten: float | None = None,
    ) -> None:
        """Set the tissue properties (and optionally the label) inside ``mask``.
        ``echo_gain`` scales the tissue's backscatter (for variety); ``atten`` overrides
        its attenuation (e.g. a shadowing lesion)."""
        t = TISSUES[tissue] if isinstance(tissue, str) else tissue
        self.echo[mask] = t.echo * echo_gain
        self.atten[mask] = t.atten if atten is None else atten
        self.imped[mask] = t.imped
        if label is not None:
            self.label[mask] = label

    def fill(self, tissue: str, echo_gain: float = 1.0) -> None:
        """Fill the whole image with one tissue (the background of a scene)."""
        self.paint(np.ones_like(self.fov), tissue, echo_gain=echo_gain)


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (H, W) float32, shared read-only between canvases."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def make_canvas(
    rng: np.random.Generator,
    size: int = 256,
    geometry: str = "sector",
    probe: str | None = None,
) -> Canvas:
    """An empty canvas (soft tissue everywhere) with a random probe geometry.

    Args:
        rng: random generator (apex distance, opening angle, lateral offset).
        size: side length in pixels.
        geometry: ``"sector"`` (fan from an apex above the top edge) or ``"linear"``.
        probe: for sectors, ``"phased"`` (cardiac: apex just above the image, wide
            ~80-90 degree fan) or ``"convex"`` (abdominal/obstetric: apex far above,
            ~55-70 degree fan with a curved top); random when None.
    """
    if geometry not in ("sector", "linear"):
        raise ValueError(f"geometry must be 'sector' or 'linear', got {geometry!r}")
    yy, xx = _pixel_grid(size)
    shape = (size, size)
    kw: dict = {}
    if geometry == "sector":
        probe = probe or ("phased" if rng.random() < 0.4 else "convex")
        if probe == "phased":
            apex_d = size * rng.uniform(0.01, 0.05)
            half = math.radians(rng.uniform(38, 45))
        else:
            apex_d = size * rng.uniform(0.3, 0.55)
            half = math.radians(rng.uniform(25, 33))
        apex_x = (size - 1) / 2 + size * rng.uniform(-0.02, 0.02)
        apex_y = -apex_d
        # The probe face (arc r = r_min) must lie inside the image over the whole fan.
        r_min = apex_d / math.cos(half) + 1.0
        # Deepest arc: down to the bottom edge, but not much wider than the image (a
        # convex fan may be cut by the sides at depth, as on a zoomed display).
        r_max = min(size - 1 + apex_d - 1.0, 1.35 * (size / 2) / math.sin(half))
        ry, rx = yy - apex_y, xx - apex_x
        r = np.sqrt(ry * ry + rx * rx)
        theta = np.arctan2(rx, ry)
        fov = (r >= r_min) & (r <= r_max) & (np.abs(theta) <= half)
        depth = np.clip(r - r_min, 0, None)
        kw = dict(apex_y=apex_y, apex_x=apex_x, half_angle=half, r_min=r_min, r_max=r_max)
    else:
        theta = np.zeros(shape, np.float32)
        fov = np.ones(shape, bool)
        depth = yy
    t = TISSUES["tissue"]
    return Canvas(
        size=size,
        geometry=geometry,
        yy=yy,
        xx=xx,
        depth=depth.astype(np.float32),
        theta=theta.astype(np.float32),
        fov=fov,
        echo=np.full(shape, t.echo, np.float32),
        atten=np.full(shape, t.atten, np.float32),
        imped=np.full(shape, t.imped, np.float32),
        label=np.zeros(shape, np.uint8),
        **kw,
    )


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights from n_in to n_out evenly spaced
    samples over the same extent (rows sum to 1)."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    w = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - w
    m[np.arange(n_out), i0 + 1] = w
    return m


def smooth_noise(rng: np.random.Generator, size: int, cell: int = 16) -> np.ndarray:
    """Low-frequency random field (size, size), zero mean, std ~0.6-1, correlation length
    ~``cell`` pixels: bilinear upsampling of a coarse Gaussian grid, done as two small
    matrix products (far cheaper than a wide Gaussian filter)."""
    n = size // cell + 2
    m = _interp_matrix(size, n)
    return m @ rng.standard_normal((n, n), dtype=np.float32) @ m.T


def _speckle(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]):
    """Rayleigh speckle envelope on a beam grid (rows = depth, cols = beam lines).

    The complex Gaussian field models the sum of many random sub-resolution scatterers;
    smoothing it with the point-spread function (``sigma`` = axial, lateral std in grid
    cells: the resolution cell is longer laterally than axially) sets the speckle grain;
    its magnitude is Rayleigh distributed. Normalised to unit mean power."""
    z = rng.standard_normal((2, *shape), dtype=np.float32)
    z = ndimage.gaussian_filter(z, sigma=(0, *sigma), truncate=2.5)
    env = np.sqrt(z[0] * z[0] + z[1] * z[1])
    return env * np.float32(1.0 / np.sqrt(np.mean(env * env)))


class _Bilinear:
    """Bilinear sampling of several fields at the same fractional (row, col) positions,
    sharing the neighbour indices and weights (cheaper than one map_coordinates call per
    field)."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
        n_r, n_c = shape
        rows = np.clip(rows, 0, n_r - 1.001)
        cols = np.clip(cols, 0, n_c - 1.001)
        r0 = rows.astype(np.intp)
        c0 = cols.astype(np.intp)
        self.wr = (rows - r0).astype(np.float32)
        self.wc = (cols - c0).astype(np.float32)
        self.i00 = r0 * n_c + c0
        self.n_c = n_c

    def __call__(self, field: np.ndarray) -> np.ndarray:
        f = field.ravel()
        a, b = f.take(self.i00), f.take(self.i00 + 1)
        c, d = f.take(self.i00 + self.n_c), f.take(self.i00 + self.n_c + 1)
        top = a + (b - a) * self.wc
        return top + ((c + (d - c) * self.wc) - top) * self.wr


def render_bmode(
    canvas: Canvas,
    rng: np.random.Generator,
    dynamic_range_db: float | None = None,
    atten_db: float | None = None,
    tgc: float | None = None,
    saturation_db: float | None = None,
) -> np.ndarray:
    """Render a B-mode image (H, W) uint8 from the tissue maps of ``canvas``.

    Args:
        canvas: geometry and tissue maps, see :class:`Canvas`.
        rng: random generator (speckle, noise and, when not given, the settings below).
        dynamic_range_db: displayed dynamic range of the log compression (dB);
            random in [40, 48] when None.
        atten_db: round-trip attenuation of soft tissue over the whole imaging depth
            (dB); random in [30, 45] when None.
        tgc: fraction of the mean tissue attenuation the time-gain curve compensates;
            random in [0.6, 0.8] when None, so the mean still falls with depth.
        saturation_db: how far above the mean soft-tissue level (dB) the display
            saturates to white; random in [14, 19] when None. Give all four settings to
            render the frames of one clip with the same scanner settings.

    Returns:
        uint8 grey image, 0 outside the field of view.
    """
    size = canvas.size
    dr_db = rng.uniform(40, 48) if dynamic_range_db is None else dynamic_range_db
    att_db = rng.uniform(30, 45) if atten_db is None else atten_db
    tgc = rng.uniform(0.6, 0.8) if tgc is None else tgc
    alpha = np.float32(att_db / max(canvas.max_depth, 1.0))  # dB per pixel, soft tissue
    # Resolution cell (grid cells): axial about one pixel, lateral 2-3x wider.
    sig_ax = rng.uniform(0.8, 1.1)
    sig_lat = sig_ax * rng.uniform(2.0, 3.0)

    if canvas.geometry == "sector":
        # Beam grid: rows = depth samples (1 px apart), cols = beam lines. Speckle and the
        # attenuation integral live on it, so grains and shadows follow the diverging rays
        # and the lateral grain widens with depth as for a real sector probe.
        n_r = int(math.ceil(canvas.r_max - canvas.r_min)) + 2
        # About one beam line per pixel at mid-depth: finer than the pixels near the
        # probe, coarser at depth (lateral resolution degrades with depth).
        n_t = int(np.clip(math.ceil(canvas.half_angle * (canvas.r_min + canvas.r_max)), 64, size))
        dtheta = 2 * canvas.half_angle / (n_t - 1)
        r_p = canvas.r_min + np.arange(n_r, dtype=np.float32)[:, None]
        t_p = (-canvas.half_angle + dtheta * np.arange(n_t, dtype=np.float32))[None, :]
        # Attenuation along each ray, sampled at the nearest pixel (it is piecewise
        # constant anyway).
        iy = np.clip(np.rint(canvas.apex_y + r_p * np.cos(t_p)), 0, size - 1).astype(np.intp)
        ix = np.clip(np.rint(canvas.apex_x + r_p * np.sin(t_p)), 0, size - 1).astype(np.intp)
        loss_p = np.cumsum(canvas.atten[iy, ix], axis=0) * alpha
        # The beam has a width: shadows and enhancement have soft lateral edges.
        loss_p = ndimage.gaussian_filter1d(loss_p, 1.5, axis=1, truncate=3.0)
        spk_p = _speckle(rng, (n_r, n_t), (sig_ax, sig_lat))
        sample = _Bilinear(canvas.depth, (canvas.theta + canvas.half_angle) / dtheta, (n_r, n_t))
        loss, spk = sample(loss_p), sample(spk_p)
        beam_y, beam_x = np.cos(canvas.theta), np.sin(canvas.theta)
    else:
        loss = np.cumsum(canvas.atten, axis=0) * alpha
        loss = ndimage.gaussian_filter1d(loss, 1.5, axis=1, truncate=3.0)
        spk = _speckle(rng, (size, size), (sig_ax, sig_lat))
        beam_y, beam_x = 1.0, 0.0

    # Slow echogenicity variation within tissues (real parenchyma is not uniform).
    echo = canvas.echo
    if canvas.texture > 0:
        echo = echo * np.maximum(1.0 + canvas.texture * smooth_noise(rng, size, 12), 0.2)
    # A little blur of the tissue map: boundaries are as soft as the resolution cell.
    echo = ndimage.gaussian_filter(echo, 0.7, truncate=3.0)

    # Specular echoes: the impedance jump seen along the beam (a boundary parallel to the
    # probe face reflects strongly; one along the beam hardly at all).
    z = ndimage.gaussian_filter(canvas.imped, 1.0, truncate=3.0)
    gy, gx = np.gradient(z)
    spec = np.abs(gy * beam_y + gx * beam_x) * np.float32(60.0)

    amp = echo * spk + spec * (0.5 + 0.5 * spk)
    # Echoes lose the attenuation integrated along the ray (dB); a slight loss of
    # sensitivity for steered beams at the edges of a fan.
    if canvas.geometry == "sector":
        lat2 = canvas.lateral * canvas.lateral  # (x*x)**2: float32 ** 4 is a slow pow
        loss += np.float32(3.0) * lat2 * lat2
    amp *= np.power(np.float32(10.0), loss * np.float32(-0.05))
    # Electronic noise (~ -50 dB re tissue) enters after the tissue, before the
    # time-gain amplifier, which partly compensates the mean tissue loss: noise shows in
    # deep anechoic regions, as on a scanner.
    amp += rng.random((size, size), dtype=np.float32) * np.float32(0.004)
    db = 20.0 * np.log10(amp + np.float32(1e-6)) + (tgc * alpha) * canvas.depth
    # dB above the mean tissue level that saturates to white.
    top = rng.uniform(14, 19) if saturation_db is None else saturation_db
    img = np.clip((db - np.float32(top - dr_db)) * np.float32(255.0 / dr_db), 0, 255)
    img[~canvas.fov] = 0
    return img.astype(np.uint8)


# --------------------------------------------------------------------------------------
# Scene recipes (one per anatomy)
# --------------------------------------------------------------------------------------


def draw_skin_layers(c: Canvas, rng: np.random.Generator, muscle: bool = True) -> float:
    """Skin, subcutaneous fat and (optionally) a muscle layer under the probe face.
    Returns the depth fraction where they end."""
    s = c.size / c.max_depth  # fractions of depth for ~size-relative thicknesses
    d_skin = rng.uniform(0.012, 0.02) * s
    d_fat = d_skin + rng.uniform(0.03, 0.08) * s
    c.paint(c.layer(0, d_skin), "skin")
    c.paint(c.layer(d_skin, d_fat, rng, 0.01), "fat")
    end = d_fat
    if muscle:
        d_mus = d_fat + rng.uniform(0.04, 0.09) * s
        c.paint(c.layer(d_fat, d_mus, rng, 0.01), "muscle")
        c.paint(c.layer(d_fat - 0.004 * s, d_fat + 0.006 * s, rng, 0.0), "fascia")
        end = d_mus
    return end


def _heart(c: Canvas, rng: np.random.Generator, four: bool) -> None:
    """Apical view: the apex of the heart at the top, chambers hanging below it."""
    c.texture = 0.25
    c.fill("tissue", rng.uniform(0.5, 0.8))  # lung/mediastinum around the heart
    draw_skin_layers(c, rng)
    hy, hx = c.at(rng.uniform(0.5, 0.56), rng.uniform(-0.08, 0.08))
    tilt = rng.uniform(-10, 10)
    ry, rx = c.px(rng.uniform(0.38, 0.44)), c.px(rng.uniform(0.3, 0.36))
    c.paint(c.ellipse(hy, hx, ry, rx, tilt), "parenchyma", LABEL_ORGAN, rng.uniform(0.8, 1.1))
    c.paint(c.ring(hy, hx, ry, rx, c.px(0.015), tilt), "fascia", None, 1.2)  # pericardium
    sx = 1 if rng.random() < 0.9 else -1  # left ventricle on the right of the screen
    cham: list[tuple[float, float, float, float, float]] = []  # depth, lat, ry, rx, angle
    if four:
        cham += [
            (0.36, 0.24 * sx, 0.18, 0.085, 12 * sx),  # LV, pointing to the apex
            (0.38, -0.25 * sx, 0.15, 0.07, -14 * sx),  # RV
            (0.73, 0.22 * sx, 0.1, 0.09, 0),  # LA
            (0.73, -0.24 * sx, 0.1, 0.085, 0),  # RA
        ]
        valve_lats = (0.22 * sx, -0.24 * sx)
    else:
        lat = rng.uniform(-0.1, 0.1)
        cham += [
            (0.37, lat, 0.2, 0.12, rng.uniform(-8, 8)),  # LV
            (0.75, lat + rng.uniform(-0.08, 0.08), 0.11, 0.11, 0),  # LA
        ]
        valve_lats = (lat,)
    for d, lat, cry, crx, ang in cham:
        y, x = c.at(d + rng.uniform(-0.02, 0.02), lat + rng.uniform(-0.03, 0.03))
        s = rng.uniform(0.9, 1.1)
        irr = [(rng.uniform(0, 0.06), rng.uniform(0, 6.3)) for _ in range(2)]
        c.paint(c.ellipse(y, x, c.px(cry * s), c.px(crx * s), ang + tilt, irr), "fluid", LABEL_FLUID)
    # Atrioventricular valves: thin bright leaflets across the chamber junction.
    for lat in valve_lats:
        y, x = c.at(0.585, lat)
        leaflet = c.ellipse(y, x, c.px(0.008), c.px(0.06), tilt + rng.uniform(-15, 15))
        c.paint(leaflet, "fascia", LABEL_ORGAN)


def _heart_a4c(c: Canvas, rng: np.random.Generator) -> None:
    _heart(c, rng, four=True)


def _heart_a2c(c: Canvas, rng: np.random.Generator) -> None:
    _heart(c, rng, four=False)


def _thyroid(c: Canvas, rng: np.random.Generator) -> None:
    """Transverse neck: layers, a butterfly gland (two lobes and an isthmus) around the
    trachea (bright air arc with a shadow), carotid arteries lateral to the lobes."""
    c.texture = 0.12
    c.fill("tissue", rng.uniform(0.5, 0.7))  # neck muscles and fat around the gland
    top = draw_skin_layers(c, rng, muscle=True)
    cx = rng.uniform(-0.1, 0.1)
    gain = rng.uniform(1.0, 1.3)
    ly = top + rng.uniform(0.14, 0.2)
    for side in (-1, 1):
        y, x = c.at(ly + rng.uniform(-0.02, 0.02), cx + side * rng.uniform(0.38, 0.46))
        ang = side * rng.uniform(5, 20)
        ry, rx = c.px(rng.uniform(0.1, 0.14)), c.px(rng.uniform(0.16, 0.22))
        c.paint(c.ellipse(y, x, ry, rx, ang), "gland", LABEL_ORGAN, gain)
        # Carotid artery lateral and a little deeper than each lobe.
        y, x = c.at(ly + rng.uniform(0.04, 0.1), cx + side * rng.uniform(0.8, 0.9))
        r = c.px(rng.uniform(0.06, 0.08))
        c.paint(c.ellipse(y, x, r + 2, r + 2), "fascia")
        c.paint(c.ellipse(y, x, r, r), "fluid", LABEL_FLUID)
    y, x = c.at(top + rng.uniform(0.04, 0.07), cx)  # isthmus over the trachea
    c.paint(c.ellipse(y, x, c.px(0.045), c.px(0.2)), "gland", LABEL_ORGAN, gain)
    # Trachea: cartilage (hypoechoic arc) then air, whose front wall is a bright line and
    # which shadows everything behind it.
    ty, tx = c.at(ly + 0.06, cx)
    rt = c.px(rng.uniform(0.1, 0.13))
    c.paint(c.ellipse(ty, tx, rt, rt * 1.1), "muscle")
    c.paint(c.ellipse(ty + 4, tx, rt - 3, rt * 1.1 - 3), "air", LABEL_BRIGHT)
    if rng.random() < 0.4:  # a nodule in one lobe
        side = rng.choice([-1, 1])
        y, x = c.at(ly + rng.uniform(-0.02, 0.03), cx + side * 0.42)
        r = c.px(rng.uniform(0.03, 0.06))
        c.paint(c.ellipse(y, x, r, r * 1.2, irregular=[(0.1, rng.uniform(0, 6))]), "hypo", LABEL_LESION)


def _carotid(c: Canvas, rng: np.random.Generator) -> None:
    """Neck vessels: a transverse (round) or longitudinal (tube) carotid artery with
    bright walls, sometimes the jugular vein beside it."""
    c.texture = 0.15
    top = draw_skin_layers(c, rng, muscle=True)
    # Sternocleidomastoid: a thicker hypoechoic muscle under the subcutaneous layers.
    scm = top + rng.uniform(0.08, 0.14)
    c.paint(c.layer(top, scm, rng, 0.015), "muscle", None, 0.9)
    depth = scm + rng.uniform(0.12, 0.22)
    if rng.random() < 0.5:  # transverse
        y, x = c.at(depth, rng.uniform(-0.3, 0.3))
        r = c.px(rng.uniform(0.08, 0.12))
        c.paint(c.ellipse(y, x, r + 2.5, r + 2.5), "fascia")
        c.paint(c.ellipse(y, x, r, r), "fluid", LABEL_FLUID)
        if rng.random() < 0.7:  # jugular vein: larger, oval, compressible, superficial
            side = 1 if x < c.size / 2 else -1
            yv, xv = y - r * rng.uniform(0.6, 1.1), x + side * r * rng.uniform(1.8, 2.4)
            c.paint(c.ellipse(yv, xv, r * rng.uniform(0.5, 0.8), r * 1.4, rng.uniform(-15, 15)), "fluid", LABEL_FLUID)
    else:  # longitudinal: a tube across the image, walls as double bright lines
        y, _ = c.at(depth, 0.0)
        half = c.px(rng.uniform(0.06, 0.09))
        ang = rng.uniform(-8, 8)
        L = c.px(2.0)
        x = c.size / 2
        c.paint(c.ellipse(y, x, half + 3, L, ang, power=8), "fascia")
        c.paint(c.ellipse(y, x, half, L, ang, power=8), "fluid", LABEL_FLUID)
        if rng.random() < 0.3:  # a calcified plaque on the far wall: bright + shadow
            yp, xp = y + half - 2, x + c.px(rng.uniform(-0.3, 0.3))
            c.paint(c.ellipse(yp, xp, 3, c.px(0.05), ang), "bone", LABEL_BRIGHT)


def _liver(c: Canvas, rng: np.random.Generator) -> None:
    """Large homogeneous parenchyma with small dark vessels and a bright diaphragm."""
    c.texture = 0.06
    top = draw_skin_layers(c, rng, muscle=True)
    c.paint(c.layer(top, 1.1), "parenchyma", LABEL_ORGAN, rng.uniform(0.9, 1.15))
    c.paint(c.layer(top, top + 0.012), "fascia")  # Glisson's capsule
    # Diaphragm: a curved bright band near the bottom, lung (air) behind it.
    dy, dx = c.at(rng.uniform(0.95, 1.15), rng.uniform(-0.5, 0.5))
    R = c.px(rng.uniform(0.6, 0.9))
    if rng.random() < 0.7:
        c.paint(c.ellipse(dy + R, dx, R + 4, R * 1.5 + 4), "fascia")
        c.paint(c.ellipse(dy + R, dx, R, R * 1.5), "air")
        c.label[c.ellipse(dy + R, dx, R + 4, R * 1.5 + 4)] = 0
    for _ in range(rng.integers(4, 9)):
        y, x = c.at(rng.uniform(top + 0.1, 0.85), rng.uniform(-0.8, 0.8))
        r = c.px(rng.uniform(0.012, 0.045))
        e = rng.uniform(1.0, 2.2)  # oblique sections of vessels are elongated
        ang = rng.uniform(0, 180)
        if rng.random() < 0.5:  # portal vein branches have bright fibrous walls
            c.paint(c.ellipse(y, x, r + 2, r * e + 2, ang), "fascia")
        c.paint(c.ellipse(y, x, r, r * e, ang), "fluid", LABEL_FLUID)
    if rng.random() < 0.25:  # gallbladder
        y, x = c.at(rng.uniform(0.4, 0.6), rng.choice([-0.5, 0.5]))
        c.paint(c.ellipse(y, x, c.px(0.07), c.px(0.14), rng.uniform(-30, 30), power=2.5), "fluid", LABEL_FLUID)


def _kidney(c: Canvas, rng: np.random.Generator) -> None:
    """An elliptic organ: hypoechoic cortex, dark pyramids, bright central sinus,
    bright capsule and perirenal fat; liver in front of it."""
    c.texture = 0.1
    top = draw_skin_layers(c, rng, muscle=True)
    c.paint(c.layer(top, 1.1), "parenchyma", None, rng.uniform(0.85, 1.1))  # liver/spleen
    y, x = c.at(rng.uniform(0.52, 0.62), rng.uniform(-0.15, 0.15))
    ang = rng.uniform(-25, 25)
    ry, rx = c.px(rng.uniform(0.16, 0.21)), c.px(rng.uniform(0.3, 0.38))
    c.paint(c.ellipse(y, x, ry + 6, rx + 6, ang), "bright", None, 0.8)  # perirenal fat
    c.paint(c.ellipse(y, x, ry, rx, ang), "parenchyma", LABEL_ORGAN, rng.uniform(0.5, 0.7))
    # Pyramids: dark triangles-ish around the sinus, on the ellipse at ~60% radius.
    a = math.radians(ang)
    for k in range(rng.integers(4, 7)):
        phi = 2 * math.pi * (k + rng.uniform(-0.2, 0.2)) / 6
        u, v = 0.6 * rx * math.cos(phi), 0.55 * ry * math.sin(phi)
        py, px_ = y - u * math.sin(a) + v * math.cos(a), x + u * math.cos(a) + v * math.sin(a)
        c.paint(c.ellipse(py, px_, c.px(0.03), c.px(0.035), rng.uniform(0, 180)), "hypo", LABEL_ORGAN, 0.8)
    irr = [(rng.uniform(0.05, 0.15), rng.uniform(0, 6.3)) for _ in range(3)]
    c.paint(c.ellipse(y, x, ry * 0.42, rx * 0.55, ang, irr), "bright", LABEL_BRIGHT, rng.uniform(1.0, 1.4))


def _breast(c: Canvas, rng: np.random.Generator) -> None:
    """Layers (skin, fat lobules, fibroglandular tissue, pectoral muscle) and one
    irregular hypoechoic lesion that shadows (solid) or enhances (cyst-like)."""
    c.texture = 0.3
    d_skin = rng.uniform(0.015, 0.025)
    d_fat = d_skin + rng.uniform(0.12, 0.25)
    d_gland = d_fat + rng.uniform(0.25, 0.35)
    d_retro = d_gland + rng.uniform(0.03, 0.08)
    d_musc = d_retro + rng.uniform(0.1, 0.15)
    c.paint(c.layer(0, d_skin), "skin")
    c.paint(c.layer(d_skin, d_fat, rng, 0.03), "fat")
    # Fat lobules separated by bright Cooper's ligaments.
    for _ in range(rng.integers(3, 7)):
        y, x = c.at(rng.uniform(d_skin + 0.03, d_fat), rng.uniform(-1, 1))
        c.paint(c.ring(y, x, c.px(0.05), c.px(rng.uniform(0.08, 0.15)), 2, rng.uniform(-20, 20)), "fascia", None, 0.7)
    c.paint(c.layer(d_fat, d_gland, rng, 0.04), "gland")
    c.paint(c.layer(d_gland, d_retro, rng, 0.02), "fat")
    c.paint(c.layer(d_retro, d_musc, rng, 0.02), "muscle")
    for k in range(3):  # muscle fibres: thin bright striations
        f = d_retro + (k + 1) * (d_musc - d_retro) / 4
        c.paint(c.layer(f, f + 0.006, rng, 0.005), "fascia", None, 0.6)
    c.paint(c.layer(d_musc, 1.1), "tissue", None, 0.7)
    # Lesion in the glandular layer; malignant-looking ones are irregular and shadow.
    solid = rng.random() < 0.6
    y, x = c.at(rng.uniform(d_fat + 0.05, d_gland), rng.uniform(-0.5, 0.5))
    r = c.px(rng.uniform(0.05, 0.1))
    tall = rng.uniform(0.7, 1.3)
    irr = [(rng.uniform(0.05, 0.2 if solid else 0.05), rng.uniform(0, 6.3)) for _ in range(4)]
    if solid:
        c.paint(c.ellipse(y, x, r * tall, r, rng.uniform(-30, 30), irr), "hypo", LABEL_LESION, rng.uniform(0.4, 0.8), atten=rng.uniform(1.5, 3))
    else:
        c.paint(c.ellipse(y, x, r * tall * 0.8, r, rng.uniform(-30, 30), irr), "fluid", LABEL_FLUID)


def draw_fetal_head(c: Canvas, rng: np.random.Generator) -> dict[str, float]:
    """Maternal wall, amniotic fluid, and an elliptic skull ring (bone) with the brain,
    the midline echo and the thalami inside. Returns the head's geometry (pixels,
    degrees): ``y``, ``x`` (centre), ``ry``, ``rx`` (outer semi-axes, ``rx`` the
    fronto-occipital one), ``thickness`` (skull), ``angle`` (Canvas.ellipse angle) and
    ``brain_gain`` (echo gain of the brain tissue)."""
    c.texture = 0.15
    top = draw_skin_layers(c, rng, muscle=True)
    d_ut = top + rng.uniform(0.06, 0.1)
    c.paint(c.layer(top, d_ut, rng, 0.02), "muscle", None, 1.2)  # myometrium
    c.paint(c.layer(d_ut, 1.1), "tissue", None, rng.uniform(0.6, 0.9))  # fetal body, uterus
    y, x = c.at(rng.uniform(0.5, 0.6), rng.uniform(-0.2, 0.2))
    ang = rng.uniform(-40, 40)
    ry, rx = c.px(rng.uniform(0.2, 0.26)), c.px(rng.uniform(0.27, 0.34))
    # Amniotic fluid: a layer under the uterine wall and a pool around the head.
    c.paint(c.layer(d_ut, d_ut + rng.uniform(0.05, 0.12), rng, 0.03), "fluid", LABEL_FLUID)
    f = rng.uniform(1.15, 1.4)
    irr = [(rng.uniform(0, 0.1), rng.uniform(0, 6.3)) for _ in range(3)]
    c.paint(c.ellipse(y, x, ry * f, rx * f, ang + rng.uniform(-20, 20), irr), "fluid", LABEL_FLUID)
    if rng.random() < 0.5:  # placenta along the anterior wall
        band = c.layer(d_ut, d_ut + rng.uniform(0.08, 0.15), rng, 0.03)
        c.paint(band & (c.xx < c.size * rng.uniform(0.3, 0.9)), "gland", None, 0.9)
    th = c.px(rng.uniform(0.018, 0.028))
    brain_gain = rng.uniform(1.5, 2.5)
    c.paint(c.ellipse(y, x, ry, rx, ang), "hypo", LABEL_ORGAN, brain_gain)  # brain
    # Skull: bone, but thin, so the shadow it casts is partial (unlike adult bone).
    c.paint(c.ring(y, x, ry, rx, th, ang), "bone", LABEL_BRIGHT, atten=rng.uniform(3, 6))
    # Midline echo (falx) along the major axis and the thalami beside it.
    c.paint(c.ellipse(y, x, 1.2, rx - th - 2, ang), "fascia")
    a = math.radians(ang)
    for s in (-1, 1):
        ty, tx = y + s * 0.18 * ry * math.cos(a), x + s * 0.18 * ry * math.sin(a)
        c.paint(c.ellipse(ty, tx, ry * 0.15, rx * 0.2, ang), "hypo", LABEL_ORGAN, 0.5)
    return {"y": y, "x": x, "ry": ry, "rx": rx, "thickness": th, "angle": ang, "brain_gain": brain_gain}


def _bladder(c: Canvas, rng: np.random.Generator) -> None:
    """One large anechoic rounded cavity with a bright wall (strong posterior
    enhancement), uterus or prostate behind it, gas-filled bowel at the sides."""
    c.texture = 0.15
    top = draw_skin_layers(c, rng, muscle=True)
    y, x = c.at(top + rng.uniform(0.25, 0.35), rng.uniform(-0.15, 0.15))
    ry, rx = c.px(rng.uniform(0.16, 0.24)), c.px(rng.uniform(0.25, 0.36))
    ang = rng.uniform(-10, 10)
    pw = rng.uniform(2.5, 3.5)
    c.paint(c.ellipse(y, x, ry + 3, rx + 3, ang, power=pw), "fascia")
    c.paint(c.ellipse(y, x, ry, rx, ang, power=pw), "fluid", LABEL_FLUID)
    # Uterus / prostate behind the bladder.
    c.paint(c.ellipse(y + ry + c.px(0.1), x, c.px(0.08), c.px(rng.uniform(0.12, 0.2)), ang), "parenchyma", LABEL_ORGAN, 0.8)
    for s in (-1, 1):  # bowel gas: bright arcs with dirty shadows at the sides
        if rng.random() < 0.6:
            by, bx = c.at(rng.uniform(0.35, 0.6), s * rng.uniform(0.75, 0.95))
            c.paint(c.ellipse(by, bx, c.px(0.04), c.px(0.06)), "air", LABEL_BRIGHT, atten=rng.uniform(20, 60))


def _other(c: Canvas, rng: np.random.Generator) -> None:
    """Unspecified anatomy: random layers and blobs of random tissues."""
    c.texture = rng.uniform(0.2, 0.5)
    c.fill("tissue", rng.uniform(0.6, 1.3))
    if rng.random() < 0.7:
        draw_skin_layers(c, rng, muscle=rng.random() < 0.5)
    for _ in range(rng.integers(0, 4)):
        a = rng.uniform(0.1, 0.9)
        c.paint(c.layer(a, a + rng.uniform(0.02, 0.2), rng, 0.05), str(rng.choice(["fat", "muscle", "gland", "fascia"])))
    kinds = ["fluid", "hypo", "bright", "gland", "fat"]
    labels = {"fluid": LABEL_FLUID, "hypo": LABEL_LESION, "bright": LABEL_BRIGHT, "gland": LABEL_ORGAN, "fat": None}
    for _ in range(rng.integers(0, 5)):
        k = str(rng.choice(kinds))
        y, x = c.at(rng.uniform(0.15, 0.9), rng.uniform(-0.9, 0.9))
        irr = [(rng.uniform(0, 0.15), rng.uniform(0, 6.3)) for _ in range(3)]
        c.paint(c.ellipse(y, x, c.px(rng.uniform(0.02, 0.12)), c.px(rng.uniform(0.02, 0.15)), rng.uniform(0, 180), irr), k, labels[k])


@dataclass(frozen=True)
class SceneRecipe:
    """How to draw one anatomy: its probe (geometry and sector kind) and painter."""

    geometry: str
    probe: str | None
    draw: Callable[[Canvas, np.random.Generator], None]


#: Scene recipe per anatomy path (paths from the ontology, region/organ/structure).
SCENE_RECIPES: dict[str, SceneRecipe] = {
    "thorax/breast": SceneRecipe("linear", None, _breast),
    "thorax/heart/apical four-chamber": SceneRecipe("sector", "phased", _heart_a4c),
    "thorax/heart/apical two-chamber": SceneRecipe("sector", "phased", _heart_a2c),
    "head & neck/thyroid": SceneRecipe("linear", None, _thyroid),
    "head & neck/carotid artery": SceneRecipe("linear", None, _carotid),
    "abdomen/liver": SceneRecipe("sector", "convex", _liver),
    "abdomen/kidney": SceneRecipe("sector", "convex", _kidney),
    "pelvis/bladder": SceneRecipe("sector", "convex", _bladder),
    "fetus/fetal head": SceneRecipe("sector", "convex", draw_fetal_head),
    "other": SceneRecipe("sector", None, _other),  # geometry drawn at random
}

#: Anatomy paths the phantom covers (exact ontology path strings).
PRETRAIN_ANATOMIES: list[str] = list(SCENE_RECIPES)


def make_phantom_image(
    rng: np.random.Generator,
    size: int = 256,
    geometry: str | None = None,
    organ: str = "other",
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic ultrasound image of an anatomy.

    Args:
        rng: random generator; the same generator state gives the same image.
        size: side length in pixels (square image).
        geometry: ``"sector"`` or ``"linear"``; None uses the anatomy's usual probe
            (e.g. linear for thyroid, sector for heart; random for ``"other"``).
        organ: an anatomy path of :data:`PRETRAIN_ANATOMIES`, or an ancestor of some
            (e.g. ``"thorax/heart"``: one of its covered descendants, drawn at random).

    Returns:
        ``(image, label)``: uint8 grey image (size, size), 0 outside the field of view;
        uint8 label mask (size, size) with the classes of :data:`LABEL_NAMES`.

    Raises:
        ValueError: unknown anatomy or geometry.
    """
    if organ not in SCENE_RECIPES:
        matches = [p for p in PRETRAIN_ANATOMIES if p.startswith(organ + "/")]
        if not matches:
            raise ValueError(f"no phantom for anatomy {organ!r}; known: {PRETRAIN_ANATOMIES}")
        organ = matches[int(rng.integers(len(matches)))]
    recipe = SCENE_RECIPES[organ]
    if geometry is None:
        geometry = recipe.geometry
        if organ == "other":
            geometry = "linear" if rng.random() < 0.4 else "sector"
    canvas = make_canvas(rng, size, geometry, recipe.probe if geometry == "sector" else None)
    recipe.draw(canvas, rng)
    image = render_bmode(canvas, rng)
    label = np.where(canvas.fov, canvas.label, 0).astype(np.uint8)
    return image, label


def coarsen_anatomy(path: str, levels: int = 1) -> str | None:
    """The ancestor ``levels`` levels up (``"thorax/heart/apical four-chamber"`` ->
    ``"thorax/heart"``); None when nothing is left (no anatomy label)."""
    parts = path.split("/")
    if levels >= len(parts):
        return None
    return "/".join(parts[:-levels])


# --------------------------------------------------------------------------------------
# Demo data sets (one generator per task / bundle)
# --------------------------------------------------------------------------------------


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an (H, W) uint8 array as an 8-bit grey PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)
