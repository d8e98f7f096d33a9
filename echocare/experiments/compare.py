"""The comparison of repeated trials: ``echocare compare`` (:func:`compare_experiment`).

Reads the finished runs of an experiment and writes, per training fraction, a table of
mean ± sd and n per model (``--by`` tag, default ``init``); two-sided Wilcoxon
signed-rank tests on runs paired by seed and Welch's two-sample t-tests between the best
model and each other one (p-values and stars); box plots; label-efficiency curves; and
epochs and wall time until the validation metric first reaches 95% of its best value.
CSV, Markdown and PNG files, also logged as artifacts of a ``compare_<metric>_by_<by>``
run in the same experiment.

The steps: :func:`collect_runs` (score every finished run), :func:`summarise` (mean ± sd and
convergence per model and fraction), :func:`significance_tests` (best model against each other one),
:func:`write_comparison` (tables, plots, report) and :func:`log_comparison` (MLflow).

The score of a run is ``final_<metric>`` (the evaluation of its best checkpoint) when
present, else the best value of the per-epoch validation history (``source`` in runs.csv).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from echocare.bundle import tracking_uri as bundle_tracking_uri
from echocare.tracking import check_tracking_server
from echocare.experiments.common import (
    ROLE_TAG,
    STATUS_TAG,
    find_experiment,
    format_number,
    fraction_text,
    markdown_table,
    mlflow_client,
    safe_name,
    search_all_runs,
)
from echocare.experiments.plots import boxplot_figure, label_efficiency_figure
from echocare.experiments.stats import (
    MIN_WILCOXON_PAIRS,
    describe,
    infer_lower_is_better,
    stars,
    time_to_fraction_of_best,
    welch_ttest,
    wilcoxon_paired,
)

__all__ = [
    "Comparison",
    "RunScores",
    "collect_runs",
    "compare_experiment",
    "log_comparison",
    "summarise",
    "significance_tests",
    "write_comparison",
]

#: The files of a comparison, in the order of the returned ``files``.
COMPARE_FILES = ("runs.csv", "summary.csv", "summary.md", "tests.csv", "tests.md", "convergence.csv", "convergence.md",
                 "boxplot.png", "label_efficiency.png", "report.md")
RUN_COLUMNS = ["model", "fraction", "seed", "value", "source", "epochs_to_95", "seconds_to_95", "epochs_logged",
               "wall_time_s", "run_name", "run_id"]
SUMMARY_COLUMNS = ["fraction", "model", "n", "mean", "sd", "mean_sd", "best"]
TEST_COLUMNS = ["fraction", "best", "other", "best_mean", "other_mean", "difference", "n_pairs", "wilcoxon_statistic",
                "wilcoxon_p", "wilcoxon_sig", "welch_t", "welch_df", "welch_p", "welch_sig", "note"]
CONVERGENCE_COLUMNS = ["fraction", "model", "n", "epochs_to_95_mean", "epochs_to_95_sd", "seconds_to_95_mean",
                       "seconds_to_95_sd", "wall_time_s"]


@dataclass
class RunScores:
    """The scored runs of an experiment, grouped by training fraction and model."""

    runs: list[dict[str, Any]]  # one row per run with a finite score (runs.csv)
    missing: list[str]  # names of the runs that logged neither the metric nor final_<metric>
    models: list[str]  # ``scratch`` first, then by name
    fractions: list[float]
    values: dict[float, dict[str, list[float]]]  # values[fraction][model]: scores by seed order
    paired: dict[float, dict[str, dict[str, float]]]  # paired[fraction][model][seed]: score


@dataclass
class Comparison:
    """Everything a comparison found: its settings, the scores and the three tables."""

    experiment: str
    metric: str
    by: str
    lower_is_better: bool
    min_pairs: int
    scores: RunScores
    summary: list[dict[str, Any]] = field(default_factory=list)
    convergence: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)
    marks: dict[float, dict[str, str]] = field(default_factory=dict)  # marks[fraction][model]: stars against the best


# ----------------------------------------------------------------------------- collect


def _store_uri(tracking_uri: str | None, folder: Path) -> str:
    """The experiment's MLflow store; the default one (``<folder>/mlruns.db``) must exist."""
    if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        store = folder / "mlruns.db"
        if not store.is_file():
            raise FileNotFoundError(f"{store}: no MLflow store there; pass --tracking-uri or --output_dir (the experiment's folder)")
    uri = bundle_tracking_uri(folder, tracking_uri)
    check_tracking_server(uri)
    return uri


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


