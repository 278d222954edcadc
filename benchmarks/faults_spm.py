"""SPM watchdog fault figures: a dead agent leaves the tip safe, even mid-sweep.

The instrument is the PFM twin behind its Nanonis TCP server, in this process, with
real-time sweeps (a sweep takes its acquisition time on the wall clock, as on a
controller). The SPM driver node runs in its own process (`scopeloop driver
serve-spm`), as deployed. An agent takes the lease, engages the tip, sets a bias and
goes silent; the trip time is from its last message to the moment the twin itself
stamps the tip safe (Z controller off, tip retracted, bias 0 V, no sweep: its
`truth_log`), never a driver reply.

- `spm_watchdog_trip_ms_max`: idle node, the last message a heartbeat.
- `spm_watchdog_trip_ms_busy_max`: the last message a `spectrum` whose sweep
  (`spm_sweep_s`) outlasts the watchdog many times: the node thread is blocked in
  `BiasSpectr.Start` when the watchdog trips, so the tip is made safe over the
  watchdog's own Nanonis link and the sweep is interrupted
  (`spm_sweeps_interrupted` of `spm_watchdog_trials`).

Goals: idle <= `spm_watchdog_ms` + 50, busy <= `spm_watchdog_ms` + 100.
`benchmarks.faults` calls `measure(quick, log)`; run this file to print its JSON.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
import zmq

from agent.engine.driver_process import DriverProcess
from drivers.nanonis_server import NanonisServer
from drivers.protocol import now_ns
from drivers.spm_twin_backend import PfmTwinBackend, spm_limits
from drivers.transport import CommandClient, CommandError, CommandTimeout
from simulators.spm import SpectroscopyConfig

Log = Callable[[str], None]
ROOT = Path(__file__).resolve().parents[1]
WATCHDOG_MS = 500
SWEEP_POINTS = 64
STEP_TIME_S = 0.02  # 64 points x 2 cycles x 20 ms: a 2.56 s sweep
BIAS_V = 1.0


class SpmChain:
    """The twin controller here, the SPM node in its own process, an operator client."""

    def __init__(self, folder: Path) -> None:
        self.twin = PfmTwinBackend(
            seed=0, realtime=True, spectroscopy_config=SpectroscopyConfig(step_time_s=STEP_TIME_S)
        )
        self.server = NanonisServer(self.twin, "127.0.0.1", 0, limits=spm_limits(self.twin))
        self.server.start()
        host, port = self.server.address
        half = [v / 2 * 0.9 for v in self.twin.extent_um]
        self.command_endpoint = f"ipc://{folder}/c"
        config = folder / "spm-driver.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "stream_endpoint": f"ipc://{folder}/s",
                    "command_endpoint": self.command_endpoint,
                    "nanonis_host": host,
                    "nanonis_port": port,
                    "watchdog_ms": WATCHDOG_MS,
                    "state_poll_ms": 0,
                    "limits": {"x_um": [-half[0], half[0]], "y_um": [-half[1], half[1]]},
                }
            )
        )
        self.log_path = folder / "spm-driver.log"
        self.process = DriverProcess(config, self.log_path, serve="serve-spm")
        self.proc = self.process.proc
        self.ctx = zmq.Context()
        self.operator = CommandClient(self.ctx, self.command_endpoint, timeout_ms=10_000)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.operator.call("get_state", timeout_ms=500)
                break
            except CommandTimeout:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SPM driver did not start; see {self.log_path}") from None

    def safe_after(self, t_last_ns: int, timeout_s: float) -> int | None:
        """When the twin stamped the tip safe after `t_last_ns` (None: it did not)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            t_safe = self.twin.safe_since_ns(t_last_ns)
            if t_safe is not None:
                return t_safe
            time.sleep(0.005)
        return None

    def settle(self) -> None:
        """Wait until the node has finished with the trip (idle, tip withdrawn)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = self.operator.call("get_state").result
            if not state["busy"] and not state["z_controller_on"] and not self.twin.sweeping:
                return
            time.sleep(0.02)
        raise RuntimeError("the SPM node did not come back to idle after a trip")

    def close(self) -> None:
        self.operator.close()
        self.process.stop()
        self.ctx.term()
        self.server.stop()


def _trials(chain: SpmChain, trials: int, busy: bool) -> tuple[list[float], int]:
    """Trip times (ms) and how many sweeps the trip interrupted."""
    trips: list[float] = []
    interrupted = 0
    sweep = {"x_um": 0.0, "y_um": 0.0, "bias_from_v": -2.0, "bias_to_v": 2.0}
    sweep |= {"points": SWEEP_POINTS, "backward": False}
    for _ in range(trials):
        agent = CommandClient(chain.ctx, chain.command_endpoint, timeout_ms=10_000)
        agent.call("acquire_control", {"take": True})
        agent.call("engage")
        agent.call("set_bias", {"bias_v": BIAS_V})
        for _ in range(3):  # a live agent, heartbeating
            agent.send("heartbeat", reply=False)
            time.sleep(0.02)
        t_last = now_ns()
        if busy:
            request = agent.send("spectrum", sweep)  # its last word
        else:
            agent.send("heartbeat", reply=False)
        t_safe = chain.safe_after(t_last, timeout_s=5 + chain.twin.sweep_time_s())
        trips.append(math.inf if t_safe is None else (t_safe - t_last) / 1e6)
        if busy:  # read here only to count: a dead agent would never see it
            try:
                if agent.socket.poll(10_000):
                    agent.take_reply(request, "spectrum")
            except CommandError as exc:
                interrupted += "interrupted" in str(exc)
        agent.close()
        chain.settle()
    return trips, interrupted


def measure(quick: bool = False, log: Log = print) -> dict[str, Any]:
    trials = 3 if quick else 10
    folder = Path(tempfile.mkdtemp(prefix="sl-faults-spm-"))
    chain = SpmChain(folder)
    try:
        idle, _ = _trials(chain, trials, busy=False)
        busy, interrupted = _trials(chain, trials, busy=True)
        sweep_s = chain.twin.sweep_time_s()  # with the settings the node sent
        alive = chain.proc.poll() is None
    finally:
        chain.close()
        shutil.rmtree(folder, ignore_errors=True)
    log(f"SPM watchdog {WATCHDOG_MS} ms, idle node: trips {[round(t) for t in idle]} ms")
    log(
        f"SPM watchdog, node blocked in a {sweep_s:.2f} s sweep: trips "
        f"{[round(t) for t in busy]} ms, {interrupted} of {trials} sweeps interrupted"
    )
    return {
        "spm_watchdog_ms": WATCHDOG_MS,
        "spm_watchdog_trials": trials,
        "spm_sweep_s": sweep_s,
        "spm_watchdog_trip_ms_max": max(idle),
        "spm_watchdog_trip_ms_busy_max": max(busy),
        "spm_watchdog_trip_ms_p50": statistics.median(idle),
        "spm_watchdog_trip_ms_busy_p50": statistics.median(busy),
        "spm_sweeps_interrupted": interrupted,
        "spm_driver_alive_at_end": alive,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(
        json.dumps(measure(quick="--full" not in sys.argv, log=lambda m: print(m, file=sys.stderr)))
    )
