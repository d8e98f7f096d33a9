"""Curation on Ray (``echocare curate ... --engine ray [--ray-address ADDR]``).

The per-file work (read, decode, check, crop, hash, resize, encode: :func:`curation._process`,
the same function the local process pool runs) runs as Ray tasks across the cluster; everything
else stays in the driver, unchanged: the inputs are enumerated lazily in their fixed order, every
keep/drop decision is taken there in that order, and the journal is written there. So the result
is the local run's: the same ``datalist.json``, byte-identical images, the same shards.

- Files go to Ray in tasks of :data:`FILES_PER_TASK` consecutive files, so the driver's cost of a
  task (submit, wait, fetch) is shared by several files.
- Backpressure: at most ``max_in_flight`` files (default ``4 x FILES_PER_TASK`` per CPU of the
  cluster) are submitted and not yet consumed; results are taken in input order (the oldest task
  first), so the driver's memory does not grow with the input.
- Each input is in exactly one task. A task whose worker dies (killed, out of memory, node lost)
  is retried by Ray up to :data:`RETRIES` times; if it still fails, its files are tried again one
  per task, so only a file that kills its worker every time is reported failed, with
  :data:`LOST_RAY_WORKER`, and the run goes on.
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

__all__ = ["ray_ordered_map", "FILES_PER_TASK", "RETRIES", "LOST_RAY_WORKER"]

logger = logging.getLogger(__name__)

#: Retries of a file whose Ray worker died (Ray's own default for tasks).
RETRIES = 3
#: The error of a file whose Ray worker died on every try.
LOST_RAY_WORKER = (f"a Ray worker died while reading this file (killed, out of memory, or its node was lost); "
                   f"retried {RETRIES} times")


#: Consecutive files per Ray task. With one task per file, submitting, waiting for and fetching
#: each task cost the driver about 2.5 ms of CPU per file (``benchmarks/scale.py``,
#: ``driver_cpu_ms_per_input``), which capped one driver near 400 files/s whatever the cluster's size.
FILES_PER_TASK = 8


def curate_files(tasks: list[curation._Task], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The units of each file of ``tasks``, in order (the Ray task body; named so that
    ``ray::curate_files`` is its process title)."""
    return [curation._process(task, cfg) for task in tasks]


def ray_ordered_map(tasks: Iterable[curation._Task], cfg: dict[str, Any], workers: int, max_in_flight: int,
                    address: str | None, files_per_task: int = FILES_PER_TASK,
                    ) -> Iterator[tuple[curation._Task, dict[str, Any]]]:
    """(task, result) in task order, the per-file work running as Ray tasks of ``files_per_task`` files.

    Args:
        tasks: the files, in input order (a lazy iterator: read as the window allows).
        cfg: the per-file settings (:func:`curation._process`).
        workers: CPUs of the local instance started when there is no ``address``.
        max_in_flight: files submitted and not yet consumed; 0: ``4 x files_per_task`` per CPU of
            the cluster.
        address: the Ray cluster to join, or None.
        files_per_task: consecutive runnable files per Ray task (at most ``max_in_flight``).
    """
    with ray_session(address, workers) as ray:
        remote = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(curate_files)
        cpus = int(ray.cluster_resources().get("CPU", workers)) or 1
        window = max_in_flight or 4 * cpus * files_per_task
        per_task = max(1, min(files_per_task, window))
        cfg_ref = ray.put(cfg)
        # (files, ref) in input order; ref None: skipped or known unreadable, never submitted
        pending: deque[tuple[list[curation._Task], Any]] = deque()
        batch: list[curation._Task] = []
        queued = 0  # files in pending

        def submit() -> None:
            nonlocal batch, queued
            if batch:
                pending.append((batch, remote.remote(batch, cfg_ref)))
                queued += len(batch)
                batch = []

        def results_of(files: list[curation._Task], ref: Any) -> list[dict[str, Any]]:
            if ref is None:
                return [{} for _ in files]
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                # _process reports every file's own errors: the task's code itself could not run
                # (the workers' environment), which no retry and no other file would change
                cause = getattr(exc, "cause", None) or exc
                raise curation.CurationError(
                    f"Ray workers could not run the curation of {files[0].display} "
                    f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); every node "
                    f"needs the same Python environment with echocare installed (pip install 'echocare[scale]')"
                ) from None
            except ray.exceptions.RayError as exc:
                if len(files) == 1:
                    logger.warning("%s (reported as failed): %s", LOST_RAY_WORKER, type(exc).__name__)
                    return [{"fmt": None, "units": [], "error": LOST_RAY_WORKER}]
                # one file may kill its worker every time: alone, only that file is lost
                singles = [remote.remote([task], cfg_ref) for task in files]
                return [results_of([task], single)[0] for task, single in zip(files, singles)]

        def pop() -> list[tuple[curation._Task, dict[str, Any]]]:
            nonlocal queued
            files, ref = pending.popleft()
            queued -= len(files) if ref is not None else 0
            return list(zip(files, results_of(files, ref)))

        try:
            for task in tasks:
                if task.skip is None and task.problem is None:
                    batch.append(task)
                    if len(batch) >= per_task:
                        submit()
                else:
                    submit()  # what came before it goes first
                    pending.append(([task], None))
                while queued > window or (pending and pending[0][1] is None):
                    yield from pop()
            submit()
            while pending:
                yield from pop()
        finally:
            for _, ref in pending:  # the driver stopped early (an error): end the work in flight
                if ref is not None:
                    ray.cancel(ref, force=True)
