"""The engine's frame loop: newest frame -> plan (observe, decide) -> safe command, logged.

A plan that acts frame by frame (the feedback trap, an RL policy in the loop) gives
the engine a `FramePlan`: how to turn a frame into an `Observation` and an
observation into an `Action`. Everything else is here, once: the driver connection
and its control lease, heartbeats, driver faults (`driver_faults.py`: no actuation
while the driver is down, a new session when it is back), the agent-side limits
(`safety.py`), pause / resume / stop from the run's telemetry, the step log, the
dashboard's frames and metrics, and the frame recording.

The agent never blocks the driver: it acts on the newest frame and counts what it
skipped. It heartbeats from the loop itself, so if this loop stalls the driver's
watchdog switches the laser off. `pause` switches the laser off and stops
actuating while frames are still observed and shown (paused time does not count
towards the duration); `resume` hands control back to the plan; `stop` ends the loop
and leaves the driver in its safe state (laser off).

Between a frame and its command the loop does only what decides the command: observe
(detect, track), decide, clip to the limits, send. Everything else (the plan's
learning, the frame recording, through a writer that never makes the loop wait, the
dashboard, the step log) comes after the send, and so does the loop's upkeep, done
before it waits for the next frame: a heartbeat, only when nothing else was sent for
`heartbeat_ms` (every command feeds the driver's watchdog); the driver's events; the
caller's `upkeep` (the feedback trap drains its truth log there rather than on a
thread of its own that would take the GIL at random); and Python's garbage
collector, switched off for the loop, runs its due collections there
(`_LoopGarbage`), so no collection lands between a frame and its command.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import zmq

from agent.engine.driver_faults import DriverFailedToStart, DriverFaults, DriverLost, DriverSilent
from agent.engine.link import require_actuators
from agent.engine.safety import LaserLimits
from agent.engine.telemetry import RunTelemetry
from agent.records.frame_writer import BackgroundFrameWriter
from agent.records.recorder import EventLog
from drivers.auth import ClientKeys
from drivers.protocol import EVENT_TOPIC, Frame, now_ns
from drivers.transport import CommandClient, CommandError, CommandTimeout, StreamSubscriber
from policies.contract import Action, LaserSpot, Observation

__all__ = ["DriverSilent", "FrameLoop", "FramePlan", "LoopEndpoints", "LoopResult"]


class FramePlan(Protocol):
    """What the engine asks a frame-by-frame plan."""

    def begin(self, state: dict[str, Any]) -> tuple[float, float]:
        """A driver session starts (first or after a restart): reset, learn the field
        from the driver's state; return the target (um) the plan steers to."""
        ...

    def observe(self, frame: Frame) -> Observation:
        """The frame as the policy may see it (detections in um, tracked)."""
        ...

    def decide(self, obs: Observation) -> Action:
        """The action for this observation (the engine clips it to the limits)."""
        ...

    def learn(self, obs: Observation) -> None:
        """What the plan updates from a step once its command is out (nothing that the
        action needs: this runs off the latency path)."""
        ...

    def metrics(self) -> dict[str, float | None]:
        """Plan-specific figures for the dashboard, after each step."""
        ...

    def take_notes(self) -> list[str]:
        """Things worth telling the operator since the last call (dashboard events)."""
        ...


@dataclass
class LoopResult:
    steps: int = 0
    frames_received: int = 0
    frames_skipped: int = 0
    commands_failed: int = 0
    actions_clipped: int = 0
    latency_count: int = 0  # per-step latencies live in the event log, not in memory
    driver_events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))
    driver_sessions: int = 1  # one more each time the driver came back after a fault
    end_reason: str | None = None  # why the loop ended early (a driver lost), else None


@dataclass(frozen=True)
class LoopEndpoints:
    stream: str
    command: str
    keys: ClientKeys | None = None  # CURVE keys for a tcp:// node


def spots_wire(spots: tuple[LaserSpot, ...]) -> list[dict[str, float]]:
    return [{"x_um": s.x_um, "y_um": s.y_um, "power_mw": s.power_mw} for s in spots]


