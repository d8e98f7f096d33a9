"""Curation: folders of mixed ultrasound sources -> a deduplicated pretraining set.

``echocare curate --src DIR [--src DIR ...] --mapping MAPPING.yaml --out OUT`` calls
:func:`curate`. The pipeline, for every *unit* (a still image, or one sampled frame of a
video, cine DICOM or multi-frame file):

1. decode it with :mod:`echocare.io.readers` (unreadable files are reported with the
   reason, and the run goes on);
2. drop it when blank (fewer than ``min_pixels`` non-zero pixels, or a single grey level)
   or binary (two grey levels or fewer: label masks stored beside the scans);
3. find the echo data (the largest bright connected region once thin text and UI lines
   are opened away; its convex hull, which follows a sector fan) and crop to it, masking
   the pixels outside the region (burned-in text, scale bars, logos);
4. drop exact duplicates (SHA-256 of the decoded pixels) and near duplicates (64-bit DCT
   perceptual hash of the cropped image within ``near_duplicate_threshold`` bits) of any
   unit already kept, in the sorted order of the inputs;
5. resize (aspect kept, zero padded) to ``size`` x ``size`` and write it under an opaque
   name, a hash of (source-relative path, frame index).

Outputs in ``OUT``: ``images/``, ``datalist.json`` (``training``/``validation`` lists of
``{"image", "anatomy"}``, paths relative to ``OUT``), ``report.json``, ``report.png``,
optionally ``overlays/`` (``overlay=True``) and ``progress.jsonl`` (the resume journal).

Determinism and resuming: the inputs are enumerated in a fixed order (sources in the
order given, entries of a folder sorted by name, zip members sorted, frames in order).
Workers decode, crop, hash and write images in parallel, but every keep/drop decision is
taken in the main process in that order, so the result does not depend on ``workers``.
Each decision is appended to ``OUT/progress.jsonl`` (flushed per line, fsync'ed every
``fsync_every`` lines); a rerun into the same ``OUT`` replays the journal (skipping
finished files and rebuilding the hash indices) and continues, so a run killed at any
point and rerun gives the same files as an uninterrupted one; a rerun with other settings
(sources, size, frame step, crop, limits, ...) is refused. ``datalist.json``,
``report.json`` and ``report.png`` are written at the end from the journal, atomically.

Memory stays flat as the input grows: files are enumerated lazily, frames are streamed,
only a bounded number of files is in flight, and the main process keeps only hashes.

Safety: curate writes only into a new or empty ``OUT``, or one holding its own journal
(a resume); an ``OUT`` that is, is inside or contains a source is refused
(:class:`CurationError`, one line ``"<OUT>: <problem>"``). The only files it removes are
outputs its journal records (a dropped unit's image, a killed worker's temporary file,
and with ``restart`` everything the old journal lists). One bad file never costs the
batch: unreadable files, symbolic link loops and zip members with unsafe names
(absolute, ``..``) are reported; a worker process that dies (killed, out of memory) has
its files retried once, each alone, and the file that kills its worker again is reported
as failed.

Privacy: nothing read from a DICOM other than pixels reaches any output. Output names
are hashes of the source-relative path and frame index; overlays show a flat colour
outside the echo region (no burned-in text survives). Reports name the user's own source
paths and the readers' error messages, never DICOM attributes; with
``hide_source_paths`` they (and the journal) name a file by
``sha256("<source folder name>/<path inside it>[!<zip member>]")[:16]`` instead, sources
by ``sha256(name)[:16]``, and error messages have the path replaced by that hash.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fnmatch
import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from echocare.datasets import shards
from echocare.errors import EchoCareError
from echocare.io.readers import DEFAULT_MAX_PIXELS, SUPPORTED_SUFFIXES, UltrasoundReadError, detect_format, iter_frames
from echocare.ontology import UnknownAnatomyError, load_ontology
from echocare.ray_cluster import require_ray

__all__ = [
    "curate",
    "CurationError",
    "load_mapping",
    "resolve_anatomy",
    "detect_echo_region",
    "crop_to_region",
    "perceptual_hash",
    "hamming",
    "HashIndex",
    "resize_pad",
    "opaque_name",
    "DEFAULT_OPTIONS",
]

logger = logging.getLogger(__name__)

#: Options :func:`curate` takes as keyword arguments (``--name value`` on the command line).
DEFAULT_OPTIONS: dict[str, Any] = {
    "near_duplicate_threshold": 6,  # max Hamming distance (bits of 64) of a near duplicate; <0 turns it off
    "overlay": False,  # write OUT/overlays/<name>.png: the detected region on the original
    "seed": 0,  # salt of the validation split
    "min_pixels": 1000,  # fewer non-zero pixels than this: blank
    "crop": True,  # crop to the echo region (False: keep the whole frame)
    "exclude": None,  # glob(s) of source-relative paths to leave out (e.g. "*/masks/*")
    "progress": True,  # tqdm progress bar on stderr
    "restart": False,  # discard an existing journal in OUT instead of resuming it
    "fsync_every": 64,  # journal lines between fsyncs
    "max_in_flight": 0,  # files queued to workers at once (0: 4 x workers)
    "hide_source_paths": False,  # outputs name source files by sha256("<source>/<path>")[:16], never by path
    "max_pixels": DEFAULT_MAX_PIXELS,  # larger frames (height x width) are refused from the header; "none": no limit
    "engine": "local",  # "local": a process pool on this machine; "ray": Ray tasks (echocare.datasets.curation_ray)
    "ray_address": None,  # engine ray: the cluster to join (host:port, ray://...); None: a local instance of `workers` CPUs
    "format": "images",  # "images": OUT/images + datalist.json; "webdataset": OUT/shards/*.tar + shards.json
    "shard_size": 1000,  # format webdataset: samples per shard
    "_delay": 0.0,  # seconds of sleep per file in the worker (tests of kill and resume)
}

JOURNAL = "progress.jsonl"
#: The journal of a run being discarded (``restart``): it lists the outputs still to remove.
_DISCARDED_JOURNAL = ".progress.jsonl.discarded"
_JOURNAL_VERSION = 1
#: Suffixes of files that are not images (documentation, tables, ...): listed as skipped.
_NOT_MEDIA = {".txt", ".csv", ".tsv", ".json", ".yaml", ".yml", ".md", ".rst", ".xml", ".html", ".htm",
              ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".py", ".ipynb", ".log", ".ini", ".cfg", ".pkl",
              ".npy", ".npz", ".h5", ".pt", ".pth", ".mat", ".sh"}
_DROP_REASONS = ("blank", "binary", "exact_duplicate", "near_duplicate")


class CurationError(EchoCareError, ValueError):
    """A problem with the curation inputs (sources, mapping, options, output folder): one line,
    ``"<file or folder>: <problem>"`` (the command prints it as ``error: ...`` and exits 2)."""


# --------------------------------------------------------------------------- options


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise CurationError(f"option {name}: expected true or false, got {value!r}")


def _options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        known = ", ".join(k for k in DEFAULT_OPTIONS if not k.startswith("_"))
        raise CurationError(f"unknown curate option(s) {', '.join(unknown)}; known: {known}")
    opts = {**DEFAULT_OPTIONS, **options}
    for name in ("overlay", "crop", "progress", "restart", "hide_source_paths"):
        opts[name] = _as_bool(opts[name], name)
    for name in ("near_duplicate_threshold", "seed", "min_pixels", "fsync_every", "max_in_flight", "shard_size"):
        try:
            opts[name] = int(opts[name])
        except (TypeError, ValueError):
            raise CurationError(f"option {name}: expected an integer, got {opts[name]!r}") from None
    if opts["near_duplicate_threshold"] > 32:
        raise CurationError("option near_duplicate_threshold: at most 32 bits (of 64)")
    opts["_delay"] = float(opts["_delay"])
    for name, allowed in (("engine", ("local", "ray")), ("format", ("images", "webdataset"))):
        opts[name] = str(opts[name]).strip().lower()
        if opts[name] not in allowed:
            raise CurationError(f"option {name}: expected one of {', '.join(allowed)}, got {opts[name]!r}")
    if opts["shard_size"] < 1:
        raise CurationError(f"option shard_size: expected a positive number of samples, got {opts['shard_size']}")
    if opts["ray_address"] is not None:
        opts["ray_address"] = str(opts["ray_address"]).strip() or None
        if opts["ray_address"] and opts["engine"] != "ray":
            raise CurationError("option ray_address: only with --engine ray")
    limit = opts["max_pixels"]
    if limit is None or (isinstance(limit, str) and limit.strip().lower() == "none"):
        opts["max_pixels"] = None
    else:
        try:
            opts["max_pixels"] = int(limit)
        except (TypeError, ValueError):
            raise CurationError(f"option max_pixels: expected a number of pixels or none, got {limit!r}") from None
        if isinstance(limit, bool) or opts["max_pixels"] < 1:
            raise CurationError(f"option max_pixels: expected a positive number of pixels or none, got {limit!r}")
    excl = opts["exclude"]
    if excl is None or excl == "":
        opts["exclude"] = []
    elif isinstance(excl, str):
        opts["exclude"] = [e.strip() for e in excl.split(",") if e.strip()]
    else:
        opts["exclude"] = [str(e) for e in excl]
    return opts


# --------------------------------------------------------------------------- mapping


def load_mapping(path: str | os.PathLike[str] | None, ontology: Any = None) -> dict[str, str | None]:
    """Read MAPPING.yaml (``key: anatomy/path``) and validate every path against the ontology.

    Returns ``{key: canonical ontology path or None}`` (a null value means "no anatomy").

    Raises:
        CurationError: missing or malformed file, or an unknown anatomy path (the message
            names the mapping file and the key).
    """
    if path is None or str(path) == "":
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CurationError(f"{p}: mapping file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise CurationError(f"{p}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CurationError(f"{p}: expected a mapping of source -> anatomy path, got {type(data).__name__}")
    onto = ontology if ontology is not None else load_ontology()
    out: dict[str, str | None] = {}
    for key, value in data.items():
        k = _norm_key(str(key))
        if not k:
            raise CurationError(f"{p}: empty key {key!r}")
        if value is None or (isinstance(value, str) and not value.strip()):
            out[k] = None
            continue
        if not isinstance(value, str):
            raise CurationError(f"{p}: key {key!r}: expected an anatomy path string, got {value!r}")
        try:
            out[k] = onto.nodes[onto.index(value)]
        except UnknownAnatomyError as exc:
            raise CurationError(f"{p}: key {key!r}: {exc}") from None
    return out


def _norm_key(key: str) -> str:
    key = key.replace("\\", "/").strip()
    while key.startswith("./"):
        key = key[2:]
    return key.strip("/")


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def resolve_anatomy(mapping: dict[str, str | None], source: str, rel: str) -> str | None:
    """The anatomy of the file ``rel`` (relative to the source folder named ``source``).

    A key matches when it is the source's name, a path relative to the source (or to the
    source's parent, i.e. starting with the source's name) of the file or of a folder
    above it, or a glob matching either of those paths or the file name. Zip members
    match as if the archive were a folder (``scans.zip/a/b.png``). The most specific key
    wins: more path components first, a glob before a plain path of the same depth, then
    the mapping's order (a path relative to the source counts one level more than the
    same path written from the source's name). No match: None.
    """
    rel = rel.replace("!", "/")
    full = f"{source}/{rel}"
    name = rel.rsplit("/", 1)[-1]
    best: tuple[float, int] | None = None
    result = None
    for order, (key, value) in enumerate(mapping.items()):
        depth = key.count("/") + 1
        # A key relative to the source is one level deeper than the same key from the
        # source's name.
        if _is_glob(key):
            if fnmatch.fnmatchcase(rel, key) or fnmatch.fnmatchcase(name, key):
                hit, score = True, depth + 1.5
            else:
                hit, score = fnmatch.fnmatchcase(full, key), depth + 0.5
        elif rel == key or rel.startswith(key + "/"):
            hit, score = True, depth + 1.0
        else:
            hit, score = (full == key or full.startswith(key + "/")), float(depth)
        if hit and (best is None or (score, -order) > best):
            best, result = (score, -order), value
    return result


# ------------------------------------------------------------------------ image maths


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _pad_op(op, mask: np.ndarray, r: int) -> np.ndarray:
    """A binary morphology op on a zero-padded copy (no border artefacts)."""
    padded = np.pad(mask, r + 1)
    return op(padded, structure=_disk(r))[r + 1:-r - 1, r + 1:-r - 1]


def detect_echo_region(
    rgb: np.ndarray, threshold: int = 10, work_side: int = 384, min_fraction: float = 0.05
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Find the echo data in an ultrasound screenshot: the sector or rectangle.

    Args:
        rgb: (H, W, 3) or (H, W) uint8 frame.
        threshold: grey level (of the brightest channel) above which a pixel is signal.
        work_side: the search runs on a copy block-averaged to at most this side.
        min_fraction: a region smaller than this fraction of the frame is not trusted;
            the whole frame is returned instead.

    Returns:
        ``((y0, y1, x0, x1), mask)``: the region's bounding box (end exclusive) and an
        (H, W) bool mask of the region (the convex hull of the largest bright component
        once text and thin lines are opened away).
    """
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    grey = rgb.max(axis=2) if rgb.ndim == 3 else rgb
    h, w = grey.shape
    # Signal: bright and textured. Flat areas (UI panels, banners, solid bars) are not
    # echo data even when bright: their 3x3 range is (almost) zero.
    flat = (ndi.maximum_filter(grey, size=3) - ndi.minimum_filter(grey, size=3)) <= 1
    signal = (grey > threshold) & ~flat
    f = max(1, math.ceil(max(h, w) / work_side))
    if f > 1:
        hp, wp = math.ceil(h / f) * f, math.ceil(w / f) * f
        g = np.zeros((hp, wp), np.float32)
        g[:h, :w] = signal
        m = g.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3)) > 0.25
    else:
        m = signal
    hs, ws = m.shape
    r = max(2, round(0.012 * max(hs, ws)))
    # Fill speckle holes (bridging gaps of a pixel or two only), open away text and thin
    # lines, keep the largest component.
    closed = _pad_op(ndi.binary_closing, m, 1)
    opened = _pad_op(ndi.binary_opening, closed, r)
    labels, n = ndi.label(opened, structure=np.ones((3, 3), bool))
    full_mask = np.ones((h, w), bool)
    if n == 0:
        return (0, h, 0, w), full_mask
    areas = np.bincount(labels.ravel())[1:]
    k = int(np.argmax(areas)) + 1
    if areas[k - 1] < min_fraction * hs * ws:
        return (0, h, 0, w), full_mask
    hull = convex_hull_image(ndi.binary_fill_holes(labels == k))
    # Opening rounds off sharp corners (a sector's apex): take back the closed mask's
    # pixels near the hull, then hull again.
    near = _pad_op(ndi.binary_dilation, hull, r + 1)
    region = convex_hull_image((closed & near) | hull)
    if f > 1:
        region = np.repeat(np.repeat(region, f, axis=0), f, axis=1)[:h, :w]
    ys = np.flatnonzero(region.any(axis=1))
    xs = np.flatnonzero(region.any(axis=0))
    return (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1), region


