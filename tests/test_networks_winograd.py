"""Winograd F(4x4, 3x3) convolutions (echocare.networks.winograd) and where the fast paths use them."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from echocare.networks.fast import FastConv2d, _winograd_ok, keep_freed_memory, optimize_for_inference
from echocare.networks.winograd import WINOGRAD_MIN_CHANNELS, transform_filter, winograd_conv3x3, winograd_pays
from echocare.tasks.supervised import EchoCareSegNet


def _conv_case(batch: int, c_in: int, c_out: int, h: int, w: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, h, w, generator=generator) * 2 + 0.5
    weight = torch.randn(c_out, c_in, 3, 3, generator=generator) / (9 * c_in) ** 0.5
    bias = torch.randn(c_out, generator=generator)
    return x, weight, bias


@pytest.mark.parametrize(
    "batch, c_in, c_out, h, w",
    [
        (2, 8, 12, 13, 22),  # sides not multiples of 4: partial tiles at the edges
        (3, 16, 8, 5, 4),  # small maps: the whole batch in one product
        (1, 8, 8, 70, 41),  # large map: strips of tile rows
        (2, 4, 4, 1, 1),
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_equals_the_direct_convolution(batch, c_in, c_out, h, w, with_bias):
    x, weight, bias = _conv_case(batch, c_in, c_out, h, w)
    bias = bias if with_bias else None
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    direct = F.conv2d(x, weight, bias, padding=1)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = winograd_conv3x3(x.contiguous(memory_format=layout), transform_filter(weight), bias)
        assert out.shape == exact.shape and out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)
        scale = exact.abs().max().item()
        # within float32 rounding of the transforms: 1e-5 of the outputs' scale (direct: ~2e-6)
        assert (out.double() - exact).abs().max().item() <= 1e-5 * scale
        assert (direct.double() - exact).abs().max().item() <= 1e-5 * scale


def test_transform_filter_shapes_and_refusals():
    weight = torch.randn(5, 7, 3, 3)
    assert transform_filter(weight).shape == (36, 7, 5)
    with pytest.raises(ValueError, match="3x3"):
        transform_filter(torch.randn(5, 7, 5, 5))


def test_winograd_pays_on_deep_layers_with_enough_tiles():
    deep = torch.empty(1, 512, 32, 32)  # 64 tiles, 512 channels
    assert winograd_pays(deep, 512, 512)
    # 16 tiles for 1024 x 1024 filters (4x larger once transformed): reading them dominates
    assert not winograd_pays(torch.empty(1, 1024, 16, 16), 1024, 1024)
    assert winograd_pays(torch.empty(8, 1024, 16, 16), 1024, 1024)
    few = WINOGRAD_MIN_CHANNELS // 2
    assert not winograd_pays(torch.empty(1, few, 256, 256), few, 128)


def _fast_conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    torch.manual_seed(0)
    module = nn.Conv2d(c_in, c_out, 3, **{"padding": 1, **kwargs})
    fast = optimize_for_inference(nn.Sequential(copy.deepcopy(module)))[0]
    assert isinstance(fast, FastConv2d) and fast.fast_winograd
    return module, fast


def test_fast_conv2d_runs_winograd_only_where_it_applies():
    module, fast = _fast_conv(64, 64)
    x = torch.randn(1, 64, 32, 32)
    with torch.inference_mode():
        assert _winograd_ok(fast, x)
        assert (fast(x) - module(x)).abs().max().item() <= 1e-4
        assert fast(x).is_contiguous()  # the input's layout, as nn.Conv2d returns it
        assert "winograd" in fast._fast_packed
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _winograd_ok(fast, x)  # bfloat16 would lose too much in the transforms
        assert not _winograd_ok(fast, x.to(torch.float64))
    assert not _winograd_ok(fast, x)  # training (autograd): oneDNN's direct convolution
    for other in (_fast_conv(64, 64, stride=2)[1], _fast_conv(64, 64, padding=2, dilation=2)[1]):
        with torch.inference_mode():
            assert not _winograd_ok(other, x)


def test_winograd_filters_follow_weight_changes():
    module, fast = _fast_conv(64, 64)
    x = torch.randn(1, 64, 16, 16)
    with torch.inference_mode():
        fast(x)
    with torch.no_grad():
        for conv in (module, fast):
            conv.weight.mul_(-2.0)  # in place, as an optimizer step
    with torch.inference_mode():
        assert (fast(x) - module(x)).abs().max().item() <= 1e-4


def test_segmentation_network_with_winograd_equals_reference():
    """At 128x128 the tiny network's deeper residual blocks (96 and 192 channels) take the
    Winograd path; the masks' logits stay within the fast path's tolerance of MONAI's."""
    torch.manual_seed(0)
    reference = EchoCareSegNet("tiny", out_channels=2).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    fast = optimize_for_inference(reference, inplace=False)
    direct = optimize_for_inference(reference, inplace=False, winograd=False)
    x = torch.rand(2, 3, 128, 128, generator=generator)
    with torch.inference_mode():
        expected, out, out_direct = reference(x), fast(x), direct(x)
    used = [name for name, m in fast.named_modules() if "winograd" in getattr(m, "_fast_packed", {})]
    assert used, "no convolution took the Winograd path"
    assert not [m for m in direct.modules() if "winograd" in getattr(m, "_fast_packed", {})]
    assert (out - expected).abs().max().item() <= 1e-4
    assert (out_direct - expected).abs().max().item() <= 1e-4
    assert torch.equal(out.argmax(1), expected.argmax(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_applies_once_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
