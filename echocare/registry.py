"""The MLflow model registry for bundle runs: register a training run's best checkpoint, list, promote, fetch.

A registered version is a MONAI bundle folder, logged to its training run under
``registered_model/`` and used as the version's source::

    models/model.pt           the run's best checkpoint (saved at the key metric's best epoch)
    models/<file>             every other file the run logged in models/ that is not a checkpoint
                              (*.pt), e.g. usreport's tokenizer.json: what the network needs beside
                              its weights (:func:`checkpoint_sidecar` finds it)
    configs/*                 the bundle's configs (train/evaluate/inference, overlays, logging.conf)
    configs/metadata.json     the bundle's metadata with ``eval_metrics`` set to the run's validation
                              metrics at the best epoch
    configs/run_config.json   the executed config of the run (every override it trained with)
    docs/README.md, LICENSE

The version's tags hold the same metrics (one tag per metric name, named as in
docs/architecture.md, "Metric names"), ``bundle``,
``key_metric``, ``best_epoch`` and the run's ``network_size`` / ``image_size`` / ``class_names``
params. Bundles load a version with ``checkpoint: models:/NAME@ALIAS`` or
``models:/NAME/VERSION`` (:func:`echocare.registered_models.fetch_checkpoint`, called by
:func:`echocare.networks.load_network_checkpoint`), and their shape-defining ids default to the
version's recorded values (:func:`echocare.registered_models.recorded`) unless given.

Tracking store: an explicit ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the bundle's
default ``<output_dir>/mlruns.db``; the model registry lives in the same store. Registering
also records the store in the user's index (:func:`echocare.registered_models.model_stores_file`),
where loading a ``models:/NAME`` that the given store lacks looks next.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from echocare.bundle import BUNDLES_DIR, bundle_dir
from echocare.experiments import markdown_table
from echocare.registered_models import (
    CHECKPOINT_PATH,
    SETTING_TAGS,
    RegistryError,
    checkpoint_sidecar,
    fetch_checkpoint,
    fetch_registered_file,
    is_not_found,
    is_registry_uri,
    mlflow_client,
    model_version,
    parse_registry_uri,
    registered_model,
    remember_model_store,
    resolve_tracking_uri,
)

__all__ = [
    "REGISTERED_MODEL_PATH",
    "RegistryError",
    "RunRecord",
    "checkpoint_sidecar",
    "describe_run",
    "fetch_checkpoint",
    "fetch_registered_file",
    "find_run_id",
    "format_registry_table",
    "is_registry_uri",
    "list_registered",
    "parse_registry_uri",
    "promote",
    "register_run",
    "resolve_tracking_uri",
]

#: Folder of a run's artifacts that holds its registered bundle (the model versions' source).
REGISTERED_MODEL_PATH = "registered_model"

_EXECUTED_CONFIG = re.compile(r"^config_\d{8}_\d{6}\.json$")


# ----------------------------------------------------------------------------- runs


@dataclass
class RunRecord:
    """What a bundle training run logged, as the registry needs it.

    Attributes:
        run_id: the MLflow run.
        bundle_root: the bundle folder (from the run's executed config).
        config: the executed config (JSON content of ``config_*.json``).
        key_metric: the validation metric ``models/model.pt`` was selected on.
        lower_is_better: its direction (``key_metric_negative_sign`` of the checkpoint saver).
        best_epoch: the epoch of the best key metric (the first one on ties, as Ignite keeps it).
        metrics: every validation metric at ``best_epoch`` (name -> value).
        params: the run's params.
    """

    run_id: str
    bundle_root: Path
    config: dict[str, Any]
    key_metric: str
    lower_is_better: bool
    best_epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def bundle(self) -> str:
        return self.bundle_root.name


def _get_run(client, run_id: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if is_not_found(error) or "not found" in str(error).lower():
            raise RegistryError(f"no MLflow run {run_id!r} in {tracking_uri}") from None
        raise


def find_run_id(client, run: str, tracking_uri: str) -> str:
    """The id of the run named by ``run``: a run id, else a run name unique in the store
    (across its experiments, as ``echocare experiment`` and the bundles print them).

    Raises:
        RegistryError: no run has that id or name, or several runs have that name (their ids listed).
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run).info.run_id
    except MlflowException as error:
        if not (is_not_found(error) or "not found" in str(error).lower()):
            raise
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = []
    if experiments:
        quoted = "'" not in run  # MLflow's filter strings have no escape for the quote itself
        page = None
        while True:
            runs = client.search_runs(experiments, f"attributes.run_name = '{run}'" if quoted else "",
                                      max_results=1000, page_token=page)
            found += [r.info.run_id for r in runs if r.info.run_name == run]
            page = runs.token
            if not page:
                break
    if not found:
        raise RegistryError(f"no MLflow run {run!r} in {tracking_uri} (no run has that id or that name)")
    if len(found) > 1:
        raise RegistryError(f"run name {run!r} is not unique in {tracking_uri}: runs {', '.join(sorted(found))}; "
                            "pass one of these ids")
    return found[0]


