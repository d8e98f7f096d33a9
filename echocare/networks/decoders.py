"""Decoders over the encoder's five feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

__all__ = ["SinglePixelInstanceNorm2d", "UNETRDecoder", "accept_single_pixel_maps"]


class SinglePixelInstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` that also normalises a 1x1 map, which PyTorch refuses.

    A map of one pixel is its own mean: ``x - mean(x)`` is ``x - x`` and the normalised map is
    zero (``bias`` where affine; NaN and infinity stay NaN). That is what the norm computes,
    so every other size takes PyTorch's own kernel unchanged. The decoder's bottleneck sees
    a 1x1 map for a 32x32 input (MONAI's ``verify_net_in_out`` at ``32*n`` with ``n=1``).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        uses_input_stats = self.training or not self.track_running_stats
        if uses_input_stats and input.ndim in (3, 4) and input.shape[-2:].numel() == 1:
            out = input - input
            return out + self.bias.view(-1, 1, 1) if self.affine else out
        return super().forward(input)


def accept_single_pixel_maps(module: nn.Module) -> nn.Module:
    """Make every ``nn.InstanceNorm2d`` under ``module`` a :class:`SinglePixelInstanceNorm2d`.

    The class is switched in place: parameters, buffers and state-dict names stay as they are.
    Returns ``module``.
    """
    for norm in module.modules():
        if type(norm) is nn.InstanceNorm2d:
            norm.__class__ = SinglePixelInstanceNorm2d
    return module


class UNETRDecoder(nn.Module):
    """SwinUNETR-style decoder: skip connections from the image and the five encoder maps.

    Args:
        in_channels: channels of the top skip (the network's input image).
        feature_channels: channels of the five encoder maps, shallow to deep
            (``embed_dim * (1, 2, 4, 8, 16)``).
        out_channels: output channels (classes, or 3 for a reconstructed image).
        feature_size: channels of the full-resolution decoder stage; deeper stages use
            ``feature_size * (2, 4, 8)``. Defaults to ``feature_channels[0]`` as in SwinUNETR.
        norm_name: MONAI norm name for the residual blocks.

    Forward:
        ``image`` (B, in_channels, H, W) and ``features`` (the five maps at H/2 ... H/32)
        -> (B, out_channels, H, W). H and W may be 32: the bottleneck's instance norm
        accepts the 1x1 map (:class:`SinglePixelInstanceNorm2d`).
    """

    def __init__(
        self,
        in_channels: int,
        feature_channels: Sequence[int],
        out_channels: int,
        feature_size: int | None = None,
        norm_name: str | tuple = "instance",
    ) -> None:
        super().__init__()
        if len(feature_channels) != 5:
            raise ValueError(f"expected five encoder maps, got channels {tuple(feature_channels)}")
        fs = int(feature_size or feature_channels[0])
        c0, c1, c2, c3, c4 = (int(c) for c in feature_channels)

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(2, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                2, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True
            )

        self.skip_image = basic(in_channels, fs)
        self.skip1 = basic(c0, fs)
        self.skip2 = basic(c1, 2 * fs)
        self.skip3 = basic(c2, 4 * fs)
        self.skip4 = basic(c3, 8 * fs)
        self.bottleneck = basic(c4, 16 * fs)
        self.up4 = up(16 * fs, 8 * fs)
        self.up3 = up(8 * fs, 4 * fs)
        self.up2 = up(4 * fs, 2 * fs)
        self.up1 = up(2 * fs, fs)
        self.up0 = up(fs, fs)
        self.out = UnetOutBlock(2, fs, out_channels)
        accept_single_pixel_maps(self)
        # Run in float32 under ``precision: bf16`` (echocare.networks.precision): the
        # convolutions that read the image (the image block's first and, where the channels
        # change, residual convolution) and the output convolution.
        image_convs = [f"skip_image.layer.{name}" for name in ("conv1", "conv3") if hasattr(self.skip_image.layer, name)]
        self.float32_modules = (*image_convs, "out")

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        f0, f1, f2, f3, f4 = features
        x = self.up4(self.bottleneck(f4), self.skip4(f3))
        x = self.up3(x, self.skip3(f2))
        x = self.up2(x, self.skip2(f1))
        x = self.up1(x, self.skip1(f0))
        x = self.up0(x, self.skip_image(image))
        return self.out(x)
