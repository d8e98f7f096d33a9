"""Fast exact paths for the EchoCare networks (same math, same parameters, same state dicts).

MONAI's Swin stages spend much of their time outside the matrix products: every block rolls
the token grid, cuts it into windows, gathers the relative position bias from its table,
builds the attention matrix with separate matmul / add / softmax / matmul kernels, and puts
the windows back. :func:`use_fast_paths` swaps in forwards that compute the same functions
faster, without touching a single parameter or buffer:

* **Window order kept between blocks.** Every Swin operation except attention acts on each
  token alone (LayerNorm, linear layers, GELU, residual adds), so the residual stream can
  stay in the window order of the current block. Going from one block's windows to the
  next block's shifted windows is one permutation of the tokens: one gather
  (``index_select``) per block replaces two rolls, a window partition and a window
  reverse. The last gather of a stage produces the 2x2 patch-merging layout directly.
* **Fused attention.** ``torch.nn.functional.scaled_dot_product_attention`` with the
  relative position bias and the shifted-window mask (MONAI's ``-100`` entries) added into
  one additive ``attn_mask``; at inference the bias is precomputed per block and
  resolution (and recomputed whenever the table changes).
* **Fused inference kernels** (no autograd): oneDNN linear layers with the GELU and the
  residual additions fused (``torch.ops.mkldnn._linear_pointwise``), in-place residuals,
  and LayerNorms on channel-last views instead of copies.
* **Residual convolution blocks** of the encoder (Swin v2) and the UNETR decoders: in
  training, instance norm as group norm with one channel per group (the same statistics, a
  faster kernel); at inference on the CPU, channels-last end to end (oneDNN's convolutions,
  transposed ones most of all, are faster on channels-last maps), with a two-pass
  channels-last instance norm instead of copies between layouts, and micro-batches only in
  the high-resolution blocks, so that the deep, weight-bound blocks read their weights once
  per batch.
* **Fewer multiply-adds, fewer passes** (inference, float32, CPU; :func:`optimize_for_inference`):
  3x3 convolutions with enough channels and tiles as Winograd F(4x4, 3x3)
  (:mod:`echocare.networks.winograd`: a quarter of the multiply-adds), 1x1 convolutions of
  channels-last maps as fused linear layers, linear weights reordered into oneDNN's layout
  once instead of at every call, the instance norm's output in one pass, the patch embedding
  written channels-last, and freed memory kept for reuse (:func:`keep_freed_memory`) instead
  of page-faulted in again at every call.

* **bfloat16** (``precision: bf16``, :mod:`echocare.networks.precision`): where the matrix
  weights and inputs are bfloat16, the fused linears and packed convolutions run oneDNN's
  bfloat16 kernels (AMX / AVX-512 BF16), and the channels-last instance norms PyTorch's
  channels-last group-norm kernel (float32 statistics; no layout copies).

Parameter names and shapes never change (the modules keep their classes' attributes; only
their ``forward`` changes, by switching ``__class__`` to a subclass), so state dicts load
and save exactly as before, in the released layout. :func:`reference_paths` switches back.
Stages whose windows need padding (sides that are not multiples of the window) run MONAI's
own forward.

Correctness (outputs and gradients within tolerance of MONAI's modules) is tested in
``tests/test_networks_fast.py``; speed is measured by ``benchmarks/inference.py`` and
``benchmarks/pretrain_step.py``.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.unetr_block import UnetrUpBlock
from monai.networks.nets.swin_unetr import (
    BasicLayer,
    PatchMergingV2,
    compute_mask,
    get_window_size,
    window_partition,
)
from torch import nn

from echocare.networks.decoders import UNETRDecoder
from echocare.networks.encoder import EchoCareEncoder
from echocare.networks.winograd import transform_filter, winograd_conv3x3, winograd_pays

__all__ = [
    "CHECKPOINT_MODES",
    "FastBasicLayer",
    "FastConv2d",
    "FastConvTranspose2d",
    "FastEchoCareEncoder",
    "FastUNETRDecoder",
    "FastUnetResBlock",
    "FastUnetrUpBlock",
    "MICRO_BATCH_MIN_PIXELS",
    "fast_paths_enabled",
    "keep_freed_memory",
    "optimize_for_inference",
    "reference_paths",
    "use_fast_paths",
]


_CACHES = ("_fast_plans", "_fast_bias", "_fast_packed")


class _FastModule(nn.Module):
    """Mixin: caches (plans, biases, packed weights) are never copied or pickled."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for cache in _CACHES:
            state.pop(cache, None)
        return state


# --------------------------------------------------------------------------------------
# Token permutations
# --------------------------------------------------------------------------------------


