"""EchoCare's MONAI Label app: the segmentation bundles as automatic segmentation models, the
classification bundles as classifiers, each with a train task on the annotators' labels.

Start it from the repository root, in the server environment (``apps/monailabel/setup_env.sh``):

    monailabel start_server --app apps/monailabel --studies STUDIES --conf models all

``--conf`` keys:

* ``models``: ``all`` (default) or comma-separated bundle names (``ddti_seg,busbra_cls``);
* ``output_root``: the bundles' outputs go to ``<output_root>/<name>`` (checkpoint
  ``models/model.pt``, MLflow store, training datalists); default each bundle's folder;
* ``network_size``, ``image_size``, ``clip_frames``: the sizes the checkpoints were trained
  with, when not the bundles' defaults; ``pretrained_path``, ``finetune_mode``,
  ``batch_size``, ``num_workers``: training settings (the bundles' ids of the same names).

A model whose checkpoint does not exist yet is left out of ``/info/`` (MONAI Label lists
valid models only) and logged; its train task is there, and creates the checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

# MONAI Label imports this file as a module; the app's own package (lib) sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import echocare  # noqa: E402
from echocare.io.readers import SUPPORTED_SUFFIXES
from lib.bundles import TASKS, bundle_overrides, selected_models  # noqa: E402
from lib.infer import EchoCareInfer  # noqa: E402
from lib.train import EchoCareTrain  # noqa: E402

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
            description="EchoCare ultrasound foundation model: segmentation and classification bundles",
            version=echocare.__version__,
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        # Every kind of file the project's readers take (images, DICOMs, videos, NIfTI), in
        # lower and upper case (scanners export "IMG_0001.JPG" and "IM0001.DCM").
        patterns = sorted({f"*{s}" for s in SUPPORTED_SUFFIXES} | {f"*{s.upper()}" for s in SUPPORTED_SUFFIXES})
        return LocalDatastore(self.studies, extensions=patterns, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD)

    def init_infers(self) -> dict[str, EchoCareInfer]:
        infers = {}
        for name in self.models:
            task = EchoCareInfer(name, self.overrides[name])
            if not task.is_valid():
                logger.warning("%s: no checkpoint at %s; not served until trained", name, task.weights)
            infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, EchoCareTrain]:
        return {name: EchoCareTrain(name, self.overrides[name]) for name in self.models}


__all__ = ["EchoCareApp", "TASKS"]
