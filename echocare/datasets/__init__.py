"""Datasets: benchmark converters, curation, datalist loading and checks, samplers."""

from echocare.datasets.datalist import DatalistError, check_image_size, list_inputs, load_datalist
from echocare.datasets.samplers import ResumableSampler

__all__ = ["DatalistError", "ResumableSampler", "check_image_size", "list_inputs", "load_datalist"]
