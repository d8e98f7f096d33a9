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

The version's tags hold the same metrics (one tag per metric name, DESIGN's names), ``bundle``,
``key_metric``, ``best_epoch`` and the run's ``network_size`` / ``image_size`` / ``class_names``
params. Bundles load a version with ``checkpoint: models:/NAME@ALIAS`` or
``models:/NAME/VERSION`` (:func:`fetch_checkpoint`, called by
:func:`echocare.networks.load_network_checkpoint`).

Tracking store: an explicit ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the bundle's
default ``<output_dir>/mlruns.db``; the model registry lives in the same store.
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

from echocare.errors import EchoCareError
from echocare.tracking import check_tracking_server

__all__ = [
    "REGISTERED_MODEL_PATH",
    "RegistryError",
    "RunRecord",
    "checkpoint_sidecar",
    "describe_run",
    "fetch_checkpoint",
    "fetch_registered_file",
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
#: The best checkpoint inside a registered bundle, and where bundle runs log it.
CHECKPOINT_PATH = "models/model.pt"
#: Run params copied onto each model version as tags (what rebuilding the network needs).
TAGGED_PARAMS = ("network_size", "image_size", "class_names", "clip_frames", "clip_pooling", "finetune_mode")

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_EXECUTED_CONFIG = re.compile(r"^config_\d{8}_\d{6}\.json$")


class RegistryError(EchoCareError, ValueError):
    """A registry lookup or registration that cannot be done; the message names what is missing."""


def is_registry_uri(value: object) -> bool:
    """Whether ``value`` is a ``models:/...`` URI (a registered model rather than a file)."""
    return isinstance(value, str) and value.startswith("models:/")


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    match = _URI.match(uri)
    if match is None:
        raise RegistryError(f"{uri}: not a registered model URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["version"], match["alias"]


def resolve_tracking_uri(tracking_uri: str | None = None, output_dir: str | Path | None = None) -> str:
    """The MLflow store: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``<output_dir>/mlruns.db``.

    Raises:
        RegistryError: none of them given, or a SQLite store whose file does not exist (MLflow
            would create an empty one, hiding a wrong path).
        echocare.tracking.TrackingServerError: an http(s) store that does not answer.
    """
    from echocare.experiments import _tracking_uri

    try:
        uri = _tracking_uri(tracking_uri, Path(output_dir) if output_dir else None)
    except ValueError:
        raise RegistryError(
            "no MLflow store: pass --tracking-uri (e.g. sqlite:///OUT/mlruns.db or http://HOST:PORT), "
            "set MLFLOW_TRACKING_URI, or pass the bundle's --output-dir holding mlruns.db"
        ) from None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise RegistryError(f"{uri}: no MLflow store there (no such file; train with --tracking mlflow first?)")
    check_tracking_server(uri)
    return uri


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _not_found(error: Exception) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _registered_model(client, name: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if not _not_found(error):
            raise
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(
            f"no registered model {name!r} in {tracking_uri} (registered: {', '.join(known) or 'none'})"
        ) from None


def _version_of(client, name: str, version: str | int | None, alias: str | None, tracking_uri: str):
    """The ``ModelVersion`` of NAME at VERSION or ALIAS, with errors naming what is missing."""
    from mlflow.exceptions import MlflowException

    model = _registered_model(client, name, tracking_uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if not _not_found(error) and "not found" not in str(error).lower():
            raise
    if alias is not None:
        aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(dict(model.aliases or {}).items())) or "none"
        raise RegistryError(f"registered model {name!r} has no alias {alias!r} in {tracking_uri} (aliases: {aliases})")
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    raise RegistryError(
        f"registered model {name!r} has no version {version} in {tracking_uri} "
        f"(versions: {', '.join(map(str, versions)) or 'none'})"
    )


def fetch_registered_file(uri: str, relative_path: str, dst_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Download one file of the registered bundle ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Args:
        uri: the registered model URI.
        relative_path: the file inside the registered bundle (e.g. ``models/model.pt``,
            ``models/tokenizer.json``; layout in the module docstring).
        dst_dir: an existing folder; the file lands at ``dst_dir/<its name>``.
        tracking_uri: the MLflow store (default ``MLFLOW_TRACKING_URI``).

    Returns:
        The local path.

    Raises:
        RegistryError: malformed URI, no store, unknown name, version or alias, or a version
            without that file (all named).
    """
    import mlflow.artifacts

    name, version, alias = parse_registry_uri(uri)
    store = resolve_tracking_uri(tracking_uri)
    client = _client(store)
    found = _version_of(client, name, version, alias, store)
    source = client.get_model_version_download_uri(name, found.version)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source.rstrip('/')}/{relative_path}", dst_path=str(dst_dir), tracking_uri=store
        )
    except Exception as error:  # noqa: BLE001 - MLflow raises per-store exception types for a missing artifact
        if relative_path == CHECKPOINT_PATH:
            raise
        raise RegistryError(
            f"{uri} (version {found.version} of {name!r}) holds no {relative_path}: register the run again "
            f"(runs registered before their models/ side files were kept lack it), or pass the file's path"
        ) from error
    return Path(local)


def fetch_checkpoint(uri: str, dst_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Download the checkpoint of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` into ``dst_dir``
    (``dst_dir/model.pt``); see :func:`fetch_registered_file`."""
    return fetch_registered_file(uri, CHECKPOINT_PATH, dst_dir, tracking_uri)


def checkpoint_sidecar(
    checkpoint: str | Path, filename: str, default: str | Path, download_dir: str | Path, tracking_uri: str | None = None
) -> str:
    """The file ``filename`` that belongs with a checkpoint (e.g. usreport's ``tokenizer.json``).

    For a registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``): the version's
    ``models/<filename>``, downloaded to ``download_dir/NAME/<version or alias>/``. For a
    checkpoint file: ``<filename>`` beside it when it exists there, else ``default``.

    Raises:
        RegistryError: a registered version without the file (see :func:`fetch_registered_file`).
    """
    if is_registry_uri(checkpoint):
        name, version, alias = parse_registry_uri(str(checkpoint))
        folder = Path(download_dir) / name / (alias or str(version))
        folder.mkdir(parents=True, exist_ok=True)
        return str(fetch_registered_file(str(checkpoint), f"models/{filename}", folder, tracking_uri))
    beside = Path(checkpoint).parent / filename
    return str(beside) if str(checkpoint) and beside.is_file() else str(default)


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
        if _not_found(error) or "not found" in str(error).lower():
            raise RegistryError(f"no MLflow run {run_id!r} in {tracking_uri}") from None
        raise


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


def _validation_metrics(parser, run_id: str) -> tuple[str, list[str], bool]:
    """(key metric, other validation metrics, lower is better) from the executed config."""
    try:
        key = list(parser.get_parsed_content("validate#evaluator#key_val_metric"))
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a bundle training config"
        raise RegistryError(
            f"run {run_id}: cannot read validate#evaluator#key_val_metric from its executed config "
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
    from monai.bundle import ConfigParser

    run = _get_run(client, run_id, tracking_uri)
    checkpoints = {a.path for a in client.list_artifacts(run_id, "models")}
    if CHECKPOINT_PATH not in checkpoints:
        raise RegistryError(
            f"run {run_id} ({run.info.run_name}): no {CHECKPOINT_PATH} among its artifacts "
            "(an evaluation run, or training that did not finish?)"
        )
    config = _executed_config(client, run_id, tracking_uri)
    parser = ConfigParser(config)
    bundle_root = Path(parser.get_parsed_content("bundle_root"))
    if not (bundle_root / "configs").is_dir():
        raise RegistryError(f"run {run_id}: its bundle folder {bundle_root} has no configs/ (moved or deleted?)")
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
    tags.update({k: str(record.params[k]) for k in TAGGED_PARAMS if k in record.params})
    tags.update({k: f"{v:.6g}" for k, v in record.metrics.items()})
    return tags


def register_run(
    run_id: str,
    name: str,
    alias: str | None = None,
    tracking_uri: str | None = None,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Register the best checkpoint of bundle training run ``run_id`` as a new version of model ``name``.

    The registered bundle (module docstring) is logged once to the run under
    ``registered_model/`` (registering the run again reuses it) and becomes the version's
    source; ``alias`` (e.g. ``champion``) is pointed at the new version.

    Returns:
        ``{"name", "version", "alias", "run_id", "bundle", "key_metric", "best_epoch",
        "metrics", "source", "tracking_uri"}``.
    """
    from mlflow.exceptions import MlflowException

    store = resolve_tracking_uri(tracking_uri, output_dir)
    client = _client(store)
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
        if not _not_found(error):
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
    client = _client(store)
    target = _version_of(client, name, version, None, store)
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
    client = _client(store)
    models = [_registered_model(client, name, store)] if name else list(client.search_registered_models())
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
    from echocare.experiments import markdown_table

    columns = ["name", "version", "aliases", "bundle", "key_metric", "value", "best_epoch", "network_size", "run_id", "created"]
    return markdown_table(rows, columns)
