"""Registered model versions, read side: ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` URIs,
the MLflow store they live in, and fetching a version's checkpoint and side files.

What bundles need to load a registered model lives here, below every layer that loads weights
(:func:`echocare.networks.load_network_checkpoint` takes ``models:/`` checkpoints through it);
registering, listing and promoting versions is :mod:`echocare.registry`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from echocare.bundle import tracking_uri as bundle_tracking_uri
from echocare.errors import EchoCareError
from echocare.tracking import check_tracking_server

__all__ = [
    "CHECKPOINT_PATH",
    "RegistryError",
    "checkpoint_sidecar",
    "fetch_checkpoint",
    "fetch_registered_file",
    "is_not_found",
    "is_registry_uri",
    "mlflow_client",
    "model_store",
    "model_stores_file",
    "model_version",
    "parse_registry_uri",
    "recorded",
    "recorded_settings",
    "registered_model",
    "remember_model_store",
    "resolve_tracking_uri",
]

logger = logging.getLogger(__name__)

#: The best checkpoint inside a registered bundle, and where bundle runs log it.
CHECKPOINT_PATH = "models/model.pt"
#: The executed config of the run inside a registered bundle (every id it trained with).
RUN_CONFIG_PATH = "configs/run_config.json"
#: Run params that :func:`echocare.registry.register_run` copies onto each model version as tags:
#: the run's evaluated shape-defining settings (what rebuilding the network needs); ``class_names``
#: and ``landmark_names`` are comma-joined there.
SETTING_TAGS = (
    "network_size",
    "image_size",
    "class_names",
    "landmark_names",
    "clip_frames",
    "clip_pooling",
    "finetune_mode",
)

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


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
    try:
        uri = bundle_tracking_uri(output_dir, tracking_uri)
    except ValueError:
        raise RegistryError(
            "no MLflow store: pass --tracking-uri (e.g. sqlite:///OUT/mlruns.db or http://HOST:PORT), "
            "set MLFLOW_TRACKING_URI, or pass the bundle's --output-dir holding mlruns.db"
        ) from None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise RegistryError(f"{uri}: no MLflow store there (no such file; train with --tracking mlflow first?)")
    check_tracking_server(uri)
    return uri


def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def is_not_found(error: Exception) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def registered_model(client, name: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if not is_not_found(error):
            raise
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(
            f"no registered model {name!r} in {tracking_uri} (registered: {', '.join(known) or 'none'})"
        ) from None


def model_version(client, name: str, version: str | int | None, alias: str | None, tracking_uri: str):
    """The ``ModelVersion`` of NAME at VERSION or ALIAS, with errors naming what is missing."""
    from mlflow.exceptions import MlflowException

    model = registered_model(client, name, tracking_uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if not is_not_found(error) and "not found" not in str(error).lower():
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
        tracking_uri: the MLflow store (default ``MLFLOW_TRACKING_URI``; see :func:`model_store`
            for where else the model is looked for).

    Returns:
        The local path.

    Raises:
        RegistryError: malformed URI, no store, unknown name, version or alias, or a version
            without that file (all named).
    """
    import mlflow.artifacts

    name, version, alias = parse_registry_uri(uri)
    store = model_store(uri, tracking_uri)
    client = mlflow_client(store)
    found = model_version(client, name, version, alias, store)
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


# ----------------------------------------------------------------------------- where registered models live


def model_stores_file() -> Path:
    """The user's index of the MLflow stores models were registered in (written by
    ``echocare registry register``): ``$ECHOCARE_MODEL_STORES``, else
    ``$XDG_CONFIG_HOME/echocare/model_stores.json`` (default ``~/.config``). JSON: registered model
    name -> store URIs, the latest first."""
    if os.environ.get("ECHOCARE_MODEL_STORES"):
        return Path(os.environ["ECHOCARE_MODEL_STORES"])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "echocare" / "model_stores.json"


def _is_store_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("sqlite:///", "http://", "https://"))


def _read_model_stores() -> dict[str, list[str]]:
    """The index as data: names to lists of store URIs; anything else in the file is ignored."""
    path = model_stores_file()
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict):
        return {}
    return {str(k): [u for u in v if _is_store_uri(u)] for k, v in content.items() if isinstance(v, list)}


def remember_model_store(name: str, store: str) -> None:
    """Record that model ``name`` was registered in ``store`` (first in its list), so that
    ``models:/NAME...`` is found there when no store is given. A sqlite store is recorded by its
    absolute path."""
    if store.startswith("sqlite:///"):
        store = f"sqlite:///{Path(store.removeprefix('sqlite:///')).resolve()}"
    if not _is_store_uri(store):
        return
    index = _read_model_stores()
    index[name] = [store, *[u for u in index.get(name, []) if u != store]]
    path = model_stores_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(index, indent=1), encoding="utf-8")


