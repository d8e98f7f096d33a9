"""Landmark localisation: the segmentation network with one heatmap channel per landmark,
sub-pixel heatmap decoding and the training loss.

:class:`EchoCareLandmarkNet` IS :class:`~echocare.networks.tasks.EchoCareSegNet` with
``out_channels = num_landmarks`` (same modules, same state-dict keys), so encoder
initialisation (``pretrained_path``), ``initialise_network``, fine-tuning modes, checkpoints
and export work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from echocare.networks.tasks import EchoCareSegNet

__all__ = ["EchoCareLandmarkNet", "LandmarkHeatmapLoss", "decode_heatmaps", "soft_argmax"]


class EchoCareLandmarkNet(EchoCareSegNet):
    """EchoCare encoder + UNETR decoder giving K heatmaps.

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        num_landmarks: K, one output channel each.
        in_channels, decoder_feature_size, drop_path_rate: as :class:`EchoCareSegNet`.
        init_scale: factor on the default initial weights of the output convolution (its
            bias starts at 0); only the initialisation, the modules are the seg net's.

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
    ) -> None:
        if int(num_landmarks) < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        super().__init__(network_size, int(num_landmarks), in_channels, decoder_feature_size, drop_path_rate)
        self.num_landmarks = int(num_landmarks)
        # Start from near-zero heatmaps: with the default init the maps start at hundreds,
        # far above the targets' peak of 1, and the first hundreds of steps only shrink them.
        out = self.decoder.out.conv.conv
        with torch.no_grad():
            out.weight.mul_(init_scale)
            out.bias.zero_()


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

    Args:
        heatmap_weight, coord_weight: weights of the two terms.
        beta: soft-argmax sharpness (on maps of peak 1).
    """

    def __init__(self, heatmap_weight: float = 1.0, coord_weight: float = 0.0, beta: float = 20.0) -> None:
        super().__init__()
        self.heatmap_weight, self.coord_weight, self.beta = float(heatmap_weight), float(coord_weight), float(beta)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        loss = self.heatmap_weight * F.mse_loss(pred, target, reduction="none").sum((-2, -1)).mean()
        if self.coord_weight:
            valid = target.amax((-2, -1)) > 0.5
            if valid.any():
                weights = target.clamp_min(0)
                total = weights.sum((-2, -1)).clamp_min(1e-6)
                h, w = target.shape[-2:]
                xs = torch.arange(w, device=target.device, dtype=target.dtype)
                ys = torch.arange(h, device=target.device, dtype=target.dtype)
                true = torch.stack([(weights.sum(-2) * xs).sum(-1) / total, (weights.sum(-1) * ys).sum(-1) / total], -1)
                err = (soft_argmax(pred, self.beta) - true).abs().sum(-1)
                loss = loss + self.coord_weight * err[valid].mean()
        return loss
