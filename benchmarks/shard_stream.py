"""Pretraining input: WebDataset shards streamed (``ShardStream``) against the file-per-image datalist.

Both read the same curated-style corpus (phantom ultrasound, 8-bit grey PNG at ``--size``, what
``echocare curate`` writes) in one process (``num_workers=0``: the main process does what one
DataLoader worker does, collation included), to decoded ``(3, H, W)`` batches of ``--batch-size``:

* ``datalist``: MONAI ``Dataset`` over ``{"image": path}`` items with ``LoadUltrasoundd``, MONAI's
  ``DataLoader`` (one file opened per image);
* ``shards``: ``ShardStream`` over the same images in tar shards of ``--shard-size`` (sequential
  reads of a few large files, a shuffle buffer of 1000).

Each rate is the best of ``--repeats`` passes after a first pass that warms the page cache. The
JSON (``--out``): ``datalist_images_per_s_per_worker``, ``shards_images_per_s_per_worker``,
``ratio`` (shards over datalist), ``images_equal`` (both passes gave the same images) and the
settings. ``--quick`` (24 images, one pass) checks the images and the keys for the test suite;
its rates mean nothing.

Usage: ``python benchmarks/shard_stream.py --out FILE [--quick] [--n 512] [--size 256]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _corpus(folder: Path, n: int, size: int, shard_size: int) -> tuple[list[dict[str, str]], Path]:
    """``n`` phantom PNGs, as a datalist and as shards; returns (items, shards.json)."""
    from echocare.datasets.shards import write_index, write_shard
    from echocare.phantoms import generate_demo_data

    generate_demo_data("pretrain", folder / "files", n=n, seed=0, image_size=size)
    datalist = json.loads((folder / "files" / "datalist.json").read_text())
    items = [{"image": str(folder / "files" / item["image"])} for split in ("training", "validation") for item in datalist[split]]
    (folder / "corpus" / "shards").mkdir(parents=True)
    records = []
    for number, start in enumerate(range(0, len(items), shard_size)):
        chunk = items[start:start + shard_size]
        keys = [Path(item["image"]).stem for item in chunk]
        write_shard(folder / "corpus" / "shards" / f"shard-{number:06d}.tar",
                    [(k, Path(item["image"]).read_bytes(), {"anatomy": None, "source": "phantom"}) for k, item in zip(keys, chunk)])
        records.append({"name": f"shard-{number:06d}.tar", "split": "training", "keys": keys})
    return items, write_index(folder / "corpus", records, {}, {"shard_size": shard_size})


def _pass(loader) -> tuple[float, dict[str, float]]:
    """Seconds for one pass, and each image's pixel sum by its file stem (the correctness check)."""
    sums: dict[str, float] = {}
    start = time.perf_counter()
    for batch in loader:
        names = batch["sample_key"] if "sample_key" in batch else [Path(m).stem for m in batch["image"].meta["filename_or_obj"]]
        for name, image in zip(names, batch["image"]):
            sums[str(name)] = float(image.sum())
    return time.perf_counter() - start, sums


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    n, repeats, shard_size = (24, 1, 8) if args.quick else (args.n, args.repeats, args.shard_size)

    from monai.data import DataLoader, Dataset

    from echocare.datasets import ShardStream
    from echocare.io import LoadUltrasoundd

    with tempfile.TemporaryDirectory() as tmp:
        items, index = _corpus(Path(tmp), n, args.size, shard_size)
        datalist = DataLoader(Dataset(items, LoadUltrasoundd(keys="image")), batch_size=args.batch_size, num_workers=0)
        stream = ShardStream(index, batch_size=args.batch_size, num_workers=0, seed=0)
        shards = DataLoader(stream, batch_size=None, num_workers=0)
        rates, sums = {}, {}
        for name, loader in (("datalist", datalist), ("shards", shards)):
            _, sums[name] = _pass(loader)  # warms the page cache
            best = min(_pass(loader)[0] for _ in range(repeats))
            rates[name] = len(items) / best
    result = {
        "images": len(items), "image_size": args.size, "batch_size": args.batch_size, "shard_size": shard_size,
        "datalist_images_per_s_per_worker": rates["datalist"], "shards_images_per_s_per_worker": rates["shards"],
        "ratio": rates["shards"] / rates["datalist"],
        "images_equal": sums["datalist"] == sums["shards"] and len(sums["shards"]) == len(items),
        "quick": bool(args.quick),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["images_equal"] else 1)
