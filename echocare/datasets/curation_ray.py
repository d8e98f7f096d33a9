"""Curation on Ray (``echocare curate ... --engine ray [--ray-address ADDR]``).

The per-file work (read, decode, check, crop, hash, resize, encode: :func:`curation._process`,
the same function the local process pool runs) runs as Ray tasks across the cluster; everything
else stays in the driver, unchanged: the inputs are enumerated lazily in their fixed order, every
keep/drop decision is taken there in that order, and the journal is written there. So the result
is the local run's: the same ``datalist.json``, byte-identical images, the same shards.

- Backpressure: at most ``max_in_flight`` files (default 4 per CPU of the cluster) are submitted
  and not yet consumed; results are taken in input order (``ray.wait`` on the oldest), so the
  driver's memory does not grow with the input.
- Each input is submitted as exactly one task. A task whose worker dies (killed, out of memory,
  node lost) is retried by Ray up to :data:`RETRIES` times; after that the file is reported as
  failed with :data:`LOST_RAY_WORKER` and the run goes on.
- A killed driver takes its tasks with it (Ray ends a dead driver's job); rerunning resumes from
  the journal exactly as the local engine does.
- Without ``--ray-address`` a local Ray instance with ``workers`` CPUs is started for the run and
  shut down at its end: bound to 127.0.0.1, no dashboard. With an address the run joins that
  cluster (see docs/scaling.md for starting one and the ports it opens). When Ray is already
  initialised in this process (a notebook, the tests), that instance is used
  (:func:`echocare.ray_cluster.ray_session`, shared with ``echocare predict --engine ray``).

Workers read the inputs themselves: local paths must be on a file system every node mounts at the
same path; fsspec URLs (``s3://...``, with ``s3fs`` installed) are read by the worker through
fsspec. With ``--format images`` the workers write ``OUT/images`` (so ``OUT`` must be shared too on
several nodes); with ``--format webdataset`` they return the encoded images and only the driver
writes (``OUT`` is needed on the driver's machine only, except for ``--overlay``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from echocare.datasets import curation
from echocare.ray_cluster import ray_session

__all__ = ["ray_ordered_map", "RETRIES", "LOST_RAY_WORKER"]

logger = logging.getLogger(__name__)

#: Retries of a file whose Ray worker died (Ray's own default for tasks).
RETRIES = 3
#: The error of a file whose Ray worker died on every try.
LOST_RAY_WORKER = (f"a Ray worker died while reading this file (killed, out of memory, or its node was lost); "
                   f"retried {RETRIES} times")


def curate_file(task: curation._Task, cfg: dict[str, Any]) -> dict[str, Any]:
    """One file's units (the Ray task body; named so that ``ray::curate_file`` is its process title)."""
    return curation._process(task, cfg)


def ray_ordered_map(tasks: Iterable[curation._Task], cfg: dict[str, Any], workers: int, max_in_flight: int,
                    address: str | None) -> Iterator[tuple[curation._Task, dict[str, Any]]]:
    """(task, result) in task order, the per-file work running as Ray tasks.

    Args:
        tasks: the files, in input order (a lazy iterator: read as the window allows).
        cfg: the per-file settings (:func:`curation._process`).
        workers: CPUs of the local instance started when there is no ``address``.
        max_in_flight: files submitted and not yet consumed; 0: 4 per CPU of the cluster.
        address: the Ray cluster to join, or None.
    """
    with ray_session(address, workers) as ray:
        remote = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(curate_file)
        cpus = int(ray.cluster_resources().get("CPU", workers)) or 1
        window = max_in_flight or 4 * cpus
        cfg_ref = ray.put(cfg)
        pending: deque[tuple[curation._Task, Any]] = deque()

        def pop() -> tuple[curation._Task, dict[str, Any]]:
            task, ref = pending.popleft()
            if ref is None:  # skipped or known unreadable: never submitted
                return task, {}
            ray.wait([ref], num_returns=1)
            try:
                return task, ray.get(ref)
            except ray.exceptions.RayError as exc:
                logger.warning("%s (reported as failed): %s", LOST_RAY_WORKER, type(exc).__name__)
                return task, {"fmt": None, "units": [], "error": LOST_RAY_WORKER}

        try:
            for task in tasks:
                runnable = task.skip is None and task.problem is None
                pending.append((task, remote.remote(task, cfg_ref) if runnable else None))
                while len(pending) > window or (pending and pending[0][1] is None):
                    yield pop()
            while pending:
                yield pop()
        finally:
            for _, ref in pending:  # the driver stopped early (an error): end the work in flight
                if ref is not None:
                    ray.cancel(ref, force=True)
