"""Repeated trials of a bundle and their statistics: ``echocare experiment`` and ``echocare compare``.

The paper's evaluation protocol: every model (an initialisation of the encoder: from scratch
or from pretrained weights) is fine-tuned several times with different seeds and fractions of
the training labels, and models are compared by the mean and spread of their scores,
significance tests against the best one, box plots and label-efficiency curves.

Experiment (:func:`run_experiment`, ``echocare experiment``)
    Runs the grid init x seed x fraction through the bundle's own configs (``train.yaml``
    [+ overlays], then ``evaluate.yaml``), each grid cell in its own subprocess (so one crash
    is reported and the grid goes on) under ``<output_dir>/runs/<run name>/``. Every cell is
    one MLflow run in the experiment NAME of one shared tracking store (default
    ``<output_dir>/mlruns.db``; ``MLFLOW_TRACKING_URI`` or ``tracking_uri`` otherwise), named
    ``<NAME>_<init>_s<seed>_f<fraction>`` and tagged ``init``, ``init_path``, ``seed``,
    ``fraction``, ``bundle``, ``echocare.status``. The training run keeps MONAI's per-epoch
    validation metrics (``mean_dice``, ``accuracy``, ... as in DESIGN) and ``train_loss``;
    afterwards the evaluation summary is logged on the same run as ``final_<metric>`` (with
    ``eval/`` as artifacts) and the times as ``wall_time_s``, ``train_time_s``,
    ``eval_time_s``. ``echocare.status = finished`` is set last: rerunning the same command
    skips finished runs and reruns the others from scratch (their MLflow run is deleted and
    their folder emptied first).

Compare (:func:`compare_experiment`, ``echocare compare``)
    Reads the finished runs of an experiment and writes, per training fraction, a table of
    mean ± sd and n per model (``--by`` tag, default ``init``); two-sided Wilcoxon
    signed-rank tests on runs paired by seed and Welch's two-sample t-tests between the best
    model and each other one (p-values and stars); box plots; label-efficiency curves; and
    epochs and wall time until the validation metric first reaches 95% of its best value.
    CSV, Markdown and PNG files, also logged as artifacts of a ``compare_<metric>_by_<by>``
    run in the same experiment.

The score of a run is ``final_<metric>`` (the evaluation of its best checkpoint) when
present, else the best value of the per-epoch validation history (``source`` in runs.csv).
"""

from __future__ import annotations

import ast
import csv
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
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from echocare.tracking import check_tracking_server

__all__ = [
    "LOWER_IS_BETTER",
    "GridCell",
    "compare_experiment",
    "describe",
    "grid_cells",
    "infer_lower_is_better",
    "label_efficiency_figure",
    "boxplot_figure",
    "parse_fractions",
    "parse_inits",
    "parse_overrides",
    "parse_seeds",
    "run_experiment",
    "stars",
    "time_to_fraction_of_best",
    "welch_ttest",
    "wilcoxon_paired",
]

#: Metrics (DESIGN's names) where a smaller value is better; ``compare`` infers the direction
#: from this list (and from names ending in ``loss``) unless told with ``lower_is_better``.
LOWER_IS_BETTER = frozenset({"mae", "mae_se", "mre_px", "mse_px2", "niqe", "brisque", "piqe", "fid", "hd95", "asd"})

#: The Wilcoxon test needs this many seed-paired runs by default: the exact two-sided test
#: cannot give p < 0.05 with 5 pairs or fewer (its smallest p-value is 2 / 2**n).
MIN_WILCOXON_PAIRS = 6

STATUS_TAG = "echocare.status"
ROLE_TAG = "echocare.role"
TIME_FRACTION = 0.95


# ----------------------------------------------------------------------------- parsing


