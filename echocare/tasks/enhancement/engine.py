"""Ignite glue of the enhancement bundle (``usenhance``): batches of pairs, the optional
adversarial training step, the no-reference evaluation with its pictures, and the
inference writer.

Evaluation items (MONAI's decollated outputs after :class:`~echocare.tasks.enhancement.image_quality.EnhancementScored`)
hold ``image`` (the low-quality input, (3, H, W)), ``pred`` (the enhanced image, (1, H, W),
clipped to [0, 1]) and ``label`` (the high-quality target, (3, H, W)), all at the network's
size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from echocare.engines.handlers import UniqueNames, item_source, write_panel
from echocare.io.readers import read_ultrasound
from echocare.networks.encoder import build_encoder, load_encoder_weights
from echocare.tasks.enhancement import image_quality as iq
from echocare.tasks.enhancement.degradation import degradation_at_level, degrade
from echocare.tasks.enhancement.network import grey
from echocare.engines.writers import PredictionWriter, is_rank0, iteration_pairs

__all__ = [
    "BRISQUE_LEVELS",
    "EnhancementEvaluation",
    "EnhancementIteration",
    "EnhancementPredictionWriter",
    "fid_feature_extractor",
    "fit_quality_models",
    "prepare_pair",
]

logger = logging.getLogger(__name__)

#: Degradation levels (0 = the high-quality image) of the images the BRISQUE regressor is
#: fitted on; an image's score is 100 * its level, so BRISQUE reads as "degradation percent".
BRISQUE_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def prepare_pair(batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any):
    """``prepare_batch`` of the enhancement engines: (``image``, ``target``) on ``device``;
    the target is None for inference items that have none."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    target = batchdata.get("target")
    if isinstance(target, torch.Tensor):
        target = target.to(device=device, non_blocking=non_blocking)
    else:
        target = None
    return image, target


class EnhancementIteration:
    """Training step with the adversarial term (used when ``adversarial_weight`` > 0).

    Generator step: the trainer's loss (L1 + SSIM ...) + ``adversarial_weight`` * BCE of the
    discriminator's patch logits on the prediction against "real". Discriminator step: BCE
    of real targets against 1 and of detached predictions against 0 (each half weighted 0.5).

    Args:
        discriminator: e.g. :class:`~echocare.tasks.enhancement.network.PatchDiscriminator` on grey images.
        discriminator_optimizer: its optimizer.
        adversarial_weight: weight of the generator's adversarial term.
    """

    def __init__(self, discriminator: torch.nn.Module, discriminator_optimizer: torch.optim.Optimizer, adversarial_weight: float = 0.01) -> None:
        self.discriminator = discriminator
        self.discriminator_optimizer = discriminator_optimizer
        self.adversarial_weight = float(adversarial_weight)

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        image, target = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        self.discriminator.to(image.device).train()
        engine.network.train()
        pred = engine.network(image)
        real = grey(target)
        fake_logits = self.discriminator(pred)
        adversarial = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        loss = engine.loss_function(pred, target) + self.adversarial_weight * adversarial
        engine.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        engine.optimizer.step()
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(pred.detach())
        d_loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.discriminator_optimizer.step()
        return {CommonKeys.IMAGE: image, CommonKeys.LABEL: target, CommonKeys.PRED: pred,
                CommonKeys.LOSS: loss.detach(), "discriminator_loss": d_loss.detach()}


def _grey_at_size(path: str, spatial_size: Sequence[int]) -> np.ndarray:
    """The first frame of an image file as an (H, W) grey float array in [0, 1] at
    ``spatial_size`` (area resampling, as the bundle's ``Resized``)."""
    frame = read_ultrasound(path, frames=0)[0].mean(axis=-1)  # (1, H, W, 3) -> (H, W)
    t = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in spatial_size), mode="area")[0, 0].numpy()


