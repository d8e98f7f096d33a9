"""bf16 inference (``precision: bf16``): BF16Inference, its fast paths in bfloat16, the bundles' id.

Agreement on real images and speed are measured by ``benchmarks/inference.py``; here the
bf16 outputs are compared with float32 on tiny networks (bfloat16 keeps 8 mantissa bits).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from echocare.networks import BF16Inference, PRECISIONS, cpu_isa, load_trained_network, with_precision
from echocare.networks.fast import _MKLDNN_CONV, _MKLDNN_LINEAR, FastUnetResBlock, optimize_for_inference
from echocare.networks.precision import check_precision
from echocare.tasks.supervised import EchoCareClassifier, EchoCareSegNet

BUNDLES = sorted(p.parent.parent.name for p in Path("bundles").glob("*/configs/inference.yaml"))
BF16_KERNELS = torch.bfloat16 in _MKLDNN_LINEAR and torch.bfloat16 in _MKLDNN_CONV


def _perturbed(network: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return network.eval()


def _image(batch: int = 2, side: int = 64) -> torch.Tensor:
    # smooth structured images (not white noise): a bright disc on a gradient
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    images = [((xx - 0.2 * i) ** 2 + yy**2 < 0.3).float() * 0.6 + 0.2 * (yy + 1) for i in range(batch)]
    return torch.stack(images)[:, None].repeat(1, 3, 1, 1)


def test_bf16_segmentation_agrees_with_float32_and_returns_float32():
    torch.manual_seed(0)
    reference = _perturbed(EchoCareSegNet("tiny", out_channels=2))
    bf16 = BF16Inference(copy.deepcopy(reference), "cpu")
    x = _image()
    with torch.inference_mode():
        expected, got = reference(x), bf16(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (2, 2, 64, 64)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 0.05 * scale
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() > 0.97
    # the matrix layers run in bfloat16, the norms keep float32 parameters, the state dict keeps its names
    inner = bf16.module
    assert inner.encoder.layers1[0].blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert inner.encoder.layers1[0].blocks[0].norm1.weight.dtype == torch.float32
    assert {k.removeprefix("module.") for k in bf16.state_dict()} == set(reference.state_dict())
    assert any(isinstance(m, FastUnetResBlock) for m in inner.modules())


def test_bf16_keeps_the_input_and_output_layers_in_float32():
    """The layers the networks declare (``float32_modules``: the encoder's patch embedding, the
    decoder's convolutions on the image and output convolution) run in float32 on float32 inputs, between
    layers that stay in bfloat16, and compute exactly what the float32 network's layers do."""
    torch.manual_seed(3)
    reference = _perturbed(EchoCareSegNet("tiny", out_channels=2))
    bf16 = BF16Inference(copy.deepcopy(reference), "cpu")
    assert bf16.float32_names == [
        "encoder.patch_embed", "decoder.skip_image.layer.conv1", "decoder.skip_image.layer.conv3", "decoder.out"
    ]
    inner, seen = bf16.module, {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (args[0].dtype, output.dtype, args[0].clone())
        return hook

    for name, module in inner.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(record(name))
    x = _image()
    with torch.inference_mode():
        bf16(x)
    kept = [n for n in seen if n.startswith(tuple(f"{name}." for name in bf16.float32_names))]
    assert len(kept) == 4  # patch embedding, the image block's convolutions on the image, the output convolution
    for name in kept:
        assert seen[name][:2] == (torch.float32, torch.float32), name
        assert inner.get_submodule(name).weight.dtype == torch.float32, name
    others = [n for n in seen if n not in kept]
    assert others and all(seen[n][1] == torch.bfloat16 for n in others)
    # the output convolution on its (upcast) input gives what the float32 network's gives
    conv = "decoder.out.conv.conv"
    with torch.inference_mode():
        expected = reference.get_submodule(conv)(seen[conv][2])
        got = inner.get_submodule(conv)(seen[conv][2])
    assert torch.equal(got, expected)
    # autocast is back on after a float32 layer, also when its forward raises
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):  # 5 channels where the convolution takes more
            inner.decoder.out(torch.zeros(1, 5, 8, 8))
        assert torch.is_autocast_enabled("cpu")
    # none kept: every matrix layer in bfloat16, as before
    plain = BF16Inference(copy.deepcopy(reference), "cpu", float32_modules=[])
    assert plain.module.decoder.out.conv.conv.weight.dtype == torch.bfloat16


def test_bf16_classifier_probabilities_close_to_float32():
    torch.manual_seed(1)
    reference = _perturbed(EchoCareClassifier("tiny", num_classes=4))
    bf16 = with_precision(copy.deepcopy(reference), "bf16", "cpu")
    x = _image(4)
    with torch.inference_mode():
        p32, p16 = reference(x).softmax(1), bf16(x).softmax(1)
    assert p16.dtype == torch.float32
    assert (p32 - p16).abs().max().item() < 0.02


@pytest.mark.skipif(not BF16_KERNELS, reason="no oneDNN bfloat16 kernels on this CPU")
def test_fast_paths_in_bfloat16_equal_plain_bfloat16_modules():
    """The fused oneDNN linears, packed convolutions and the channels-last instance norm in
    bfloat16 compute what PyTorch's own modules compute in bfloat16 (no float32 detour)."""
    torch.manual_seed(2)
    plain = _perturbed(EchoCareSegNet("tiny", out_channels=2)).to(torch.bfloat16)
    fast = optimize_for_inference(copy.deepcopy(plain))
    x = _image().to(torch.bfloat16)
    with torch.inference_mode():
        a, b = plain(x).float(), fast(x).float()
    assert (a - b).abs().max().item() < 0.03 * a.abs().max().item()
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() > 0.98


def test_float32_stays_the_default_and_bad_values_are_refused(tmp_path):
    network = EchoCareClassifier("tiny", num_classes=2)
    assert PRECISIONS == ("fp32", "bf16")
    assert with_precision(network, "fp32") is network
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        check_precision("fp16")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    with pytest.raises(ValueError, match="model.onnx: precision bf16 applies to PyTorch networks"):
        load_trained_network(network, "", onnx_model=onnx, precision="bf16")


def test_cpu_isa_reads_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_isa(info) == ["amx_bf16", "avx512_bf16", "avx512f"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_isa(info) == []
    assert cpu_isa(tmp_path / "missing") == []


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_bundle_has_the_precision_id(bundle):
    for name in ("inference.yaml", "evaluate.yaml"):
        config = yaml.safe_load((Path("bundles") / bundle / "configs" / name).read_text())
        assert config["precision"] == "fp32", f"{bundle}/{name}"
        assert config["network"]["_target_"] == "echocare.networks.load_trained_network"
        assert config["network"]["precision"] == "@precision", f"{bundle}/{name}"


@pytest.mark.parametrize("bundle", ["ddti_seg", "busbra_cls", "focus_det", "camus_ef", "echocare_pretrain"])
def test_bundle_network_runs_in_bf16(bundle, tmp_path):
    """The bundle's own ``network`` id with ``precision: bf16`` (tiny, 64x64): float32 outputs
    close to the float32 network's."""
    from monai.bundle import ConfigParser

    from echocare.networks.export import build_bundle_network, example_inputs

    parser = ConfigParser()
    parser.read_config(f"bundles/{bundle}/configs/inference.yaml")
    overrides = {"network_size": "tiny", "image_size": 64, "device": "$torch.device('cpu')"}
    if bundle == "camus_ef":
        overrides["num_frames"] = 2
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(_perturbed(parser.get_parsed_content("network_def")).state_dict(), checkpoint)
    parser["checkpoint"], parser["precision"] = str(checkpoint), "bf16"
    bf16 = parser.get_parsed_content("network")
    assert isinstance(bf16, BF16Inference)
    module, spec = build_bundle_network(bundle, checkpoint, overrides={k: v for k, v in overrides.items() if k != "device"})
    inputs = example_inputs(spec, batch_size=2)
    with torch.inference_mode():
        expected = module(*inputs)
        got = bf16(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = tuple(got[name] for name in spec["outputs"]) if isinstance(got, dict) else (got if isinstance(got, tuple) else (got,))
    for e, g in zip(expected, got):
        if e.is_floating_point():
            assert g.dtype == torch.float32
            assert (g - e).abs().max().item() <= 0.05 * max(e.abs().max().item(), 1e-3), bundle
