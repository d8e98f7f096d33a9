"""Dictionary transforms for pretraining: augmentations MONAI lacks and anatomy labels.

All image transforms take channel-first (C, H, W) tensors with intensities in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from echocare.ontology import AnatomyOntology

__all__ = ["AnatomyLabeld", "RandColorJitterd", "RandGrayscaled", "RandResizedCropd"]

# ITU-R BT.601 luma weights, as used by torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _grey(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, H, W) luma."""
    weights = torch.tensor(_LUMA, dtype=image.dtype, device=image.device).reshape(3, 1, 1)
    return (image * weights).sum(dim=0, keepdim=True)


class RandResizedCropd(RandomizableTransform, MapTransform):
    """With probability ``prob``, crop a random box (area fraction ``scale``, aspect ``ratio``)
    and resize it back to the input size (torchvision's RandomResizedCrop, for MONAI dicts).

    Args:
        keys: image keys, cropped with the same box. Shapes (C, H, W) are kept.
        prob: probability of cropping.
        scale: range of the box area as a fraction of the image area.
        ratio: range of the box aspect ratio (width / height), sampled log-uniformly.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.scale = scale
        self.ratio = ratio
        self._box: tuple[int, int, int, int] | None = None

    def _draw_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(self.R.randint(0, height - h + 1))
                left = int(self.R.randint(0, width - w + 1))
                return top, left, h, w
        return 0, 0, height, width  # fall back to the whole image, as torchvision does

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        box = None
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            if box is None:
                box = self._draw_box(*image.shape[-2:])
            top, left, h, w = box
            crop = image[..., top : top + h, left : left + w]
            resized = F.interpolate(
                crop.unsqueeze(0).float(), size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False, antialias=True
            )[0]
            d[key] = resized.clamp(0, 1).to(image.dtype)
        return d


class RandGrayscaled(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace an RGB image (3, H, W) by its luma repeated 3 times."""

    def __init__(self, keys: KeysCollection, prob: float = 0.2, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            if image.shape[0] == 3:
                d[key] = _grey(image).expand_as(image).clone()
        return d


class RandColorJitterd(RandomizableTransform, MapTransform):
    """With probability ``prob``, weak brightness, contrast and saturation jitter.

    Each factor is drawn uniformly from ``[1 - s, 1 + s]`` for strength ``s``; brightness
    scales intensities, contrast blends with the mean grey level, saturation blends with
    the luma image. The result is clipped to [0, 1].
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.2,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.strengths = (brightness, contrast, saturation)
        self.factors = (1.0, 1.0, 1.0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.factors = tuple(float(self.R.uniform(1 - s, 1 + s)) for s in self.strengths)  # type: ignore[assignment]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        brightness, contrast, saturation = self.factors
        for key in self.key_iterator(d):
            original = torch.as_tensor(d[key])
            image = original.float() * brightness
            image = (image - image.mean()) * contrast + image.mean()
            if image.shape[0] == 3:
                image = (image - _grey(image)) * saturation + _grey(image)
            d[key] = image.clamp(0, 1).to(original.dtype)
        return d


class AnatomyLabeld(MapTransform):
    """Turn an item's anatomy path into the label and known-mask vectors of the ontology.

    Adds ``anatomy_labels`` (N,) float32 and ``anatomy_known`` (N,) bool; an item without
    ``anatomy`` (or with an empty one) is unlabelled: every node unknown. The path string
    itself is kept (as "" when absent) for per-level accuracy.
    """

    def __init__(self, ontology: AnatomyOntology, key: str = "anatomy") -> None:
        super().__init__([key], allow_missing_keys=True)
        self.ontology = ontology
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        path = d.get(self.key) or ""
        labels, known = self.ontology.label_vector(path or None)
        d[self.key] = path
        d["anatomy_labels"] = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        d["anatomy_known"] = torch.from_numpy(np.asarray(known, dtype=bool))
        return d

