"""Fast exact paths (``echocare.networks.fast``) against MONAI's own modules, at tiny sizes.

Every fast path must compute the reference's function: outputs within 1e-4 (float32) and
gradients within float32 rounding of the eager MONAI modules with the same weights, with
unchanged state dicts. Speed is measured by ``benchmarks/``, never asserted here.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from echocare.tasks.supervised import EchoCareClassifier, EchoCareSegNet
from echocare.tasks.pretrain import EchoCarePretrainNet, PretrainLoss
from echocare.networks import build_encoder
from echocare.networks.fast import (
    MICRO_BATCH_MIN_PIXELS,
    FastBasicLayer,
    FastConv2d,
    FastConvTranspose2d,
    FastEchoCareEncoder,
    FastUnetResBlock,
    FastUnetrUpBlock,
    _channels_last_instance_norm,
    fast_paths_enabled,
    optimize_for_inference,
    reference_paths,
    use_fast_paths,
)
from echocare.ontology import load_ontology

ATOL = 1e-4
TINY_MONAI = dict(
    in_chans=3, embed_dim=24, patch_size=(2, 2), window_size=(8, 8), depths=(2, 2, 2, 2),
    num_heads=(3, 6, 12, 24), mlp_ratio=4, qkv_bias=True, spatial_dims=2, use_v2=True,
)


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    """Randomise every tensor (MONAI initialises biases and norms to constants)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return module


def _tiny_encoder(seed: int = 0):
    torch.manual_seed(seed)
    return _perturb(build_encoder("tiny"), seed).eval()


def _assert_maps_close(a, b, atol=ATOL):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() <= atol, (x - y).abs().max().item()


# ---------------------------------------------------------------------------- state dicts
def test_state_dict_unchanged_and_classes_swapped():
    net = EchoCareSegNet("tiny", out_channels=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimize_for_inference(net)
    after = net.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].shape == before[k].shape and torch.equal(after[k], before[k]), k
    assert isinstance(net.encoder, FastEchoCareEncoder)
    assert isinstance(net.encoder.layers3[0], FastBasicLayer)
    assert isinstance(net.decoder.up0.conv_block, FastUnetResBlock)
    assert isinstance(net.decoder.up0, FastUnetrUpBlock)
    assert isinstance(net.decoder.up0.transp_conv.conv, FastConvTranspose2d)
    assert isinstance(net.decoder.skip1.layer.conv1.conv, FastConv2d)
    assert fast_paths_enabled(net) and not net.training
    reference_paths(net)
    assert not fast_paths_enabled(net)
    assert type(net.encoder.layers3[0]).__name__ == "BasicLayer"


def test_fast_encoder_keeps_the_released_layout(tmp_path):
    """Weights move both ways between a fast encoder and MONAI's SwinTransformer."""
    monai = _perturb(SwinTransformer(**TINY_MONAI), 3).eval()
    encoder = use_fast_paths(build_encoder("tiny")).eval()
    state = dict(monai.state_dict(), mask_token=torch.randn(1, 1, 24))
    encoder.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        _assert_maps_close(encoder(x), monai(x))
    saved = {k: v for k, v in encoder.state_dict().items() if k != "mask_token"}
    fresh = SwinTransformer(**TINY_MONAI).eval()
    fresh.load_state_dict(saved, strict=True)
    with torch.inference_mode():
        _assert_maps_close(fresh(x), monai(x), atol=0)


