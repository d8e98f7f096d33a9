"""Per-image segmentation scores (Dice, normalized surface Dice) on MONAI's implementations.

``segmentation_scores`` scores one 2D label map against its reference; ``SegmentationScored``
does the same inside an evaluator's postprocessing, writing the scores into each decollated
item so that ``MeanOfOutput(key="mean_dice")`` (and ``dice_<class>``, ``nsd_<class>``,
``mean_nsd``) give dataset means.

Conventions (the same everywhere, also in ``summary.json``):

- Scores are per foreground class; background (index 0 of ``class_names``) is never scored.
- A class absent from both the prediction and the reference scores 1.0 for Dice and NSD
  (nothing to find, nothing found: a perfect answer; MONAI leaves NaN there, which would
  silently drop such images from the dataset mean). A class present in only one of them
  scores 0.0 for both.
- ``mean_dice`` / ``mean_nsd`` are the unweighted means over the foreground classes of this
  image, after the convention above, so they are never NaN.
- NSD (Nikolov et al. 2021) is the fraction of boundary pixels of either mask lying within
  ``tolerance`` of the other mask's boundary; distances are Euclidean in the units of
  ``spacing`` (the (row, col) size of one pixel; default (1, 1), i.e. pixels).
- Key names: ``dice_<name>``, ``nsd_<name>`` with the class name lower-cased and spaces
  replaced by ``_`` (``"left kidney"`` -> ``dice_left_kidney``).

Where: ``SegmentationScored`` scores on the network's grid (cheap; the bundles' validation
during training, which picks the best checkpoint); ``SegmentationScoredAtOriginalSize``
resamples the prediction to each image's original size, as the inference writer does, and
scores it against the mask file read at its own size (the bundles' evaluation, whose figures
are reported). On a coarse grid a tolerance of 2 original pixels is finer than one grid
pixel, so grid NSD is far too low: a circle down- and up-sampled through 128 px scores about
0.5 on the grid and above 0.9 at 300x300.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice
from monai.transforms import MapTransform

from echocare.tasks.supervised.data import original_pixel_size, read_label_map
from echocare.tasks.supervised.writers import probabilities_to_mask

__all__ = [
    "SegmentationScored",
    "SegmentationScoredAtOriginalSize",
    "class_key",
    "segmentation_case_fields",
    "segmentation_scores",
]

ArrayLike = np.ndarray | torch.Tensor


def class_key(name: str) -> str:
    """Class name as used in metric keys: lower case, spaces -> ``_`` (``"Left kidney"`` -> ``left_kidney``)."""
    return "_".join(str(name).strip().lower().split())


def segmentation_case_fields(class_names: Sequence[str]) -> list[str]:
    """Columns of a segmentation evaluation's ``per_case.csv``: ``case``, ``mean_dice``,
    ``mean_nsd``, then ``dice_<class>``, ``nsd_<class>`` per foreground class (``class_names[1:]``),
    as :class:`SegmentationScored` writes them."""
    return ["case", "mean_dice", "mean_nsd"] + [f"{k}_{class_key(c)}" for c in class_names[1:] for k in ("dice", "nsd")]


def _label_map(x: ArrayLike, what: str) -> torch.Tensor:
    """(H, W) or (1, H, W) integer labels -> (H, W) long tensor on the CPU."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach()).cpu()
    t = t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t  # drop MetaTensor metadata
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"{what} must be an (H, W) or (1, H, W) label map, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        # labels that went through float transforms (resampling, MetaTensor casts) may be 0.9999...
        t = torch.round(t)
    return t.long()


def _spacing_tuple(spacing: Any) -> tuple[float, float] | None:
    """(row, col) pixel size from a list/tuple/tensor/array (also a decollated list of 0-d tensors)."""
    if spacing is None:
        return None
    if isinstance(spacing, torch.Tensor):
        values = spacing.detach().cpu().reshape(-1).tolist()
    elif isinstance(spacing, np.ndarray):
        values = spacing.reshape(-1).tolist()
    else:
        values = [float(torch.as_tensor(v).reshape(-1)[0]) for v in spacing]
    if len(values) != 2:
        raise ValueError(f"spacing must give (row, col) pixel size, got {spacing!r}")
    row, col = (float(v) for v in values)
    if not (row > 0 and col > 0):
        raise ValueError(f"spacing must be positive, got {(row, col)}")
    return row, col


