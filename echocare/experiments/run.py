"""Repeated trials of a bundle: ``echocare experiment`` (:func:`run_experiment`).

Runs the grid init x seed x fraction through the bundle's own configs (``train.yaml``
[+ overlays], then ``evaluate.yaml``), each grid cell in its own subprocess (so one crash
is reported and the grid goes on) under ``<output_dir>/runs/<run name>/``. Every cell is
one MLflow run in the experiment NAME of one shared tracking store (default
``<output_dir>/mlruns.db``; ``MLFLOW_TRACKING_URI`` or ``tracking_uri`` otherwise), named
``<NAME>_<init>_s<seed>_f<fraction>`` and tagged ``init``, ``init_path``, ``seed``,
``fraction``, ``bundle``, ``echocare.status``. The training run keeps MONAI's per-epoch
validation metrics (``mean_dice``, ``accuracy``, ... as named in docs/architecture.md) and
``train_loss``; afterwards the evaluation summary is logged on the same run as
``final_<metric>`` (with ``eval/`` as artifacts) and the times as ``wall_time_s``,
``train_time_s``, ``eval_time_s``. ``echocare.status = finished`` is set last: rerunning the
same command skips finished runs and reruns the others from scratch (their MLflow run is
deleted and their folder emptied first). A run folder holding files the experiment did not
write (no ``spec.json``) refuses the grid before any run; a grid whose bundle lacks a required id
(``--datalist``) is refused before its first run starts.
"""

from __future__ import annotations

import ast
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from echocare.bundle import MissingIdError, resolve_bundle, resolve_overlays, split_values
from echocare.bundle import tracking_uri as bundle_tracking_uri
from echocare.tracking import check_tracking_server
from echocare.experiments.common import (
    ROLE_TAG,
    STATUS_TAG,
    find_experiment,
    format_number,
    fraction_text,
    mlflow_client,
    safe_name,
    search_all_runs,
)

__all__ = [
    "GridCell",
    "format_run_table",
    "grid_cells",
    "main",
    "parse_fractions",
    "parse_inits",
    "parse_overrides",
    "parse_seeds",
    "run_cell",
    "run_experiment",
]

#: Bundle ids that the grid sets for each run (overriding them would break the grid).
GRID_IDS = frozenset({"output_dir", "seed", "train_fraction", "pretrained_path", "tracking", "tracking_uri",
                      "experiment_name", "run_name"})


# ----------------------------------------------------------------------------- parsing


def parse_inits(inits: Any) -> list[tuple[str, str]]:
    """``scratch,PATH,LABEL=PATH`` -> ``[(label, path)]``; ``scratch`` (or ``none``) has path ``""``.

    A path's label is its file stem (``encoder.pt`` -> ``encoder``), made unique with its
    parent folder when two stems clash; ``LABEL=PATH`` names it explicitly.
    """
    parsed: list[tuple[str | None, str]] = []
    for item in split_values(inits) or ["scratch"]:
        item = str(item)
        if item.lower() in ("scratch", "none", ""):
            parsed.append(("scratch", ""))
            continue
        label, sep, path = item.partition("=")
        if sep and "/" not in label and os.sep not in label:
            parsed.append((label, str(Path(path).expanduser().resolve())))
        else:
            parsed.append((None, str(Path(item).expanduser().resolve())))
    stems = [Path(p).stem for label, p in parsed if label is None]
    out: list[tuple[str, str]] = []
    for label, path in parsed:
        if label is None:
            stem = Path(path).stem
            label = stem if stems.count(stem) == 1 else f"{Path(path).parent.name}-{stem}"
        out.append((safe_name(label), path))
    labels = [label for label, _ in out]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"inits: the label(s) {duplicates} occur twice; name them with LABEL=PATH")
    return out


def parse_seeds(seeds: Any) -> list[int]:
    """``3`` -> ``[0, 1, 2]`` (that many seeds from 0); ``0,5,7`` or a list -> those seeds."""
    values = split_values(seeds)
    if len(values) == 1 and not isinstance(seeds, (list, tuple)):
        count = int(values[0])
        if count < 1:
            raise ValueError(f"seeds: need at least one, got {seeds!r}")
        return list(range(count))
    out = [int(v) for v in values]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds: need distinct seeds, got {seeds!r}")
    return out


