"""Oriented-ellipse detection on the EchoCare encoder (bundle ``focus_det``).

An anchor-free, CenterNet-style head (Zhou et al., "Objects as Points", 2019) on the deeper
encoder maps: the maps of strides ``output_stride`` .. 32 are projected to ``head_channels``,
upsampled to stride ``output_stride`` and summed, and two small convolutional branches give,
per output cell,

- a centre heatmap per class (logits; the target is a Gaussian peak of 1 at the cell holding
  the ellipse's centre, trained with CenterNet's penalty-reduced focal loss);
- five ellipse channels per class, read at the centre cell (per class, because the heart's
  centre often falls in the thorax's cell): the sub-cell offset of the centre
  (x, y, in cells), the log size ``s = log(sqrt(a b) / stride)``, and the elongation vector
  ``e (cos 2 theta, sin 2 theta)`` with ``e = log(a / b) >= 0``. The doubled angle makes the
  code symmetric under 180 degrees (as an ellipse is), and scaling it by the elongation makes
  it continuous where the angle is undefined (a circle is the zero vector).

Coordinates: network pixels of the (resized) input, pixel centres at integers, x right,
y down, angles in degrees from +x towards +y. Cell ``j`` holds the centres
``x + 0.5`` in ``[j stride, (j + 1) stride)``. Going to and from the original image's pixels
is the data side's job (:mod:`echocare.tasks.detection.data`).

The network holds the encoder as ``.encoder`` (same sizes and weights as the segmentation and
classification networks), so ``pretrained_path``, checkpoints and fine-tuning modes work
through :func:`~echocare.networks.checkpoint.initialise_network` and
:func:`~echocare.networks.finetune.configure_finetuning`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echocare.tasks.detection.metrics import ellipse_iou
from echocare.networks.encoder import build_encoder

__all__ = ["ELLIPSE_CHANNELS", "EchoCareEllipseDetector", "EllipseDetectionLoss", "decode_ellipses", "encode_ellipses"]

#: Ellipse channels per class after the class heatmaps: offset x, offset y, log size, elongation vector (2).
ELLIPSE_CHANNELS = 5
_STRIDE_LEVEL = {4: 1, 8: 2, 16: 3, 32: 4}  # output stride -> index of the encoder map
_MAX_LOG = 8.0  # exp(8) cells: far beyond any image, keeps exp() finite for untrained heads


def _conv_block(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(8, channels), nn.ReLU(inplace=True)
    )


class EchoCareEllipseDetector(nn.Module):
    """The EchoCare encoder plus an anchor-free oriented-ellipse head (see the module notes).

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        num_classes: object classes C (no background class).
        in_channels: image channels (3: grey images are repeated).
        head_channels: width of the fused maps and of the branches (a multiple of 8).
        output_stride: stride of the output grid: 8, 16 or 32 (fuses the encoder maps of
            that stride and deeper).
        drop_path_rate: stochastic depth rate of the encoder.

    Forward:
        ``x`` (B, in_channels, H, W), H and W divisible by 32 -> (B, 6 C, H / s, W / s):
        C heatmap logits, then five ellipse channels per class (class ``k`` at
        ``C + 5 k .. C + 5 k + 4``; ``s`` = ``output_stride``).
    """

    #: Run in float32 under ``precision: bf16`` (:mod:`echocare.networks.precision`):
    #: the 1x1 convolutions that produce the outputs.
    float32_modules = ("heatmap.1", "ellipse.1")

    def __init__(
        self,
        network_size: str = "base",
        num_classes: int = 2,
        in_channels: int = 3,
        head_channels: int = 64,
        output_stride: int = 8,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if output_stride not in _STRIDE_LEVEL or output_stride < 8:
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.encoder = build_encoder(network_size, in_channels=in_channels, drop_path_rate=drop_path_rate)
        self.num_classes = int(num_classes)
        self.stride = int(output_stride)
        self.levels = list(range(_STRIDE_LEVEL[self.stride], 5))
        channels = self.encoder.feature_channels
        self.lateral = nn.ModuleList(nn.Conv2d(channels[level], head_channels, 1) for level in self.levels)
        self.fuse = nn.Sequential(_conv_block(head_channels), _conv_block(head_channels))
        self.heatmap = nn.Sequential(_conv_block(head_channels), nn.Conv2d(head_channels, self.num_classes, 1))
        self.ellipse = nn.Sequential(_conv_block(head_channels), nn.Conv2d(head_channels, ELLIPSE_CHANNELS * self.num_classes, 1))
        # CenterNet's prior: every cell starts at probability 0.1 of holding a centre.
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.encoder(x)
        size = maps[self.levels[0]].shape[-2:]
        fused = 0
        for conv, level in zip(self.lateral, self.levels):
            projected = conv(maps[level])
            if projected.shape[-2:] != size:
                projected = F.interpolate(projected, size=size, mode="bilinear", align_corners=False)
            fused = fused + projected
        features = self.fuse(fused)
        return torch.cat([self.heatmap(features), self.ellipse(features)], dim=1)


# ----------------------------------------------------------------------------- targets and loss


def encode_ellipses(ellipses: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ellipses (K, 5) in network pixels -> (centre cell (K, 2) long as (col, row), continuous
    centre in cells (K, 2), ellipse code (K, 5) = offset x, offset y, log size, elongation vector)."""
    cx, cy, a, b, angle = ellipses.unbind(-1)
    a, b = a.clamp_min(1e-3), b.clamp_min(1e-3)
    centre = torch.stack([(cx + 0.5) / stride, (cy + 0.5) / stride], dim=-1)
    cell = centre.floor().long()
    offset = centre - cell
    log_size = torch.log(torch.sqrt(a * b) / stride)
    elongation = torch.log(a / b)  # signed: b > a gives a negative value, the same ellipse turned 90 degrees
    doubled = torch.deg2rad(2.0 * angle)
    code = torch.stack(
        [offset[:, 0], offset[:, 1], log_size, elongation * torch.cos(doubled), elongation * torch.sin(doubled)], -1
    )
    return cell, centre, code


