"""Fine-tuning the EchoCare encoder: full, frozen, or LoRA on the attention's q and v.

MONAI's Swin ``WindowAttention`` computes q, k and v with one fused ``qkv`` Linear
(``dim -> 3 * dim``, output laid out as ``[q | k | v]``). :func:`apply_lora` replaces each
with :class:`LoRAQKV`, which adds low-rank updates to the q and v slices only (as in the
LoRA paper's q/v setting) and freezes the rest of the encoder. :func:`merge_lora` folds the
updates back into plain ``nn.Linear`` layers so the encoder's state dict is the released
layout again (for :func:`~echocare.networks.encoder.save_encoder_weights`).
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

from echocare.networks.encoder import encoder_of

__all__ = [
    "FINETUNE_MODES",
    "LoRALinear",
    "LoRAQKV",
    "apply_lora",
    "configure_finetuning",
    "lora_parameters",
    "merge_lora",
]

#: Modes of :func:`configure_finetuning`.
FINETUNE_MODES = ("full", "frozen", "lora")


def _low_rank_pair(
    in_features: int, out_features: int, rank: int, like: torch.Tensor
) -> tuple[nn.Parameter, nn.Parameter]:
    """A (rank, in) with Kaiming-uniform init and B (out, rank) zeros, so B @ A = 0 at init."""
    a = torch.empty(rank, in_features, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, rank, dtype=like.dtype, device=like.device)
    return nn.Parameter(a), nn.Parameter(b)


class _LoRAAdapter(nn.Module):
    """A frozen ``nn.Linear`` plus low-rank updates; subclasses give ``delta_weight`` and ``forward``.

    Holds the frozen ``base``, ``rank``, ``alpha`` and ``scale = alpha / rank`` (alpha
    defaults to rank), and folds the update back into a plain ``nn.Linear`` (:meth:`merged`).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (base weight + update)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        layer = layer.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer


class LoRALinear(_LoRAAdapter):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + scale * x A^T B^T``.

    Args:
        base: the layer to adapt; its weight and bias are set ``requires_grad=False``.
        rank: rank r of the update (A is (r, in), Kaiming-uniform; B is (out, r), zeros,
            so at init the output equals ``base(x)`` exactly).
        alpha: scaling numerator; ``scale = alpha / rank``, alpha defaults to ``rank``.

    Forward: (..., in_features) -> (..., out_features).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__(base, rank, alpha)
        self.lora_A, self.lora_B = _low_rank_pair(base.in_features, base.out_features, self.rank, base.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out, in) matrix: ``scale * B @ A``."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.t()) @ self.lora_B.t())


