"""Landmark localisation: the segmentation network with one heatmap channel per landmark,
sub-pixel heatmap decoding and the training loss.

:class:`EchoCareLandmarkNet` IS :class:`~echocare.tasks.supervised.networks.EchoCareSegNet` with
``out_channels = num_landmarks`` (same modules, same state-dict keys), so encoder
initialisation (``pretrained_path``), ``initialise_network``, fine-tuning modes, checkpoints
and export work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock
from torch import nn

from echocare.tasks.supervised.networks import EchoCareSegNet

__all__ = [
    "EchoCareLandmarkNet",
    "LandmarkHeatmapLoss",
    "coordinate_channels",
    "decode_heatmaps",
    "order_symmetric_pairs",
    "soft_argmax",
]


def _check_pairs(pairs: Sequence[Sequence[Any]] | None, num_landmarks: int | None = None) -> list[tuple[int, int, int]]:
    """``[[a, b, axis], ...]`` -> ``[(a, b, 0 for x | 1 for y), ...]``, checked: distinct indices
    below ``num_landmarks``, each landmark in one pair at most, axis ``x`` or ``y``."""
    checked: list[tuple[int, int, int]] = []
    seen: set[int] = set()
    for pair in pairs or []:
        if len(pair) != 3 or str(pair[2]).lower() not in ("x", "y"):
            raise ValueError(f"symmetric pair must be [index, index, 'x' or 'y'], got {pair}")
        a, b, axis = int(pair[0]), int(pair[1]), "xy".index(str(pair[2]).lower())
        out_of_range = min(a, b) < 0 or (num_landmarks is not None and max(a, b) >= num_landmarks)
        if a == b or {a, b} & seen or out_of_range:
            raise ValueError(
                f"symmetric pairs must join distinct landmarks once each (of {num_landmarks}), got {pairs}"
            )
        seen |= {a, b}
        checked.append((a, b, axis))
    return checked


def order_symmetric_pairs(heatmaps: torch.Tensor, pairs: Sequence[Sequence[Any]]) -> torch.Tensor:
    """Swap the two maps of each symmetric pair where needed so that, in every image, the
    first map's peak (integer argmax) has the larger x (axis ``x``) or y (axis ``y``).

    Args:
        heatmaps: (B, K, h, w).
        pairs: ``[[a, b, "x" | "y"], ...]``, landmark indices.

    Returns:
        (B, K, h, w), a new tensor (the input is not changed).
    """
    k, w = heatmaps.shape[1], heatmaps.shape[-1]
    # Shape-free tensor ops (no boolean indexing, no batch size in a reshape) so that the
    # network traces and exports to ONNX with a dynamic batch.
    flat = heatmaps.detach().flatten(2).argmax(-1)
    peaks = torch.stack([flat % w, torch.div(flat, w, rounding_mode="floor")], -1)  # (B, K, 2) x, y
    maps = list(heatmaps.unbind(1))
    for first, second, axis in _check_pairs(pairs, k):
        swap = (peaks[:, second, axis] > peaks[:, first, axis])[:, None, None]
        maps[first], maps[second] = (
            torch.where(swap, heatmaps[:, second], heatmaps[:, first]),
            torch.where(swap, heatmaps[:, first], heatmaps[:, second]),
        )
    return torch.stack(maps, 1)


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """CoordConv channels for a batch ``x`` (B, C, H, W): (B, 2, H, W), x then y of each pixel
    centre scaled to [-1, 1] across the image (-1 at the left/top pixel, 1 at the right/bottom
    one; 0 when that side is a single pixel), in ``x``'s dtype and device."""
    b, _, h, w = x.shape
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype) if w > 1 else x.new_zeros(1)
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype) if h > 1 else x.new_zeros(1)
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])[None].expand(b, 2, h, w)