def crop_to_region(rgb: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray) -> np.ndarray:
    """``rgb`` cut to ``box`` with the pixels outside ``mask`` set to 0."""
    y0, y1, x0, x1 = box
    out = rgb[y0:y1, x0:x1].copy()
    out[~mask[y0:y1, x0:x1]] = 0
    return out


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash: 32x32 grey thumbnail, the 8x8 lowest frequencies
    against their median (bit 63 is the DC term)."""
    from PIL import Image
    from scipy.fft import dctn

    grey = image.mean(axis=2) if image.ndim == 3 else image
    thumb = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F").resize(
        (32, 32), Image.Resampling.BILINEAR)
    low = dctn(np.asarray(thumb, np.float64), norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low)
    return int(sum(1 << (63 - i) for i in np.flatnonzero(bits)))


#: The 64 bits of a hash. :func:`perceptual_hash` sums numpy int64 bits, so its hashes come
#: signed (bit 63, the DC term, is the sign); distances and the index use the 64-bit pattern.
_HASH_MASK = (1 << 64) - 1


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two 64-bit hashes (signed or unsigned: the bit patterns count)."""
    return bin((a ^ b) & _HASH_MASK).count("1")


if hasattr(np, "bitwise_count"):  # numpy >= 2

    def _popcount(x: np.ndarray) -> np.ndarray:
        """Set bits of each element of a uint64 array (uint8)."""
        return np.bitwise_count(x)

