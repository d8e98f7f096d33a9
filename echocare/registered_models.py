"""Registered model versions, read side: ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` URIs,
the MLflow store they live in, and fetching a version's checkpoint and side files.

What bundles need to load a registered model lives here, below every layer that loads weights
(:func:`echocare.networks.load_network_checkpoint` takes ``models:/`` checkpoints through it);
registering, listing and promoting versions is :mod:`echocare.registry`.
"""

from __future__ import annotations

import re
from pathlib import Path

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
    "model_version",
    "parse_registry_uri",
    "registered_model",
    "resolve_tracking_uri",
]

#: The best checkpoint inside a registered bundle, and where bundle runs log it.
CHECKPOINT_PATH = "models/model.pt"

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