class EllipseDetectionLoss(nn.Module):
    """Heatmap focal loss + L1 on the ellipse code at the centre cells.

    Args:
        num_classes: object classes C.
        stride: output stride of the network.
        sigma_scale: Gaussian sigma of a heatmap peak, in cells, per cell of ``sqrt(a b)``
            (at least ``min_sigma`` cells).
        min_sigma: smallest sigma in cells.
        ellipse_weight: weight of the L1 term.

    Forward:
        ``pred`` (B, 6 C, h, w) network output; ``target`` (B, M, 6) rows
        ``[cx, cy, a, b, angle, class]`` in network pixels, class < 0 for padding rows ->
        scalar loss.
    """

    def __init__(
        self,
        num_classes: int,
        stride: int = 8,
        sigma_scale: float = 0.15,
        min_sigma: float = 0.5,
        ellipse_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.stride = int(stride)
        self.sigma_scale = float(sigma_scale)
        self.min_sigma = float(min_sigma)
        self.ellipse_weight = float(ellipse_weight)

    def heatmap_target(self, target: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, M, 6) targets -> (B, C, h, w) Gaussian peaks (exactly 1 at each centre cell)."""
        batch = target.shape[0]
        heat = torch.zeros(batch, self.num_classes, height, width, device=target.device)
        rows = torch.arange(height, device=target.device, dtype=torch.float32)[:, None]
        cols = torch.arange(width, device=target.device, dtype=torch.float32)[None, :]
        for b in range(batch):
            valid = target[b, :, 5] >= 0
            if not valid.any():
                continue
            objects = target[b, valid]
            cell, _, _ = encode_ellipses(objects[:, :5], self.stride)
            sigma = (self.sigma_scale * torch.sqrt(objects[:, 2] * objects[:, 3]) / self.stride).clamp_min(self.min_sigma)
            for (j, i), s, k in zip(cell.tolist(), sigma.tolist(), objects[:, 5].long().tolist()):
                j, i = min(max(j, 0), width - 1), min(max(i, 0), height - 1)
                peak = torch.exp(-((rows - i) ** 2 + (cols - j) ** 2) / (2 * s * s))
                heat[b, k] = torch.maximum(heat[b, k], peak)
        return heat

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = pred.float()
        target = torch.as_tensor(target, device=pred.device).float()
        c = self.num_classes
        height, width = pred.shape[-2:]
        heat = self.heatmap_target(target, height, width)
        logits = pred[:, :c]
        prob = torch.sigmoid(logits)
        positive = heat >= 1.0 - 1e-6
        # log(p) and log(1 - p) from the logits: stable where p saturates.
        pos_loss = -F.logsigmoid(logits) * (1 - prob) ** 2
        neg_loss = -F.logsigmoid(-logits) * prob**2 * (1 - heat) ** 4
        num_pos = positive.sum().clamp_min(1)
        focal = (pos_loss[positive].sum() + neg_loss[~positive].sum()) / num_pos

        valid = target[..., 5] >= 0
        if not valid.any():
            return focal
        batch_index = torch.nonzero(valid)[:, 0]
        objects = target[valid]
        cell, _, code = encode_ellipses(objects[:, :5], self.stride)
        cols = cell[:, 0].clamp(0, width - 1)
        rows = cell[:, 1].clamp(0, height - 1)
        channels = c + ELLIPSE_CHANNELS * objects[:, 5].long()[:, None] + torch.arange(ELLIPSE_CHANNELS, device=pred.device)
        predicted = pred[batch_index[:, None], channels, rows[:, None], cols[:, None]]  # (K, 5)
        l1 = F.l1_loss(predicted, code, reduction="mean")
        return focal + self.ellipse_weight * l1


# ----------------------------------------------------------------------------- decoding


def decode_ellipses(
    pred: torch.Tensor,
    num_classes: int,
    stride: int,
    max_detections: int = 10,
    score_threshold: float = 0.0,
    nms_iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's network output -> ellipses in network pixels.

    Per class: local maxima of the sigmoid heatmap (3x3), the ``max_detections`` highest
    with score >= ``score_threshold``, then non-maximum suppression by rotated IoU
    (a lower-scoring ellipse overlapping a kept one of its class by more than ``nms_iou`` is
    dropped).

    Args:
        pred: (6 C, h, w) output of :class:`EchoCareEllipseDetector` for one image.
        num_classes: C.
        stride: the network's output stride.

    Returns:
        ``(ellipses (K, 5) [cx, cy, a, b, angle_deg] float64, classes (K,) int64, scores (K,)
        float64)``, sorted by decreasing score; ``a >= b``, angle in [-90, 90).
    """
    pred = torch.as_tensor(pred).detach().float().cpu()
    pred = pred.as_subclass(torch.Tensor) if type(pred) is not torch.Tensor else pred
    heat = torch.sigmoid(pred[:num_classes])
    peaks = heat * (F.max_pool2d(heat[None], 3, stride=1, padding=1)[0] == heat)
    width = heat.shape[-1]
    ellipses, classes, scores = [], [], []
    for k in range(num_classes):
        flat = peaks[k].reshape(-1)
        top = torch.topk(flat, min(int(max_detections), flat.numel()))
        candidates = []
        for score, index in zip(top.values.tolist(), top.indices.tolist()):
            if score < score_threshold or score <= 0:
                continue
            i, j = divmod(index, width)
            first = num_classes + ELLIPSE_CHANNELS * k
            off_x, off_y, log_size, ex, ey = pred[first : first + ELLIPSE_CHANNELS, i, j].tolist()
            log_size = min(max(log_size, -_MAX_LOG), _MAX_LOG)
            elongation = min(math.hypot(ex, ey), _MAX_LOG)
            angle = 0.5 * math.degrees(math.atan2(ey, ex))
            a = math.exp(log_size + elongation / 2) * stride
            b = math.exp(log_size - elongation / 2) * stride
            angle = (angle + 90.0) % 180.0 - 90.0
            candidates.append(([(j + off_x) * stride - 0.5, (i + off_y) * stride - 0.5, a, b, angle], score))
        kept: list[tuple[list[float], float]] = []
        for ellipse, score in candidates:  # already by decreasing score
            if all(ellipse_iou(ellipse, other) <= nms_iou for other, _ in kept):
                kept.append((ellipse, score))
        for ellipse, score in kept:
            ellipses.append(ellipse)
            classes.append(k)
            scores.append(score)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return (
        np.asarray(ellipses, dtype=np.float64).reshape(-1, 5)[order],
        np.asarray(classes, dtype=np.int64)[order],
        np.asarray(scores, dtype=np.float64)[order],
    )
