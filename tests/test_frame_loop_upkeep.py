"""The frame loop keeps its upkeep (heartbeats, driver events, garbage collection) off
the path from a frame to its command."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.engine.driver_faults import DriverFaults
from agent.engine.frame_loop import FrameLoop, LoopEndpoints, LoopResult, _LoopGarbage
from agent.engine.safety import LaserLimits
from agent.records.recorder import EventLog, read_events
from drivers.protocol import EVENT_TOPIC, Frame, FrameHeader, Reply, now_ns
from drivers.transport import StreamStats
from policies.contract import Action, LaserSpot, Observation

LIMITS = LaserLimits(x_um=(0.0, 10.0), y_um=(0.0, 10.0), max_power_mw=1.0, max_spots=1)


class _Trace:
    """What the loop did, in order: frames handed out, messages sent."""

    def __init__(self) -> None:
        self.items: list[str] = []


class _Client:
    def __init__(self, trace: _Trace) -> None:
        self.trace = trace

    def send(self, cmd: str, args: Any = None, reply: bool = True) -> int:
        self.trace.items.append(cmd)
        return 0

    def call(self, cmd: str, args: Any = None, timeout_ms: int | None = None) -> Reply:
        self.trace.items.append(cmd)
        return Reply(1, True, {"latency_ns": 1_000_000})


class _Subscriber:
    """A new frame at every call; a driver event with the third one."""

    def __init__(self, trace: _Trace) -> None:
        self.trace = trace
        self.stats = StreamStats()
        self.messages: list[tuple[bytes, dict[str, Any]]] = []
        self.last_message_ns = 0
        self.seq = 0

    def recv_newest(self, timeout_ms: int) -> Frame:
        self.seq += 1
        self.last_message_ns = now_ns()
        if self.seq == 3:
            self.messages.append((EVENT_TOPIC, {"event": "control", "action": "granted"}))
        self.trace.items.append("frame")
        t = now_ns()
        header = FrameHeader("camera", self.seq, t, t, t, (4, 4), "uint16", {})
        return Frame(header, np.zeros((4, 4), dtype=np.uint16))

    def take_messages(self) -> list[tuple[bytes, dict[str, Any]]]:
        out, self.messages = self.messages, []
        return out


class _Plan:
    def begin(self, state: dict[str, Any]) -> tuple[float, float]:
        return (5.0, 5.0)

    def observe(self, frame: Frame) -> Observation:
        return Observation.from_wire(
            frame.header.seq, 0, 0.01, np.zeros((0, 2)), (5.0, 5.0), None, (10.0, 10.0)
        )

    def decide(self, obs: Observation) -> Action:
        return Action(laser=(LaserSpot(5.0, 5.0, 0.5),))

    def learn(self, obs: Observation) -> None:
        pass

    def metrics(self) -> dict[str, float | None]:
        return {}

    def take_notes(self) -> list[str]:
        return []


def _run(tmp_path: Path, heartbeat_ms: int, steps: int) -> tuple[list[str], list[dict]]:
    trace = _Trace()
    stop = threading.Event()
    log = tmp_path / "events.jsonl"
    with EventLog(log) as events:
        loop = FrameLoop(
            LoopEndpoints("ipc://unused", "ipc://unused"),
            _Plan(),
            events,
            heartbeat_ms=heartbeat_ms,
            faults=DriverFaults(0.0, 60_000),
        )
        loop._loop(
            _Client(trace),
            _Subscriber(trace),
            LIMITS,
            600.0,
            stop,
            LoopResult(),
            lambda n, _t: stop.set() if n >= steps else None,
        )
    return trace.items, read_events(log)


def test_no_heartbeat_while_commands_feed_the_watchdog(tmp_path: Path) -> None:
    items, _ = _run(tmp_path, heartbeat_ms=60_000, steps=30)
    assert items.count("set_laser") == 30
    assert items.count("heartbeat") == 1  # the loop's first message, before any command
    assert items.index("heartbeat") < items.index("frame")


def test_nothing_between_a_frame_and_its_command(tmp_path: Path) -> None:
    # heartbeat_ms=1: a heartbeat is due at nearly every iteration, yet none may be sent
    # between a frame and the command decided from it.
    items, events = _run(tmp_path, heartbeat_ms=1, steps=30)
    for i, item in enumerate(items):
        if item == "frame":
            assert items[i + 1] == "set_laser", items[i : i + 3]
    # the driver's event that came with frame 3 is still logged, after that step
    kinds = [(e["kind"], e.get("seq")) for e in events]
    assert ("driver_event", None) in kinds
    assert kinds.index(("driver_event", None)) == kinds.index(("step", 3)) + 1


def _cycle() -> weakref.ref:
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_loop_garbage_collects_between_steps_and_restores_the_collector() -> None:
    assert gc.isenabled()
    gc.collect()  # counts at zero: no automatic collection before the loop starts
    before = _cycle()  # garbage from before the loop: frozen, left for later
    with _LoopGarbage() as garbage:
        assert not gc.isenabled()
        with _LoopGarbage() as inner:  # a second loop on another thread shares the switch
            assert not gc.isenabled()
        assert not gc.isenabled()  # the first loop still runs
        ref = _cycle()
        for _ in range(gc.get_threshold()[0] + 1):  # allocations enough for a collection
            _cycle()
        assert ref() is not None  # nothing collected mid-step
        garbage.collect_due()
        assert ref() is None
        inner.collect_due()
        assert before() is not None
    assert gc.isenabled()
    gc.collect()
    assert before() is None


def test_loop_garbage_leaves_a_disabled_collector_alone() -> None:
    gc.disable()
    try:
        with _LoopGarbage() as garbage:
            ref = _cycle()
            for _ in range(gc.get_threshold()[0] + 1):
                _cycle()
            garbage.collect_due()
            assert ref() is not None
        assert not gc.isenabled()
    finally:
        gc.enable()
    gc.collect()


@pytest.fixture(autouse=True)
def _collector_on() -> None:
    """Each test starts with Python's collector as a test run has it."""
    gc.enable()
