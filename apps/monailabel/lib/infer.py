"""MONAI Label infer tasks that run a bundle's own ``inference.yaml``.

The tasks take the network, preprocessing, inferer and postprocessing from the bundle config
(ids ``network``, ``preprocessing``, ``inferer``, ``postprocessing``) and add only what MONAI
Label needs around them: segmentation probabilities become a PNG mask of class indices at the
image's original size (the same function as the bundle's own prediction writer), class
probabilities a JSON result. MONAI Label's ``BundleInferTask`` is not used because it loads
``models/model.pt`` as a plain state dict (our checkpoints may hold LoRA adapters, which the
bundle's ``network`` id merges), reads it from the bundle folder only (ours follow
``output_dir``), and restores masks from image metadata that our loaders do not set.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monai.inferers import Inferer
from monai.transforms import Compose, MapTransform
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from echocare.io.readers import UltrasoundReadError
from echocare.tasks.supervised.writers import probabilities_to_mask
from lib.bundles import TASKS, bundle_config, bundle_metadata
from lib.validation import INFER_FIELDS

__all__ = ["EchoCareInfer", "MaskAtOriginalSized"]

logger = logging.getLogger(__name__)


def _transforms(value: Any) -> list[Callable]:
    """A config's Compose (or single transform, or list) as a list of transforms."""
    if value is None:
        return []
    if isinstance(value, Compose):
        return list(value.transforms)
    return list(value) if isinstance(value, (list, tuple)) else [value]


class MaskAtOriginalSized(MapTransform):
    """``pred``: (C, h, w) class probabilities -> (H, W) uint8 class indices at the item's
    ``original_size`` (set by the segmentation bundles' ``EvalSpacingd``)."""

    def __init__(self, keys: str = "pred", size_key: str = "original_size") -> None:
        super().__init__(keys)
        self.size_key = size_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = probabilities_to_mask(d[key], d.get(self.size_key))
        return d


class EchoCareInfer(BasicInferTask):
    """Inference of bundle ``name`` (a segmentation or classification bundle) for MONAI Label.

    Request parameters besides MONAI Label's: ``frame`` (which frame of a multi-frame file the
    per-frame bundles read; default 0). Results: segmentation -> a PNG of class indices at the
    image's size and ``{"pixels": {class: count}}``; classification -> a JSON file
    ``{"label": class name, "probabilities": {class: p}}`` (the label format the train task
    reads back) with the same content as the result JSON.

    The app checks every request against :attr:`request_fields` before the task runs (see
    ``EchoCareApp.infer``).

    Args:
        name: bundle name (see :data:`lib.bundles.TASKS`).
        overrides: bundle config ids to set (``output_dir``, ``network_size``, ...).
    """

    #: The request fields this task reads (MONAI Label's around it included), with their validators.
    request_fields = INFER_FIELDS

    def __init__(self, name: str, overrides: Mapping[str, Any]) -> None:
        self.name = name
        self.task = TASKS[name]
        self._lock = threading.Lock()
        self.bundle = bundle_config(name, "inference.yaml", overrides)
        self.class_names = list(self.bundle.get_parsed_content("class_names"))
        self.checkpoint = str(self.bundle.get_parsed_content("checkpoint"))
        # What the network loads: the bundle's ONNX model when one is set, else the checkpoint
        # (a file, watched for changes, or a registered model ``models:/NAME@ALIAS``).
        onnx_model = str(self.bundle.get_parsed_content("onnx_model")) if "onnx_model" in self.bundle else ""
        self.weights = onnx_model or self.checkpoint
        self.weights_is_file = not self.weights.startswith("models:/")
        segmentation = self.task == "segmentation"
        labels = {n: i for i, n in enumerate(self.class_names) if i > 0 or not segmentation}
        super().__init__(
            path=self.checkpoint,
            network=None,
            type=InferType.SEGMENTATION if segmentation else InferType.CLASSIFICATION,
            labels=labels,
            dimension=2,
            description=bundle_metadata(name)["description"],
            config={"frame": 0},
        )

    def is_valid(self) -> bool:
        return os.path.isfile(self.weights) if self.weights_is_file else True

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(bundle=self.name, weights=self.weights, class_names=self.class_names)
        return info

    def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str, dict]:
        """MONAI Label's inference; an unreadable image answers HTTP 422 with the reader's
        message (the file and the problem) instead of a bare server error."""
        try:
            return super().__call__(request, callbacks)
        except UltrasoundReadError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None

    def _parsed(self, key: str, device: Any = None) -> Any:
        with self._lock:
            if device is not None:
                self.bundle["device"] = torch.device(device)
            return self.bundle.get_parsed_content(key, lazy=False)

    def pre_transforms(self, data: Mapping[str, Any] | None = None) -> Sequence[Callable]:
        return _transforms(self._parsed("preprocessing"))

    def inferer(self, data: Mapping[str, Any] | None = None) -> Inferer:
        return self._parsed("inferer")

    def post_transforms(self, data: Mapping[str, Any] | None = None) -> Sequence[Callable]:
        post = _transforms(self._parsed("postprocessing"))
        if self.task == "segmentation":
            post.append(MaskAtOriginalSized(keys=self.output_label_key))
        return post

    def _get_network(self, device: Any, data: Mapping[str, Any] | None) -> torch.nn.Module:
        """The bundle's ``network`` (its checkpoint loader) on ``device``; a checkpoint file is
        re-read when it changes (after a train task), a registered model is read once."""
        if self.weights_is_file and not os.path.isfile(self.weights):
            raise FileNotFoundError(f"{self.weights}: no checkpoint for {self.name}; train it first")
        mtime = os.stat(self.weights).st_mtime if self.weights_is_file else 0.0
        cached = self._networks.get(str(device))
        if cached is not None and cached[1] == mtime:
            return cached[0]
        if cached is not None:
            logger.info("%s: %s changed, reloading", self.name, self.weights)
        network = self._parsed("network", device=device)
        network.eval()
        self._networks[str(device)] = (network, mtime)
        return network

    def writer(self, data: Mapping[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        pred = data[self.output_label_key]
        if self.task == "segmentation":
            from PIL import Image

            mask = np.asarray(pred, dtype=np.uint8)
            handle, path = tempfile.mkstemp(suffix=".png", prefix=f"{self.name}_")
            os.close(handle)
            Image.fromarray(mask).save(path)
            pixels = {n: int((mask == k).sum()) for k, n in enumerate(self.class_names) if k > 0}
            return path, {"pixels": pixels, "frame": int(data.get("frame", 0)), "size": list(mask.shape)}
        probs = torch.as_tensor(pred).detach().float().cpu().reshape(-1).tolist()
        best = int(np.argmax(probs))
        result = {
            "label": self.class_names[best],
            "label_index": best,
            "probabilities": {n: round(float(p), 6) for n, p in zip(self.class_names, probs)},
        }
        handle, path = tempfile.mkstemp(suffix=".json", prefix=f"{self.name}_")
        with os.fdopen(handle, "w") as out:
            json.dump(result, out)
        return path, dict(result)