class EchoCareLandmarkNet(EchoCareSegNet):
    """EchoCare encoder + UNETR decoder giving K heatmaps.

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        num_landmarks: K, one output channel each.
        in_channels, decoder_feature_size, drop_path_rate: as :class:`EchoCareSegNet`.
        init_scale: factor on the default initial weights of the output convolution (its
            bias starts at 0); only the initialisation, the modules are the seg net's.
        coord_channels: give the decoder's full-resolution image skip two more input
            channels, the pixel's x and y in [-1, 1] (CoordConv, :func:`coordinate_channels`),
            so the heatmaps can depend on absolute position: the Swin encoder has no absolute
            position embedding and the decoder only convolutions, which hardly tell two
            look-alike points apart by where they are (e.g. the left and right ends of a head
            axis). Changes the shape of ``decoder.skip_image``'s first convolutions, nothing
            else (same state-dict keys; the encoder is unchanged, so ``pretrained_path`` works).

    Forward:
        ``x`` (B, in_channels, H, W), H and W divisible by 32 -> heatmaps (B, K, H, W)
        (trained towards Gaussians of peak 1; decode with :func:`decode_heatmaps`).
    """

    def __init__(
        self,
        network_size: str = "base",
        num_landmarks: int = 24,
        in_channels: int = 3,
        decoder_feature_size: int | None = None,
        drop_path_rate: float = 0.0,
        init_scale: float = 0.01,
        coord_channels: bool = False,
        symmetric_pairs: Sequence[Sequence[Any]] | None = None,
    ) -> None:
        if int(num_landmarks) < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        super().__init__(network_size, int(num_landmarks), in_channels, decoder_feature_size, drop_path_rate)
        self.num_landmarks = int(num_landmarks)
        self.coord_channels = bool(coord_channels)
        _check_pairs(symmetric_pairs, self.num_landmarks)
        self.symmetric_pairs = [list(p) for p in symmetric_pairs or []]
        if self.coord_channels:
            # The decoder's own image skip (a residual basic block, instance norm), on 2 more channels.
            fs = self.decoder.out.conv.conv.in_channels
            self.decoder.skip_image = UnetrBasicBlock(
                2, in_channels + 2, fs, kernel_size=3, stride=1, norm_name="instance", res_block=True
            )
        # Start from near-zero heatmaps: with the default init the maps start at hundreds,
        # far above the targets' peak of 1, and the first hundreds of steps only shrink them.
        out = self.decoder.out.conv.conv
        with torch.no_grad():
            out.weight.mul_(init_scale)
            out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        image = torch.cat([x, coordinate_channels(x)], dim=1) if self.coord_channels else x
        heatmaps = self.decoder(image, features)
        if self.symmetric_pairs and not self.training:
            heatmaps = order_symmetric_pairs(heatmaps, self.symmetric_pairs)
        return heatmaps


def decode_heatmaps(heatmaps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sub-pixel peak of each heatmap: (B, K, h, w) -> (B, K, 2) points (x, y) in grid pixels.

    The integer argmax is refined per axis by the vertex of the parabola through the log of
    the peak and its two neighbours (on the border: the peak and its two inner neighbours);
    exact for a Gaussian peak, whose log is a parabola. Values are clamped to ``eps`` before
    the log and the refined point stays within 0.5 px of the integer peak.
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"expected (B, K, h, w) heatmaps, got shape {tuple(heatmaps.shape)}")
    b, k, h, w = heatmaps.shape
    hm = heatmaps.detach().float()
    flat = hm.reshape(b, k, -1).argmax(-1)
    py, px = torch.div(flat, w, rounding_mode="floor"), flat % w
    logs = torch.log(hm.clamp_min(eps))

    def value(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        idx = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).unsqueeze(-1)
        return logs.reshape(b, k, -1).gather(-1, idx).squeeze(-1)

    def refine(peak: torch.Tensor, n: int, along_x: bool) -> torch.Tensor:
        # Parabola through three samples centred on the peak, or on its inner neighbour at
        # the border (for a Gaussian it is exact either way); the vertex stays within half a
        # pixel of the integer peak.
        if n < 3:
            return peak.float()
        c = peak.clamp(1, n - 2)
        at = (lambda i: value(py, i)) if along_x else (lambda i: value(i, px))
        lo, mid, hi = at(c - 1), at(c), at(c + 1)
        curvature = lo - 2 * mid + hi
        vertex = c.float() + torch.where(
            curvature < 0, 0.5 * (lo - hi) / curvature.clamp(max=-1e-12), torch.zeros_like(mid)
        )
        return torch.minimum(torch.maximum(vertex, peak.float() - 0.5), peak.float() + 0.5)

    return torch.stack([refine(px, w, True), refine(py, h, False)], dim=-1)