def fit_quality_models(
    images: Sequence[str],
    spatial_size: Sequence[int],
    model_dir: str | os.PathLike[str],
    niqe_model: str = "",
    brisque_model: str = "",
    niqe_patch_size: int = 32,
    max_images: int = 32,
    degradation_ranges: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[iq.NiqeModel, iq.BrisqueModel]:
    """The NIQE and BRISQUE models of an evaluation: loaded from the given paths, else fitted
    on (the first ``max_images`` of) ``images``, high-quality training images resized to the
    network's ``spatial_size``, and saved to ``model_dir/niqe_model.npz`` /
    ``brisque_model.npz``.

    NIQE's pristine model is fitted on those images (patches of ``niqe_patch_size``).
    BRISQUE's regressor is fitted on them degraded to each of :data:`BRISQUE_LEVELS`
    (:func:`~echocare.tasks.enhancement.degradation.degradation_at_level` within ``degradation_ranges``),
    with score 100 * level: BRISQUE then reads on a 0 (high quality) .. 100 (the strongest
    degradation) scale of our own, not the LIVE scale.
    """
    model_dir = Path(model_dir)
    needed = not niqe_model or not brisque_model
    pristine = [_grey_at_size(p, spatial_size) for p in list(images)[: int(max_images)]] if needed else []
    if needed and not pristine:
        raise ValueError("no high-quality training images to fit the NIQE/BRISQUE models on; give niqe_model and brisque_model paths")
    if niqe_model:
        niqe = iq.load_niqe_model(niqe_model)
    else:
        niqe = iq.fit_niqe_model(pristine, patch_size=niqe_patch_size, path=model_dir / "niqe_model.npz")
    if brisque_model:
        brisque = iq.load_brisque_model(brisque_model)
    else:
        rng = np.random.default_rng(seed)
        degraded, scores = [], []
        for image in pristine:
            for level in BRISQUE_LEVELS:
                degraded.append(degrade(image, degradation_at_level(level, degradation_ranges), rng))
                scores.append(100.0 * level)
        brisque = iq.fit_brisque_model(degraded, scores)
        iq.save_brisque_model(brisque, model_dir / "brisque_model.npz")
    logger.info("quality models: NIQE %s, BRISQUE %s", niqe_model or "fitted", brisque_model or "fitted")
    return niqe, brisque


def fid_feature_extractor(
    features_path: str,
    network: torch.nn.Module,
    pretrained_path: str = "",
    network_size: str = "base",
    device: str | torch.device = "cpu",
) -> iq.EncoderFeatures | iq.TorchScriptFeatures:
    """FID's feature extractor: a TorchScript file (``features_path``, e.g. Inception-v3 with
    the user's weights; reported as ``fid``), else an EchoCare encoder (reported as
    ``fid_echocare``): the pretrained one of ``pretrained_path`` when given (fixed across
    runs), else the evaluated ``network``'s own encoder (compare such values within one
    evaluation only: model against identity)."""
    if features_path:
        return iq.TorchScriptFeatures(features_path, device)
    if pretrained_path:
        encoder = build_encoder(network_size)
        load_encoder_weights(encoder, pretrained_path)
        return iq.EncoderFeatures(encoder.to(device))
    return iq.EncoderFeatures(network)


def _grey(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x).detach().float().cpu()
    return t.mean(0, keepdim=True).clamp(0, 1) if t.ndim == 3 else t.clamp(0, 1)


class EnhancementEvaluation:
    """No-reference scores, FID and pictures of an enhancement evaluation.

    Per item (written into the output items, so ``per_case.csv`` lists them): ``niqe``,
    ``brisque``, ``piqe`` of the enhanced image and ``identity_niqe`` ... of the input. At the
    end of the run's epoch, into ``engine.state.metrics`` (so :class:`~echocare.engines.EvaluationReport`
    attached after this handler writes them to ``summary.json``): their means, the same of
    the high-quality targets (``target_niqe`` ..., the level to reach), and the FID between
    enhanced and target images (``fid`` or ``fid_echocare``, see
    :func:`fid_feature_extractor`) with ``identity_fid...`` for the inputs.
    Pictures: ``<picture_dir>/<stem>.png``, low / enhanced / high side by side, for the
    first ``num_pictures`` items.
    """

    def __init__(
        self,
        niqe_model: iq.NiqeModel,
        brisque_model: iq.BrisqueModel,
        feature_extractor: Any,
        picture_dir: str | os.PathLike[str],
        num_pictures: int = 16,
    ) -> None:
        self.niqe_model, self.brisque_model = niqe_model, brisque_model
        self.extractor = feature_extractor
        self.picture_dir = Path(picture_dir)
        self.num_pictures = int(num_pictures)
        self._reset(None)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        # EPOCH_COMPLETED (an evaluation is one epoch): after Ignite's metrics, before the
        # MLflow handler of --tracking mlflow (attached last) logs engine.state.metrics
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine | None) -> None:
        self.scores: dict[str, list[float]] = {}
        self.features: dict[str, list[np.ndarray]] = {"pred": [], "image": [], "target": []}
        self.names, self.count = UniqueNames(), 0

    def _score(self, name: str, value: float) -> float:
        self.scores.setdefault(name, []).append(value)
        return value

    def _collect(self, engine: Engine) -> None:
        batch = {"pred": [], "image": [], "target": []}
        for source, output in iteration_pairs(engine):
            if output.get("label") is None:
                continue
            images = {"pred": _grey(output["pred"]), "image": _grey(output["image"]), "target": _grey(output["label"])}
            for key, image in images.items():
                batch[key].append(image)
            for prefix, key in (("", "pred"), ("identity_", "image"), ("target_", "target")):
                array = images[key][0].numpy()
                output[f"{prefix}niqe"] = self._score(f"{prefix}niqe", iq.niqe(array, self.niqe_model))
                output[f"{prefix}brisque"] = self._score(f"{prefix}brisque", iq.brisque(array, self.brisque_model))
                output[f"{prefix}piqe"] = self._score(f"{prefix}piqe", iq.piqe(array))
            if self.count < self.num_pictures and is_rank0():
                name = self.names(item_source({**source, **output}, default=f"case{self.count:03d}"))
                write_panel([[images[k].expand(3, -1, -1) for k in ("image", "pred", "target")]], self.picture_dir / f"{name}.png")
                self.count += 1
        for key, images in batch.items():
            if images:
                self.features[key].append(self.extractor(torch.stack(images).expand(-1, 3, -1, -1)))

    def _complete(self, engine: Engine) -> None:
        for name, values in self.scores.items():
            engine.state.metrics[name] = float(np.mean(values))
        if self.features["pred"]:
            feats = {k: np.concatenate(v) for k, v in self.features.items()}
            name = getattr(self.extractor, "name", "fid_echocare")
            engine.state.metrics[name] = iq.fid(feats["pred"], feats["target"])
            engine.state.metrics[f"identity_{name}"] = iq.fid(feats["image"], feats["target"])


class EnhancementPredictionWriter(PredictionWriter):
    """Inference output of enhancement, one per input frame, named after the input:
    ``<stem>[_frameNNNN].png``, the enhanced image as 8-bit grey at the input's original
    size (bilinear), plus ``predictions.json`` / ``.csv`` listing each input and its file."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        super().__init__(output_dir, class_names=[])

    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        path, name, frame = self._name(source)
        pred = torch.as_tensor(output["pred"]).detach().float().cpu()
        pred = pred.reshape(-1, *pred.shape[-2:]).mean(0, keepdim=True)[None]
        size = source.get("original_size")
        if size is not None:
            height, width = (int(s) for s in torch.as_tensor(size).reshape(-1)[:2])
            pred = F.interpolate(pred, size=(height, width), mode="bilinear", align_corners=False)
        array = (pred[0, 0].clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        png = self.output_dir / f"{name}.png"
        Image.fromarray(array).save(png)
        return {"image": path, "frame": frame if frame is not None else 0, "enhanced_png": str(png)}
