"""Shared fixtures: short private ipc endpoints and a driver node running in a thread."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import zmq

from drivers.config import DriverConfig
from drivers.mmcore_node import DriverNode
from drivers.node import InstrumentNode
from drivers.serve import build_node

NodeT = TypeVar("NodeT", bound=InstrumentNode)


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


@pytest.fixture
def run_node() -> Iterator[Callable[[NodeT], NodeT]]:
    """Serve driver nodes in background threads; stop and join every one after the test."""
    started: list[tuple[InstrumentNode, threading.Thread]] = []

    def run(node: NodeT) -> NodeT:
        thread = threading.Thread(target=node.serve, daemon=True)
        thread.start()
        started.append((node, thread))
        return node

    yield run
    for node, thread in started:
        node.stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), f"{type(node).__name__} did not stop"


@pytest.fixture
def make_node(
    ipc_dir: Path, zmq_ctx: zmq.Context, run_node: Callable[[DriverNode], DriverNode]
) -> Callable[[DriverConfig], DriverNode]:
    """Start twin / Micro-Manager driver nodes on private endpoints."""
    numbers = itertools.count()

    def start(config: DriverConfig) -> DriverNode:
        n = next(numbers)
        config = config.model_copy(
            update={
                "stream_endpoint": f"ipc://{ipc_dir}/stream{n}",
                "command_endpoint": f"ipc://{ipc_dir}/command{n}",
            }
        )
        return run_node(build_node(config, ctx=zmq_ctx))

    return start


@pytest.fixture
def twin_node(make_node: Callable[[DriverConfig], DriverNode]) -> DriverNode:
    """A twin driver node with a short watchdog, serving in a background thread."""
    return make_node(DriverConfig(watchdog_ms=200, heartbeat_ms=20, exposure_ms=10.0))