def _run_row(client, run, model: str, metric: str, lower_is_better: bool) -> dict[str, Any]:
    """The runs.csv row of one run: its score and how fast it converged."""
    tags = run.data.tags
    score, source, history = _run_score(client, run, metric, lower_is_better)
    epochs, seconds = time_to_fraction_of_best(history, run.info.start_time, lower_is_better)
    return {
        "model": model, "fraction": float(tags.get("fraction", run.data.params.get("train_fraction", 1.0))),
        "seed": tags.get("seed", run.data.params.get("seed", "")), "value": score, "source": source,
        "epochs_to_95": epochs, "seconds_to_95": seconds, "epochs_logged": len(history),
        "wall_time_s": run.data.metrics.get("wall_time_s", math.nan), "run_name": run.info.run_name, "run_id": run.info.run_id,
    }


def _group(per_run: list[dict[str, Any]], missing: list[str]) -> RunScores:
    """Scores by fraction and model (``values``) and by fraction, model and seed (``paired``)."""
    models = sorted({r["model"] for r in per_run}, key=lambda m: (m != "scratch", m))
    fractions = sorted({r["fraction"] for r in per_run})
    values: dict[float, dict[str, list[float]]] = {f: {m: [] for m in models} for f in fractions}
    paired: dict[float, dict[str, dict[str, float]]] = {f: {m: {} for m in models} for f in fractions}
    for r in sorted(per_run, key=lambda r: (r["fraction"], r["model"], str(r["seed"]))):
        values[r["fraction"]][r["model"]].append(r["value"])
        paired[r["fraction"]][r["model"]][str(r["seed"])] = r["value"]
    return RunScores(per_run, missing, models, fractions, values, paired)


def collect_runs(client, experiment_id: str, experiment: str, metric: str, by: str, lower_is_better: bool) -> RunScores:
    """Score every finished grid run of the experiment that names its model in tag (or param) ``by``.

    Raises:
        ValueError: no finished run, none with ``by``, or none that logged ``metric``.
    """
    runs = [r for r in search_all_runs(client, [experiment_id], f"tags.`{STATUS_TAG}` = 'finished'")
            if r.data.tags.get(ROLE_TAG, "run") != "compare"]
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no finished runs (tag {STATUS_TAG} = finished)")
    per_run: list[dict[str, Any]] = []
    for run in runs:
        model = run.data.tags.get(by) or run.data.params.get(by)
        if model is not None:
            per_run.append(_run_row(client, run, model, metric, lower_is_better))
    if not per_run:
        raise ValueError(f"no finished run of {experiment!r} has a tag or parameter {by!r}")
    missing = [r["run_name"] for r in per_run if not math.isfinite(r["value"])]
    per_run = [r for r in per_run if math.isfinite(r["value"])]
    if not per_run:
        raise ValueError(f"no run of {experiment!r} logged {metric!r} (nor final_{metric})")
    return _group(per_run, missing)


# ----------------------------------------------------------------------------- summarise and test


def _model_stats(scores: RunScores, fraction: float,
                 lower_is_better: bool) -> tuple[dict[str, tuple[float, float, int]], list[str], str]:
    """(mean, sd, n) per model, the models with runs, and the best of them at one fraction."""
    stats = {m: describe(scores.values[fraction][m]) for m in scores.models}
    present = [m for m in scores.models if stats[m][2] > 0]
    best = (min if lower_is_better else max)(present, key=lambda m: stats[m][0])
    return stats, present, best


def _convergence_row(scores: RunScores, fraction: float, model: str) -> dict[str, Any]:
    """Epochs and seconds to 95% of the best validation value, and wall time: mean ± sd over the runs."""
    runs_here = [r for r in scores.runs if r["fraction"] == fraction and r["model"] == model]
    e_mean, e_sd, e_n = describe(r["epochs_to_95"] for r in runs_here)
    s_mean, s_sd, _ = describe(r["seconds_to_95"] for r in runs_here)
    w_mean, w_sd, _ = describe(r["wall_time_s"] for r in runs_here)
    return {"fraction": fraction, "model": model, "n": e_n, "epochs_to_95_mean": e_mean, "epochs_to_95_sd": e_sd,
            "seconds_to_95_mean": s_mean, "seconds_to_95_sd": s_sd,
            "epochs_to_95": f"{format_number(e_mean, 2)} ± {format_number(e_sd, 2)}",
            "seconds_to_95": f"{format_number(s_mean, 1)} ± {format_number(s_sd, 1)}",
            "wall_time_s": f"{format_number(w_mean, 1)} ± {format_number(w_sd, 1)}"}


