"""Input and output: readers (images, DICOM, video, NIfTI), loading transforms, DICOM SEG/SR/SC writers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Each exported name and its module, imported on first use: importing ``echocare.io.readers``
#: (curation's workers) then does not load the MONAI transforms of ``loaders``.
_EXPORTS = {
    "LoadUltrasound": "echocare.io.loaders",
    "LoadUltrasoundd": "echocare.io.loaders",
    "UltrasoundReadError": "echocare.io.readers",
    "count_frames": "echocare.io.readers",
    "detect_format": "echocare.io.readers",
    "iter_frames": "echocare.io.readers",
    "read_metadata": "echocare.io.readers",
    "read_ultrasound": "echocare.io.readers",
}

__all__ = ["LoadUltrasound", "LoadUltrasoundd", "UltrasoundReadError", "count_frames", "detect_format", "iter_frames", "read_metadata", "read_ultrasound"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from echocare.io.loaders import LoadUltrasound, LoadUltrasoundd
    from echocare.io.readers import UltrasoundReadError, count_frames, detect_format, iter_frames, read_metadata, read_ultrasound
