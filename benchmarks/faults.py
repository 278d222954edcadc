"""Fault bench (`scopeloop bench faults`): the driver as deployed, attacked and abandoned.

The twin driver runs in its own process (`scopeloop driver serve`), as on an
instrument. Every figure about light is read from the twin's `light-truth` topic (what
the devices put on the sample and when), never from the driver's replies.

- watchdog: an agent takes the lease, lights the laser and goes silent;
  `watchdog_trip_ms_max` is the worst time from its last message to the light going off
  on the sample (idle node), `watchdog_trip_ms_busy_max` the same with the last message
  a 1 s exposure + snap that blocks the node thread (watchdog_ms = 500).
- fuzz: `fuzz_messages` malformed messages at the command socket (random bytes, broken
  msgpack, wrong types, extra frames); `fuzz_hangs` counts get_state probes unanswered
  within 2 s, `fuzz_crashes` a driver that died, `streaming_after_fuzz` frames still
  flowing afterwards.
- random commands: `random_commands` valid-looking commands with random values (laser
  spots, SLM images, properties, stage, exposure, MDA events), pipelined;
  `out_of_limit_on_sample` counts light changes on the sample beyond any limit.

`run` is a list of sections, each `measure(quick, log) -> metrics`: the above, then
a shutter in the camera's adapter module on the demo rig (`benchmarks/faults_shutter.py`),
authentication and oversized messages (`benchmarks/faults_auth.py`), crash-safe
records and driver restarts (`benchmarks/faults_records.py`) and the SPM node's watchdog
mid-sweep (`benchmarks/faults_spm.py`).

`--quick` with SCOPELOOP_BENCH_SMOKE=1 is smaller still (one trial, a few hundred
messages; the minutes-long auth and records sections left out, `smoke_sections_left_out`
says how many): the JSON contract in seconds, for tests/test_bench.py. Its figures mean
nothing.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from agent.config import ExperimentConfig, dump_config
from agent.engine.driver_process import DriverProcess
from benchmarks import faults_auth, faults_records, faults_shutter, faults_spm, smoke
from drivers.config import DriverConfig, Limits, TwinSettings
from drivers.light import LaserState, LightLimits
from drivers.mmcore_node import LIGHT_TRUTH_TOPIC
from drivers.protocol import FRAME_PREFIX, now_ns, unpack_map
from drivers.transport import CommandClient, CommandError, CommandTimeout
from simulators.camera import CameraConfig

Log = Callable[[str], None]
Section = Callable[[bool, Log], dict[str, Any]]

WATCHDOG_MS = 500
BUSY_EXPOSURE_MS = 1000.0
SLM_PX = 16
LIMITS = Limits(
    max_laser_power_mw=3.0,
    max_laser_spots=1,
    exposure_ms=(1.0, 1000.0),
    properties={"Camera.Exposure": (1.0, 20.0)},
)




def _count(quick: bool, full: int, quick_n: int, smoke_n: int) -> int:
    return smoke_n if smoke(quick) else quick_n if quick else full


class Driver:
    """`scopeloop driver serve` on a twin config, in its own process."""

    def __init__(self, folder: Path) -> None:
        driver = DriverConfig(
            stream_endpoint=f"ipc://{folder}/stream",
            command_endpoint=f"ipc://{folder}/command",
            watchdog_ms=WATCHDOG_MS,
            heartbeat_ms=50,
            exposure_ms=10.0,
            stream_hwm=64,
            limits=LIMITS,
            twin=TwinSettings(camera=CameraConfig(width_px=128, height_px=128), slm_px=SLM_PX),
        )
        self.config = driver
        path = folder / "faults.yaml"
        dump_config(ExperimentConfig(driver=driver), path)
        self.log_path = folder / "driver.log"
        self.process = DriverProcess(path, self.log_path)  # as a run starts it
        self.proc = self.process.proc
        self.ctx = zmq.Context()
        self.light = self.ctx.socket(zmq.SUB)
        self.light.setsockopt(zmq.LINGER, 0)
        self.light.setsockopt(zmq.RCVHWM, 0)  # every light change counts
        self.light.setsockopt(zmq.SUBSCRIBE, LIGHT_TRUTH_TOPIC)
        self.light.connect(driver.stream_endpoint)
        self.client = self.new_client()
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.call("get_state", timeout_ms=500)
                break
            except CommandTimeout:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"driver did not start; see {self.log_path}") from None
        self.client.call("acquire_control")
        field = driver.twin.camera.field_um
        self.light_limits = LightLimits.from_config(driver.limits, driver.devices, field)
        self.field_um = field

    def new_client(self) -> CommandClient:
        return CommandClient(self.ctx, self.config.command_endpoint, timeout_ms=5000)

    def light_changes(self, timeout_ms: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.light.poll(timeout_ms):
            return out
        while True:
            try:
                parts = self.light.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            out += unpack_map(parts[1], "light-truth")["changes"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.client.close()
        self.light.close()
        self.process.stop()
        self.ctx.term()


def _off_after(driver: Driver, t_last_ns: int, timeout_s: float) -> int | None:
    """When the sample went dark after `t_last_ns`, per the twin (None: it did not)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for change in driver.light_changes(50):
            if change["t_ns"] > t_last_ns and not change["spots"]:
                return int(change["t_ns"])
    return None