def parse_fractions(fractions: Any) -> list[float]:
    """``0.1,0.25,1.0`` (or a list) -> sorted distinct floats in (0, 1]."""
    out = sorted({float(v) for v in split_values(fractions)}) or [1.0]
    bad = [f for f in out if not 0.0 < f <= 1.0]
    if bad:
        raise ValueError(f"train fractions must lie in (0, 1], got {bad}")
    return out


def _literal(text: str) -> Any:
    """A command-line value as the bundle CLI would read it: a Python literal, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(overrides: Any) -> dict[str, Any]:
    """``["ID=VALUE", ...]`` (or a dict) -> ``{ID: VALUE}``, values read as Python literals."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    items = overrides if isinstance(overrides, (list, tuple)) else ([overrides] if overrides else [])
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--override expects ID=VALUE, got {item!r}")
        out[key.strip().lstrip("-")] = _literal(value) if isinstance(value, str) else value
    return out


# ----------------------------------------------------------------------------- the grid


@dataclass
class GridCell:
    """One run of the grid."""

    init: str
    init_path: str
    seed: int
    fraction: float
    run_name: str
    run_dir: Path
    tags: dict[str, str] = field(default_factory=dict)


def grid_cells(name: str, inits: Any, seeds: Any, fractions: Any, output_dir: str | os.PathLike[str], bundle: str = "") -> list[GridCell]:
    """The runs of the grid, init-major then fraction then seed (so a partial grid is balanced early)."""
    cells = []
    for label, path in parse_inits(inits):
        for fraction in parse_fractions(fractions):
            for seed in parse_seeds(seeds):
                run_name = f"{safe_name(name)}_{label}_s{seed}_f{fraction_text(fraction)}"
                tags = {
                    "init": label, "init_path": path or "scratch", "seed": str(seed),
                    "fraction": fraction_text(fraction), "bundle": bundle, "echocare.experiment": name,
                    ROLE_TAG: "run",
                }
                cells.append(GridCell(label, path, seed, fraction, run_name, Path(output_dir) / "runs" / run_name, tags))
    return cells


@dataclass
class _GridPlan:
    """What every run of one grid shares."""

    name: str
    uri: str
    train_files: list[str]
    eval_files: list[str]
    common: dict[str, Any]
    evaluate: bool
    timeout: float | None
    ids_checked: bool = False


def _bundle_command(run_id: str, config_files: list[str], overrides: Mapping[str, Any]) -> str:
    """The equivalent ``python -m monai.bundle run`` command line (written beside each run)."""
    files = config_files[0] if len(config_files) == 1 else repr(config_files)
    args = ["python", "-m", "monai.bundle", "run", run_id, "--config_file", files]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return shlex.join(args)


def _cell_spec(cell: GridCell, plan: _GridPlan) -> dict[str, Any]:
    """The ``spec.json`` of one cell: config files and bundle ids of its training and evaluation."""
    per_run = {"output_dir": str(cell.run_dir.resolve()), "seed": cell.seed, "train_fraction": cell.fraction,
               "pretrained_path": cell.init_path}
    train = {**plan.common, **per_run, "tracking": "mlflow", "tracking_uri": plan.uri, "experiment_name": plan.name,
             "run_name": cell.run_name}
    evaluation = {**plan.common, **per_run} if plan.evaluate else None
    return {"train_files": plan.train_files, "train": train, "eval_files": plan.eval_files, "eval": evaluation,
            "timing": str(cell.run_dir / "timing.json")}