def _holds_model(store: str, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    if not _store_exists(store):
        return False
    check_tracking_server(store)
    try:
        mlflow_client(store).get_registered_model(name)
        return True
    except MlflowException as error:
        if is_not_found(error):
            return False
        raise


def model_store(uri: str, tracking_uri: str | None = None) -> str:
    """The MLflow store that holds registered model ``models:/NAME...``: ``tracking_uri`` (a
    bundle's, by default ``<output_dir>/mlruns.db``; else ``MLFLOW_TRACKING_URI``) when it holds
    NAME, else the stores NAME was registered in on this machine (:func:`model_stores_file`),
    the latest first. A given store that does not hold NAME is passed over, with a log line.

    Raises:
        RegistryError: no store holds NAME; the message names ``--tracking_uri``.
        echocare.tracking.TrackingServerError: an http(s) store that does not answer.
    """
    name, _, _ = parse_registry_uri(uri)
    given = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    tried = []
    for store in dict.fromkeys([*([given] if given else []), *_read_model_stores().get(name, [])]):
        tried.append(store)
        if _holds_model(store, name):
            if given and store != given:
                logger.info("%s: not in %s; using %s, where it was registered", uri, given, store)
            return store
    hint = "pass --tracking_uri (sqlite:///OUT/mlruns.db of the training run's --output_dir, or http://HOST:PORT)"
    if not tried:
        raise RegistryError(f"{uri}: no MLflow store to look for registered model {name!r} in; {hint}")
    registered = ""
    if given and _store_exists(given):  # what the given store does hold, for a mistyped name
        known = sorted(m.name for m in mlflow_client(given).search_registered_models())
        registered = f" (registered: {', '.join(known) or 'none'})"
    raise RegistryError(f"{uri}: no registered model {name!r} in {', '.join(tried)}{registered}; {hint}")


def _store_exists(store: str) -> bool:
    """A sqlite store whose file exists, or a tracking server (checked by the caller's probe)."""
    return not store.startswith("sqlite:///") or Path(store.removeprefix("sqlite:///")).is_file()


# ----------------------------------------------------------------------------- recorded settings


def _plain(value: Any) -> bool:
    """Data a config uses as it is: no ``$`` expression, ``@`` reference or ``%`` macro anywhere."""
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


@lru_cache(maxsize=32)
def _recorded_settings(uri: str, store: str) -> tuple[tuple[str, Any], ...]:
    name, version, alias = parse_registry_uri(uri)
    client = mlflow_client(store)
    found = model_version(client, name, version, alias, store)
    settings: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="echocare_settings_") as tmp:
        try:
            run_config = json.loads(fetch_registered_file(uri, RUN_CONFIG_PATH, tmp, store).read_text())
        except (RegistryError, OSError, ValueError):
            run_config = {}
    if isinstance(run_config, dict):
        settings.update({str(k): v for k, v in run_config.items() if _plain(v)})
    tags = dict(found.tags or {})
    settings.update({k: tags[k] for k in SETTING_TAGS if k in tags})
    return tuple(settings.items())


def recorded_settings(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The settings registered version ``uri`` was trained with, as data (nothing is evaluated):
    the plain values of its run's executed config (``configs/run_config.json``; ids left at an
    expression are not known from it), overlaid by the version's tags of :data:`SETTING_TAGS`
    (the run's evaluated values, as strings)."""
    return dict(_recorded_settings(uri, model_store(uri, tracking_uri)))


def _as_type_of(value: Any, default: Any, key: str, uri: str) -> Any:
    """``value`` as the type of ``default`` (a tag's string parsed as a number or a comma-joined
    list); RegistryError naming the id when it is not one."""
    problem = RegistryError(f"{uri}: its recorded {key} {str(value)[:80]!r} is not a {type(default).__name__}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise problem
    if isinstance(default, (int, float)):
        kind = type(default)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and kind(value) == value:
            return kind(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d+" if kind is int else r"-?\d+(\.\d*)?([eE]-?\d+)?", value.strip()):
            return kind(value.strip())
        raise problem
    if isinstance(default, str):
        if isinstance(value, str) and _plain(value):
            return value
        raise problem
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and _plain(value):
            return value
        raise problem
    return value if _plain(value) else default


def recorded(checkpoint: Any, key: str, default: Any, tracking_uri: str | None = None) -> Any:
    """A bundle id's default that follows a registered checkpoint: for ``checkpoint`` =
    ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, the value of ``key`` the version was
    trained with (:func:`recorded_settings`), checked to be of ``default``'s type; else, or
    when the version did not record it, ``default``. Bundles give their shape-defining ids
    (``network_size``, ``image_size``, ``class_names``, ...) this default, so an id given on
    the command line still wins.

    Raises:
        RegistryError: the version's value is not of ``default``'s type, or no store holds it.
    """
    if not is_registry_uri(checkpoint):
        return default
    settings = recorded_settings(str(checkpoint), tracking_uri or None)
    if key not in settings:
        return default
    return _as_type_of(settings[key], default, key, str(checkpoint))