class LoRAQKV(_LoRAAdapter):
    """A frozen fused ``qkv`` Linear (``dim -> 3 * dim``) with LoRA updates on q and v, none on k.

    Args:
        base_qkv: the attention's fused projection; frozen.
        rank: rank of each update; q and v get their own (A: (rank, dim), B: (dim, rank)).
        alpha: ``scale = alpha / rank``; alpha defaults to ``rank``.

    Forward: (..., dim) -> (..., 3 * dim) laid out ``[q | k | v]``, equal to ``base_qkv``
    at init; the k slice always equals ``base_qkv``'s.
    """

    def __init__(self, base_qkv: nn.Linear, rank: int, alpha: float | None = None) -> None:
        if base_qkv.out_features != 3 * base_qkv.in_features:
            raise ValueError(
                "expected a fused qkv Linear (out = 3 * in), "
                f"got in={base_qkv.in_features}, out={base_qkv.out_features}"
            )
        super().__init__(base_qkv, rank, alpha)
        self.dim = base_qkv.in_features
        self.lora_q_A, self.lora_q_B = _low_rank_pair(self.dim, self.dim, self.rank, base_qkv.weight)
        self.lora_v_A, self.lora_v_B = _low_rank_pair(self.dim, self.dim, self.rank, base_qkv.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (3 * dim, dim) matrix with a zero k block."""
        dq = self.scale * (self.lora_q_B @ self.lora_q_A)
        dv = self.scale * (self.lora_v_B @ self.lora_v_A)
        return torch.cat([dq, torch.zeros_like(dq), dv], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        dq = self.scale * ((x @ self.lora_q_A.t()) @ self.lora_q_B.t())
        dv = self.scale * ((x @ self.lora_v_A.t()) @ self.lora_v_B.t())
        return out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


def apply_lora(encoder: nn.Module, rank: int, alpha: float | None = None) -> int:
    """Put :class:`LoRAQKV` adapters on the q and v projections of every Swin attention.

    Every ``WindowAttention.qkv`` in ``encoder`` (or ``encoder.encoder``) is replaced, and
    all other encoder parameters are frozen, so only the adapters stay trainable.
    Attentions already adapted are left as they are (calling twice adds nothing).

    Returns:
        the number of fused qkv layers adapted by this call (each carries two adapters,
        q and v, of ``rank * 2 * dim`` parameters each).
    """
    encoder = encoder_of(encoder)
    for p in encoder.parameters():
        p.requires_grad_(False)
    count = 0
    for module in encoder.modules():
        if isinstance(module, WindowAttention) and isinstance(module.qkv, nn.Linear):
            module.qkv = LoRAQKV(module.qkv, rank, alpha)
            count += 1
    for p in lora_parameters(encoder):
        p.requires_grad_(True)
    return count


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every LoRA layer) inside ``module``."""
    # An adapter's own parameters are its A/B pairs; the frozen base is a child module.
    return [p for m in module.modules() if isinstance(m, _LoRAAdapter) for p in m.parameters(recurse=False)]


def merge_lora(encoder: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put back plain ``nn.Linear`` modules.

    Afterwards the encoder's state dict has the released layout again (so
    :func:`~echocare.networks.encoder.save_encoder_weights` writes a file the official
    code and :func:`~echocare.networks.encoder.load_encoder_weights` read) and computes
    the same function as before the merge. The merged layers' ``requires_grad`` follows
    the base weights (frozen, as left by :func:`apply_lora`).

    Args:
        encoder: the encoder, or a network holding it as ``.encoder``.

    Returns:
        the number of layers merged.
    """
    encoder = encoder_of(encoder)
    replacements = [
        (parent, name, child)
        for parent in encoder.modules()
        for name, child in parent.named_children()
        if isinstance(child, _LoRAAdapter)
    ]
    for parent, name, child in replacements:
        merged = child.merged()
        merged.requires_grad_(child.base.weight.requires_grad)
        setattr(parent, name, merged)
    return len(replacements)


def configure_finetuning(
    network: nn.Module,
    mode: str = "full",
    lora_rank: int = 8,
    encoder_lr: float = 1e-5,
    head_lr: float = 1e-3,
    weight_decay: float = 0.01,
) -> list[dict]:
    """Set ``requires_grad`` for a fine-tuning mode and return optimizer param groups.

    ``network`` is anything with ``.encoder`` (or a DDP wrapper of it); every parameter
    outside the encoder is "head".

    Modes:
        ``full``: everything trainable (but the encoder's ``mask_token``, which only masked
            pretraining uses); encoder at ``encoder_lr``, head at ``head_lr``.
        ``frozen``: encoder frozen (``requires_grad=False``), head trainable at ``head_lr``.
        ``lora``: :func:`apply_lora` with ``lora_rank`` (unless adapters are already there);
            the encoder is frozen except the adapters. The adapters are trained at
            ``head_lr``, not ``encoder_lr``: they start at zero and are newly initialised
            weights like the head, and LoRA's usual learning rates (1e-4 .. 1e-3) are those
            of a head rather than of full fine-tuning.

    Returns:
        ``[{"params": [...], "lr": encoder_lr, "weight_decay": ...}, {"params": [...],
        "lr": head_lr, "weight_decay": ...}]`` with each group's ``"name"`` (``encoder``,
        ``head``) and empty groups left out; pass it to any ``torch.optim`` optimizer.

    Raises:
        ValueError: unknown ``mode``.
        AttributeError: ``network`` has no ``.encoder``.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown finetune mode {mode!r}; choose one of {list(FINETUNE_MODES)}")
    target = getattr(network, "module", network)
    if not hasattr(target, "encoder"):
        raise AttributeError(f"{type(target).__name__} has no .encoder to fine-tune")
    encoder = target.encoder

    if mode == "lora" and not lora_parameters(encoder):
        apply_lora(encoder, lora_rank)
    encoder_ids = {id(p) for p in encoder.parameters()}
    adapter_ids = {id(p) for p in lora_parameters(encoder)}
    head = [p for p in target.parameters() if id(p) not in encoder_ids]
    for p in head:
        p.requires_grad_(True)

    # Task forwards never mask patches, so the pretraining mask token gets no gradient; DDP
    # refuses a trainable parameter that takes no part in the loss. It stays frozen (and saved).
    mask_token = getattr(encoder, "mask_token", None)
    unused = {id(mask_token)} if isinstance(mask_token, nn.Parameter) else set()
    if mode == "full":
        for p in encoder.parameters():
            p.requires_grad_(id(p) not in unused)
        encoder_params = [p for p in encoder.parameters() if id(p) not in unused]
        head_params = head
    elif mode == "frozen":
        for p in encoder.parameters():
            p.requires_grad_(False)
        encoder_params = []
        head_params = head
    else:  # lora
        for p in encoder.parameters():
            p.requires_grad_(id(p) in adapter_ids)
        encoder_params = []
        head_params = [p for p in encoder.parameters() if id(p) in adapter_ids] + head

    groups = [
        {"name": "encoder", "params": encoder_params, "lr": encoder_lr, "weight_decay": weight_decay},
        {"name": "head", "params": head_params, "lr": head_lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def ddp_wrap(network: nn.Module, device: torch.device, finetune_mode: str = "full", lora_rank: int = 8) -> nn.Module:
    """Wrap a task network in ``DistributedDataParallel`` for its fine-tuning mode.

    The mode is applied first (:func:`configure_finetuning`): DDP registers the parameters
    that require gradients when it is built, so LoRA adapters must already be in place and
    frozen weights already frozen. ``configure_finetuning`` called again on the wrapper
    (for the optimizer's param groups) finds them and changes nothing.
    """
    configure_finetuning(network, finetune_mode, lora_rank=lora_rank)
    device = torch.device(device)
    return nn.parallel.DistributedDataParallel(
        network, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
    )