def segmentation_scores(
    pred: ArrayLike,
    label: ArrayLike,
    class_names: Sequence[str],
    spacing: Sequence[float] | ArrayLike | None = None,
    tolerance: float = 2.0,
) -> dict[str, float]:
    """Dice and normalized surface Dice of one 2D prediction, per foreground class and averaged.

    Args:
        pred: predicted integer label map, (H, W) or (1, H, W), numpy or torch.
        label: reference integer label map, same shape.
        class_names: all class names, background first (``["background", "nodule"]``);
            labels must lie in ``[0, len(class_names))``.
        spacing: (row, col) size of one pixel (e.g. mm); ``None`` means (1, 1), i.e. pixels.
        tolerance: NSD boundary tolerance, in the units of ``spacing``.

    Returns:
        ``{"dice_<name>": ..., "nsd_<name>": ... for each foreground class, "mean_dice": ...,
        "mean_nsd": ...}``, all Python floats in [0, 1]; see the module docstring for the
        empty-class conventions.
    """
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError("class_names must list background and at least one foreground class")
    p, y = _label_map(pred, "pred"), _label_map(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"pred {tuple(p.shape)} and label {tuple(y.shape)} differ in shape")
    for t, what in ((p, "pred"), (y, "label")):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{what} has labels outside [0, {num_classes}) for classes {list(class_names)}")
    spacing_rc = _spacing_tuple(spacing) or (1.0, 1.0)

    # one-hot [1, C-1, H, W] of the foreground classes: MONAI's metrics take one-hot batches
    classes = torch.arange(1, num_classes).view(1, -1, 1, 1)
    p_oh = (p.unsqueeze(0).unsqueeze(0) == classes).float()
    y_oh = (y.unsqueeze(0).unsqueeze(0) == classes).float()

    # ignore_empty=False already gives our convention (1 if both empty, 0 if only one is)
    dice = compute_dice(p_oh, y_oh, include_background=True, ignore_empty=False)[0]

    p_any = p_oh.flatten(2).any(-1)[0]
    y_any = y_oh.flatten(2).any(-1)[0]
    both = torch.nonzero(p_any & y_any).flatten()
    nsd = torch.where(p_any | y_any, 0.0, 1.0)  # conventions for the classes MONAI cannot score
    if len(both):
        # only classes present on both sides go to MONAI: the others are fixed by convention,
        # and MONAI would warn about each empty mask
        nsd[both] = compute_surface_dice(
            p_oh[:, both],
            y_oh[:, both],
            class_thresholds=[float(tolerance)] * len(both),
            include_background=True,
            spacing=list(spacing_rc),
        )[0].cpu()

    scores: dict[str, float] = {}
    for i, name in enumerate(class_names[1:]):
        scores[f"dice_{class_key(name)}"] = float(dice[i])
        scores[f"nsd_{class_key(name)}"] = float(nsd[i])
    scores["mean_dice"] = float(dice.mean())
    scores["mean_nsd"] = float(nsd.mean())
    return scores