def _split(value: Any) -> list[Any]:
    """A CLI value that may be a list, a tuple (python-fire's ``a,b``) or a ``"a,b"`` string."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            out.extend(_split(v))
        return out
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [value]


def parse_inits(inits: Any) -> list[tuple[str, str]]:
    """``scratch,PATH,LABEL=PATH`` -> ``[(label, path)]``; ``scratch`` (or ``none``) has path ``""``.

    A path's label is its file stem (``encoder.pt`` -> ``encoder``), made unique with its
    parent folder when two stems clash; ``LABEL=PATH`` names it explicitly.
    """
    parsed: list[tuple[str | None, str]] = []
    for item in _split(inits) or ["scratch"]:
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
        out.append((_safe(label), path))
    labels = [label for label, _ in out]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"inits: the label(s) {duplicates} occur twice; name them with LABEL=PATH")
    return out


def parse_seeds(seeds: Any) -> list[int]:
    """``3`` -> ``[0, 1, 2]`` (that many seeds from 0); ``0,5,7`` or a list -> those seeds."""
    values = _split(seeds)
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
    out = sorted({float(v) for v in _split(fractions)}) or [1.0]
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


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text)).strip("-") or "x"


def _fraction_text(fraction: float) -> str:
    return f"{fraction:g}"


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
                run_name = f"{_safe(name)}_{label}_s{seed}_f{_fraction_text(fraction)}"
                tags = {
                    "init": label, "init_path": path or "scratch", "seed": str(seed),
                    "fraction": _fraction_text(fraction), "bundle": bundle, "echocare.experiment": name,
                    ROLE_TAG: "run",
                }
                cells.append(GridCell(label, path, seed, fraction, run_name, Path(output_dir) / "runs" / run_name, tags))
    return cells


def _resolve_bundle(bundle: str) -> tuple[str, Path]:
    """(name, configs folder) of a bundle given by name (``bundles/NAME``) or by folder."""
    from echocare.bundle import bundle_dir

    folder = Path(bundle)
    if not (folder / "configs" / "train.yaml").is_file():
        folder = Path(bundle_dir(bundle))
    return folder.resolve().name, (folder / "configs").resolve()


def _resolve_overlays(config: Any, configs: Path) -> list[str]:
    out = []
    for item in _split(config):
        candidates = [Path(item), configs / item, configs / f"{item}.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"overlay config {item!r} not found (tried {', '.join(map(str, candidates))})")
        out.append(str(found.resolve()))
    return out


def _tracking_uri(tracking_uri: str | None, output_dir: Path | None) -> str:
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if output_dir is None:
        raise ValueError("no tracking store: pass tracking_uri, the experiment's output_dir, or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{Path(output_dir).resolve() / 'mlruns.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _search_all(client, experiment_ids: list[str], filter_string: str = "") -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_id(client, name: str, create: bool) -> str | None:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return found.experiment_id
    return client.create_experiment(name) if create else None


def _bundle_command(run_id: str, config_files: list[str], overrides: Mapping[str, Any]) -> str:
    """The equivalent ``python -m monai.bundle run`` command line (written beside each run)."""
    files = config_files[0] if len(config_files) == 1 else repr(config_files)
    args = ["python", "-m", "monai.bundle", "run", run_id, "--config_file", files]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return shlex.join(args)


def _cell_spec(cell: GridCell, train_files: list[str], eval_files: list[str], common: Mapping[str, Any],
               name: str, uri: str, evaluate: bool) -> dict[str, Any]:
    per_run = {"output_dir": str(cell.run_dir.resolve()), "seed": cell.seed, "train_fraction": cell.fraction,
               "pretrained_path": cell.init_path}
    train = {**common, **per_run, "tracking": "mlflow", "tracking_uri": uri, "experiment_name": name, "run_name": cell.run_name}
    evaluation = {**common, **per_run} if evaluate else None
    return {"train_files": train_files, "train": train, "eval_files": eval_files, "eval": evaluation,
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


def _run_cell(spec: Mapping[str, Any]) -> None:
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
    return _search_all(client, [experiment_id], f"attributes.run_name = '{run_name}'")


def _finished(runs: list) -> Any:
    return next((r for r in runs if r.data.tags.get(STATUS_TAG) == "finished"), None)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


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
    from tqdm.auto import tqdm

    bundle_name, configs = _resolve_bundle(bundle)
    overlays = _resolve_overlays(config, configs)
    train_files = [str(configs / "train.yaml"), *overlays]
    eval_files = [str(configs / "train.yaml"), str(configs / "evaluate.yaml"), *overlays]
    out = Path(output_dir or Path("experiments") / _safe(name)).resolve()
    uri = _tracking_uri(tracking_uri, out)
    check_tracking_server(uri)
    # A missing dataset would fail every run of the grid, one subprocess after the other.
    common: dict[str, Any] = {}
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
    reserved = {"output_dir", "seed", "train_fraction", "pretrained_path", "tracking", "tracking_uri", "experiment_name", "run_name"}
    clash = sorted(reserved & set(common))
    if clash:
        raise ValueError(f"{clash} are set by the grid itself; use --inits/--seeds/--train-fractions/--name/--output_dir")
    for label, path in parse_inits(inits):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such encoder file (init {label!r})")

    out.mkdir(parents=True, exist_ok=True)  # only once the grid can start
    client = _client(uri)
    experiment_id = _experiment_id(client, name, create=True)
    cells = grid_cells(name, inits, seeds, train_fractions, out, bundle=bundle_name)
    rows: list[dict[str, Any]] = []
    bar = tqdm(cells, desc=f"experiment {name}", unit="run", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.run_name)
        row: dict[str, Any] = {"run_name": cell.run_name, "init": cell.init, "seed": cell.seed, "fraction": cell.fraction,
                               "log": str(cell.run_dir / "log.txt")}
        existing = _runs_named(client, experiment_id, cell.run_name)
        done = _finished(existing)
        if done is not None:
            row.update(status="skipped", run_id=done.info.run_id, wall_time_s=done.data.metrics.get("wall_time_s", math.nan),
                       **{k: v for k, v in done.data.metrics.items() if k.startswith("final_")})
            rows.append(row)
            continue
        for stale in existing:  # a crashed or interrupted attempt: start again from nothing
            client.delete_run(stale.info.run_id)
        if cell.run_dir.exists():
            shutil.rmtree(cell.run_dir)
        cell.run_dir.mkdir(parents=True)
        spec = _cell_spec(cell, train_files, eval_files, common, name, uri, evaluate)
        spec_path = cell.run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        commands = [_bundle_command("training", train_files, spec["train"])]
        if evaluate:
            commands.append(_bundle_command("evaluating", eval_files, spec["eval"]))
        (cell.run_dir / "commands.sh").write_text("# the equivalent commands of this run\n" + "\n".join(commands) + "\n")
        start = time.time()
        rc = _launch(spec_path, cell.run_dir / "log.txt", timeout)
        wall = time.time() - start
        row.update(_record(client, experiment_id, cell, rc, wall))
        rows.append(row)
        if row["status"] == "failed":
            tqdm.write(f"[experiment] run {cell.run_name} failed (exit {rc}); log {row['log']}:\n{_tail(cell.run_dir / 'log.txt')}")
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
    """The printed summary of an experiment: one line per run and a count per status."""
    if metric is None:
        metric = next((k.removeprefix("final_") for r in rows for k in r if k.startswith("final_")), None)
    header = ["run", "init", "seed", "fraction", "status", "wall_s"] + ([metric] if metric else [])
    lines = []
    for r in rows:
        value = r.get(f"final_{metric}", math.nan) if metric else None
        line = [r["run_name"], r["init"], str(r["seed"]), _fraction_text(r["fraction"]), r["status"],
                f"{r.get('wall_time_s', math.nan):.1f}"]
        lines.append(line + ([_num(value)] if metric else []))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "skipped", "failed")}
    text.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(text)


# ----------------------------------------------------------------------------- statistics


def stars(p: float) -> str:
    """``***`` p < 0.001, ``**`` p < 0.01, ``*`` p < 0.05, ``ns`` otherwise, ``""`` for NaN."""
    if p is None or not math.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def describe(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof 1; NaN for one value), n)."""
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if array.size == 0:
        return math.nan, math.nan, 0
    sd = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), sd, int(array.size)


