"""Samplers."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch order, sharded across DDP ranks, that can start in the middle of an epoch.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed at iteration
    ``k`` of epoch ``e`` (``set_epoch(e, start_batch=k)``) sees exactly the batches that an
    uninterrupted run would have seen next: no repeats, no skips.

    Args:
        data_source: the dataset (only its length is used).
        batch_size: per-process batch size (to turn a batch count into a sample count).
        shuffle: random order per epoch, else sequential.
        seed: base seed of the per-epoch permutation.
        num_replicas: DDP world size (default: from ``torch.distributed`` if initialised, else 1).
        rank: DDP rank (default: from ``torch.distributed``, else 0).

    ``len()`` is always the full per-process epoch, which is what Ignite's epoch length is
    computed from; a resumed epoch simply yields fewer samples.
    """

    def __init__(
        self,
        data_source: Sized,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = num_replicas or (torch.distributed.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside [0, {self.num_replicas})")
        self.data_size = len(data_source)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 1
        self.start_batch = 0
        self.num_samples = math.ceil(self.data_size / self.num_replicas)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (1-based, as Ignite counts) and the first batch to yield."""
        self.epoch = int(epoch)
        self.start_batch = max(0, int(start_batch))

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index list for ``epoch`` (padded by wrapping so ranks get equal shares)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.data_size, generator=generator).tolist()
        else:
            order = list(range(self.data_size))
        total = self.num_samples * self.num_replicas
        order = (order * math.ceil(total / max(1, len(order))))[:total]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        return iter(indices[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state.get("epoch", self.epoch))