def _trip_trials(driver: Driver, trials: int, busy: bool) -> list[float]:
    spot = {"x_um": driver.field_um[0] / 2, "y_um": driver.field_um[1] / 2, "power_mw": 1.0}
    trips = []
    for _ in range(trials):
        agent = driver.new_client()
        agent.call("acquire_control", {"take": True})
        if busy:
            agent.call("set_exposure", {"exposure_ms": BUSY_EXPOSURE_MS})
        agent.call("set_laser", {"spots": [spot]})
        driver.light_changes()  # drop what came before
        for _ in range(3):  # a live agent, heartbeating
            agent.send("heartbeat", reply=False)
            time.sleep(0.02)
        t_last = now_ns()
        agent.send("snap" if busy else "heartbeat", reply=False)  # its last word
        agent.close()
        t_off = _off_after(driver, t_last, timeout_s=5 + BUSY_EXPOSURE_MS / 1000)
        trips.append(math.inf if t_off is None else (t_off - t_last) / 1e6)
        if busy:  # the snap returns, then the camera is made fast again
            driver.client.call("acquire_control", {"take": True}, timeout_ms=10_000)
            driver.client.call("set_exposure", {"exposure_ms": 10.0}, timeout_ms=10_000)
    driver.client.call("acquire_control", {"take": True})
    return trips


def measure_watchdog(quick: bool, log: Log, driver: Driver) -> dict[str, Any]:
    trials = _count(quick, 10, 3, 1)
    idle = _trip_trials(driver, trials, busy=False)
    busy = _trip_trials(driver, trials, busy=True)
    log(f"watchdog {WATCHDOG_MS} ms, idle node: trips {[round(t) for t in idle]} ms")
    log(f"watchdog, node blocked in a {BUSY_EXPOSURE_MS:g} ms snap: {[round(t) for t in busy]} ms")
    return {
        "watchdog_ms": WATCHDOG_MS,
        "watchdog_trials": trials,
        "watchdog_trip_ms_max": max(idle),
        "watchdog_trip_ms_busy_max": max(busy),
    }


def _malformed(rng: np.random.Generator, i: int) -> list[bytes]:
    """One malformed command message (as DEALER frames), of several kinds."""
    kind = i % 8
    valid = {"v": 1, "id": i, "cmd": "set_laser", "args": {"spots": []}, "t_sent_ns": 0}
    if kind == 0:
        return [rng.bytes(int(rng.integers(0, 200)))]
    if kind == 1:
        return [msgpack.packb(valid)[: int(rng.integers(1, 20))]]  # truncated
    if kind == 2:
        junk: Any = [None, True, -(2**63), 2**64 - 1, math.nan, "x" * 50, b"\xff", [1, [2]]]
        key = ["v", "id", "cmd", "args", "t_sent_ns", "reply"][int(rng.integers(0, 6))]
        return [msgpack.packb({**valid, key: junk[int(rng.integers(0, len(junk)))]})]
    if kind == 3 and i % 16 == 3:  # an array buffer whose header does not match it
        spec = {"field": "image", "shape": [SLM_PX, SLM_PX], "dtype": "uint8"}
        head = {**valid, "cmd": "set_slm_image", "buf": spec}
        size = int(rng.integers(0, 2 * SLM_PX * SLM_PX))
        return [msgpack.packb(head), rng.bytes(size + (size == SLM_PX * SLM_PX))]
    if kind == 3:
        return [msgpack.packb(valid), rng.bytes(8)]  # an extra frame
    if kind == 4:
        return [msgpack.packb([1, 2, 3])]  # not a map
    if kind == 5:
        return [msgpack.packb({**valid, "v": 2})]
    if kind == 6:
        nested: Any = 0
        for _ in range(int(rng.integers(10, 200))):
            nested = [nested]
        return [msgpack.packb({**valid, "args": {"spots": nested}})]
    return [msgpack.packb({**valid, "cmd": rng.bytes(6).hex(), "args": {"x": math.inf}})]


