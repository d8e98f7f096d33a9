"""Bundle folders, their overlay configs and MLflow store, and the helpers bundle configs call."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["BUNDLES_DIR", "as_bool", "bundle_dir", "resolve_bundle", "resolve_overlays", "split_values", "tracking_uri"]

#: The ``bundles/`` folder of the source checkout this package was installed from.
BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


def bundle_dir(name: str) -> str:
    """The folder of bundle ``name``: in this checkout's ``bundles/``, else in ``./bundles``.

    Configs use it as the default ``bundle_root`` (and so ``output_dir``); MONAI Label and
    users override ``bundle_root`` when the bundle lives elsewhere.
    """
    for root in (BUNDLES_DIR, Path.cwd() / "bundles"):
        if (root / name / "configs").is_dir():
            return str(root / name)
    known = sorted(p.parent.name for p in BUNDLES_DIR.glob("*/configs") if p.is_dir())
    raise FileNotFoundError(
        f"{name}: no such bundle in {BUNDLES_DIR} or ./bundles (known: {', '.join(known) or 'none'}); "
        "give a bundle folder, or pass --bundle_root explicitly"
    )


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off", "none", ""}


def as_bool(value: object) -> bool:
    """A config flag as a bool. ``--resume false`` on the command line arrives as the string
    "false" (python-fire only parses Python literals such as ``False``), which plain
    truthiness would read as True."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"not a yes/no value: {value!r} (use true or false)")
    return bool(value)


def split_values(value: Any) -> list[Any]:
    """A CLI value that may be a list, a tuple (python-fire's ``a,b``) or a ``"a,b"`` string, as a flat list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            out.extend(split_values(v))
        return out
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [value]


def resolve_bundle(bundle: str) -> tuple[str, Path]:
    """(name, absolute ``configs`` folder) of a bundle given by name (``bundles/NAME``) or by folder."""
    folder = Path(bundle)
    if not (folder / "configs" / "train.yaml").is_file():
        folder = Path(bundle_dir(bundle))
    return folder.resolve().name, (folder / "configs").resolve()


def resolve_overlays(config: str | Iterable[str] | None, configs: Path) -> list[str]:
    """Absolute paths of overlay configs (variants) named as files, or as names in ``configs``
    with or without ``.yaml``; a comma-separated string names several."""
    out = []
    for item in split_values(config):
        candidates = [Path(item), configs / item, configs / f"{item}.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"overlay config {item!r} not found (tried {', '.join(map(str, candidates))})")
        out.append(str(found.resolve()))
    return out


def tracking_uri(output_dir: str | os.PathLike[str] | None, tracking_uri: str | None = None) -> str:
    """The MLflow store of a bundle run: ``tracking_uri`` when given, else ``$MLFLOW_TRACKING_URI``,
    else the SQLite file ``<output_dir>/mlruns.db`` (MONAI's default for ``--tracking mlflow``).

    Raises:
        ValueError: none of the three is given.
    """
    if tracking_uri:
        return str(tracking_uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if output_dir is None or str(output_dir) == "":
        raise ValueError("no tracking store: pass tracking_uri, the run's output_dir, or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{Path(output_dir).resolve() / 'mlruns.db'}"
