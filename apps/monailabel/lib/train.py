"""MONAI Label train task: fine-tunes a bundle on the labels annotators saved, through the
bundle's own ``train.yaml`` (``python -m monai.bundle run training``), tracked in MLflow."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from echocare.bundle import bundle_dir
from lib.bundles import TASKS, bundle_config, bundle_metadata, bundle_names
from lib.labels import labelled_items, task_datalist
from lib.validation import ENHANCEMENT_TRAIN_FIELDS, TRAIN_FIELDS, validate_request

__all__ = ["EchoCareTrain"]

logger = logging.getLogger(__name__)


class EchoCareTrain(TrainTask):
    """Train bundle ``name`` on the datastore's final labels.

    The labels become a datalist (``<output_dir>/monailabel/datalist.json``; bad items are
    reported and skipped, see :func:`lib.labels.task_datalist`), then the bundle's
    ``training`` runs with ``--datalist`` pointing at it and ``--tracking mlflow``: the best
    checkpoint lands in ``<output_dir>/models/model.pt``, the file the infer task serves
    (it reloads it when it changes), and the run in the bundle's MLflow store
    (``<output_dir>/mlruns.db`` unless ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` says
    otherwise).

    Request options (``POST /train/<name>``): ``max_epochs``, ``val_split`` (fraction held out
    for validation; 0 validates on the training labels), ``pretrained`` (start from the served
    checkpoint when it exists, else from the app's ``pretrained_path`` encoder or scratch),
    ``label_tag`` (which saved labels: ``final`` by default; give class labels their own tag
    when the same studies also hold masks; enhancement reads ``target_tag`` instead, default
    ``target``: the high-quality images saved as labels of the low-quality ones), ``seed``, ``device``, ``tracking_uri``,
    ``tracking_experiment_name``, ``run_name``.

    Every request is checked against :attr:`request_fields` first (unknown fields and bad
    values raise :class:`lib.validation.RequestFieldError` naming the field); the values reach
    the bundle config as plain data, never as ``$`` expressions or ``@`` references.

    Args:
        name: bundle name.
        overrides: bundle config ids to set (``output_dir``, ``network_size``, ...).
    """

    #: The request fields this task reads, with their validators (enhancement:
    #: ``ENHANCEMENT_TRAIN_FIELDS``, set per instance).
    request_fields = TRAIN_FIELDS

    def __init__(self, name: str, overrides: Mapping[str, Any]) -> None:
        super().__init__(bundle_metadata(name)["description"])
        self.name = name
        self.task = TASKS[name]
        self.overrides = dict(overrides)
        self.config_file = os.path.join(bundle_dir(name), "configs", "train.yaml")
        parser = bundle_config(name, "train.yaml", self.overrides)
        self.class_names = bundle_names(parser)  # classes, landmark names, or none
        if self.task == "enhancement":
            self.request_fields = ENHANCEMENT_TRAIN_FIELDS
        self.output_dir = os.path.abspath(str(parser.get_parsed_content("output_dir")))
        self.max_epochs = int(parser.get_parsed_content("max_epochs"))

    def info(self) -> dict[str, Any]:
        return {"description": self.description, "config": self.config(), "bundle": self.name}

    def config(self) -> dict[str, Any]:
        return {
            "max_epochs": self.max_epochs,
            "val_split": 0.2,
            "pretrained": True,
            "seed": 0,
            **({"target_tag": "target"} if self.task == "enhancement" else {"label_tag": "final"}),
            "device": "cuda" if _cuda() else "cpu",
            "tracking_uri": "",
            "tracking_experiment_name": "",
            "run_name": "",
        }

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.output_dir, "models", "model.pt")

    def stats(self) -> dict[str, Any]:
        path = Path(self.output_dir, "monailabel", "train_stats.json")
        return json.loads(path.read_text()) if path.is_file() else {}

    def options(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The task's defaults (:meth:`config`) updated with the request, checked.

        Raises:
            RequestFieldError: an unknown field or a value its validator refuses.
        """
        return {**self.config(), **validate_request(self.request_fields, request)}

    def command_overrides(self, request: Mapping[str, Any], datalist_path: str) -> dict[str, Any]:
        """The bundle ids a train request sets (what ``--id value`` would on the command line).

        The device reaches the config as a plain string id (``request_device``) that a fixed
        expression turns into a ``torch.device``: no request text is ever evaluated.
        """
        options = self.options(request)
        overrides = {
            **self.overrides,
            "datalist": datalist_path,
            "dataset_dir": "",
            "output_dir": self.output_dir,
            "max_epochs": int(options["max_epochs"]),
            "seed": int(options["seed"]),
            "device": "$torch.device(@request_device)",
            "request_device": options["device"],
            "progress_bar": False,
            "run_name": options.get("run_name") or f"monailabel-{time.strftime('%Y%m%d-%H%M%S')}",
        }
        if options.get("pretrained", True) and os.path.isfile(self.checkpoint):
            overrides["checkpoint"] = self.checkpoint  # fine-tune the model being served
            overrides["pretrained_path"] = ""
        if options.get("tracking_uri"):
            overrides["tracking_uri"] = options["tracking_uri"]
        if options.get("tracking_experiment_name"):
            overrides["experiment_name"] = options["tracking_experiment_name"]
        return overrides

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        from monai.bundle import run

        options = self.options(request)
        datalist, skipped = task_datalist(
            labelled_items(datastore, options.get("target_tag") or options["label_tag"]), self.task,
            self.class_names, float(options["val_split"]), int(options["seed"]), image_path=datastore.get_image_uri,
        )
        work = Path(self.output_dir, "monailabel")
        work.mkdir(parents=True, exist_ok=True)
        datalist_path = work / "datalist.json"
        datalist_path.write_text(json.dumps(datalist, indent=1))
        overrides = self.command_overrides(request, str(datalist_path))
        logger.info("%s: training on %d labels (%d for validation), %d skipped; overrides %s", self.name,
                    len(datalist["training"]), len(datalist["validation"]), len(skipped), overrides)
        start = time.time()
        run("training", config_file=self.config_file, tracking="mlflow", **overrides)
        stats = {
            "bundle": self.name,
            "datalist": str(datalist_path),
            "training": len(datalist["training"]),
            "validation": len(datalist["validation"]),
            "skipped": skipped,
            "checkpoint": self.checkpoint,
            "run_name": overrides["run_name"],
            "seconds": round(time.time() - start, 1),
        }
        (work / "train_stats.json").write_text(json.dumps(stats, indent=1))
        return stats


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
