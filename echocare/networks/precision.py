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

**Float32 at the input and the output.** The layers that read the image and the layers that
produce the outputs run in float32 (autocast off, float32 weights, inputs cast to float32), on
both devices. Each module names its own such layers, relative to itself, in a
``float32_modules`` attribute (:func:`float32_module_names` collects them over the network):
the encoder its ``patch_embed``, the UNETR decoder the convolutions of its image block
(``skip_image``: ``conv1`` and the residual ``conv3``) and its ``out`` (the 1x1 convolution of
the logits), the task networks their heads. Why: a mask is a threshold on logits, and the
errors that move logits across it come mostly from where the image enters the network.
Measured on the 100 DDTI validation images with briefly trained ``ddti_seg`` weights (issue
#19): bf16 everywhere flipped 11,332 mask pixels (mean Dice with float32 0.9897), float32
logits alone (``out``) 11,138 (0.9899), the patch embedding, the whole image block and ``out``
6,821 (0.9938), the layers kept now 7,004 (0.9937, smallest per image 0.9902). On 8 of the
images (885 flipped pixels in bf16): ``out`` 882, the patch embedding and ``out`` 801, with
the whole image block 522, with only the image block's two convolutions that read the image
523; the whole encoder in float32 725; ``out`` and the last decoder stage (``up0``) 850. Only
those two convolutions, not the whole image block: the block's 3x3 convolution and norms at
full resolution in float32 made bf16 1.4-1.6x slower at batch 8, for no gain. The layers kept
hold under 1% of the FLOPs.

Outputs are returned as float32 (floating tensors in a tensor, tuple, list or dict), so
post-processing, metrics and writers see the same types as with ``fp32``. bfloat16 keeps 8
bits of mantissa: outputs differ from float32 by about 1e-2 relative; whether a bundle's
answers change is measured per bundle by ``benchmarks/inference.py`` (agreement of masks,
classes, ellipses, ejection fractions) and stated in each bundle's README.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from echocare.networks.fast import optimize_for_inference

__all__ = [
    "BF16_ISA_FLAGS",
    "PRECISIONS",
    "BF16Inference",
    "check_precision",
    "cpu_isa",
    "float32_module_names",
    "with_precision",
]

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


def _to_float32(output: Any, only_half: bool = False) -> Any:
    """Floating tensors in ``output`` (nested tensors, tuples, lists, dicts) as float32; with
    ``only_half`` only the 16-bit ones (bfloat16, float16)."""
    if isinstance(output, torch.Tensor):
        cast = output.dtype in (torch.bfloat16, torch.float16) if only_half else output.is_floating_point()
        return output.float() if cast and output.dtype != torch.float32 else output
    if isinstance(output, Mapping):
        return {k: _to_float32(v, only_half) for k, v in output.items()}
    if isinstance(output, (list, tuple)) and not hasattr(output, "_fields"):
        return type(output)(_to_float32(v, only_half) for v in output)
    return output


def float32_module_names(network: nn.Module) -> list[str]:
    """Full names of the submodules of ``network`` that :class:`BF16Inference` runs in float32:
    for every module with a ``float32_modules`` attribute (names relative to that module: the
    layers that read the image or produce the outputs, see the module docstring), those."""
    names = []
    for prefix, module in network.named_modules():
        for name in getattr(module, "float32_modules", ()):
            full = f"{prefix}.{name}" if prefix else name
            network.get_submodule(full)  # AttributeError naming the module where a name is wrong
            names.append(full)
    return names


def _enter_float32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a float32 module: autocast off until :func:`_exit_float32`, 16-bit inputs
    as float32."""
    region = torch.autocast(module.float32_device_type, enabled=False)
    region.__enter__()
    module.__dict__.setdefault("_float32_regions", []).append(region)
    return _to_float32(args, only_half=True), _to_float32(kwargs, only_half=True)


def _exit_float32(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook of a float32 module (also called when its forward raises): autocast as before."""
    module.__dict__["_float32_regions"].pop().__exit__(None, None, None)


class BF16Inference(nn.Module):
    """``module`` run in bfloat16 for inference (see the module docstring); outputs in float32.

    The wrapped network is ``self.module`` (the attribute ``DistributedDataParallel`` uses, so
    :func:`echocare.engines.unwrap_ddp` reaches the network's own methods). Its state dict keys
    therefore start with ``module.``: load checkpoints before wrapping.

    Args:
        module: the trained network (modified in place: eval mode; on the CPU, fast paths and
            bfloat16 matrix weights; forward hooks on the float32 modules).
        device: where it runs (default: where its parameters are).
        float32_modules: names of the submodules run in float32 (autocast off, float32
            weights and inputs); default :func:`float32_module_names`, the layers that read the
            image and produce the outputs as the network's modules declare them.
    """

    def __init__(
        self,
        module: nn.Module,
        device: str | torch.device | None = None,
        float32_modules: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device_type = torch.device(device).type
        module.eval()
        self.float32_names = list(float32_module_names(module) if float32_modules is None else float32_modules)
        kept = {id(m) for name in self.float32_names for m in module.get_submodule(name).modules()}
        if self.device_type == "cpu":
            if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                warnings.warn(
                    "precision bf16: this CPU has no bf16 units PyTorch can use (amx_bf16, avx512_bf16); "
                    "bfloat16 runs emulated, slower than fp32",
                    stacklevel=2,
                )
            for layer in module.modules():
                if type(layer) in _MATRIX_LAYERS and id(layer) not in kept:
                    layer.to(torch.bfloat16)
            optimize_for_inference(module)
        for name in self.float32_names:
            island = module.get_submodule(name)
            island.float32_device_type = self.device_type
            island.register_forward_pre_hook(_enter_float32, with_kwargs=True)
            island.register_forward_hook(_exit_float32, with_kwargs=True, always_call=True)
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