def _launch(spec_path: Path, log_path: Path, timeout: float | None) -> int:
    """Run one grid cell in a subprocess (``python -m echocare.experiments SPEC``); its output goes to LOG."""
    with log_path.open("w") as log:
        try:
            return subprocess.run([sys.executable, "-m", "echocare.experiments", str(spec_path)], stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[echocare experiment] killed after the {timeout} s timeout\n")
            return 124


def run_cell(spec: Mapping[str, Any]) -> None:
    """The subprocess side: the bundle's ``training`` then ``evaluating``, as ``python -m monai.bundle run`` does.

    Both workflows run in one process to save a second start-up of torch/MONAI per run.
    """
    from monai.bundle import run

    timing: dict[str, float] = {}
    start = time.time()
    run("training", config_file=spec["train_files"], **spec["train"])
    timing["train_time_s"] = time.time() - start
    if spec.get("eval") is not None:
        start = time.time()
        run("evaluating", config_file=spec["eval_files"], **spec["eval"])
        timing["eval_time_s"] = time.time() - start
    Path(spec["timing"]).write_text(json.dumps(timing))


def _runs_named(client, experiment_id: str, run_name: str) -> list:
    return search_all_runs(client, [experiment_id], f"attributes.run_name = '{run_name}'")


def _finished(runs: list) -> Any:
    return next((r for r in runs if r.data.tags.get(STATUS_TAG) == "finished"), None)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""



def _config_files(bundle: str, config: Any) -> tuple[str, list[str], list[str]]:
    """(bundle name, training config files, evaluation config files), overlays merged last."""
    bundle_name, configs = resolve_bundle(bundle)
    overlays = resolve_overlays(config, configs)
    train_files = [str(configs / "train.yaml"), *overlays]
    eval_files = [str(configs / "train.yaml"), str(configs / "evaluate.yaml"), *overlays]
    return bundle_name, train_files, eval_files


def _common_ids(dataset_dir: str | None, datalist: str | None, bundle_args: Mapping[str, Any], overrides: Any) -> dict[str, Any]:
    """The bundle ids every run gets (data paths made absolute); refuses the ids the grid sets itself."""
    common: dict[str, Any] = {}
    # A missing dataset would fail every run of the grid, one subprocess after the other.
    if dataset_dir:
        common["dataset_dir"] = str(Path(dataset_dir).expanduser().resolve())
        if not Path(common["dataset_dir"]).is_dir():
            raise FileNotFoundError(f"{dataset_dir}: no such dataset folder (--dataset_dir)")
    if datalist:
        common["datalist"] = str(Path(datalist).expanduser().resolve())
        if not Path(common["datalist"]).is_file():
            raise FileNotFoundError(f"{datalist}: no such datalist file (--datalist)")
    common.update(parse_overrides(bundle_args))
    common.update(parse_overrides(overrides))
    clash = sorted(GRID_IDS & set(common))
    if clash:
        raise ValueError(f"{clash} are set by the grid itself; use --inits/--seeds/--train-fractions/--name/--output_dir")
    return common


def _check_required_ids(train_files: Sequence[str], common: Mapping[str, Any]) -> None:
    """The bundle's own check of its required ids (the first item of its ``training``), with the ids
    every run gets, before the grid's first run starts: a grid without ``--datalist`` would otherwise
    launch every run only to have each refused the same way.

    Raises:
        MissingIdError: the bundle's message (``pass --datalist (...)``).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(train_files))
    parser.update(dict(common))
    training = parser.get("training")
    if not (isinstance(training, list) and training and "require_ids(" in str(training[0])):
        return
    try:
        parser.get_parsed_content("training#0")
    except Exception as error:  # MONAI wraps what an expression raises
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, MissingIdError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def _check_inits(inits: Any) -> None:
    """Every encoder file of ``inits`` exists (before the first run starts)."""
    for label, path in parse_inits(inits):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such encoder file (init {label!r})")


def _check_run_folders(cells: Sequence[GridCell]) -> None:
    """Refuse a grid whose run folders hold what the experiment did not write (a folder without
    its ``spec.json``, and not empty): a rerun empties its runs' folders, and must never take a
    user's files with them."""
    for cell in cells:
        if cell.run_dir.is_dir() and not (cell.run_dir / "spec.json").is_file() and any(cell.run_dir.iterdir()):
            raise FileExistsError(f"{cell.run_dir}: holds files this experiment did not write (no spec.json); "
                                  "move them, or choose another --output_dir")
        if cell.run_dir.exists() and not cell.run_dir.is_dir():
            raise FileExistsError(f"{cell.run_dir}: not a folder; move it, or choose another --output_dir")


def _prepare_cell(cell: GridCell, plan: _GridPlan) -> Path:
    """Empty the cell's folder (an earlier attempt's, see :func:`_check_run_folders`), write its
    ``spec.json`` and ``commands.sh``; returns the spec's path."""
    if cell.run_dir.exists():
        shutil.rmtree(cell.run_dir)
    cell.run_dir.mkdir(parents=True)
    spec = _cell_spec(cell, plan)
    spec_path = cell.run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    commands = [_bundle_command("training", plan.train_files, spec["train"])]
    if plan.evaluate:
        commands.append(_bundle_command("evaluating", plan.eval_files, spec["eval"]))
    (cell.run_dir / "commands.sh").write_text("# the equivalent commands of this run\n" + "\n".join(commands) + "\n")
    return spec_path


def _run_grid_cell(client, experiment_id: str, cell: GridCell, plan: _GridPlan) -> dict[str, Any]:
    """Skip the cell when a finished run has its name; else delete its unfinished runs, run it and record it."""
    row: dict[str, Any] = {"run_name": cell.run_name, "init": cell.init, "seed": cell.seed, "fraction": cell.fraction,
                           "log": str(cell.run_dir / "log.txt")}
    existing = _runs_named(client, experiment_id, cell.run_name)
    done = _finished(existing)
    if done is not None:
        row.update(status="skipped", run_id=done.info.run_id, wall_time_s=done.data.metrics.get("wall_time_s", math.nan),
                   **{k: v for k, v in done.data.metrics.items() if k.startswith("final_")})
        return row
    if not plan.ids_checked:  # before the first run that starts (a finished grid needs no data)
        _check_required_ids(plan.train_files, plan.common)
        plan.ids_checked = True
    for stale in existing:  # a crashed or interrupted attempt: start again from nothing
        client.delete_run(stale.info.run_id)
    spec_path = _prepare_cell(cell, plan)
    start = time.time()
    rc = _launch(spec_path, cell.run_dir / "log.txt", plan.timeout)
    wall = time.time() - start
    row.update(_record(client, experiment_id, cell, rc, wall))
    if row["status"] == "failed":
        tqdm.write(f"[experiment] run {cell.run_name} failed (exit {rc}); log {row['log']}:\n{_tail(cell.run_dir / 'log.txt')}")
    return row


def run_experiment(
    bundle: str,
    name: str,
    inits: Any = "scratch",
    seeds: Any = 3,
    train_fractions: Any = 1.0,
    config: Any = None,
    dataset_dir: str | None = None,
    datalist: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    overrides: Any = None,
    tracking_uri: str | None = None,
    evaluate: bool = True,
    metric: str | None = None,
    timeout: float | None = None,
    progress: bool = True,
    **bundle_args: Any,
) -> list[dict[str, Any]]:
    """Run the grid inits x seeds x train_fractions of BUNDLE into the MLflow experiment NAME.

    Args:
        bundle: bundle name (``bundles/NAME``) or folder.
        name: MLflow experiment name (also names the runs).
        inits: ``scratch`` and/or encoder weight files (``LABEL=PATH`` to name one), a list or
            a comma-separated string.
        seeds: a count N (seeds 0..N-1) or a list of seeds.
        train_fractions: fractions of the training labels (the bundles' ``train_fraction``).
        config: overlay config(s) merged after ``train.yaml`` (and after ``evaluate.yaml``):
            a path, or a file name in the bundle's ``configs/``.
        dataset_dir, datalist: the bundle's ids of those names.
        output_dir: the grid folder (default ``experiments/NAME``): ``runs/<run name>/`` per
            run (checkpoints, ``eval/``, ``log.txt``, ``commands.sh``) and ``mlruns.db``.
        overrides: more bundle ids, ``["ID=VALUE", ...]`` or a dict (``bundle_args`` likewise).
        tracking_uri: MLflow store shared by all runs (default ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///<output_dir>/mlruns.db``).
        evaluate: also run ``evaluate.yaml`` on each best checkpoint (``final_<metric>``).
        metric: the metric shown in the printed summary (default the evaluation's first).
        timeout: seconds allowed per run (a run over it counts as failed).
        progress: show a tqdm progress bar and print the summary table.

    Returns:
        One row per run: ``run_name, init, seed, fraction, status`` (``finished`` now,
        ``skipped`` when finished before, ``failed``), ``wall_time_s``, ``run_id``, ``log``
        and the ``final_*`` metrics.
    """
    bundle_name, train_files, eval_files = _config_files(bundle, config)
    out = Path(output_dir or Path("experiments") / safe_name(name)).resolve()
    uri = bundle_tracking_uri(out, tracking_uri)
    check_tracking_server(uri)
    common = _common_ids(dataset_dir, datalist, bundle_args, overrides)
    _check_inits(inits)
    cells = grid_cells(name, inits, seeds, train_fractions, out, bundle=bundle_name)
    _check_run_folders(cells)
    out.mkdir(parents=True, exist_ok=True)  # only once the grid can start
    plan = _GridPlan(name, uri, train_files, eval_files, common, evaluate, timeout)

    client = mlflow_client(uri)
    experiment_id = find_experiment(client, name, create=True)
    rows: list[dict[str, Any]] = []
    bar = tqdm(cells, desc=f"experiment {name}", unit="run", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.run_name)
        rows.append(_run_grid_cell(client, experiment_id, cell, plan))
    bar.close()
    if progress:
        print(format_run_table(rows, metric))
        print(f"MLflow: experiment {name!r} in {uri}")
    return rows


def _record(client, experiment_id: str, cell: GridCell, rc: int, wall: float) -> dict[str, Any]:
    """Tags, times and evaluation results on the cell's MLflow run; ``echocare.status`` last."""
    from mlflow.entities import Metric, RunTag

    runs = _runs_named(client, experiment_id, cell.run_name)
    run = runs[0] if runs else client.create_run(experiment_id, run_name=cell.run_name)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = {"wall_time_s": wall}
    timing_path = cell.run_dir / "timing.json"
    if timing_path.is_file():
        metrics.update(json.loads(timing_path.read_text()))
    summary_path = cell.run_dir / "eval" / "summary.json"
    final = {}
    if rc == 0 and summary_path.is_file():
        final = {f"final_{k}": float(v) for k, v in json.loads(summary_path.read_text()).items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
    metrics.update(final)
    status = "finished" if rc == 0 else "failed"
    tags = {**cell.tags, STATUS_TAG: status, "echocare.exit_code": str(rc)}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items() if k != STATUS_TAG])
    for artifact in ("eval", "log.txt", "commands.sh"):
        path = cell.run_dir / artifact
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path="eval")
        elif path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_tag(run_id, STATUS_TAG, status)
    if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
        client.set_terminated(run_id, "FINISHED" if rc == 0 else "FAILED")
    marker = {"run_id": run_id, "status": status, "exit_code": rc, **metrics}
    (cell.run_dir / "experiment_run.json").write_text(json.dumps(marker, indent=1))
    return {"status": status, "run_id": run_id, "wall_time_s": wall, **final}


def format_run_table(rows: Sequence[Mapping[str, Any]], metric: str | None = None) -> str:
    """The printed summary of an experiment: one line per run (its MLflow run name and id, the ids that
    ``echocare registry register --run`` takes) and a count per status."""
    if metric is None:
        metric = next((k.removeprefix("final_") for r in rows for k in r if k.startswith("final_")), None)
    header = ["run", "run_id", "init", "seed", "fraction", "status", "wall_s"] + ([metric] if metric else [])
    lines = []
    for r in rows:
        value = r.get(f"final_{metric}", math.nan) if metric else None
        line = [r["run_name"], r.get("run_id") or "-", r["init"], str(r["seed"]), fraction_text(r["fraction"]), r["status"],
                f"{r.get('wall_time_s', math.nan):.1f}"]
        lines.append(line + ([format_number(value)] if metric else []))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "skipped", "failed")}
    text.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(text)


# ----------------------------------------------------------------------------- statistics


def main(argv: Sequence[str]) -> None:
    """``python -m echocare.experiments SPEC.json``: run one grid cell (used by :func:`run_experiment`)."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m echocare.experiments SPEC.json  (one run of `echocare experiment`)")
    run_cell(json.loads(Path(argv[0]).read_text()))
