"""EchoCare's MONAI Label app: every task bundle served, each with a train task on the
annotators' labels: the segmentation bundles as automatic segmentation models, the
classification bundles as classifiers, and detection (``focus_det``), landmarks
(``brain_landmark``), EF (``camus_ef``), enhancement (``usenhance``) and report (``usreport``)
through their bundles' own inference runs.

Start it from the repository root, in the server environment (``apps/monailabel/setup_env.sh``):

    monailabel start_server --app apps/monailabel --studies STUDIES --host 127.0.0.1 --conf models all

``--conf`` keys:

* ``models``: ``all`` (default) or comma-separated bundle names (``ddti_seg,busbra_cls``);
* ``output_root``: the bundles' outputs go to ``<output_root>/<name>`` (checkpoint
  ``models/model.pt``, MLflow store, training datalists); default each bundle's folder;
* ``network_size``, ``image_size``, ``clip_frames``: the sizes the checkpoints were trained
  with, when not the bundles' defaults; ``pretrained_path``, ``finetune_mode``,
  ``batch_size``, ``num_workers``: training settings (the bundles' ids of the same names).

A model whose checkpoint does not exist yet is left out of ``/info/`` (MONAI Label lists
valid models only) and logged; its train task is there, and creates the checkpoint.

Request values are data: every infer, batch infer and train request is checked against its
task's schema (``request_fields``, see ``lib/validation.py``) before it runs or is queued, and
answered HTTP 422 naming the field when refused; uploads stay inside the studies folder
(``lib/datastore.py``). See ``docs/security.md``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.utils.async_tasks.task import AsyncTask

# MONAI Label imports this file as a module; the app's own package (lib) sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import echocare  # noqa: E402
from echocare.io.readers import SUPPORTED_SUFFIXES
from lib.bundles import TASKS, bundle_overrides, selected_models  # noqa: E402
from lib.datastore import StudiesDatastore, UploadSessions  # noqa: E402
from lib.infer import EchoCareInfer, infer_task  # noqa: E402
from lib.train import EchoCareTrain  # noqa: E402
from lib.validation import RequestFieldError, batch_infer_fields, validate_request  # noqa: E402

logger = logging.getLogger(__name__)


class EchoCareApp(MONAILabelApp):
    """MONAI Label app serving EchoCare bundles on a studies folder of 2D ultrasound images,
    DICOMs (single and multi-frame) and videos."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.models = selected_models(conf.get("models"))
        self.overrides = {name: bundle_overrides(name, conf) for name in self.models}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="EchoCare",
            description="EchoCare ultrasound foundation model: segmentation, classification, detection, landmark, "
                        "EF, enhancement and report bundles",
            version=echocare.__version__,
        )
        _check_requests_before_queueing()

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        # Every kind of file the project's readers take (images, DICOMs, videos, NIfTI), in
        # lower and upper case (scanners export "IMG_0001.JPG" and "IM0001.DCM").
        patterns = sorted({f"*{s}" for s in SUPPORTED_SUFFIXES} | {f"*{s.upper()}" for s in SUPPORTED_SUFFIXES})
        return StudiesDatastore(
            self.studies,
            extensions=patterns,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _load_sessions(self, load: bool = False) -> UploadSessions | None:
        # MONAI Label's own loader, with sessions that refuse archives (see UploadSessions)
        if not load:
            return None
        return UploadSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def init_infers(self) -> dict[str, EchoCareInfer]:
        infers = {}
        for name in self.models:
            task = infer_task(name, self.overrides[name])
            if not task.is_valid():
                logger.warning("%s: no checkpoint at %s; not served until trained", name, task.weights)
            infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, EchoCareTrain]:
        return {name: EchoCareTrain(name, self.overrides[name]) for name in self.models}

    def checked_request(self, method: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """``request`` for ``method`` (``infer``, ``batch_infer`` or ``train``) checked against
        its model's task schema (``request_fields``); an infer image must be an image of the
        studies folder or a file MONAI Label stored from an upload.

        Raises:
            HTTPException: 404 for an unknown model; 422 ``"<field>: <problem>"`` for an unknown
                field or a refused value.
        """
        model = request.get("model")
        tasks = self._trainers if method == "train" else self._infers
        task = tasks.get(model) if isinstance(model, str) else None
        if task is None:
            raise HTTPException(status_code=404, detail=f"model: no {method} task {model!r}; "
                                                        f"this app serves {sorted(tasks)}")
        fields = task.request_fields
        if method == "batch_infer":
            fields = batch_infer_fields(fields)
        try:
            checked = validate_request(fields, request)
            if method == "infer":
                self._check_infer_files(checked)
        except RequestFieldError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return checked

    def _check_infer_files(self, request: Mapping[str, Any]) -> None:
        """An ``image`` id names an image of the studies folder; an ``image`` or ``label`` path
        is one MONAI Label's routes stored an upload at (the temporary folder, the sessions)."""
        for key in ("image", "image2"):  # image2: the report's second view, an id only
            image = request.get(key)
            if isinstance(image, str) and not os.path.isabs(image) and not self.datastore().get_image_uri(image):
                raise RequestFieldError(key, f"no image {image!r} in the studies folder")
        upload_dirs = [tempfile.gettempdir()]
        if self._sessions is not None:
            upload_dirs.append(self._sessions.store_path)
        upload_dirs = [os.path.realpath(d) for d in upload_dirs]
        for key in ("image", "label"):
            path = request.get(key)
            if isinstance(path, str) and os.path.isabs(path):
                real = os.path.realpath(path)
                if not os.path.isfile(real) or not any(os.path.commonpath([real, d]) == d for d in upload_dirs):
                    raise RequestFieldError(key, f"{path!r} is neither an image id of the studies folder nor "
                                                 "an uploaded file")

    def infer(self, request: Mapping[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        checked = self.checked_request("infer", request)
        if checked.get("image2"):  # checked above: an image id of the studies folder
            checked["image2"] = self.datastore().get_image_uri(checked["image2"])
        return super().infer(checked, datastore)

    def batch_infer(self, request: Mapping[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        # every image's request is the checked batch request plus what MONAI Label sets per
        # image (ids from the studies folder), so it goes to the unchecked infer
        checked = self.checked_request("batch_infer", request)
        return self._batch_infer(checked, datastore if datastore else self.datastore(), super().infer)

    def train(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return super().train(self.checked_request("train", request))


def _check_requests_before_queueing() -> None:
    """Make MONAI Label check train and batch infer requests before it queues them.

    ``POST /train/<model>`` and ``POST /batch/infer/<model>`` go through ``AsyncTask.run``,
    which either runs the request at once (``run_sync=true``, through the app's ``train`` /
    ``batch_infer``, which check it) or queues it for a background process, whose failure
    would only show as status ERROR. Checking in ``AsyncTask.run`` answers a refused request
    with HTTP 422 naming the field, before anything is queued or run. Installed once per process.
    """
    run = AsyncTask.run
    if getattr(run, "echocare_checked", False):
        return

    def checked_run(method: str, request: Any = None, params: Any = None, force_sync: bool = False,
                    enqueue: bool = False) -> Any:
        from monailabel.interfaces.utils.app import app_instance

        instance = app_instance()
        if method in ("train", "batch_infer") and isinstance(instance, EchoCareApp):
            # the request AsyncTask.run builds: the route's request, then the body's parameters
            instance.checked_request(method, {**(request or {}), **(params or {})})
        return run(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    checked_run.echocare_checked = True  # type: ignore[attr-defined]
    AsyncTask.run = staticmethod(checked_run)  # type: ignore[method-assign]


__all__ = ["EchoCareApp", "TASKS"]