def summarise(comparison: Comparison) -> None:
    """Fill ``comparison.summary`` (mean ± sd, n, best) and ``.convergence``, per fraction and model."""
    scores = comparison.scores
    for fraction in scores.fractions:
        stats, present, best = _model_stats(scores, fraction, comparison.lower_is_better)
        for m in present:
            mean, sd, n = stats[m]
            comparison.summary.append({"fraction": fraction, "model": m, "n": n, "mean": mean, "sd": sd,
                                       "mean_sd": f"{format_number(mean)} ± {format_number(sd)}",
                                       "best": "yes" if m == best else ""})
            comparison.convergence.append(_convergence_row(scores, fraction, m))


def significance_tests(comparison: Comparison) -> None:
    """Fill ``comparison.tests`` and ``.marks``: at each fraction, the best model against each other one
    (Wilcoxon on seed pairs and Welch's t-test); the mark is Wilcoxon's stars, Welch's where Wilcoxon is NaN."""
    scores = comparison.scores
    for fraction in scores.fractions:
        stats, present, best = _model_stats(scores, fraction, comparison.lower_is_better)
        comparison.marks[fraction] = {best: "best"}
        for m in present:
            if m == best:
                continue
            w = wilcoxon_paired(scores.paired[fraction][best], scores.paired[fraction][m], min_pairs=comparison.min_pairs)
            t = welch_ttest(scores.values[fraction][best], scores.values[fraction][m])
            comparison.marks[fraction][m] = stars(w["p"]) if math.isfinite(w["p"]) else stars(t["p"])
            comparison.tests.append({
                "fraction": fraction, "best": best, "other": m, "best_mean": stats[best][0], "other_mean": stats[m][0],
                "difference": stats[best][0] - stats[m][0], "n_pairs": w["n_pairs"],
                "wilcoxon_statistic": w["statistic"], "wilcoxon_p": w["p"], "wilcoxon_sig": stars(w["p"]),
                "welch_t": t["statistic"], "welch_df": t["df"], "welch_p": t["p"], "welch_sig": stars(t["p"]),
                "note": "; ".join(x for x in (w["note"], t["note"]) if x),
            })


# ----------------------------------------------------------------------------- write


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


def _write_tables(target: Path, c: Comparison) -> tuple[str, str, str]:
    """runs.csv and the summary, tests and convergence tables as CSV and Markdown; returns the Markdown."""
    _write_csv(target / "runs.csv", c.scores.runs, RUN_COLUMNS)
    _write_csv(target / "summary.csv", c.summary, SUMMARY_COLUMNS)
    _write_csv(target / "tests.csv", c.tests, TEST_COLUMNS)
    _write_csv(target / "convergence.csv", c.convergence, CONVERGENCE_COLUMNS)
    pf = {"wilcoxon_p": _p_text, "welch_p": _p_text, "fraction": fraction_text}
    summary_md = markdown_table(c.summary, ["fraction", "model", "n", "mean_sd", "best"], {"fraction": fraction_text})
    tests_md = markdown_table(c.tests, ["fraction", "best", "other", "difference", "n_pairs", "wilcoxon_p", "wilcoxon_sig",
                                        "welch_p", "welch_sig", "note"], pf)
    conv_md = markdown_table(c.convergence, ["fraction", "model", "n", "epochs_to_95", "seconds_to_95", "wall_time_s"],
                             {"fraction": fraction_text})
    (target / "summary.md").write_text(summary_md + "\n")
    (target / "tests.md").write_text(tests_md + "\n")
    (target / "convergence.md").write_text(conv_md + "\n")
    return summary_md, tests_md, conv_md


def _write_plots(target: Path, c: Comparison) -> None:
    """boxplot.png (with the marks) and label_efficiency.png."""
    import matplotlib.pyplot as plt

    box = boxplot_figure(c.scores.values, c.scores.models, c.metric, c.marks)
    box.savefig(target / "boxplot.png", dpi=110)
    plt.close(box)
    curve = label_efficiency_figure(c.scores.values, c.scores.models, c.metric)
    curve.savefig(target / "label_efficiency.png", dpi=110)
    plt.close(curve)