# ---------------------------------------------------------------------------- inference
@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 256, 256),  # every stage shifted (stage 4 at 16x16 > window 8)
        (2, 3, 64, 64),  # batch > 1; stage 4 at 4x4: window shrinks to the map, no shift
        (2, 3, 96, 128),  # non-square; stage 3 at 12x16 needs padded windows: MONAI's forward there
    ],
)
def test_encoder_inference_matches_monai(shape):
    reference = _tiny_encoder(1)
    fast = optimize_for_inference(copy.deepcopy(reference))
    torch.manual_seed(2)
    x = torch.rand(*shape)
    mask = torch.rand(shape[0], shape[2] // 2, shape[3] // 2) < 0.5
    with torch.inference_mode():
        _assert_maps_close(fast(x), reference(x))
        _assert_maps_close(fast(x, mask=mask), reference(x, mask=mask))
        _assert_maps_close(fast(x, normalize=False), reference(x, normalize=False))
    with torch.no_grad():  # no_grad (not inference mode) takes the same fused path
        _assert_maps_close(fast(x), reference(x))


def test_fast_encoder_equals_plain_monai_swin():
    """Against MONAI's class itself (not our subclass), same weights."""
    monai = _perturb(SwinTransformer(**TINY_MONAI), 4).eval()
    encoder = build_encoder("tiny").eval()
    encoder.load_state_dict(dict(monai.state_dict(), mask_token=torch.zeros(1, 1, 24)))
    optimize_for_inference(encoder)
    x = torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        _assert_maps_close(encoder(x), monai(x))


@pytest.mark.parametrize("batch", [1, 3])
def test_segmentation_network_inference(batch):
    torch.manual_seed(0)
    reference = _perturb(EchoCareSegNet("tiny", out_channels=2), 5).eval()
    fast = optimize_for_inference(reference, inplace=False)
    x = torch.rand(batch, 3, 64, 64)
    with torch.inference_mode():
        a, b = reference(x), fast(x)
    assert a.shape == b.shape == (batch, 2, 64, 64)
    assert b.is_contiguous()
    assert (a - b).abs().max().item() <= ATOL


def test_classifier_inference_images_and_clips():
    torch.manual_seed(0)
    reference = _perturb(EchoCareClassifier("tiny", num_classes=4, clip_pooling="attention"), 6).eval()
    fast = optimize_for_inference(reference, inplace=False)
    images, clips = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 3, 64, 64)
    with torch.inference_mode():
        for x in (images, clips):
            assert (reference(x) - fast(x)).abs().max().item() <= ATOL


def test_lora_network_uses_its_adapters():
    """Wrapped linear layers (LoRA) keep their own forward in the fused inference path."""
    from echocare.networks import apply_lora

    torch.manual_seed(0)
    reference = _perturb(EchoCareClassifier("tiny", num_classes=3), 7)
    apply_lora(reference.encoder, rank=2)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.1)
    reference.eval()
    fast = optimize_for_inference(reference, inplace=False)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert (reference(x) - fast(x)).abs().max().item() <= ATOL


def test_caches_follow_weight_changes():
    """Precomputed biases and packed weights are rebuilt after the weights change."""
    torch.manual_seed(0)
    reference = _perturb(EchoCareSegNet("tiny", out_channels=2), 8).eval()
    fast = optimize_for_inference(reference, inplace=False)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        fast(x)  # fill the caches
    _perturb(reference, 9)
    fast.load_state_dict(reference.state_dict())
    with torch.inference_mode():
        assert (reference(x) - fast(x)).abs().max().item() <= ATOL
    with torch.no_grad():  # in-place updates (as an optimizer makes)
        for p in list(reference.parameters()) + list(fast.parameters()):
            p.mul_(1.01)
    with torch.inference_mode():
        assert (reference(x) - fast(x)).abs().max().item() <= ATOL