class FrameLoop:
    """Runs one `FramePlan` against one driver for a fixed duration."""

    def __init__(
        self,
        endpoints: LoopEndpoints,
        plan: FramePlan,
        events: EventLog,
        command_timeout_ms: int = 250,
        heartbeat_ms: int = 100,
        driver_silence_ms: int = 3000,
        ctx: zmq.Context | None = None,
        telemetry: RunTelemetry | None = None,
        faults: DriverFaults | None = None,
        frames: BackgroundFrameWriter | None = None,
        frame_tags: dict[str, Any] | None = None,
        needs_actuators: frozenset[str] = frozenset(),
        plan_name: str = "feedback-trap",
        upkeep: Callable[[], None] | None = None,
    ) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.needs_actuators = needs_actuators  # checked against the node before anything moves
        self.plan_name = plan_name
        self.upkeep = upkeep  # the caller's own work between steps (e.g. the truth log)
        # without a reconnect allowance, a silent driver ends the loop at once
        self.faults = faults or DriverFaults(0.0, driver_silence_ms)
        self.endpoints = endpoints
        self.plan = plan
        self.events = events
        self.command_timeout_ms = command_timeout_ms
        self.heartbeat_ms = heartbeat_ms
        self.telemetry = telemetry
        self.frames = frames
        self.frame_tags = frame_tags or {}  # e.g. the phase, in every recorded frame
        self._target: tuple[float, float] = (0.0, 0.0)
        self._last_sent_ns = 0  # the loop's last message to the driver (feeds its watchdog)

    def wait_for_driver(self, client: CommandClient, timeout_s: float) -> dict[str, Any]:
        """Poll `get_state` until the driver answers (it may still be starting)."""
        deadline = now_ns() + int(timeout_s * 1e9)
        while True:
            if self.telemetry is not None:
                self.telemetry.poll_control()  # a dashboard gets answers while we wait
            try:
                return client.call("get_state", timeout_ms=200).result
            except CommandTimeout:
                exited = self.faults.exited()
                if exited is not None:
                    raise DriverFailedToStart(f"driver failed to start: {exited}") from None
                if now_ns() > deadline:
                    raise DriverSilent(
                        f"driver at {self.endpoints.command} did not answer within {timeout_s:g} s"
                    ) from None

    def run(
        self,
        duration_s: float,
        stop: threading.Event | None = None,
        startup_timeout_s: float = 30.0,
        on_step: Callable[[int, float], None] | None = None,
    ) -> LoopResult:
        stop = stop or threading.Event()
        keys = self.endpoints.keys
        client = CommandClient(self.ctx, self.endpoints.command, self.command_timeout_ms, keys=keys)
        subscriber = StreamSubscriber(self.ctx, self.endpoints.stream, keys=keys)
        result = LoopResult()
        try:
            state = self.wait_for_driver(client, startup_timeout_s)
            if self.needs_actuators:  # before the lease: nothing moves on a node we cannot use
                have = client.call("get_capabilities").result.get("actuators", [])
                require_actuators(
                    have, self.needs_actuators, self.plan_name, self.endpoints.command
                )
            # The driver's control lease: only its holder's messages feed the watchdog.
            self.events.write("control", **client.call("acquire_control").result)
            limits = LaserLimits.from_driver_state(state)
            self._target = self.plan.begin(state)
            self.events.write("start", driver_state=state, target_um=list(self._target))
            if self.telemetry is not None and self.telemetry.state == "starting":
                self.telemetry.set_state("running")
            try:
                self._loop(client, subscriber, limits, duration_s, stop, result, on_step)
            except DriverLost as exc:
                result.end_reason = str(exc)
                self.events.write("driver_lost", reason=str(exc), steps=result.steps)
                if self.telemetry is not None:
                    self.telemetry.event(str(exc), "error")
        finally:
            laser_after = None  # the driver's own word on the safe state, for the record
            try:
                laser_after = client.call("laser_off", timeout_ms=1000).result.get("laser")
            except (CommandTimeout, CommandError) as exc:
                self.events.write("error", where="final laser_off", message=str(exc))
            with contextlib.suppress(CommandTimeout, CommandError):  # the next agent needs
                client.call("release_control", timeout_ms=500)  # no watchdog wait to take over
            result.frames_received = subscriber.stats.received
            result.frames_skipped = subscriber.stats.skipped
            self.events.write(
                "end",
                steps=result.steps,
                frames_received=result.frames_received,
                frames_skipped=result.frames_skipped,
                commands_failed=result.commands_failed,
                late_replies=client.late_replies,
                laser_after=laser_after,
                driver_sessions=result.driver_sessions,
                end_reason=result.end_reason,
            )
            subscriber.close()
            client.close()
        return result

    def _loop(
        self,
        client: CommandClient,
        subscriber: StreamSubscriber,
        limits: LaserLimits,
        duration_s: float,
        stop: threading.Event,
        result: LoopResult,
        on_step: Callable[[int, float], None] | None,
    ) -> None:
        with _LoopGarbage() as garbage:
            try:
                self._loop_steps(
                    client, subscriber, limits, duration_s, stop, result, on_step, garbage
                )
            finally:
                self._driver_messages(subscriber, result)

    def _driver_messages(self, subscriber: StreamSubscriber, result: LoopResult) -> None:
        """Log the driver's events (watchdog, control) that came with the stream."""
        if not subscriber.messages:
            return
        for topic, message in subscriber.take_messages():
            if topic == EVENT_TOPIC:
                result.driver_events.append(message)
                self.events.write("driver_event", **message)
                if self.telemetry is not None:
                    self.telemetry.event(f"driver: {message}", "warning")

    def _loop_steps(
        self,
        client: CommandClient,
        subscriber: StreamSubscriber,
        limits: LaserLimits,
        duration_s: float,
        stop: threading.Event,
        result: LoopResult,
        on_step: Callable[[int, float], None] | None,
        garbage: _LoopGarbage,
    ) -> None:
        t_start = now_ns()
        duration_ns = int(duration_s * 1e9)
        heartbeat_ns = self.heartbeat_ms * 1_000_000
        self._last_sent_ns = 0
        last_traffic = t_start
        paused_ns = 0  # paused time does not count towards the duration
        paused_since: int | None = None
        while not stop.is_set():
            # upkeep, while no frame waits for its command
            self._driver_messages(subscriber, result)
            if self.upkeep is not None:
                self.upkeep()
            garbage.collect_due()
            t = now_ns()
            active_ns = t - t_start - paused_ns - (t - paused_since if paused_since else 0)
            if active_ns >= duration_ns:
                break
            if not self.faults.down and t - self._last_sent_ns >= heartbeat_ns:
                client.send("heartbeat", reply=False)  # only when no command fed the watchdog
                self._last_sent_ns = t
            if self.telemetry is not None:
                self.telemetry.poll_control()
                if self.telemetry.stop_requested:
                    self.events.write("stop", reason="stop command", steps=result.steps)
                    break
                if self.telemetry.paused and paused_since is None:
                    paused_since = self._pause(client)
                elif not self.telemetry.paused and paused_since is not None:
                    paused_ns += now_ns() - paused_since
                    paused_since = None
                    self.events.write("resume", paused_ms=paused_ns / 1e6)
                    self.telemetry.event("resumed: policy in control")
            frame = subscriber.recv_newest(timeout_ms=self._wait_ms(heartbeat_ns))
            t = now_ns()
            if subscriber.last_message_ns:
                last_traffic = subscriber.last_message_ns
            fault = self.faults.check(t, last_traffic, frame.header.seq if frame else None)
            if fault is not None:
                self.faults.went_down(client, fault, self.events, self.telemetry)
            if self.faults.down:  # actuate nothing until the driver answers again
                state = self.faults.try_resume(client, last_traffic, self.events, self.telemetry)
                if state is not None:  # a new driver session: frame numbers start again
                    result.driver_sessions += 1
                    limits = LaserLimits.from_driver_state(state)
                    self.plan.begin(state)
                continue
            if frame is None:
                continue
            if paused_since is not None:
                self._show_paused(frame, subscriber.stats.skipped)
                continue
            self._step(client, frame, limits, result, subscriber.stats.skipped)
            if on_step is not None:
                on_step(result.steps, (t - t_start - paused_ns) / 1e9)

    def _wait_ms(self, heartbeat_ns: int) -> int:
        """How long to wait for a frame: until the next heartbeat is due (none goes to a
        driver that is down: then a whole heartbeat period, so the loop never spins)."""
        if self.faults.down:
            return self.heartbeat_ms
        due_ms = (heartbeat_ns - (now_ns() - self._last_sent_ns)) // 1_000_000
        return int(min(max(due_ms, 1), self.heartbeat_ms))

    def _pause(self, client: CommandClient) -> int:
        """Enter the paused state: laser off now; the loop sends no actuation until resume."""
        error = None
        try:
            client.call("laser_off", timeout_ms=max(self.command_timeout_ms, 1000))
        except (CommandTimeout, CommandError) as exc:
            error = str(exc)  # we keep heartbeating, so nobody else will: say it loudly
        self.events.write("pause", error=error)
        if self.telemetry is not None:
            note = f" (laser_off failed: {error})" if error else ""
            level = "warning" if error else "info"
            self.telemetry.event(f"paused: laser off, no actuation{note}", level)
        return now_ns()

    def _show_paused(self, frame: Frame, skipped: int) -> None:
        """While paused: keep observing (tracking) and showing frames, actuate nothing."""
        obs = self.plan.observe(frame)
        self._record(frame, _rounded(obs.detections_um), paused=True)
        telemetry = self.telemetry
        if telemetry is not None and telemetry.frame_due():
            pixel = _pixel_size(frame)
            telemetry.frame(frame.data, frame.header.seq, pixel, obs.detections_um, self._target)
            telemetry.metrics({"frames_skipped": skipped})

    def _step(
        self,
        client: CommandClient,
        frame: Frame,
        limits: LaserLimits,
        result: LoopResult,
        skipped_total: int,
    ) -> None:
        header = frame.header
        t_received = now_ns()
        # Frame -> command: only what decides the command, the clip, and the send.
        obs = self.plan.observe(frame)
        t_detected = now_ns()
        action, clipped = limits.clip(self.plan.decide(obs))
        spots = spots_wire(action.laser)
        latency_ms = None
        error = None
        try:
            reply = self._send(client, spots, header.seq)
            if "latency_ns" in reply:
                latency_ms = reply["latency_ns"] / 1e6
                result.latency_count += 1
        except (CommandTimeout, CommandError) as exc:
            result.commands_failed += 1
            error = str(exc)
        # The command is out: everything else.
        result.steps += 1
        result.actions_clipped += int(clipped)
        self.plan.learn(obs)
        detections = _rounded(obs.detections_um)  # once, for the recording and the step log
        self._record(frame, detections, paused=False)
        if self.telemetry is not None:
            self._publish_step(frame, obs, spots, action)
            self.telemetry.metrics(
                {
                    "latency_ms": latency_ms,
                    "detect_ms": (t_detected - t_received) / 1e6,
                    "frames_skipped": skipped_total,
                    "tracking_error_um": action.info.get("error_um"),
                    "reward": action.info.get("reward"),
                    "laser_power_mw": sum(s.power_mw for s in action.laser),
                    **self.plan.metrics(),
                }
            )
            for note in self.plan.take_notes():
                self.telemetry.event(note)
            if error is not None:
                self.telemetry.event(f"command failed: {error}", "warning")
        ids = obs.track_ids
        self.events.write(
            "step",
            seq=header.seq,
            t_exp_end_ns=header.t_exposure_end_ns,
            t_pub_ns=header.t_published_ns,
            receive_delay_ms=(t_received - header.t_published_ns) / 1e6,
            detect_ms=(t_detected - t_received) / 1e6,
            n_detections=len(detections),
            detections_um=detections[:16],
            track_ids=[] if ids is None else ids[:16].tolist(),
            target_um=list(obs.target_um),
            laser=spots,
            clipped=clipped,
            info=action.info,
            latency_ms=latency_ms,
            skipped_total=skipped_total,
            error=error,
            session=self.faults.session,
        )

    def _record(self, frame: Frame, detections_um: list[list[float]], paused: bool) -> None:
        """The frame and what the plan saw in it, to the run's recording (never waits).
        Detections are in um from the frame's corner: `origin_um` + pixel x pixel size."""
        if self.frames is None:
            return
        header = frame.header
        self.frames.offer(
            frame.data,
            {
                **self.frame_tags,
                "seq": header.seq,
                "session": self.faults.session,
                "paused": paused,
                "t_exp_start_ns": header.t_exposure_start_ns,
                "t_exp_end_ns": header.t_exposure_end_ns,
                "pixel_size_um": _pixel_size(frame),
                "origin_um": [0.0, 0.0],
                "laser": header.state.get("laser"),
                "detections_um": detections_um,
            },
        )

    def _publish_step(
        self, frame: Frame, obs: Observation, spots: list[dict[str, float]], action: Action
    ) -> None:
        telemetry = self.telemetry
        if telemetry is None or not telemetry.frame_due():
            return
        info = {k: v for k, v in action.info.items() if isinstance(v, int | float)}
        telemetry.frame(
            frame.data,
            frame.header.seq,
            _pixel_size(frame),
            obs.detections_um,
            obs.target_um,
            spots,
            info,
        )

    def _send(
        self, client: CommandClient, spots: list[dict[str, float]], seq: int
    ) -> dict[str, Any]:
        self._last_sent_ns = now_ns()  # a command feeds the watchdog as a heartbeat does
        if spots:
            return client.call("set_laser", {"spots": spots, "frame_seq": seq}).result
        return client.call("laser_off", {"frame_seq": seq}).result