def wilcoxon_paired(a: Mapping[Any, float], b: Mapping[Any, float], min_pairs: int = MIN_WILCOXON_PAIRS) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of ``a`` against ``b`` on the keys (seeds) both have.

    ``scipy.stats.wilcoxon(x, y)`` with its defaults (zero differences dropped, exact
    distribution for small samples without ties). Fewer than ``min_pairs`` pairs give NaN
    with a note (by default 6: the exact two-sided p-value cannot go below 0.05 with 5).

    Returns ``{"statistic", "p", "n_pairs", "note"}``.
    """
    from scipy.stats import wilcoxon

    keys = sorted(set(a) & set(b), key=str)
    x = np.asarray([a[k] for k in keys], dtype=float)
    y = np.asarray([b[k] for k in keys], dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n < max(1, min_pairs):
        return {"statistic": math.nan, "p": math.nan, "n_pairs": n,
                "note": f"Wilcoxon needs >= {max(1, min_pairs)} seed-paired runs, has {n}"}
    if np.all(x == y):
        note = "all paired differences are zero"
    else:
        note = ""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        result = wilcoxon(x, y, alternative="two-sided")
    return {"statistic": float(result.statistic), "p": float(result.pvalue), "n_pairs": n, "note": note}


def welch_ttest(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's two-sample t-test (``scipy.stats.ttest_ind(a, b, equal_var=False)``), two-sided.

    Welch rather than Student: models' run-to-run spreads differ (training from scratch
    often varies more than fine-tuning), Student's test assumes equal variances and errs
    when they differ, and Welch's loses almost nothing when they are equal. Needs two
    values per group with some spread; otherwise NaN with a note.

    Returns ``{"statistic", "p", "df", "note"}``.
    """
    from scipy.stats import ttest_ind

    x = np.asarray([v for v in a if math.isfinite(v)], dtype=float)
    y = np.asarray([v for v in b if math.isfinite(v)], dtype=float)
    if x.size < 2 or y.size < 2:
        return {"statistic": math.nan, "p": math.nan, "df": math.nan,
                "note": f"t-test needs >= 2 runs per model, has {x.size} and {y.size}"}
    if x.var() == 0 and y.var() == 0:
        return {"statistic": math.nan, "p": math.nan, "df": math.nan, "note": "no spread in either model: t-test undefined"}
    result = ttest_ind(x, y, equal_var=False)
    return {"statistic": float(result.statistic), "p": float(result.pvalue), "df": float(result.df), "note": ""}