def test_copy_and_pickle_after_use():
    torch.manual_seed(0)
    fast = optimize_for_inference(_perturb(EchoCareSegNet("tiny", out_channels=2), 10))
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        expected = fast(x)
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        with torch.inference_mode():
            assert torch.allclose(clone(x), expected, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_convolutions(channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cases = [
        (nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.rand(1, 64, 4, 4)),  # packed (weight > input)
        (nn.Conv2d(8, 16, 3, padding=1, bias=True), torch.rand(2, 8, 32, 32)),  # plain
        (nn.Conv2d(32, 32, 1, bias=False), torch.rand(1, 32, 2, 2)),
        (nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False), torch.rand(2, 16, 8, 8)),
    ]
    for module, x in cases:
        x = x.contiguous(memory_format=fmt)
        fast = use_fast_paths(copy.deepcopy(module))
        with torch.inference_mode():
            a, b = module(x), fast(x)
        assert (a - b).abs().max().item() <= 1e-5
        assert b.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("affine", [False, True])
def test_channels_last_instance_norm_matches_float64(affine):
    """Two-pass statistics: exact to float32 rounding even where a channel's mean is 30x its
    spread at 256x256 (PyTorch's channels-last group norm is off by ~1e-4 there)."""
    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(1, 0.5), norm.bias.normal_(0, 0.5)
    x = torch.randn(2, 6, 256, 256) + torch.tensor([0.0, 3, -5, 30, 0.1, 1]).view(1, 6, 1, 1)
    expected = F.instance_norm(x.double(), weight=norm.weight.double() if affine else None,
                               bias=norm.bias.double() if affine else None, eps=norm.eps)
    with torch.inference_mode():
        out = _channels_last_instance_norm(norm, x.contiguous(memory_format=torch.channels_last))
        assert _channels_last_instance_norm(norm, x) is None  # channels-first: the group-norm path
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max().item() <= 5e-6


@pytest.mark.parametrize("channels_last", [False, True])
def test_up_block_inference_matches_monai(channels_last):
    """Transposed convolution, concatenation and residual block, channels-last, micro-batched
    at high resolution; channels-first or channels-last inputs."""
    from monai.networks.blocks import UnetrUpBlock

    torch.manual_seed(0)
    reference = _perturb(
        UnetrUpBlock(2, 16, 8, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True), 13
    ).eval()
    fast = optimize_for_inference(reference, inplace=False)
    assert isinstance(fast, FastUnetrUpBlock) and fast.fast_micro_batch == 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inp, skip = torch.rand(3, 16, 32, 32).contiguous(memory_format=fmt), torch.rand(3, 8, 64, 64).contiguous(memory_format=fmt)
    with torch.inference_mode():
        a, b = reference(inp, skip), fast(inp, skip)
    assert b.shape == a.shape == (3, 8, 64, 64) and b.is_contiguous(memory_format=torch.channels_last)
    assert (a - b).abs().max().item() <= ATOL


def test_decoder_micro_batches_only_high_resolution_blocks():
    """Deep, weight-bound blocks see the whole batch; blocks with maps of at least
    MICRO_BATCH_MIN_PIXELS pixels see one image at a time; the output equals the reference's."""
    torch.manual_seed(0)
    reference = _perturb(EchoCareSegNet("tiny", out_channels=2), 14).eval()
    fast = optimize_for_inference(reference, inplace=False)
    seen: dict[str, list[int]] = {}
    for name in ("bottleneck", "skip2", "skip_image", "up0"):
        block = getattr(fast.decoder, name)
        target = block.layer if hasattr(block, "layer") else block
        target.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].shape[0]))
    # 64 px: bottleneck at 2x2, skip2 at 16x16 (below the threshold), skip_image/up0 at 64x64
    assert 16 * 16 < MICRO_BATCH_MIN_PIXELS <= 64 * 64
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        out, expected = fast(x), reference(x)
    assert seen == {"bottleneck": [2], "skip2": [2], "skip_image": [2], "up0": [2]}  # the blocks' own calls
    assert out.is_contiguous() and (out - expected).abs().max().item() <= ATOL
    # inside, the deep residual block runs the batch once, the high-resolution one image by image
    calls: dict[str, list[int]] = {"bottleneck": [], "up0": []}
    for name, block in (("bottleneck", fast.decoder.bottleneck.layer), ("up0", fast.decoder.up0.conv_block)):
        block._inference = (lambda run, log: lambda t: (log.append(t.shape[0]), run(t))[1])(block._inference, calls[name])
    with torch.inference_mode():
        assert (fast(x) - expected).abs().max().item() <= ATOL
    assert calls == {"bottleneck": [2], "up0": [1, 1]}


# ---------------------------------------------------------------------------- training
def _pretrain_pair(drop_path: float = 0.0):
    ontology = load_ontology()
    torch.manual_seed(0)
    reference = _perturb(EchoCarePretrainNet("tiny", num_anatomy_nodes=ontology.num_nodes, drop_path_rate=drop_path), 11)
    return ontology, reference


def _grads(network, loss_fn, x, unit_mask, labels, known, amp=False, seed=0):
    network.train()
    network.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        outputs = network(x, unit_mask)
    loss = loss_fn(outputs, x, labels, known)["loss"]
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in network.named_parameters() if p.grad is not None}


def _rel_l2(a: dict, b: dict) -> float:
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in b)
    den = sum((b[k].float() ** 2).sum() for k in b)
    return float((num / den) ** 0.5)


