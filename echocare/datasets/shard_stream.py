"""Streaming WebDataset shards into training: :class:`ShardStream`.

``echocare curate --format webdataset`` writes tar shards and their index ``shards.json`` (see
:mod:`echocare.datasets.shards`). :class:`ShardStream` reads one split of them with the
``webdataset`` library, for a corpus too large for a datalist held in memory:

- **split by shard**: shard ``i`` of the split (in the index's order) goes to process (DDP rank)
  ``i % world_size``; a rank's shards go round-robin to its DataLoader workers. The assignment is
  fixed for the run, so each rank's step count is too (what Ignite's ``epoch_length`` needs);
- **seeded per-epoch order**: each worker reads its shards in an order drawn from ``(seed, epoch,
  rank, worker)`` through a shuffle buffer seeded the same way; the same seed gives the same
  order, another epoch another one;
- **every sample once per epoch** over all ranks, with no padding or duplicate; no list of the
  samples is ever built (only the per-shard sample counts of the index are held);
- **equal step counts**: ranks rarely hold equal numbers of samples, so each cannot simply take the
  steps its own samples fill (DDP would wait forever for the rank that stopped first). Each worker
  batches its own samples (at most ``batch_size`` each, as a DataLoader would), and every rank takes
  the step count of the rank with the most; a rank with fewer samples splits them into more,
  smaller batches (never padded, never repeated; within a worker sizes differ by at most one);
- **mid-epoch resume**: the batch order is a pure function of the seed, the epoch and the layout
  (DataLoader workers are interleaved round-robin, the order ``torch`` keeps with ``in_order``),
  so :meth:`ShardStream.set_epoch` with ``start_batch=k`` skips exactly the samples of the ``k``
  batches an uninterrupted run consumed (read, not decoded), as
  :class:`~echocare.datasets.ResumableSampler` does for datalists.

The dataset yields whole batches, each as a list of sample dicts; use it with
``DataLoader(stream, batch_size=None)`` and MONAI's ``list_data_collate`` (MONAI's DataLoader
default) collating each list in the worker. ``len(stream)`` is this rank's number of batches.
"""

from __future__ import annotations

import bisect
import heapq
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import MetaKeys
from torch.utils.data import IterableDataset, get_worker_info

from echocare.datasets.shards import SPLITS
from echocare.errors import EchoCareError

__all__ = ["ShardIndexError", "ShardStream", "StreamPlan", "decode_png", "load_shard_index"]


class ShardIndexError(EchoCareError, ValueError):
    """A ``shards.json`` (or a shard it lists) that cannot be streamed: the message starts with the file."""


