"""Ignite iteration functions for pretraining (used as MONAI engines' ``iteration_update``).

Both return per-image tensors so that MONAI's decollation (on by default) gives a list
of per-image dicts, with the batch loss replicated in each, as MONAI's tracking handlers
expect (``from_engine(['loss'], first=True)``).
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from echocare.engines.iteration import bf16_autocast, plain_tensor, unwrap_ddp
from echocare.tasks.pretrain.network import PretrainLoss, reconstruction_panel_tensors
from echocare.ontology import AnatomyOntology

__all__ = ["PretrainEvalIteration", "PretrainIteration", "mask_generator"]


def mask_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step): masks are reproducible and resumable."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


class PretrainIteration:
    """One optimisation step of masked image modelling + anatomy classification.

    Args:
        loss_function: :class:`PretrainLoss`.
        seed: base seed of the masks (mask of iteration ``i`` depends on (seed, i) only).
        amp: bf16 autocast on CUDA.
        grad_clip_norm: clip the global gradient norm (None: no clipping).

    The engine must be a MONAI ``SupervisedTrainer`` (``network``, ``optimizer``,
    ``state.device``); the batch holds ``image`` (B, 3, H, W), ``anatomy_labels`` and
    ``anatomy_known`` (B, N).
    """

    def __init__(
        self, loss_function: PretrainLoss, seed: int = 0, amp: bool = True, grad_clip_norm: float | None = None
    ) -> None:
        self.loss_function = loss_function
        self.seed = seed
        self.amp = amp
        self.grad_clip_norm = grad_clip_norm

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> dict[str, Any]:
        device = torch.device(engine.state.device)
        network, optimizer = engine.network, engine.optimizer
        image = plain_tensor(batch["image"], device)
        labels = plain_tensor(batch["anatomy_labels"], device)
        known = plain_tensor(batch["anatomy_known"], device)
        unit_mask = unwrap_ddp(network).draw_mask(image, mask_generator(self.seed, engine.state.iteration))
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with bf16_autocast(device, self.amp):
            outputs = network(image, unit_mask)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        losses = self.loss_function(outputs, image, labels, known)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        losses["loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            masked_l1 = PretrainLoss.masked_l1(outputs["reconstruction"], image, outputs["pixel_mask"])
        engine.state.output = {
            "loss": losses["loss"].detach(),
            "loss_pixel": losses["loss_pixel"].detach(),
            "loss_anatomy": losses["loss_anatomy"].detach(),
            "masked_l1": masked_l1.detach(),
        }
        # MONAI decollates (and runs postprocessing) on MODEL_COMPLETED, as its own iterations do.
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class PretrainEvalIteration:
    """Validation/inference step: a masked pass for reconstruction, an unmasked pass for anatomy.

    The masks of batch ``j`` depend only on (seed, j), so the validation error is
    comparable from epoch to epoch.

    Returns per-image: ``image``, ``masked`` and ``reconstruction`` (3, H, W) for the panels
    (the reconstruction is pasted into the visible pixels), ``masked_l1``, ``anatomy_scores``
    (N,) hierarchy-coherent probabilities, ``anatomy_pred`` (deepest confident path or "")
    and ``anatomy`` (the label, "" if none), plus ``filename`` when the batch has it.
    """

    def __init__(
        self, ontology: AnatomyOntology, seed: int = 0, amp: bool = True, threshold: float = 0.5
    ) -> None:
        self.ontology = ontology
        self.seed = seed
        self.amp = amp
        self.threshold = threshold

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict[str, Any]) -> dict[str, Any]:
        device = torch.device(engine.state.device)
        network = engine.network
        net = unwrap_ddp(network)
        image = plain_tensor(batch["image"], device)
        network.eval()
        unit_mask = net.draw_mask(image, mask_generator(self.seed, engine.state.iteration))
        with bf16_autocast(device, self.amp):
            outputs = network(image, unit_mask)
            unmasked = network(image, torch.zeros_like(unit_mask))
        masked_l1 = PretrainLoss.masked_l1(outputs["reconstruction"], image, outputs["pixel_mask"])
        scores = self.ontology.coherent_scores(torch.sigmoid(unmasked["anatomy_logits"].float()))
        predicted = [
            self.ontology.deepest_confident_path(row, self.threshold) or "" for row in scores.cpu()
        ]
        original, masked, pasted = reconstruction_panel_tensors(image, outputs)
        result: dict[str, Any] = {
            "image": original,
            "masked": masked,
            "reconstruction": pasted,
            "masked_l1": masked_l1.float(),
            "anatomy_scores": scores,
            "anatomy_pred": predicted,
            "anatomy": list(batch.get("anatomy", [""] * image.shape[0])),
        }
        meta = batch["image"].meta if hasattr(batch["image"], "meta") else {}
        if "filename_or_obj" in meta:
            result["filename"] = list(meta["filename_or_obj"])
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output = result
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
