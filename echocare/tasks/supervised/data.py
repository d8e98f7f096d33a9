"""Data for the fine-tuning bundles: checked datalists, label maps, class labels, clips.

Segmentation items are ``{"image", "label"}`` with ``label`` a mask file of integer
classes; classification items are ``{"image", "label"}`` with ``label`` a class index and
``image`` an image, a DICOM, a video or a folder of frames (a clip). See docs/architecture.md,
"Datalist keys".
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from echocare.datasets.datalist import load_datalist, raise_problems
from echocare.io.readers import UltrasoundReadError, count_frames, read_ultrasound

__all__ = [
    "LabelMapError",
    "LoadClipd",
    "LoadLabelMapd",
    "ClassLabeld",
    "EvalSpacingd",
    "original_pixel_size",
    "check_task_item",
    "LoadFramed",
    "class_weights",
    "clip_frame_count",
    "clip_indices",
    "datalist_info",
    "expand_frames",
    "first_frame_size",
    "load_task_datalist",
    "mask_values_for",
    "read_clip",
    "read_label_map",
    "subsample_training",
]

TASKS = ("segmentation", "classification")
_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


class LabelMapError(ValueError):
    """A mask that cannot be used: the message names the file and the problem."""


# ----------------------------------------------------------------------------- datalists


def datalist_info(datalist: str | os.PathLike[str]) -> dict[str, Any]:
    """The top-level entries of a datalist JSON that are not item lists (``class_names``,
    ``mask_values``, ``fold``, ...); ``{}`` when the file is missing or not a JSON object."""
    try:
        content = json.loads(Path(datalist).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict):
        return {}
    return {k: v for k, v in content.items() if not isinstance(v, list) or k in ("class_names", "landmark_names")}


def mask_values_for(datalist: str | os.PathLike[str], class_names: Sequence[str]) -> list[int] | None:
    """Stored mask value of each class, from the datalist's ``mask_values`` (``{"nodule": 255, ...}``).

    Returns ``None`` (values are the class indices) when the datalist has no ``mask_values``.
    Classes missing from ``mask_values`` keep their index.
    """
    values = datalist_info(datalist).get("mask_values")
    if not isinstance(values, dict):
        return None
    lowered = {str(k).lower(): int(v) for k, v in values.items()}
    return [lowered.get(name.lower(), index) for index, name in enumerate(class_names)]


def subsample_training(
    items: Sequence[dict[str, Any]], fraction: float, seed: int = 0, stratify_key: str | None = "label"
) -> list[dict[str, Any]]:
    """A seeded, stratified subset: ``round(fraction * n)`` items of each stratum (at least one).

    Strata are the values of ``stratify_key`` (class indices for classification; for
    segmentation the set of classes present in the mask, ``classes_present``); items
    without it form one stratum. The order of the kept items is the original order.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(items)
    strata: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        strata[json.dumps(item.get(stratify_key)) if stratify_key else ""].append(position)
    rng = np.random.default_rng(seed)
    kept: list[int] = []
    for name in sorted(strata):
        members = strata[name]
        count = max(1, int(round(fraction * len(members))))
        kept.extend(rng.permutation(members)[:count].tolist())
    return [items[i] for i in sorted(kept)]


def class_weights(
    items: Sequence[dict[str, Any]], num_classes: int, device: str | torch.device | None = None
) -> torch.Tensor:
    """Inverse-frequency class weights (N / (C * n_c)) of a classification list, as a (C,)
    float tensor (on ``device``) for ``CrossEntropyLoss(weight=...)``; a class with no item gets weight 0.
    """
    counts = np.bincount([int(item["label"]) for item in items], minlength=int(num_classes)).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _check_segmentation_item(item: dict[str, Any], values: Sequence[int] | None, num_classes: int) -> str | None:
    """None when the mask reads, matches the image's size and holds only known classes."""
    try:
        mask = read_label_map(item["label"], values, num_classes)
    except (LabelMapError, UltrasoundReadError) as error:
        return str(error)
    try:
        height, width = first_frame_size(item["image"])
    except UltrasoundReadError as error:
        return str(error)
    if mask.shape != (height, width):
        return (
            f"mask {item['label']} is {mask.shape[0]}x{mask.shape[1]} pixels but its image {item['image']} "
            f"is {height}x{width}"
        )
    item["classes_present"] = sorted(int(c) for c in np.unique(mask) if c > 0)
    return None