else:
    _BITS_OF_BYTE = np.array([bin(v).count("1") for v in range(256)], np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        """Set bits of each element of a uint64 array (uint8; a table per byte)."""
        return _BITS_OF_BYTE[np.ascontiguousarray(x).view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.uint8)


class HashIndex:
    """Near-neighbour search of 64-bit hashes within a Hamming radius (multi-index hashing),
    in about constant time per lookup at millions of hashes.

    The hash is cut into 4 bands of 16 bits. Two hashes within distance ``t`` agree on some band
    up to ``t // 4`` bits (pigeonhole), so a query probes, for each band, the band's value with
    every flip of up to ``t // 4`` bits (17 values per band at the default ``t`` = 6), and
    computes the full distance only of the hashes found there.

    Layout (numpy; 24 bytes per hash, plus a pointer to its tag): the hashes in one uint64 array
    in the order added, and for each (band, value) row the numbers (int32) of the hashes that have
    it, rows one after the other, with the start of each row (compressed sparse rows). A probe is
    two array reads; all the probes and distances of a query are one vectorised step, however
    long a row is (similar images fill some rows). The hashes added since the rows were last
    extended are checked by one vectorised scan; they are merged in (one linear pass) when they
    reach ``2 * sqrt(len(index))``, which balances the scan per query against the merge per added
    hash: both stay tens of microseconds at millions of hashes. An index with fewer hashes than
    probes (68 at ``t`` = 6) is scanned whole.
    """

    BANDS = 4
    BAND_BITS = 16
    #: The fewest recent (scanned, not yet merged) hashes that trigger a merge.
    MIN_RECENT = 1024

    def __init__(self, threshold: int) -> None:
        self.threshold = int(threshold)
        self._hashes = np.zeros(1024, np.uint64)
        self._tags: list[str] = []
        self._indexed = 0  # hashes 0.._indexed-1 are in the rows
        rows = self.BANDS << self.BAND_BITS
        self._members = np.zeros(0, np.int32)  # the hash numbers of row 0, then of row 1, ...
        self._starts = np.zeros(rows + 1, np.int64)  # row r (band b, value v: r = b * 65536 + v) is _members[_starts[r]:_starts[r + 1]]
        r = max(self.threshold, 0) // self.BANDS
        flips = [0] + [sum(1 << b for b in bits) for k in range(1, r + 1)
                       for bits in itertools.combinations(range(self.BAND_BITS), k)]
        self._flips = np.array(flips, np.int64)

    def __len__(self) -> int:
        return len(self._tags)

    def _rows(self, hashes: np.ndarray) -> np.ndarray:
        """(BANDS, n) row numbers of uint64 ``hashes``: band b's value plus b * 65536."""
        shifts = np.arange(self.BANDS, dtype=np.uint64)[:, None] * np.uint64(self.BAND_BITS)
        values = (hashes[None, :] >> shifts) & np.uint64((1 << self.BAND_BITS) - 1)
        return values.astype(np.int64) + (np.arange(self.BANDS, dtype=np.int64)[:, None] << self.BAND_BITS)

    def add(self, h: int, tag: str) -> None:
        n = len(self._tags)
        if n == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros(n, np.uint64)])
        self._hashes[n] = h & _HASH_MASK
        self._tags.append(tag)
        if n + 1 - self._indexed >= max(self.MIN_RECENT, 2 * math.isqrt(n + 1)):
            self._merge_recent(n + 1)

    def _merge_recent(self, n: int) -> None:
        """Put hashes _indexed..n-1 in the rows: each at the end of its row, so rows stay in adding order."""
        recent = self._hashes[self._indexed:n]
        rows = self._rows(recent).ravel()
        by_row = np.argsort(rows, kind="stable")
        rows = rows[by_row]
        numbers = np.tile(np.arange(self._indexed, n, dtype=np.int32), self.BANDS)[by_row]
        self._members = np.insert(self._members, self._starts[rows + 1], numbers)
        added = np.bincount(rows, minlength=len(self._starts) - 1)
        self._starts[1:] += np.cumsum(added)
        self._indexed = n

    def query(self, h: int) -> tuple[str, int] | None:
        """The first added (tag, distance) within the threshold of ``h``, or None."""
        n = len(self._tags)
        if self.threshold < 0 or n == 0:
            return None
        h &= _HASH_MASK
        q = np.uint64(h)
        found = []
        # Probing pays when the rows hold more hashes than there are probes; else one scan of every hash is cheaper.
        probed = self._indexed if self._flips.size * self.BANDS < self._indexed else 0
        if probed:
            band_rows = [(b << self.BAND_BITS) | ((h >> (self.BAND_BITS * b)) & ((1 << self.BAND_BITS) - 1))
                         for b in range(self.BANDS)]  # as _rows, for one hash
            rows = (np.array(band_rows, np.int64)[:, None] ^ self._flips[None, :]).ravel()
            lo, hi = self._starts[rows], self._starts[rows + 1]
            sizes = hi - lo
            total = int(sizes.sum())
            if total:
                # positions lo[i] .. hi[i]-1 of every probed row, in one array
                ends = np.cumsum(sizes)
                positions = np.arange(total) + np.repeat(lo - (ends - sizes), sizes)
                ids = self._members[positions]
                near = ids[_popcount(self._hashes[ids] ^ q) <= self.threshold]
                if near.size:
                    found.append(int(near.min()))
        if n > probed and not found:  # a match among the rows is older than every hash scanned here
            scanned = np.flatnonzero(_popcount(self._hashes[probed:n] ^ q) <= self.threshold)
            if scanned.size:
                found.append(probed + int(scanned[0]))
        if not found:
            return None
        best = found[0]
        return self._tags[best], int(_popcount(self._hashes[best:best + 1] ^ q)[0])


