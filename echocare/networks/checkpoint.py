"""Whole-network checkpoints for evaluation and inference."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from echocare.networks.encoder import EncoderWeightsError, _describe, _unwrap

__all__ = ["load_network_checkpoint"]


def load_network_checkpoint(network: nn.Module, path: str | Path) -> nn.Module:
    """Load a bundle checkpoint (``models/model.pt`` or an interval checkpoint) strictly into ``network``.

    Accepts a flat state dict, ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and
    DDP's ``module.`` prefix. Raises ``FileNotFoundError`` for a missing file and
    :class:`EncoderWeightsError` (naming the file and the missing, unexpected and wrongly
    shaped keys) for a checkpoint of another architecture or size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (train the bundle first, or pass --checkpoint)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or non-torch files raise many types
        raise EncoderWeightsError(f"{path}: cannot read as a PyTorch checkpoint ({type(error).__name__}: {error})") from error
    state = _unwrap(checkpoint)
    if state is None:
        raise EncoderWeightsError(f"{path}: no state dict of tensors found")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise EncoderWeightsError(
            f"{path}: the checkpoint does not fit {type(network).__name__} (another architecture or network_size?):\n"
            f"  missing keys: {_describe(missing)}\n  unexpected keys: {_describe(unexpected)}\n"
            f"  wrongly shaped keys: {_describe(shapes, limit=6)}"
        )
    network.load_state_dict(state, strict=True)
    return network
