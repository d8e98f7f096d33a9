"""MONAI transforms that load ultrasound images, DICOMs, videos and NIfTI files.

:class:`LoadUltrasoundd` (dictionary) and :class:`LoadUltrasound` (array) wrap
:func:`echocare.io.readers.read_ultrasound` so that any bundle's training and
inference pipelines take the same inputs.

Output layout (channel first, float32 in [0, 1], row 0 at the top of the image):

* one selected frame (``frames="first"``, ``"middle"``, ``"last"`` or an int) ->
  ``(3, H, W)``: channel = RGB, spatial = (H, W);
* several frames (``frames="all"``, ``("every", N)`` or a list of ints) ->
  ``(F, 3, H, W)``: MONAI then sees F as the channel axis and ``(3, H, W)`` as a 3D
  spatial shape, so spatial transforms take 3 sizes, e.g. ``Resized(spatial_size=(3,
  64, 64))`` resizes every frame to 64x64 and keeps the colour axis. The shape depends
  on the *kind* of selection, never on the file: ``"all"`` on a still image gives
  ``(1, 3, H, W)``, so a batch never mixes ranks.

Note on saving: MONAI's ``PILWriter`` swaps the two spatial axes by default (MONAI's
own PNG reader returns ``(W, H)``); with these ``(3, H, W)`` tensors save PNGs with
``SaveImaged(..., output_ext=".png")`` and
``.set_options(write_kwargs={"reverse_indexing": False})`` (NIfTI output needs no
change).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import MetaKeys

from echocare.io.readers import UltrasoundReadError, read_ultrasound_chw

__all__ = ["FramesSpec", "LoadUltrasound", "LoadUltrasoundd"]

#: ``"first"``, ``"middle"``, ``"last"``, ``"all"``, an int, ``("every", N)`` or a
#: sequence of ints.
FramesSpec = Union[str, int, tuple, Sequence[int]]

# Keys added to the meta dict with ``with_metadata=True``. Missing values are NaN /
# "" rather than None so that MONAI's default collate can batch the meta dicts.
MEASUREMENT_KEYS = ("pixel_spacing_mm", "frame_time_ms", "num_frames", "source_format",
                    "photometric_interpretation")


def _parse_frames(frames: FramesSpec) -> tuple[Any, bool]:
    """-> (selection for read_ultrasound or a named position, whether it is a single frame)."""
    if isinstance(frames, str):
        if frames in ("first", "middle", "last"):
            return frames, True
        if frames == "all":
            return None, False
        raise ValueError(f"frames must be 'first', 'middle', 'last', 'all', an int or ('every', N); got {frames!r}")
    if isinstance(frames, (int, np.integer)) and not isinstance(frames, bool):
        return int(frames), True
    if isinstance(frames, (tuple, list)) and len(frames) == 2 and frames[0] == "every":
        step = int(frames[1])
        if step < 1:
            raise ValueError(f"('every', N) needs N >= 1, got {step}")
        return slice(None, None, step), False
    if isinstance(frames, (tuple, list)) and all(isinstance(i, (int, np.integer)) for i in frames):
        return [int(i) for i in frames], False
    raise ValueError(f"frames must be 'first', 'middle', 'last', 'all', an int or ('every', N); got {frames!r}")


def _load(path: str | os.PathLike[str], frames: FramesSpec, with_metadata: bool) -> MetaTensor:
    selection, single = _parse_frames(frames)
    if isinstance(selection, str):
        selection = {"first": 0, "last": -1}.get(selection, selection)
        if selection == "middle":
            from echocare.io.readers import count_frames

            selection = count_frames(path) // 2
    # (F, 3, H, W): channel first, the layout MONAI transforms expect (read_ultrasound's
    # (F, H, W, 3) values, without the channel-last copy).
    chw, info = read_ultrasound_chw(path, frames=selection, with_metadata=True)
    if single:
        chw = chw[0]
    spatial = chw.shape[1:]
    spacing = info.get("pixel_spacing_mm")
    row_mm, col_mm = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
    # The affine carries the physical spacing when known, so that MONAI's Spacingd
    # can resample to millimetres; its rank follows MONAI's spatial rank.
    diag = [row_mm, col_mm, 1.0] if single else [1.0, row_mm, col_mm, 1.0]
    affine = torch.diag(torch.tensor(diag, dtype=torch.float64))
    meta: dict[str, Any] = {
        "filename_or_obj": str(path),
        MetaKeys.SPATIAL_SHAPE: np.asarray(spatial),
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
        MetaKeys.AFFINE: affine,
        MetaKeys.ORIGINAL_AFFINE: affine.clone(),
    }
    if with_metadata:
        meta["pixel_spacing_mm"] = torch.tensor(
            [float(v) for v in spacing] if spacing else [float("nan"), float("nan")], dtype=torch.float64
        )
        ft = info.get("frame_time_ms")
        meta["frame_time_ms"] = float(ft) if ft is not None else float("nan")
        meta["num_frames"] = int(info.get("num_frames", 1))
        meta["source_format"] = str(info.get("source_format", ""))
        meta["photometric_interpretation"] = str(info.get("photometric_interpretation") or "")
    return MetaTensor(torch.from_numpy(chw), meta=meta)


class LoadUltrasound(Transform):
    """Load one ultrasound file as a channel-first float32 ``MetaTensor`` in [0, 1].

    Args:
        frames: ``"first"`` (default), ``"middle"``, ``"last"`` or an int index -> one
            frame, shape ``(3, H, W)``; ``"all"``, ``("every", N)`` or a list of
            indices -> ``(F, 3, H, W)``.
        with_metadata: add ``pixel_spacing_mm`` (tensor ``[row, col]`` in mm, NaN if
            unknown), ``frame_time_ms`` (NaN if unknown), ``num_frames`` (in the file),
            ``source_format`` and ``photometric_interpretation`` ("" unless DICOM) to
            the tensor's meta. No patient attribute is ever added.

    Raises:
        UltrasoundReadError: missing, unreadable or unsupported file.
    """

    def __init__(self, frames: FramesSpec = "first", with_metadata: bool = False) -> None:
        _parse_frames(frames)  # fail at construction, not at the first sample
        self.frames = frames
        self.with_metadata = with_metadata

    def __call__(self, path: str | os.PathLike[str]) -> MetaTensor:
        return _load(path, self.frames, self.with_metadata)


class LoadUltrasoundd(MapTransform):
    """Dictionary version of :class:`LoadUltrasound`: replaces each key's path by its image.

    Args:
        keys: keys whose values are file paths (images, DICOMs, videos, NIfTI).
        frames: frame selection, see :class:`LoadUltrasound` (shapes ``(3, H, W)`` for
            one frame, ``(F, 3, H, W)`` for several).
        with_metadata: add measurement metadata to each MetaTensor's meta.
        allow_missing_keys: skip keys absent from the dict instead of raising.

    Values that are already tensors or arrays are passed through unchanged, so that
    the same pipeline takes pre-loaded data (e.g. in inference from memory).
    """

    def __init__(
        self,
        keys: KeysCollection,
        frames: FramesSpec = "first",
        with_metadata: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadUltrasound(frames=frames, with_metadata=with_metadata)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (torch.Tensor, np.ndarray)):
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise UltrasoundReadError(str(value), f"key {key!r} holds {type(value).__name__}, not a file path")
            d[key] = self.loader(value)
        return d