def measure_fuzz(quick: bool, log: Log, driver: Driver) -> dict[str, Any]:
    n = _count(quick, 10_000, 2000, 500)
    rng = np.random.default_rng(16)
    sock = driver.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(driver.config.command_endpoint)
    hangs = 0
    probe = driver.new_client()
    t0 = time.perf_counter()
    for i in range(n):
        sock.send_multipart(_malformed(rng, i))
        while sock.poll(0):
            sock.recv_multipart()
        if i % 500 == 499:
            try:
                probe.call("get_state", timeout_ms=2000)
            except CommandTimeout:
                hangs += 1
    elapsed = time.perf_counter() - t0
    sock.close()
    probe.close()
    streaming = _streaming(driver)
    log(f"fuzz: {n} malformed messages in {elapsed:.1f} s, {hangs} hangs, streaming: {streaming}")
    return {
        "fuzz_messages": n,
        "fuzz_crashes": 0 if driver.alive() else 1,
        "fuzz_hangs": hangs,
        "streaming_after_fuzz": streaming,
    }


def _streaming(driver: Driver, frames_wanted: int = 3) -> bool:
    """Whether camera frames still arrive (a few within 3 s)."""
    frames = driver.ctx.socket(zmq.SUB)
    frames.setsockopt(zmq.LINGER, 0)
    frames.setsockopt(zmq.SUBSCRIBE, FRAME_PREFIX)
    frames.connect(driver.config.stream_endpoint)
    got = 0
    deadline = time.monotonic() + 3
    while got < frames_wanted and time.monotonic() < deadline:
        if frames.poll(100):
            frames.recv_multipart()
            got += 1
    frames.close()
    return got >= frames_wanted


def _random_command(rng: np.random.Generator, field: tuple[float, float], i: int) -> Any:
    """A valid-looking command with random values, some beyond the limits."""

    def coord(axis: int) -> float:
        return float(rng.uniform(-0.2, 1.2) * field[axis])

    def power() -> float:
        return float(rng.choice([rng.uniform(0, 4.0), rng.uniform(0, 50.0), 0.0]))

    pick = rng.random()
    if pick < 0.35:
        spots = [
            {"x_um": coord(0), "y_um": coord(1), "power_mw": power()}
            for _ in range(int(rng.integers(0, 3)))
        ]
        return "set_laser", {"spots": spots, "frame_seq": i}
    if pick < 0.6:
        image = np.zeros((SLM_PX, SLM_PX), dtype=np.uint8)
        for _ in range(int(rng.integers(0, 25))):
            image[rng.integers(0, SLM_PX), rng.integers(0, SLM_PX)] = rng.integers(0, 256)
        return "set_slm_image", {"image": image}  # as the raw buffer after the header
    if pick < 0.7:
        return "move_stage", {"x_um": float(rng.normal(0, 20)), "y_um": float(rng.normal(0, 20))}
    if pick < 0.78:
        return "set_property", {
            "device": "Camera",
            "property": "Exposure",
            "value": float(rng.uniform(0, 40)),
        }
    if pick < 0.8:
        image = np.zeros((SLM_PX, SLM_PX), dtype=np.int64)
        image[rng.integers(0, SLM_PX), rng.integers(0, SLM_PX)] = rng.integers(0, 256)
        event = {"exposure": float(rng.uniform(1, 5)), "slm_image": {"data": image.tolist()}}
        return "submit_events", {"events": [event]}
    if pick < 0.82:
        return "stop_events", {"cancel": True}
    if pick < 0.9:
        return "laser_off", {}
    return "heartbeat", {}


def _beyond_limits(change: dict[str, Any], limits: LightLimits, log: Log) -> bool:
    spots = [LaserState(*s) for s in change["spots"]]
    try:
        limits.check("truth", "sample", spots)
    except ValueError as exc:
        log(f"beyond the limits on the sample: {exc}")
        return True
    return False