def _report_text(c: Comparison, summary_md: str, tests_md: str, conv_md: str) -> str:
    """report.md: the three tables, the plots and how each was made."""
    metric, scores = c.metric, c.scores
    direction = "lower is better" if c.lower_is_better else "higher is better"
    fractions = ", ".join(map(fraction_text, scores.fractions))
    notes = [f"- runs without `{metric}`: {', '.join(scores.missing)}"] if scores.missing else []
    return "\n".join([
        f"# {c.experiment}: {metric} by {c.by}",
        "",
        f"{len(scores.runs)} finished runs, {len(scores.models)} models, fractions {fractions}; "
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
        f"(NaN below {c.min_pairs} pairs), and Welch's two-sample t-test (`scipy.stats.ttest_ind(equal_var=False)`): "
        "Welch because the models' run-to-run variances need not be equal (Student's test assumes they are). "
        "Stars: * p < 0.05, ** p < 0.01, *** p < 0.001, ns otherwise. No correction for multiple comparisons.",
        "",
        tests_md if c.tests else "(one model only: nothing to test)",
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


def write_comparison(target: Path, comparison: Comparison) -> dict[str, str]:
    """Write the tables (CSV and Markdown), the plots and report.md into ``target``; returns name -> path."""
    target.mkdir(parents=True, exist_ok=True)
    summary_md, tests_md, conv_md = _write_tables(target, comparison)
    _write_plots(target, comparison)
    (target / "report.md").write_text(_report_text(comparison, summary_md, tests_md, conv_md))
    return {name: str(target / name) for name in COMPARE_FILES}


def log_comparison(client, experiment_id: str, target: Path, comparison: Comparison) -> str:
    """Log the files of ``target`` as artifacts of a new ``compare_<metric>_by_<by>`` run; returns its id."""
    metric, by = comparison.metric, comparison.by
    compare_run = client.create_run(experiment_id, run_name=f"compare_{safe_name(metric)}_by_{safe_name(by)}",
                                    tags={ROLE_TAG: "compare", "metric": metric, "by": by})
    run_id = compare_run.info.run_id
    client.log_param(run_id, "metric", metric)
    client.log_param(run_id, "by", by)
    client.log_param(run_id, "lower_is_better", comparison.lower_is_better)
    client.log_param(run_id, "min_pairs", comparison.min_pairs)
    client.log_artifacts(run_id, str(target), artifact_path=f"compare_{safe_name(metric)}")
    client.set_terminated(run_id, "FINISHED")
    return run_id


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
        metric: a metric name of docs/architecture.md (``mean_dice``, ``accuracy``, ``mae``, ...).
        by: run tag that names the model (default ``init``).
        tracking_uri: the store (default ``MLFLOW_TRACKING_URI``, else
            ``<output_dir>/mlruns.db`` with ``output_dir`` default ``experiments/NAME``).
        output_dir: the experiment's folder (to find its store and place ``out``).
        out: where the files go (default ``<output_dir>/compare_<metric>``).
        lower_is_better: direction of the metric; ``None`` infers it
            (:func:`~echocare.experiments.stats.infer_lower_is_better`).
        min_pairs: fewest seed-paired runs for a Wilcoxon test (fewer: NaN with a note).
        log_to_mlflow: log the files as artifacts of a ``compare_<metric>_by_<by>`` run.

    Writes ``runs.csv`` (one row per run), ``summary.csv|md`` (mean ± sd and n per model and
    fraction), ``tests.csv|md`` (best model against each other one per fraction: Wilcoxon
    signed-rank on seed pairs and Welch's t-test, p-values and stars), ``convergence.csv|md``
    (epochs and seconds until the validation metric first reaches 95% of its best, mean ±
    sd per model and fraction), ``boxplot.png``, ``label_efficiency.png`` and ``report.md``
    (all of them with the methods). Returns ``{"out", "summary", "tests", "convergence",
    "runs", "files", "run_id", "lower_is_better", "models", "fractions"}``.
    """
    if by in ("seed", "fraction"):
        raise ValueError(f"--by {by}: models are grouped by another tag (seeds pair runs, fractions make the curves)")
    folder = Path(output_dir or Path("experiments") / safe_name(experiment)).resolve()
    uri = _store_uri(tracking_uri, folder)
    lower = infer_lower_is_better(metric) if lower_is_better is None else bool(lower_is_better)
    client = mlflow_client(uri)
    experiment_id = find_experiment(client, experiment, create=False)
    if experiment_id is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {uri}")

    scores = collect_runs(client, experiment_id, experiment, metric, by, lower)
    comparison = Comparison(experiment, metric, by, lower, min_pairs, scores)
    summarise(comparison)
    significance_tests(comparison)
    target = Path(out) if out else folder / f"compare_{safe_name(metric)}"
    files = write_comparison(target, comparison)
    run_id = log_comparison(client, experiment_id, target, comparison) if log_to_mlflow else None
    return {"out": str(target), "summary": comparison.summary, "tests": comparison.tests,
            "convergence": comparison.convergence, "runs": scores.runs, "files": files, "run_id": run_id,
            "lower_is_better": lower, "models": scores.models, "fractions": scores.fractions}
