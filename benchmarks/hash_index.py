"""Driver-side deduplication at scale: memory and lookup time of curation's HashIndex.

``python benchmarks/hash_index.py [--n 1000000] [--queries 2000] [--threshold 6]``

Adds ``n`` synthetic 64-bit perceptual hashes (uniformly random, with 24-hex-digit tags as curation
stores) to a :class:`echocare.datasets.curation.HashIndex`, then times ``queries`` lookups of
fresh random hashes (the common case: a new image, no near duplicate) and of near copies (an
added hash with ``threshold`` bits flipped: found). Prints one JSON line: the driver's resident
memory growth per million hashes (MB; after the adds, and at its peak while the index merged its
recent hashes into its rows), the time per add and per lookup (microseconds, wall clock and CPU),
with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time

from echocare.datasets.curation import HashIndex


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(run, count: int) -> tuple[int, float, float]:
    """(run's result, wall and CPU microseconds per item of ``count``): CPU time is what a shared,
    loaded machine distorts least."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = run()
    return result, (time.perf_counter() - t0) / count * 1e6, (time.process_time() - c0) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--threshold", type=int, default=6)
    args = parser.parse_args()
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(args.n)]
    tags = [f"{i:024x}.png" for i in range(args.n)]
    before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    index = HashIndex(args.threshold)
    for h, tag in zip(hashes, tags):
        index.add(h, tag)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    grown = _rss_mb() - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    fresh = [rng.getrandbits(64) for _ in range(args.queries)]
    misses, fresh_us, fresh_cpu_us = _timed(lambda: sum(index.query(h) is None for h in fresh), args.queries)
    near = []
    for h in rng.sample(hashes, args.queries):
        for bit in rng.sample(range(64), args.threshold):
            h ^= 1 << bit
        near.append(h)
    hits, near_us, near_cpu_us = _timed(lambda: sum(index.query(h) is not None for h in near), args.queries)
    per_million = 1e6 / args.n
    print(json.dumps({"hashes": args.n, "threshold": args.threshold, "index_mb": round(grown, 1),
                      "index_mb_per_million": round(grown * per_million, 1),
                      "index_peak_mb_per_million": round(peak * per_million, 1),
                      "add_us": round(build_s / args.n * 1e6, 1), "add_cpu_us": round(build_cpu_s / args.n * 1e6, 1),
                      "lookup_us_new": round(fresh_us, 1), "lookup_us_near_copy": round(near_us, 1),
                      "lookup_cpu_us_new": round(fresh_cpu_us, 1), "lookup_cpu_us_near_copy": round(near_cpu_us, 1),
                      "new_found_unique": misses, "near_copies_found": hits, "queries": args.queries,
                      "load_average": [round(x, 1) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
