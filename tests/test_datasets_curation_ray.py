"""Tests of echocare.datasets.curation_ray (`echocare curate --engine ray`): the same result as the
local engine, a killed Ray worker retried, a killed driver resumed, the local instance bound to
127.0.0.1 and gone after the run. One local Ray instance (2 CPUs, conftest's ``ray_cluster``), one
small corpus (9 files) and one local run of it per format (the reference) serve the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from process_helpers import LOOPBACK, cmdline, descendants, in_session, listening_addresses, pids
from test_datasets_curation import QUIET, SIZE, build_small, snapshot

from echocare.datasets.curation import CurationError, curate

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ fixtures


#: The settings of every run here; webdataset shards of 2 samples, so that 8 kept images make
#: several shards per split and the first one is committed after the second file.
ARGS = dict(size=SIZE, frame_step=10, val_fraction=0.3, overlay=True, shard_size=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """The sources: 8 small PNGs and a 3-scene clip (9 files, more than the window of 2 CPUs),
    with an exact duplicate, a near duplicate and a blank, decided in the driver."""
    root = tmp_path_factory.mktemp("corpus")
    build_small(root, video=True)
    return [str(root / "breast"), str(root / "abdomen")]


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, corpus) -> dict[str, Path]:
    """The local engine's outputs on the corpus, format -> OUT: the reference every Ray run must equal."""
    root = tmp_path_factory.mktemp("local")
    runs = {fmt: root / fmt for fmt in ("images", "webdataset")}
    for fmt, out in runs.items():
        curate(corpus, None, str(out), workers=1, format=fmt, **ARGS, **QUIET)
    report = json.loads((runs["images"] / "report.json").read_text())
    assert report["kept"] == 8 and report["failed"] == [] and sum(report["dropped_counts"].values()) == 3
    assert len(json.loads((runs["webdataset"] / "shards.json").read_text())["training"]) >= 2
    return runs


def _done_files(out: Path) -> list[str]:
    return [json.loads(line)["k"] for line in (out / "progress.jsonl").read_text().splitlines()
            if '"done":true' in line]


def _assert_each_file_done_once(out: Path, reference: Path) -> None:
    done = _done_files(out)
    assert len(done) == len(set(done)) and sorted(done) == sorted(_done_files(reference))


# --------------------------------------------------------------------------- tests


def test_ray_engine_binds_loopback_only(ray_cluster):
    ours = [p for p in descendants(os.getpid())]
    addresses = listening_addresses(ours + [os.getpid()])
    assert addresses and addresses <= LOOPBACK, addresses


@pytest.mark.parametrize("fmt", ["images", "webdataset"])
def test_ray_gives_the_local_result(tmp_path, ray_cluster, corpus, local_runs, fmt):
    out = tmp_path / "ray"
    curate(corpus, None, str(out), workers=2, engine="ray", format=fmt, max_in_flight=3, **ARGS, **QUIET)
    assert snapshot(out) == snapshot(local_runs[fmt])  # datalist or shards + index, images, overlays, report
    _assert_each_file_done_once(out, local_runs[fmt])


def test_file_url_sources_read_by_ray_workers_match_local_paths(tmp_path, ray_cluster, corpus, local_runs):
    out = tmp_path / "remote"
    urls = [f"file://{src}" for src in corpus]
    curate(urls, None, str(out), workers=2, engine="ray", **ARGS, **QUIET)
    local = local_runs["images"]
    assert json.loads((out / "datalist.json").read_text()) == json.loads((local / "datalist.json").read_text())
    assert snapshot(out / "images") == snapshot(local / "images")
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 8 and report["settings"]["sources"] == urls


def test_memory_urls_are_refused_for_ray(tmp_path, ray_cluster):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ray_refusal/a.png", b"not read")
    try:
        with pytest.raises(CurationError, match="memory://ray_refusal: .*Ray workers cannot"):
            curate(["memory://ray_refusal"], None, str(tmp_path / "out"), engine="ray", **QUIET)
    finally:
        fs.rm("/ray_refusal", recursive=True)
    assert not (tmp_path / "out").exists()


def test_a_killed_ray_worker_is_retried_and_nothing_is_lost_or_duplicated(tmp_path, ray_cluster, corpus, local_runs):
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one_busy_worker() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            for pid in descendants(os.getpid()):
                if cmdline(pid).startswith("ray::curate_file"):  # a worker in the middle of a file
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    curate(corpus, None, str(out), workers=2, engine="ray", _delay=0.3, **ARGS, **QUIET)
    killer.join()
    assert killed, "no Ray worker was caught mid-file"
    assert snapshot(out) == snapshot(local_runs["images"])  # nothing lost: the reference has no failure
    _assert_each_file_done_once(out, local_runs["images"])


