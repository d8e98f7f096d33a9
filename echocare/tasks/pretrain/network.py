"""The EchoCare pretraining network: masked image modelling plus anatomy-tree classification.

Pretraining: the image is cut into ``mask_unit`` x ``mask_unit`` pixel units, a
fraction ``mask_ratio`` of them is masked at random, masked patch tokens are replaced by the
encoder's ``mask_token``; a UNETR-style decoder rebuilds the image (its top skip sees only
the masked input), and a classifier on the pooled deepest map scores every node of the
anatomy tree.
"""

from __future__ import annotations

import torch
from torch import nn

from echocare.networks.decoders import UNETRDecoder
from echocare.networks.encoder import build_encoder
from echocare.ontology import AnatomyOntology

__all__ = ["EchoCarePretrainNet", "PretrainLoss", "random_unit_mask", "expand_unit_mask"]


def random_unit_mask(
    batch_size: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask exactly ``round(mask_ratio * units)`` random units per image.

    Args:
        batch_size: B.
        grid: (rows, cols) of mask units.
        mask_ratio: fraction of units to mask, in [0, 1].
        generator: CPU generator for reproducible masks.

    Returns:
        (B, rows, cols) bool, True = masked.
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    units = grid[0] * grid[1]
    num_masked = int(round(mask_ratio * units))
    order = torch.rand(batch_size, units, generator=generator).argsort(dim=1)
    mask = order < num_masked  # rank below num_masked <=> one of the num_masked chosen units
    return mask.reshape(batch_size, *grid).to(device)


def expand_unit_mask(unit_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each unit ``factor`` times along both axes: (B, h, w) -> (B, h*factor, w*factor)."""
    return unit_mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


class EchoCarePretrainNet(nn.Module):
    """Encoder + pixel decoder + anatomy classifier.

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        num_anatomy_nodes: nodes of the anatomy tree (classifier outputs).
        in_channels: image channels (3).
        mask_unit: side of a mask unit in pixels; a multiple of the patch size 2 that
            divides the image sides.
        mask_ratio: fraction of units masked per image.
        decoder_feature_size: channels of the decoder's full-resolution stage
            (default: the encoder's ``embed_dim``).
        drop_path_rate: stochastic depth of the encoder.
        use_checkpoint: gradient checkpointing in the encoder.

    Forward:
        ``image`` (B, 3, H, W) in [0, 1], optional ``unit_mask`` (B, H/mask_unit,
        W/mask_unit) bool (drawn at random when None; an all-False mask gives the
        unmasked pass used for anatomy inference). Returns a dict:
        ``reconstruction`` (B, 3, H, W), ``anatomy_logits`` (B, N),
        ``pixel_mask`` (B, 1, H, W) float, 1 = masked pixel.
    """

    #: Run in float32 under ``precision: bf16`` (:mod:`echocare.networks.precision`):
    #: the anatomy scores (the pixel decoder names its own).
    float32_modules = ("anatomy_head",)

    def __init__(
        self,
        network_size: str = "base",
        num_anatomy_nodes: int = 118,
        in_channels: int = 3,
        mask_unit: int = 32,
        mask_ratio: float = 0.5,
        decoder_feature_size: int | None = None,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if mask_unit <= 0 or mask_unit % 2:
            raise ValueError(f"mask_unit must be a positive multiple of the patch size 2, got {mask_unit}")
        self.mask_unit = int(mask_unit)
        self.mask_ratio = float(mask_ratio)
        self.encoder = build_encoder(
            network_size, in_channels=in_channels, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint
        )
        channels = self.encoder.feature_channels
        self.pixel_decoder = UNETRDecoder(in_channels, channels, in_channels, feature_size=decoder_feature_size)
        self.anatomy_norm = nn.LayerNorm(channels[-1])
        self.anatomy_head = nn.Linear(channels[-1], num_anatomy_nodes)

    def draw_mask(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random unit mask for ``image`` (B, C, H, W): (B, H/mask_unit, W/mask_unit) bool."""
        height, width = image.shape[-2:]
        if height % self.mask_unit or width % self.mask_unit:
            raise ValueError(
                f"image sides {height}x{width} are not divisible by mask_unit={self.mask_unit}"
            )
        grid = (height // self.mask_unit, width // self.mask_unit)
        return random_unit_mask(image.shape[0], grid, self.mask_ratio, generator, image.device)

    def classify(self, deepest: torch.Tensor) -> torch.Tensor:
        """Anatomy logits (B, N) from the deepest map (B, 16C, H/32, W/32)."""
        return self.anatomy_head(self.anatomy_norm(deepest.mean(dim=(-2, -1))))

    def forward(self, image: torch.Tensor, unit_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if unit_mask is None:
            unit_mask = self.draw_mask(image)
        patch_mask = expand_unit_mask(unit_mask, self.mask_unit // 2)
        pixel_mask = expand_unit_mask(unit_mask, self.mask_unit).unsqueeze(1).to(image.dtype)
        features = self.encoder(image, mask=patch_mask)
        masked_image = image * (1.0 - pixel_mask)
        return {
            "reconstruction": self.pixel_decoder(masked_image, features),
            "anatomy_logits": self.classify(features[-1]),
            "pixel_mask": pixel_mask,
        }


class PretrainLoss(nn.Module):
    """``L_pixel + anatomy_weight * L_anatomy``.

    ``L_pixel``: mean absolute error over masked pixels (and channels) only.
    ``L_anatomy``: the ontology's hierarchy-coherent binary cross-entropy over known nodes,
    with positives and negatives averaged separately when ``balanced`` (the default; see
    :meth:`AnatomyOntology.hierarchy_loss`).

    Call with the network's output dict, the original ``image`` (B, 3, H, W) and the
    anatomy ``labels`` / ``known`` (B, N); returns ``{"loss", "loss_pixel", "loss_anatomy"}``.
    """

    def __init__(self, ontology: AnatomyOntology, anatomy_weight: float = 1.0, balanced: bool = True) -> None:
        super().__init__()
        self.ontology = ontology
        self.anatomy_weight = float(anatomy_weight)
        self.balanced = balanced

    @staticmethod
    def masked_l1(reconstruction: torch.Tensor, image: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """Per-image mean |reconstruction - image| over masked pixels: (B,)."""
        error = (reconstruction.float() - image.float()).abs() * pixel_mask
        denominator = pixel_mask.sum(dim=(1, 2, 3)) * image.shape[1]
        return error.sum(dim=(1, 2, 3)) / denominator.clamp_min(1.0)

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        image: torch.Tensor,
        labels: torch.Tensor,
        known: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        mask = outputs["pixel_mask"]
        error = (outputs["reconstruction"].float() - image.float()).abs() * mask
        loss_pixel = error.sum() / (mask.sum() * image.shape[1]).clamp_min(1.0)
        if self.anatomy_weight > 0:
            scores = torch.sigmoid(outputs["anatomy_logits"].float())
            loss_anatomy = self.ontology.hierarchy_loss(scores, labels.float(), known.bool(), balanced=self.balanced)
        else:
            loss_anatomy = torch.zeros((), device=image.device)
        return {
            "loss": loss_pixel + self.anatomy_weight * loss_anatomy,
            "loss_pixel": loss_pixel,
            "loss_anatomy": loss_anatomy,
        }


def reconstruction_panel_tensors(
    image: torch.Tensor, outputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original, masked input, reconstruction pasted into the visible pixels), each (B, 3, H, W) in [0, 1]."""
    mask = outputs["pixel_mask"]
    reconstruction = outputs["reconstruction"].float().clamp(0, 1)
    masked = image * (1 - mask) + 0.5 * mask  # masked units shown mid-grey
    pasted = image * (1 - mask) + reconstruction * mask
    return image.float(), masked.float(), pasted.float()

