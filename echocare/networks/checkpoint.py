"""Whole-network checkpoints: loading for evaluation and inference, and initialising fine-tuning."""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from echocare.networks.encoder import (
    EncoderWeightsError,
    check_state_dict,
    encoder_of,
    load_pretrained,
    read_checkpoint,
    unwrap_state_dict,
)
from echocare.networks.finetune import apply_lora, merge_lora
from echocare.registered_models import fetch_checkpoint, is_registry_uri
from echocare.tracking import check_tracking_server

__all__ = ["HeadMismatchWarning", "initialise_network", "load_network_checkpoint", "merge_lora_state_dict"]

logger = logging.getLogger(__name__)


class HeadMismatchWarning(UserWarning):
    """Head weights of a checkpoint did not fit the network and were left re-initialised."""


def merge_lora_state_dict(state: dict[str, torch.Tensor], network: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict saved with LoRA adapters (``...qkv.base.weight``, ``...qkv.lora_q_A``, ...)
    turned into the plain layout of ``network`` by merging each adapter into its weight.

    The rank is read from the adapter shapes; the scale is that of :func:`apply_lora`'s
    default ``alpha`` (= rank), the one the bundles train with. Plain state dicts are
    returned unchanged.
    """
    if not any(".lora_" in k for k in state) or any(".lora_" in k for k in network.state_dict()):
        return state
    rank = next(int(v.shape[0]) for k, v in state.items() if k.endswith("lora_q_A"))
    # A copy of the network's structure with adapters: load there, merge, read back.
    scratch = copy.deepcopy(network).cpu()
    apply_lora(encoder_of(scratch), rank)
    scratch.load_state_dict(state, strict=True)
    merge_lora(encoder_of(scratch))
    return {k: v.detach() for k, v in scratch.state_dict().items()}


def _read_state(path: str | Path, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    """The network state dict in ``path``: a file, or a registered model (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``) downloaded from the MLflow registry into a temporary folder that
    is removed once the weights are in memory."""
    if is_registry_uri(path):
        with tempfile.TemporaryDirectory(prefix="echocare_checkpoint_") as tmp:
            return _read_state(fetch_checkpoint(str(path), tmp, tracking_uri))
    path = Path(path)
    checkpoint = read_checkpoint(path, "checkpoint (train the bundle first, or pass --checkpoint)")
    state = unwrap_state_dict(checkpoint)
    if state is None:
        raise EncoderWeightsError(f"{path}: no state dict of tensors found")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_network_checkpoint(
    network: nn.Module, path: str | Path, allow_head_mismatch: bool = False, tracking_uri: str | None = None
) -> nn.Module:
    """Load a bundle checkpoint (``models/model.pt`` or an interval checkpoint) into ``network``.

    Accepts a flat state dict, ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers, DDP's
    ``module.`` prefix and checkpoints of LoRA runs (adapters are merged, see
    :func:`merge_lora_state_dict`).

    Args:
        network: the bundle's network.
        path: the checkpoint: a file, or a model registered with ``echocare registry register``
            given as ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        allow_head_mismatch: when the encoder fits but head weights do not (another number
            of classes), load the encoder and every fitting head weight, leave the others
            as initialised and warn (:class:`HeadMismatchWarning`) naming them; for
            starting a fine-tuning from another task's network. Otherwise the load is strict.
        tracking_uri: the MLflow store of a ``models:/`` checkpoint (default
            ``MLFLOW_TRACKING_URI``; bundles pass their ``tracking_uri``). An http(s) store is
            probed first, whatever the checkpoint: bundles build their network before their MLflow
            handlers start, so a store that does not answer fails here, in seconds.

    Raises:
        FileNotFoundError: missing file.
        echocare.tracking.TrackingServerError: an http(s) ``tracking_uri`` that does not answer.
        echocare.registry.RegistryError: unknown registered model, version or alias (named).
        EncoderWeightsError: a checkpoint of another architecture or size (naming the file
            and the missing, unexpected and wrongly shaped keys).
    """
    check_tracking_server(tracking_uri)
    state = merge_lora_state_dict(_read_state(path, tracking_uri), network)
    expected = network.state_dict()
    problem = f"{path}: the checkpoint does not fit {type(network).__name__} (another architecture, network_size or class list?)"
    if not allow_head_mismatch:
        check_state_dict(state, expected, problem, model_name="network")
        network.load_state_dict(state, strict=True)
        return network
    encoder_keys = {f"encoder.{k}" for k in encoder_of(network).state_dict()}
    check_state_dict(
        {k: v for k, v in state.items() if k in encoder_keys},
        {k: v for k, v in expected.items() if k in encoder_keys},
        problem,
        model_name="network",
    )
    fitting = {k: v for k, v in state.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    skipped = sorted(set(expected) - set(fitting))
    if skipped:
        message = (
            f"{path}: {len(skipped)} head weight(s) do not fit this network (another number of classes?) "
            f"and stay re-initialised: {', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}; "
            "the encoder and the other weights are loaded"
        )
        warnings.warn(message, HeadMismatchWarning, stacklevel=2)
        logger.warning(message)
    network.load_state_dict(fitting, strict=False)
    return network


def initialise_network(
    network: nn.Module,
    pretrained_path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    tracking_uri: str | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Starting weights of a fine-tuning run: ``checkpoint`` (a whole network, e.g. an earlier
    fine-tuning, as a file or ``models:/NAME@ALIAS``; head weights that do not fit are
    re-initialised with a warning), else the encoder from ``pretrained_path`` (released layout
    or ours), else as initialised (scratch). ``tracking_uri``: the MLflow store of a
    ``models:/`` checkpoint (see :func:`load_network_checkpoint`). ``device``: where the
    network goes once loaded (default: where it is); bundles pass their ``device``.

    Raises:
        ValueError: both are given (which one should win is not obvious).
        echocare.tracking.TrackingServerError: an http(s) ``tracking_uri`` that does not answer
            (probed here, before training starts, as :func:`load_network_checkpoint` does).
    """
    check_tracking_server(tracking_uri)
    if pretrained_path and checkpoint:
        raise ValueError(
            f"give pretrained_path ({pretrained_path}) or checkpoint ({checkpoint}), not both: "
            "pretrained_path sets the encoder, checkpoint the whole network"
        )
    if checkpoint:
        network = load_network_checkpoint(network, checkpoint, allow_head_mismatch=True, tracking_uri=tracking_uri)
    else:
        network = load_pretrained(network, pretrained_path)
    return network.to(device) if device is not None else network
