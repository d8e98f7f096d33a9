"""Task networks on the EchoCare encoder: segmentation (UNETR decoder) and classification (pooled MLP).

Both hold the encoder as ``.encoder`` so :func:`~echocare.networks.encoder.load_pretrained`,
:func:`~echocare.networks.encoder.load_encoder_weights`,
:func:`~echocare.networks.encoder.save_encoder_weights` and
:func:`~echocare.networks.finetune.configure_finetuning` find it; everything else is the head.
"""

from __future__ import annotations

import torch
from torch import nn

from echocare.networks.decoders import UNETRDecoder
from echocare.networks.encoder import build_encoder

__all__ = ["CLIP_POOLINGS", "EchoCareClassifier", "EchoCareSegNet"]

#: Ways :class:`EchoCareClassifier` pools per-frame features over a clip.
CLIP_POOLINGS = ("mean", "max", "attention")


class EchoCareSegNet(nn.Module):
    """Segmentation: the EchoCare encoder plus a SwinUNETR-style decoder on its five maps.

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        out_channels: output channels (classes, background included).
        in_channels: image channels (3: grey images are repeated).
        decoder_feature_size: channels of the decoder's full-resolution stage; ``None``
            uses the encoder's ``embed_dim`` (as SwinUNETR).
        drop_path_rate: stochastic depth rate of the encoder.

    Forward:
        ``x`` (B, in_channels, H, W), H and W divisible by 32 -> logits (B, out_channels, H, W).
    """

    def __init__(
        self,
        network_size: str = "base",
        out_channels: int = 2,
        in_channels: int = 3,
        decoder_feature_size: int | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(network_size, in_channels=in_channels, drop_path_rate=drop_path_rate)
        self.decoder = UNETRDecoder(
            in_channels, self.encoder.feature_channels, out_channels, feature_size=decoder_feature_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.encoder(x))


class EchoCareClassifier(nn.Module):
    """Classification: mean-pooled deepest encoder map -> LayerNorm -> MLP.

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        num_classes: number of logits.
        in_channels: image channels (3: grey images are repeated).
        hidden: width of the MLP's hidden layer.
        dropout: dropout after the hidden layer's GELU.
        clip_pooling: how per-frame features of a clip are combined: ``mean``, ``max``, or
            ``attention`` (a learned score per frame, softmax over the frames, weighted sum).

    Forward:
        ``x`` (B, in_channels, H, W), one image per case, or (B, F, in_channels, H, W), a
        clip of F frames per case (the frames run through the encoder as B*F images);
        H and W divisible by 32 -> logits (B, num_classes).
    """

    #: Run in float32 under ``precision: bf16`` (:mod:`echocare.networks.precision`):
    #: the MLP that produces the logits.
    float32_modules = ("head",)

    def __init__(
        self,
        network_size: str = "base",
        num_classes: int = 2,
        in_channels: int = 3,
        hidden: int = 512,
        dropout: float = 0.1,
        clip_pooling: str = "mean",
    ) -> None:
        super().__init__()
        if clip_pooling not in CLIP_POOLINGS:
            raise ValueError(f"unknown clip_pooling {clip_pooling!r}; choose one of {list(CLIP_POOLINGS)}")
        self.encoder = build_encoder(network_size, in_channels=in_channels)
        self.clip_pooling = clip_pooling
        self.feature_dim = int(self.encoder.feature_channels[-1])
        # One score per frame for attention pooling; present only in that mode so the
        # state dict of mean/max models has no unused weights.
        self.frame_score = nn.Linear(self.feature_dim, 1) if clip_pooling == "attention" else None
        self.norm = nn.LayerNorm(self.feature_dim)
        self.head = nn.Sequential(
            nn.Linear(self.feature_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, 16C): the deepest map averaged over space."""
        return self.encoder(x)[-1].mean(dim=(-2, -1))

    def pool_frames(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, D) per-frame features -> (B, D) with ``clip_pooling``."""
        if self.clip_pooling == "mean":
            return features.mean(dim=1)
        if self.clip_pooling == "max":
            return features.amax(dim=1)
        weights = torch.softmax(self.frame_score(features).squeeze(-1), dim=1)  # (B, F)
        return (weights.unsqueeze(-1) * features).sum(dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the LayerNorm: (B, 3, H, W) or (B, F, 3, H, W) -> (B, 16C)."""
        if x.ndim == 4:
            return self.image_features(x)
        if x.ndim == 5:
            b, f = x.shape[:2]
            per_frame = self.image_features(x.reshape(b * f, *x.shape[2:])).reshape(b, f, -1)
            return self.pool_frames(per_frame)
        raise ValueError(f"expected (B, C, H, W) or (B, F, C, H, W) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)))
