"""The figures of ``echocare compare``: box plots of the runs and label-efficiency curves."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from echocare.experiments.common import fraction_text
from echocare.experiments.stats import describe

__all__ = ["boxplot_figure", "label_efficiency_figure", "model_colours"]

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
        ax.set_title(f"fraction {fraction_text(fraction)}")
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
    ax.set_xticklabels([fraction_text(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel(f"{metric} (mean ± sd)")
    ax.set_title("label efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