class SegmentationScored(MapTransform):
    """Dict transform writing ``segmentation_scores`` of ``d[pred_key]`` vs ``d[label_key]`` into ``d``.

    Meant for an evaluator's ``postprocessing`` on each decollated item, followed by
    ``MeanOfOutput(key="mean_dice")`` etc. as Ignite metrics.

    - ``d[pred_key]``: (C, H, W) with C > 1 (probabilities, logits or one-hot; argmax over
      channel 0) or (1, H, W) integer labels (rounded, so a one-channel probability is cut
      at 0.5).
    - ``d[label_key]``: (1, H, W) integer labels or (C, H, W) one-hot (argmax over channel 0).
    - ``d[spacing_key]`` (optional): (row, col) pixel size at the evaluated resolution, as a
      list/tuple/tensor/array; absent or ``None`` means pixels.

    Adds ``dice_<name>``, ``nsd_<name>`` per foreground class and ``mean_dice``, ``mean_nsd``
    (Python floats) and returns the (shallow-copied) dict.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        pred_key: str = "pred",
        label_key: str = "label",
        spacing_key: str = "eval_spacing",
        tolerance: float = 2.0,
    ) -> None:
        super().__init__(keys=[pred_key, label_key])
        self.class_names = list(class_names)
        self.pred_key = pred_key
        self.label_key = label_key
        self.spacing_key = spacing_key
        self.tolerance = float(tolerance)

    @staticmethod
    def _to_labels(x: Any) -> torch.Tensor:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if t.ndim == 3 and t.shape[0] > 1:
            return torch.argmax(t, dim=0)
        return t

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        scores = segmentation_scores(
            self._to_labels(d[self.pred_key]),
            self._to_labels(d[self.label_key]),
            self.class_names,
            spacing=_spacing_tuple(d.get(self.spacing_key)),
            tolerance=self.tolerance,
        )
        d.update(scores)
        return d


class SegmentationScoredAtOriginalSize(SegmentationScored):
    """``SegmentationScored`` at each image's original size, against the mask file itself.

    The class probabilities ``d[pred_key]`` (C, h, w) are resampled bilinearly to
    ``d[size_key]`` (H, W) before the argmax, exactly as
    :class:`~echocare.tasks.supervised.SegmentationPredictionWriter` writes inference masks
    (:func:`~echocare.tasks.supervised.probabilities_to_mask`); the reference is read again from
    the file its label came from (``d[label_key].meta["filename_or_obj"]``, set by
    :class:`~echocare.tasks.supervised.LoadLabelMapd`), without resizing. NSD distances use
    ``d[spacing_key]``, the item's (row, col) pixel size in mm when known, else original pixels.

    Args:
        class_names: class names, background first.
        mask_values: stored value of each class in the mask files (the bundle's ``mask_values``).
        pred_key: class probabilities or logits on the network's grid, (C, h, w), C > 1.
        label_key: the resized reference label (a ``MetaTensor`` naming its file).
        size_key: (H, W) of the original image (set by :class:`~echocare.tasks.supervised.EvalSpacingd`).
        spacing_key: the item's (row, col) pixel size in mm, NaN when unknown.
        tolerance: NSD tolerance, in mm when the spacing is known, else in original pixels.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        mask_values: Sequence[int] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        size_key: str = "original_size",
        spacing_key: str = "spacing",
        tolerance: float = 2.0,
    ) -> None:
        super().__init__(class_names, pred_key=pred_key, label_key=label_key, spacing_key=spacing_key, tolerance=tolerance)
        self.mask_values = list(mask_values) if mask_values is not None else None
        self.size_key = size_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask_file = getattr(d[self.label_key], "meta", {}).get("filename_or_obj")
        if not mask_file:
            raise ValueError(f"`{self.label_key}` does not name its mask file (meta filename_or_obj), so it cannot "
                             "be read at its original size")
        reference = read_label_map(mask_file, self.mask_values, len(self.class_names))
        if self.size_key not in d:
            raise ValueError(f"{mask_file}: the item has no `{self.size_key}` (EvalSpacingd records it)")
        pred = torch.as_tensor(d[self.pred_key]).detach()
        if pred.ndim != 3 or pred.shape[0] < 2:
            raise ValueError(f"{mask_file}: `{self.pred_key}` must be (C, h, w) class probabilities, got {tuple(pred.shape)}")
        prediction = probabilities_to_mask(pred, d[self.size_key])
        if prediction.shape != reference.shape:
            raise ValueError(f"{mask_file}: mask is {reference.shape[0]}x{reference.shape[1]} pixels but its image's "
                             f"original size is {prediction.shape[0]}x{prediction.shape[1]}")
        d.update(segmentation_scores(prediction, reference, self.class_names,
                                     spacing=original_pixel_size(d.get(self.spacing_key)), tolerance=self.tolerance))
        return d