def soft_argmax(heatmaps: torch.Tensor, beta: float = 20.0) -> torch.Tensor:
    """Differentiable peak: the expected (x, y) under ``softmax(beta * heatmap)`` over the
    pixels of each map, (B, K, h, w) -> (B, K, 2) in grid pixels."""
    b, k, h, w = heatmaps.shape
    prob = torch.softmax(beta * heatmaps.reshape(b, k, -1).float(), dim=-1).reshape(b, k, h, w)
    xs = torch.arange(w, device=heatmaps.device, dtype=prob.dtype)
    ys = torch.arange(h, device=heatmaps.device, dtype=prob.dtype)
    return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], dim=-1)


class LandmarkHeatmapLoss(nn.Module):
    """``heatmap_weight * MSE(pred, target) + coord_weight * L1(soft-argmax(pred), target peak)``.

    The MSE is summed over pixels and averaged over maps, so its size does not shrink with
    the grid (a Gaussian of sigma s has about 3 s² "foreground" pixels). The coordinate term
    compares the soft-argmax of each predicted map with the centroid of its target
    Gaussian (its centre unless cut by the border), in grid pixels, averaged over maps whose
    target peak is inside the grid (``target.amax > 0.5``; a point moved out of view by an
    augmentation has no target).

    With ``symmetric_pairs`` (``[[a, b, axis], ...]``, as :class:`EchoCareLandmarkNet`) the
    loss is order-free within each pair: per image, the targets of ``a`` and ``b`` are
    swapped when that gives the lower loss of the two maps, so the network may put either
    end in either map; the network orders them at evaluation.

    Args:
        heatmap_weight, coord_weight: weights of the two terms.
        beta: soft-argmax sharpness (on maps of peak 1).
        symmetric_pairs: landmark pairs matched per image before the loss (default none).
    """

    def __init__(
        self,
        heatmap_weight: float = 1.0,
        coord_weight: float = 0.0,
        beta: float = 20.0,
        symmetric_pairs: Sequence[Sequence[Any]] | None = None,
    ) -> None:
        super().__init__()
        self.heatmap_weight, self.coord_weight, self.beta = float(heatmap_weight), float(coord_weight), float(beta)
        self.pairs = [(a, b) for a, b, _ in _check_pairs(symmetric_pairs)]

    def per_map(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, K) loss of each map: weighted squared error summed over pixels plus the
        weighted soft-argmax L1 (0 for maps whose target peak is out of the grid)."""
        loss = self.heatmap_weight * F.mse_loss(pred, target, reduction="none").sum((-2, -1))
        if self.coord_weight:
            valid = target.amax((-2, -1)) > 0.5
            weights = target.clamp_min(0)
            total = weights.sum((-2, -1)).clamp_min(1e-6)
            h, w = target.shape[-2:]
            xs = torch.arange(w, device=target.device, dtype=target.dtype)
            ys = torch.arange(h, device=target.device, dtype=target.dtype)
            true = torch.stack([(weights.sum(-2) * xs).sum(-1) / total, (weights.sum(-1) * ys).sum(-1) / total], -1)
            err = (soft_argmax(pred, self.beta) - true).abs().sum(-1)
            # mean over the valid maps of the batch, spread over (B, K) so that .mean() gives it
            loss = loss + self.coord_weight * torch.where(valid, err, 0.0) * valid.numel() / valid.sum().clamp_min(1)
        return loss

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        if self.pairs:
            swapped = target.clone()
            for a, b in self.pairs:
                swapped[:, [a, b]] = target[:, [b, a]]
            straight, crossed = self.per_map(pred, target), self.per_map(pred, swapped)
            losses = straight.clone()
            for a, b in self.pairs:
                cross = (crossed[:, a] + crossed[:, b]) < (straight[:, a] + straight[:, b])
                losses[:, a] = torch.where(cross, crossed[:, a], straight[:, a])
                losses[:, b] = torch.where(cross, crossed[:, b], straight[:, b])
            return losses.mean()
        return self.per_map(pred, target).mean()
