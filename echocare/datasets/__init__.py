"""Datasets: benchmark converters, curation, datalist loading and checks, samplers, the stream of WebDataset shards, the inference dataset that skips unreadable items."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Each exported name and its module, imported on first use: a process that needs one light
#: module (curation's pool and Ray workers, ``shards``) then loads neither torch nor MONAI.
_EXPORTS = {
    "SKIPPED_KEY": "echocare.datasets.skipping",
    "DatalistError": "echocare.datasets.datalist",
    "ResumableSampler": "echocare.datasets.samplers",
    "ShardIndexError": "echocare.datasets.shard_stream",
    "ShardStream": "echocare.datasets.shard_stream",
    "SkipUnreadableDataset": "echocare.datasets.skipping",
    "check_image_size": "echocare.datasets.datalist",
    "list_inputs": "echocare.datasets.datalist",
    "load_datalist": "echocare.datasets.datalist",
    "skipped_row": "echocare.datasets.skipping",
}

__all__ = [
    "SKIPPED_KEY",
    "DatalistError",
    "ResumableSampler",
    "ShardIndexError",
    "ShardStream",
    "SkipUnreadableDataset",
    "check_image_size",
    "list_inputs",
    "load_datalist",
    "skipped_row",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from echocare.datasets.datalist import DatalistError, check_image_size, list_inputs, load_datalist
    from echocare.datasets.samplers import ResumableSampler
    from echocare.datasets.shard_stream import ShardIndexError, ShardStream
    from echocare.datasets.skipping import SKIPPED_KEY, SkipUnreadableDataset, skipped_row
