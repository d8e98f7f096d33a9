"""Image enhancement (low- to high-quality ultrasound): network, loss and PatchGAN discriminator.

:class:`EchoCareEnhanceNet` is the segmentation network's structure (the EchoCare encoder and
the UNETR decoder, :class:`~echocare.tasks.supervised.networks.EchoCareSegNet`) with one output channel
added to the grey input: the decoder predicts a correction. Its state dict has the
segmentation network's layout (``encoder.*``, ``decoder.*``), so ``pretrained_path``,
``initialise_network``, ``load_network_checkpoint`` and the fine-tuning modes work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from echocare.networks.encoder import EchoCareEncoder, build_encoder, load_pretrained
from echocare.tasks.supervised.networks import EchoCareSegNet

__all__ = ["EchoCareEnhanceNet", "EnhancementLoss", "PatchDiscriminator", "build_perceptual_encoder", "grey"]


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): the mean over channels (grey images are repeated)."""
    return x.mean(dim=1, keepdim=True) if x.shape[1] != 1 else x


class EchoCareEnhanceNet(EchoCareSegNet):
    """Enhancement: the EchoCare encoder + UNETR decoder, output = grey input + decoder output.

    The decoder's last layer starts at zero, so the untrained network is the identity (the
    trivial baseline) and training only has to learn the correction.

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        in_channels: image channels (3: grey images are repeated).
        decoder_feature_size: channels of the decoder's full-resolution stage (default ``embed_dim``).
        drop_path_rate: stochastic depth rate of the encoder.

    Forward:
        ``x`` (B, in_channels, H, W) in [0, 1], H and W divisible by 32 -> (B, 1, H, W), the
        enhanced grey image (not clipped, so the loss keeps its gradient; clip for display).
    """

    def __init__(
        self,
        network_size: str = "base",
        in_channels: int = 3,
        decoder_feature_size: int | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(network_size, out_channels=1, in_channels=in_channels,
                         decoder_feature_size=decoder_feature_size, drop_path_rate=drop_path_rate)
        last = self.decoder.out.conv.conv if hasattr(self.decoder.out.conv, "conv") else self.decoder.out.conv
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grey(x) + self.decoder(x, self.encoder(x))


class PatchDiscriminator(nn.Module):
    """A small PatchGAN discriminator (Isola et al. 2017): strided convolutions to one logit
    per overlapping patch.

    Args:
        in_channels: image channels (1: grey).
        width: channels of the first layer (doubled at each stride-2 layer).
        layers: stride-2 layers (receptive field grows with each).

    Forward: (B, in_channels, H, W) -> (B, 1, H / 2**layers, W / 2**layers) logits.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        channels = width
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(channels, channels * 2, 4, 2, 1), nn.InstanceNorm2d(channels * 2, affine=True),
                       nn.LeakyReLU(0.2, inplace=True)]
            channels *= 2
        blocks.append(nn.Conv2d(channels, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_perceptual_encoder(
    network_size: str = "base", pretrained_path: str | None = None, device: str | torch.device | None = None
) -> EchoCareEncoder:
    """The frozen encoder of :class:`EnhancementLoss`'s perceptual term: an EchoCare encoder of
    ``network_size`` with the weights of ``pretrained_path`` (random when empty), on ``device``,
    in eval mode and without gradients."""
    encoder = load_pretrained(build_encoder(network_size), pretrained_path)
    encoder = encoder.to(device) if device is not None else encoder
    return encoder.eval().requires_grad_(False)


class EnhancementLoss(nn.Module):
    """Paired loss: ``l1_weight`` * L1 + ``ssim_weight`` * (1 - SSIM) [+ ``perceptual_weight`` *
    perceptual].

    The perceptual term is the mean L1 distance between the first ``perceptual_levels``
    feature maps of a frozen EchoCare encoder (``perceptual_encoder``, e.g. the pretrained
    one) on the prediction and on the target. The adversarial term needs its own
    discriminator step: see :class:`~echocare.tasks.enhancement.engine.EnhancementIteration`.

    Forward: ``pred`` (B, 1, H, W), ``target`` (B, C, H, W) in [0, 1] (channels averaged) -> scalar.
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        ssim_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual_encoder: nn.Module | None = None,
        perceptual_levels: int = 3,
    ) -> None:
        super().__init__()
        from monai.losses import SSIMLoss

        if perceptual_weight > 0 and perceptual_encoder is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual_encoder (e.g. the pretrained EchoCare encoder)")
        self.l1_weight, self.ssim_weight, self.perceptual_weight = float(l1_weight), float(ssim_weight), float(perceptual_weight)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0)
        self.perceptual_levels = int(perceptual_levels)
        self.perceptual_encoder = perceptual_encoder.eval().requires_grad_(False) if perceptual_encoder is not None else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = grey(target).to(pred.dtype)
        loss = self.l1_weight * F.l1_loss(pred, target)
        if self.ssim_weight:
            loss = loss + self.ssim_weight * self.ssim(pred.float(), target.float())
        if self.perceptual_weight and self.perceptual_encoder is not None:
            loss = loss + self.perceptual_weight * self.perceptual(pred, target)
        return loss

    def perceptual(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean L1 between the encoder's shallow feature maps of ``pred`` and ``target`` (B, 1, H, W)."""
        channels = self.perceptual_encoder.in_channels if hasattr(self.perceptual_encoder, "in_channels") else 3
        a = self.perceptual_encoder(pred.repeat(1, channels, 1, 1))
        with torch.no_grad():
            b = self.perceptual_encoder(target.repeat(1, channels, 1, 1))
        levels: Sequence[int] = range(min(self.perceptual_levels, len(a)))
        return sum(F.l1_loss(a[k], b[k]) for k in levels) / len(levels)
