"""Benchmark of `echocare curate`: images per second and peak memory.

Runs the curation pipeline at 1x and 4x the input, with 1 and 2 workers, against a naive
single-process loop over the same files (decode + resize + write, no crop, no dedup), each
in a fresh subprocess, and writes the table to the "Curation" section of
``benchmarks/README.md``.

The input is real ultrasound (BUS-BRA, HC18, DDTI and carotid images, masks left out,
taken in turn from each data set) from ``--data`` (default ``$ECHOCARE_DATA`` or
``../shared/data``), linked into a temporary folder: ``--n`` images at 1x, ``4 * n`` at 4x.

    python benchmarks/curate.py [--data DIR] [--n 100] [--size 256] [--no-readme]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"

# Runs inside the subprocess: times the work only (not the imports), reports peak RSS of
# the process itself and of its largest child (the workers).
_RUNNER = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
mode, src, out, size, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from echocare.datasets.curation import curate, resize_pad
from echocare.io.readers import iter_frames
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if mode == "naive":
    from PIL import Image
    Path(out).mkdir(parents=True)
    units = 0
    for i, f in enumerate(sorted(Path(src).rglob("*"))):
        if not f.is_file():
            continue
        for j, frame in enumerate(iter_frames(f, step=10)):
            u8 = np.clip(np.rint(frame * 255), 0, 255).astype(np.uint8)
            Image.fromarray(resize_pad(u8, size)).save(Path(out) / f"{i}_{j}.png")
            units += 1
else:
    curate([src], None, out, size=size, workers=workers, progress=False)
    units = json.loads((Path(out) / "report.json").read_text())["units"]
elapsed = time.perf_counter() - t0
print(json.dumps({"units": units, "seconds": elapsed,
                  "rss_after_import_mb": rss0 / 1024,
                  "peak_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _data_root(arg: str | None) -> Path:
    root = Path(arg or os.environ.get("ECHOCARE_DATA") or ROOT.parent / "shared" / "data")
    if not root.is_dir():
        sys.exit(f"no real data at {root}: pass --data or set ECHOCARE_DATA")
    return root


def _pool(root: Path) -> list[Path]:
    """Real images in a fixed order, taken in turn from each data set (masks left out)."""
    sets = []
    for name in ("busbra", "hc18", "ddti", "carotid"):
        files = sorted(p for p in (root / name).rglob("*.png") if "mask" not in str(p.relative_to(root)).lower())
        if files:
            sets.append(files)
    pool = []
    for k in range(max(len(s) for s in sets)):
        pool.extend(s[k] for s in sets if k < len(s))
    return pool


def _link_input(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        (folder / f"{i:05d}_{f.name}").symlink_to(f)


def _run(mode: str, src: Path, out: Path, size: int, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", _RUNNER, mode, str(src), str(out), str(size), str(workers)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _busy(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def _parallel_capacity() -> float:
    """Speed-up of 2 processes over 1 on a pure-CPU loop: what the machine gives now."""
    import multiprocessing as mp
    import time

    times = []
    for w in (1, 2):
        t = time.perf_counter()
        with mp.get_context("fork").Pool(w) as pool:
            pool.map(_busy, [2_000_000] * 8)
        times.append(time.perf_counter() - t)
    return times[0] / times[1]


def _table(rows: list[dict]) -> str:
    lines = ["| run | input | workers | units | seconds | images/s | peak RSS main (MB) | peak RSS worker (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        child = f"{r['peak_child_mb']:.0f}" if r["workers"] > 1 else "-"
        lines.append(f"| {r['mode']} | {r['scale']} | {r['workers']} | {r['units']} | {r['seconds']:.1f} | "
                     f"{r['units'] / r['seconds']:.1f} | {r['peak_main_mb']:.0f} | {child} |")
    return "\n".join(lines)


def _write_readme(section: str) -> None:
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Curation\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--n", type=int, default=100, help="images at 1x (4x is 4 * n)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()

    pool = _pool(_data_root(args.data))
    if len(pool) < 4 * args.n:
        sys.exit(f"only {len(pool)} images; --n at most {len(pool) // 4}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="echocare_bench_") as tmp:
        tmp = Path(tmp)
        for scale, k in (("1x", 1), ("4x", 4)):
            src = tmp / f"in_{scale}"
            _link_input(pool[: k * args.n], src)
            configs = [("naive", 1), ("curate", 1), ("curate", 2)]
            for mode, workers in configs:
                out = tmp / f"out_{scale}_{mode}_{workers}"
                r = _run(mode, src, out, args.size, workers)
                r.update(mode=mode, scale=f"{scale} ({k * args.n} files)", workers=workers)
                rows.append(r)
                print(f"{mode:7s} {scale} workers={workers}: {r['units']} units, {r['seconds']:.1f} s, "
                      f"{r['units'] / r['seconds']:.1f} img/s, peak main {r['peak_main_mb']:.0f} MB, "
                      f"worker {r['peak_child_mb']:.0f} MB", flush=True)
    table = _table(rows)
    print(table)
    cpu = os.cpu_count()
    capacity = _parallel_capacity()
    section = (
        "## Curation\n\n"
        "`python benchmarks/curate.py` (`echocare curate` on real images: BUS-BRA, HC18, DDTI and carotid,\n"
        f"masks left out, taken in turn from each set; output {args.size}x{args.size}; {cpu} CPU cores).\n"
        "`naive` is a single-process loop over the same files: decode, resize, write (no crop, no hashing,\n"
        "no dedup, no journal). `curate` adds the echo-region crop, exact and perceptual hashes, near-duplicate\n"
        "search, the resume journal, report and datalist. Each run is a fresh process; seconds count the\n"
        "work, not the imports. Peak RSS includes the imported libraries (about 600 MB: torch/MONAI come in\n"
        "with `echocare.data`); the main process's peak stays flat from 1x to 4x (streaming: only hashes\n"
        "are kept); forked workers share the parent's pages, which their RSS counts again.\n\n"
        + table + "\n\n"
        f"On this machine a pure-CPU loop ran {capacity:.2f}x faster with 2 processes than with 1 when the\n"
        "benchmark ended: the worker rows can only scale as far as that.\n\n"
        "Data: BUS-BRA (Gómez-Flores et al., Med Phys 2023), HC18 (van den Heuvel et al., PLoS One 2018,\n"
        "CC BY 4.0), DDTI (Pedraza et al., SPIE 2015), carotid (Momot, Mendeley Data, CC BY 4.0).\n"
    )
    if not args.no_readme:
        _write_readme(section)
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
