"""Winograd F(4x4, 3x3) convolution for float32 CPU inference.

A 3x3 convolution (stride 1, padding 1, no dilation, no groups) computes each 4x4 block of
outputs from a 6x6 block of inputs. Winograd's minimal filtering algorithm (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", CVPR 2016) does it with 36 products per
(input channel, output channel) pair instead of 144: the input tiles and the filters are
transformed by fixed matrices (``B``, ``G``), multiplied element-wise, which over the
channels is 36 independent matrix products, and transformed back (``A``):

    Y = A^T [(G g G^T) (.) (B^T d B)] A

So the multiply-adds of the matrix products are a quarter of the direct convolution's, at
the price of three cheap linear transforms. Results equal the direct convolution's within
float32 rounding of the transforms (their coefficients are up to 8 in size): about 1e-5
relative to the outputs' scale, against 2e-6 for the direct convolution.

It pays where the matrix products dominate: deep layers (many channels) on maps that are not
tiny. :func:`winograd_pays` says where; :mod:`echocare.networks.fast` uses it there, at
inference in float32 only (bfloat16 would lose too much in the transforms).
"""

from __future__ import annotations

import torch

__all__ = ["transform_filter", "winograd_conv3x3", "winograd_pays", "WINOGRAD_MIN_CHANNELS"]

_BT = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float64,
)
_G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
_AT = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=torch.float64
)
#: Both sides of a tile at once: (36, 36) input and (16, 36) output transforms (Kronecker
#: products; one dense matrix product each is faster here than two sparse passes).
_INPUT_TRANSFORM = torch.kron(_BT, _BT).float()
_OUTPUT_TRANSFORM = torch.kron(_AT, _AT).float()

#: Fewer input or output channels than this: the transforms outweigh the saving.
WINOGRAD_MIN_CHANNELS = 64
#: Tiles (4x4 output blocks) transformed and multiplied at a time: the intermediate tiles of
#: one strip stay in the caches (36 x tiles x channels floats each).
_STRIP_TILES = 64


def transform_filter(weight: torch.Tensor) -> torch.Tensor:
    """``G g G^T`` of every filter: (C_out, C_in, 3, 3) -> (36, C_in, C_out) float32
    (computed in float64), the right-hand side of the 36 matrix products."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"Winograd F(4x4, 3x3) needs 3x3 filters, got {tuple(weight.shape)}")
    u = torch.einsum("ui,ocij,vj->uvco", _G, weight.detach().double().cpu(), _G)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


def winograd_pays(x: torch.Tensor, in_channels: int, out_channels: int) -> bool:
    """Whether F(4x4, 3x3) beats oneDNN's direct convolution for input ``x`` (B, C, H, W) on
    a CPU: enough channels, and enough tiles that the transformed filters (4x the direct
    ones) are not what the time goes to (measured on 2 Xeon cores, float32)."""
    tiles = x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
    return min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS and tiles * 8 >= out_channels


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1, of ``x`` (B, C_in, H, W) float32 with
    ``filters`` from :func:`transform_filter` (36, C_in, C_out) and ``bias`` (C_out,) or None.

    Returns (B, C_out, H, W), channels-last in memory (a permuted view of (B, H, W, C_out)).
    """
    b, c, h, w = x.shape
    c_out = filters.shape[2]
    th, tw = -(-h // 4), -(-w // 4)
    hp, wp = 4 * th + 2, 4 * tw + 2
    padded = x.new_zeros(b, hp, wp, c)
    padded[:, 1 : h + 1, 1 : w + 1] = x.permute(0, 2, 3, 1)
    out = x.new_empty(b, h, w, c_out)
    bt, at = _INPUT_TRANSFORM.to(x.device), _OUTPUT_TRANSFORM.to(x.device)
    if th * tw < _STRIP_TILES:
        # small maps (deep layers): the whole batch in one product, each filter read once
        strips = [(slice(0, b), 0, th)]
    else:
        # large maps: strips of tile rows, one image at a time, so the tiles stay in the caches
        rows = max(1, _STRIP_TILES // tw)
        strips = [(slice(i, i + 1), r0, min(rows, th - r0)) for i in range(b) for r0 in range(0, th, rows)]
    for images, r0, r in strips:
        n = images.stop - images.start
        tiles = n * r * tw
        # (6, 6, images, r, tw, C): the overlapping 6x6 input tiles of this strip, gathered once
        d = padded.as_strided(
            (6, 6, n, r, tw, c),
            (wp * c, c, hp * wp * c, 4 * wp * c, 4 * c, 1),
            padded.storage_offset() + (images.start * hp + 4 * r0) * wp * c,
        ).reshape(36, tiles * c)
        v = torch.mm(bt, d).view(36, tiles, c)
        m = torch.bmm(v, filters).view(36, tiles * c_out)
        y = torch.mm(at, m).view(4, 4, n, r, tw, c_out).permute(2, 3, 0, 4, 1, 5).reshape(n, 4 * r, 4 * tw, c_out)
        top = 4 * r0
        rows_out = min(4 * r, h - top)
        target = out[images, top : top + rows_out]
        if bias is None:
            target.copy_(y[:, :rows_out, :w])
        else:
            torch.add(y[:, :rows_out, :w], bias, out=target)
    return out.permute(0, 3, 1, 2)