class _LoopGarbage:
    """Python's cyclic garbage collector, run by the loop between steps, not mid-step.

    Left automatic, a collection starts at whichever allocation crosses the threshold,
    often inside detection between a frame and its command. While a loop runs it is
    switched off; `collect_due` runs the collection Python would have run by now (the
    same thresholds, youngest generations first), where the loop is about to wait for
    a frame. What existed before the loop (modules, config, the detector) is frozen
    out of every collection (`gc.freeze`), so each one scans only the loop's own
    objects. Loops on several threads share one switch: the first in turns automatic
    collection off, the last out turns it back on (unless it was off before).
    """

    _lock = threading.Lock()
    _holders = 0
    _was_enabled = True

    def __enter__(self) -> _LoopGarbage:
        cls = type(self)
        with cls._lock:
            if cls._holders == 0:
                cls._was_enabled = gc.isenabled()
                gc.freeze()
                gc.disable()
            cls._holders += 1
        self._thresholds = gc.get_threshold()
        return self

    def collect_due(self) -> None:
        if not type(self)._was_enabled:
            return  # collection was off before the loop: leave it off
        counts = gc.get_count()
        due = [g for g in range(3) if self._thresholds[g] and counts[g] >= self._thresholds[g]]
        if due:
            gc.collect(max(due))

    def __exit__(self, *_exc: object) -> None:
        cls = type(self)
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0:
                gc.unfreeze()
                if cls._was_enabled:
                    gc.enable()


def _rounded(detections_um: np.ndarray) -> list[list[float]]:
    """Detections as the records keep them (um, 0.1 nm)."""
    return np.round(detections_um, 4).tolist()


def _pixel_size(frame: Frame) -> float:
    """The pixel size the driver reported with this very frame (um)."""
    return float(frame.header.state.get("pixel_size_um", 1.0))