def measure_random_commands(quick: bool, log: Log, driver: Driver) -> dict[str, Any]:
    n = _count(quick, 100_000, 5000, 500)
    rng = np.random.default_rng(1616)
    client = driver.client
    depth = 32  # commands in flight, as a fast agent pipelines them
    pending: list[tuple[int, str]] = []
    refused = replied = lost = send_retries = 0
    violations = changes = 0
    t0 = time.perf_counter()

    def settle(keep: int) -> None:
        nonlocal refused, replied, lost
        while len(pending) > keep:
            req_id, cmd = pending.pop(0)
            deadline = time.monotonic() + 10
            while True:
                try:
                    if client.take_reply(req_id, cmd) is not None:
                        replied += 1
                        break
                except CommandError:
                    refused += 1
                    replied += 1
                    break
                if time.monotonic() > deadline:
                    lost += 1  # counted, not fatal: the figure is what reached the sample
                    break
                client.socket.poll(10)

    for i in range(n):
        cmd, args = _random_command(rng, driver.field_um, i)
        try:
            pending.append((client.send(cmd, args), cmd))
        except CommandTimeout:  # the client's send queue was full: drain, send again
            send_retries += 1
            settle(0)
            pending.append((client.send(cmd, args), cmd))
        settle(depth)
        if i % 256 == 0:
            for change in driver.light_changes():
                changes += 1
                violations += _beyond_limits(change, driver.light_limits, log)
    settle(0)
    client.call("stop_events", {"cancel": True})
    client.call("laser_off")
    for change in driver.light_changes(500):
        changes += 1
        violations += _beyond_limits(change, driver.light_limits, log)
    elapsed = time.perf_counter() - t0
    log(
        f"random commands: {n} in {elapsed:.1f} s ({refused} refused), {changes} light "
        f"changes on the sample, {violations} beyond the limits"
    )
    return {
        "random_commands": n,
        "random_commands_refused": refused,
        "random_commands_unanswered": lost,
        "random_commands_send_retries": send_retries,
        # Sends that found ZeroMQ's queue looking full and waited (drivers/transport.py).
        "random_commands_send_waits": client.send_waits,
        "light_changes_on_sample": changes,
        "out_of_limit_on_sample": violations,
        "streaming_after_random_commands": _streaming(driver),
    }


DriverSection = Callable[[bool, Log, Driver], dict[str, Any]]
DRIVER_SECTIONS: list[DriverSection] = [
    measure_watchdog,
    measure_fuzz,
    measure_random_commands,
]


def measure_driver(quick: bool, log: Log) -> dict[str, Any]:
    """The sections that share one driver process."""
    folder = Path(tempfile.mkdtemp(prefix="sl-faults-"))
    driver = Driver(folder)
    metrics: dict[str, Any] = {}
    try:
        for section in DRIVER_SECTIONS:
            metrics.update(section(quick, log, driver))
        metrics["driver_alive_at_end"] = driver.alive()
    finally:
        driver.close()
        shutil.rmtree(folder, ignore_errors=True)
    return metrics


def measure_shutter_module(quick: bool, log: Log) -> dict[str, Any]:
    """shutter_module_trip_ms_max: the watchdog against a shutter that waits on snaps."""
    return faults_shutter.measure(_count(quick, 10, 3, 1), log)


# Each section: measure(quick, log) -> metrics, one line each.
SECTIONS: list[Section] = [
    measure_driver,  # watchdog, fuzzing, random commands (one driver process)
    measure_shutter_module,  # shutter_module_trip_ms_max (demo rig, in-process)
    faults_auth.measure,  # unauthenticated_accepted, rss_growth_mb_oversized
    faults_records.measure,  # records_lost_ms_max over SIGKILLs, driver_restart_resumed
    faults_spm.measure,  # spm_watchdog_trip_ms_max, spm_watchdog_trip_ms_busy_max
]
# Minutes each even when quick: not in the smoke run (their own tests cover them).
SLOW_SECTIONS: frozenset[Section] = frozenset({faults_auth.measure, faults_records.measure})


def run(quick: bool = False, log: Log = print) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    sections = SECTIONS
    if smoke(quick):
        sections = [s for s in SECTIONS if s not in SLOW_SECTIONS]
        metrics["smoke_sections_left_out"] = len(SECTIONS) - len(sections)
    for section in sections:
        metrics.update(section(quick, log))
    return metrics
