"""Tests of the EchoCare encoder: compatibility with the released checkpoint layout, loading and saving.

The released checkpoint is a flat state dict of MONAI's 2D ``SwinTransformer`` (358 keys,
120.2 M parameters) plus a top-level ``mask_token`` (1, 1, 128). It is not reachable here,
so we make one with MONAI's own class and check that our encoder loads it strictly and
computes exactly the same maps, and that what we save loads back into MONAI's class.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformer

from echocare.networks.encoder import (
    ENCODER_SIZES,
    EchoCareEncoder,
    EncoderWeightsError,
    build_encoder,
    encoder_state_dict,
    load_encoder_weights,
    load_pretrained,
    save_encoder_weights,
)
from echocare.tasks.pretrain.network import EchoCarePretrainNet

BASE_KWARGS = dict(
    in_chans=3,
    embed_dim=128,
    patch_size=(2, 2),
    window_size=(8, 8),
    depths=(2, 2, 18, 2),
    num_heads=(4, 8, 16, 32),
    mlp_ratio=4,
    qkv_bias=True,
    spatial_dims=2,
    use_v2=True,
)
TINY_KWARGS = dict(BASE_KWARGS, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))


def _monai_swin(kwargs: dict, seed: int) -> SwinTransformer:
    torch.manual_seed(seed)
    model = SwinTransformer(**kwargs).eval()
    # MONAI initialises biases and norms to constants: randomise every tensor so that a
    # key loaded into the wrong place cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _random_tiny_encoder(seed: int) -> EchoCareEncoder:
    torch.manual_seed(seed)
    encoder = build_encoder("tiny").eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return encoder


def _assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def monai_base() -> SwinTransformer:
    return _monai_swin(BASE_KWARGS, seed=0)


@pytest.fixture(scope="module")
def released(monai_base, tmp_path_factory):
    """(path, state dict, mask_token) of a checkpoint in the released layout."""
    state = {k: v.clone() for k, v in monai_base.state_dict().items()}
    torch.manual_seed(1)
    mask_token = torch.randn(1, 1, 128)
    state["mask_token"] = mask_token.clone()
    path = tmp_path_factory.mktemp("released") / "echocare_base.pth"
    torch.save(state, path)
    return path, state, mask_token


@pytest.fixture(scope="module")
def loaded_base(released) -> EchoCareEncoder:
    path, _, _ = released
    encoder = build_encoder("base").eval()
    out = load_encoder_weights(encoder, path)
    assert out is encoder
    return encoder


@pytest.fixture(scope="module")
def tiny_source() -> EchoCareEncoder:
    return _random_tiny_encoder(seed=5)


# ----------------------------------------------------------------------------- released layout
@pytest.mark.slow  # the base encoder (120 M parameters)
def test_monai_reference_is_the_released_architecture(monai_base, loaded_base):
    state = monai_base.state_dict()
    assert len(state) == 358
    n_params = sum(p.numel() for p in monai_base.parameters())
    assert round(n_params / 1e6, 1) == 120.2
    # Our base encoder is that model plus exactly one parameter, the mask token.
    ours = loaded_base
    assert set(ours.state_dict()) == set(state) | {"mask_token"}
    assert sum(p.numel() for p in ours.parameters()) == n_params + 128


@pytest.mark.slow  # the base encoder (120 M parameters)
def test_released_checkpoint_loads_strictly_and_matches_monai(released, loaded_base, monai_base):
    _, state, mask_token = released
    # Every tensor, mask_token included, is the saved one.
    _assert_same_weights(loaded_base.state_dict(), state)
    assert torch.equal(loaded_base.mask_token.detach(), mask_token)

    torch.manual_seed(2)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        ours = loaded_base(x)
        theirs = monai_base(x)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()
    shapes = [tuple(t.shape) for t in ours]
    assert shapes == [(1, 128, 128, 128), (1, 256, 64, 64), (1, 512, 32, 32), (1, 1024, 16, 16), (1, 2048, 8, 8)]
    assert loaded_base.feature_channels == (128, 256, 512, 1024, 2048)
    # Without a mask the mask token plays no part; with an all-False mask neither.
    with torch.no_grad():
        small = torch.rand(1, 3, 64, 64)
        no_mask = loaded_base(small)
        false_mask = loaded_base(small, mask=torch.zeros(1, 32, 32, dtype=torch.bool))
    for a, b in zip(no_mask, false_mask):
        assert torch.equal(a, b)


def test_tiny_map_shapes_scale_with_input():
    encoder = build_encoder("tiny").eval()
    assert encoder.feature_channels == (24, 48, 96, 192, 384)
    with torch.no_grad():
        maps = encoder(torch.rand(2, 3, 256, 256))
        rect = encoder(torch.rand(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [
        (2, 24, 128, 128),
        (2, 48, 64, 64),
        (2, 96, 32, 32),
        (2, 192, 16, 16),
        (2, 384, 8, 8),
    ]
    assert [tuple(m.shape) for m in rect] == [
        (1, 24, 32, 48),
        (1, 48, 16, 24),
        (1, 96, 8, 12),
        (1, 192, 4, 6),
        (1, 384, 2, 3),
    ]


# ----------------------------------------------------------------------------- saving
@pytest.mark.slow  # the base encoder (120 M parameters)
def test_saved_base_is_flat_released_layout(loaded_base, monai_base, released, tmp_path):
    path = save_encoder_weights(loaded_base, tmp_path / "sub" / "enc.pth")
    assert path.is_file()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(sd, dict)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert len(sd) == 359
    assert sd["mask_token"].shape == (1, 1, 128)
    assert torch.equal(sd["mask_token"], released[2])
    sd.pop("mask_token")
    result = monai_base.load_state_dict(sd, strict=True)  # same values: the fixture is unchanged
    assert not result.missing_keys and not result.unexpected_keys


def test_saved_tiny_loads_into_monai_with_same_outputs(tiny_source, tmp_path):
    path = save_encoder_weights(tiny_source, tmp_path / "tiny.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert list(sd) == list(tiny_source.state_dict())
    assert sd["mask_token"].shape == (1, 1, 24)
    assert torch.equal(sd.pop("mask_token"), tiny_source.mask_token.detach())
    monai_tiny = SwinTransformer(**TINY_KWARGS).eval()
    monai_tiny.load_state_dict(sd, strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(tiny_source(x), monai_tiny(x)):
            assert torch.equal(a, b)


def test_save_from_wrapping_networks(tmp_path):
    net = EchoCarePretrainNet("tiny", num_anatomy_nodes=5, mask_unit=16)
    expected = net.encoder.state_dict()
    p1 = save_encoder_weights(net, tmp_path / "net.pth")
    _assert_same_weights(torch.load(p1, weights_only=True), expected)

    class DDPLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    p2 = save_encoder_weights(DDPLike(net), tmp_path / "ddp.pth")
    _assert_same_weights(torch.load(p2, weights_only=True), expected)


# ----------------------------------------------------------------------------- wrappers
def _wrap(kind: str, sd: dict):
    if kind == "flat":
        return dict(sd)
    if kind == "state_dict":
        return {"state_dict": sd, "epoch": 7, "note": "x"}
    if kind == "model":
        return {"model": sd, "optimizer": {"param_groups": [{"lr": 0.1}]}}
    if kind == "module":
        return {"module." + k: v for k, v in sd.items()}
    if kind == "state_dict+module":
        return {"state_dict": {"module." + k: v for k, v in sd.items()}}
    if kind == "swinViT":
        # A SwinUNETR-style network: the encoder under swinViT., the decoder elsewhere.
        wrapped = {"swinViT." + k: v for k, v in sd.items()}
        wrapped["encoder1.layer.conv1.conv.weight"] = torch.randn(24, 3, 3, 3)
        wrapped["decoder1.transp_conv.conv.weight"] = torch.randn(48, 24, 2, 2)
        wrapped["out.conv.conv.weight"] = torch.randn(2, 24, 1, 1)
        return wrapped
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["flat", "state_dict", "model", "module", "state_dict+module", "swinViT"])
def test_wrapped_checkpoints_load(kind, tiny_source, tmp_path):
    path = tmp_path / f"{kind}.pth"
    torch.save(_wrap(kind, tiny_source.state_dict()), path)
    torch.manual_seed(99)
    target = build_encoder("tiny")
    load_encoder_weights(target, path)
    _assert_same_weights(target.state_dict(), tiny_source.state_dict())


def test_whole_pretrain_net_checkpoint_loads_encoder_part(tmp_path):
    torch.manual_seed(3)
    net = EchoCarePretrainNet("tiny", num_anatomy_nodes=118, mask_unit=16)
    with torch.no_grad():
        net.encoder.mask_token.fill_(0.125)
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    assert any(k.startswith("pixel_decoder.") for k in net.state_dict())

    torch.manual_seed(4)
    encoder = build_encoder("tiny")
    load_encoder_weights(encoder, path)
    _assert_same_weights(encoder.state_dict(), net.encoder.state_dict())
    assert torch.all(encoder.mask_token == 0.125)

    # A DDP-wrapped bundle checkpoint ({"network": {"module.encoder....": ...}}), loaded into
    # another network that holds an encoder.
    ddp_path = tmp_path / "ddp_net.pt"
    torch.save({"network": {"module." + k: v for k, v in net.state_dict().items()}, "epoch": 1}, ddp_path)
    torch.manual_seed(5)
    other = EchoCarePretrainNet("tiny", num_anatomy_nodes=118, mask_unit=16)
    decoder_before = {k: v.clone() for k, v in other.pixel_decoder.state_dict().items()}
    load_encoder_weights(other, ddp_path)
    _assert_same_weights(other.encoder.state_dict(), net.encoder.state_dict())
    _assert_same_weights(other.pixel_decoder.state_dict(), decoder_before)


def test_encoder_state_dict_prefers_exact_keys():
    sd = {"a": torch.zeros(1), "b": torch.ones(1)}
    assert set(encoder_state_dict(sd, {"a", "b"})) == {"a", "b"}
    assert set(encoder_state_dict({"encoder.a": sd["a"], "encoder.b": sd["b"], "head.w": sd["a"]})) == {"a", "b"}
    with pytest.raises(EncoderWeightsError, match="no state dict of tensors"):
        encoder_state_dict({"epoch": 3})
    with pytest.raises(EncoderWeightsError):
        encoder_state_dict([torch.zeros(1)])


# ----------------------------------------------------------------------------- refusals
@pytest.mark.slow  # the base encoder (120 M parameters)
def test_missing_block_is_refused_naming_keys(released, loaded_base, tmp_path):
    _, state, _ = released
    dropped = sorted(k for k in state if k.startswith("layers3.0.blocks.1."))
    assert len(dropped) == 14
    broken = {k: v for k, v in state.items() if k not in dropped}
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder_weights(loaded_base, path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys: 14 (" in message
    shown = message.split("missing keys:")[1].split("\n")[0]
    assert all(k in shown for k in dropped[:12])
    assert "unexpected keys: 0" in message
    assert "wrongly shaped keys: 0" in message
    # Nothing was loaded: the encoder still holds the released weights.
    key = "layers3.0.blocks.1.attn.qkv.weight"
    assert torch.equal(loaded_base.state_dict()[key], state[key])


@pytest.mark.slow  # the base encoder (120 M parameters)
def test_other_size_is_refused_with_wrong_shapes(tiny_source, loaded_base, released, tmp_path):
    path = tmp_path / "tiny.pth"
    save_encoder_weights(tiny_source, path)
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder_weights(loaded_base, path)
    message = str(info.value)
    assert "embed_dim=128" in message
    assert "patch_embed.proj.weight: checkpoint (24, 3, 2, 2) vs encoder (128, 3, 2, 2)" in message
    # base has 18 blocks in stage 3, tiny 2: the other 16 blocks are missing.
    assert "missing keys: 224 (" in message  # 16 blocks x 14 keys
    assert "unexpected keys: 0" in message
    n_shaped = int(message.split("wrongly shaped keys: ")[1].split(" ")[0])
    assert n_shaped > 50
    assert torch.equal(loaded_base.mask_token.detach(), released[2])  # unchanged


def test_unrelated_architecture_is_refused_with_unexpected_keys(tmp_path):
    resnet_like = {
        "conv1.weight": torch.randn(64, 3, 7, 7),
        "bn1.weight": torch.ones(64),
        "bn1.running_mean": torch.zeros(64),
        "fc.weight": torch.randn(1000, 2048),
        "fc.bias": torch.zeros(1000),
    }
    path = tmp_path / "resnet.pth"
    torch.save(resnet_like, path)
    encoder = build_encoder("tiny")
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder_weights(encoder, path)
    message = str(info.value)
    assert "unexpected keys: 5 (bn1.running_mean, bn1.weight, conv1.weight, fc.bias, fc.weight)" in message
    assert f"missing keys: {len(encoder.state_dict())} (" in message
    assert "layers1.0.blocks.0." in message


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "echocare.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_encoder_weights(build_encoder("tiny"), path)
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained(build_encoder("tiny"), str(path))
    assert str(path) in str(info.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder_weights(build_encoder("tiny"), path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)
    # A truncated real checkpoint too.
    good = tmp_path / "good.pth"
    torch.save(build_encoder("tiny").state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(EncoderWeightsError, match="truncated.pth"):
        load_encoder_weights(build_encoder("tiny"), truncated)


_TRAP_CALLS: list[str] = []


def _trap(message: str) -> str:
    _TRAP_CALLS.append(message)
    return message


class _PickleBomb:
    def __reduce__(self):
        return (_trap, ("unpickled code ran",))


def test_checkpoints_are_read_with_weights_only(tiny_source, tmp_path, monkeypatch):
    # A checkpoint holding a pickled object that runs code is refused, and the code never runs.
    path = tmp_path / "bomb.pth"
    torch.save({"state_dict": tiny_source.state_dict(), "hook": _PickleBomb()}, path)
    _TRAP_CALLS.clear()
    with pytest.raises(EncoderWeightsError, match="bomb.pth"):
        load_encoder_weights(build_encoder("tiny"), path)
    assert _TRAP_CALLS == []
    # And torch.load is called with weights_only=True explicitly.
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    good = tmp_path / "good.pth"
    torch.save(tiny_source.state_dict(), good)
    load_encoder_weights(build_encoder("tiny"), good)
    assert len(calls) == 1 and calls[0].get("weights_only") is True


# ----------------------------------------------------------------------------- build_encoder
def _stage_config(encoder: EchoCareEncoder):
    stages = (encoder.layers1, encoder.layers2, encoder.layers3, encoder.layers4)
    depths = tuple(len(s[0].blocks) for s in stages)
    heads = tuple(s[0].blocks[0].attn.num_heads for s in stages)
    return depths, heads


@pytest.mark.slow  # the base encoder (120 M parameters)
def test_build_encoder_sizes(loaded_base):
    assert set(ENCODER_SIZES) == {"tiny", "base", "large"}
    tiny = build_encoder("tiny")
    assert tiny.embed_dim == 24 and tiny.patch_embed.proj.out_channels == 24
    assert tiny.patch_embed.proj.kernel_size == (2, 2) and tiny.patch_embed.proj.stride == (2, 2)
    assert tiny.mask_token.shape == (1, 1, 24)
    assert _stage_config(tiny) == ((2, 2, 2, 2), (3, 6, 12, 24))
    assert tiny.window_size == (8, 8)
    base = loaded_base
    assert base.embed_dim == 128 and base.mask_token.shape == (1, 1, 128)
    assert _stage_config(base) == ((2, 2, 18, 2), (4, 8, 16, 32))
    large = build_encoder("large")
    assert large.embed_dim == 192 and large.mask_token.shape == (1, 1, 192)
    assert _stage_config(large) == ((2, 2, 18, 2), (6, 12, 24, 48))
    assert large.feature_channels == (192, 384, 768, 1536, 3072)
    # Defaults are the released base model.
    assert inspect.signature(build_encoder).parameters["size"].default == "base"


def test_unknown_size():
    with pytest.raises(ValueError, match=r"unknown encoder size 'huge'.*base.*large.*tiny"):
        build_encoder("huge")


@pytest.mark.parametrize("shape", [(1, 3, 48, 64), (1, 3, 64, 40), (1, 3, 100, 100)])
def test_sides_not_divisible_by_32(shape):
    encoder = build_encoder("tiny")
    with pytest.raises(ValueError, match="divisible by 32") as info:
        encoder(torch.rand(*shape))
    assert str(shape) in str(info.value)


def test_wrong_input_rank_and_mask_shape():
    encoder = build_encoder("tiny")
    with pytest.raises(ValueError, match="divisible by 32"):
        encoder(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"mask must be \(B, H/2, W/2\) = \(1, 32, 32\)"):
        encoder(torch.rand(1, 3, 64, 64), mask=torch.zeros(1, 16, 16, dtype=torch.bool))


def test_full_mask_removes_the_image(tiny_source):
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    torch.manual_seed(11)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64) * 5 - 2
    with torch.no_grad():
        out_a = tiny_source(a, mask=mask)
        out_b = tiny_source(b, mask=mask)
        out_zero = tiny_source(torch.zeros(2, 3, 64, 64), mask=mask)
        plain = tiny_source(a)
    for x, y, z, p in zip(out_a, out_b, out_zero, plain):
        assert torch.equal(x, y)
        assert torch.equal(x, z)
        assert not torch.equal(x, p)
    # Every masked token is the mask token itself after embedding.
    tokens = tiny_source.embed(a, mask)
    assert torch.equal(tokens, tiny_source.mask_token.detach().reshape(1, 24, 1, 1).expand(2, 24, 32, 32))
    # A partial mask replaces exactly the masked tokens.
    partial = torch.zeros(2, 32, 32, dtype=torch.bool)
    partial[:, :8] = True
    embedded = tiny_source.embed(a, partial).detach()
    unmasked = tiny_source.embed(a).detach()
    assert torch.equal(embedded[:, :, 8:], unmasked[:, :, 8:])
    assert torch.equal(embedded[:, :, :8], tokens[:, :, :8])


# ----------------------------------------------------------------------------- load_pretrained
def test_load_pretrained(tiny_source, tmp_path):
    torch.manual_seed(21)
    net = EchoCarePretrainNet("tiny", num_anatomy_nodes=118, mask_unit=16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert load_pretrained(net, "") is net
    assert load_pretrained(net, None) is net
    _assert_same_weights(net.state_dict(), before)

    path = save_encoder_weights(tiny_source, tmp_path / "pre.pth")
    assert load_pretrained(net, str(path)) is net
    _assert_same_weights(net.encoder.state_dict(), tiny_source.state_dict())
    after = net.state_dict()
    for k, v in before.items():
        if not k.startswith("encoder."):
            assert torch.equal(after[k], v), k
    # A bare encoder too, from a Path.
    encoder = build_encoder("tiny")
    assert load_pretrained(encoder, path) is encoder
    _assert_same_weights(encoder.state_dict(), tiny_source.state_dict())
