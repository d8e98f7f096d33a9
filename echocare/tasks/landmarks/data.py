"""Landmark data: checked datalists, coordinate mapping between image and network grid,
Gaussian heatmap targets.

Items are ``{"image", "landmarks": [[x, y], ...]}`` with a fixed number K of points in
pixels of the original image (x right, y down; pixel centres at integer coordinates, as the
converters write them), optional ``spacing`` [row mm, col mm] (docs/architecture.md,
"Datalist keys").

The network runs on a square grid of ``spatial_size`` (h, w) pixels; images are resized to
it with area averaging, so the centre of grid pixel j is at original coordinate
``(j + 0.5) * W / w - 0.5``. :func:`original_to_grid` and :func:`grid_to_original` are
that map and its inverse (per axis: the aspect ratio may change), used to build targets
and to undo the resize before scoring.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from echocare.datasets.datalist import load_datalist, raise_problems
from echocare.io.readers import UltrasoundReadError
from echocare.tasks.supervised.data import first_frame_size, datalist_info, subsample_training

__all__ = [
    "BRAIN_LANDMARK_NAMES",
    "LandmarkHeatmapd",
    "gaussian_heatmaps",
    "grid_to_original",
    "landmark_names_for",
    "load_landmark_datalist",
    "original_to_grid",
]

#: The 24 fetal brain landmarks of the ``brain_landmark`` bundle (its default
#: ``landmark_names``), in datalist order: the column order of the phantom's landmarks.csv
#: (:mod:`echocare.phantoms.landmarks` draws them).
BRAIN_LANDMARK_NAMES: list[str] = [
    "skull_outer_anterior",
    "skull_outer_posterior",
    "skull_outer_near",
    "skull_outer_far",
    "skull_inner_anterior",
    "skull_inner_posterior",
    "skull_inner_near",
    "skull_inner_far",
    "falx_anterior",
    "falx_posterior",
    "csp_anterior",
    "csp_posterior",
    "thalamus_near",
    "thalamus_far",
    "frontal_horn_near",
    "frontal_horn_far",
    "atrium_near",
    "atrium_far",
    "choroid_plexus_near",
    "choroid_plexus_far",
    "cerebellum_near",
    "cerebellum_far",
    "vermis",
    "cisterna_magna",
]


def _hw(size: Any) -> tuple[float, float]:
    h, w = (float(s) for s in torch.as_tensor(size).reshape(-1)[:2])
    return h, w


def original_to_grid(points: Any, original_size: Any, grid_size: Any) -> torch.Tensor:
    """(..., 2) points (x, y) in original pixels -> network-grid pixels.

    Args:
        points: (..., 2) x, y.
        original_size: (H, W) of the original image.
        grid_size: (h, w) of the network grid.
    """
    p = torch.as_tensor(points, dtype=torch.float64)
    (big_h, big_w), (h, w) = _hw(original_size), _hw(grid_size)
    scale = torch.tensor([w / big_w, h / big_h], dtype=torch.float64)
    return (p + 0.5) * scale - 0.5


def grid_to_original(points: Any, grid_size: Any, original_size: Any) -> torch.Tensor:
    """(..., 2) points (x, y) on the network grid of (h, w) -> original pixels of (H, W)."""
    p = torch.as_tensor(points, dtype=torch.float64)
    (h, w), (big_h, big_w) = _hw(grid_size), _hw(original_size)
    scale = torch.tensor([big_w / w, big_h / h], dtype=torch.float64)
    return (p + 0.5) * scale - 0.5


def gaussian_heatmaps(points: Any, grid_size: Sequence[int], sigma: float) -> torch.Tensor:
    """(K, h, w) float32 heatmaps, ``exp(-r² / (2 sigma²))`` around each (x, y) grid point
    (peak 1 at the point; sigma in grid pixels). A point outside the grid gives the tail of
    its Gaussian (all but zero when far out)."""
    p = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    h, w = (int(s) for s in grid_size)
    ys = torch.arange(h, dtype=torch.float32)[None, :, None]
    xs = torch.arange(w, dtype=torch.float32)[None, None, :]
    d2 = (xs - p[:, 0, None, None]) ** 2 + (ys - p[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2.0 * float(sigma) ** 2))


class LandmarkHeatmapd(MapTransform):
    """Gaussian heatmap targets on the network grid from the item's original-pixel landmarks.

    Run BEFORE resizing the image: the original size is read from ``d[image_key]``.
    Sets ``d[output_key]`` (K, h, w) float32 heatmaps (a ``MetaTensor`` so that MONAI's
    spatial augmentations move it with the image), ``d["original_size"]`` (H, W),
    ``d[landmarks_key]`` as a (K, 2) float32 tensor (collates; kept in original pixels for
    scoring) and ``d[spacing_key]`` as a (2,) float32 tensor (NaN when unknown).

    Args:
        spatial_size: (h, w) of the network grid.
        sigma: Gaussian standard deviation in grid pixels.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        sigma: float = 2.0,
        landmarks_key: str = "landmarks",
        image_key: str = "image",
        output_key: str = "heatmap",
        spacing_key: str = "spacing",
    ) -> None:
        super().__init__(landmarks_key)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.sigma = float(sigma)
        if not self.sigma > 0:
            raise ValueError(f"heatmap sigma must be > 0 grid pixels, got {sigma}")
        self.landmarks_key, self.image_key = landmarks_key, image_key
        self.output_key, self.spacing_key = output_key, spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        original = tuple(int(s) for s in d[self.image_key].shape[-2:])
        points = torch.as_tensor(np.asarray(d[self.landmarks_key], dtype=np.float32))
        grid = original_to_grid(points, original, self.spatial_size)
        meta = dict(getattr(d[self.image_key], "meta", {}))
        d[self.output_key] = MetaTensor(gaussian_heatmaps(grid, self.spatial_size, self.sigma), meta=meta)
        d[self.landmarks_key] = points
        d["original_size"] = torch.tensor(original)
        spacing = d.get(self.spacing_key)
        d[self.spacing_key] = torch.tensor(
            [float("nan")] * 2 if spacing is None else [float(s) for s in spacing][:2], dtype=torch.float32
        )
        return d


