"""WebDataset tar shards: the storage between curation and training at scale.

``echocare curate --format webdataset --shard-size N`` writes ``OUT/shards/shard-000000.tar``,
``shard-000001.tar``, ... and the index ``OUT/shards.json``. A shard holds N samples (the last
of each split fewer), each two tar members in WebDataset's layout (the layout of
``webdataset.TarWriter``, which writes them): ``<key>.json`` then ``<key>.png``, where ``<key>`` is
the sample's opaque name (24 hex digits, as ``images/<key>.png`` in the ``images`` format), the PNG
the curated image (uint8, ``size`` x ``size``, grey or RGB) and the JSON
``{"anatomy": "region/organ/structure" or null, "source": "<source label>"}``.

A shard holds one split only: ``training`` and ``validation`` samples go to separate shards.
Shards are committed atomically: written under a temporary name in the same folder, fsync'ed, then
renamed, so a reader (and the index) never sees a half-written shard.

``shards.json``::

    {"format": "webdataset",
     "training":   [{"path": "shards/shard-000000.tar", "samples": 64, "anatomy": {"thorax/heart": 40, ...}}, ...],
     "validation": [...],
     "samples": {"training": 640, "validation": 12},
     "anatomy": {"training": {...}, "validation": {...}},
     "settings": {...the curation settings...}}

Shard paths are relative to the folder of ``shards.json``; ``"anatomy"`` counts samples by
anatomy path (``"(none)"`` for samples without one).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["SHARDS_FOLDER", "INDEX", "SPLITS", "shard_name", "shard_number", "ShardSink", "read_shard",
           "write_shard", "remove_open_shards", "write_index"]

SHARDS_FOLDER = "shards"
INDEX = "shards.json"
SPLITS = ("training", "validation")
_SHARD = re.compile(r"^shard-(\d{6,})\.tar$")
#: The temporary file of an open (not yet committed) shard: ``.<split>.<pid>.tar.tmp``.
_OPEN_SHARD = re.compile(r"^\.(training|validation)\.\d+\.tar\.tmp$")
#: Tar member metadata fixed so that the same samples give the same bytes (resume = uninterrupted run).
_TAR_OPTIONS = {"encoder": False, "mtime": 0.0, "user": "echocare", "group": "echocare", "mode": 0o444}


def shard_name(number: int) -> str:
    """File name of shard ``number``: ``shard-000042.tar``."""
    return f"shard-{int(number):06d}.tar"


def shard_number(name: str) -> int:
    """The number in a shard's file name (inverse of :func:`shard_name`)."""
    match = _SHARD.match(name)
    if match is None:
        raise ValueError(f"{name}: not a shard name (shard-NNNNNN.tar)")
    return int(match.group(1))


def _tar_writer(fh: Any) -> Any:
    from webdataset import TarWriter

    return TarWriter(fh, **_TAR_OPTIONS)


def _sample(key: str, png: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    return {"__key__": key, "png": png, "json": json.dumps(meta, sort_keys=True).encode()}


def _commit_file(tmp: Path, final: Path) -> None:
    """Rename the fsync'ed ``tmp`` to ``final`` and fsync the folder, so the rename survives a crash."""
    os.replace(tmp, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: Path, samples: Iterable[tuple[str, bytes, dict[str, Any]]]) -> int:
    """Write ``(key, png bytes, meta)`` samples as the shard ``path``, atomically; returns the count."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    with open(tmp, "wb") as fh:
        writer = _tar_writer(fh)
        for key, png, meta in samples:
            writer.write(_sample(key, png, meta))
            count += 1
        writer.close()
        fh.flush()
        os.fsync(fh.fileno())
    _commit_file(tmp, path)
    return count


def read_shard(path: Path) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """The ``(key, png bytes, meta)`` samples of a shard, in order."""
    current: dict[str, Any] = {}
    key = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, ext = member.name.split(".", 1)
            if stem != key and key is not None:
                yield key, current["png"], json.loads(current["json"])
                current = {}
            key = stem
            current[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, current["png"], json.loads(current["json"])


def remove_open_shards(folder: Path) -> None:
    """Remove the temporary files of shards a killed run left open (only names this module writes)."""
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        stale = [e.path for e in entries if _OPEN_SHARD.match(e.name) or
                 (e.name.startswith(".shard-") and e.name.endswith(".tmp"))]
    for path in stale:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class ShardSink:
    """The driver's shard writer: one open shard per split, committed every ``shard_size`` samples.

    Samples are appended to the open shard's temporary file as they are decided (in input order);
    when it holds ``shard_size`` samples it is closed, fsync'ed, renamed to the next
    ``shard-NNNNNN.tar`` and then ``on_commit(name, split, keys)`` is called (curation journals the
    shard there). :meth:`close` commits the partial shards (end of the run).
    """

    def __init__(self, folder: Path, shard_size: int, next_number: int,
                 on_commit: Callable[[str, str, list[str]], None]) -> None:
        self.folder = folder
        self.shard_size = int(shard_size)
        self.next_number = int(next_number)
        self.on_commit = on_commit
        self._open: dict[str, tuple[Any, Any, Path, list[str]]] = {}  # split -> (file, writer, tmp path, keys)
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, split: str, key: str, png: bytes, meta: dict[str, Any]) -> None:
        """Append one sample to ``split``'s open shard (``split`` in :data:`SPLITS`)."""
        if split not in self._open:
            tmp = self.folder / f".{split}.{os.getpid()}.tar.tmp"
            fh = open(tmp, "wb")
            self._open[split] = (fh, _tar_writer(fh), tmp, [])
        _, writer, _, keys = self._open[split]
        writer.write(_sample(key, png, meta))
        keys.append(key)
        if len(keys) >= self.shard_size:
            self._commit(split)

    def _commit(self, split: str) -> None:
        fh, writer, tmp, keys = self._open.pop(split)
        writer.close()
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        name = shard_name(self.next_number)
        self.next_number += 1
        _commit_file(tmp, self.folder / name)
        self.on_commit(name, split, keys)

    def close(self) -> None:
        """Commit every open shard (each holds at least one sample)."""
        for split in [s for s in SPLITS if s in self._open]:
            self._commit(split)

    def abandon(self) -> None:
        """Close and remove the open shards without committing them (the run failed)."""
        for fh, _, tmp, _ in self._open.values():
            fh.close()
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._open.clear()


def write_index(out_dir: Path, shards: list[dict[str, Any]], anatomy_of: dict[str, str | None],
                settings: dict[str, Any]) -> Path:
    """Write ``out_dir/shards.json`` atomically.

    Args:
        shards: ``{"name", "split", "keys"}`` of every non-empty shard, in shard-number order.
        anatomy_of: sample key -> anatomy path (or None).
        settings: the curation settings recorded in the index.
    """
    index: dict[str, Any] = {"format": "webdataset", **{s: [] for s in SPLITS}}
    totals = {s: Counter() for s in SPLITS}
    for shard in shards:
        counts = Counter(anatomy_of.get(k) or "(none)" for k in shard["keys"])
        totals[shard["split"]].update(counts)
        index[shard["split"]].append({"path": f"{SHARDS_FOLDER}/{shard['name']}", "samples": len(shard["keys"]),
                                      "anatomy": dict(sorted(counts.items()))})
    index["samples"] = {s: sum(e["samples"] for e in index[s]) for s in SPLITS}
    index["anatomy"] = {s: dict(sorted(totals[s].items())) for s in SPLITS}
    index["settings"] = settings
    path = out_dir / INDEX
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(index, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _commit_file(tmp, path)
    return path
