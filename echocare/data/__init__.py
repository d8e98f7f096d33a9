"""Deprecated: ``echocare.data`` was split into :mod:`echocare.io`, :mod:`echocare.datasets`,
:mod:`echocare.phantoms` and the task packages under :mod:`echocare.tasks` (see docs/architecture.md,
"Moved"). Its names stay importable from here for one release, with a ``DeprecationWarning``."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED: dict[str, str] = {
    "AnatomyLabeld": "echocare.tasks.pretrain.augment",
    "ClassLabeld": "echocare.tasks.supervised.data",
    "DatalistError": "echocare.datasets.datalist",
    "EvalSpacingd": "echocare.tasks.supervised.data",
    "LabelMapError": "echocare.tasks.supervised.data",
    "LoadClipd": "echocare.tasks.supervised.data",
    "LoadFramed": "echocare.tasks.supervised.data",
    "LoadLabelMapd": "echocare.tasks.supervised.data",
    "LoadUltrasound": "echocare.io.loaders",
    "LoadUltrasoundd": "echocare.io.loaders",
    "PRETRAIN_ANATOMIES": "echocare.phantoms.renderer",
    "RandColorJitterd": "echocare.tasks.pretrain.augment",
    "RandGrayscaled": "echocare.tasks.pretrain.augment",
    "RandResizedCropd": "echocare.tasks.pretrain.augment",
    "RegressionOutputd": "echocare.tasks.regression.data",
    "RegressionTargetd": "echocare.tasks.regression.data",
    "ResumableSampler": "echocare.datasets.samplers",
    "UltrasoundReadError": "echocare.io.readers",
    "check_image_size": "echocare.datasets.datalist",
    "class_weights": "echocare.tasks.supervised.data",
    "clip_frame_count": "echocare.tasks.supervised.data",
    "count_frames": "echocare.io.readers",
    "datalist_info": "echocare.tasks.supervised.data",
    "detect_format": "echocare.io.readers",
    "expand_frames": "echocare.tasks.supervised.data",
    "generate_demo_data": "echocare.phantoms.demo",
    "iter_frames": "echocare.io.readers",
    "list_inputs": "echocare.datasets.datalist",
    "load_datalist": "echocare.datasets.datalist",
    "load_regression_datalist": "echocare.tasks.regression.data",
    "load_task_datalist": "echocare.tasks.supervised.data",
    "make_phantom_image": "echocare.phantoms.renderer",
    "mask_values_for": "echocare.tasks.supervised.data",
    "read_clip": "echocare.tasks.supervised.data",
    "read_label_map": "echocare.tasks.supervised.data",
    "read_metadata": "echocare.io.readers",
    "read_ultrasound": "echocare.io.readers",
    "regression_inputs": "echocare.tasks.regression.data",
    "subsample_training": "echocare.tasks.supervised.data",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'echocare.data' has no attribute {name!r}")
    warnings.warn(f"echocare.data.{name} moved to {_MOVED[name]}; import it from there", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