def _executed_config(client, run_id: str, tracking_uri: str) -> dict[str, Any]:
    """The newest ``config_YYYYmmdd_HHMMSS.json`` that ``--tracking mlflow`` logged to the run."""
    import mlflow.artifacts

    names = sorted(Path(a.path).name for a in client.list_artifacts(run_id) if _EXECUTED_CONFIG.match(Path(a.path).name))
    if not names:
        raise RegistryError(
            f"run {run_id}: no executed config (config_*.json) among its artifacts; register a bundle "
            "training run made with --tracking mlflow"
        )
    with tempfile.TemporaryDirectory(prefix="echocare_registry_") as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=names[-1], dst_path=tmp, tracking_uri=tracking_uri
        )
        return json.loads(Path(path).read_text())


#: How bundle configs name their own folder (``bundle_root``): read as text, never evaluated.
_BUNDLE_DIR_CALL = re.compile(r"""^\$echocare\.bundle_dir\(\s*['"](?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)['"]\s*\)$""")


def _is_plain(value: Any) -> bool:
    """Data a config uses as it is: no ``$`` expression, ``@`` reference or ``%`` macro anywhere in it."""
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, Mapping):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return True


def _bundle_root(config: Mapping[str, Any], run_id: str) -> Path:
    """The run's bundle folder in this checkout, named by its executed config's ``bundle_root``: a
    folder (its name is the bundle's) or the configs' own ``$echocare.bundle_dir('NAME')``, read as
    text. Whoever can write to a tracking store can write that file, so nothing in it is evaluated
    and the configs read are this checkout's, never a folder the store points to."""
    raw = config.get("bundle_root")
    match = _BUNDLE_DIR_CALL.match(raw.strip()) if isinstance(raw, str) else None
    if match is not None:
        name = match["name"]
    elif isinstance(raw, str) and _is_plain(raw) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", Path(raw).name):
        name = Path(raw).name
    else:
        raise RegistryError(
            f"run {run_id}: its executed config's bundle_root {str(raw)[:80]!r} is neither a folder nor "
            "$echocare.bundle_dir('NAME'); the registry evaluates nothing from a tracking store"
        )
    try:
        return Path(bundle_dir(name))
    except FileNotFoundError:
        known = sorted(p.parent.name for p in BUNDLES_DIR.glob("*/configs") if p.is_dir())
        raise RegistryError(
            f"run {run_id}: its bundle {name!r} (bundle_root {str(raw)[:80]!r} of its executed config) is not in "
            f"{BUNDLES_DIR} or ./bundles (known: {', '.join(known) or 'none'}); register it from a checkout "
            "holding that bundle"
        ) from None


def _bundle_parser(bundle_root: Path, config: Mapping[str, Any]) -> ConfigParser:
    """The bundle's own ``train.yaml`` (code from this checkout) with the run's plain values on top
    (class names, sizes, ... as it trained with); the run's expressions are never evaluated."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "train.yaml"))
    for key, value in config.items():
        if key in parser and _is_plain(value):
            parser[key] = value
    return parser


def _validation_metrics(parser, run_id: str) -> tuple[str, list[str], bool]:
    """(key metric, other validation metrics, lower is better) from the bundle's config."""
    try:
        key = list(parser.get_parsed_content("validate#evaluator#key_val_metric"))
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a bundle training config"
        raise RegistryError(
            f"run {run_id}: cannot read validate#evaluator#key_val_metric from its bundle's train.yaml "
            f"({type(error).__name__}: {error}); register a bundle training run"
        ) from None
    if len(key) != 1:
        raise RegistryError(f"run {run_id}: expected one key validation metric, found {key}")
    others = []
    if "validate#evaluator#additional_metrics" in parser:
        others = list(parser.get_parsed_content("validate#evaluator#additional_metrics") or {})
    handlers = parser.get("validate#handlers") or []
    negative = any(isinstance(h, Mapping) and h.get("key_metric_negative_sign") is True for h in handlers)
    return key[0], others, negative