def _window_order(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Spatial index (row * w + col) of each token in MONAI's window order for ``shift``:
    ``roll(x, -shift)`` then ``window_partition`` (windows row-major, tokens row-major)."""
    grid = torch.arange(h * w, dtype=torch.float64).reshape(1, h, w, 1)
    if any(s > 0 for s in shift):
        grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return window_partition(grid, window).reshape(-1).long()


def _merge_order(h: int, w: int) -> torch.Tensor:
    """Spatial index of each token in the order of MONAI's 2D patch merging: for each output
    pixel (row-major), the four inputs in the order of its ``torch.cat``:
    ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]``."""
    idx = torch.arange(h * w).reshape(h, w)
    slots = [idx[r::2, c::2] for c in range(2) for r in range(2)]
    return torch.stack(slots, dim=-1).reshape(-1)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse


class _PermuteTokens(torch.autograd.Function):
    """``x.index_select(1, index)`` for a permutation ``index``, whose backward is the inverse
    gather (no scatter, deterministic)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def _permute(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteTokens.apply(x, index, inverse)
    return x.index_select(1, index)


class _StagePlan:
    """Permutations and masks of one Swin stage at one resolution, on one device."""

    def __init__(self, layer: BasicLayer, h: int, w: int, device: torch.device) -> None:
        window, layer_shift = get_window_size((h, w), layer.window_size, layer.shift_size)
        self.window = tuple(int(v) for v in window)
        self.tokens = self.window[0] * self.window[1]
        self.num_windows = (h // self.window[0]) * (w // self.window[1])
        orders, self.shifted = [], []
        for blk in layer.blocks:
            _, shift = get_window_size((h, w), blk.window_size, blk.shift_size)
            shifted = any(s > 0 for s in shift)
            self.shifted.append(shifted)
            orders.append(_window_order(h, w, self.window, shift if shifted else (0, 0)))
        # MONAI builds one mask per stage (for the stage's shift) and gives it to the shifted blocks.
        self.mask = (
            compute_mask([h, w], self.window, layer_shift, device) if any(self.shifted) else None
        )
        merging = isinstance(layer.downsample, PatchMergingV2)
        final = _merge_order(h, w) if merging else torch.arange(h * w)
        gathers, previous_inverse = [], torch.arange(h * w)
        for order in orders:
            gathers.append(previous_inverse[order])
            previous_inverse = _inverse(order)
        gathers.append(previous_inverse[final])
        self.gathers = [(g.to(device), _inverse(g).to(device)) for g in gathers]
        self.merging = merging

    @staticmethod
    def supported(layer: BasicLayer, h: int, w: int) -> bool:
        window, _ = get_window_size((h, w), layer.window_size, layer.shift_size)
        if h % window[0] or w % window[1]:
            return False  # padded windows: MONAI's forward
        if layer.downsample is not None and not isinstance(layer.downsample, PatchMergingV2):
            return False
        if isinstance(layer.downsample, PatchMergingV2) and (h % 2 or w % 2):
            return False
        return not getattr(layer, "use_hyena", False)


# --------------------------------------------------------------------------------------
# Swin stage
# --------------------------------------------------------------------------------------


def _relative_bias(attn: nn.Module, n: int) -> torch.Tensor:
    """(heads, n, n) relative position bias, exactly as MONAI's WindowAttention gathers it."""
    index = attn.relative_position_index[:n, :n].reshape(-1)
    return attn.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)


def _fusable(x: torch.Tensor, linear: nn.Module) -> bool:
    # plain nn.Linear only: adapters (LoRA) and other wrappers run their own forward; bfloat16
    # where the weights are bfloat16 too (see echocare.networks.precision)
    return type(linear) is nn.Linear and x.device.type == "cpu" and x.dtype in _MKLDNN_LINEAR \
        and linear.weight.dtype == x.dtype and (linear.bias is None or linear.bias.dtype == x.dtype)


def _derived(cache: dict, key: Any, source: torch.Tensor, make) -> Any:
    """``make()``, kept in ``cache`` under ``key`` while ``source`` (a weight or table) is
    unchanged: the same storage, dtype and version (inference tensors have no version counter,
    and cannot change outside inference mode)."""
    stamp = (source.data_ptr(), source.dtype, None if source.is_inference() else source._version)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        with torch.no_grad():
            hit = cache[key] = (stamp, make())
    return hit[1]


def _linear_weight(linear: nn.Module, cache: dict | None) -> torch.Tensor:
    """The linear layer's weight in oneDNN's blocked layout, reordered once while the weight is
    unchanged (not at every call), kept in ``cache`` (the owning fast module's, which copies
    and pickles leave out: oneDNN's layout has no storage); the plain weight without a cache
    or where oneDNN cannot reorder it."""
    weight = linear.weight
    if cache is None:
        return weight

    def reorder() -> torch.Tensor:
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight, None)
        except RuntimeError:  # builds without oneDNN's reorder for this dtype
            return weight

    return _derived(cache, linear, weight, reorder)


def _inference_linear(x: torch.Tensor, linear: nn.Module, gelu: bool = False, cache: dict | None = None) -> torch.Tensor:
    """``linear(x)``, followed by the exact (erf) GELU when ``gelu``; fused on oneDNN (weights
    reordered once into ``cache``, see :func:`_linear_weight`)."""
    if _fusable(x, linear):
        weight = _linear_weight(linear, cache)
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, linear.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, linear.bias, "none", [], "")
    out = linear(x)
    return F.gelu(out) if gelu else out