def load_shard_index(path: str | os.PathLike[str], split: str) -> list[tuple[Path, int]]:
    """The ``(shard file, sample count)`` of every shard of ``split`` in the index ``path``, in order.

    Raises:
        ShardIndexError: a missing or malformed index, an unknown or empty split, a listed shard
            that is missing.
    """
    index_path = Path(path)
    if split not in SPLITS:
        raise ShardIndexError(f"{index_path}: unknown split {split!r} (one of {', '.join(SPLITS)})")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardIndexError(f"{index_path}: not found (echocare curate --format webdataset writes OUT/shards.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardIndexError(f"{index_path}: not a readable shards.json ({error})") from None
    entries = index.get(split) if isinstance(index, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e and "samples" in e for e in entries):
        raise ShardIndexError(f"{index_path}: no {split!r} list of {{\"path\", \"samples\"}} shards (not a shards.json?)")
    out = []
    for entry in entries:
        shard = index_path.parent / str(entry["path"])
        if not shard.is_file():
            raise ShardIndexError(f"{index_path}: shard {entry['path']} is listed but {shard} does not exist")
        if int(entry["samples"]) > 0:
            out.append((shard, int(entry["samples"])))
    if not out:
        raise ShardIndexError(f"{index_path}: no {split} samples")
    return out


def decode_png(png: bytes, name: str = "") -> MetaTensor:
    """A curated PNG's bytes -> ``(3, H, W)`` float32 in [0, 1], grey repeated to three channels:
    the values and metadata ``LoadUltrasoundd(frames="first")`` gives for the same file on disk."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        # curation writes 8-bit grey or RGB; anything else goes through Pillow's RGB conversion
        arr = np.asarray(img if img.mode == "L" else img.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    chw = np.repeat(arr[None], 3, axis=0) if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
    affine = torch.diag(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    meta = {
        "filename_or_obj": name,
        MetaKeys.SPATIAL_SHAPE: np.asarray(chw.shape[1:]),
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
        MetaKeys.AFFINE: affine,
        MetaKeys.ORIGINAL_AFFINE: affine.clone(),
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(chw)), meta=meta)


@dataclass(frozen=True)
class StreamPlan:
    """Which shards each DataLoader worker of one rank reads and how its samples are batched.

    Attributes:
        shards: per worker, the ``(shard file, sample count)`` it reads (before the epoch's shuffle).
        batches: per worker, its batch sizes in order (each >= 1); they sum to the worker's samples.
        steps: this rank's number of batches per epoch (the sum of the workers' batch counts).
    """

    shards: tuple[tuple[tuple[Path, int], ...], ...]
    batches: tuple[tuple[int, ...], ...]
    steps: int

    @classmethod
    def build(cls, shards: Sequence[tuple[Path, int]], batch_size: int, rank: int, world_size: int,
              num_workers: int, equal_steps: bool, source: str = "") -> StreamPlan:
        """The plan of ``rank`` for a split's ``shards`` (see the module docstring for the rules).

        Raises:
            ShardIndexError: fewer shards than ranks, or a rank with fewer samples than the common
                step count (``source`` heads the message).
        """
        if len(shards) < world_size:
            raise ShardIndexError(f"{source}: {len(shards)} shards cannot feed {world_size} processes "
                                  "(curate with a smaller --shard-size, or run fewer processes)")
        # Each worker batches its own samples (at most batch_size each): a rank's natural step count.
        workers_of = [max(1, min(int(num_workers), len(shards[r::world_size]))) for r in range(world_size)]
        counts_of = [[sum(n for _, n in shards[r::world_size][w::workers_of[r]]) for w in range(workers_of[r])]
                     for r in range(world_size)]
        natural = [sum(math.ceil(n / batch_size) for n in counts) for counts in counts_of]
        steps = max(natural) if equal_steps else natural[rank]
        short = [r for r in range(world_size) if sum(counts_of[r]) < steps] if equal_steps else []
        if short:
            raise ShardIndexError(
                f"{source}: process {short[0]} holds {sum(counts_of[short[0]])} samples, fewer than the {steps} "
                "steps every process takes (curate with a smaller --shard-size, or run fewer processes)")
        workers, counts = workers_of[rank], counts_of[rank]
        by_worker = [tuple(shards[rank::world_size][w::workers]) for w in range(workers)]
        # A rank with fewer samples takes as many steps as the others: each extra batch goes to the
        # worker whose batches are the largest (a batch never exceeds batch_size nor is empty).
        per_worker = [math.ceil(n / batch_size) for n in counts]
        heap = [(-counts[w] / per_worker[w], w) for w in range(workers) if per_worker[w] < counts[w]]
        heapq.heapify(heap)
        for _ in range(steps - sum(per_worker)):
            _, w = heapq.heappop(heap)
            per_worker[w] += 1
            if per_worker[w] < counts[w]:
                heapq.heappush(heap, (-counts[w] / per_worker[w], w))
        batches = tuple(_even_split(counts[w], per_worker[w]) for w in range(workers))
        padding = int(num_workers) - workers  # workers beyond the plan's read nothing
        return cls(tuple(by_worker) + ((),) * max(0, padding), batches + ((),) * max(0, padding), steps)

    def resume_point(self, batches_done: int) -> tuple[list[int], int]:
        """Where the rank's batch sequence stands after its first ``batches_done`` batches: per worker
        how many of its batches were among them, and the worker that gives the next batch.

        The DataLoader takes batches from its workers round-robin in worker order, skipping a worker
        once it is exhausted, so after ``t`` full rounds worker ``w`` gave ``min(len_w, t)``.
        """
        lengths = [len(b) for b in self.batches]
        done = max(0, min(int(batches_done), self.steps))
        # the largest number of full rounds t with sum(min(len_w, t)) <= done
        low, high = 0, max(lengths, default=0)
        while low < high:
            middle = (low + high + 1) // 2
            if sum(min(n, middle) for n in lengths) <= done:
                low = middle
            else:
                high = middle - 1
        out = [min(n, low) for n in lengths]
        extra = done - sum(out)
        last = max((w for w, n in enumerate(lengths) if n >= low), default=-1) if low else -1  # served the last full round
        for w, n in enumerate(lengths):
            if extra and n > low:
                out[w] += 1
                extra -= 1
                last = w
        return out, (last + 1) % max(1, len(lengths))


def _even_split(total: int, parts: int) -> tuple[int, ...]:
    """``total`` samples as ``parts`` batch sizes differing by at most one, the larger first."""
    base, larger = divmod(total, parts)
    return tuple(base + 1 if i < larger else base for i in range(parts))


class ShardStream(IterableDataset):
    """One split of a ``shards.json`` as an iterable of batches, each a list of sample dicts.

    Each sample dict holds:

    - ``image``: ``MetaTensor`` ``(3, H, W)`` float32 in [0, 1] (the curated PNG, grey repeated),
      before ``transform``;
    - ``anatomy``: the anatomy path ``"region/organ/structure"`` (any depth), ``""`` when unlabelled
      (as ``AnatomyLabeld`` writes it; a ``None`` would not collate);
    - ``source``: the source label curation recorded;
    - ``sample_key``: the sample's key in its shard (24 hex digits, unique in the corpus);

    then whatever ``transform`` makes of it (the bundle's resize, anatomy labels and augmentation).

    Args:
        index: path of ``shards.json``; shard paths in it are relative to its folder.
        split: ``"training"`` or ``"validation"``.
        transform: applied to each sample dict in the DataLoader worker (e.g. a MONAI ``Compose``).
        batch_size: per-process batch size, the largest batch (a rank with fewer samples than the
            others takes smaller ones, see the module docstring).
        num_workers: the DataLoader's ``num_workers`` (the plan depends on it; checked in the workers).
        shuffle: seeded per-epoch shard order and shuffle buffer (training), else the index's order.
        buffer_size: samples held by each worker's shuffle buffer (their PNG bytes only).
        seed: base seed of the per-epoch order.
        equal_steps: every rank takes the same number of steps (training under DDP); validation can
            leave ranks unequal.
        num_replicas, rank: DDP world size and rank (default: from ``torch.distributed``, else 1, 0).

    Raises:
        ShardIndexError: see :func:`load_shard_index` and :meth:`StreamPlan.build`.
    """

    def __init__(
        self,
        index: str | os.PathLike[str],
        split: str = "training",
        transform: Callable[[dict[str, Any]], Any] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1000,
        seed: int = 0,
        equal_steps: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = int(num_replicas or (torch.distributed.get_world_size() if distributed else 1))
        self.rank = int(rank if rank is not None else (torch.distributed.get_rank() if distributed else 0))
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside [0, {self.num_replicas})")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.index = str(index)
        self.split = split
        self.transform = transform
        self.batch_size = int(batch_size)
        self.num_workers = max(0, int(num_workers))
        self.shuffle = bool(shuffle)
        self.buffer_size = max(1, int(buffer_size))
        self.seed = int(seed)
        shards = load_shard_index(index, split)
        #: samples of the split over all ranks
        self.num_samples = sum(n for _, n in shards)
        self.num_shards = len(shards)
        self.plan = StreamPlan.build(shards, self.batch_size, self.rank, self.num_replicas, max(1, self.num_workers),
                                     bool(equal_steps), source=self.index)
        self.epoch = 1
        self.start_batch = 0
        self._resumed_layout: dict[str, int] | None = None

    # ---- the protocol of ResumableSampler (SamplerEpochSetter, checkpoints) --------------------

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (1-based, as Ignite counts) and how many of its batches are already done.

        Raises:
            ShardIndexError: resuming mid-epoch from a checkpoint taken with another layout (processes,
                workers, batch size or shards), whose consumed samples cannot be told apart.
        """
        self.epoch = int(epoch)
        self.start_batch = max(0, int(start_batch))
        if self.start_batch and self._resumed_layout is not None and self._resumed_layout != self.layout():
            raise ShardIndexError(
                f"{self.index}: cannot resume in the middle of epoch {self.epoch}: the checkpoint streamed it as "
                f"{_describe(self._resumed_layout)}, this run as {_describe(self.layout())}; resume with the same "
                "settings (or from an end-of-epoch checkpoint)")

    def layout(self) -> dict[str, int]:
        """What the batch order depends on besides the seed and the epoch."""
        return {"world_size": self.num_replicas, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "shards": self.num_shards, "samples": self.num_samples, "buffer_size": self.buffer_size}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "shuffle": self.shuffle, "layout": self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state.get("epoch", self.epoch))
        self._resumed_layout = {k: int(v) for k, v in state.get("layout", {}).items()} or None

    # ---- iteration -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """This rank's batches per epoch (a resumed epoch yields fewer)."""
        return self.plan.steps

    def _rng(self, worker: int, purpose: int) -> random.Random:
        words = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, purpose]).generate_state(2)
        return random.Random(int(words[0]) << 32 | int(words[1]))

    def raw_samples(self, worker: int) -> Iterator[dict[str, Any]]:
        """Worker ``worker``'s samples of this epoch in order, undecoded (``__key__``, ``png``, ``json``)."""
        import webdataset as wds

        shards = [str(path) for path, _ in self.plan.shards[worker]]
        if self.shuffle:
            self._rng(worker, 0).shuffle(shards)
        stages: list[Any] = [wds.SimpleShardList(shards), wds.tarfile_to_samples()]
        if self.shuffle:
            stages.append(wds.shuffle(self.buffer_size, initial=self.buffer_size, rng=self._rng(worker, 1)))
        return iter(wds.DataPipeline(*stages))

    def _sample(self, raw: dict[str, Any]) -> Any:
        meta = json.loads(raw["json"])
        name = f"{raw.get('__url__', self.index)}/{raw['__key__']}"
        sample = {"image": decode_png(raw["png"], name), "anatomy": meta.get("anatomy") or "",
                  "source": str(meta.get("source", "")), "sample_key": raw["__key__"]}
        return self.transform(sample) if self.transform is not None else sample

    def __iter__(self) -> Iterator[list[Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 0)
        if workers != self.num_workers:
            raise RuntimeError(f"{self.index}: ShardStream planned for num_workers={self.num_workers} "
                               f"but the DataLoader runs {workers}; pass the same num_workers to both")
        # A resumed DataLoader starts its round-robin at worker 0, where the interrupted one would have
        # gone on with worker `first`: worker i plays the plan's worker first + i, so the batches come
        # in the uninterrupted order.
        consumed, first = self.plan.resume_point(self.start_batch)
        worker = (first + worker) % max(1, self.num_workers)
        sizes = self.plan.batches[worker]
        if not sizes:
            return
        skip_batches = consumed[worker]
        skip = sum(sizes[:skip_batches])
        ends = set(np.cumsum(sizes).tolist())
        total = sum(sizes)
        batch: list[Any] = []
        read = 0
        for raw in self.raw_samples(worker):
            read += 1
            if read > total:
                break
            if read <= skip:
                continue  # consumed before the resume: read through the buffer, never decoded
            batch.append(self._sample(raw))
            if read in ends:
                yield batch
                batch = []
        if read != total:
            raise ShardIndexError(f"{self.index}: worker {worker} of rank {self.rank} found {read} or more samples in its "
                                  f"shards, which shards.json lists with {total} (a shard changed since it was written)")


def _describe(layout: dict[str, int]) -> str:
    return (f"{layout.get('world_size')} process(es) x {layout.get('num_workers')} worker(s), batch "
            f"{layout.get('batch_size')}, {layout.get('shards')} shards of {layout.get('samples')} samples, "
            f"buffer {layout.get('buffer_size')}")
