"""Task networks (segmentation, classification) and fine-tuning modes (full, frozen, LoRA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from echocare.networks.encoder import (
    ENCODER_SIZES,
    build_encoder,
    load_encoder_weights,
    load_pretrained,
    save_encoder_weights,
)
from echocare.networks.finetune import (
    LoRALinear,
    LoRAQKV,
    apply_lora,
    configure_finetuning,
    lora_parameters,
    merge_lora,
)
from echocare.tasks.supervised.networks import EchoCareClassifier, EchoCareSegNet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _perturb_adapters(module: nn.Module) -> None:
    with torch.no_grad():
        for p in lora_parameters(module):
            p.normal_(0.0, 0.05)


def _encoder_outputs(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    encoder.eval()
    with torch.no_grad():
        return encoder(x)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("out_channels", [2, 5])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_segnet_shapes(out_channels, size):
    net = EchoCareSegNet("tiny", out_channels=out_channels, decoder_feature_size=8)
    out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, out_channels, *size)
    assert torch.isfinite(out).all()


def test_segnet_default_decoder_width_is_embed_dim():
    net = EchoCareSegNet("tiny")
    assert net.decoder.out.conv.conv.in_channels == ENCODER_SIZES["tiny"]["embed_dim"]


@pytest.mark.parametrize("clip_pooling", ["mean", "max", "attention"])
def test_classifier_shapes(clip_pooling):
    net = EchoCareClassifier("tiny", num_classes=4, hidden=16, clip_pooling=clip_pooling).eval()
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 4)
    clip = torch.rand(2, 3, 3, 64, 64)
    assert net(clip).shape == (2, 4)
    assert net.features(clip).shape == (2, 16 * ENCODER_SIZES["tiny"]["embed_dim"])


def test_classifier_clip_pooling_values():
    """mean/max pool the per-frame features; attention weights sum to one over frames."""
    clip = torch.rand(1, 3, 3, 64, 64)
    nets = {p: EchoCareClassifier("tiny", hidden=16, clip_pooling=p).eval() for p in ("mean", "max", "attention")}
    state = nets["mean"].encoder.state_dict()
    for net in nets.values():
        net.encoder.load_state_dict(state)
    with torch.no_grad():
        per_frame = nets["mean"].image_features(clip[0])  # (F, D)
        torch.testing.assert_close(nets["mean"].features(clip)[0], per_frame.mean(0))
        torch.testing.assert_close(nets["max"].features(clip)[0], per_frame.amax(0))
        att = nets["attention"]
        w = torch.softmax(att.frame_score(per_frame).squeeze(-1), dim=0)
        torch.testing.assert_close(att.features(clip)[0], (w[:, None] * per_frame).sum(0))
        # A clip of one frame is the same case as the single image.
        torch.testing.assert_close(att(clip[:, :1]), att(clip[:, 0]))


def test_classifier_rejects_bad_input():
    with pytest.raises(ValueError, match="clip_pooling"):
        EchoCareClassifier("tiny", clip_pooling="median")
    net = EchoCareClassifier("tiny", hidden=16)
    with pytest.raises(ValueError, match="expected"):
        net(torch.rand(3, 64, 64))


# ---------------------------------------------------------------- pretrained weights


@pytest.mark.parametrize(
    "make", [lambda: EchoCareSegNet("tiny", decoder_feature_size=8), lambda: EchoCareClassifier("tiny", hidden=16)]
)
def test_released_layout_loads_into_task_networks(tmp_path, make):
    source = build_encoder("tiny")
    path = save_encoder_weights(source, tmp_path / "encoder.pt")
    net = make()
    assert load_pretrained(net, path) is net
    loaded = net.encoder.state_dict()
    expected = source.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # An empty path leaves the network as initialised.
    assert load_pretrained(net, "") is net


# ---------------------------------------------------------------- LoRA


def test_lora_linear_identity_at_init_and_scale():
    base = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    expected = base(x)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    assert lora.scale == 2.0
    assert torch.equal(lora(x), expected)
    assert lora.lora_A.shape == (2, 6) and lora.lora_B.shape == (5, 2)
    assert lora.lora_A.abs().sum() > 0 and torch.count_nonzero(lora.lora_B) == 0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert LoRALinear(nn.Linear(6, 5), rank=3).scale == 1.0
    _perturb_adapters(lora)
    torch.testing.assert_close(lora(x), expected + 2.0 * x @ (lora.lora_B @ lora.lora_A).t())
    torch.testing.assert_close(lora.merged()(x), lora(x))


def test_lora_encoder_identical_at_init():
    encoder = build_encoder("tiny")
    x = torch.rand(2, 3, 64, 64)
    before = _encoder_outputs(encoder, x)
    assert apply_lora(encoder, 4) == sum(ENCODER_SIZES["tiny"]["depths"])
    after = _encoder_outputs(encoder, x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_lora_trainable_params_are_the_adapters():
    encoder = build_encoder("tiny")
    rank = 4
    apply_lora(encoder, rank)
    # By hand: each block of a stage with width dim adapts q (dim -> dim) and v (dim -> dim),
    # each rank * (in + out) parameters.
    cfg = ENCODER_SIZES["tiny"]
    expected = 0
    for stage, depth in enumerate(cfg["depths"]):
        dim = cfg["embed_dim"] * 2**stage
        expected += depth * 2 * rank * (dim + dim)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert trainable == expected == 2 * 2 * 4 * 2 * (24 + 48 + 96 + 192)
    assert isinstance(encoder.layers1[0].blocks[0].attn.qkv, LoRAQKV)
    assert isinstance(encoder.layers4[0].blocks[1].attn.qkv, LoRAQKV)
    # A second call adapts nothing more.
    assert apply_lora(encoder, rank) == 0
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == expected


def test_lora_qkv_leaves_k_slice_unchanged():
    dim = 12
    base = nn.Linear(dim, 3 * dim)
    x = torch.randn(3, 7, dim)
    reference = base(x).detach()
    qkv = LoRAQKV(base, rank=2)
    _perturb_adapters(qkv)
    out = qkv(x).detach()
    assert torch.equal(out[..., dim : 2 * dim], reference[..., dim : 2 * dim])
    assert not torch.allclose(out[..., :dim], reference[..., :dim])
    assert not torch.allclose(out[..., 2 * dim :], reference[..., 2 * dim :])
    torch.testing.assert_close(out[..., :dim], reference[..., :dim] + x @ (qkv.lora_q_B @ qkv.lora_q_A).t())
    torch.testing.assert_close(out[..., 2 * dim :], reference[..., 2 * dim :] + x @ (qkv.lora_v_B @ qkv.lora_v_A).t())
    with pytest.raises(ValueError, match="fused qkv"):
        LoRAQKV(nn.Linear(4, 8), rank=2)


def test_merge_lora_round_trip(tmp_path):
    encoder = build_encoder("tiny")
    released_keys = set(encoder.state_dict())
    apply_lora(encoder, 4)
    _perturb_adapters(encoder)
    x = torch.rand(2, 3, 64, 64)
    lora_out = _encoder_outputs(encoder, x)
    assert set(encoder.state_dict()) != released_keys
    assert merge_lora(encoder) == sum(ENCODER_SIZES["tiny"]["depths"])
    assert not lora_parameters(encoder)
    assert type(encoder.layers2[0].blocks[0].attn.qkv) is nn.Linear
    assert set(encoder.state_dict()) == released_keys
    path = save_encoder_weights(encoder, tmp_path / "merged.pt")
    fresh = load_encoder_weights(build_encoder("tiny"), path)
    for a, b in zip(lora_out, _encoder_outputs(fresh, x)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- configure_finetuning


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_configure_full():
    net = EchoCareClassifier("tiny", hidden=16)
    groups = configure_finetuning(net, "full", encoder_lr=1e-5, head_lr=1e-3, weight_decay=0.05)
    assert [g["lr"] for g in groups] == [1e-5, 1e-3]
    assert all(g["weight_decay"] == 0.05 for g in groups)
    # all but the pretraining mask token, which a task forward never uses (DDP needs every
    # trainable parameter in the loss)
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == ["encoder.mask_token"]
    assert _ids(groups[0]["params"]) == _ids(net.encoder.parameters()) - {id(net.encoder.mask_token)}
    head = _ids(net.parameters()) - _ids(net.encoder.parameters())
    assert _ids(groups[1]["params"]) == head


def test_configure_frozen_step_changes_only_head():
    net = EchoCareClassifier("tiny", hidden=16, dropout=0.0)
    groups = configure_finetuning(net, "frozen", head_lr=1e-2)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-2
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.head.parameters()) and net.norm.weight.requires_grad
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    optimizer = torch.optim.AdamW(groups)
    loss = nn.functional.cross_entropy(net(torch.rand(2, 3, 64, 64)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    assert all(p.grad is None for p in net.encoder.parameters())
    assert any(not torch.equal(v, head_before[k]) for k, v in net.head.state_dict().items())


def test_configure_lora():
    net = EchoCareSegNet("tiny", decoder_feature_size=8)
    groups = configure_finetuning(net, "lora", lora_rank=2, encoder_lr=1e-5, head_lr=1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    adapters = _ids(lora_parameters(net.encoder))
    assert len(adapters) == 4 * sum(ENCODER_SIZES["tiny"]["depths"])
    assert {id(p) for p in net.encoder.parameters() if p.requires_grad} == adapters
    assert all(p.requires_grad for p in net.decoder.parameters())
    assert _ids(groups[0]["params"]) == adapters | _ids(net.decoder.parameters())
    assert net.encoder.layers1[0].blocks[0].attn.qkv.rank == 2
    # Calling again does not stack adapters.
    configure_finetuning(net, "lora", lora_rank=2)
    assert _ids(lora_parameters(net.encoder)) == adapters


def test_configure_unknown_mode():
    with pytest.raises(ValueError, match="full.*frozen.*lora"):
        configure_finetuning(EchoCareClassifier("tiny", hidden=16), "partial")