def resize_pad(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (aspect kept) so the longer side is ``size``, then zero-pad to a centred square."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = Image.fromarray(image)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    out = np.zeros((size, size) + image.shape[2:], np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[y:y + nh, x:x + nw] = np.asarray(img)
    return out


def opaque_name(key: str, frame: int) -> str:
    """Output file name of a unit: a hash of its source-relative path and frame index."""
    return hashlib.sha256(f"{key}#{int(frame)}".encode()).hexdigest()[:24] + ".png"


def _png_bytes(array: np.ndarray) -> bytes:
    """The PNG file of ``array`` (the same bytes :func:`_save_png_atomic` writes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _save_png_atomic(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(_png_bytes(array))
    os.replace(tmp, path)


#: Colour of an overlay outside the echo region: flat, so that no burned-in text (names,
#: dates, IDs) survives there.
_OVERLAY_OUTSIDE = (60, 0, 60)


def _overlay(rgb: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 original inside the region (an (H, W) bool mask), one flat colour
    outside it, the region's outline green, its bounding box red."""
    from scipy import ndimage as ndi

    out = rgb.copy()
    out[~mask] = _OVERLAY_OUTSIDE
    edge = mask & ~ndi.binary_erosion(mask, iterations=max(1, max(rgb.shape[:2]) // 300))
    out[edge] = (0, 255, 0)
    y0, y1, x0, x1 = box
    t = max(1, max(rgb.shape[:2]) // 300)
    out[y0:y0 + t, x0:x1] = out[y1 - t:y1, x0:x1] = (255, 0, 0)
    out[y0:y1, x0:x0 + t] = out[y0:y1, x1 - t:x1] = (255, 0, 0)
    return out


# ----------------------------------------------------------------------- enumeration


@dataclass
class _Task:
    """One input file (or zip member, or a problem found while enumerating)."""

    key: str  # "<source label>/<relative path>[!member]": stable id, hashed for names
    display: str  # the user's path, for the report
    path: str  # file on disk (the archive for a zip member)
    member: str | None = None  # zip member name
    problem: str | None = None  # known unreadable before decoding (bad zip)
    skip: str | None = None  # why it is listed as skipped, unread (not an image, link loop, unsafe zip name)
    skip_frames: frozenset[int] = field(default_factory=frozenset)
    url: bool = False  # path is an fsspec URL (read through fsspec into a temporary file)
    #: Frames decided before a resume whose images are in no committed shard (format webdataset):
    #: encoded again, not decided again.
    refill_frames: frozenset[int] = field(default_factory=frozenset)
    was_done: bool = False  # journaled as done before a resume (only refill frames are read)


@dataclass(frozen=True)
class _UrlSource:
    """A source given as an fsspec URL (``s3://bucket/scans``, ``memory://scans``, ``file:///scans``)."""

    url: str

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def filesystem(self) -> tuple[Any, str]:
        """(the fsspec filesystem, the source's path on it)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        return fs, root.rstrip("/") or root

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0].lower()

    def local_path(self) -> Path | None:
        """The folder on this machine for a ``file://`` URL, else None."""
        return Path(os.path.realpath(self.filesystem()[1])) if self.protocol in ("file", "local") else None


def _is_url(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def _open_input(path: str, url: bool) -> Any:
    """A binary file object of an input file (an fsspec URL or a local path)."""
    if url:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _source_labels(sources: list[Path]) -> list[str]:
    labels, seen = [], Counter()
    for s in sources:
        base = s.name or "source"
        seen[base] += 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def _walk(root: Path, skip_dirs: set[str]) -> Iterator[tuple[str, str | None]]:
    """``(relative posix path, None)`` for the files under ``root``, and ``(relative path,
    reason)`` for entries that cannot be followed (a symbolic link loop, a broken link):
    entries sorted by name, folders recursed in place, hidden entries ignored. A link to a
    folder above it is not followed (it would list the same files forever)."""
    def rec(folder: str, prefix: str, above: frozenset[str]) -> Iterator[tuple[str, str | None]]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            logger.warning("cannot list %s (%s)", folder, exc.strerror)
            return
        for e in entries:
            if e.name.startswith(".") or e.name == "__MACOSX":
                continue
            rel = prefix + e.name
            try:
                is_dir = e.is_dir()
                is_file = not is_dir and e.is_file()
            except OSError as exc:  # ELOOP: a link to itself, or a cycle of links
                yield rel, ("symbolic link loop: not followed" if exc.errno == errno.ELOOP
                            else f"cannot read ({exc.strerror})")
                continue
            if is_dir:
                real = os.path.realpath(e.path)
                if real in above:
                    yield rel, "symbolic link loop (a link to a folder above it): not followed"
                elif real not in skip_dirs:
                    yield from rec(e.path, rel + "/", above | {real})
            elif is_file:
                yield rel, None
            elif e.is_symlink():
                yield rel, "broken symbolic link"

    if root.is_file():
        yield root.name, None
    else:
        yield from rec(str(root), "", frozenset({os.path.realpath(root)}))


def _walk_url(source: _UrlSource) -> Iterator[tuple[str, str | None]]:
    """:func:`_walk` for an fsspec source: ``(relative posix path, None)`` for its files, in the
    same order (entries sorted by name, folders recursed in place, hidden entries ignored)."""
    fs, root = source.filesystem()

    def leaf(entry: dict[str, Any]) -> str:
        return entry["name"].rstrip("/").rsplit("/", 1)[-1]

    def rec(folder: str, prefix: str) -> Iterator[tuple[str, str | None]]:
        for e in sorted(fs.ls(folder, detail=True), key=leaf):
            name = leaf(e)
            if name.startswith(".") or name == "__MACOSX":
                continue
            if e["type"] == "directory":
                yield from rec(e["name"], prefix + name + "/")
            elif e["type"] == "file":
                yield prefix + name, None

    if fs.isfile(root):
        yield root.rsplit("/", 1)[-1], None
    else:
        yield from rec(root, "")


def _unsafe_member(name: str) -> bool:
    """Whether a zip member's name is absolute or climbs out of the archive (``..``)."""
    name = name.replace("\\", "/")
    return name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in name.split("/")


def _file_kind(name: str) -> str | None:
    """None for a candidate media file, else why it is skipped."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return None
    suffix = os.path.splitext(lower)[1]
    if suffix in SUPPORTED_SUFFIXES or suffix == "":
        return None
    if suffix in _NOT_MEDIA or lower.startswith(("license", "readme")):
        return f"not an image, video or DICOM ({suffix})"
    return None  # unknown suffix: tried (DICOM without suffix convention); failure is reported


def _source_files(src: Path | _UrlSource, shown: str, skip_dirs: set[str]
                  ) -> Iterator[tuple[str, str, str, str | None]]:
    """``(relative path, path or URL to read, display, unreadable reason)`` of a source's files."""
    if isinstance(src, _UrlSource):
        fs, root = src.filesystem()
        single = fs.isfile(root)
        for rel, unreadable in _walk_url(src):
            yield rel, (src.url if single else fs.unstrip_protocol(f"{root}/{rel}")), (
                shown if single else f"{shown.rstrip('/')}/{rel}"), unreadable
        return
    base = Path(shown) if src.is_dir() else Path(shown).parent
    for rel, unreadable in _walk(src, skip_dirs):
        yield rel, str(src / rel if src.is_dir() else src), str(base / rel), unreadable


def _tasks(sources: list[Path | _UrlSource], labels: list[str], given: list[str], out: Path,
           exclude: list[str]) -> Iterator[_Task]:
    skip_dirs = {os.path.realpath(out)}  # a link in a source to OUT
    for src, label, shown in zip(sources, labels, given):
        url = isinstance(src, _UrlSource)
        for rel, path, display, unreadable in _source_files(src, shown, skip_dirs):
            key = f"{label}/{rel}"
            if any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(key, g) for g in exclude):
                continue
            if unreadable is not None:
                yield _Task(key, display, path, skip=unreadable, url=url)
                continue
            if rel.lower().endswith(".zip"):
                try:
                    with _open_input(path, url) as raw, zipfile.ZipFile(raw) as zf:
                        members = sorted(i.filename for i in zf.infolist() if not i.is_dir())
                except (zipfile.BadZipFile, OSError, ValueError) as exc:
                    yield _Task(key, display, path, problem=f"cannot open zip archive ({exc})", url=url)
                    continue
                for m in members:
                    parts = m.split("/")
                    unsafe = _unsafe_member(m)
                    if not unsafe and any(p.startswith(".") or p == "__MACOSX" for p in parts):
                        continue
                    mkey = f"{key}!{m}"
                    if any(fnmatch.fnmatchcase(f"{rel}!{m}", g) or fnmatch.fnmatchcase(mkey, g) for g in exclude):
                        continue
                    if unsafe:  # listed, never extracted or read
                        yield _Task(mkey, f"{display}!{m}", path, member=m, url=url,
                                    skip="unsafe name in zip archive (absolute path or '..'): not extracted")
                        continue
                    skip = _file_kind(parts[-1])
                    if skip is None and m.lower().endswith(".zip"):
                        skip = "nested zip archive (extract it first)"
                    yield _Task(mkey, f"{display}!{m}", path, member=m, skip=skip, url=url)
                continue
            yield _Task(key, display, path, skip=_file_kind(rel.rsplit("/", 1)[-1]), url=url)


# --------------------------------------------------------------------------- workers


def _process(task: _Task, cfg: dict[str, Any]) -> dict[str, Any]:
    """Decode, check, crop, hash and write the units of one file (runs in a worker).

    Returns ``{"fmt", "units": [...], "error"}``; a unit is ``{"fr", "st"}`` plus, for
    a candidate to keep, ``"n"`` (output name), ``"sha"``, ``"ph"`` and ``"box"``.
    """
    if cfg["_delay"]:
        time.sleep(cfg["_delay"])
    result: dict[str, Any] = {"fmt": None, "units": [], "error": None}
    tmpdir = None
    path = Path(task.path)
    try:
        if task.member is not None or task.url:
            # A zip member or a remote file: decoded from a local temporary copy.
            tmpdir = tempfile.mkdtemp(prefix="echocare_zip_" if task.member is not None else "echocare_url_")
            leaf = (task.member if task.member is not None else task.path).rsplit("/", 1)[-1]
            path = Path(tmpdir) / (leaf or "member")
            try:
                _copy_input(task, path)
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as exc:
                what = "extract zip member" if task.member is not None else "read"
                result["error"] = f"cannot {what} ({exc})"
                return result
        try:
            result["fmt"] = detect_format(path)
            for i, frame in enumerate(iter_frames(path, step=cfg["frame_step"], max_pixels=cfg["max_pixels"])):
                fr = i * cfg["frame_step"]
                if fr in task.skip_frames:
                    continue
                result["units"].append(_process_frame(task.key, fr, frame, cfg))
                if task.was_done and len(result["units"]) == len(task.refill_frames):
                    break  # a finished file read again for its refill frames only
        except UltrasoundReadError as exc:
            result["error"] = exc.problem
        except Exception as exc:  # a decoder's own error on a broken file: report, go on
            result["error"] = f"{type(exc).__name__}: {exc}"
        if result["error"] and tmpdir is not None:
            result["error"] = result["error"].replace(str(path), task.display)
        if result["error"] is None and not result["units"] and not task.skip_frames:
            result["error"] = "file has no frames"
        return result
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _copy_input(task: _Task, dst_path: Path) -> None:
    """Copy the task's file (a zip member, a remote file, or a zip member of a remote file) to ``dst_path``."""
    with _open_input(task.path, task.url) as raw, open(dst_path, "wb") as dst:
        if task.member is None:
            shutil.copyfileobj(raw, dst, 1 << 20)
            return
        with zipfile.ZipFile(raw) as zf, zf.open(task.member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)


def _process_frame(key: str, fr: int, frame: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    u8 = np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8)
    del frame
    grey = u8.max(axis=2)
    levels = int(np.count_nonzero(np.bincount(grey.ravel(), minlength=256)))
    if int(np.count_nonzero(grey)) < cfg["min_pixels"] or levels <= 1:
        return {"fr": fr, "st": "blank"}
    if levels <= 2:
        return {"fr": fr, "st": "binary"}
    sha = hashlib.sha256(repr(u8.shape).encode() + u8.tobytes()).hexdigest()[:32]
    h, w = u8.shape[:2]
    if cfg["crop"]:
        box, mask = detect_echo_region(u8)
        cropped = crop_to_region(u8, box, mask)
    else:
        box, mask, cropped = (0, h, 0, w), None, u8
    ph = perceptual_hash(cropped)
    out = resize_pad(cropped, cfg["size"])
    if (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all():
        out = np.ascontiguousarray(out[..., 0])  # grey stays grey (1 channel PNG)
    name = opaque_name(key, fr)
    unit = {"fr": fr, "st": "candidate", "n": name, "sha": sha, "ph": ph, "box": [box[0], box[1], box[2], box[3]]}
    if cfg["return_png"]:  # format webdataset: the driver writes the kept ones into shards
        unit["png"] = _png_bytes(out)
    else:
        _save_png_atomic(out, Path(cfg["out"]) / "images" / name)
    if cfg["overlay"]:
        m = mask if mask is not None else np.ones((h, w), bool)
        _save_png_atomic(_overlay(u8, box, m), Path(cfg["out"]) / "overlays" / name)
    return unit


def _worker_run(task: _Task, cfg: dict[str, Any]) -> dict[str, Any]:
    return _process(task, cfg)  # looked up at call time, in the worker


#: The error of a file whose worker process died twice while reading it.
LOST_WORKER = ("a worker process died while reading this file (killed by the system, e.g. out of memory, "
               "or crashed); retried once, alone")


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: exit once the main process ``parent`` is gone (killed, e.g. out of
    memory), instead of waiting idle forever on the task queue as an orphan."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="curate-parent-watch", daemon=True).start()


def _new_pool(workers: int, ctx: Any) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_exit_with_parent, initargs=(os.getpid(),))


def _done(result: dict[str, Any]) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _retry_alone(task: _Task, cfg: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """``task`` in a pool of its own: its result, or the ``LOST_WORKER`` error if it kills
    that worker too."""
    with _new_pool(1, ctx) as solo:
        try:
            return solo.submit(_worker_run, task, cfg).result()
        except BrokenProcessPool:
            logger.warning("%s (reported as failed)", LOST_WORKER)  # no path: hide_source_paths
            return {"fmt": None, "units": [], "error": LOST_WORKER}


def _ordered_map(tasks: Iterable[_Task], cfg: dict[str, Any], workers: int, ahead: int
                 ) -> Iterator[tuple[_Task, dict[str, Any]]]:
    """(task, result) in task order; with workers > 1 at most ``ahead`` files in flight.

    A worker that dies (SIGKILL, out-of-memory kill, crash) breaks the pool and loses every
    file in flight: each lost file is retried once in a pool of its own, in order (so only
    the file that kills its worker again fails, with ``LOST_WORKER``), then the run goes on
    with a new pool. Results already received are kept.
    """
    if workers <= 1:
        for t in tasks:
            yield t, (_process(t, cfg) if t.skip is None and t.problem is None else {})
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    pool = _new_pool(workers, ctx)
    pending: deque[tuple[_Task, Future | None]] = deque()

    def recover() -> None:
        nonlocal pool
        pool.shutdown(wait=True)  # settles every future of the broken pool
        lost = [i for i, (_, f) in enumerate(pending) if f is not None and _lost(f)]
        logger.warning("a curate worker process died; retrying the %d file(s) it had in flight", len(lost))
        for i in lost:
            pending[i] = (pending[i][0], _done(_retry_alone(pending[i][0], cfg, ctx)))
        pool = _new_pool(workers, ctx)

    def submit(task: _Task) -> Future:
        try:
            return pool.submit(_worker_run, task, cfg)
        except BrokenProcessPool:  # a worker died since the last look
            recover()
            return pool.submit(_worker_run, task, cfg)

    def pop() -> tuple[_Task, dict[str, Any]]:
        head = pending[0][1]
        if head is not None and _lost(head, wait=True):
            recover()
        task, future = pending.popleft()
        return task, (future.result() if future is not None else {})

    try:
        for t in tasks:
            pending.append((t, submit(t) if t.skip is None and t.problem is None else None))
            while len(pending) > ahead or (pending and pending[0][1] is None):
                yield pop()
        while pending:
            yield pop()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _lost(future: Future, wait: bool = False) -> bool:
    """Whether ``future`` lost its file to a broken pool (not done counts as lost once the
    pool is shut down). ``wait``: wait for it to settle first."""
    if wait:
        concurrent.futures.wait([future])
    if not future.done() or future.cancelled():
        return True
    return isinstance(future.exception(), BrokenProcessPool)


# --------------------------------------------------------------------------- journal


class _Journal:
    """Append-only JSON lines: one per decided unit and one per finished file."""

    def __init__(self, path: Path, fsync_every: int) -> None:
        self.path = path
        self.fsync_every = max(1, fsync_every)
        self._fh = None
        self._since = 0

    def read(self) -> list[dict[str, Any]]:
        """All complete lines; a torn last line (killed mid-write) is cut off the file."""
        if not self.path.exists():
            return []
        records, good = [], 0
        with open(self.path, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break
            try:
                records.append(json.loads(data[pos:end]))
            except json.JSONDecodeError:
                break
            pos = good = end + 1
        if good < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
        return records

    def iter_records(self) -> Iterator[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    yield json.loads(line)

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()
        self._since += 1
        if self._since >= self.fsync_every:
            os.fsync(self._fh.fileno())
            self._since = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


# ------------------------------------------------------------------------- main entry


def _split_value(key: str, seed: int) -> float:
    """A uniform value in [0, 1) from the source file (frames of one file share it)."""
    file_key = key.split("!", 1)[0] if key.count("!") else key
    digest = hashlib.sha256(f"{seed}:{file_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def curate(
    sources: list[str] | str,
    mapping: str | None = None,
    out: str = "curated",
    size: int = 256,
    workers: int = 1,
    frame_step: int = 10,
    val_fraction: float = 0.02,
    **options: Any,
) -> Path:
    """Curate folders of mixed ultrasound sources into a pretraining set.

    Args:
        sources: source folders (or single files), in priority order: when two units
            are duplicates, the one met first (sources in this order, files sorted) is kept.
        mapping: MAPPING.yaml, ``key: anatomy/path`` (see :func:`resolve_anatomy`); every
            path is validated against the ontology before anything runs. None: no anatomy.
        out: output folder; rerunning into the same folder resumes the run.
        size: side of the square output images.
        workers: processes decoding in parallel (the result does not depend on it).
        frame_step: sample frames 0, step, 2*step, ... of videos and multi-frame files.
        val_fraction: fraction of source files (all their frames together) in
            ``validation``, chosen by a hash of the source path salted by ``seed``.
        **options: see :data:`DEFAULT_OPTIONS` (``near_duplicate_threshold``,
            ``overlay``, ``seed``, ``min_pixels``, ``crop``, ``exclude``, ``progress``,
            ``restart``, ``fsync_every``, ``max_in_flight``, ``hide_source_paths``,
            ``max_pixels``: frames above it are reported as failed, never decoded).

    Returns:
        Path of ``OUT/datalist.json``.

    Raises:
        CurationError: missing source, bad mapping (names the file and key), bad option,
            an ``OUT`` that is not curate's to write (not empty and no journal, not a
            folder, or is/inside/containing a source), or an ``OUT`` journal written with
            other settings (rerun with ``restart=True`` or another ``OUT``). The message
            is one line, starting with the file or folder concerned.
    """
    opts = _options(options)
    given, src_paths = _check_sources(sources)
    size, workers, frame_step = int(size), max(1, int(workers)), int(frame_step)
    val_fraction = float(val_fraction)
    _check_numbers(size, frame_step, val_fraction)
    onto = load_ontology()
    amap = load_mapping(mapping, onto)
    labels = _source_labels(src_paths)

    out_dir = Path(out)
    _check_engine(opts, src_paths, given)
    _prepare_out(out_dir, src_paths, given, opts)
    settings = _run_settings(src_paths, size, frame_step, amap, opts, val_fraction)
    journal = _Journal(out_dir / JOURNAL, opts["fsync_every"])
    state = _resume_state(journal, settings, out_dir, opts["near_duplicate_threshold"])
    cfg = {"frame_step": frame_step, "size": size, "out": str(out_dir), "overlay": opts["overlay"],
           "crop": opts["crop"], "min_pixels": opts["min_pixels"], "max_pixels": opts["max_pixels"],
           "_delay": opts["_delay"], "return_png": opts["format"] == "webdataset"}
    run = _Run(out_dir, journal, state, amap, bool(opts["hide_source_paths"]))
    if opts["format"] == "webdataset":
        run.split_rule = (val_fraction, opts["seed"])
        run.sink = shards.ShardSink(out_dir / shards.SHARDS_FOLDER, opts["shard_size"], state.next_shard,
                                    run.commit_shard)
    all_tasks = lambda: _tasks(src_paths, labels, given, out_dir, opts["exclude"])  # noqa: E731
    total = sum(1 for _ in all_tasks())
    bar = None
    if opts["progress"]:
        bar = tqdm(total=total, initial=min(len(state.done_files), total), unit="file", desc="curate",
                   dynamic_ncols=True)
    if state.done_files or state.done_units:
        logger.info("resuming %s: %d file(s) already done", out_dir, len(state.done_files))
    finished = False
    try:
        for task, result in _results(run.pending(all_tasks()), cfg, workers, opts):
            run.record(task, result)
            if bar is not None:
                bar.update(0 if task.was_done else 1)
                bar.set_postfix(kept=len(state.seen_sha), refresh=False)
        finished = True
    finally:
        if run.sink is not None:
            # Partial shards are committed only at the end; a run stopped by an error leaves
            # them to be refilled by the rerun, as a kill does.
            run.sink.close() if finished else run.sink.abandon()
        if bar is not None:
            bar.close()
        journal.close()

    return _finish(out_dir, journal, amap, onto, labels, val_fraction, opts["seed"], settings)


def _results(tasks: Iterable[_Task], cfg: dict[str, Any], workers: int, opts: dict[str, Any]
             ) -> Iterator[tuple[_Task, dict[str, Any]]]:
    """(task, result) in task order, from the engine the options name."""
    if opts["engine"] == "ray":
        from echocare.datasets.curation_ray import ray_ordered_map

        return ray_ordered_map(tasks, cfg, workers, opts["max_in_flight"], opts["ray_address"])
    return _ordered_map(tasks, cfg, workers, opts["max_in_flight"] or 4 * workers)


def _check_engine(opts: dict[str, Any], src_paths: list[Path | _UrlSource], given: list[str]) -> None:
    """Refuse, before anything is written, what the chosen engine cannot do."""
    if opts["engine"] != "ray":
        return
    require_ray()
    for src, shown in zip(src_paths, given):
        if isinstance(src, _UrlSource) and src.protocol == "memory":
            raise CurationError(f"{shown}: a memory:// file system lives in one process and Ray workers cannot "
                                "read it; use --engine local, or a store every node reaches (a shared folder, s3://)")


def _check_sources(sources: list[str] | str) -> tuple[list[str], list[Path | _UrlSource]]:
    """(the sources as given, their real paths or fsspec URLs); each must exist."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    given = [str(s) for s in sources]
    if not given:
        raise CurationError("no source given (--src DIR)")
    src_paths: list[Path | _UrlSource] = []
    for g in given:
        if _is_url(g):
            src = _UrlSource(g)
            try:
                fs, root = src.filesystem()
                found = fs.exists(root)
            except (ImportError, ValueError, OSError) as exc:  # unknown protocol, its package missing, unreachable
                raise CurationError(f"{g}: cannot open this source ({exc})") from None
            if not found:
                raise CurationError(f"{g}: source not found")
            src_paths.append(src)
            continue
        # realpath, not Path.resolve: that raises RuntimeError on a symbolic link loop.
        path = Path(os.path.realpath(os.path.expanduser(g)))
        if not path.exists():
            link = " (a broken or looping symbolic link)" if os.path.islink(os.path.expanduser(g)) else ""
            raise CurationError(f"{g}: source not found{link}")
        src_paths.append(path)
    return given, src_paths


def _check_numbers(size: int, frame_step: int, val_fraction: float) -> None:
    if size < 8:
        raise CurationError(f"size must be at least 8, got {size}")
    if frame_step < 1:
        raise CurationError(f"frame_step must be >= 1, got {frame_step}")
    if not 0.0 <= val_fraction <= 1.0:
        raise CurationError(f"val_fraction must be in [0, 1], got {val_fraction}")


def _prepare_out(out_dir: Path, src_paths: list[Path | _UrlSource], given: list[str], opts: dict[str, Any]) -> None:
    """Check that ``out_dir`` is curate's to write, drop a discarded run's outputs, make the folders."""
    _check_out(out_dir, src_paths, given)
    if opts["restart"] or (out_dir / _DISCARDED_JOURNAL).exists():
        _discard_run(out_dir)
    if opts["format"] == "webdataset":
        (out_dir / shards.SHARDS_FOLDER).mkdir(parents=True, exist_ok=True)
        shards.remove_open_shards(out_dir / shards.SHARDS_FOLDER)  # a killed run's uncommitted shards
    else:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if opts["overlay"]:
        (out_dir / "overlays").mkdir(exist_ok=True)


def _run_settings(src_paths: list[Path | _UrlSource], size: int, frame_step: int, amap: dict, opts: dict[str, Any],
                  val_fraction: float) -> dict[str, Any]:
    """The settings a journal is written with; a resume must find the same ones."""
    hide = opts["hide_source_paths"]
    settings = {
        "version": _JOURNAL_VERSION,
        "sources": [_hidden(str(s)) if hide else str(s) for s in src_paths],
        "size": size,
        "frame_step": frame_step,
        "near_duplicate_threshold": opts["near_duplicate_threshold"],
        "min_pixels": opts["min_pixels"],
        "crop": opts["crop"],
        "overlay": opts["overlay"],
        "exclude": opts["exclude"],
    }
    if opts["max_pixels"] != DEFAULT_MAX_PIXELS:
        # A resume with another limit would judge the rest of the files by another rule. Only a
        # limit other than the default is written, so journals from before it was kept resume.
        settings["max_pixels"] = opts["max_pixels"]
    if opts["format"] == "webdataset":
        # Shards are written as units are decided: their split (and size) is fixed for the run.
        settings.update(format="webdataset", shard_size=opts["shard_size"], val_fraction=val_fraction, seed=opts["seed"])
    if hide:
        # With hidden paths the journal keeps no path to resolve the anatomy from at the
        # end: each unit's anatomy is journaled when it is decided, so a resume must use
        # the same mapping.
        settings["hide_source_paths"] = True
        settings["mapping"] = _hidden(json.dumps(amap, sort_keys=True))
    return settings


@dataclass
class _ResumeState:
    """What the journal says is done: finished files, decided units (frames) per file, and the
    kept units' hashes (exact and perceptual) that later units are compared with."""

    index: HashIndex
    done_files: set[str] = field(default_factory=set)
    done_units: dict[str, set[int]] = field(default_factory=dict)
    seen_sha: dict[str, str] = field(default_factory=dict)
    #: Format webdataset: file key -> kept frames whose images are in no committed shard (a killed
    #: run's open shards), and the number of the next shard.
    refill: dict[str, set[int]] = field(default_factory=dict)
    next_shard: int = 0


def _resume_state(journal: _Journal, settings: dict[str, Any], out_dir: Path, threshold: int) -> _ResumeState:
    """The state rebuilt from the journal (written with ``settings`` when new)."""
    records = journal.read()
    if records and records[0].get("settings") != settings:
        raise CurationError(
            f"{out_dir}: holds a curation run with other settings ({JOURNAL}); use another --out, "
            "or --restart true to start over"
        )
    if not records:
        journal.write({"settings": settings})
    state = _ResumeState(HashIndex(threshold))
    kept: dict[str, tuple[str, int]] = {}  # output name -> (file key, frame)
    in_shards: set[str] = set()
    for rec in records[1:]:
        if "fr" in rec:
            state.done_units.setdefault(rec["k"], set()).add(rec["fr"])
            if rec["st"] == "kept":
                state.seen_sha[rec["sha"]] = rec["n"]
                state.index.add(rec["ph"], rec["n"])
                kept[rec["n"]] = (rec["k"], rec["fr"])
        elif rec.get("done"):
            state.done_files.add(rec["k"])
        elif "shard" in rec:
            in_shards.update(k + ".png" for k in rec["keys"])
            state.next_shard = max(state.next_shard, shards.shard_number(rec["shard"]) + 1)
    if settings.get("format") == "webdataset":
        for name in kept.keys() - in_shards:
            key, frame = kept[name]
            state.refill.setdefault(key, set()).add(frame)
    return state


@dataclass
class _Run:
    """The driver's side of a curation run: which tasks are pending, and the journal records of
    each finished one, its units decided in input order (kept, exact or near duplicate)."""

    out_dir: Path
    journal: _Journal
    state: _ResumeState
    amap: dict
    hide: bool
    #: Format webdataset: the shard writer, and the split rule (val_fraction, seed) it places units by.
    sink: shards.ShardSink | None = None
    split_rule: tuple[float, int] = (0.0, 0)

    def key(self, task: _Task) -> str:
        return _hidden(task.key) if self.hide else task.key

    def pending(self, tasks: Iterable[_Task]) -> Iterator[_Task]:
        for t in tasks:
            key = self.key(t)
            refill = self.state.refill.get(key, set())
            t.was_done = key in self.state.done_files
            if t.was_done and not refill:
                continue
            if key in self.state.done_units:
                t.skip_frames = frozenset(self.state.done_units[key] - refill)
                t.refill_frames = frozenset(refill)
            yield t

    def commit_shard(self, name: str, split: str, keys: list[str]) -> None:
        """Journal a committed shard (:class:`~echocare.datasets.shards.ShardSink` calls it after the rename)."""
        self.journal.write({"shard": name, "split": split, "keys": keys})

    def _place(self, task: _Task, unit: dict[str, Any]) -> None:
        """Add a kept unit's image to its split's open shard (format webdataset)."""
        source, rel = task.key.split("/", 1)
        file_key = task.key.split("!", 1)[0]
        file_key = _hidden(file_key) if self.hide else file_key  # as _finish splits the datalist
        val_fraction, seed = self.split_rule
        split = "validation" if _split_value(file_key, seed) < val_fraction else "training"
        meta = {"anatomy": resolve_anatomy(self.amap, source, rel), "source": _hidden(source) if self.hide else source}
        self.sink.add(split, unit["n"][:-len(".png")], unit["png"], meta)

    def record(self, task: _Task, result: dict[str, Any]) -> None:
        key = self.key(task)
        base = {"k": key, "d": key if self.hide else task.display}
        if task.refill_frames:
            units = []
            for unit in result.get("units", []):
                if unit["fr"] in task.refill_frames:  # decided before the resume: only its image is placed
                    self._place(task, unit)
                else:
                    units.append(unit)
            if task.was_done:
                return
            result = {**result, "units": units}
        if task.skip is not None:
            self.journal.write({**base, "done": True, "skip": task.skip})
            return
        if task.problem is not None:
            self.journal.write({**base, "done": True, "err": _scrub(task.problem, task, key) if self.hide else task.problem})
            return
        fmt = result["fmt"]
        for unit in result["units"]:
            self._record_unit(task, {**base, "fr": unit["fr"], "fmt": fmt}, unit)
        error = result["error"]
        self.journal.write({**base, "done": True, "fmt": fmt, "err": _scrub(error, task, key) if self.hide else error})

    def _record_unit(self, task: _Task, rec: dict[str, Any], unit: dict[str, Any]) -> None:
        state = self.state
        if unit["st"] != "candidate":
            rec["st"] = unit["st"]
            self.journal.write(rec)
            return
        dup = state.seen_sha.get(unit["sha"])
        near = None if dup else state.index.query(unit["ph"])
        rec.update(n=unit["n"], sha=unit["sha"], ph=unit["ph"])
        if dup:
            rec.update(st="exact_duplicate", of=dup)
        elif near:
            rec.update(st="near_duplicate", of=near[0], dist=near[1])
        else:
            rec["st"] = "kept"
            state.seen_sha[unit["sha"]] = unit["n"]
            state.index.add(unit["ph"], unit["n"])
            if self.hide:  # what _finish would otherwise read from the path
                source, rel = task.key.split("/", 1)
                rec.update(a=resolve_anatomy(self.amap, source, rel), s=_hidden(source),
                           g=_hidden(task.key.split("!", 1)[0]))
        self.journal.write(rec)
        if rec["st"] == "kept" and self.sink is not None:
            self._place(task, unit)
        if rec["st"] in ("exact_duplicate", "near_duplicate"):
            # Written by this run's worker and journaled as dropped: remove it.
            _remove_outputs(self.out_dir, rec["n"])


def _hidden(text: str) -> str:
    """What ``hide_source_paths`` shows instead of a source path or name: ``sha256(text)[:16]``."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _scrub(message: str | None, task: _Task, hidden: str) -> str | None:
    """``message`` (a reader's error) with every spelling of the task's file replaced by ``hidden``."""
    if not message:
        return message
    names = {task.path, os.path.realpath(task.path), task.display, task.key, os.path.basename(task.path)}
    if task.member:
        names |= {task.member, task.member.rsplit("/", 1)[-1]}
    for name in sorted((n for n in names if n), key=len, reverse=True):  # longest first: whole paths
        message = message.replace(name, hidden)
    return message


def _check_out(out: Path, sources: list[Path | _UrlSource], given: list[str]) -> None:
    """Refuse an output folder that curate could damage.

    Raises:
        CurationError: ``out`` is, is inside or contains a source (real paths compared, links
            resolved), exists and is not a folder, or is a non-empty folder without a
            curation journal (curate did not create it). One line: ``"<out>: <problem>"``.
    """
    real_out = Path(os.path.realpath(out))
    for src, shown in zip(sources, given):
        local = src.local_path() if isinstance(src, _UrlSource) else src
        if local is None:  # a remote store: cannot overlap OUT on this machine
            continue
        real_src = Path(os.path.realpath(local))
        kind = "folder" if real_src.is_dir() else "file"
        problem = None
        if real_out == real_src:
            problem = f"is the source {kind}"
        elif real_out.is_relative_to(real_src):
            problem = f"inside the source {kind}"
        elif real_src.is_relative_to(real_out):
            problem = f"contains the source {kind}"
        if problem:
            raise CurationError(f"{out}: {problem} {shown}; give an --out outside every --src")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise CurationError(f"{out}: exists and is not a folder")
    with os.scandir(out) as entries:
        empty = next(entries, None) is None
    if not empty and not _holds_journal(out):
        raise CurationError(f"{out}: not empty and holds no curation journal ({JOURNAL}); curate writes only "
                            "into a new or empty folder, or resumes its own run there")


def _holds_journal(out: Path) -> bool:
    """Whether ``out`` holds a curation journal: its first line is the settings record (or
    the file is empty: killed before that line), or a journal being discarded."""
    if (out / _DISCARDED_JOURNAL).is_file():
        return True
    try:
        with open(out / JOURNAL, "rb") as fh:
            first = fh.readline()
        return not first or "settings" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return False


def _remove_outputs(out_dir: Path, name: str) -> None:
    """Remove the image and overlay of the output ``name`` (a journaled name) if present."""
    for sub in ("images", "overlays"):
        try:
            (out_dir / sub / name).unlink()
        except FileNotFoundError:
            pass


#: ``_save_png_atomic``'s temporary file of an output: ``.<name>.<pid>.tmp``.
_TMP_OUTPUT = re.compile(r"^\.(?P<name>[0-9a-f]{24}\.png)\.\d+\.tmp$")


def _remove_journaled(out_dir: Path, remove: set[str], written: set[str]) -> None:
    """Remove the outputs named in ``remove``, and the temporary files of the outputs named in
    ``written`` (left by a worker killed mid-write); both sets come from the journal, so
    nothing curate did not write is touched."""
    for name in remove:
        _remove_outputs(out_dir, name)
    for sub in ("images", "overlays"):
        folder = out_dir / sub
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            stray = [e.path for e in entries if (m := _TMP_OUTPUT.match(e.name)) and m["name"] in written]
        for path in stray:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _discard_run(out_dir: Path) -> None:
    """Start over (``restart``): remove every output the journal in ``out_dir`` records, then
    the journal. The journal is renamed first, so a run killed while discarding finishes the
    discard when rerun (and the folder still counts as curate's own)."""
    discarded = out_dir / _DISCARDED_JOURNAL
    if (out_dir / JOURNAL).exists():
        os.replace(out_dir / JOURNAL, discarded)
    if not discarded.exists():
        return
    names = {rec["n"] for rec in _Journal(discarded, 1).read() if "n" in rec}
    _remove_journaled(out_dir, names, names)
    discarded.unlink()


def _finish(out_dir: Path, journal: _Journal, amap: dict[str, str | None], onto: Any, labels: list[str],
            val_fraction: float, seed: int, settings: dict[str, Any]) -> Path:
    """Write datalist.json, report.json and report.png from the journal; remove stray files."""
    items: list[tuple[str, dict[str, Any]]] = []  # (file key, datalist item)
    dropped: dict[str, list[dict[str, Any]]] = {r: [] for r in _DROP_REASONS}
    failed: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    counts: dict[str, Counter] = {k: Counter() for k in ("region", "organ", "source", "modality")}
    written: set[str] = set()  # every output name the journal records as written by a worker
    dropped_names: set[str] = set()
    shard_records: list[dict[str, Any]] = []
    units = 0
    for rec in journal.iter_records():
        if "settings" in rec:
            continue
        if "shard" in rec:
            shard_records.append(rec)
            continue
        key = rec["k"]
        if "fr" in rec:
            units += 1
            st = rec["st"]
            if "n" in rec:
                written.add(rec["n"])
            if st == "kept":
                if "s" in rec:  # hide_source_paths: journaled when decided, the key is a hash
                    source, anatomy, file_key = rec["s"], rec.get("a"), rec["g"]
                else:
                    source, rel = key.split("/", 1)
                    anatomy, file_key = resolve_anatomy(amap, source, rel), key.split("!", 1)[0]
                item: dict[str, Any] = {"image": f"images/{rec['n']}"}
                if anatomy:
                    item["anatomy"] = anatomy
                items.append((file_key, item))
                counts["region"][onto.truncate(anatomy, 0) or "(none)"] += 1
                counts["organ"][onto.truncate(anatomy, 1) or "(none)"] += 1
                counts["source"][source] += 1
                counts["modality"][rec.get("fmt") or "unknown"] += 1
            else:
                if "n" in rec:
                    dropped_names.add(rec["n"])
                entry: dict[str, Any] = {"file": rec["d"], "frame": rec["fr"]}
                if "of" in rec:
                    entry["duplicate_of"] = f"images/{rec['of']}"
                if "dist" in rec:
                    entry["distance"] = rec["dist"]
                dropped.setdefault(st, []).append(entry)
        elif rec.get("done"):
            if rec.get("skip"):
                skipped.append({"file": rec["d"], "reason": rec["skip"]})
            elif rec.get("err"):
                failed.append({"file": rec["d"], "reason": rec["err"]})

    val_files = _validation_files([fk for fk, _ in items], val_fraction, seed)
    datalist = {"training": [it for fk, it in items if fk not in val_files],
                "validation": [it for fk, it in items if fk in val_files]}

    # Stray outputs: dropped units whose removal a kill interrupted, temporary files of a
    # worker killed mid-write. Only names the journal records; nothing else in OUT.
    _remove_journaled(out_dir, dropped_names, written)

    report = {
        "kept": len(items),
        "units": units,
        "training": len(datalist["training"]),
        "validation": len(datalist["validation"]),
        "dropped": dropped,
        "dropped_counts": {k: len(v) for k, v in dropped.items()},
        "failed": failed,
        "skipped": skipped,
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "settings": {k: v for k, v in settings.items() if k != "version"},
    }
    if settings.get("format") == "webdataset":
        result = _finish_shards(out_dir, journal, shard_records, datalist, report["settings"])
    else:
        result = out_dir / "datalist.json"
        _atomic_write_text(result, json.dumps(datalist, indent=2) + "\n")
    _atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    _report_png(report, out_dir / "report.png")
    logger.info("curated %d image(s) into %s: dropped %s, failed %d, skipped %d", len(items), out_dir,
                report["dropped_counts"], len(failed), len(skipped))
    return result


def _validation_files(file_keys: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """The source files (keys) whose units go to ``validation``: those whose :func:`_split_value`
    is below ``val_fraction``, and at least one file on each side when there are two or more."""
    val_files = {fk for fk in file_keys if _split_value(fk, seed) < val_fraction}
    ordered = sorted(set(file_keys), key=lambda fk: (_split_value(fk, seed), fk))
    if val_fraction > 0 and not val_files and len(ordered) >= 2:
        val_files = {ordered[0]}
    if val_fraction < 1 and len(val_files) == len(ordered) and len(ordered) >= 2:
        val_files.discard(ordered[-1])
    return val_files


def _finish_shards(out_dir: Path, journal: _Journal, records: list[dict[str, Any]],
                   datalist: dict[str, list[dict[str, Any]]], settings: dict[str, Any]) -> Path:
    """Write ``shards.json`` from the journaled shards, so that its splits are the datalist's.

    Units were placed by the plain hash rule as they were decided; the only samples in a shard of
    the other split are those of the one file :func:`_validation_files` moves when a split would
    be empty. They are written to a new shard of their split, then removed from their old shards
    (each step atomic and journaled, so a run killed in between finishes the move when rerun).
    """
    split_of = {Path(it["image"]).stem: split for split, items in datalist.items() for it in items}
    anatomy_of = {Path(it["image"]).stem: it.get("anatomy") for items in datalist.values() for it in items}
    folder = out_dir / shards.SHARDS_FOLDER
    latest: dict[str, dict[str, Any]] = {}  # shard name -> its last record
    owner: dict[str, str] = {}  # sample key -> the shard that last took it
    for rec in records:
        latest[rec["shard"]] = rec
        owner.update((k, rec["shard"]) for k in rec["keys"])
    misplaced: dict[str, list[str]] = {s: [] for s in shards.SPLITS}
    for name, rec in latest.items():
        misplaced_here = [k for k in rec["keys"] if owner[k] == name and split_of.get(k, rec["split"]) != rec["split"]]
        for k in misplaced_here:
            misplaced[split_of[k]].append(k)
    for split, keys in misplaced.items():
        if not keys:
            continue
        wanted = set(keys)
        samples = [s for shard in sorted({owner[k] for k in keys}) for s in shards.read_shard(folder / shard)
                   if s[0] in wanted]
        name = shards.shard_name(max(shards.shard_number(n) for n in latest) + 1)
        shards.write_shard(folder / name, samples)
        rec = {"shard": name, "split": split, "keys": [s[0] for s in samples]}
        journal.write(rec)
        latest[name] = rec
        owner.update((k, name) for k in rec["keys"])
    for name, rec in list(latest.items()):  # drop the moved samples from their old shards
        keep = [k for k in rec["keys"] if owner[k] == name]
        if len(keep) == len(rec["keys"]):
            continue
        if keep:
            wanted = set(keep)
            shards.write_shard(folder / name, [s for s in shards.read_shard(folder / name) if s[0] in wanted])
        else:
            (folder / name).unlink(missing_ok=True)
        latest[name] = {"shard": name, "split": rec["split"], "keys": keep}
        journal.write(latest[name])
    journal.close()
    listed = [{"name": n, "split": r["split"], "keys": r["keys"]}
              for n, r in sorted(latest.items(), key=lambda nr: shards.shard_number(nr[0])) if r["keys"]]
    missing = len(split_of) - sum(len(s["keys"]) for s in listed)
    if missing:  # a file that vanished between a kill and the resume: its kept frames could not be written
        logger.warning("%d kept image(s) are in no shard (their source files could not be read again)", missing)
    return shards.write_index(out_dir, listed, anatomy_of, settings)


def _report_png(report: dict[str, Any], path: Path) -> None:
    """Bar charts of the counts (region, organ, source, modality) and of the drops."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(f"kept per {k}", report["counts"][k]) for k in ("region", "organ", "source", "modality")]
    panels.append(("dropped / failed / skipped", {**report["dropped_counts"], "failed": len(report["failed"]),
                                                    "skipped": len(report["skipped"])}))
    fig = Figure(figsize=(15, 8), dpi=80)
    FigureCanvasAgg(fig)
    for i, (title, data) in enumerate(panels):
        ax = fig.add_subplot(2, 3, i + 1)
        names, values = list(data), list(data.values())
        ax.barh(range(len(values)), values, color="tab:blue" if i < 4 else "tab:red")
        ax.set_yticks(range(len(values)), [str(n)[-32:] for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v}", va="center", fontsize=7)
    ax = fig.add_subplot(2, 3, 6)
    ax.axis("off")
    ax.text(0.0, 0.9, f"kept: {report['kept']} of {report['units']} units\n"
            f"training {report['training']}, validation {report['validation']}", fontsize=11, va="top")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