def infer_lower_is_better(metric: str) -> bool:
    """Whether a smaller ``metric`` is better: DESIGN's error metrics (:data:`LOWER_IS_BETTER`),
    ``final_``-prefixed or not, and anything ending in ``loss``."""
    name = metric.removeprefix("final_").lower()
    return name in LOWER_IS_BETTER or name.endswith("loss")


def time_to_fraction_of_best(
    history: Sequence[tuple[int, float, int]], start_ms: int | None, lower_is_better: bool = False, level: float = TIME_FRACTION
) -> tuple[float, float]:
    """(epoch, seconds) at which a per-epoch metric history first reaches ``level`` of its best.

    ``history`` is ``[(epoch, value, timestamp_ms), ...]`` (MLflow's metric history of the
    training run: one entry per validation epoch). Reached means ``value >= best -
    (1 - level) * |best|``, or ``value <= best + (1 - level) * |best|`` when lower is better
    (for a positive best that is ``>= 95%`` of it). Seconds count from ``start_ms`` (the
    run's start); NaN when unknown or when the history is empty.
    """
    points = sorted((int(s), float(v), int(t)) for s, v, t in history if math.isfinite(float(v)))
    if not points:
        return math.nan, math.nan
    values = [v for _, v, _ in points]
    best = min(values) if lower_is_better else max(values)
    margin = (1.0 - level) * abs(best)
    for step, value, stamp in points:
        if (value <= best + margin) if lower_is_better else (value >= best - margin):
            seconds = (stamp - start_ms) / 1000.0 if start_ms else math.nan
            return float(step), seconds
    return math.nan, math.nan  # unreachable: the best itself qualifies


# ----------------------------------------------------------------------------- plots

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def model_colours(models: Sequence[str]) -> dict[str, str]:
    """One fixed colour per model (matplotlib's tab10 order), the same in every plot."""
    return {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(models)}


