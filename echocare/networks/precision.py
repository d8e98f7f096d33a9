"""Inference precision of the bundles' networks: float32 (the default) or bfloat16.

``precision: bf16`` (every bundle's ``inference.yaml`` and ``evaluate.yaml``; ``echocare predict
--precision bf16``) wraps the trained network in :class:`BF16Inference`:

* **On the CPU**: the fast paths of :func:`~echocare.networks.fast.optimize_for_inference`
  (window-order Swin stages, fused attention, oneDNN fused linears, channels-last residual
  convolution blocks), run under bf16 autocast. The weights of the matrix layers (linear and
  convolution layers) are cast to bfloat16 once, at wrapping, instead of at every call as
  autocast's own cache would (it lives for one autocast region only): the fused oneDNN
  kernels then run in bfloat16 on the CPU's matrix units (AMX, AVX-512 BF16). Norm layers keep
  float32 parameters and accumulate their statistics in float32.
* **On CUDA**: bf16 autocast around the network as it is (parameters stay float32).

Outputs are returned as float32 (floating tensors in a tensor, tuple, list or dict), so
post-processing, metrics and writers see the same types as with ``fp32``. bfloat16 keeps 8
bits of mantissa: outputs differ from float32 by about 1e-2 relative; whether a bundle's
answers change is measured per bundle by ``benchmarks/inference.py`` (agreement of masks,
classes, ellipses, ejection fractions) and stated in each bundle's README.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from echocare.networks.fast import optimize_for_inference

__all__ = ["BF16_ISA_FLAGS", "PRECISIONS", "BF16Inference", "check_precision", "cpu_isa", "with_precision"]

#: Values of the bundles' ``precision`` id.
PRECISIONS = ("fp32", "bf16")

#: CPU flags (``/proc/cpuinfo``) of the instruction sets that matter to bf16 inference, fastest first:
#: AMX tiles with bf16, AVX-512 with bf16 dot products, plain AVX-512 (bf16 emulated in float32).
BF16_ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f")

#: Layer types whose weights :class:`BF16Inference` casts to bfloat16 on the CPU (their forwards
#: go through ``F.linear`` / ``F.conv*``, which autocast and the fast paths run in bfloat16).
_MATRIX_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; else a ``ValueError`` naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def cpu_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """Which of :data:`BF16_ISA_FLAGS` this CPU has (read from ``cpuinfo``; empty where unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [flag for flag in BF16_ISA_FLAGS if flag in flags]


def _to_float32(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() and output.dtype != torch.float32 else output
    if isinstance(output, Mapping):
        return {k: _to_float32(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)) and not hasattr(output, "_fields"):
        return type(output)(_to_float32(v) for v in output)
    return output


class BF16Inference(nn.Module):
    """``module`` run in bfloat16 for inference (see the module docstring); outputs in float32.

    The wrapped network is ``self.module`` (the attribute ``DistributedDataParallel`` uses, so
    :func:`echocare.engines.unwrap_ddp` reaches the network's own methods). Its state dict keys
    therefore start with ``module.``: load checkpoints before wrapping.

    Args:
        module: the trained network (modified in place: eval mode; on the CPU, fast paths and
            bfloat16 matrix weights).
        device: where it runs (default: where its parameters are).
    """

    def __init__(self, module: nn.Module, device: str | torch.device | None = None) -> None:
        super().__init__()
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device_type = torch.device(device).type
        module.eval()
        if self.device_type == "cpu":
            if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                warnings.warn(
                    "precision bf16: this CPU has no bf16 units PyTorch can use (amx_bf16, avx512_bf16); "
                    "bfloat16 runs emulated, slower than fp32",
                    stacklevel=2,
                )
            for layer in module.modules():
                if type(layer) in _MATRIX_LAYERS:
                    layer.to(torch.bfloat16)
            optimize_for_inference(module)
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            output = self.module(*args, **kwargs)
        return _to_float32(output)


def with_precision(network: nn.Module, precision: str, device: str | torch.device | None = None) -> nn.Module:
    """``network`` for inference at ``precision`` (:data:`PRECISIONS`): itself for ``fp32``, a
    :class:`BF16Inference` wrapper for ``bf16``."""
    if check_precision(precision) == "fp32":
        return network
    return BF16Inference(network, device)