def describe_run(client, run_id: str, tracking_uri: str) -> RunRecord:
    """Read a bundle training run: its bundle, best checkpoint's epoch and validation metrics.

    Raises:
        RegistryError: unknown run, no ``models/model.pt`` or executed config among its
            artifacts, a bundle folder that no longer exists, or no key metric history.
    """
    run = _get_run(client, run_id, tracking_uri)
    checkpoints = {a.path for a in client.list_artifacts(run_id, "models")}
    if CHECKPOINT_PATH not in checkpoints:
        raise RegistryError(
            f"run {run_id} ({run.info.run_name}): no {CHECKPOINT_PATH} among its artifacts "
            "(an evaluation run, or training that did not finish?)"
        )
    config = _executed_config(client, run_id, tracking_uri)
    bundle_root = _bundle_root(config, run_id)
    if not (bundle_root / "configs").is_dir():
        raise RegistryError(f"run {run_id}: its bundle folder {bundle_root} has no configs/ (moved or deleted?)")
    parser = _bundle_parser(bundle_root, config)
    key, others, lower = _validation_metrics(parser, run_id)
    history = client.get_metric_history(run_id, key)
    if not history:
        raise RegistryError(f"run {run_id}: no history of its key metric {key!r} (no validation ran?)")
    best = min(history, key=lambda m: (m.value if lower else -m.value, m.step))
    metrics = {key: float(best.value)}
    for name in others:
        at_best = [m.value for m in client.get_metric_history(run_id, name) if m.step == best.step]
        if at_best:
            metrics[name] = float(at_best[-1])
    return RunRecord(run_id, bundle_root, config, key, lower, int(best.step), metrics, dict(run.data.params))