def _inference_linear_add(
    x: torch.Tensor, linear: nn.Module, residual: torch.Tensor, cache: dict | None = None
) -> torch.Tensor:
    """``residual + linear(x)`` (may reuse ``residual``'s memory)."""
    if _fusable(x, linear):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, _linear_weight(linear, cache), linear.bias, "add")
    return residual.add_(linear(x))


def _check_mkldnn_linear(dtype: torch.dtype) -> bool:
    try:
        x = torch.randn(4, 8).to(dtype)
        lin = nn.Linear(8, 16).to(dtype)
        atol = 1e-5 if dtype == torch.float32 else 0.05
        out = torch.ops.mkldnn._linear_pointwise(x, lin.weight, lin.bias, "gelu", [], "none")
        ref = F.gelu(lin(x))
        res = torch.randn(4, 16).to(dtype)
        out2 = torch.ops.mkldnn._linear_pointwise.binary(x, res, lin.weight, lin.bias, "add")
        return bool(
            out.dtype == dtype
            and torch.allclose(out.float(), ref.float(), atol=atol)
            and torch.allclose(out2.float(), (res + lin(x)).float(), atol=atol)
        )
    except Exception:  # builds without oneDNN, or without its bfloat16 kernels
        return False


def _mkldnn_dtypes(check) -> frozenset[torch.dtype]:
    """The dtypes whose fused oneDNN kernel passes ``check`` (bfloat16 only where oneDNN has bf16 kernels)."""
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    dtypes = [torch.float32]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.append(torch.bfloat16)
    with torch.no_grad():
        return frozenset(d for d in dtypes if check(d))


#: dtypes of the fused oneDNN linear kernels (float32; bfloat16 on CPUs with bf16 support).
_MKLDNN_LINEAR = _mkldnn_dtypes(_check_mkldnn_linear)


