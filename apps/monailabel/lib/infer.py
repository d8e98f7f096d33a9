"""MONAI Label infer tasks that run a bundle's own ``inference.yaml``.

Segmentation and classification (:class:`EchoCareInfer`) take the network, preprocessing, inferer and postprocessing from the bundle config
(ids ``network``, ``preprocessing``, ``inferer``, ``postprocessing``) and add only what MONAI
Label needs around them: segmentation probabilities become a PNG mask of class indices at the
image's original size (the same function as the bundle's own prediction writer), class
probabilities a JSON result. MONAI Label's ``BundleInferTask`` is not used because it loads
``models/model.pt`` as a plain state dict (our checkpoints may hold LoRA adapters, which the
bundle's ``network`` id merges), reads it from the bundle folder only (ours follow
``output_dir``), and restores masks from image metadata that our loaders do not set.

The other tasks (:class:`BundleRunInfer`: detection, landmarks, EF, enhancement, report) run the
bundle's whole inference (its ``evaluator``: preprocessing, network, inferer or generation
iteration, postprocessing, and its prediction writer) on the one requested item, and answer
with what the writer wrote, plus a label map drawn from it where the task has one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monai.inferers import Inferer
from monai.transforms import Compose, MapTransform
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from echocare.engines.writers import iteration_pairs
from echocare.io.readers import UltrasoundReadError
from echocare.tasks.detection.writers import ellipse_label_map
from echocare.tasks.landmarks.writers import landmark_label_map
from echocare.tasks.report.data import list_report_cases
from echocare.tasks.supervised.data import clip_frame_count
from echocare.tasks.supervised.writers import probabilities_to_mask
from lib.bundles import OTHER_TASKS, TASKS, bundle_config, bundle_metadata, bundle_names
from lib.validation import INFER_FIELDS, REPORT_INFER_FIELDS, SEQUENCE_INFER_FIELDS

__all__ = ["BundleRunInfer", "EchoCareInfer", "MaskAtOriginalSized", "infer_task"]

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
        self.overrides = dict(overrides)
        self._lock = threading.Lock()
        self.bundle = bundle_config(name, "inference.yaml", overrides)
        self.class_names = bundle_names(self.bundle)
        self.checkpoint = str(self.bundle.get_parsed_content("checkpoint"))
        # What the network loads: the bundle's ONNX model when one is set, else the checkpoint
        # (a file, watched for changes, or a registered model ``models:/NAME@ALIAS``).
        onnx_model = str(self.bundle.get_parsed_content("onnx_model")) if "onnx_model" in self.bundle else ""
        self.weights = onnx_model or self.checkpoint
        self.weights_is_file = not self.weights.startswith("models:/")
        super().__init__(
            path=self.checkpoint,
            network=None,
            type=self.infer_type(),
            labels=self.label_values(),
            dimension=2,
            description=bundle_metadata(name)["description"],
            config={"frame": 0},
        )

    def infer_type(self) -> str:
        """MONAI Label's type of this model (what clients show)."""
        return InferType.SEGMENTATION if self.task == "segmentation" else InferType.CLASSIFICATION

    def label_values(self) -> dict[str, int]:
        """Class name -> its value in the returned label map (segmentation) or its index."""
        return {n: i for i, n in enumerate(self.class_names) if i > 0 or self.task != "segmentation"}

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


