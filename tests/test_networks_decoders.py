"""The UNETR decoder's instance norms accept a 1x1 map (a 32x32 input's bottleneck) and change
nothing at any other size (#18)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from echocare.networks.decoders import SinglePixelInstanceNorm2d, accept_single_pixel_maps
from echocare.tasks.supervised import EchoCareSegNet


def _plain_copy(net: nn.Module) -> nn.Module:
    """The same network with PyTorch's own InstanceNorm2d everywhere (the behaviour before #18)."""
    import copy

    plain = copy.deepcopy(net)
    for module in plain.modules():
        if type(module) is SinglePixelInstanceNorm2d:
            module.__class__ = nn.InstanceNorm2d
    return plain


def test_decoder_norms_are_switched_and_state_dict_unchanged() -> None:
    torch.manual_seed(0)
    net = EchoCareSegNet("tiny", out_channels=2).eval()
    norms = [m for m in net.decoder.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(type(m) is SinglePixelInstanceNorm2d for m in norms)
    plain = _plain_copy(net)
    assert not any(type(m) is SinglePixelInstanceNorm2d for m in plain.modules())
    assert list(net.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(net.state_dict())  # the same weights load both ways (strict)


def test_outputs_identical_where_plain_norms_work() -> None:
    torch.manual_seed(0)
    net = EchoCareSegNet("tiny", out_channels=2).eval()
    plain = _plain_copy(net)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = net(x), plain(x)
    assert out.shape == (1, 2, 64, 64)
    assert torch.equal(out, ref)  # bit for bit: the same kernel runs


def test_32x32_runs_where_plain_norms_fail() -> None:
    torch.manual_seed(0)
    net = EchoCareSegNet("tiny", out_channels=3).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert net(x).shape == (1, 3, 32, 32)
        with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
            _plain_copy(net)(x)


def test_single_pixel_map_normalises_to_zero_or_bias() -> None:
    x = torch.tensor([[[[2.5]], [[-7.0]], [[float("nan")]]]])  # (1, 3, 1, 1)
    plain = SinglePixelInstanceNorm2d(3)
    out = plain(x)
    assert out.shape == x.shape
    assert out[0, :2].flatten().tolist() == [0.0, 0.0] and torch.isnan(out[0, 2]).all()
    affine = SinglePixelInstanceNorm2d(3, affine=True)
    with torch.no_grad():
        affine.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        affine.weight.fill_(3.0)
    assert affine(torch.tensor([[[[1.0]], [[4.0]], [[9.0]]]])).flatten().tolist() == [0.5, -1.0, 2.0]
    # Unbatched (C, 1, 1) as nn.InstanceNorm2d accepts it.
    assert affine(torch.tensor([[[1.0]], [[4.0]], [[9.0]]])).flatten().tolist() == [0.5, -1.0, 2.0]
    # A map of more than one pixel: PyTorch's own result.
    y = torch.randn(2, 3, 1, 2)
    reference = nn.InstanceNorm2d(3, affine=True)
    reference.load_state_dict(affine.state_dict())
    assert torch.equal(affine(y), reference(y))


def test_accept_single_pixel_maps_leaves_other_modules() -> None:
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4), nn.BatchNorm2d(4), nn.InstanceNorm1d(4))
    assert accept_single_pixel_maps(block) is block
    assert [type(m) for m in block] == [nn.Conv2d, SinglePixelInstanceNorm2d, nn.BatchNorm2d, nn.InstanceNorm1d]
    assert torch.equal(block[1](torch.rand(1, 4, 1, 1)), torch.zeros(1, 4, 1, 1))


def test_fast_paths_run_at_32x32() -> None:
    from echocare.networks import reference_paths, use_fast_paths

    torch.manual_seed(0)
    net = EchoCareSegNet("tiny", out_channels=2).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        use_fast_paths(net)
        fast = net(x)
        reference_paths(net)
        again = net(x)
    assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(again, ref)