@pytest.mark.parametrize("checkpoint", [None, "mlp", "mlp+conv", "block"])
def test_pretraining_gradients_match(checkpoint):
    ontology, reference = _pretrain_pair(drop_path=0.1)
    fast = use_fast_paths(copy.deepcopy(reference), checkpoint=checkpoint)
    loss_fn = PretrainLoss(ontology)
    x = torch.rand(2, 3, 128, 128)  # stage 4 at 8x8 (no shift) and shifted stages 1-3
    unit_mask = reference.draw_mask(x, torch.Generator().manual_seed(0))
    labels, known = (torch.as_tensor(v) for v in ontology.label_batch(["thorax/heart", None]))
    ref_loss, ref_grads = _grads(reference, loss_fn, x, unit_mask, labels, known)
    loss, grads = _grads(fast, loss_fn, x, unit_mask, labels, known)
    assert set(grads) == set(ref_grads)  # the relative position tables included
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert _rel_l2(grads, ref_grads) <= 1e-4
    for name in ("encoder.layers1.0.blocks.1.attn.relative_position_bias_table", "encoder.mask_token"):
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-3, atol=1e-6), name


def test_training_step_with_optimizer_tracks_reference():
    """A few AdamW steps keep the fast network's losses on the reference's."""
    ontology, reference = _pretrain_pair()
    fast = use_fast_paths(copy.deepcopy(reference))
    loss_fn = PretrainLoss(ontology)
    lr = 1e-3
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in (reference, fast)]
    x = torch.rand(2, 3, 64, 64)
    labels, known = (torch.as_tensor(v) for v in ontology.label_batch(["abdomen/liver", "thorax"]))
    for step in range(3):
        unit_mask = reference.draw_mask(x, torch.Generator().manual_seed(step))
        losses = []
        for network, opt in zip((reference, fast), opts):
            opt.zero_grad()
            loss = loss_fn(network(x, unit_mask), x, labels, known)["loss"]
            loss.backward()
            opt.step()
            losses.append(loss.item())
        # 1e-3: AdamW scales every update to about lr, so float32 rounding differences of
        # near-zero gradients grow over the steps (seen up to 4.3e-4 with one thread); a
        # wrong fast path is off by far more.
        assert abs(losses[0] - losses[1]) <= 1e-3 * abs(losses[0])
    # (Weights are not compared entry by entry: AdamW moves every weight by about lr per step
    # whatever the size of its gradient, so weights whose gradients are ~0 follow float32
    # rounding; the reference run with 1 thread instead of 2 drifts the same way.)


def test_bf16_autocast_training_runs_and_stays_within_bf16_noise():
    ontology, reference = _pretrain_pair()
    fast = use_fast_paths(copy.deepcopy(reference))
    loss_fn = PretrainLoss(ontology)
    x = torch.rand(2, 3, 128, 128)
    unit_mask = reference.draw_mask(x, torch.Generator().manual_seed(0))
    labels, known = (torch.as_tensor(v) for v in ontology.label_batch(["thorax/heart", "pelvis"]))
    _, g32 = _grads(reference, loss_fn, x, unit_mask, labels, known)
    ref_loss, g_ref = _grads(reference, loss_fn, x, unit_mask, labels, known, amp=True)
    loss, g_fast = _grads(fast, loss_fn, x, unit_mask, labels, known, amp=True)
    assert abs(loss - ref_loss) <= 0.02 * abs(ref_loss)
    # no further from the float32 gradients than bf16 noise makes the reference itself
    assert _rel_l2(g_fast, g32) <= 2 * _rel_l2(g_ref, g32) + 1e-3


def test_inference_of_a_training_network_under_no_grad():
    """eval() + no_grad on a network set up with use_fast_paths (as validation does)."""
    ontology, reference = _pretrain_pair()
    fast = use_fast_paths(copy.deepcopy(reference)).eval()
    reference.eval()
    x = torch.rand(2, 3, 64, 64)
    unit_mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        a, b = reference(x, unit_mask), fast(x, unit_mask)
    for key in ("reconstruction", "anatomy_logits"):
        assert (a[key] - b[key]).abs().max().item() <= ATOL


