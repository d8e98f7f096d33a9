"""Scaling of `echocare curate`: the local and Ray engines at 1 and 2 workers, at two corpus sizes.

    python benchmarks/scale.py --out FILE [--quick] [--sizes N,M] [--image-side 96] [--size 128]

A synthetic corpus of phantom ultrasound images (``--image-side`` pixels square, at most 128;
every file a different scene, so nearly all are kept and the driver's index grows with the
input) is generated on the fly into a temporary folder: the largest size once, the smaller
sizes as hard links to its first files. Sizes: 20,000 and 80,000 files by default, 500 and 2,000
with ``--quick`` (meant to finish within 20 minutes on 2 cores), or ``--sizes``.

Each run is ``curate`` in its own subprocess (``--engine local`` or ``ray`` with ``--workers`` 1
and 2; Ray starts its own local instance, as ``echocare curate --engine ray`` does, and that start
is part of the run's time). Per run: ``images_per_s`` (units curated per second of the ``curate``
call), ``driver_peak_rss_mb`` (``ru_maxrss`` of the curate driver process only: the process that
enumerates, decides and journals; imported libraries included) and ``worker_peak_rss_mb`` (the
largest peak RSS among its worker processes: the forked pool's for ``local``, the ``ray::``
processes for ``ray``; null for ``local`` with 1 worker, which works in the driver). Forked
workers share the driver's pages, which their RSS counts again. ``driver_cpu_ms_per_input`` is the
driver process's own CPU time (user + system) per input: with several workers it is what one
driver spends enumerating, deciding, journalling and (``ray``) submitting and collecting, so
``1000 / driver_cpu_ms_per_input`` bounds the images per second one driver can take in.

Writes ``{"runs": [{"engine", "workers", "inputs", "images_per_s", "driver_peak_rss_mb",
"worker_peak_rss_mb", ...}, ...], ...}``: each run also gives its seconds, units, kept images and a
digest of its outputs (``datalist.json`` and the images), and the file says per size whether every
run wrote the same outputs, and per engine and workers the driver's peak RSS at the largest size
over the smallest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZES = (20_000, 80_000)
QUICK_SIZES = (500, 2_000)
#: (engine, workers) of every size's runs.
CONFIGS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))
#: Phantom files per folder of the corpus.
FOLDER_FILES = 1000

# Runs in the subprocess: one curate call, timed; the driver's peak RSS, and the workers' peaks
# (local: the pool is the driver's only children, reaped at the end; ray: the "ray::" processes
# under the instance this driver starts, sampled from /proc while they live).
_RUNNER = r"""
import json, os, resource, sys, threading, time
from pathlib import Path
engine, workers, src, out, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
from echocare.datasets.curation import curate

def descendants(root):
    parents = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                parents[int(p)] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier}
        found += frontier
    return found

peak_kb = 0
done = threading.Event()

def sample_ray_workers():
    global peak_kb
    while not done.is_set():
        for pid in descendants(os.getpid()):
            try:
                if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kb = max(peak_kb, int(line.split()[1]))
            except OSError:
                pass
        done.wait(0.2)

rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sampler = threading.Thread(target=sample_ray_workers, daemon=True)
if engine == "ray":
    sampler.start()
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
curate([src], None, out, size=size, workers=workers, engine=engine, progress=False)
seconds = time.perf_counter() - t0
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
driver_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
done.set()
if engine == "ray":
    sampler.join()
else:
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if workers > 1 else 0
report = json.loads((Path(out) / "report.json").read_text())
print(json.dumps({"seconds": seconds, "units": report["units"], "kept": report["kept"],
                  "driver_cpu_ms_per_input": 1000 * driver_cpu_s / max(report["units"], 1),
                  "driver_rss_after_import_mb": rss_after_import / 1024,
                  "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": peak_kb / 1024 if peak_kb else None}))
