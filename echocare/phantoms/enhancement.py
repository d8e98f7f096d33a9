"""Phantom low/high-quality ultrasound pairs in the USenhance 2023 release layout.

``echocare demo-data --task usenhance --out DIR`` writes::

    DIR/usenhance/train_datasets/<organ>/high_quality/<organ>_<i>.png   phantom image (8-bit grey)
    DIR/usenhance/train_datasets/<organ>/low_quality/<organ>_<i>.png    the same image degraded

and converts it with :func:`~echocare.datasets.converters.convert_usenhance` (re-split by case
with ``val_fraction``), paths relative to ``DIR``. The high-quality image is a phantom of
:func:`~echocare.phantoms.renderer.make_phantom_image`; the low-quality one is
:func:`~echocare.tasks.enhancement.degradation.degrade` with parameters drawn by
:func:`~echocare.tasks.enhancement.degradation.random_degradation` (lower resolution, blur, speckle, gain),
the same degradation as the real-data variant. Item ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echocare.datasets.converters import convert_usenhance, grouped_split
from echocare.tasks.enhancement.degradation import degrade, random_degradation
from echocare.phantoms.renderer import save_png, make_phantom_image
from echocare.phantoms.layout import fresh_phantom_dir

__all__ = ["USENHANCE_ORGANS", "generate_usenhance"]

#: USenhance's organ folders and the phantom anatomy drawn for each.
USENHANCE_ORGANS: dict[str, str] = {
    "thyroid": "head & neck/thyroid",
    "breast": "thorax/breast",
    "liver": "abdomen/liver",
    "kidney": "abdomen/kidney",
    "carotid": "head & neck/carotid artery",
}

_TAG = 15  # separates this generator's random stream from the other phantoms'


def generate_usenhance(
    out: Path,
    n: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    organs: Sequence[str] = tuple(USENHANCE_ORGANS),
    degradation_ranges: Mapping[str, Any] | None = None,
) -> dict:
    """Write ``n`` phantom pairs (organs cycled) and return their datalist (see the module docstring).

    Options: ``organs`` (folder names of :data:`USENHANCE_ORGANS`), ``degradation_ranges``
    (overrides of :data:`~echocare.tasks.enhancement.degradation.DEGRADATION_RANGES`).
    """
    if n < 2:
        raise ValueError("usenhance needs n >= 2 (one pair to train on, one to validate)")
    unknown = [o for o in organs if o not in USENHANCE_ORGANS]
    if unknown:
        raise ValueError(f"unknown usenhance organs {unknown}; known: {sorted(USENHANCE_ORGANS)}")
    root = fresh_phantom_dir(Path(out) / "usenhance")
    for i in range(n):
        organ = organs[i % len(organs)]
        rng = np.random.default_rng([seed, _TAG, i])
        high, _ = make_phantom_image(rng, image_size, organ=USENHANCE_ORGANS[organ])
        low = degrade(high, random_degradation(rng, degradation_ranges), rng)
        name = f"{organ}_{i:04d}.png"
        save_png(high, root / "train_datasets" / organ / "high_quality" / name)
        save_png(np.round(low * 255.0).astype(np.uint8), root / "train_datasets" / organ / "low_quality" / name)
    datalist = convert_usenhance(root, None, None, seed)
    items = sorted(datalist["training"] + datalist["validation"], key=lambda it: it["image"])
    datalist["training"], datalist["validation"] = grouped_split(items, seed, val_fraction)
    for key in ("training", "validation"):
        for item in datalist[key]:
            for k in ("image", "target"):
                item[k] = posixpath.join("usenhance", item[k])
    datalist["description"] = (
        f"PHANTOM data (echocare demo-data --task usenhance, seed {seed}) in the USenhance 2023 layout under "
        f"usenhance/: {n} pairs of {image_size}px phantom images ({', '.join(organs)}) and degraded copies "
        f"(echocare.tasks.enhancement.degradation: lower resolution, blur, speckle, gain). Re-split by case, "
        f"{val_fraction:.0%} to validation (seed {seed})."
    )
    return datalist