def _bundle_folder(client, record: RunRecord, folder: Path, tracking_uri: str) -> None:
    """Write the registered bundle of ``record`` into ``folder`` (layout in the module docstring)."""
    shutil.copytree(record.bundle_root / "configs", folder / "configs")
    for extra in ("docs/README.md", "LICENSE"):
        if (record.bundle_root / extra).is_file():
            (folder / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(record.bundle_root / extra, folder / extra)
    (folder / CHECKPOINT_PATH).parent.mkdir(parents=True)
    files = [CHECKPOINT_PATH, *_side_files(client, record.run_id)]
    _download_run_files(record.run_id, files, folder / "models", tracking_uri)
    metadata_path = folder / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    metadata["eval_metrics"] = dict(record.metrics)
    metadata_path.write_text(json.dumps(metadata, indent=2))
    (folder / "configs" / "run_config.json").write_text(json.dumps(record.config, indent=1))


def _side_files(client, run_id: str) -> list[str]:
    """What the run's network needs beside its weights (e.g. a tokenizer): the artifact paths of
    every file in ``models/`` that is not a checkpoint (``*.pt``)."""
    return [a.path for a in client.list_artifacts(run_id, "models") if not a.is_dir and Path(a.path).suffix != ".pt"]


def _download_run_files(run_id: str, paths: Sequence[str], folder: Path, tracking_uri: str) -> None:
    """Download the run's artifacts ``paths`` into ``folder`` (by file name)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="echocare_side_") as tmp:
        for path in paths:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=tracking_uri)
            shutil.move(local, folder / Path(path).name)


def _version_tags(record: RunRecord) -> dict[str, str]:
    tags = {"bundle": record.bundle, "key_metric": record.key_metric, "best_epoch": str(record.best_epoch)}
    tags.update({k: str(record.params[k]) for k in SETTING_TAGS if k in record.params})
    tags.update({k: f"{v:.6g}" for k, v in record.metrics.items()})
    return tags


def register_run(
    run_id: str,
    name: str,
    alias: str | None = None,
    tracking_uri: str | None = None,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Register the best checkpoint of bundle training run ``run_id`` (its id, or its name where that is
    unique in the store) as a new version of model ``name``.

    The registered bundle (module docstring) is logged once to the run under
    ``registered_model/`` (registering the run again reuses it) and becomes the version's
    source; ``alias`` (e.g. ``champion``) is pointed at the new version.

    Returns:
        ``{"name", "version", "alias", "run_id", "bundle", "key_metric", "best_epoch",
        "metrics", "source", "tracking_uri"}``.
    """
    from mlflow.exceptions import MlflowException

    store = resolve_tracking_uri(tracking_uri, output_dir)
    client = mlflow_client(store)
    run_id = find_run_id(client, run_id, store)
    record = describe_run(client, run_id, store)
    logged = {a.path for a in client.list_artifacts(run_id, f"{REGISTERED_MODEL_PATH}/models")}
    if f"{REGISTERED_MODEL_PATH}/{CHECKPOINT_PATH}" not in logged:
        with tempfile.TemporaryDirectory(prefix="echocare_registry_") as tmp:
            _bundle_folder(client, record, Path(tmp) / "bundle", store)
            client.log_artifacts(run_id, str(Path(tmp) / "bundle"), artifact_path=REGISTERED_MODEL_PATH)
    else:  # reused: add side files the run logged after it was first registered
        missing = [p for p in _side_files(client, run_id) if f"{REGISTERED_MODEL_PATH}/models/{Path(p).name}" not in logged]
        if missing:
            with tempfile.TemporaryDirectory(prefix="echocare_registry_") as tmp:
                _download_run_files(run_id, missing, Path(tmp), store)
                client.log_artifacts(run_id, tmp, artifact_path=f"{REGISTERED_MODEL_PATH}/models")
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if not is_not_found(error):
            raise
        client.create_registered_model(name, tags={"bundle": record.bundle})
    source = f"runs:/{run_id}/{REGISTERED_MODEL_PATH}"
    description = (
        f"{record.bundle} from run {run_id}: best {record.key_metric} {record.metrics[record.key_metric]:.4f} "
        f"at epoch {record.best_epoch}"
    )
    version = client.create_model_version(name, source, run_id=run_id, tags=_version_tags(record), description=description)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    remember_model_store(name, store)  # so that models:/NAME... is found here without --tracking_uri
    return {
        "name": name, "version": int(version.version), "alias": alias, "run_id": run_id, "bundle": record.bundle,
        "key_metric": record.key_metric, "best_epoch": record.best_epoch, "metrics": record.metrics,
        "source": source, "tracking_uri": store,
    }


def promote(
    name: str, version: int | str, alias: str, tracking_uri: str | None = None, output_dir: str | Path | None = None
) -> dict[str, Any]:
    """Point ``alias`` of registered model ``name`` at ``version`` (moving it from any other version).

    Returns ``{"name", "version", "alias", "previous"}`` (``previous``: the version the alias
    pointed at before, or None).
    """
    store = resolve_tracking_uri(tracking_uri, output_dir)
    client = mlflow_client(store)
    target = model_version(client, name, version, None, store)
    previous = dict(client.get_registered_model(name).aliases or {}).get(alias)
    client.set_registered_model_alias(name, alias, target.version)
    return {"name": name, "version": int(target.version), "alias": alias,
            "previous": int(previous) if previous is not None else None}


def list_registered(
    tracking_uri: str | None = None, output_dir: str | Path | None = None, name: str | None = None
) -> list[dict[str, Any]]:
    """Every version of every registered model (or of ``name``), newest first within a model.

    Each row: ``name``, ``version``, ``aliases`` (comma-separated), ``bundle``, ``key_metric``,
    ``value`` (the key metric), ``best_epoch``, ``network_size``, ``run_id``, ``created``
    (UTC, ISO 8601).
    """
    store = resolve_tracking_uri(tracking_uri, output_dir)
    client = mlflow_client(store)
    models = [registered_model(client, name, store)] if name else list(client.search_registered_models())
    rows = []
    for model in sorted(models, key=lambda m: m.name):
        by_version: dict[str, list[str]] = {}
        for alias, version in dict(model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name='{model.name}'")
        for version in sorted(versions, key=lambda v: -int(v.version)):
            tags = dict(version.tags or {})
            key = tags.get("key_metric", "")
            created = datetime.datetime.fromtimestamp(version.creation_timestamp / 1000, datetime.timezone.utc)
            rows.append({
                "name": model.name, "version": int(version.version),
                "aliases": ",".join(sorted(by_version.get(str(version.version), []))),
                "bundle": tags.get("bundle", ""), "key_metric": key,
                "value": float(tags[key]) if key in tags else None, "best_epoch": tags.get("best_epoch", ""),
                "network_size": tags.get("network_size", ""), "run_id": version.run_id or "",
                "created": created.isoformat(timespec="seconds"),
            })
    return rows


def format_registry_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`list_registered` as a Markdown table."""
    columns = ["name", "version", "aliases", "bundle", "key_metric", "value", "best_epoch", "network_size", "run_id", "created"]
    return markdown_table(rows, columns)
