"""Ray for the commands that scale out (``echocare curate --engine ray``, ``echocare predict --engine ray``).

One rule for both: ``--ray-address ADDR`` joins that cluster (see docs/scaling.md for starting one
and the ports it opens); without it the command starts a Ray instance on this machine for the run
and shuts it down at the end, every server of it bound to 127.0.0.1 and no dashboard; when Ray is
already initialised in this process (a notebook, the tests), that instance is used and left running.
Ray itself is optional (the extra ``scale``); :func:`require_ray` names the extra when it is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from echocare.errors import EchoCareError

__all__ = ["RayClusterError", "require_ray", "start_local_ray", "ray_session"]


class RayClusterError(EchoCareError, ValueError):
    """Ray is missing, or a local instance could not be kept on 127.0.0.1 (one line)."""


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`RayClusterError` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise RayClusterError("--engine ray needs Ray, which is not installed: pip install 'echocare[scale]'") from None
    return ray


#: Ray's switch that makes a node take the loopback address as its IP (Ray maps an explicit
#: ``_node_ip_address="127.0.0.1"`` to the machine's outward address): with it off, every server of
#: the instance (GCS, raylet, object manager, workers, runtime-env agent) binds 127.0.0.1 only.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(num_cpus: int, **options: Any) -> Any:
    """Start a Ray instance on this machine for this process only: ``num_cpus`` CPUs, every server
    bound to 127.0.0.1, no dashboard. Returns ``ray.init``'s context (``.address_info["gcs_address"]``)."""
    ray = require_ray()
    from ray._private import ray_constants

    os.environ[_LOOPBACK_SWITCH] = "0"  # read by the Ray processes started below
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by this process (ray was imported before the variable was set)
    context = ray.init(address="local", num_cpus=max(1, int(num_cpus)), include_dashboard=False,
                       logging_level=logging.WARNING, log_to_driver=False, **options)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RayClusterError(f"the local Ray instance took the address {node_ip}, not 127.0.0.1; refusing to run it")
    return context


@contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[Any]:
    """Ray, initialised for one run: the running instance, the cluster at ``address``, or a local
    instance of ``workers`` CPUs on 127.0.0.1 without dashboard; shut down at the end if started here."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        start_local_ray(workers)
    try:
        yield ray
    finally:
        ray.shutdown()
