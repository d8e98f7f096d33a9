"""Which bundles the app serves, and the bundle config ids that the app's ``--conf`` sets.

Imports nothing from MONAI Label (tested in the project's own environment too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from echocare.bundle import bundle_dir

__all__ = [
    "CLASSIFICATION",
    "OTHER_TASKS",
    "SEGMENTATION",
    "TASKS",
    "bundle_config",
    "bundle_metadata",
    "bundle_names",
    "bundle_overrides",
    "selected_models",
]

#: Segmentation bundles, served as automatic segmentation models.
SEGMENTATION = ("ddti_seg", "musv_seg", "abdomen_seg")
#: Classification bundles, served as classifiers.
CLASSIFICATION = ("busbra_cls", "thyroid_cls", "fll_cls")
#: The other task bundles -> their task kind (``echocare.tasks.<kind>``): served through the
#: bundle's own inference run and writer (see ``lib.infer.BundleRunInfer``).
OTHER_TASKS = {
    "focus_det": "detection",
    "brain_landmark": "landmarks",
    "camus_ef": "regression",
    "usenhance": "enhancement",
    "usreport": "report",
}
#: Bundle name -> task.
TASKS = {
    **{name: "segmentation" for name in SEGMENTATION},
    **{name: "classification" for name in CLASSIFICATION},
    **OTHER_TASKS,
}

#: ``--conf`` keys passed to every bundle config as the id of the same name (the bundles'
#: own defaults apply when a key is not given): the size the checkpoints were trained with,
#: the encoder weights training starts from, and training settings.
CONFIG_IDS = ("network_size", "image_size", "clip_frames", "pretrained_path", "finetune_mode", "batch_size", "num_workers")


def selected_models(value: str | None) -> list[str]:
    """The bundle names of ``--conf models``: ``all`` (the default) or a comma-separated list.

    Raises:
        ValueError: an unknown name (the message lists the served bundles).
    """
    if not value or value.strip().lower() == "all":
        return list(TASKS)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"--conf models: unknown bundle(s) {unknown}; choose from {list(TASKS)} or 'all'")
    return names


#: Config ids whose ``--conf`` values are integers.
INTEGER_IDS = ("image_size", "clip_frames", "num_frames", "batch_size", "num_workers", "max_epochs", "lora_rank")


def bundle_overrides(name: str, conf: Mapping[str, str]) -> dict[str, Any]:
    """Config ids of bundle ``name`` set from the app's ``--conf``.

    ``output_root`` puts each bundle's ``output_dir`` (its ``models/model.pt``, MLflow store,
    predictions) in ``<output_root>/<name>``; without it the bundle's own default applies (the
    bundle folder). The keys of :data:`CONFIG_IDS` apply to every bundle; ``<name>.<id>`` to
    bundle ``name`` only, after them (e.g. ``--conf ddti_seg.checkpoint models:/ddti_seg@champion``).
    """
    overrides: dict[str, Any] = {}
    root = conf.get("output_root")
    if root:
        overrides["output_dir"] = os.path.join(os.path.abspath(root), name)
    chosen = {key: conf.get(key) for key in CONFIG_IDS}
    chosen.update({key[len(name) + 1 :]: value for key, value in conf.items() if key.startswith(f"{name}.")})
    for key, value in chosen.items():
        if value not in (None, ""):
            overrides[key] = int(value) if key in INTEGER_IDS else value
    return overrides


def bundle_config(name: str, config_file: str, overrides: Mapping[str, Any]) -> ConfigParser:
    """Bundle ``name``'s ``configs/<config_file>`` parsed with ``overrides`` applied (ids the
    config does not define are skipped: ``clip_frames`` exists in the clip classifiers only)."""
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir(name), "configs", config_file))
    for key, value in overrides.items():
        if key in parser:
            parser[key] = value
    return parser


def bundle_names(parser: ConfigParser) -> list[str]:
    """What a bundle's outputs are named after: its ``class_names`` (segmentation, classification,
    detection), its ``landmark_names`` (landmarks), or none (EF, enhancement, report)."""
    for key in ("class_names", "landmark_names"):
        if key in parser:
            return [str(name) for name in parser.get_parsed_content(key)]
    return []


def bundle_metadata(name: str) -> dict[str, Any]:
    """Bundle ``name``'s ``configs/metadata.json``."""
    return json.loads(Path(bundle_dir(name), "configs", "metadata.json").read_text())
