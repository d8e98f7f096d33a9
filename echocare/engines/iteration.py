"""What the iteration functions of every task share (MONAI engines' ``iteration_update``)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["bf16_autocast", "plain_tensor", "unwrap_ddp"]


def bf16_autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op context elsewhere."""
    # bf16 needs no loss scaling; on CPU eager float32 is the reference path.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def plain_tensor(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` as a plain ``torch.Tensor`` (not a MONAI ``MetaTensor``) on ``device``."""
    tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return tensor.to(device, non_blocking=True)


def unwrap_ddp(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a ``DistributedDataParallel`` wrapper, or ``network`` itself."""
    return getattr(network, "module", network)
