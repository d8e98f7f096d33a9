"""Ultrasound image degradation: low-quality copies of high-quality images, seeded.

The enhancement bundle learns to undo it: the phantom pairs (``echocare demo-data --task
usenhance``) and the real-data variant (``bundles/usenhance/configs/degraded.yaml``) both
make their low-quality images with :func:`degrade`, and the BRISQUE regressor is fitted on
images degraded to known levels with :func:`degradation_at_level`.

Steps, in order (each a no-op at its neutral value):

1. lower resolution: resampled to ``downscale`` times the size (area averaging) and back
   (bilinear): fine detail is lost, the size is kept;
2. blur: Gaussian of ``blur_sigma`` pixels (a wider point spread function);
3. speckle: multiplied by gamma-distributed noise of mean 1 and standard deviation
   ``speckle``, smoothed over about one pixel so the grains are not single pixels;
4. gain: multiplied by ``gain`` (< 1: a darker, lower-contrast image), clipped to [0, 1].
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

__all__ = [
    "DEGRADATION_RANGES",
    "Degradation",
    "Degraded",
    "degradation_at_level",
    "degrade",
    "random_degradation",
]


@dataclass(frozen=True)
class Degradation:
    """Parameters of one degradation (the neutral values leave the image unchanged).

    Attributes:
        downscale: resolution factor in (0, 1] (1 = full resolution).
        blur_sigma: Gaussian blur in pixels (0 = none).
        speckle: standard deviation of the multiplicative speckle (0 = none).
        gain: intensity factor (1 = unchanged).
    """

    downscale: float = 1.0
    blur_sigma: float = 0.0
    speckle: float = 0.0
    gain: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.downscale <= 1.0:
            raise ValueError(f"downscale must be in (0, 1], got {self.downscale}")
        if self.blur_sigma < 0 or self.speckle < 0 or self.gain <= 0:
            raise ValueError(f"blur_sigma and speckle must be >= 0 and gain > 0, got {self}")


#: Default ranges (neutral end, strongest end) of each parameter, drawn uniformly by
#: :func:`random_degradation`; :func:`degradation_at_level` interpolates along them.
DEGRADATION_RANGES: dict[str, tuple[float, float]] = {
    "downscale": (0.7, 0.35),
    "blur_sigma": (0.5, 2.0),
    "speckle": (0.15, 0.5),
    "gain": (0.85, 0.55),
}


def _ranges(ranges: Mapping[str, Any] | None) -> dict[str, tuple[float, float]]:
    merged = dict(DEGRADATION_RANGES)
    for name, value in (ranges or {}).items():
        if name not in DEGRADATION_RANGES:
            raise ValueError(f"unknown degradation parameter {name!r}; known: {sorted(DEGRADATION_RANGES)}")
        lo, hi = (float(v) for v in value)
        merged[name] = (lo, hi)
    return merged


def random_degradation(rng: np.random.Generator, ranges: Mapping[str, Any] | None = None) -> Degradation:
    """A degradation with every parameter drawn uniformly within ``ranges`` (default
    :data:`DEGRADATION_RANGES`; a mapping overrides some of them)."""
    r = _ranges(ranges)
    return Degradation(**{name: float(rng.uniform(min(lo, hi), max(lo, hi))) for name, (lo, hi) in r.items()})


def degradation_at_level(level: float, ranges: Mapping[str, Any] | None = None) -> Degradation:
    """A degradation of known strength: 0 leaves the image unchanged, 1 is the strongest end
    of every range, values between interpolate from the neutral value (level 0) to it."""
    level = float(level)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"degradation level must be in [0, 1], got {level}")
    neutral = Degradation()
    values = {name: getattr(neutral, name) + level * (hi - getattr(neutral, name)) for name, (_, hi) in _ranges(ranges).items()}
    return Degradation(**values)


def _resample(image: np.ndarray, shape: tuple[int, int], mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(t, size=shape, mode=mode, **kwargs)[0, 0].numpy()


def degrade(image: np.ndarray, degradation: Degradation, rng: np.random.Generator) -> np.ndarray:
    """A low-quality copy of one image.

    Args:
        image: (H, W) or channel-first (C, H, W) float in [0, 1] (channels are averaged:
            ultrasound is grey) or uint8 (H, W).
        degradation: the parameters (see the module docstring for the steps).
        rng: random generator of the speckle; the same state gives the same image.

    Returns:
        float32 in [0, 1], the input's shape ((C, H, W) inputs get the grey result in every channel).
    """
    array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    grey = array.astype(np.float32) / scale
    channels = None
    if grey.ndim == 3:
        channels, grey = grey.shape[0], grey.mean(axis=0)
    if grey.ndim != 2:
        raise ValueError(f"degrade expects an (H, W) or (C, H, W) image, got shape {array.shape}")
    h, w = grey.shape
    out = grey
    if degradation.downscale < 1.0:
        small = (max(1, round(h * degradation.downscale)), max(1, round(w * degradation.downscale)))
        out = _resample(_resample(out, small, "area"), (h, w), "bilinear")
    if degradation.blur_sigma > 0:
        out = ndimage.gaussian_filter(out, degradation.blur_sigma, mode="nearest")
    if degradation.speckle > 0:
        shape_k = 1.0 / degradation.speckle**2  # gamma(k, 1/k): mean 1, std 1/sqrt(k)
        noise = rng.gamma(shape_k, 1.0 / shape_k, size=(h, w)).astype(np.float32)
        # Smoothing shrinks the spread; rescale so the standard deviation stays `speckle`.
        smooth = ndimage.gaussian_filter(noise - 1.0, 0.7, mode="wrap")
        std = float(smooth.std())
        out = out * (1.0 + smooth * (degradation.speckle / std if std > 0 else 0.0))
    out = np.clip(out * degradation.gain, 0.0, 1.0).astype(np.float32)
    if channels is not None:
        out = np.repeat(out[None], channels, axis=0)
    return out


class Degraded(Randomizable, MapTransform):
    """Make the low-quality ``image`` of a pair from its high-quality ``source_key`` image.

    Used where only high-quality images exist (the real-data variant): ``d[output_key]`` =
    :func:`degrade` of ``d[source_key]`` (a (C, H, W) tensor in [0, 1]) with parameters drawn
    by :func:`random_degradation`.

    Args:
        source_key: the high-quality image (kept as the target).
        output_key: where the degraded image goes.
        ranges: parameter ranges (see :data:`DEGRADATION_RANGES`).
        fixed: draw the parameters and the speckle from a seed of ``seed`` and the item's
            ``id_key`` (its file), so that an item is degraded the same way in every run
            (validation, figures); otherwise from the transform's random state (training:
            a new degradation each epoch).
        seed: seed of the fixed mode.
        id_key: item key naming the item in the fixed mode (default the source's file name).
    """

    def __init__(
        self,
        source_key: str = "target",
        output_key: str = "image",
        ranges: Mapping[str, Any] | None = None,
        fixed: bool = False,
        seed: int = 0,
        id_key: str | None = None,
    ) -> None:
        MapTransform.__init__(self, [source_key])
        self.source_key, self.output_key = source_key, output_key
        self.ranges = _ranges(ranges)
        self.fixed, self.seed, self.id_key = bool(fixed), int(seed), id_key
        self._rng_seed = 0

    def randomize(self, data: Any = None) -> None:
        self._rng_seed = int(self.R.randint(0, 2**31 - 1))

    def _item_name(self, d: Mapping[Hashable, Any]) -> str:
        if self.id_key and d.get(self.id_key):
            return str(d[self.id_key])
        source = d[self.source_key]
        return str(getattr(source, "meta", {}).get("filename_or_obj", "")) if hasattr(source, "meta") else ""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.fixed:
            digest = hashlib.sha256(self._item_name(d).encode()).digest()
            rng = np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])
        else:
            self.randomize()
            rng = np.random.default_rng(self._rng_seed)
        source = d[self.source_key]
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        low = degrade(array, random_degradation(rng, self.ranges), rng)
        meta = dict(getattr(source, "meta", {}) or {})
        d[self.output_key] = MetaTensor(torch.from_numpy(low), meta=meta)
        return d