def first_frame_size(path: str) -> tuple[int, int]:
    """(height, width) in pixels of the first frame of an image, DICOM, video or clip folder."""
    if Path(path).is_dir():
        frame = read_clip(path, [0])
        return int(frame.shape[1]), int(frame.shape[2])
    frame = read_ultrasound(path, frames=0)
    return int(frame.shape[1]), int(frame.shape[2])


def load_task_datalist(
    datalist: str | os.PathLike[str],
    key: str,
    task: str,
    class_names: Sequence[str],
    base_dir: str | os.PathLike[str] | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    check_images: bool = True,
    mask_values: Sequence[int] | None = None,
    keep_keys: Sequence[str] = ("case",),
    label_key: str = "label",
    num_threads: int = 4,
) -> list[dict[str, Any]]:
    """Read and check one list of a segmentation or classification datalist.

    Every problem is collected and raised at once, naming the datalist and each bad item:
    missing files, unreadable images, a mask whose size differs from its image, a mask
    value or class index outside ``class_names``, a missing ``label``, an empty list.

    Args:
        datalist: MONAI datalist JSON.
        key: ``training``, ``validation`` or ``test``.
        task: ``segmentation`` or ``classification``.
        class_names: the bundle's classes (segmentation: background first).
        base_dir: root of relative paths (``dataset_dir``); default the datalist's folder.
        train_fraction: keep this fraction of the items, stratified by class (see
            :func:`subsample_training`); applied to any list, meant for ``training``.
        seed: seed of the subsample.
        check_images: decode every image and mask once now.
        mask_values: stored value of each class in the masks (e.g. ``[0, 255]``); default
            the class index (see :func:`read_label_map` for 0/255 binary masks).
        keep_keys: item keys kept besides ``image``, ``label`` and ``spacing``
            (missing ones become ``""`` so that batches collate).
        label_key: the datalist key holding the label (e.g. ``mask`` for BUS-BRA's lesion
            masks); it is returned as ``label``.

    Returns:
        Items ``{"image": abs path, "label": abs mask path | int, "spacing": [row, col] mm
        (segmentation; NaN when unknown), **keep_keys}``.

    Raises:
        DatalistError: as above.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    num_classes = len(class_names)
    file_keys = ("image", label_key) if task == "segmentation" else ("image",)
    # Resolves paths and reports missing files; clips may be folders of frames.
    raw = load_datalist(datalist, key, base_dir=base_dir, image_keys=file_keys, check_images=False)
    problems: list[str] = []
    items: list[dict[str, Any]] = []
    for position, source in enumerate(raw):
        item: dict[str, Any] = {"image": source["image"]}
        if label_key in source:
            item["label"] = source[label_key]
        if task == "classification":
            label = item.pop("label", None)
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or isinstance(label, float):
                problems.append(f"item {position} ({item.get('image')}): label {label!r} is not a class index")
            elif not 0 <= int(label) < num_classes:
                problems.append(
                    f"item {position} ({item.get('image')}): label {int(label)} is outside the class list "
                    f"{list(class_names)} (indices 0..{num_classes - 1})"
                )
            else:
                item["label"] = int(label)
        else:
            spacing = source.get("spacing")
            item["spacing"] = [float(s) for s in spacing][:2] if spacing else [float("nan"), float("nan")]
        for name in keep_keys:
            value = source.get(name, "")
            item[name] = "" if value is None else str(value)
        items.append(item)
    if not problems and check_images:
        problems.extend(_check_files(items, task, mask_values, num_classes, num_threads))
    raise_problems(datalist, key, problems)
    stratify = "label" if task == "classification" else "classes_present"
    kept = subsample_training(items, train_fraction, seed, stratify)
    for item in kept:  # a list of varying length would not collate
        item.pop("classes_present", None)
    return kept


def check_task_item(
    item: dict[str, Any], task: str, num_classes: int, mask_values: Sequence[int] | None = None
) -> str | None:
    """None when one item (absolute paths) can be trained on, else the problem, naming the file.

    Segmentation: the image decodes, its ``label`` mask reads, holds only known classes and has
    the image's size (adds ``classes_present`` to the item). Classification: the image (or clip)
    decodes; the class index itself is checked by :func:`load_task_datalist`.
    """
    if task == "segmentation":
        return _check_segmentation_item(item, mask_values, num_classes)
    try:
        first_frame_size(item["image"])
    except UltrasoundReadError as error:
        return str(error)
    return None


def _check_files(items, task, mask_values, num_classes, num_threads) -> list[str]:
    def check(position_item):
        position, item = position_item
        problem = check_task_item(item, task, num_classes, mask_values)
        return None if problem is None else f"item {position}: {problem}"

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return [p for p in pool.map(check, enumerate(items)) if p is not None]


# ----------------------------------------------------------------------------- label maps


def read_label_map(
    path: str | os.PathLike[str], values: Sequence[int] | None = None, num_classes: int | None = None
) -> np.ndarray:
    """A mask file as an (H, W) int64 array of class indices.

    Reads PNG/BMP/GIF/TIFF (first channel of colour files, ``1``-bit masks as 0/1), NIfTI
    (the first 2D slice) and ``.npy``. ``values`` maps stored values to classes: class
    ``k`` is stored as ``values[k]``. Without it the stored value is the class, except
    that a two-class mask stored as 0/255 (the usual binary export) reads as 0/1.

    Raises:
        LabelMapError: unreadable file, a stored value not in ``values``, or a class
            index ``>= num_classes``; the message names the file and the values.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelMapError(f"{path}: mask file not found")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel

            array = np.asarray(nibabel.load(str(path)).dataobj)
            while array.ndim > 2:
                array = array[..., 0]
            array = array.T  # NIfTI stores (x, y); images are (row, col)
        elif name.endswith(".npy"):
            array = np.load(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                if image.mode == "P":
                    image = image.convert("L")
                array = np.asarray(image)
            if array.ndim == 3:
                array = array[..., 0]
    except Exception as error:  # noqa: BLE001 - any decoder failure is the same user-facing problem
        raise LabelMapError(f"{path}: cannot read the mask ({type(error).__name__}: {error})") from error
    if array.ndim != 2:
        raise LabelMapError(f"{path}: a mask must be 2D, got shape {array.shape}")
    stored = array.astype(np.int64)
    found = np.unique(stored)
    if values is not None:
        lookup = {int(v): k for k, v in enumerate(values)}
        unknown = [int(v) for v in found if int(v) not in lookup]
        if unknown:
            raise LabelMapError(
                f"{path}: mask values {unknown[:10]} are outside the class list (stored values {list(values)})"
            )
        out = np.zeros_like(stored)
        for value, cls in lookup.items():
            out[stored == value] = cls
        return out
    if num_classes == 2 and set(found.tolist()) <= {0, 255}:
        return (stored == 255).astype(np.int64)
    if num_classes is not None and (found.min() < 0 or found.max() >= num_classes):
        bad = [int(v) for v in found if v < 0 or v >= num_classes]
        raise LabelMapError(f"{path}: mask values {bad[:10]} are outside the class list (0..{num_classes - 1})")
    return stored


class LoadLabelMapd(MapTransform):
    """Replace a mask path by a (1, H, W) float32 ``MetaTensor`` of class indices.

    Run after the image is loaded: the mask must have the image's size (the error names
    both files).

    Args:
        keys: mask keys (usually ``label``).
        image_key: the image the mask belongs to.
        values: stored value of each class (see :func:`read_label_map`).
        num_classes: number of classes, background included.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str = "image",
        values: Sequence[int] | None = None,
        num_classes: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.values = list(values) if values is not None else None
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            mask = read_label_map(path, self.values, self.num_classes)
            image = d.get(self.image_key)
            if image is not None and tuple(image.shape[-2:]) != mask.shape:
                source = getattr(image, "meta", {}).get("filename_or_obj", self.image_key)
                raise LabelMapError(
                    f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} pixels but its image {source} is "
                    f"{image.shape[-2]}x{image.shape[-1]}"
                )
            meta = dict(getattr(image, "meta", {})) if image is not None else {}
            meta["filename_or_obj"] = str(path)
            d[key] = MetaTensor(torch.from_numpy(mask[None].astype(np.float32)), meta=meta)
        return d


def original_pixel_size(spacing: Any) -> tuple[float, float]:
    """(row, col) size of one pixel of the original image: an item's ``spacing`` in mm when it
    is known, else (1.0, 1.0), i.e. original pixels.

    ``spacing`` may be ``None``, a (row, col) list, tuple, array or tensor, or what a decollated
    batch makes of a list (a list of 0-d tensors); NaN in it (the datalist's "unknown") gives pixels.
    """
    if spacing is None:
        return 1.0, 1.0
    values = [float(torch.as_tensor(v).reshape(-1)[0]) for v in spacing]
    if len(values) < 2:
        raise ValueError(f"spacing must give the (row, col) size of a pixel, got {spacing!r}")
    if any(np.isnan(values[:2])):
        return 1.0, 1.0
    return values[0], values[1]


class EvalSpacingd(MapTransform):
    """Record the size of one pixel of the network's grid, for surface metrics.

    Sets ``d[output_key]`` = (row, col) pixel size at ``spatial_size``: the item's
    ``spacing`` in mm when it is known (not NaN), else in pixels of the original image,
    so that NSD tolerances are in mm or in original pixels. Also sets ``original_size``
    (H, W) of the image. Run before resizing.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        image_key: str = "image",
        spacing_key: str = "spacing",
        output_key: str = "eval_spacing",
    ) -> None:
        super().__init__(image_key)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.image_key = image_key
        self.spacing_key = spacing_key
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        height, width = (int(s) for s in d[self.image_key].shape[-2:])
        row_mm, col_mm = original_pixel_size(d.get(self.spacing_key))
        d[self.output_key] = torch.tensor(
            [row_mm * height / self.spatial_size[0], col_mm * width / self.spatial_size[1]], dtype=torch.float64
        )
        d["original_size"] = torch.tensor([height, width])
        return d


class ClassLabeld(MapTransform):
    """Class index -> 0-d int64 tensor (what ``CrossEntropyLoss`` takes), range-checked."""

    def __init__(self, keys: KeysCollection = "label", num_classes: int | None = None) -> None:
        super().__init__(keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = int(d[key])
            if self.num_classes is not None and not 0 <= value < self.num_classes:
                raise ValueError(
                    f"{d.get('image', '?')}: label {value} is outside the class list (0..{self.num_classes - 1})"
                )
            d[key] = torch.tensor(value, dtype=torch.long)
        return d


# ----------------------------------------------------------------------------- clips


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _FRAME_SUFFIXES)


def clip_frame_count(path: str | os.PathLike[str]) -> int:
    """Frames of a clip: a multi-frame file (DICOM, video, TIFF, NIfTI) or a folder of frame images."""
    path = Path(path)
    if path.is_dir():
        return len(_frame_files(path))
    return count_frames(path)


def read_clip(path: str | os.PathLike[str], indices: Sequence[int]) -> np.ndarray:
    """Frames ``indices`` of a clip as (F, H, W, 3) float32 in [0, 1].

    A folder is read as one frame per image file in name order (frames exported as
    ``frame_000.png, frame_001.png, ...``).

    Raises:
        UltrasoundReadError: unreadable clip, empty folder, frames of different sizes.
    """
    path = Path(path)
    if not path.is_dir():
        return read_ultrasound(path, frames=list(indices))
    files = _frame_files(path)
    if not files:
        raise UltrasoundReadError(path, f"folder holds no frame image ({', '.join(_FRAME_SUFFIXES)})")
    frames = [read_ultrasound(files[i], frames=0)[0] for i in indices]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise UltrasoundReadError(path, f"frames of different sizes {sorted(shapes)}")
    return np.stack(frames)


def clip_indices(
    count: int,
    num_frames: int,
    random: bool = False,
    rng: np.random.RandomState | None = None,
    first: int = 0,
    last: int | None = None,
    include_ends: bool = False,
) -> list[int]:
    """``num_frames`` indices spread over frames ``first`` .. ``last`` (inclusive; default the
    whole clip of ``count`` frames): the centres of equal segments, or (``random``) one random
    frame per segment; frames repeat when the span is shorter.

    ``include_ends``: evenly spaced from ``first`` to ``last`` both included (for a sequence
    whose end frames matter, e.g. end-diastole to end-systole); ``random`` then moves each
    inner index by up to half the spacing. ``first > last`` gives indices in decreasing order
    (time runs from ``first`` to ``last``).
    """
    last = count - 1 if last is None else int(last)
    first = int(first)
    if not (0 <= first < count and 0 <= last < count):
        raise ValueError(f"frame span {first}..{last} is outside the clip's {count} frames")
    if first > last:
        return clip_indices(count, num_frames, random, rng, last, first, include_ends)[::-1]
    if random and rng is None:
        rng = np.random.RandomState()
    if include_ends:
        picks = np.linspace(first, last, num_frames)
        if random and num_frames > 2:
            half = (last - first) / (num_frames - 1) / 2
            picks[1:-1] += np.asarray([rng.uniform(-half, half) for _ in range(num_frames - 2)])
        return [int(min(last, max(first, round(p)))) for p in picks]
    edges = np.linspace(first, last + 1, num_frames + 1)
    if random:
        picks = [rng.uniform(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    else:
        picks = (edges[:-1] + edges[1:]) / 2
    return [min(last, int(p)) for p in picks]


class LoadClipd(Randomizable, MapTransform):
    """Load a clip as a (F, 3, H, W) float32 tensor at ``spatial_size`` (area resampling).

    ``num_frames`` frames are taken evenly over the clip (``random=True``: one random frame
    from each of ``num_frames`` equal segments, a standard clip augmentation). A still
    image gives its one frame repeated. Randomizable, so caching datasets stop before it
    and MONAI's ``set_determinism`` seeds it. The meta keeps ``frame_indices``.

    Args:
        keys: keys holding clip paths (files or frame folders, cine DICOMs, videos, NIfTI 2D+t).
        num_frames: frames per clip F.
        spatial_size: output (H, W).
        random: random frame per segment (training) instead of the segment centre.
        seed: seed of the frame sampling.
        include_ends: frames evenly spaced with the span's first and last frames included
            (see :func:`clip_indices`).
        span_keys: item keys of the first and last frame to sample between (e.g.
            ``("ed_frame", "es_frame")``: end-diastole to end-systole); an item whose keys are
            missing, empty or negative uses the whole clip.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_frames: int,
        spatial_size: Sequence[int],
        random: bool = False,
        seed: int = 0,
        include_ends: bool = False,
        span_keys: Sequence[str] | None = None,
    ) -> None:
        MapTransform.__init__(self, keys)
        if int(num_frames) < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = int(num_frames)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.random = random
        self.include_ends = bool(include_ends)
        self.span_keys = tuple(span_keys) if span_keys else None
        self.set_random_state(seed=seed)

    def _span(self, d: Mapping[Hashable, Any], count: int) -> tuple[int, int | None]:
        if not self.span_keys:
            return 0, None
        values = [d.get(k) for k in self.span_keys]
        if any(v is None or v == "" or int(v) < 0 for v in values):
            return 0, None
        first, last = (int(v) for v in values)
        if first >= count or last >= count:
            raise UltrasoundReadError(d.get("image", "?"), f"{self.span_keys} = ({first}, {last}) but the clip has {count} frames")
        return first, last

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            count = clip_frame_count(path)
            first, last = self._span(d, count)
            indices = clip_indices(count, self.num_frames, self.random, self.R, first, last, self.include_ends)
            frames = torch.from_numpy(np.ascontiguousarray(read_clip(path, indices).transpose(0, 3, 1, 2)))
            frames = F.interpolate(frames, size=self.spatial_size, mode="area")
            d[key] = MetaTensor(frames, meta={"filename_or_obj": str(path), "frame_indices": indices})
        return d


# ----------------------------------------------------------------------------- inference inputs


def expand_frames(items: Sequence[dict[str, Any]], per_frame: bool = True) -> list[dict[str, Any]]:
    """One inference item per input frame: multi-frame files (cine DICOM, video, TIFF stacks)
    become items with ``frame`` = 0..F-1; still images keep ``frame`` 0. ``per_frame=False``
    keeps one item per file (clip models, ``num_frames`` 1: one result per file). Adds
    ``num_frames`` (frames in the file) to every item.

    An input whose frames cannot be counted (an unreadable header) stays one item, frame 0:
    loading it fails again in :class:`~echocare.datasets.SkipUnreadableDataset`, which skips it
    and gives it its ``predictions.json`` row with the reason, so that one bad file neither
    stops a batch job nor vanishes from its results.
    """
    out: list[dict[str, Any]] = []
    for item in items:
        try:
            count = clip_frame_count(item["image"])
        except UltrasoundReadError:
            out.append({**item, "frame": 0, "num_frames": 1})
            continue
        if per_frame:
            out.extend({**item, "frame": int(f), "num_frames": int(count)} for f in range(count))
        else:  # one result for the whole clip: writers name it after the file alone
            out.append({**item, "frame": 0, "num_frames": 1})
    return out


class LoadFramed(MapTransform):
    """Load frame ``d[frame_key]`` of each key's file (or frame folder) as a (3, H, W) float32
    ``MetaTensor`` in [0, 1]; the meta keeps ``filename_or_obj`` and ``frame``. Inference
    items from :func:`expand_frames` carry the frame index."""

    def __init__(self, keys: KeysCollection = "image", frame_key: str = "frame") -> None:
        super().__init__(keys)
        self.frame_key = frame_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        frame = int(d.get(self.frame_key, 0))
        for key in self.key_iterator(d):
            path = d[key]
            array = read_clip(path, [frame])[0].transpose(2, 0, 1)
            d[key] = MetaTensor(
                torch.from_numpy(np.ascontiguousarray(array)), meta={"filename_or_obj": str(path), "frame": frame}
            )
        return d
