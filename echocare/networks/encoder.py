"""The EchoCare encoder: MONAI's 2D Swin Transformer (v2) plus the masked-patch embedding.

The released EchoCare checkpoint is a flat state dict of
``monai.networks.nets.swin_unetr.SwinTransformer`` plus one top-level ``mask_token``
(1, 1, embed_dim). :class:`EchoCareEncoder` subclasses MONAI's class and adds that one
parameter, so its ``state_dict()`` *is* the released layout (358 + 1 keys for ``base``)
and weights move both ways with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

__all__ = [
    "ENCODER_SIZES",
    "EchoCareEncoder",
    "EncoderWeightsError",
    "build_encoder",
    "check_state_dict",
    "encoder_of",
    "encoder_state_dict",
    "load_encoder_weights",
    "load_pretrained",
    "read_checkpoint",
    "save_encoder_weights",
    "unwrap_state_dict",
]

#: Named sizes (all: patch 2, window 8, Swin v2, MLP ratio 4, qkv bias).
ENCODER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 24, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)},
}

#: Side lengths must be divisible by this: patch 2 then four 2x merges.
SIDE_MULTIPLE = 32


class EncoderWeightsError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the encoder."""


class EchoCareEncoder(SwinTransformer):
    """MONAI's 2D ``SwinTransformer`` with a learnable ``mask_token`` for masked patches.

    Args:
        in_channels: input channels (3: grey images are repeated to RGB).
        embed_dim: channels after patch embedding; the five maps have
            ``embed_dim * (1, 2, 4, 8, 16)`` channels.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        drop_path_rate: stochastic depth rate.
        use_checkpoint: gradient checkpointing inside the Swin stages (saves memory).

    Forward:
        ``x`` (B, in_channels, H, W), intensities in [0, 1], H and W divisible by 32;
        optional ``mask`` (B, H/2, W/2) bool, True where a patch token is replaced by
        ``mask_token``. Returns five maps: (B, C, H/2, W/2), (B, 2C, H/4, W/4),
        (B, 4C, H/8, W/8), (B, 8C, H/16, W/16), (B, 16C, H/32, W/32) with C = embed_dim.
    """

    #: Run in float32 under ``precision: bf16`` (:mod:`echocare.networks.precision`): the layer
    #: that reads the image.
    float32_modules = ("patch_embed",)

    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__(
            in_chans=in_channels,
            embed_dim=embed_dim,
            window_size=(8, 8),
            patch_size=(2, 2),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=2,
            use_v2=True,
        )
        self.embed_dim = embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of the five returned maps."""
        return tuple(self.embed_dim * 2**i for i in range(5))

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, with masked patch tokens replaced by ``mask_token``.

        Args:
            x: (B, in_channels, H, W).
            mask: (B, H/2, W/2) bool or None.

        Returns:
            (B, embed_dim, H/2, W/2).
        """
        if x.ndim != 4 or x.shape[-1] % SIDE_MULTIPLE or x.shape[-2] % SIDE_MULTIPLE:
            raise ValueError(
                f"the EchoCare encoder needs a (B, C, H, W) input with H and W divisible by "
                f"{SIDE_MULTIPLE}; got shape {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x)
        if mask is not None:
            if mask.shape != (tokens.shape[0], *tokens.shape[2:]):
                raise ValueError(
                    f"mask must be (B, H/2, W/2) = {(tokens.shape[0], *tokens.shape[2:])}, got {tuple(mask.shape)}"
                )
            # The patch embedding is a stride-2 convolution with a 2x2 kernel, so each token
            # depends on its own patch only: replacing it removes every masked pixel.
            weight = mask.unsqueeze(1).to(tokens.dtype)
            token = self.mask_token.to(tokens.dtype).reshape(1, -1, 1, 1)
            tokens = tokens * (1.0 - weight) + token * weight
        return tokens

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True
    ) -> list[torch.Tensor]:
        x0 = self.pos_drop(self.embed(x, mask))
        outputs = [self.proj_out(x0, normalize)]
        stages = (self.layers1, self.layers2, self.layers3, self.layers4)
        v2_blocks = (self.layers1c, self.layers2c, self.layers3c, self.layers4c)
        for stage, v2_block in zip(stages, v2_blocks):
            x0 = stage[0](v2_block[0](x0.contiguous()).contiguous())
            outputs.append(self.proj_out(x0, normalize))
        return outputs


def build_encoder(
    size: str = "base", in_channels: int = 3, drop_path_rate: float = 0.0, use_checkpoint: bool = False
) -> EchoCareEncoder:
    """The EchoCare encoder of a named size (``tiny``, ``base``, ``large``; see :data:`ENCODER_SIZES`)."""
    if size not in ENCODER_SIZES:
        raise ValueError(f"unknown encoder size {size!r}; choose one of {sorted(ENCODER_SIZES)}")
    return EchoCareEncoder(
        in_channels=in_channels, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint, **ENCODER_SIZES[size]
    )


