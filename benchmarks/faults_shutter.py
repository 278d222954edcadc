"""A shutter in the camera's adapter module (`scopeloop bench faults`, one section).

The C++ MMCore runs one call at a time per device adapter module, so on the demo rig
(mm-test-adapters: DemoCamera's `White Light Shutter` beside `Camera`) the watchdog's
shutter close waits for a snap to end. The gate therefore caps exposures there
(drivers/gate.py `shared_module_exposure_ms`). This section opens the shutter, sends a
snap at the capped exposure as the agent's last word and goes silent;
`shutter_module_trip_ms_max` is the worst time from that message to the shutter closed
at the device (the return of the core's `setShutterOpen(False)`, timed in-process:
the demo rig has no truth topic), over `shutter_module_trials`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from drivers.config import DriverConfig
from drivers.mmcore_node import DriverNode
from drivers.protocol import now_ns
from drivers.serve import build_node
from drivers.transport import CommandClient

Log = Callable[[str], None]
WATCHDOG_MS = 500


def _record_closes(node: DriverNode) -> list[int]:
    """Times (ns) at which the core finished closing a shutter, from any thread."""
    closes: list[int] = []
    core = node.core
    original = core.setShutterOpen

    def timed(*args: Any) -> None:
        original(*args)
        if not args[-1]:
            closes.append(now_ns())

    core.setShutterOpen = timed  # type: ignore[method-assign]
    return closes


def _trial(node: DriverNode, ctx: zmq.Context, closes: list[int], exposure_ms: float) -> float:
    agent = CommandClient(ctx, node.endpoints[1], timeout_ms=10_000)
    agent.call("acquire_control", {"take": True})
    agent.call("set_exposure", {"exposure_ms": exposure_ms})
    agent.call("set_shutter", {"open": True})
    t_last = now_ns()
    agent.send("snap", reply=False)  # its last word: the node thread blocks in the snap
    agent.close()
    deadline = time.monotonic() + 10 + 2 * exposure_ms / 1000
    while time.monotonic() < deadline:
        after = [t for t in closes if t > t_last]
        if after:
            time.sleep(2 * exposure_ms / 1000)  # let the snap finish before the next trial
            return (min(after) - t_last) / 1e6
        time.sleep(0.002)
    return float("inf")


def measure(trials: int, log: Log) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="slsh-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o700)
        config = DriverConfig(
            kind="mmcore",
            mm_config="demo",
            exposure_ms=10.0,
            watchdog_ms=WATCHDOG_MS,
            stream_endpoint=f"ipc://{folder}/s",
            command_endpoint=f"ipc://{folder}/c",
        )
        node = build_node(config)
        assert isinstance(node, DriverNode)
        cap = node.gate.exposure_ms[1]
        closes = _record_closes(node)
        thread = threading.Thread(target=node.serve, name="demo-node", daemon=True)
        thread.start()
        ctx = zmq.Context()
        try:
            trips = [_trial(node, ctx, closes, cap) for _ in range(trials)]
        finally:
            node.stop.set()
            thread.join(10)
            ctx.destroy(linger=0)
    log(
        f"shutter in the camera module (demo rig): exposures capped at {cap:g} ms; snap as "
        f"the last word -> shutter closed after {[round(t) for t in trips]} ms "
        f"(watchdog {WATCHDOG_MS} ms)"
    )
    return {
        "shutter_module_trials": trials,
        "shutter_module_exposure_cap_ms": cap,
        "shutter_module_trip_ms_max": max(trips),
    }
