"""Whole-network checkpoints for evaluation and inference."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from echocare.networks.encoder import EncoderWeightsError, _unwrap, check_state_dict, read_checkpoint

__all__ = ["load_network_checkpoint"]


def load_network_checkpoint(network: nn.Module, path: str | Path) -> nn.Module:
    """Load a bundle checkpoint (``models/model.pt`` or an interval checkpoint) strictly into ``network``.

    Accepts a flat state dict, ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and
    DDP's ``module.`` prefix. Raises ``FileNotFoundError`` for a missing file and
    :class:`EncoderWeightsError` (naming the file and the missing, unexpected and wrongly
    shaped keys) for a checkpoint of another architecture or size.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, "checkpoint (train the bundle first, or pass --checkpoint)")
    state = _unwrap(checkpoint)
    if state is None:
        raise EncoderWeightsError(f"{path}: no state dict of tensors found")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    check_state_dict(
        state,
        network.state_dict(),
        f"{path}: the checkpoint does not fit {type(network).__name__} (another architecture or network_size?)",
        model_name="network",
    )
    network.load_state_dict(state, strict=True)
    return network
