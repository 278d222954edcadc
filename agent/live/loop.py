"""The inference loop: newest frame -> detections -> policy -> command, logged step by step.

The agent never blocks the driver: it acts on the newest frame and counts what
it skipped. It heartbeats from the loop itself, so if this loop stalls the
driver's watchdog switches the laser off.

With a `RunTelemetry` the loop publishes each step (rate-limited frame + overlays,
metrics, events) and obeys its control channel: `pause` switches the laser off and
stops actuating while frames are still shown (paused time does not count towards
the phase duration), `resume` hands control back to the policy, `stop` ends the
phase and leaves the driver in its safe state (laser off).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from agent.detection.tracking import Tracker
from agent.engine.driver_faults import DriverFailedToStart, DriverFaults, DriverLost, DriverSilent
from agent.engine.safety import LaserLimits
from agent.engine.telemetry import RunTelemetry
from agent.records.recorder import EventLog
from drivers.auth import ClientKeys
from drivers.protocol import EVENT_TOPIC, Frame, now_ns
from drivers.transport import (
    CommandClient,
    CommandError,
    CommandTimeout,
    StreamSubscriber,
)
from policies.calibration.online import LiveCalibration, LiveEstimate
from policies.contract import Action, LaserSpot, Observation, Policy

__all__ = ["AgentLoop", "DriverSilent", "LoopEndpoints", "LoopResult"]


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
    end_reason: str | None = None  # why the phase ended early (a driver lost), else None
    trap_calibration: dict[str, float | None] = field(default_factory=dict)  # LiveEstimate


@dataclass(frozen=True)
class LoopEndpoints:
    stream: str
    command: str
    keys: ClientKeys | None = None  # CURVE keys for a tcp:// node


def _spots_wire(spots: tuple[LaserSpot, ...]) -> list[dict[str, float]]:
    return [{"x_um": s.x_um, "y_um": s.y_um, "power_mw": s.power_mw} for s in spots]


class AgentLoop:
    """Runs one policy against one driver for a fixed duration."""

    def __init__(
        self,
        endpoints: LoopEndpoints,
        detector: Callable[[np.ndarray], np.ndarray],
        policy: Policy,
        events: EventLog,
        target_um: tuple[float, float] | None = None,
        command_timeout_ms: int = 250,
        heartbeat_ms: int = 100,
        driver_silence_ms: int = 3000,
        ctx: zmq.Context | None = None,
        tracker: Tracker | None = None,
        telemetry: RunTelemetry | None = None,
        faults: DriverFaults | None = None,
    ) -> None:
        self.ctx = ctx or zmq.Context.instance()
        # without a reconnect allowance, a silent driver ends the phase at once
        self.faults = faults or DriverFaults(0.0, driver_silence_ms)
        self.tracker = tracker or Tracker()
        self.endpoints = endpoints
        self.detector = detector
        self.policy = policy
        self.events = events
        self.target_um = target_um
        self.command_timeout_ms = command_timeout_ms
        self.heartbeat_ms = heartbeat_ms
        self.driver_silence_ms = driver_silence_ms
        self.telemetry = telemetry
        self.live_calibration = LiveCalibration()  # set one with the run's temperature

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
            live_cal = self.live_calibration  # kT of its D: the sample's, from the driver
            live_cal.temperature_k = state.get("temperature_k", live_cal.temperature_k)
            # The driver's control lease: only its holder's messages feed the watchdog.
            self.events.write("control", **client.call("acquire_control").result)
            limits = LaserLimits.from_driver_state(state)
            field_um = tuple(state["field_um"])
            target = self.target_um or (field_um[0] / 2, field_um[1] / 2)
            self.events.write("start", driver_state=state, target_um=list(target))
            if self.telemetry is not None and self.telemetry.state == "starting":
                self.telemetry.set_state("running")
            self.policy.reset()
            self.tracker.reset()
            try:
                self._loop(
                    client, subscriber, limits, field_um, target, duration_s, stop, result, on_step
                )
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
        field_um: tuple[float, float],
        target: tuple[float, float],
        duration_s: float,
        stop: threading.Event,
        result: LoopResult,
        on_step: Callable[[int, float], None] | None,
    ) -> None:
        t_start = now_ns()
        duration_ns = int(duration_s * 1e9)
        last_heartbeat = 0
        last_traffic = t_start
        paused_ns = 0  # paused time does not count towards the duration
        paused_since: int | None = None
        while not stop.is_set():
            t = now_ns()
            active_ns = t - t_start - paused_ns - (t - paused_since if paused_since else 0)
            if active_ns >= duration_ns:
                break
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
            frame = subscriber.recv_newest(timeout_ms=self.heartbeat_ms)
            t = now_ns()
            if not self.faults.down and t - last_heartbeat > self.heartbeat_ms * 1_000_000:
                client.send("heartbeat", reply=False)
                last_heartbeat = t
            for topic, message in subscriber.take_messages():
                if topic == EVENT_TOPIC:
                    result.driver_events.append(message)
                    self.events.write("driver_event", **message)
                    if self.telemetry is not None:
                        self.telemetry.event(f"driver: {message}", "warning")
            if subscriber.last_message_ns:
                last_traffic = subscriber.last_message_ns
            fault = self.faults.check(t, last_traffic, frame.header.seq if frame else None)
            if fault is not None:
                self.faults.went_down(client, fault, self.events, self.telemetry)
            if self.faults.down:  # actuate nothing until the driver answers again
                state = self.faults.try_resume(client, last_traffic, self.events, self.telemetry)
                if state is not None:  # a new driver session: frame numbers start again
                    result.driver_sessions += 1
                    self.policy.reset()
                    self.tracker.reset()
                    limits = LaserLimits.from_driver_state(state)
                    field_um = tuple(state["field_um"])
                continue
            if frame is None:
                continue
            if paused_since is not None:
                self._show_paused(frame, target, subscriber.stats.skipped)
                continue
            self._step(client, frame, limits, field_um, target, result, subscriber.stats.skipped)
            if on_step is not None:
                on_step(result.steps, (t - t_start - paused_ns) / 1e9)

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

    def _observe(self, frame: Frame) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
        """Detections (um), their track ids, the pixel size from the frame's own state,
        and each detection's confidence where the detector gives one."""
        pixel_size = float(frame.header.state.get("pixel_size_um", 1.0))
        with_confidence = getattr(self.detector, "detect_with_confidence", None)
        if with_confidence is not None:
            xy, _scores, confidences = with_confidence(frame.data)
        else:
            xy, confidences = self.detector(frame.data), None
        detections_um = xy * pixel_size
        ids = self.tracker.update(frame.header.seq, detections_um)
        return detections_um, ids, pixel_size, confidences

    def _show_paused(self, frame: Frame, target: tuple[float, float], skipped: int) -> None:
        """While paused: keep tracking and showing frames, decide and actuate nothing."""
        detections_um, _ids, pixel_size, _conf = self._observe(frame)
        telemetry = self.telemetry
        if telemetry is not None and telemetry.frame_due():
            telemetry.frame(frame.data, frame.header.seq, pixel_size, detections_um, target)
            telemetry.metrics({"frames_skipped": skipped})

    def _step(
        self,
        client: CommandClient,
        frame: Frame,
        limits: LaserLimits,
        field_um: tuple[float, float],
        target: tuple[float, float],
        result: LoopResult,
        skipped_total: int,
    ) -> None:
        header = frame.header
        t_received = now_ns()
        detections_um, track_ids, pixel_size, confidences = self._observe(frame)
        t_detected = now_ns()
        obs = Observation.from_wire(
            header.seq,
            header.t_exposure_end_ns,
            (header.t_exposure_end_ns - header.t_exposure_start_ns) / 1e9,
            detections_um,
            target,
            header.state.get("laser"),
            field_um,
            track_ids,
            confidences,
            header.state.get("temperature_k"),
        )
        live = self._live_trap(detections_um, target, obs.t_s, result)
        action, clipped = limits.clip(self.policy.act(obs))
        result.actions_clipped += int(clipped)
        latency_ms = None
        error = None
        try:
            reply = self._send(client, action, header.seq)
            if "latency_ns" in reply:
                latency_ms = reply["latency_ns"] / 1e6
                result.latency_count += 1
        except (CommandTimeout, CommandError) as exc:
            result.commands_failed += 1
            error = str(exc)
        result.steps += 1
        spots = _spots_wire(action.laser)
        if self.telemetry is not None:
            self._publish_step(frame, pixel_size, detections_um, target, spots, action)
            self.telemetry.metrics(
                {
                    "latency_ms": latency_ms,
                    "detect_ms": (t_detected - t_received) / 1e6,
                    "frames_skipped": skipped_total,
                    "tracking_error_um": action.info.get("error_um"),
                    "reward": action.info.get("reward"),
                    "laser_power_mw": sum(s.power_mw for s in action.laser),
                    **result.trap_calibration,
                }
            )
            if live is not None and live.changed:
                self.telemetry.event(f"trap stiffness changed: k = {live.k[0].value:.3g} fN/um")
            if error is not None:
                self.telemetry.event(f"command failed: {error}", "warning")
        self.events.write(
            "step",
            seq=header.seq,
            t_exp_end_ns=header.t_exposure_end_ns,
            t_pub_ns=header.t_published_ns,
            receive_delay_ms=(t_received - header.t_published_ns) / 1e6,
            detect_ms=(t_detected - t_received) / 1e6,
            n_detections=len(detections_um),
            detections_um=np.round(detections_um[:16], 4).tolist(),
            track_ids=track_ids[:16].tolist(),
            target_um=list(target),
            laser=spots,
            clipped=clipped,
            info=action.info,
            latency_ms=latency_ms,
            skipped_total=skipped_total,
            error=error,
            session=self.faults.session,
        )

    def _live_trap(
        self, dets: np.ndarray, target: tuple[float, float], t_s: float, result: LoopResult
    ) -> LiveEstimate | None:
        """Feed the controlled particle (detection nearest the target) to the live calibration."""
        if not len(dets):
            return None
        live = self.live_calibration.update(
            dets[np.argmin(np.hypot(*(dets - np.asarray(target)).T))], t_s
        )
        if live is not None:
            result.trap_calibration = live.as_metrics()
        return live

    def _publish_step(
        self,
        frame: Frame,
        pixel_size: float,
        detections_um: np.ndarray,
        target: tuple[float, float],
        spots: list[dict[str, float]],
        action: Action,
    ) -> None:
        telemetry = self.telemetry
        if telemetry is None or not telemetry.frame_due():
            return
        info = {k: v for k, v in action.info.items() if isinstance(v, int | float)}
        telemetry.frame(
            frame.data, frame.header.seq, pixel_size, detections_um, target, spots, info
        )

    def _send(self, client: CommandClient, action: Action, seq: int) -> dict[str, Any]:
        if action.laser:
            args = {"spots": _spots_wire(action.laser), "frame_seq": seq}
            return client.call("set_laser", args).result
        return client.call("laser_off", {"frame_seq": seq}).result
