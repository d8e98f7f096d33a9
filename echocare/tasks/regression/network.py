"""Scalar regression from a sequence of frames (ejection fraction) or from one image (head circumference).

:class:`EchoCareRegressor` runs the EchoCare encoder on every frame (batch and frames folded
into one batch), pools each frame's deepest map to a vector, runs a temporal model over the
T frame vectors and regresses the target. A still image is a sequence of one frame, so the
same network (and checkpoint layout) serves sequences and images.

The encoder is ``.encoder`` (as in :mod:`echocare.tasks.supervised.networks`), so
:func:`~echocare.networks.checkpoint.initialise_network` (``pretrained_path``, checkpoints),
:func:`~echocare.networks.finetune.configure_finetuning` (full / frozen / LoRA) and
:func:`~echocare.networks.finetune.ddp_wrap` work on it unchanged; everything else is head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from echocare.networks.encoder import build_encoder

__all__ = ["FRAME_NORMS", "TEMPORAL_MODELS", "EchoCareRegressor"]

#: Temporal models of :class:`EchoCareRegressor`.
TEMPORAL_MODELS = ("transformer", "gru", "mean")
#: Normalisations of the pooled frame features of :class:`EchoCareRegressor`.
FRAME_NORMS = ("batch", "none")


class EchoCareRegressor(nn.Module):
    """Frame encoder + temporal model + regression head.

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        num_outputs: regressed values per case (1: EF, or HC).
        in_channels: image channels (3: grey images are repeated).
        temporal: ``transformer`` (a small pre-norm transformer encoder over the frames with
            learned frame-position embeddings; its outputs are averaged), ``gru`` (a
            bidirectional GRU; its outputs are averaged) or ``mean`` (frame features
            averaged, no temporal modelling: a baseline).
        temporal_dim: width of the temporal model (frame features are projected to it).
        temporal_layers: transformer layers or GRU layers.
        temporal_heads: attention heads of the transformer (divides ``temporal_dim``).
        max_frames: longest sequence the position embeddings cover (transformer).
        hidden: width of the head's hidden layer.
        dropout: dropout in the temporal model and the head.
        initial_output: the (normalised) value the untrained head predicts on average: its
            last layer starts with this bias, so training starts around a typical target
            (e.g. 0.55 for EF / 100).
        frame_norm: ``batch`` (default): a ``BatchNorm1d`` on each frame's pooled features,
            which standardises every channel across the cases of the batch; ``none``. The
            pooled features of a from-scratch encoder differ between cases far less than
            between channels (phantom EF: sd 0.06 against 1.5), and without the batch
            statistics short runs settled on a constant prediction (the mean target); with them
            four of four phantom runs learned EF (``tests/test_tasks_regression.py``, the bundle README).

    Forward:
        ``x`` (B, T, in_channels, H, W), T frames per case in time order, or (B, in_channels,
        H, W) for one image per case (T = 1); H and W divisible by 32 -> (B, num_outputs),
        the normalised target (the bundles scale it back to the task's unit).
    """

    #: Run in float32 under ``precision: bf16`` (:mod:`echocare.networks.precision`):
    #: the MLP that produces the outputs.
    float32_modules = ("head",)

    def __init__(
        self,
        network_size: str = "base",
        num_outputs: int = 1,
        in_channels: int = 3,
        temporal: str = "transformer",
        temporal_dim: int = 256,
        temporal_layers: int = 2,
        temporal_heads: int = 4,
        max_frames: int = 64,
        hidden: int = 256,
        dropout: float = 0.1,
        initial_output: float = 0.0,
        frame_norm: str = "batch",
    ) -> None:
        super().__init__()
        if frame_norm not in FRAME_NORMS:
            raise ValueError(f"unknown frame_norm {frame_norm!r}; choose one of {list(FRAME_NORMS)}")
        if temporal not in TEMPORAL_MODELS:
            raise ValueError(f"unknown temporal model {temporal!r}; choose one of {list(TEMPORAL_MODELS)}")
        if temporal == "transformer" and temporal_dim % temporal_heads:
            raise ValueError(f"temporal_dim {temporal_dim} is not divisible by temporal_heads {temporal_heads}")
        self.encoder = build_encoder(network_size, in_channels=in_channels)
        self.temporal = temporal
        self.max_frames = int(max_frames)
        self.feature_dim = int(self.encoder.feature_channels[-1])
        self.frame_norm = nn.BatchNorm1d(self.feature_dim) if frame_norm == "batch" else None
        self.project = nn.Linear(self.feature_dim, temporal_dim)
        # Only the chosen temporal model's weights exist, so state dicts hold no unused keys.
        self.position = None
        self.sequence_model: nn.Module | None = None
        if temporal == "transformer":
            self.position = nn.Parameter(torch.zeros(1, self.max_frames, temporal_dim))
            nn.init.trunc_normal_(self.position, std=0.02)
            layer = nn.TransformerEncoderLayer(
                temporal_dim, temporal_heads, dim_feedforward=2 * temporal_dim, dropout=dropout,
                activation="gelu", batch_first=True, norm_first=True,
            )
            self.sequence_model = nn.TransformerEncoder(layer, temporal_layers, enable_nested_tensor=False)
        elif temporal == "gru":
            self.sequence_model = nn.GRU(
                temporal_dim, temporal_dim // 2, num_layers=temporal_layers, batch_first=True, bidirectional=True,
                dropout=dropout if temporal_layers > 1 else 0.0,
            )
        self.norm = nn.LayerNorm(temporal_dim)
        self.head = nn.Sequential(nn.Linear(temporal_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_outputs))
        # The last layer keeps its default weights (not shrunk to 0.1x: with those, phantom EF
        # runs settled on the mean target and stayed there); the bias starts at initial_output.
        with torch.no_grad():
            self.head[-1].bias.fill_(float(initial_output))

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, T, temporal_dim): each frame's deepest map averaged over space,
        batch-normalised (``frame_norm``) and projected (the frames run through the encoder as
        one batch of B*T).

        Not a LayerNorm on the pooled vector: the encoder already layer-normalises every position
        of its maps, and normalising across channels again keeps the channel offsets that
        swamp the differences between cases (see ``frame_norm``)."""
        b, t = x.shape[:2]
        pooled = self.encoder(x.reshape(b * t, *x.shape[2:]))[-1].mean(dim=(-2, -1))
        if self.frame_norm is not None:
            norm = self.frame_norm
            if self.training and pooled.shape[0] == 1:
                # One frame has no batch statistics: normalise it with the running ones.
                pooled = F.batch_norm(pooled, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
            else:
                pooled = norm(pooled)
        return self.project(pooled).reshape(b, t, -1)

    def sequence_features(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) frame features -> (B, D) case features with the temporal model."""
        t = frames.shape[1]
        if self.temporal == "transformer":
            if t > self.max_frames:
                raise ValueError(f"{t} frames but the network's position embeddings cover max_frames={self.max_frames}")
            return self.sequence_model(frames + self.position[:, :t]).mean(dim=1)
        if self.temporal == "gru":
            return self.sequence_model(frames)[0].mean(dim=1)
        return frames.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(1)
        if x.ndim != 5:
            raise ValueError(f"expected (B, T, C, H, W) or (B, C, H, W) input, got shape {tuple(x.shape)}")
        return self.head(self.norm(self.sequence_features(self.frame_features(x))))
