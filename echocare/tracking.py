"""MLflow tracking servers: fail fast, naming the address, when one does not answer.

MLflow's HTTP client retries a failed request 7 times with exponential backoff (about 4 minutes
for a refused connection) and waits up to 120 s for each answer, so a wrong or stopped
``http://HOST:PORT`` store used to hang a command for minutes before a traceback. Every echocare
command and bundle that is given an http(s) store calls :func:`check_tracking_server` first: one
short request, then :class:`TrackingServerError` naming the address within a few seconds.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

from echocare.errors import EchoCareError

__all__ = [
    "MLFLOW_HTTP_DEFAULTS",
    "PROBE_TIMEOUT_S",
    "TrackingServerError",
    "check_tracking_server",
    "limit_mlflow_http_retries",
]

#: Seconds the probe waits to connect, and again for the answer.
PROBE_TIMEOUT_S = 5.0

#: MLflow HTTP client settings used where the user has not set them: 2 retries, 1 s backoff
#: factor (a refused connection fails after about 3 s instead of 4 minutes). The per-request
#: timeout (``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s) stays as MLflow has it: it also bounds the
#: server's answer to a checkpoint upload.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

# Stores that answered in this process: a bundle loads its network more than once (train, then
# evaluate), an experiment registers many runs; one probe each is enough.
_ANSWERED: set[str] = set()


class TrackingServerError(EchoCareError):
    """An http(s) MLflow tracking store that does not answer; the message starts with its address."""


def _is_http(tracking_uri: object) -> bool:
    return isinstance(tracking_uri, str) and urlsplit(tracking_uri).scheme.lower() in ("http", "https")


def _shown(tracking_uri: str) -> str:
    """The address without any ``user:password@`` part (error messages end up in logs)."""
    parts = urlsplit(tracking_uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def limit_mlflow_http_retries() -> None:
    """Set :data:`MLFLOW_HTTP_DEFAULTS` in ``os.environ`` where the user has not set them.

    MLflow reads these variables at each request, and subprocesses (experiment runs) inherit them.
    """
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _reason(error: Exception) -> str:
    """``connection refused``, ``name or service not known``, ... from a requests error."""
    found = re.findall(r"\[Errno -?\d+\] ([^'\"\)\]]+)", str(error))
    if found:
        return found[-1].strip().lower()
    return type(error).__name__


def check_tracking_server(tracking_uri: str | None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Make sure an http(s) MLflow tracking store answers before anything is started on it.

    Other stores (``sqlite:///``, ``file:``, ``databricks``, none) are left alone. For http(s)
    ones, MLflow's retries are limited (:func:`limit_mlflow_http_retries`) and ``GET
    <tracking_uri>/health`` is sent once, honouring the proxy settings MLflow itself uses. Any HTTP
    answer, an error status or a TLS failure included, counts as reachable: the server is there, and
    MLflow reports what it says.

    Args:
        tracking_uri: the store, e.g. ``http://127.0.0.1:5000``.
        timeout: seconds to wait for the connection, and again for the answer.

    Raises:
        TrackingServerError: no connection (refused, unknown host) or no answer within
            ``timeout`` seconds; the message starts with the address.
    """
    if not _is_http(tracking_uri):
        return
    limit_mlflow_http_retries()
    if tracking_uri in _ANSWERED:
        return
    import requests

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=(timeout, timeout), allow_redirects=False)
    except requests.exceptions.SSLError:
        pass  # a server answered; MLflow applies its own certificate settings
    except requests.exceptions.Timeout:
        raise TrackingServerError(
            f"{_shown(tracking_uri)}: the MLflow tracking server did not answer within {timeout:g} s; "
            "check that it is running and the address (--tracking-uri, MLFLOW_TRACKING_URI)"
        ) from None
    except requests.exceptions.RequestException as error:
        raise TrackingServerError(
            f"{_shown(tracking_uri)}: cannot reach the MLflow tracking server ({_reason(error)}); "
            "start it (mlflow server --host 127.0.0.1 --port PORT) or check the address "
            "(--tracking-uri, MLFLOW_TRACKING_URI)"
        ) from None
    _ANSWERED.add(tracking_uri)
