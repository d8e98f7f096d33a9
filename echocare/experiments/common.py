"""What running and comparing an experiment share: the run tags, run names, number formats and
MLflow look-ups."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

__all__ = [
    "ROLE_TAG",
    "STATUS_TAG",
    "find_experiment",
    "format_number",
    "fraction_text",
    "markdown_table",
    "mlflow_client",
    "safe_name",
    "search_all_runs",
]

#: Tag set last on a grid run: ``finished`` or ``failed`` (a rerun skips finished runs).
STATUS_TAG = "echocare.status"
#: Tag that tells grid runs (``run``) from the runs that hold a comparison (``compare``).
ROLE_TAG = "echocare.role"


def safe_name(text: str) -> str:
    """``text`` with every character other than letters, digits, ``-``, ``_`` and ``.`` made ``-``
    (for run names and folders)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text)).strip("-") or "x"


def fraction_text(fraction: float) -> str:
    """A training fraction as run names and tables write it (``0.5``, ``1``)."""
    return f"{fraction:g}"


def format_number(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals (significant digits below 1e-3), ``nan``, ``""`` for None."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], formats: Mapping[str, Any] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) with the given columns."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [formats.get(c, format_number)(row.get(c, "")) if c in formats else format_number(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def mlflow_client(uri: str):
    """An ``MlflowClient`` on the store ``uri`` (MLflow imported on first use: it is slow to import)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def search_all_runs(client, experiment_ids: list[str], filter_string: str = "") -> list:
    """Every active run of the experiments that matches ``filter_string``, over all result pages."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_experiment(client, name: str, create: bool) -> str | None:
    """The id of the MLflow experiment ``name``, created when missing and ``create`` (else None).

    Raises:
        ValueError: the experiment exists but is deleted.
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return found.experiment_id
    return client.create_experiment(name) if create else None