class FastBasicLayer(_FastModule, BasicLayer):
    """MONAI's 2D ``BasicLayer`` (one Swin stage) with the fast forward; same parameters.

    Input (B, C, H, W) in any memory format; output (B, C', H', W') as a view of a
    channels-last tensor.
    """

    def _plan(self, h: int, w: int, device: torch.device) -> _StagePlan:
        plans = self.__dict__.setdefault("_fast_plans", {})
        key = (h, w, str(device))
        if key not in plans:
            plans[key] = _StagePlan(self, h, w, device)
        return plans[key]

    def _inference_bias(self, i: int, plan: _StagePlan, dtype: torch.dtype) -> torch.Tensor:
        """Block ``i``'s additive attention mask (nW or 1, heads, n, n), cached while its table is unchanged."""
        attn = self.blocks[i].attn
        table = attn.relative_position_bias_table
        cache = self.__dict__.setdefault("_fast_bias", {})
        key = (i, plan.window, plan.num_windows, table.device.type, dtype)

        def mask() -> torch.Tensor:
            bias = _relative_bias(attn, plan.tokens).unsqueeze(0)
            if plan.shifted[i]:
                bias = bias + plan.mask.to(bias.dtype).unsqueeze(1)
            return bias.to(dtype).contiguous()

        return _derived(cache, key, table, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            return super().forward(x)
        b, c, h, w = x.shape
        if not _StagePlan.supported(self, h, w):
            return super().forward(x.contiguous())
        plan = self._plan(h, w, x.device)
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view when x is channels-last
        if torch.is_grad_enabled():
            tokens = self._blocks_train(tokens, plan)
        else:
            tokens = self._blocks_inference(tokens, plan)
        index, inverse = plan.gathers[-1]
        tokens = _permute(tokens, index, inverse)
        if plan.merging:
            # the gather above did the 2x2 merge: only the merging's norm and reduction are left
            merged = self.downsample.norm(tokens.view(b, h // 2, w // 2, 4 * c))
            if torch.is_grad_enabled():
                tokens = self.downsample.reduction(merged)
            else:
                packed = self.__dict__.setdefault("_fast_packed", {})
                flat = _inference_linear(merged.view(-1, 4 * c), self.downsample.reduction, cache=packed)
                tokens = flat.view(b, h // 2, w // 2, -1)
            h, w = h // 2, w // 2
        else:
            tokens = tokens.view(b, h, w, c)
        return tokens.permute(0, 3, 1, 2)

    # ---- inference: fused oneDNN kernels, cached biases, in-place residuals -------------

    def _blocks_inference(self, x: torch.Tensor, plan: _StagePlan) -> torch.Tensor:
        b, length, c = x.shape
        n, nw = plan.tokens, plan.num_windows
        packed = self.__dict__.setdefault("_fast_packed", {})
        for i, blk in enumerate(self.blocks):
            attn = blk.attn
            heads = attn.num_heads
            x = x.index_select(1, plan.gathers[i][0]).view(b * length, c)
            h = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
            qkv = _inference_linear(h, attn.qkv, cache=packed)
            q, k, v = qkv.view(b * nw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
            bias = self._inference_bias(i, plan, q.dtype)
            if plan.shifted[i] and b > 1:
                # one image at a time: the per-window mask broadcasts without being repeated
                o = torch.empty(b * nw, n, heads, c // heads, dtype=q.dtype, device=q.device)
                for j in range(b):
                    s = slice(j * nw, (j + 1) * nw)
                    o[s] = F.scaled_dot_product_attention(q[s], k[s], v[s], attn_mask=bias, scale=attn.scale).transpose(1, 2)
                o = o.view(b * length, c)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
                o = o.transpose(1, 2).reshape(b * length, c)
            x = _inference_linear_add(o, attn.proj, x, packed)
            h = F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
            if _is_exact_gelu(blk.mlp.fn):
                h = _inference_linear(h, blk.mlp.linear1, gelu=True, cache=packed)
            else:
                h = blk.mlp.fn(_inference_linear(h, blk.mlp.linear1, cache=packed))
            x = _inference_linear_add(h, blk.mlp.linear2, x, packed).view(b, length, c)
        return x

    # ---- training (autograd): same order of operations as MONAI -----------------------

    def _blocks_train(self, x: torch.Tensor, plan: _StagePlan) -> torch.Tensor:
        mode = getattr(self, "fast_checkpoint", None)
        for i, blk in enumerate(self.blocks):
            index, inverse = plan.gathers[i]
            x = _permute(x, index, inverse)
            if mode == "block" or (mode is None and blk.use_checkpoint):
                x = checkpoint(_train_block, blk, x, plan, i, False, use_reentrant=False)
            else:
                x = _train_block(blk, x, plan, i, mode in ("mlp", "mlp+conv"))
        return x


def _is_exact_gelu(fn: nn.Module) -> bool:
    return isinstance(fn, nn.GELU) and fn.approximate == "none"


def _mlp_branch(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return blk.drop_path(blk.mlp(blk.norm2(x)))


def _train_block(blk: nn.Module, x: torch.Tensor, plan: _StagePlan, i: int, checkpoint_mlp: bool = False) -> torch.Tensor:
    """One Swin block on tokens already in its window order (B, L, C), differentiable.

    ``checkpoint_mlp``: recompute the MLP branch in the backward pass instead of keeping its
    activations (LayerNorm output, 4C-wide hidden layer before and after the GELU).
    """
    b, length, c = x.shape
    n, nw = plan.tokens, plan.num_windows
    attn = blk.attn
    heads, hd = attn.num_heads, c // attn.num_heads
    dropout = attn.attn_drop.p if attn.training else 0.0
    h = blk.norm1(x)
    qkv = attn.qkv(h)
    bias = _relative_bias(attn, n)  # (heads, n, n), differentiable in the table
    if plan.shifted[i]:
        # (B, nW * heads, n, hd) so that the per-window bias broadcasts over the batch
        q, k, v = (
            qkv.view(b, nw, n, 3, heads, hd).permute(3, 0, 1, 4, 2, 5).reshape(3, b, nw * heads, n, hd).unbind(0)
        )
        mask = (bias.unsqueeze(0) + plan.mask.to(bias.dtype).unsqueeze(1)).reshape(1, nw * heads, n, n)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout, scale=attn.scale)
        o = o.view(b, nw, heads, n, hd).permute(0, 1, 3, 2, 4).reshape(b, length, c)
    else:
        q, k, v = qkv.view(b * nw, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype), dropout_p=dropout, scale=attn.scale
        )
        o = o.transpose(1, 2).reshape(b, length, c)
    x = x + blk.drop_path(attn.proj_drop(attn.proj(o)))
    if checkpoint_mlp:
        return x + checkpoint(_mlp_branch, blk, x, use_reentrant=False)
    return x + _mlp_branch(blk, x)


# --------------------------------------------------------------------------------------
# Residual convolution blocks (Swin v2 stages, UNETR decoders)
# --------------------------------------------------------------------------------------


def _packed(module: nn.Module, x: torch.Tensor, transposed: bool) -> torch.Tensor | None:
    """The module's weight reordered once for oneDNN (per input shape), while the weight is unchanged."""
    weight = module.weight
    cache = module.__dict__.setdefault("_fast_packed", {})
    key = (tuple(x.shape), x.dtype)
    shapes = [k for k in cache if isinstance(k, tuple)]
    if key not in cache and len(shapes) >= 4:  # a bounded number of input shapes
        for old in shapes:
            del cache[old]

    def reorder() -> torch.Tensor:
        if transposed:
            return torch.ops.mkldnn._reorder_convolution_transpose_weight(
                weight, list(module.padding), list(module.output_padding), list(module.stride),
                list(module.dilation), module.groups, list(x.shape),
            )
        return torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(module.padding), list(module.stride), list(module.dilation), module.groups, list(x.shape)
        )

    return _derived(cache, key, weight, reorder)


def _packed_conv_ok(module: nn.Module, x: torch.Tensor) -> bool:
    return (
        x.dtype in _MKLDNN_CONV
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and module.weight.dtype == x.dtype
        and (module.bias is None or module.bias.dtype == x.dtype)
        and x.ndim == 4
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` (oneDNN returns channels-last) in the memory format of the input ``x``, as PyTorch's conv does."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out
    return out.contiguous()


def _plain_inference_conv(
    module: nn.Conv2d, x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int]
) -> bool:
    """Whether ``module(x)`` is inference on the CPU (no autograd, not under autocast) of a
    ``kernel`` convolution with stride 1, no dilation, no groups and zero ``padding``, with
    weights of the input's dtype."""
    return (
        x.ndim == 4
        and x.device.type == "cpu"
        and module.weight.dtype == x.dtype
        and (module.bias is None or module.bias.dtype == x.dtype)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and tuple(module.kernel_size) == kernel
        and tuple(module.stride) == (1, 1)
        and tuple(module.dilation) == (1, 1)
        and not isinstance(module.padding, str)
        and tuple(module.padding) == padding
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def _winograd_ok(module: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``module(x)`` runs as a Winograd F(4x4, 3x3) convolution: turned on
    (``fast_winograd``, set by :func:`optimize_for_inference`), float32 inference on the CPU
    (not under autocast), a 3x3 stride-1 convolution with padding 1, and where it pays."""
    return (
        getattr(module, "fast_winograd", False)
        and x.dtype == torch.float32
        and _plain_inference_conv(module, x, (3, 3), (1, 1))
        and winograd_pays(x, module.in_channels, module.out_channels)
    )


def _pointwise_ok(module: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``module(x)`` runs as a fused linear layer over the pixels: a 1x1 convolution
    (stride 1, no padding, no groups) of a channels-last map, at inference, not under autocast."""
    return (
        x.dtype in _MKLDNN_LINEAR
        and _plain_inference_conv(module, x, (1, 1), (0, 0))
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _winograd_filters(module: nn.Conv2d) -> torch.Tensor:
    """The module's filters transformed for :func:`winograd_conv3x3`, once while the weight is unchanged."""
    weight = module.weight
    cache = module.__dict__.setdefault("_fast_packed", {})
    return _derived(cache, "winograd", weight, lambda: transform_filter(weight).to(weight.device))


class FastConv2d(_FastModule, nn.Conv2d):
    """``nn.Conv2d`` whose inference runs oneDNN with the weight reordered once (not at every
    call) where the weight outweighs the activations (deep, low-resolution layers); with
    ``fast_winograd`` (:func:`optimize_for_inference`), float32 3x3 convolutions with enough
    channels run as Winograd F(4x4, 3x3) (:mod:`echocare.networks.winograd`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _winograd_ok(self, x):
            return _like(winograd_conv3x3(x, _winograd_filters(self), self.bias), x)
        if _pointwise_ok(self, x):
            # a 1x1 convolution of a channels-last map is a linear layer over its pixels
            n, c, h, w = x.shape
            tokens = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view
            out = torch.ops.mkldnn._linear_pointwise(
                tokens, self.weight.view(self.out_channels, c), self.bias, "none", [], ""
            )
            return out.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)
        if not _packed_conv_ok(self, x) or self.weight.numel() < x[0].numel():
            return super().forward(x)
        packed = _packed(self, x, transposed=False)
        out = torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups, "none", [], ""
        )
        return _like(out, x)


class FastConvTranspose2d(_FastModule, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose inference runs oneDNN with the weight reordered once."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or not _packed_conv_ok(self, x):
            return super().forward(x, output_size)
        packed = _packed(self, x, transposed=True)
        out = torch.ops.mkldnn._convolution_transpose_pointwise(
            x, packed, self.bias, list(self.padding), list(self.output_padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "",
        )
        return _like(out, x)


def _check_mkldnn_conv(dtype: torch.dtype) -> bool:
    try:
        x = torch.randn(1, 4, 8, 8).to(dtype)
        conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).to(dtype)
        out = torch.ops.mkldnn._convolution_pointwise(
            x, _packed(conv, x, False), conv.bias, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
        )
        up = nn.ConvTranspose2d(4, 6, 2, stride=2).to(dtype)
        out2 = torch.ops.mkldnn._convolution_transpose_pointwise(
            x, _packed(up, x, True), up.bias, [0, 0], [0, 0], [2, 2], [1, 1], 1, "none", [], ""
        )
        atol = 1e-5 if dtype == torch.float32 else 0.05
        return bool(
            out.dtype == dtype
            and torch.allclose(out.float(), conv(x).float(), atol=atol)
            and torch.allclose(out2.float(), up(x).float(), atol=atol)
        )
    except Exception:  # builds without oneDNN, or without its bfloat16 kernels
        return False


#: dtypes of the packed oneDNN convolutions (float32; bfloat16 on CPUs with bf16 support).
_MKLDNN_CONV = _mkldnn_dtypes(_check_mkldnn_conv)



def _instance_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI's ``InstanceNorm2d`` (no running statistics) as a group norm with one channel per group."""
    if (
        isinstance(norm, nn.InstanceNorm2d)
        and x.ndim == 4
        and not norm.track_running_stats
        and x.shape[1] == norm.num_features
    ):
        weight = norm.weight if norm.affine else None
        bias = norm.bias if norm.affine else None
        # NCHW: the channels-last group-norm kernel is less accurate (one-pass variance)
        x = x.contiguous()
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            # autocast would run group_norm in float32; instance_norm (the reference) runs in
            # the input's dtype (statistics accumulated in float32 by the kernel): keep that.
            with torch.autocast(x.device.type, enabled=False):
                weight = weight.to(x.dtype) if weight is not None else None
                bias = bias.to(x.dtype) if bias is not None else None
                return F.group_norm(x, x.shape[1], weight, bias, norm.eps)
        return F.group_norm(x, x.shape[1], weight, bias, norm.eps)
    return norm(x)


#: Residual conv blocks whose maps have at least this many pixels run a batch in micro-batches
#: (``fast_micro_batch``): their activations outweigh their weights, so one image at a time stays
#: in the caches. Deeper, smaller blocks are weight-bound and run the whole batch, so that each
#: weight is read once per batch rather than once per image.
MICRO_BATCH_MIN_PIXELS = 64 * 64


def _channels_last_instance_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """MONAI's ``InstanceNorm2d`` on a channels-last map (B, C, H, W), returned channels-last
    (no copies to channels-first and back); None where this does not apply.

    Two passes for the statistics like the reference kernel: the mean, then the mean of the
    squared deviations, both with PyTorch's cascaded float32 sums; then one pass
    ``x * scale + shift``. (PyTorch's channels-last group- and batch-norm
    kernels accumulate E[x^2] and E[x] in one running float32 sum each: off by up to 4e-5 at
    256x256.) Whole-tensor operations, not slices: on a busy CPU every parallel operation
    also waits for its threads.
    """
    if not (
        isinstance(norm, nn.InstanceNorm2d)
        and not norm.track_running_stats
        and x.ndim == 4
        and x.shape[1] == norm.num_features
        and x.dtype in (torch.float32, torch.float64, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return None
    if x.dtype == torch.bfloat16:
        # PyTorch's channels-last group-norm kernel, one channel per group: statistics in
        # float32 (its one-pass variance is far below bfloat16's rounding), float32 affine
        # parameters, output channels-last; 20x faster than the float32 passes below
        weight = norm.weight if norm.affine else None
        bias = norm.bias if norm.affine else None
        return F.group_norm(x, x.shape[1], weight, bias, norm.eps)
    n, c, h, w = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: x is channels-last
    mean = tokens.mean(1, keepdim=True)
    scale = (tokens - mean).square_().mean(1, keepdim=True).add_(norm.eps).rsqrt_()
    if norm.affine:
        scale = scale.mul_(norm.weight)
        shift = torch.addcmul(norm.bias, mean, scale, value=-1)
    else:
        shift = mean.mul(scale).neg_()
    # one pass over the map: x * scale + shift, per image and channel
    return torch.addcmul(shift, tokens, scale).view(n, h, w, c).permute(0, 3, 1, 2)


def _inference_instance_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, channels-last where :func:`_channels_last_instance_norm` applies."""
    out = _channels_last_instance_norm(norm, x)
    return _instance_norm(norm, x) if out is None else out


def _micro_batched(module: nn.Module, run, pixels: int, *inputs: torch.Tensor) -> torch.Tensor:
    """``run(*inputs)``, in micro-batches of ``module.fast_micro_batch`` images where the maps
    have at least :data:`MICRO_BATCH_MIN_PIXELS` pixels (no operation mixes images)."""
    size = _micro_batches(module, inputs[0].shape[0]) if pixels >= MICRO_BATCH_MIN_PIXELS else None
    if size is None:
        return run(*inputs)
    return torch.cat([run(*(t[i : i + size] for t in inputs)) for i in range(0, inputs[0].shape[0], size)])


def _inference_format(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the channels-last inference path of the residual conv blocks."""
    return not torch.is_grad_enabled() and x.ndim == 4 and x.device.type == "cpu"


class FastUnetResBlock(_FastModule, UnetResBlock):
    """MONAI's ``UnetResBlock``; same parameters. Training runs its instance norms as group
    norms with one channel per group (the same statistics, a faster kernel).

    Inference (no autograd, CPU) runs channels-last end to end, every convolution (oneDNN is
    faster on channels-last maps, most of all for large maps and transposed convolutions) and
    every instance norm (:func:`_channels_last_instance_norm`), with in-place residuals; at
    high resolution in micro-batches (see :data:`MICRO_BATCH_MIN_PIXELS`). The output is then
    channels-last. With ``fast_checkpoint`` ``"block"`` or ``"mlp+conv"`` the activations of
    training are recomputed in the backward pass.
    """

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if _inference_format(inp):
            return _micro_batched(self, self._inference, inp.shape[2] * inp.shape[3], inp)
        if getattr(self, "fast_checkpoint", None) in ("block", "mlp+conv") and torch.is_grad_enabled():
            return checkpoint(self._forward, inp, use_reentrant=False)
        return self._forward(inp)

    def _inference(self, inp: torch.Tensor) -> torch.Tensor:
        inp = inp.contiguous(memory_format=torch.channels_last)
        out = self.lrelu(_inference_instance_norm(self.norm1, self.conv1(inp)))
        out = _inference_instance_norm(self.norm2, self.conv2(out))
        residual = inp
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = _inference_instance_norm(self.norm3, residual)
        return self.lrelu(out.add_(residual))

    def _forward(self, inp: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()
        out = self.conv1(inp)
        out = _instance_norm(self.norm1, out)
        out = self.lrelu(out)
        out = self.conv2(out)
        out = _instance_norm(self.norm2, out)
        residual = inp
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = _instance_norm(self.norm3, residual)
        out = out.add_(residual) if inplace else out + residual
        return self.lrelu(out)


class FastUnetrUpBlock(_FastModule, UnetrUpBlock):
    """MONAI's ``UnetrUpBlock`` (transposed convolution, concatenation with the skip, residual
    block); inference runs channels-last, at high resolution in micro-batches, like
    :class:`FastUnetResBlock`. Training runs MONAI's forward."""

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if _inference_format(inp) and skip.ndim == 4:
            return _micro_batched(self, self._inference, skip.shape[2] * skip.shape[3], inp, skip)
        return super().forward(inp, skip)

    def _inference(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = self.transp_conv(inp.contiguous(memory_format=torch.channels_last))
        out = torch.cat((out, skip.contiguous(memory_format=torch.channels_last)), dim=1)
        return self.conv_block(out)


# --------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------


def _channel_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """MONAI's ``proj_out``: LayerNorm over channels of (B, C, H, W), no affine; returned as a
    channels-last view (no copy back to channels-first)."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), [x.shape[1]])
    return y.permute(0, 3, 1, 2)


def _micro_batches(module: nn.Module, batch: int) -> int | None:
    """The micro-batch size to split a batch of ``batch`` into at inference (None: do not split)."""
    size = getattr(module, "fast_micro_batch", None)
    if size and batch > size and not torch.is_grad_enabled():
        return int(size)
    return None


class FastEchoCareEncoder(_FastModule, EchoCareEncoder):
    """:class:`EchoCareEncoder` whose five maps are normalised without copies back to
    channels-first (they are channels-last views); same parameters and outputs.

    With ``fast_micro_batch`` set (see :func:`optimize_for_inference`), inference runs the
    high-resolution part of a batch (the patch embedding and the stages whose input maps have
    at least :data:`MICRO_BATCH_MIN_PIXELS` pixels) in micro-batches of that many images, so
    that every image's activations stay in the caches, and the deeper stages on the whole
    batch, so that their weights (most of the encoder's) are read once per batch rather than
    once per image. The result is the same: no operation mixes images.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True
    ) -> list[torch.Tensor]:
        norm = _channel_layer_norm if normalize else (lambda t: t)
        size = _micro_batches(self, x.shape[0])
        if size is None:
            x0, outputs, done = self._high_resolution(x, mask, norm, split=False)
        else:
            parts = [
                self._high_resolution(x[i : i + size], None if mask is None else mask[i : i + size], norm, split=True)
                for i in range(0, x.shape[0], size)
            ]
            x0 = torch.cat([part[0] for part in parts])
            outputs = [torch.cat(maps) for maps in zip(*(part[1] for part in parts))]
            done = parts[0][2]
        for stage, v2_block in self._stages()[done:]:
            x0 = self._stage(stage, v2_block, x0)
            outputs.append(norm(x0))
        return outputs

    def _stages(self) -> list[tuple[nn.Module, nn.Module]]:
        return list(zip((self.layers1, self.layers2, self.layers3, self.layers4),
                        (self.layers1c, self.layers2c, self.layers3c, self.layers4c)))

    @staticmethod
    def _stage(stage: nn.Module, v2_block: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        # inference: the residual block takes the stage's channels-last map as it is
        return stage[0](v2_block[0](x0 if _inference_format(x0) else x0.contiguous()))

    def _high_resolution(
        self, x: torch.Tensor, mask: torch.Tensor | None, norm, split: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """The patch embedding and the stages after it: all of them (``split`` False), or
        while their input maps have at least :data:`MICRO_BATCH_MIN_PIXELS` pixels. Returns
        the last map, the normalised maps so far and the number of stages run."""
        if _inference_format(x):
            # the patch embedding then writes its map channels-last, the layout of every later block
            x = x.contiguous(memory_format=torch.channels_last)
        x0 = self.pos_drop(self.embed(x, mask))
        outputs = [norm(x0)]
        done = 0
        for stage, v2_block in self._stages():
            if split and x0.shape[2] * x0.shape[3] < MICRO_BATCH_MIN_PIXELS:
                break
            x0 = self._stage(stage, v2_block, x0)
            outputs.append(norm(x0))
            done += 1
        return x0, outputs, done


class FastUNETRDecoder(_FastModule, UNETRDecoder):
    """:class:`UNETRDecoder` whose output is channels-first like the reference's; its blocks
    (:class:`FastUnetResBlock`, :class:`FastUnetrUpBlock`) run channels-last and choose their
    own micro-batches, so that the deep, weight-bound blocks see the whole batch."""

    def forward(self, image: torch.Tensor, features) -> torch.Tensor:  # type: ignore[override]
        return super().forward(image, features).contiguous()


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

_FAST_CLASSES: dict[type, type] = {
    nn.Conv2d: FastConv2d,
    nn.ConvTranspose2d: FastConvTranspose2d,
    EchoCareEncoder: FastEchoCareEncoder,
    UNETRDecoder: FastUNETRDecoder,
    BasicLayer: FastBasicLayer,
    UnetResBlock: FastUnetResBlock,
    UnetrUpBlock: FastUnetrUpBlock,
}
_REFERENCE_CLASSES = {fast: ref for ref, fast in _FAST_CLASSES.items()}


#: Activation checkpointing modes of the fast training path (see :func:`use_fast_paths`).
CHECKPOINT_MODES = (None, "mlp", "mlp+conv", "block")


def use_fast_paths(network: nn.Module, checkpoint: str | None = None) -> nn.Module:
    """Switch ``network``'s Swin stages, encoder, convolutions and residual conv blocks to the
    fast forwards, in place. Returns ``network``.

    Training and inference both work (gradients flow as through MONAI's modules). Parameters,
    buffers and ``state_dict()`` are unchanged.

    Args:
        checkpoint: activation checkpointing in training, trading compute for memory:
            ``None`` (MONAI's ``use_checkpoint`` flags decide), ``"mlp"`` (the MLP branch of
            every Swin block is recomputed in the backward pass), ``"mlp+conv"`` (and every
            residual conv block: Swin v2 stages and UNETR decoders), ``"block"`` (every Swin
            block and every residual conv block).
    """
    if checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
    for module in network.modules():
        fast = _FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
        if isinstance(module, (FastBasicLayer, FastUnetResBlock)):
            module.fast_checkpoint = checkpoint
    return network


def reference_paths(network: nn.Module) -> nn.Module:
    """Undo :func:`use_fast_paths`: MONAI's own forwards again, in place. Returns ``network``."""
    for module in network.modules():
        ref = _REFERENCE_CLASSES.get(type(module))
        if ref is not None:
            module.__class__ = ref
            for cache in (*_CACHES, "fast_checkpoint", "fast_micro_batch", "fast_winograd"):
                module.__dict__.pop(cache, None)
    return network


def fast_paths_enabled(network: nn.Module) -> bool:
    """Whether any module of ``network`` runs a fast forward."""
    return any(type(m) in _REFERENCE_CLASSES for m in network.modules())


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_freed_memory_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Make this process keep the memory it frees for its next allocations (glibc on Linux),
    as a caching allocator does; returns whether it applies (False elsewhere).

    By default glibc gives large blocks (over 128 KiB to 32 MiB) back to the kernel when they
    are freed, so the next forward pass takes a page fault for every 4 KiB of every large
    activation again: 10-15 % of a Swin-base forward on a 2-core virtual machine. With
    ``M_MMAP_MAX`` 0 and no trimming, freed blocks are reused instead. The process's resident
    memory then stays at its peak (it does not shrink between calls). Called once per process by
    :func:`optimize_for_inference` (``keep_memory=True``); idempotent.
    """
    global _freed_memory_kept
    if _freed_memory_kept is None:
        _freed_memory_kept = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # musl and other libcs without mallopt
                mallopt = None
            if mallopt is not None:
                _freed_memory_kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _freed_memory_kept


def optimize_for_inference(
    network: nn.Module,
    inplace: bool = True,
    micro_batch: int | None = 1,
    winograd: bool = True,
    keep_memory: bool = True,
) -> nn.Module:
    """The fastest exact inference form of an EchoCare network (encoder, task or pretraining network).

    Puts the network in ``eval()`` mode with the fast paths of :func:`use_fast_paths`. Run it
    under ``torch.inference_mode()`` (or ``torch.no_grad()``) for the fused inference kernels.
    Outputs equal the reference's within float32 rounding (tested to 1e-4). The state dict is
    unchanged.

    Args:
        network: the network (modified in place unless ``inplace=False``, which works on a
            deep copy).
        micro_batch: the encoder, and the residual conv blocks with maps of at least
            :data:`MICRO_BATCH_MIN_PIXELS` pixels, run a batch this many images at a time (1 by
            default: on a CPU one image's activations stay in the caches); the deeper decoder
            blocks, whose weights outweigh their activations, run the whole batch. ``None``
            runs whole batches everywhere.
        winograd: float32 3x3 convolutions with at least
            :data:`~echocare.networks.winograd.WINOGRAD_MIN_CHANNELS` channels run as Winograd
            F(4x4, 3x3) where it pays (a quarter of the multiply-adds; about 1e-5 relative
            rounding difference, see :mod:`echocare.networks.winograd`). ``False`` keeps
            oneDNN's direct convolutions.
        keep_memory: on the CPU, :func:`keep_freed_memory` (the process keeps freed memory
            for reuse instead of page-faulting it in again at every call).
    """
    if not inplace:
        network = copy.deepcopy(network)
    network.eval()
    use_fast_paths(network)
    if keep_memory and any(p.device.type == "cpu" for p in network.parameters()):
        keep_freed_memory()
    for module in network.modules():
        if isinstance(module, (FastEchoCareEncoder, FastUnetResBlock, FastUnetrUpBlock)):
            module.fast_micro_batch = micro_batch
        if isinstance(module, FastConv2d):
            module.fast_winograd = winograd
    return network