class BundleRunInfer(EchoCareInfer):
    """Inference of a detection, landmark, EF, enhancement or report bundle for MONAI Label:
    the bundle's own ``evaluator`` of ``inference.yaml`` on the requested item, with the served
    network, writing into a folder of the request that is removed afterwards.

    Results (the writer's record, without server paths):

    * detection (``focus_det``): a PNG label map of the filled best ellipse of each class
      (0 background, class index + 1; the heart drawn over the thorax) at the image's size, and
      ``{"ellipses": [{"class", "score", "cx", "cy", "semi_major", "semi_minor", "angle"}],
      "best": {class: row}, "ctr", "frame", "size"}`` in original pixels;
    * landmarks (``brain_landmark``): a PNG label map with a small disc per landmark (landmark
      ``k`` as ``k + 1``) and ``{"landmarks": {name: [x, y]}, "frame", "size"}``;
    * EF (``camus_ef``): a JSON file ``{"ef": percent, "unit", "frames_used": [...]}``;
    * enhancement (``usenhance``): the enhanced 8-bit grey PNG at the image's size;
    * report (``usreport``): a JSON file ``{"report": text, "tokens", "score"}``; the request's
      ``image2`` (an image id of the studies folder, resolved by the app) is the second view,
      else the image is used as both.

    Args:
        name: bundle name (see :data:`lib.bundles.OTHER_TASKS`).
        overrides: bundle config ids to set (``output_dir``, ``network_size``, ...).
    """

    def __init__(self, name: str, overrides: Mapping[str, Any]) -> None:
        super().__init__(name, overrides)
        self._run_lock = threading.Lock()  # one bundle run at a time on the shared network
        if self.task == "regression":
            self.request_fields = SEQUENCE_INFER_FIELDS
        elif self.task == "report":
            self.request_fields = REPORT_INFER_FIELDS

    def infer_type(self) -> str:
        if self.task in ("detection", "landmarks"):
            return InferType.SEGMENTATION  # a label map, as the segmentation models return
        return InferType.OTHERS

    def label_values(self) -> dict[str, int]:
        if self.task in ("detection", "landmarks"):
            return {n: i + 1 for i, n in enumerate(self.class_names)}
        return {}

    def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str, dict]:
        """MONAI Label's inference: (result file, result JSON). An input the bundle's dataset
        cannot read answers HTTP 422 with the reason it lists."""
        from monailabel.utils.others.generic import name_to_device

        begin = time.time()
        req = {**self._config, **request}
        device = name_to_device(req.get("device", "cuda"))
        work = Path(tempfile.mkdtemp(prefix=f"{self.name}_run_"))
        try:
            record, source, output = self._run_bundle(self._items(req, work), work, device)
            if record.get("status") == "skipped":
                raise HTTPException(status_code=422, detail=str(record.get("reason")))
            path, result = self._result(record, source)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the request's folder, written by this task only
        result["label_names"] = self.labels
        result["latencies"] = {"total": round(time.time() - begin, 2)}
        return path, result

    def _items(self, request: Mapping[str, Any], work: Path) -> tuple[dict[str, Any], ...]:
        """The bundle's datalist for the request: one item, as the bundle's own ``datalist`` makes it."""
        image = str(request["image"])
        if self.task == "report":
            second = str(request.get("image2") or image)
            listed = work / "case.json"
            listed.write_text(json.dumps({"validation": [{"images": [image, second]}]}))
            return tuple(list_report_cases(listed, "validation"))
        if self.task == "regression":  # the whole sequence, one result
            return ({"image": image, "frame": 0, "num_frames": 1},)
        try:
            count = clip_frame_count(image)
        except UltrasoundReadError:
            count = 1  # loading fails again in the bundle's dataset, which gives the reason
        return ({"image": image, "frame": int(request.get("frame", 0)), "num_frames": count},)

    def _run_bundle(self, items: tuple[dict[str, Any], ...], work: Path, device: Any) -> tuple[dict, dict, dict]:
        """(the writer's record, the batch item, the output item) of the bundle's inference run."""
        from ignite.engine import Events

        network = self._get_network(device, None)
        parser = bundle_config(self.name, "inference.yaml", self.overrides)
        # Objects, not config text: the parser neither evaluates nor resolves inside them, so
        # no request value (the image path) is ever read as a $ expression or an @ reference.
        parser["network"] = network
        parser["datalist"] = items
        parser["device"] = torch.device(device)
        parser["predictions_dir"] = str(work / "predictions")
        parser["num_workers"] = 0
        parser["batch_size"] = 1
        parser["handlers"] = [h for h in parser["handlers"] if "ProgressBar" not in str(h.get("_target_", ""))]
        pairs: list[tuple[dict, dict]] = []
        with self._run_lock:
            evaluator = parser.get_parsed_content("evaluator")
            evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: pairs.extend(iteration_pairs(engine)))
            evaluator.run()
        records = json.loads((work / "predictions" / "predictions.json").read_text())
        if len(records) != 1:
            raise RuntimeError(f"{self.name}: {len(records)} results for one input")
        source, output = pairs[0] if pairs else ({}, {})
        return records[0], source, output

    def _result(self, record: dict[str, Any], source: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The result file and JSON of the task from the writer's record."""
        frame = int(record.get("frame", 0) or 0)
        if self.task == "detection":
            size = [int(s) for s in torch.as_tensor(source["original_size"]).reshape(-1)[:2]]
            best = list(record.get("best", {}).values())  # in class order: the heart over the thorax
            label = ellipse_label_map([[r["cx"], r["cy"], r["semi_major"], r["semi_minor"], r["angle"]] for r in best],
                                      [r["class_index"] for r in best], size)
            result = {key: record[key] for key in ("ellipses", "best", "ctr") if key in record}
            return _save_png(label, self.name), {**result, "frame": frame, "size": size}
        if self.task == "landmarks":
            size = [int(s) for s in record["image_size"]]
            label = landmark_label_map([record["landmarks"][n] for n in self.class_names], size)
            return _save_png(label, self.name), {"landmarks": record["landmarks"], "frame": frame, "size": size}
        if self.task == "enhancement":
            from PIL import Image

            handle, path = tempfile.mkstemp(suffix=".png", prefix=f"{self.name}_")
            os.close(handle)
            shutil.copyfile(record["enhanced_png"], path)
            with Image.open(path) as enhanced:
                size = [enhanced.height, enhanced.width]
            return path, {"frame": frame, "size": size}
        if self.task == "regression":
            result = {key: record[key] for key in ("ef", "unit", "frames_used") if key in record}
        else:
            result = {key: record[key] for key in ("report", "tokens", "score") if key in record}
        handle, path = tempfile.mkstemp(suffix=".json", prefix=f"{self.name}_")
        with os.fdopen(handle, "w") as out:
            json.dump(result, out, ensure_ascii=False)
        return path, dict(result)


def _save_png(label: np.ndarray, name: str) -> str:
    """``label`` as a PNG file MONAI Label sends back (and removes)."""
    from PIL import Image

    handle, path = tempfile.mkstemp(suffix=".png", prefix=f"{name}_")
    os.close(handle)
    Image.fromarray(label).save(path)
    return path


def infer_task(name: str, overrides: Mapping[str, Any]) -> EchoCareInfer:
    """The infer task of bundle ``name``: :class:`BundleRunInfer` for the bundles of
    :data:`lib.bundles.OTHER_TASKS`, else :class:`EchoCareInfer`."""
    return (BundleRunInfer if name in OTHER_TASKS else EchoCareInfer)(name, overrides)