# Containers in which training code stores a state dict, searched in this order.
_WRAPPER_KEYS = ("state_dict", "model", "network", "net", "encoder")
# Prefixes under which a whole-network checkpoint holds the encoder, stripped in this order.
_DDP_PREFIX = "module."
_ENCODER_PREFIXES = ("encoder.", "swinViT.", "backbone.")


def unwrap_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _WRAPPER_KEYS:
            if key in obj:
                found = unwrap_state_dict(obj[key])
                if found is not None:
                    return found
    return None


def encoder_state_dict(checkpoint: Any, expected_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Extract the encoder's flat state dict from a loaded checkpoint object.

    Accepts the released flat layout, the same wrapped in ``{"state_dict": ...}`` /
    ``{"model": ...}``, keys prefixed by ``module.`` (DDP) and ``encoder.`` / ``swinViT.``
    (whole-network checkpoints of our bundles or SwinUNETR-style wrappers, whose other
    parts are dropped). The encoder's ``mask_token`` must be present: a plain MONAI
    ``SwinUNETR`` checkpoint (window 7, no mask token) is refused by the strict load.
    """
    state = unwrap_state_dict(checkpoint)
    if state is None:
        raise EncoderWeightsError("no state dict of tensors found (looked for a flat dict and keys " + ", ".join(_WRAPPER_KEYS) + ")")
    state = {(k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k): v for k, v in state.items()}
    if expected_keys is not None and expected_keys.issubset(state):
        return {k: state[k] for k in state if not k.startswith(_ENCODER_PREFIXES)}
    for prefix in _ENCODER_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return dict(state)


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], problem: str, model_name: str = "model"
) -> None:
    """Raise :class:`EncoderWeightsError` starting with ``problem`` unless ``state`` has exactly
    the keys and shapes of ``expected``; the message lists missing, unexpected and wrongly
    shaped keys."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_errors = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs {model_name} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shape_errors:
        raise EncoderWeightsError(
            f"{problem}:\n"
            f"  missing keys: {_describe(missing)}\n"
            f"  unexpected keys: {_describe(unexpected)}\n"
            f"  wrongly shaped keys: {_describe(shape_errors, limit=6)}"
        )


def read_checkpoint(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or non-torch files
        raise EncoderWeightsError(f"{path}: cannot read as a PyTorch checkpoint ({type(error).__name__}: {error})") from error


def encoder_of(network: nn.Module) -> nn.Module:
    """The encoder inside ``network``: unwraps DDP's ``.module`` and a task network's ``.encoder``."""
    target = getattr(network, "module", network)
    return getattr(target, "encoder", target)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> EchoCareEncoder:
    """Load encoder weights strictly, in the released layout or any layout of :func:`encoder_state_dict`.

    Args:
        encoder: an :class:`EchoCareEncoder`, or a network holding one as ``.encoder``.
        path: the checkpoint file (read with ``torch.load(weights_only=True)``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        EncoderWeightsError: the file cannot be read, or its keys/shapes differ from the
            encoder's; the message lists missing, unexpected and wrongly shaped keys.
    """
    target = encoder_of(encoder)
    path = Path(path)
    checkpoint = read_checkpoint(path, "encoder checkpoint")
    expected = target.state_dict()
    try:
        state = encoder_state_dict(checkpoint, set(expected))
    except EncoderWeightsError as error:
        raise EncoderWeightsError(f"{path}: {error}") from error
    problem = f"{path}: the weights do not fit this EchoCare encoder (embed_dim={getattr(target, 'embed_dim', '?')})"
    check_state_dict(state, expected, problem, model_name="encoder")
    target.load_state_dict(state, strict=True)
    return target


def save_encoder_weights(encoder: nn.Module, path: str | Path) -> Path:
    """Write the encoder in the released layout: one flat state dict including ``mask_token``.

    The official code loads it with ``sd.pop("mask_token")`` then a strict load into
    MONAI's ``SwinTransformer``. ``encoder`` may be a network holding it as ``.encoder``
    or a DDP wrapper.
    """
    target = encoder_of(encoder)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in target.state_dict().items()}
    torch.save(state, path)
    return path


def load_pretrained(network: nn.Module, path: str | Path | None) -> nn.Module:
    """Load encoder weights into ``network`` (an encoder or a network with ``.encoder``) when ``path`` is set.

    An empty ``path`` leaves the network as initialised (training from scratch); this is
    the form bundles call with their ``pretrained_path``.
    """
    if path:
        load_encoder_weights(network, path)
    return network