def landmark_names_for(datalist: str | os.PathLike[str], default: Sequence[str] = ()) -> list[str]:
    """The datalist's ``landmark_names`` (the converters write them), else ``default``."""
    names = datalist_info(datalist).get("landmark_names") if datalist else None
    return [str(n) for n in names] if isinstance(names, list) and names else list(default)


def load_landmark_datalist(
    datalist: str | os.PathLike[str],
    key: str,
    num_landmarks: int | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    check_images: bool = True,
    with_sizes: bool = False,
    keep_keys: Sequence[str] = ("case",),
) -> list[dict[str, Any]]:
    """Read and check one list of a landmark datalist.

    Every problem is collected and raised at once, naming the datalist and each bad item:
    missing or unreadable images, ``landmarks`` missing, not a list of [x, y] numbers, not
    finite, or not ``num_landmarks`` long (default: the first item's count), an empty list.

    Args:
        datalist: MONAI datalist JSON.
        key: ``training``, ``validation`` or ``test``.
        num_landmarks: K expected per item.
        base_dir: root of relative paths (``dataset_dir``); default the datalist's folder.
        train_fraction: keep a seeded random fraction of the items (see
            :func:`~echocare.tasks.supervised.data.subsample_training`).
        check_images: decode every image once now.
        with_sizes: add ``original_size`` (H, W) to each item (decodes the images).
        keep_keys: item keys kept besides ``image``, ``landmarks`` and ``spacing``.

    Returns:
        Items ``{"image": abs path, "landmarks": [[x, y], ...], "spacing": [row, col] mm
        (NaN when unknown), **keep_keys}``.
    """
    raw = load_datalist(datalist, key, base_dir=base_dir, image_keys=("image",), check_images=check_images)
    problems: list[str] = []
    items: list[dict[str, Any]] = []
    expected = num_landmarks
    for position, source in enumerate(raw):
        where = f"item {position} ({source.get('image')})"
        points = source.get("landmarks")
        try:
            arr = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.zeros((0, 0))
        if points is None:
            problems.append(f"{where}: no 'landmarks'")
            continue
        if arr.ndim != 2 or arr.shape[1] != 2 or not len(arr):
            problems.append(f"{where}: landmarks must be a list of [x, y] pairs, got {str(points)[:80]}")
            continue
        if not np.isfinite(arr).all():
            problems.append(f"{where}: landmarks hold non-finite values")
            continue
        if expected is None:
            expected = len(arr)
        if len(arr) != expected:
            problems.append(f"{where}: {len(arr)} landmarks, expected {expected}")
            continue
        spacing = source.get("spacing")
        item: dict[str, Any] = {
            "image": source["image"],
            "landmarks": arr.tolist(),
            "spacing": [float(s) for s in spacing][:2] if spacing else [math.nan, math.nan],
        }
        for name in keep_keys:
            value = source.get(name, "")
            item[name] = "" if value is None else str(value)
        if with_sizes:
            try:
                item["original_size"] = list(first_frame_size(item["image"]))
            except UltrasoundReadError as error:
                problems.append(f"{where}: {error}")
                continue
        items.append(item)
    if not raw:
        problems.append("the list is empty")
    raise_problems(datalist, key, problems)
    return subsample_training(items, train_fraction, seed, stratify_key=None)
