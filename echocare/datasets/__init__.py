"""Datasets: benchmark converters, curation, datalist loading and checks, samplers, the stream of WebDataset shards, the inference dataset that skips unreadable items."""

from echocare.datasets.datalist import DatalistError, check_image_size, list_inputs, load_datalist
from echocare.datasets.samplers import ResumableSampler
from echocare.datasets.shard_stream import ShardIndexError, ShardStream
from echocare.datasets.skipping import SKIPPED_KEY, SkipUnreadableDataset, skipped_row

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
