"""The statistics of ``echocare compare``: summaries of repeated runs, paired and unpaired
significance tests, and time to convergence."""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "LOWER_IS_BETTER",
    "MIN_WILCOXON_PAIRS",
    "TIME_FRACTION",
    "describe",
    "infer_lower_is_better",
    "stars",
    "time_to_fraction_of_best",
    "welch_ttest",
    "wilcoxon_paired",
]

#: Metrics (the names of docs/architecture.md) where a smaller value is better; ``compare`` infers the direction
#: from this list (and from names ending in ``loss``) unless told with ``lower_is_better``.
LOWER_IS_BETTER = frozenset({"mae", "mae_se", "mre_px", "mse_px2", "niqe", "brisque", "piqe", "fid", "hd95", "asd"})

#: The Wilcoxon test needs this many seed-paired runs by default: the exact two-sided test
#: cannot give p < 0.05 with 5 pairs or fewer (its smallest p-value is 2 / 2**n).
MIN_WILCOXON_PAIRS = 6

#: Convergence is the first epoch whose validation metric reaches this fraction of its best.
TIME_FRACTION = 0.95


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
    """Whether a smaller ``metric`` is better: the error metrics (:data:`LOWER_IS_BETTER`),
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