def boxplot_figure(values: Mapping[float, Mapping[str, Sequence[float]]], models: Sequence[str], metric: str,
                   marks: Mapping[float, Mapping[str, str]] | None = None):
    """Box plots of ``values[fraction][model]``: one panel per fraction, one box per model with runs.

    Boxes span the quartiles with the median line, whiskers reach the furthest run within
    1.5 IQR of the box (``whis=1.5``), runs beyond are drawn as outliers; the runs
    themselves are overlaid as dots. ``marks[fraction][model]`` (significance stars against
    the best model) is written above each box.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(values)
    colours = model_colours(models)
    fig, axes = plt.subplots(1, len(fractions), figsize=(max(4.0, 1.2 * len(models) + 1.5) * len(fractions), 4.2),
                             squeeze=False, sharey=True)
    for ax, fraction in zip(axes[0], fractions):
        present = [m for m in models if len(values[fraction].get(m, ())) > 0]
        data = [np.asarray(values[fraction][m], dtype=float) for m in present]
        if data:
            parts = ax.boxplot(data, whis=1.5, patch_artist=True, widths=0.6, tick_labels=present,
                               medianprops={"color": "black"})
            for box, model in zip(parts["boxes"], present):
                box.set_facecolor(colours[model])
                box.set_edgecolor("black")
            rng = np.random.default_rng(0)
            for i, d in enumerate(data, start=1):
                ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=10, color="black", zorder=3)
            top = max(float(np.nanmax(d)) for d in data)
            spread = max(float(np.nanmax(np.concatenate(data)) - np.nanmin(np.concatenate(data))), 1e-6)
            for i, model in enumerate(present, start=1):
                mark = (marks or {}).get(fraction, {}).get(model, "")
                if mark:
                    ax.text(i, top + 0.05 * spread, mark, ha="center", va="bottom")
            ax.set_ylim(top=top + 0.15 * spread)
        ax.set_title(f"fraction {_fraction_text(fraction)}")
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(metric)
    fig.suptitle(f"{metric} per run (box: quartiles, whiskers: 1.5 IQR)")
    fig.tight_layout()
    return fig


def label_efficiency_figure(values: Mapping[float, Mapping[str, Sequence[float]]], models: Sequence[str], metric: str):
    """``metric`` against the fraction of training labels: per model its mean (line and
    markers) and a mean ± sd band (fractions with one run have no band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(values)
    colours = model_colours(models)
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for model in models:
        xs, means, sds = [], [], []
        for fraction in fractions:
            mean, sd, n = describe(values[fraction].get(model, ()))
            if n:
                xs.append(fraction)
                means.append(mean)
                sds.append(sd if n > 1 else 0.0)
        if not xs:
            continue
        means_a, sds_a = np.asarray(means), np.asarray(sds)
        ax.plot(xs, means_a, marker="o", linewidth=2, color=colours[model], label=model)
        ax.fill_between(xs, means_a - sds_a, means_a + sds_a, color=colours[model], alpha=0.2, linewidth=0)
    if len(fractions) > 1 and fractions[-1] / fractions[0] >= 4:
        ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([_fraction_text(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel(f"{metric} (mean ± sd)")
    ax.set_title("label efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- compare


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _p_text(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "nan"
    return f"{p:.2e}" if p < 1e-4 else f"{p:.4f}"


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], formats: Mapping[str, Any] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) with the given columns."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [formats.get(c, _num)(row.get(c, "")) if c in formats else _num(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _run_score(client, run, metric: str, lower_is_better: bool) -> tuple[float, str, list]:
    """(score, source, per-epoch history) of one run."""
    history = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, metric)]
    final = run.data.metrics.get(f"final_{metric}")
    if final is not None and math.isfinite(final):
        return float(final), f"final_{metric}", history
    values = [v for _, v, _ in history if math.isfinite(v)]
    if values:
        return float(min(values) if lower_is_better else max(values)), f"best validation {metric}", history
    return math.nan, "missing", history


def compare_experiment(
    experiment: str,
    metric: str,
    by: str = "init",
    tracking_uri: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    lower_is_better: bool | None = None,
    min_pairs: int = MIN_WILCOXON_PAIRS,
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """Compare the models of an ``echocare experiment`` on ``metric`` and write the report.

    Args:
        experiment: MLflow experiment name.
        metric: DESIGN's metric name (``mean_dice``, ``accuracy``, ``mae``, ...).
        by: run tag that names the model (default ``init``).
        tracking_uri: the store (default ``MLFLOW_TRACKING_URI``, else
            ``<output_dir>/mlruns.db`` with ``output_dir`` default ``experiments/NAME``).
        output_dir: the experiment's folder (to find its store and place ``out``).
        out: where the files go (default ``<output_dir>/compare_<metric>``).
        lower_is_better: direction of the metric; ``None`` infers it
            (:func:`infer_lower_is_better`).
        min_pairs: fewest seed-paired runs for a Wilcoxon test (fewer: NaN with a note).
        log_to_mlflow: log the files as artifacts of a ``compare_<metric>_by_<by>`` run.

    Writes ``runs.csv`` (one row per run), ``summary.csv|md`` (mean ± sd and n per model and
    fraction), ``tests.csv|md`` (best model against each other one per fraction: Wilcoxon
    signed-rank on seed pairs and Welch's t-test, p-values and stars), ``convergence.csv|md``
    (epochs and seconds until the validation metric first reaches 95% of its best, mean ±
    sd per model and fraction), ``boxplot.png``, ``label_efficiency.png`` and ``report.md``
    (all of them with the methods). Returns ``{"out", "summary", "tests", "convergence",
    "files", "run_id", "lower_is_better"}``.
    """
    if by in ("seed", "fraction"):
        raise ValueError(f"--by {by}: models are grouped by another tag (seeds pair runs, fractions make the curves)")
    folder = Path(output_dir or Path("experiments") / _safe(experiment)).resolve()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        store = folder / "mlruns.db"
        if not store.is_file():
            raise FileNotFoundError(f"{store}: no MLflow store there; pass --tracking-uri or --output_dir (the experiment's folder)")
        uri = f"sqlite:///{store}"
    check_tracking_server(uri)
    lower = infer_lower_is_better(metric) if lower_is_better is None else bool(lower_is_better)
    client = _client(uri)
    experiment_id = _experiment_id(client, experiment, create=False)
    if experiment_id is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {uri}")
    runs = [r for r in _search_all(client, [experiment_id], f"tags.`{STATUS_TAG}` = 'finished'")
            if r.data.tags.get(ROLE_TAG, "run") != "compare"]
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no finished runs (tag {STATUS_TAG} = finished)")

    per_run: list[dict[str, Any]] = []
    for run in runs:
        tags = run.data.tags
        model = tags.get(by) or run.data.params.get(by)
        if model is None:
            continue
        score, source, history = _run_score(client, run, metric, lower)
        epochs, seconds = time_to_fraction_of_best(history, run.info.start_time, lower)
        per_run.append({
            "model": model, "fraction": float(tags.get("fraction", run.data.params.get("train_fraction", 1.0))),
            "seed": tags.get("seed", run.data.params.get("seed", "")), "value": score, "source": source,
            "epochs_to_95": epochs, "seconds_to_95": seconds, "epochs_logged": len(history),
            "wall_time_s": run.data.metrics.get("wall_time_s", math.nan), "run_name": run.info.run_name, "run_id": run.info.run_id,
        })
    if not per_run:
        raise ValueError(f"no finished run of {experiment!r} has a tag or parameter {by!r}")
    missing = [r["run_name"] for r in per_run if not math.isfinite(r["value"])]
    per_run = [r for r in per_run if math.isfinite(r["value"])]
    if not per_run:
        raise ValueError(f"no run of {experiment!r} logged {metric!r} (nor final_{metric})")
    models = sorted({r["model"] for r in per_run}, key=lambda m: (m != "scratch", m))
    fractions = sorted({r["fraction"] for r in per_run})
    values: dict[float, dict[str, list[float]]] = {f: {m: [] for m in models} for f in fractions}
    paired: dict[float, dict[str, dict[str, float]]] = {f: {m: {} for m in models} for f in fractions}
    for r in sorted(per_run, key=lambda r: (r["fraction"], r["model"], str(r["seed"]))):
        values[r["fraction"]][r["model"]].append(r["value"])
        paired[r["fraction"]][r["model"]][str(r["seed"])] = r["value"]

    summary, tests, convergence = [], [], []
    marks: dict[float, dict[str, str]] = {}
    for fraction in fractions:
        stats = {m: describe(values[fraction][m]) for m in models}
        present = [m for m in models if stats[m][2] > 0]
        best = (min if lower else max)(present, key=lambda m: stats[m][0])
        for m in present:
            mean, sd, n = stats[m]
            summary.append({"fraction": fraction, "model": m, "n": n, "mean": mean, "sd": sd,
                            "mean_sd": f"{_num(mean)} ± {_num(sd)}", "best": "yes" if m == best else ""})
            runs_here = [r for r in per_run if r["fraction"] == fraction and r["model"] == m]
            e_mean, e_sd, e_n = describe(r["epochs_to_95"] for r in runs_here)
            s_mean, s_sd, _ = describe(r["seconds_to_95"] for r in runs_here)
            w_mean, w_sd, _ = describe(r["wall_time_s"] for r in runs_here)
            convergence.append({"fraction": fraction, "model": m, "n": e_n, "epochs_to_95_mean": e_mean, "epochs_to_95_sd": e_sd,
                                "seconds_to_95_mean": s_mean, "seconds_to_95_sd": s_sd,
                                "epochs_to_95": f"{_num(e_mean, 2)} ± {_num(e_sd, 2)}",
                                "seconds_to_95": f"{_num(s_mean, 1)} ± {_num(s_sd, 1)}",
                                "wall_time_s": f"{_num(w_mean, 1)} ± {_num(w_sd, 1)}"})
        marks[fraction] = {best: "best"}
        for m in present:
            if m == best:
                continue
            w = wilcoxon_paired(paired[fraction][best], paired[fraction][m], min_pairs=min_pairs)
            t = welch_ttest(values[fraction][best], values[fraction][m])
            marks[fraction][m] = stars(w["p"]) if math.isfinite(w["p"]) else stars(t["p"])
            tests.append({
                "fraction": fraction, "best": best, "other": m, "best_mean": stats[best][0], "other_mean": stats[m][0],
                "difference": stats[best][0] - stats[m][0], "n_pairs": w["n_pairs"],
                "wilcoxon_statistic": w["statistic"], "wilcoxon_p": w["p"], "wilcoxon_sig": stars(w["p"]),
                "welch_t": t["statistic"], "welch_df": t["df"], "welch_p": t["p"], "welch_sig": stars(t["p"]),
                "note": "; ".join(x for x in (w["note"], t["note"]) if x),
            })

    target = Path(out) if out else folder / f"compare_{_safe(metric)}"
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    run_cols = ["model", "fraction", "seed", "value", "source", "epochs_to_95", "seconds_to_95", "epochs_logged",
                "wall_time_s", "run_name", "run_id"]
    _write_csv(target / "runs.csv", per_run, run_cols)
    sum_cols = ["fraction", "model", "n", "mean", "sd", "mean_sd", "best"]
    test_cols = ["fraction", "best", "other", "best_mean", "other_mean", "difference", "n_pairs", "wilcoxon_statistic",
                 "wilcoxon_p", "wilcoxon_sig", "welch_t", "welch_df", "welch_p", "welch_sig", "note"]
    conv_cols = ["fraction", "model", "n", "epochs_to_95_mean", "epochs_to_95_sd", "seconds_to_95_mean", "seconds_to_95_sd"]
    _write_csv(target / "summary.csv", summary, sum_cols)
    _write_csv(target / "tests.csv", tests, test_cols)
    _write_csv(target / "convergence.csv", convergence, [*conv_cols, "wall_time_s"])
    pf = {"wilcoxon_p": _p_text, "welch_p": _p_text, "fraction": _fraction_text}
    summary_md = markdown_table(summary, ["fraction", "model", "n", "mean_sd", "best"], {"fraction": _fraction_text})
    tests_md = markdown_table(tests, ["fraction", "best", "other", "difference", "n_pairs", "wilcoxon_p", "wilcoxon_sig",
                                      "welch_p", "welch_sig", "note"], pf)
    conv_md = markdown_table(convergence, ["fraction", "model", "n", "epochs_to_95", "seconds_to_95", "wall_time_s"],
                             {"fraction": _fraction_text})
    (target / "summary.md").write_text(summary_md + "\n")
    (target / "tests.md").write_text(tests_md + "\n")
    (target / "convergence.md").write_text(conv_md + "\n")

    import matplotlib.pyplot as plt

    box = boxplot_figure(values, models, metric, marks)
    box.savefig(target / "boxplot.png", dpi=110)
    plt.close(box)
    curve = label_efficiency_figure(values, models, metric)
    curve.savefig(target / "label_efficiency.png", dpi=110)
    plt.close(curve)

    direction = "lower is better" if lower else "higher is better"
    notes = [f"- runs without `{metric}`: {', '.join(missing)}"] if missing else []
    report = "\n".join([
        f"# {experiment}: {metric} by {by}",
        "",
        f"{len(per_run)} finished runs, {len(models)} models, fractions {', '.join(map(_fraction_text, fractions))}; "
        f"{metric}: {direction}. Score of a run: `final_{metric}` (evaluation of its best checkpoint), else its best "
        "per-epoch validation value (column `source` of runs.csv).",
        *notes,
        "",
        "## Mean ± sd (sample sd, ddof 1) and n per model",
        "",
        summary_md,
        "",
        "## Best model against each other one",
        "",
        "Two-sided Wilcoxon signed-rank test (`scipy.stats.wilcoxon`) on runs paired by seed "
        f"(NaN below {min_pairs} pairs), and Welch's two-sample t-test (`scipy.stats.ttest_ind(equal_var=False)`): "
        "Welch because the models' run-to-run variances need not be equal (Student's test assumes they are). "
        "Stars: * p < 0.05, ** p < 0.01, *** p < 0.001, ns otherwise. No correction for multiple comparisons.",
        "",
        tests_md if tests else "(one model only: nothing to test)",
        "",
        f"## Convergence: epochs and seconds until the validation {metric} first reaches 95% of its best",
        "",
        "From each training run's per-epoch validation history in MLflow; seconds from the run's start; "
        "`wall_time_s` is the whole run (training and evaluation).",
        "",
        conv_md,
        "",
        "## Plots",
        "",
        "Stars above the boxes: the Wilcoxon test against the best model where it could be computed, else Welch's.",
        "",
        "![box plots](boxplot.png)",
        "",
        "![label efficiency](label_efficiency.png)",
        "",
    ])
    (target / "report.md").write_text(report)
    for name in ("runs.csv", "summary.csv", "summary.md", "tests.csv", "tests.md", "convergence.csv", "convergence.md",
                 "boxplot.png", "label_efficiency.png", "report.md"):
        files[name] = str(target / name)

    run_id = None
    if log_to_mlflow:
        compare_run = client.create_run(experiment_id, run_name=f"compare_{_safe(metric)}_by_{_safe(by)}",
                                        tags={ROLE_TAG: "compare", "metric": metric, "by": by})
        run_id = compare_run.info.run_id
        client.log_param(run_id, "metric", metric)
        client.log_param(run_id, "by", by)
        client.log_param(run_id, "lower_is_better", lower)
        client.log_param(run_id, "min_pairs", min_pairs)
        client.log_artifacts(run_id, str(target), artifact_path=f"compare_{_safe(metric)}")
        client.set_terminated(run_id, "FINISHED")
    return {"out": str(target), "summary": summary, "tests": tests, "convergence": convergence, "runs": per_run,
            "files": files, "run_id": run_id, "lower_is_better": lower, "models": models, "fractions": fractions}


def _main(argv: Sequence[str]) -> None:
    """``python -m echocare.experiments SPEC.json``: run one grid cell (used by :func:`run_experiment`)."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m echocare.experiments SPEC.json  (one run of `echocare experiment`)")
    _run_cell(json.loads(Path(argv[0]).read_text()))


if __name__ == "__main__":
    _main(sys.argv[1:])
