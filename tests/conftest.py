"""Shared fixtures: short private ipc endpoints and a driver node running in a thread."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from drivers.config import DriverConfig
from drivers.mmcore_node import DriverNode
from drivers.serve import build_node


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """ipc:// paths must stay under ~100 characters, so not pytest's deep tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="sl-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def start_node(
    config: DriverConfig, ipc_dir: Path, ctx: zmq.Context
) -> tuple[DriverNode, threading.Thread]:
    config = config.model_copy(
        update={
            "stream_endpoint": f"ipc://{ipc_dir}/stream",
            "command_endpoint": f"ipc://{ipc_dir}/command",
        }
    )
    node = build_node(config, ctx=ctx)
    thread = threading.Thread(target=node.serve, daemon=True)
    thread.start()
    return node, thread


@pytest.fixture
def twin_node(ipc_dir: Path, zmq_ctx: zmq.Context) -> Iterator[DriverNode]:
    """A twin driver node with a short watchdog, serving in a background thread."""
    config = DriverConfig(watchdog_ms=200, heartbeat_ms=20, exposure_ms=10.0)
    node, thread = start_node(config, ipc_dir, zmq_ctx)
    yield node
    node.stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive(), "driver node did not stop"
