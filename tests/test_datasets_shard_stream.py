"""ShardStream: WebDataset shards streamed into training, split by shard across processes and
workers, in a seeded per-epoch order, every sample once per epoch, resumable mid-epoch; two gloo
processes under DDP see every sample exactly once between them and neither hangs."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from PIL import Image

from echocare.datasets import ShardIndexError, ShardStream
from echocare.datasets.shard_stream import StreamPlan, decode_png
from echocare.datasets.shards import write_index, write_shard
from echocare.io import LoadUltrasoundd

#: Shard sizes of the test corpus: unequal, as curation leaves the last shard of a split.
TRAIN_SHARDS = (7, 7, 7, 7, 3)


def _png(value: int, mode: str = "L", side: int = 8) -> bytes:
    """A small PNG whose pixels say which sample it is (value, value + 1, ...)."""
    grey = (np.arange(side * side).reshape(side, side) + value) % 256
    arr = grey.astype(np.uint8) if mode == "L" else np.stack([grey, 255 - grey, grey // 2], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def make_shards(out: Path, train: tuple[int, ...] = TRAIN_SHARDS, validation: tuple[int, ...] = (3,)) -> tuple[Path, list[str]]:
    """Shards of distinct samples as curation writes them; returns shards.json and the training keys."""
    (out / "shards").mkdir(parents=True)
    records, anatomy, train_keys, number = [], {}, [], 0
    for split, sizes in (("training", train), ("validation", validation)):
        for size in sizes:
            keys = [f"{number:06d}{i:018x}" for i in range(size)]
            samples = [(k, _png(number * 16 + i), {"anatomy": "thorax/heart" if i % 2 else None, "source": "test"})
                       for i, k in enumerate(keys)]
            write_shard(out / "shards" / f"shard-{number:06d}.tar", samples)
            records.append({"name": f"shard-{number:06d}.tar", "split": split, "keys": keys})
            anatomy.update({k: meta["anatomy"] for k, _, meta in samples})
            train_keys += keys if split == "training" else []
            number += 1
    return write_index(out, records, anatomy, {"shard_size": max(train)}), train_keys


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    return make_shards(tmp_path_factory.mktemp("shards"))


def batches(stream: ShardStream, epoch: int, start_batch: int = 0) -> list[list[str]]:
    """The sample keys of each batch the DataLoader yields for ``epoch`` (from ``start_batch``)."""
    stream.set_epoch(epoch, start_batch=start_batch)
    loader = DataLoader(stream, batch_size=None, num_workers=stream.num_workers)
    return [list(batch["sample_key"]) for batch in loader]


def test_decoded_sample_equals_the_file_reader(tmp_path):
    """A shard's PNG gives the tensor LoadUltrasoundd reads from the same file (grey and RGB)."""
    for mode in ("L", "RGB"):
        png = _png(40, mode, side=16)
        (tmp_path / f"{mode}.png").write_bytes(png)
        from_file = LoadUltrasoundd(keys="image")({"image": str(tmp_path / f"{mode}.png")})["image"]
        decoded = decode_png(png)
        assert decoded.shape == from_file.shape == (3, 16, 16)
        assert torch.equal(decoded.as_tensor(), from_file.as_tensor())
        assert torch.equal(decoded.affine, from_file.affine)


def test_every_sample_once_per_epoch_in_a_seeded_order(corpus):
    index, keys = corpus
    stream = ShardStream(index, batch_size=4, num_workers=2, buffer_size=8, seed=3)
    first = batches(stream, 1)
    assert len(first) == len(stream) == 9  # each worker batches its own: ceil(17 / 4) + ceil(14 / 4)
    seen = [k for b in first for k in b]
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen)) == 31
    assert all(1 <= len(b) <= 4 for b in first)
    second = [k for b in batches(stream, 2) for k in b]
    assert sorted(second) == sorted(keys) and second != seen  # another epoch, another order
    again = ShardStream(index, batch_size=4, num_workers=2, buffer_size=8, seed=3)
    assert batches(again, 1) == first  # the same seed repeats it
    other = ShardStream(index, batch_size=4, num_workers=2, buffer_size=8, seed=4)
    assert [k for b in batches(other, 1) for k in b] != seen
    # the shuffle buffer mixes samples across shards: not shard after shard
    assert any(b[0][:6] != b[-1][:6] for b in first)


def test_sample_dict_holds_the_decoded_image_and_labels(corpus):
    index, _ = corpus
    stream = ShardStream(index, split="validation", batch_size=2, num_workers=0, shuffle=False, equal_steps=False)
    stream.set_epoch(1)
    samples = [s for batch in stream for s in batch]
    assert [s["anatomy"] for s in samples] == ["", "thorax/heart", ""]
    assert [s["source"] for s in samples] == ["test"] * 3
    assert samples[1]["image"].shape == (3, 8, 8)
    assert samples[1]["image"][0, 0, 0].item() == pytest.approx((5 * 16 + 1) / 255)  # shard 5, its sample 1


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(corpus, num_workers):
    index, _ = corpus
    stream = ShardStream(index, batch_size=3, num_workers=num_workers, buffer_size=5, seed=1)
    full = batches(stream, 2)
    for done in (1, 4, len(full) - 1, len(full)):
        restored = ShardStream(index, batch_size=3, num_workers=num_workers, buffer_size=5, seed=0)
        restored.load_state_dict(stream.state_dict())  # the seed comes from the checkpoint
        assert batches(restored, 2, start_batch=done) == full[done:]


