"""Starting Ray the one way the project does: an embedded local instance bound to
loopback (sweeps, RL rollouts), or a connection to a cluster by address."""

from __future__ import annotations

import logging
import os
from typing import Any

COMMON_INIT: dict[str, Any] = {
    "include_dashboard": False,
    "log_to_driver": False,
    "logging_level": logging.WARNING,
}


def import_ray(local: bool) -> Any:
    """`ray`, with usage stats off; `local`: keep an embedded instance on 127.0.0.1
    (Ray swaps loopback for the host's network address unless clusters are off, a
    setting read when ray is first imported)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the host
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    return ray


def init_local_ray(num_cpus: int) -> Any:
    """A new embedded Ray with `num_cpus` CPUs (never a cluster found on the host)."""
    ray = import_ray(local=True)
    ray.init(
        address="local", num_cpus=max(1, num_cpus), _node_ip_address="127.0.0.1", **COMMON_INIT
    )
    return ray


def connect_ray(address: str) -> Any:
    """Ray connected to the cluster at `address` (auto, ray://HOST:PORT or HOST:PORT)."""
    ray = import_ray(local=False)
    ray.init(address=address, **COMMON_INIT)
    return ray