def test_a_killed_ray_driver_resumes_from_the_journal(tmp_path, ray_cluster, corpus, local_runs):
    out = tmp_path / "out"
    code = ("from echocare.datasets.curation import curate\n"
            f"curate({corpus!r}, None, {str(out)!r}, workers=2, engine='ray', ray_address={ray_cluster!r}, "
            f"format='webdataset', progress=False, _delay=0.5, max_in_flight=2, **{ARGS!r})\n")
    # max_in_flight=2: tasks of 2 files, so results come in pairs, not all 8 images in one burst that
    # could commit every shard before the run can be killed
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, start_new_session=True)
    journal = out / "progress.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if journal.exists() and '"shard"' in journal.read_text():  # a shard committed, 7 files to go
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.5)
        survivors = in_session(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if in_session(proc.pid):  # what the killed driver started (its session is ours to end)
            os.killpg(proc.pid, signal.SIGKILL)
    assert not survivors, [cmdline(p) for p in survivors]  # nothing the killed driver started outlives it
    assert not (out / "shards.json").exists()
    assert 0 < len(_done_files(out)) < len(_done_files(local_runs["webdataset"]))
    curate(corpus, None, str(out), workers=2, engine="ray", format="webdataset", **ARGS, **QUIET)
    assert snapshot(out) == snapshot(local_runs["webdataset"])
    _assert_each_file_done_once(out, local_runs["webdataset"])


def test_cli_ray_engine_starts_and_stops_its_own_loopback_instance(tmp_path, corpus):
    import shutil
    import tempfile

    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "echocare.cli", "curate", "--src", corpus[0], "--out", str(out),
                               "--size", str(SIZE), "--engine", "ray", "--workers", "1", "--progress", "false"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((out / "report.json").read_text())["kept"] == 4
        time.sleep(1.0)  # Ray's processes exit as the instance shuts down
        leftover = [p for p in pids() if ray_tmp in cmdline(p)]
        assert not leftover, [cmdline(p) for p in leftover]
    finally:
        for pid in [p for p in pids() if ray_tmp in cmdline(p)]:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------ driver logic, Ray stood in


class _RayError(Exception):
    pass


class _RayTaskError(_RayError):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _StandInRay:
    """Just what ``ray_ordered_map`` calls of Ray, run in this process: a task raises Ray's error
    when one of its files is ``poison`` (its worker killed on every try), and each submission is
    recorded, so the tasks' files can be checked."""

    exceptions = type("exceptions", (), {"RayError": _RayError, "RayTaskError": _RayTaskError})

    def __init__(self, poison: str, task_error: Exception | None = None) -> None:
        self.poison, self.submitted, self.task_error = poison, [], task_error

    def remote(self, **_options):
        def wrap(fn):
            stand_in = self

            class Remote:
                @staticmethod
                def remote(tasks, cfg):
                    stand_in.submitted.append([t.key for t in tasks])
                    return ("failed", None) if any(t.key == stand_in.poison for t in tasks) else ("ok", fn(tasks, cfg))
            return Remote
        return wrap

    def cluster_resources(self):
        return {"CPU": 2}

    def put(self, value):
        return value

    def get(self, ref):
        status, value = ref
        if status == "failed":
            raise _RayTaskError(self.task_error) if self.task_error else _RayError("worker died")
        return value

    def cancel(self, ref, force=False):
        pass


def _stand_in_map(monkeypatch, stand_in: _StandInRay):
    """``ray_ordered_map`` over 20 files (the tenth skipped) in tasks of 4, Ray stood in."""
    from contextlib import contextmanager

    from echocare.datasets import curation, curation_ray

    @contextmanager
    def session(address, workers):
        yield stand_in

    monkeypatch.setattr(curation_ray, "ray_session", session)
    monkeypatch.setattr(curation, "_process", lambda task, cfg: {"fmt": "png", "units": [task.key], "error": None})
    tasks = [curation._Task(key=f"src/f{k:02d}", display=f"f{k:02d}", path=f"f{k:02d}",
                            skip="not an image" if k == 9 else None) for k in range(20)]
    return tasks, curation_ray.ray_ordered_map(iter(tasks), {}, workers=2, max_in_flight=0, address=None, files_per_task=4)


def test_a_file_that_kills_every_worker_fails_alone_and_the_order_holds(monkeypatch) -> None:
    from echocare.datasets import curation_ray

    stand_in = _StandInRay(poison="src/f05")
    tasks, results = _stand_in_map(monkeypatch, stand_in)
    out = list(results)

    assert [t.key for t, _ in out] == [t.key for t in tasks]  # input order, every file once
    failed = {t.key: r["error"] for t, r in out if r.get("error")}
    assert failed == {"src/f05": curation_ray.LOST_RAY_WORKER}  # its task-mates were tried again alone
    assert all(r == {} for t, r in out if t.key == "src/f09")  # the skipped file never submitted
    assert [r["units"] for t, r in out if t.key not in failed and t.skip is None] == [
        [t.key] for t in tasks if t.key != "src/f05" and t.skip is None]
    # tasks of 4 consecutive files, cut before the skipped one; the failed task's files retried one per task
    assert stand_in.submitted[:2] == [["src/f00", "src/f01", "src/f02", "src/f03"], ["src/f04", "src/f05", "src/f06", "src/f07"]]
    assert ["src/f08"] in stand_in.submitted and ["src/f05"] in stand_in.submitted
    assert sorted(k for task in stand_in.submitted for k in task if k != "src/f05") == sorted(
        [t.key for t in tasks if t.skip is None and t.key != "src/f05"] + ["src/f04", "src/f06", "src/f07"])


def test_workers_that_cannot_run_the_code_stop_the_run_with_one_line(monkeypatch) -> None:
    """A task whose code raised (not a dead worker: ``_process`` reports each file's own errors)
    means the workers' environment is wrong: one line naming the cause, not every file 'lost'."""
    stand_in = _StandInRay(poison="src/f05", task_error=ModuleNotFoundError("No module named 'echocare'"))
    _, results = _stand_in_map(monkeypatch, stand_in)
    with pytest.raises(CurationError, match=r"Ray workers could not run the curation of f04 \(ModuleNotFoundError: "
                                            r"No module named 'echocare'\); every node needs"):
        list(results)