"""


def _write_phantoms(root: str, numbers: range, side: int) -> None:
    """Phantom PNGs with the given numbers into ``root`` (one generating process's share)."""
    import numpy as np
    from PIL import Image

    from echocare.phantoms.renderer import PRETRAIN_ANATOMIES, make_phantom_image

    organs = list(PRETRAIN_ANATOMIES)
    for k in numbers:
        image, _ = make_phantom_image(np.random.default_rng(k), side, organ=organs[k % len(organs)])
        Image.fromarray(image).save(Path(root) / f"part{k // FOLDER_FILES:03d}" / f"phantom{k:06d}.png")


def make_corpus(root: Path, sizes: list[int], side: int, processes: int) -> dict[int, Path]:
    """A folder of ``n`` phantom files per size in ``sizes``: the largest generated (in parallel),
    each smaller one hard links to its first files."""
    largest = max(sizes)
    full = root / f"inputs_{largest}"
    full.mkdir(parents=True)
    for k in range((largest + FOLDER_FILES - 1) // FOLDER_FILES):
        (full / f"part{k:03d}").mkdir()
    # Forked processes, not a pool: this file may be loaded under a name pickling cannot import.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_phantoms, args=(str(full), range(p, largest, processes), side))
             for p in range(processes)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        sys.exit(f"generating the phantom corpus in {full} failed")
    folders = {largest: full}
    for n in sorted(set(sizes) - {largest}):
        folder = root / f"inputs_{n}"
        for k in range(n):
            name = Path(f"part{k // FOLDER_FILES:03d}") / f"phantom{k:06d}.png"
            (folder / name.parent).mkdir(parents=True, exist_ok=True)
            os.link(full / name, folder / name)
        folders[n] = folder
    return folders


def outputs_digest(out: Path) -> str:
    """SHA-256 over ``datalist.json`` and every image of a curate output, by relative path."""
    digest = hashlib.sha256()
    for path in [out / "datalist.json", *sorted((out / "images").iterdir())]:
        digest.update(str(path.relative_to(out)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_once(engine: str, workers: int, src: Path, out: Path, size: int) -> dict:
    """One curate run in a fresh subprocess; its measures and outputs digest (the output removed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)  # each ray run starts (and stops) its own local instance
    proc = subprocess.run([sys.executable, "-c", _RUNNER, engine, str(workers), str(src), str(out), str(size)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"curate --engine {engine} --workers {workers} on {src} failed:\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    measured["output_sha256"] = outputs_digest(out)
    shutil.rmtree(out)  # ours: written by this run
    return measured


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} instead of {FULL_SIZES}")
    ap.add_argument("--sizes", default=None, help="comma-separated corpus sizes (overrides --quick)")
    ap.add_argument("--image-side", type=int, default=96, help="side of the phantom files (at most 128)")
    ap.add_argument("--size", type=int, default=128, help="side of the curated images")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if args.quick else FULL_SIZES)
    if not sizes or min(sizes) < 1:
        ap.error(f"--sizes: positive numbers of files, got {args.sizes!r}")
    if not 8 <= args.image_side <= 128:
        ap.error(f"--image-side: 8 to 128 pixels, got {args.image_side}")
    sizes = sorted(set(sizes))
    runs = []
    with tempfile.TemporaryDirectory(prefix="echocare_scale_") as tmp:
        folders = make_corpus(Path(tmp) / "corpus", sizes, args.image_side, min(2, os.cpu_count() or 1))
        for n in sizes:
            for engine, workers in CONFIGS:
                measured = run_once(engine, workers, folders[n], Path(tmp) / "out", args.size)
                run = {"engine": engine, "workers": workers, "inputs": n,
                       "images_per_s": round(measured["units"] / measured["seconds"], 2),
                       "driver_peak_rss_mb": round(measured["driver_peak_rss_mb"], 1),
                       "worker_peak_rss_mb": (None if measured["worker_peak_rss_mb"] is None
                                              else round(measured["worker_peak_rss_mb"], 1)),
                       "driver_cpu_ms_per_input": round(measured["driver_cpu_ms_per_input"], 3),
                       "seconds": round(measured["seconds"], 2), "units": measured["units"],
                       "kept": measured["kept"],
                       "driver_rss_after_import_mb": round(measured["driver_rss_after_import_mb"], 1),
                       "output_sha256": measured["output_sha256"]}
                runs.append(run)
                print(json.dumps(run), flush=True)
    by_config = {(r["engine"], r["workers"], r["inputs"]): r for r in runs}
    result = {
        "runs": runs,
        "sizes": sizes,
        "quick": bool(args.quick and not args.sizes),
        "image_side": args.image_side,
        "size": args.size,
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "outputs_equal": {str(n): len({r["output_sha256"] for r in runs if r["inputs"] == n}) == 1 for n in sizes},
        "driver_peak_rss_ratio": [
            {"engine": e, "workers": w, "inputs": [sizes[0], sizes[-1]],
             "ratio": round(by_config[(e, w, sizes[-1])]["driver_peak_rss_mb"]
                            / by_config[(e, w, sizes[0])]["driver_peak_rss_mb"], 3)}
            for e, w in CONFIGS],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
