"""Pretraining phantoms (``echocare demo-data --task pretrain``): scenes of every anatomy of
:data:`~echocare.phantoms.renderer.PRETRAIN_ANATOMIES`, with full, coarse or no anatomy labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from echocare.phantoms.renderer import PRETRAIN_ANATOMIES, coarsen_anatomy, make_phantom_image, save_png

__all__ = ["generate_pretrain", "validation_flags"]


def validation_flags(n: int, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean (n,) validation flags: round(n * val_fraction) random items, and at least
    one in each split when n >= 2 so both datalist lists exist."""
    n_val = int(round(n * val_fraction))
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    flags = np.zeros(n, bool)
    flags[rng.permutation(n)[:n_val]] = True
    return flags


def generate_pretrain(
    out: Path,
    n: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    sizes: Sequence[int] | None = None,
    coarse_fraction: float = 0.2,
    unlabelled_fraction: float = 0.1,
) -> dict[str, list[dict]]:
    """Pretraining images with (partial) anatomy labels.

    Anatomies are balanced (cycled through :data:`PRETRAIN_ANATOMIES`, shuffled). Of the
    items, ``coarse_fraction`` are labelled one level up (e.g. ``thorax/heart``; only
    paths deeper than a region) and ``unlabelled_fraction`` have no ``anatomy`` key, as
    curated real pools are (the pretraining loss ignores unknown nodes).
    ``sizes``: optional side lengths drawn per image for variety (default ``image_size``).
    Item ``i`` depends only on ``(seed, i)``, not on ``n``.
    """
    master = np.random.default_rng(seed)
    order = master.permutation(len(PRETRAIN_ANATOMIES))
    val = validation_flags(n, val_fraction, master)
    lists: dict[str, list[dict]] = {"training": [], "validation": []}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        anatomy = PRETRAIN_ANATOMIES[order[i % len(order)]]
        size = int(rng.choice(sizes)) if sizes else image_size
        image, _ = make_phantom_image(rng, size, organ=anatomy)
        name = f"images/pretrain_{i:04d}.png"
        save_png(image, out / name)
        item: dict = {"image": name}
        u = rng.random()
        if u < unlabelled_fraction:
            pass  # no anatomy key at all
        elif u < unlabelled_fraction + coarse_fraction and anatomy.count("/") >= 1:
            item["anatomy"] = coarsen_anatomy(anatomy)
        else:
            item["anatomy"] = anatomy
        lists["validation" if val[i] else "training"].append(item)
    return lists