def test_resume_mid_epoch_with_another_layout_is_refused(corpus):
    index, _ = corpus
    saved = ShardStream(index, batch_size=4, num_workers=2).state_dict()
    other = ShardStream(index, batch_size=4, num_workers=1)
    other.load_state_dict(saved)
    other.set_epoch(3, start_batch=0)  # at an epoch boundary any layout is fine
    with pytest.raises(ShardIndexError, match=r"shards\.json: cannot resume in the middle of epoch 3: .*2 worker"):
        other.set_epoch(3, start_batch=2)


def test_plan_gives_every_rank_the_same_steps_without_padding(corpus):
    index, _ = corpus
    from echocare.datasets.shard_stream import load_shard_index

    shards = load_shard_index(index, "training")  # 7, 7, 7, 7, 3: rank 0 holds 17, rank 1 14
    plans = [StreamPlan.build(shards, 4, rank, 2, 2, equal_steps=True) for rank in (0, 1)]
    assert [p.steps for p in plans] == [5, 5]  # ceil(17 / 4) for both
    assert [sum(map(sum, p.batches)) for p in plans] == [17, 14]
    assert all(max(max(b) for b in p.batches if b) <= 4 for p in plans)
    unequal = [StreamPlan.build(shards, 4, rank, 2, 2, equal_steps=False) for rank in (0, 1)]
    assert [p.steps for p in unequal] == [5, 4]
    # consumed batches per worker follow the DataLoader's round-robin: 3 and 2 batches -> 0,1,0,1,0
    plan = StreamPlan(shards=((), ()), batches=((1, 1, 1), (1, 1)), steps=5)
    assert [plan.resume_point(k) for k in range(6)] == [
        ([0, 0], 0), ([1, 0], 1), ([1, 1], 0), ([2, 1], 1), ([2, 2], 0), ([3, 2], 1)]


def test_bad_indexes_are_refused_naming_the_file(corpus, tmp_path):
    index, _ = corpus
    with pytest.raises(ShardIndexError, match=r"shards\.json: 1 shards cannot feed 2 processes"):
        ShardStream(index, split="validation", num_replicas=2, rank=0)
    with pytest.raises(ShardIndexError, match=rf"^{tmp_path / 'none.json'}: not found"):
        ShardStream(tmp_path / "none.json")
    broken = tmp_path / "broken" / "shards.json"
    broken.parent.mkdir()
    broken.write_text(json.dumps({"training": [{"path": "shards/shard-000000.tar", "samples": 3}], "validation": []}))
    with pytest.raises(ShardIndexError, match=r"shard shards/shard-000000\.tar is listed but .* does not exist"):
        ShardStream(broken)


# --- two gloo processes under DDP -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_process(rank: int, index: str, log_dir: str, port: int) -> None:
    """One DDP rank: streams its shards through a DataLoader worker and trains a linear model."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stream = ShardStream(index, batch_size=4, num_workers=1, buffer_size=6, seed=5)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        log = []
        for epoch in (1, 2):
            stream.set_epoch(epoch)
            steps = 0
            for batch in DataLoader(stream, batch_size=None, num_workers=1):
                loss = model(batch["image"].as_tensor().mean(dim=(2, 3))).square().mean()
                optimizer.zero_grad()
                loss.backward()  # an all-reduce: a rank with an extra step would wait here forever
                optimizer.step()
                log += [{"epoch": epoch, "key": k} for k in batch["sample_key"]]
                steps += 1
            log.append({"epoch": epoch, "steps": steps})
        Path(log_dir, f"rank{rank}.json").write_text(json.dumps(log))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_see_every_sample_exactly_once(corpus, tmp_path):
    index, keys = corpus
    context = torch.multiprocessing.start_processes(
        _ddp_process, args=(str(index), str(tmp_path), _free_port()), nprocs=2, join=False, start_method="fork")
    deadline = 240
    import time

    start = time.time()
    while not context.join(timeout=5):
        if time.time() - start > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank hung (unequal step counts under DDP)")
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (1, 2):
        seen = [e["key"] for log in logs for e in log if e.get("epoch") == epoch and "key" in e]
        assert sorted(seen) == sorted(keys), f"epoch {epoch}: the ranks together saw {len(seen)} of {len(keys)}"
        mine = [{e["key"] for e in log if e.get("epoch") == epoch and "key" in e} for log in logs]
        assert not mine[0] & mine[1] and len(mine[0]) == 17 and len(mine[1]) == 14  # shards 0, 2, 4 vs 1, 3
        assert [e["steps"] for log in logs for e in log if e.get("epoch") == epoch and "steps" in e] == [5, 5]
