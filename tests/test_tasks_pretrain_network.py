"""Tests of the pretraining network: unit masking, the masked pixel path, the loss, coherence, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from echocare.tasks.pretrain.network import (
    EchoCarePretrainNet,
    PretrainLoss,
    expand_unit_mask,
    random_unit_mask,
)
from echocare.ontology import load_ontology


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


@pytest.fixture(scope="module")
def tiny_net(ontology) -> EchoCarePretrainNet:
    torch.manual_seed(0)
    net = EchoCarePretrainNet("tiny", num_anatomy_nodes=ontology.num_nodes, mask_unit=16, mask_ratio=0.5)
    return net.eval()


def _phantom_batch(batch: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Grey ultrasound-like images in [0, 1]: dark background, bright ellipses, speckle; repeated to RGB."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(batch):
        img = torch.full((size, size), 0.1)
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=g) - 0.5).tolist()
            ry, rx = (0.15 + 0.35 * torch.rand(2, generator=g)).tolist()
            level = 0.3 + 0.6 * torch.rand(1, generator=g).item()
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            img = torch.where(inside, torch.full_like(img, level), img)
        img = img * (0.8 + 0.4 * torch.rand(size, size, generator=g))
        images.append(img.clamp(0, 1))
    return torch.stack(images).unsqueeze(1).repeat(1, 3, 1, 1)


# ----------------------------------------------------------------------------- random_unit_mask
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (3, 5)])
def test_random_unit_mask_counts(ratio, grid):
    mask = random_unit_mask(6, grid, ratio, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (6, *grid) and mask.dtype == torch.bool
    expected = round(ratio * grid[0] * grid[1])
    assert mask.flatten(1).sum(dim=1).tolist() == [expected] * 6


def test_random_unit_mask_reproducible_and_varied():
    a = random_unit_mask(8, (8, 8), 0.5, generator=torch.Generator().manual_seed(7))
    b = random_unit_mask(8, (8, 8), 0.5, generator=torch.Generator().manual_seed(7))
    c = random_unit_mask(8, (8, 8), 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Different across the images of one batch.
    flat = a.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 8
    # Over many draws every unit gets masked about half the time (no positional bias).
    many = random_unit_mask(2000, (4, 4), 0.5, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert torch.all((many - 0.5).abs() < 0.05)


def test_random_unit_mask_bad_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_unit_mask(1, (4, 4), 1.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_unit_mask(1, (4, 4), -0.1)


def test_expand_unit_mask():
    unit = torch.tensor([[[True, False], [False, True]]])
    out = expand_unit_mask(unit, 3)
    assert out.shape == (1, 6, 6)
    assert out[0, :3, :3].all() and out[0, 3:, 3:].all()
    assert not out[0, :3, 3:].any() and not out[0, 3:, :3].any()


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_network_pixel_mask_fraction(ratio, ontology):
    torch.manual_seed(3)
    net = EchoCarePretrainNet("tiny", num_anatomy_nodes=ontology.num_nodes, mask_unit=16, mask_ratio=ratio).eval()
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = net(image)
    assert out["reconstruction"].shape == (2, 3, 64, 64)
    assert out["anatomy_logits"].shape == (2, ontology.num_nodes)
    pm = out["pixel_mask"]
    assert pm.shape == (2, 1, 64, 64) and pm.dtype == image.dtype
    assert set(pm.unique().tolist()) <= {0.0, 1.0}
    expected = round(ratio * 16) / 16
    assert pm.mean(dim=(1, 2, 3)).tolist() == [expected, expected]
    # Masked pixels come in whole 16x16 units aligned to the grid.
    units = pm[:, 0].reshape(2, 4, 16, 4, 16)
    assert torch.equal(units.amax(dim=(2, 4)), units.amin(dim=(2, 4)))


def test_draw_mask_and_mask_unit_errors(ontology):
    net = EchoCarePretrainNet("tiny", num_anatomy_nodes=4, mask_unit=24)
    with pytest.raises(ValueError, match=r"64x64 are not divisible by mask_unit=24"):
        net(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="mask_unit"):
        EchoCarePretrainNet("tiny", num_anatomy_nodes=4, mask_unit=7)
    with pytest.raises(ValueError, match="mask_unit"):
        EchoCarePretrainNet("tiny", num_anatomy_nodes=4, mask_unit=0)
    net16 = EchoCarePretrainNet("tiny", num_anatomy_nodes=4, mask_unit=16, mask_ratio=0.25)
    m = net16.draw_mask(torch.rand(3, 3, 64, 96), generator=torch.Generator().manual_seed(0))
    assert m.shape == (3, 4, 6) and m.flatten(1).sum(1).tolist() == [6, 6, 6]


# ----------------------------------------------------------------------------- masked pixels stay hidden
def test_decoder_never_sees_masked_pixels(tiny_net):
    unit_mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    unit_mask[0, [0, 1, 2, 3], [0, 1, 2, 3]] = True
    unit_mask[0, 0, 3] = True
    unit_mask[1, 1:3, :] = True
    pixel_mask = expand_unit_mask(unit_mask, 16).unsqueeze(1).expand(2, 3, 64, 64)
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 64, 64, generator=g)
    noise = torch.rand(2, 3, 64, 64, generator=g) * 10 - 5
    tampered = torch.where(pixel_mask, noise, image)
    assert not torch.equal(tampered, image)
    with torch.no_grad():
        ref = tiny_net(image, unit_mask)
        out = tiny_net(tampered, unit_mask)
        feats_ref = tiny_net.encoder(image, mask=expand_unit_mask(unit_mask, 8))
        feats_out = tiny_net.encoder(tampered, mask=expand_unit_mask(unit_mask, 8))
    assert torch.equal(ref["reconstruction"], out["reconstruction"])
    assert torch.equal(ref["anatomy_logits"], out["anatomy_logits"])
    assert torch.equal(ref["pixel_mask"], out["pixel_mask"])
    for a, b in zip(feats_ref, feats_out):
        assert torch.equal(a, b)

    # A change to a single visible pixel does reach the outputs.
    assert not unit_mask[0, 0, 1]  # pixel (5, 20) lies in visible unit (0, 1)
    visible = image.clone()
    visible[0, :, 5, 20] += 0.5
    with torch.no_grad():
        changed = tiny_net(visible, unit_mask)
    assert not torch.equal(changed["reconstruction"][0], ref["reconstruction"][0])
    assert not torch.equal(changed["anatomy_logits"][0], ref["anatomy_logits"][0])
    # ...and the other image of the batch is untouched (eval mode: no batch coupling).
    assert torch.equal(changed["reconstruction"][1], ref["reconstruction"][1])


# ----------------------------------------------------------------------------- PretrainLoss
def _outputs(reconstruction, unit_mask, logits):
    pm = expand_unit_mask(unit_mask, 16).unsqueeze(1).float()
    return {"reconstruction": reconstruction, "pixel_mask": pm, "anatomy_logits": logits}


def test_pixel_loss_constant_example(ontology):
    unit_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    unit_mask[0, 0, :] = True  # a quarter of the image
    pm = expand_unit_mask(unit_mask, 16).unsqueeze(1).float()
    image = torch.zeros(1, 3, 64, 64)
    # 0.25 off on every masked pixel, wildly off on visible ones (which must not count).
    reconstruction = 0.25 * pm.expand(1, 3, 64, 64) + 10.0 * (1 - pm.expand(1, 3, 64, 64))
    labels, known = ontology.label_batch([None])
    loss = PretrainLoss(ontology, anatomy_weight=1.0)(
        _outputs(reconstruction, unit_mask, torch.zeros(1, ontology.num_nodes)),
        image,
        torch.from_numpy(labels),
        torch.from_numpy(known),
    )
    assert loss["loss_pixel"].item() == 0.25
    assert loss["loss_anatomy"].item() == 0.0  # unlabelled image
    assert loss["loss"].item() == 0.25


def test_pixel_loss_matches_hand_computed_masked_mae(ontology):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g)
    reconstruction = torch.rand(1, 3, 64, 64, generator=g) * 2 - 0.5
    unit_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    unit_mask[0, 1, 2] = unit_mask[0, 3, 0] = unit_mask[0, 2, 2] = True
    # Hand computation, element by element in float64.
    img, rec, um = image.double().numpy()[0], reconstruction.double().numpy()[0], unit_mask.numpy()[0]
    total, count = 0.0, 0
    for r in range(4):
        for c in range(4):
            if um[r, c]:
                rows, cols = slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16)
                block = np.abs(rec[:, rows, cols] - img[:, rows, cols])
                total += block.sum()
                count += block.size
    assert count == 3 * 3 * 256
    expected = total / count
    labels, known = ontology.label_batch([None])
    out = PretrainLoss(ontology, anatomy_weight=0.0)(
        _outputs(reconstruction, unit_mask, torch.randn(1, ontology.num_nodes)),
        image,
        torch.from_numpy(labels),
        torch.from_numpy(known),
    )
    assert out["loss_pixel"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss"].item() == out["loss_pixel"].item()
    per_image = PretrainLoss.masked_l1(reconstruction, image, _outputs(reconstruction, unit_mask, None)["pixel_mask"])
    assert per_image.shape == (1,) and per_image.item() == pytest.approx(expected, rel=1e-6)


def test_pixel_loss_pools_over_the_batch(ontology):
    # Image 0: 1 masked unit with error 1; image 1: 3 masked units with error 0.5.
    unit_mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    unit_mask[0, 0, 0] = True
    unit_mask[1, 1, :3] = True
    image = torch.zeros(2, 3, 64, 64)
    reconstruction = torch.cat([torch.ones(1, 3, 64, 64), torch.full((1, 3, 64, 64), 0.5)])
    labels, known = ontology.label_batch([None, None])
    out = PretrainLoss(ontology)(
        _outputs(reconstruction, unit_mask, torch.zeros(2, ontology.num_nodes)),
        image,
        torch.from_numpy(labels),
        torch.from_numpy(known),
    )
    assert out["loss_pixel"].item() == pytest.approx((1 * 1.0 + 3 * 0.5) / 4)
    pm = _outputs(reconstruction, unit_mask, None)["pixel_mask"]
    assert PretrainLoss.masked_l1(reconstruction, image, pm).tolist() == [1.0, 0.5]


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0, 2.5])
def test_total_is_pixel_plus_weighted_anatomy(weight, ontology):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 3, 64, 64, generator=g)
    reconstruction = torch.rand(3, 3, 64, 64, generator=g)
    unit_mask = random_unit_mask(3, (4, 4), 0.5, generator=g)
    paths = ["abdomen/liver", "head & neck/thyroid/left lobe", None]
    labels, known = (torch.from_numpy(a) for a in ontology.label_batch(paths))
    logits = torch.randn(3, ontology.num_nodes, generator=g) * 2
    outputs = _outputs(reconstruction, unit_mask, logits)
    out = PretrainLoss(ontology, anatomy_weight=weight)(outputs, image, labels, known)
    pixel = PretrainLoss(ontology, anatomy_weight=0.0)(outputs, image, labels, known)
    assert out["loss_pixel"].item() == pixel["loss"].item() == pixel["loss_pixel"].item()
    if weight == 0:
        assert out["loss"].item() == out["loss_pixel"].item()
        assert out["loss_anatomy"].item() == 0.0
    else:
        anatomy = ontology.hierarchy_loss(torch.sigmoid(logits), labels, known, balanced=True)  # PretrainLoss default
        assert out["loss_anatomy"].item() == pytest.approx(anatomy.item(), rel=1e-6)
        assert out["loss_anatomy"].item() > 0
        assert out["loss"].item() == pytest.approx(out["loss_pixel"].item() + weight * anatomy.item(), rel=1e-6)


def test_anatomy_loss_of_uninformed_logits_is_ln2(ontology):
    # Logits 0 give every node probability 0.5 whatever the coherence, so BCE = ln 2 per known node.
    image = torch.zeros(2, 3, 64, 64)
    unit_mask = torch.ones(2, 4, 4, dtype=torch.bool)
    labels, known = (torch.from_numpy(a) for a in ontology.label_batch(["thorax/breast", None]))
    assert known[0].any() and not known[1].any()
    out = PretrainLoss(ontology, anatomy_weight=2.0)(
        _outputs(torch.zeros(2, 3, 64, 64), unit_mask, torch.zeros(2, ontology.num_nodes)), image, labels, known
    )
    assert out["loss_pixel"].item() == 0.0
    assert out["loss_anatomy"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert out["loss"].item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_unlabelled_batch_gives_zero_anatomy_loss_with_graph(ontology):
    logits = torch.randn(2, ontology.num_nodes, requires_grad=True)
    labels, known = (torch.from_numpy(a) for a in ontology.label_batch([None, None]))
    assert not known.any()
    unit_mask = torch.ones(2, 4, 4, dtype=torch.bool)
    reconstruction = torch.full((2, 3, 64, 64), 0.5, requires_grad=True)
    out = PretrainLoss(ontology)(_outputs(reconstruction, unit_mask, logits), torch.zeros(2, 3, 64, 64), labels, known)
    assert out["loss_anatomy"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.5)
    out["loss"].backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)
    assert reconstruction.grad is not None and reconstruction.grad.abs().sum() > 0


def test_gradients_reach_encoder_decoder_and_head(ontology):
    torch.manual_seed(5)
    net = EchoCarePretrainNet("tiny", num_anatomy_nodes=ontology.num_nodes, mask_unit=16).train()
    image = _phantom_batch(2)
    unit_mask = random_unit_mask(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    labels, known = (torch.from_numpy(a) for a in ontology.label_batch(["abdomen/kidney", "fetus/fetal head"]))
    out = PretrainLoss(ontology)(net(image, unit_mask), image, labels, known)
    out["loss"].backward()
    groups = {"encoder.": 0, "pixel_decoder.": 0, "anatomy_head.": 0, "anatomy_norm.": 0}
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        for prefix in groups:
            if name.startswith(prefix) and p.grad.abs().sum() > 0:
                groups[prefix] += 1
    assert all(n > 0 for n in groups.values()), groups
    for name in (
        "encoder.patch_embed.proj.weight",
        "encoder.mask_token",
        "encoder.layers4.0.blocks.1.attn.qkv.weight",
        "pixel_decoder.skip_image.layer.conv1.conv.weight",
        "pixel_decoder.out.conv.conv.weight",
        "anatomy_head.weight",
        "anatomy_head.bias",
    ):
        grad = dict(net.named_parameters())[name].grad
        assert grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- inference coherence
def test_coherent_scores_never_let_a_child_outscore_its_parent(ontology):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, ontology.num_nodes, generator=g) * 4
    raw = torch.sigmoid(logits)
    coherent = ontology.coherent_scores(raw)
    assert coherent.shape == raw.shape
    edges = 0
    for child, parent in enumerate(ontology.parent):
        if parent < 0:
            continue
        edges += 1
        assert torch.all(coherent[:, child] <= coherent[:, parent]), ontology.nodes[child]
    assert edges == ontology.num_nodes - len(ontology.regions()) == 109
    # Each coherent score is the minimum over the node's root path, never above the raw one.
    for i in range(ontology.num_nodes):
        path = ontology.ancestors(i) + [i]
        assert torch.equal(coherent[:, i], raw[:, path].amin(dim=1))
    assert torch.all(coherent <= raw)
    # Raw network output is generally not coherent: the function does real work.
    assert any(bool((raw[:, c] > raw[:, p]).any()) for c, p in enumerate(ontology.parent) if p >= 0)


def test_network_logits_made_coherent(tiny_net, ontology):
    with torch.no_grad():
        out = tiny_net(_phantom_batch(2, seed=3), torch.zeros(2, 4, 4, dtype=torch.bool))
    coherent = ontology.coherent_scores(torch.sigmoid(out["anatomy_logits"]))
    for child, parent in enumerate(ontology.parent):
        if parent >= 0:
            assert torch.all(coherent[:, child] <= coherent[:, parent])
    assert out["pixel_mask"].sum() == 0


# ----------------------------------------------------------------------------- learning
@pytest.mark.slow  # a learning test
def test_a_few_adamw_steps_reduce_the_loss(ontology):
    torch.manual_seed(0)
    net = EchoCarePretrainNet("tiny", num_anatomy_nodes=ontology.num_nodes, mask_unit=16, mask_ratio=0.5).train()
    criterion = PretrainLoss(ontology, anatomy_weight=1.0)
    image = _phantom_batch(4, seed=1)
    unit_mask = random_unit_mask(4, (4, 4), 0.5, generator=torch.Generator().manual_seed(2))
    paths = ["abdomen/liver", "thorax/breast", "head & neck/thyroid/left lobe", None]
    labels, known = (torch.from_numpy(a) for a in ontology.label_batch(paths))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    losses, first = [], None
    for _ in range(20):
        optimizer.zero_grad()
        loss = criterion(net(image, unit_mask), image, labels, known)
        loss["loss"].backward()
        optimizer.step()
        losses.append(loss["loss"].item())
        first = first or {k: v.item() for k, v in loss.items()}
    with torch.no_grad():
        final = criterion(net(image, unit_mask), image, labels, known)
    assert all(math.isfinite(x) for x in losses)
    assert final["loss"].item() < 0.8 * losses[0], losses
    # Both branches learn, not just the anatomy head.
    assert final["loss_pixel"].item() < 0.8 * first["loss_pixel"]
    assert final["loss_anatomy"].item() < 0.8 * first["loss_anatomy"]
