"""Bundle folders, their overlay configs and MLflow store, and the helpers bundle configs call."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from echocare.errors import EchoCareError

__all__ = [
    "BUNDLES_DIR",
    "MissingIdError",
    "as_bool",
    "bundle_dir",
    "readme_example",
    "require_ids",
    "resolve_bundle",
    "resolve_overlays",
    "split_values",
    "tracking_uri",
]

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


#: What each id a bundle run cannot guess is, as :func:`require_ids` names it.
REQUIRED_ID_MEANINGS = {
    "input_dir": "a file, folder or datalist",
    "datalist": 'a MONAI datalist JSON with "training" and "validation" lists of the bundle\'s items',
    "shards": "a shards.json index of WebDataset shards, from echocare curate --format webdataset",
}
#: Optional ids :func:`require_ids` explains beside a missing one, when the config has them.
OPTIONAL_ID_MEANINGS = {
    "datalist": {"dataset_dir": "the folder the datalist's relative paths start from (default: the datalist's folder)"},
    "input_dir": {"datalist_key": "which list of a datalist JSON to run on (default: validation)"},
}


class MissingIdError(EchoCareError, ValueError):
    """A bundle run was started without an id it cannot guess (``--datalist``, ``--input_dir``)."""


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def readme_example(bundle_root: str | os.PathLike[str], run: str) -> list[str]:
    """The first ``python -m monai.bundle run RUN`` command in ``<bundle_root>/docs/README.md``,
    with its continuation lines and the ``echocare ...`` line just before it, comments between
    them skipped (the one making the datalist); ``[]`` when the README or such a command is absent."""
    readme = Path(bundle_root) / "docs" / "README.md"
    if not readme.is_file():
        return []
    lines = readme.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if line.lstrip().startswith("python -m monai.bundle run ") and line.split()[4:5] == [run]:
            before = index - 1
            while before >= 0 and lines[before].lstrip().startswith("#"):
                before -= 1  # comments between the datalist command and this one
            out = [lines[before].strip()] if before >= 0 and lines[before].lstrip().startswith("echocare ") else []
            out.append(line.strip())
            while out[-1].endswith("\\") and index + 1 < len(lines):
                index += 1
                out.append("  " + lines[index].strip())
            return out
    return []


def require_ids(values: dict[str, Any], bundle_root: str | os.PathLike[str] | None = None, run: str = "training",
                either: dict[str, dict[str, Any]] | None = None) -> None:
    """Refuse a bundle run whose required ids are empty, before anything is built: the first item of
    each bundle's ``training``, ``evaluating`` and ``inferring`` lists (never of ``network_def`` or
    the other parts MONAI's ``verify_net_in_out`` and MONAI Label parse without an input).

    Args:
        values: each required id and its value in the config (``{"datalist": @datalist}``); a
            ``None`` or blank value is missing.
        bundle_root: the bundle's folder: its name heads the message and its ``docs/README.md``
            gives the example command.
        run: the run id, for the message and the README example.
        either: per required id, the ids that can stand in for it and their values
            (``{"datalist": {"shards": @shards}}``: the pretraining bundle streams shards instead);
            the id is missing only when they are all missing too, and the message names them all.

    Raises:
        MissingIdError: one message naming each missing id and what it is: first line
            ``pass --ID (what it is)[ or --ALT (...)][, --ID2 (...)]``, then the optional ids that
            go with them and the README's example.
    """
    either = either or {}
    missing = [name for name, value in values.items()
               if _missing(value) and all(_missing(v) for v in either.get(name, {}).values())]
    if not missing:
        return None
    what = ", ".join(" or ".join(f"--{id_} ({REQUIRED_ID_MEANINGS.get(id_, 'required')})"
                                 for id_ in (name, *either.get(name, {})))
                     for name in missing)
    lines = [f"pass {what}"]
    where = f"{Path(bundle_root).name} {run}" if bundle_root else run
    lines.append(f"  {where} cannot guess {'it' if len(missing) == 1 else 'them'}")
    for name in missing:
        for optional, meaning in OPTIONAL_ID_MEANINGS.get(name, {}).items():
            lines.append(f"  --{optional}: {meaning}")
    example = readme_example(bundle_root, run) if bundle_root else []
    if example:
        lines.append(f"  for example ({Path(bundle_root) / 'docs' / 'README.md'}):")
        lines.extend(f"    {line}" for line in example)
    raise MissingIdError("\n".join(lines))