def test_unknown_checkpoint_mode():
    with pytest.raises(ValueError, match="checkpoint"):
        use_fast_paths(build_encoder("tiny"), checkpoint="everything")


# ---------------------------------------------------------------------------- data loading
def _jpeg_dicom(path, rgb):
    """A JPEG baseline (YBR_FULL_422) colour DICOM, as scanners write them."""
    import io

    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, UltrasoundImageStorage, generate_uid

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90, subsampling=1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_channel_first_reader_equals_read_ultrasound(tmp_path):
    import numpy as np
    from PIL import Image

    from dicom_helpers import write_dicom
    from echocare.io.readers import read_ultrasound, read_ultrasound_chw

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    clip = rng.integers(0, 4096, (5, 24, 32), dtype=np.uint16)
    write_dicom(tmp_path / "clip.dcm", clip, "MONOCHROME2", bits_stored=12, NumberOfFrames=5)
    _jpeg_dicom(tmp_path / "jpeg.dcm", rgb)
    for name, frames in [("grey.png", None), ("rgb.png", 0), ("clip.dcm", None), ("clip.dcm", [3, 1, 3]),
                         ("clip.dcm", slice(0, None, 2)), ("jpeg.dcm", None)]:
        hwc, meta = read_ultrasound(tmp_path / name, frames=frames, with_metadata=True)
        chw, meta_chw = read_ultrasound_chw(tmp_path / name, frames=frames, with_metadata=True)
        assert chw.flags.c_contiguous and chw.dtype == np.float32
        np.testing.assert_array_equal(chw, hwc.transpose(0, 3, 1, 2))
        assert meta == meta_chw


def test_jpeg_dicom_decoder_matches_pydicom_default(tmp_path):
    """Baseline JPEG DICOMs are decoded by Pillow (libjpeg-turbo); pydicom's other decoder
    (pylibjpeg) may differ only by JPEG decoder rounding (chroma upsampling)."""
    import numpy as np
    import pydicom

    from echocare.io.readers import read_ultrasound

    decoder = pydicom.pixels.get_decoder(pydicom.uid.JPEGBaseline8Bit)
    if "pylibjpeg" not in decoder.available_plugins:
        pytest.skip("pylibjpeg not installed")
    rng = np.random.default_rng(1)
    rgb = np.repeat(rng.integers(0, 256, (48, 64, 1), dtype=np.uint8), 3, axis=-1)
    rgb[8:24, 8:40, 0] = 255
    path = _jpeg_dicom(tmp_path / "jpeg.dcm", rgb)
    ours = read_ultrasound(path)[0]
    ds = pydicom.dcmread(path)
    other = next(decoder.iter_array(ds, indices=[0], decoding_plugin="pylibjpeg"))[0].astype(np.float32) / 255
    diff = np.abs(ours - other)
    assert diff.mean() < 1 / 255 and diff.max() <= 16 / 255


def test_load_transform_output_unchanged(tmp_path):
    import numpy as np
    from PIL import Image

    from echocare.io import LoadUltrasoundd
    from echocare.io.readers import read_ultrasound

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(tmp_path / "a.png")
    out = LoadUltrasoundd("image")({"image": str(tmp_path / "a.png")})["image"]
    expected = read_ultrasound(tmp_path / "a.png")[0].transpose(2, 0, 1)
    assert tuple(out.shape) == (3, 30, 20)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_micro_batches_equal_whole_batches():
    torch.manual_seed(0)
    reference = _perturb(EchoCareSegNet("tiny", out_channels=2), 12).eval()
    whole = optimize_for_inference(reference, inplace=False, micro_batch=None)
    single = optimize_for_inference(reference, inplace=False)  # micro-batches of 1 (default)
    pairs = optimize_for_inference(reference, inplace=False, micro_batch=2)
    x = torch.rand(3, 3, 64, 64)
    mask = torch.rand(3, 32, 32) < 0.5
    with torch.inference_mode():
        expected = reference(x)
        for net in (whole, single, pairs):
            assert (net(x) - expected).abs().max().item() <= ATOL
        _assert_maps_close(single.encoder(x, mask=mask), reference.encoder(x, mask=mask))
    assert single.encoder.fast_micro_batch == 1 and whole.encoder.fast_micro_batch is None
