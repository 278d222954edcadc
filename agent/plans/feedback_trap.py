"""The feedback trap: hold a particle at a target with a laser, compared with free diffusion.

The experiment's logic only: a feedback phase (the configured policy: proportional,
PID, an RL policy, ...) and, when `compare_free_diffusion`, a control phase on the
same twin, seed and duration with the laser off; each phase starts a fresh driver so
both start from the same state. Per frame the plan detects and tracks the particles,
feeds the controlled one (nearest the target) to the live drag-free calibration and
asks the policy for the laser. The engine (`agent/engine/`) owns the rest: run
directory, config snapshot, logs, telemetry and the dashboard's pause / resume /
stop, driver faults, the agent-side limits, the frame recording (`frames.ome.zarr`,
every frame the loop acts on, on unless `agent.record_frames: false`) and the summary.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from agent.config import ExperimentConfig, dump_config, load_config
from agent.detection.detectors import build_detector, needs_training, train_on_stream
from agent.detection.tracking import Tracker
from agent.engine.driver_faults import DriverFaults, DriverSilent, process_probe
from agent.engine.driver_process import DriverProcess
from agent.engine.frame_loop import FrameLoop, LoopEndpoints, LoopResult
from agent.engine.link import FEEDBACK_NEEDS, AttachedDriver, attach_configured, client_keys
from agent.engine.run import RunEngine
from agent.engine.telemetry import RunTelemetry
from agent.records.evaluate import TruthRecorder, controlled_track, detection_rmse_um, rms_distance
from agent.records.frame_recording import FRAMES_NAME
from agent.records.frame_writer import BackgroundFrameWriter
from agent.records.plots import plot_run
from agent.records.recorder import EventLog, read_events
from agent.records.report_sections import detected_track
from drivers.config import DriverConfig
from drivers.protocol import Frame
from drivers.serve import resolve_endpoints
from policies import registry
from policies.calibration.online import LiveCalibration
from policies.contract import Action, Observation, Policy
from policies.feedback import LaserOff

ProgressFn = Callable[[str, float], None]
Detector = Callable[[np.ndarray], np.ndarray]
DEEP_CHECKPOINT = "lodestar.pt"
RUN_EVENTS = "run-events.jsonl"  # not events-*.jsonl: those are the phases' step logs


def make_policy(config: ExperimentConfig) -> Policy:
    """The experiment's policy, from the one registry run, replay, train and bench share."""
    return registry.make_policy(config.policy)


class FeedbackTrap:
    """The per-frame logic (a `FramePlan`): detections -> tracks -> live k -> policy."""

    def __init__(
        self,
        detector: Detector,
        policy: Policy,
        target_um: tuple[float, float] | None = None,
        tracker: Tracker | None = None,
        live_calibration: LiveCalibration | None = None,
    ) -> None:
        self.detector = detector
        self.policy = policy
        self.tracker = tracker or Tracker()
        self.live_calibration = live_calibration or LiveCalibration()
        self.trap_calibration: dict[str, float | None] = {}  # the newest LiveEstimate
        self._configured_target = target_um
        self.target_um: tuple[float, float] | None = None
        self.field_um: tuple[float, float] = (0.0, 0.0)
        self._notes: list[str] = []
        # looked up once, not per frame
        self._with_confidence = getattr(detector, "detect_with_confidence", None)

    def begin(self, state: dict[str, Any]) -> tuple[float, float]:
        self.field_um = (float(state["field_um"][0]), float(state["field_um"][1]))
        if self.target_um is None:  # kept across driver sessions
            self.target_um = self._configured_target or (self.field_um[0] / 2, self.field_um[1] / 2)
        self.policy.reset()
        self.tracker.reset()
        live = self.live_calibration  # kT of its D: the sample's, as the driver reports it
        live.temperature_k = float(state.get("temperature_k", live.temperature_k))
        return self.target_um

    def observe(self, frame: Frame) -> Observation:
        header = frame.header
        pixel_size = float(header.state.get("pixel_size_um", 1.0))
        if self._with_confidence is not None:
            xy, _scores, confidences = self._with_confidence(frame.data)
        else:
            xy, confidences = self.detector(frame.data), None
        detections_um = xy * pixel_size
        ids = self.tracker.update(header.seq, detections_um)
        assert self.target_um is not None, "begin() comes first"
        return Observation.from_wire(
            header.seq,
            header.t_exposure_end_ns,
            (header.t_exposure_end_ns - header.t_exposure_start_ns) / 1e9,
            detections_um,
            self.target_um,
            header.state.get("laser"),
            self.field_um,
            ids,
            confidences,
            header.state.get("temperature_k"),
        )

    def decide(self, obs: Observation) -> Action:
        return self.policy.act(obs)

    def learn(self, obs: Observation) -> None:
        self._live_trap(obs)  # the trap's stiffness, once the command is out

    def metrics(self) -> dict[str, float | None]:
        return dict(self.trap_calibration)

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes

    def _live_trap(self, obs: Observation) -> None:
        """Feed the controlled particle (detection nearest the target) to the live calibration."""
        dets = obs.detections_um
        if not len(dets):
            return
        nearest = dets[np.argmin(np.hypot(*(dets - np.asarray(obs.target_um)).T))]
        live = self.live_calibration.update(nearest, obs.t_s)
        if live is None:
            return
        self.trap_calibration = live.as_metrics()
        if live.changed:
            self._notes.append(f"trap stiffness changed: k = {live.k[0].value:.3g} fN/um")


def feedback_loop(
    endpoints: LoopEndpoints,
    detector: Detector,
    policy: Policy,
    events: EventLog,
    *,
    target_um: tuple[float, float] | None = None,
    tracker: Tracker | None = None,
    **engine: Any,
) -> FrameLoop:
    """The feedback-trap plan on the engine's frame loop (`engine`: FrameLoop's options)."""
    plan = FeedbackTrap(detector, policy, target_um, tracker)
    return FrameLoop(endpoints, plan, events, **engine)


@dataclass
class PhaseResult:
    name: str
    loop: LoopResult
    truth: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    target_um: tuple[float, float]
    driver_returncode: int | None
    trap_calibration: dict[str, float | None]


# Heating and tweezer traps alike act through the laser `set_laser` drives (galvo or SLM).
FEEDBACK_ACTUATORS = frozenset({"laser"})


def _phase_driver(
    config: ExperimentConfig, run_dir: Path, name: str
) -> tuple[DriverConfig, DriverProcess | AttachedDriver]:
    """The phase's driver: the node `driver.connect` names (left running), else a fresh one."""
    if config.driver.connect is not None:
        return attach_configured(config.driver, FEEDBACK_NEEDS, config.kind)
    driver_config = resolve_endpoints(config.driver)
    config_path = run_dir / f"driver-{name}.yaml"
    dump_config(config.model_copy(update={"driver": driver_config}), config_path)
    return driver_config, DriverProcess(config_path, run_dir / f"driver-{name}.log")


def run_phase(
    config: ExperimentConfig,
    run_dir: Path,
    name: str,
    policy: Policy,
    progress: ProgressFn | None = None,
    telemetry: RunTelemetry | None = None,
    frames: BackgroundFrameWriter | None = None,
) -> PhaseResult:
    """One phase of the plan on the engine's frame loop: its own driver, truth and step
    log; its frames to `frames` (the run's recording) tagged with the phase."""
    ctx = zmq.Context.instance()
    driver_config, driver = _phase_driver(config, run_dir, name)
    keys = client_keys(config.driver.client_auth)
    # drained by the loop between steps (`upkeep`), not on a thread of its own
    truth = TruthRecorder(ctx, driver_config.stream_endpoint, run_dir / f"truth-{name}.jsonl", keys)
    events_path = run_dir / f"events-{name}.jsonl"
    settings = config.agent
    plan = FeedbackTrap(
        build_detector(settings.detector, run_dir / DEEP_CHECKPOINT),
        policy,
        settings.target_um,
        Tracker(settings.tracking),
    )
    try:
        with EventLog(events_path) as events:
            loop = FrameLoop(
                LoopEndpoints(driver_config.stream_endpoint, driver_config.command_endpoint, keys),
                plan,
                events,
                command_timeout_ms=settings.command_timeout_ms,
                heartbeat_ms=settings.heartbeat_ms,
                driver_silence_ms=settings.driver_silence_ms,
                ctx=ctx,
                telemetry=telemetry,
                faults=DriverFaults(
                    settings.driver_reconnect_s,
                    settings.driver_silence_ms,
                    process_probe(driver.proc, driver.log_path),
                ),
                frames=frames,
                frame_tags={"phase": name},
                needs_actuators=FEEDBACK_ACTUATORS,
                plan_name=config.kind,
                upkeep=truth.drain,
            )
            on_step = (lambda _n, t: progress(name, t)) if progress else None
            result = loop.run(
                config.duration_s, threading.Event(), settings.startup_timeout_s, on_step
            )
    except DriverSilent as exc:
        code = driver.proc.poll()
        status = "running" if code is None else f"exited with code {code}"
        raise DriverSilent(f"{exc}; driver {status}, log: {driver.log_path}") from None
    finally:
        returncode = driver.stop()
        records = truth.stop()
    all_events = read_events(events_path)
    start = next(e for e in all_events if e["kind"] == "start")
    return PhaseResult(
        name=name,
        loop=result,
        truth=records,
        steps=[e for e in all_events if e["kind"] == "step"],
        target_um=tuple(start["target_um"]),
        driver_returncode=returncode,
        trap_calibration=plan.trap_calibration,
    )


def step_latencies_ms(steps: list[dict[str, Any]]) -> list[float]:
    """Frame published -> command applied, for every step whose command was applied."""
    return [s["latency_ms"] for s in steps if s.get("latency_ms") is not None]


def train_detector_phase(config: ExperimentConfig, run_dir: Path) -> None:
    """Train the deep detector on the instrument's own stream before the experiment,
    so the experiment phases start from the same state as their controls."""
    driver_config, driver = _phase_driver(config, run_dir, "training")
    try:
        with EventLog(run_dir / "events-training.jsonl") as events:
            stats = train_on_stream(
                config.agent.detector,
                run_dir / DEEP_CHECKPOINT,
                zmq.Context.instance(),
                driver_config.stream_endpoint,
                log=lambda m: events.write("detector", message=m),
                on_loss=lambda step, loss: (
                    events.write("detector_loss", step=step, loss=loss) if step % 5 == 0 else None
                ),
                keys=client_keys(config.driver.client_auth),
            )
            events.write("detector_stats", **{k: float(v) for k, v in stats.items()})
    finally:
        driver.stop()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(config: ExperimentConfig, phases: dict[str, PhaseResult]) -> dict[str, Any]:
    feedback = phases["feedback"]
    target = feedback.target_um
    latencies = step_latencies_ms(feedback.steps)
    track = controlled_track(feedback.truth, target)
    truth = bool(feedback.truth)  # a twin's truth topic; a real rig or a recording has none
    summary: dict[str, Any] = {
        "name": config.name,
        "seed": config.seed,
        "duration_s": config.duration_s,
        "target_um": list(target),
        "rms_feedback_um": rms_distance(track, target) if truth else None,
        # What the agent itself saw: the detection nearest the target, every step.
        "rms_feedback_detected_um": _or_none(
            rms_distance(detected_track(feedback.steps, target), target)
        ),
        "steps": feedback.loop.steps,
        "frames_received": feedback.loop.frames_received,
        "frames_skipped": feedback.loop.frames_skipped,
        "commands_failed": feedback.loop.commands_failed,
        "actions_clipped": feedback.loop.actions_clipped,
        "latency_p50_ms": _percentile(latencies, 50),
        "latency_p99_ms": _percentile(latencies, 99),
        "latency_max_ms": max(latencies, default=float("nan")),
        "detection_rmse_um": detection_rmse_um(feedback.steps, feedback.truth) if truth else None,
        "driver_events": list(feedback.loop.driver_events),
        "driver_sessions": feedback.loop.driver_sessions,
        "end_reason": next((p.loop.end_reason for p in phases.values() if p.loop.end_reason), None),
        "trap_calibration": feedback.trap_calibration,  # live drag-free k, D, changes
    }
    if "free" in phases and truth and phases["free"].truth:
        free_track = controlled_track(phases["free"].truth, target)
        summary["rms_free_um"] = rms_distance(free_track, target)
        summary["rms_ratio"] = summary["rms_feedback_um"] / summary["rms_free_um"]
    return summary


def _or_none(value: float) -> float | None:
    """NaN (nothing to measure) is not JSON: the summary says null instead."""
    return None if value != value else value


def run_experiment(
    config: ExperimentConfig, progress: ProgressFn | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run every phase, write summary.json and plots; return (run_dir, summary).

    The engine owns the run dir, telemetry, stop and the frame recording; each phase
    logs its own steps (`events-<phase>.jsonl`), the engine's log (`run-events.jsonl`)
    the phases."""
    with RunEngine(config, RUN_EVENTS, zmq.Context.instance()) as run:
        run_dir = run.run_dir
        if needs_training(config.agent.detector):
            run.phase("training")
            train_detector_phase(config, run_dir)
        settings = config.agent
        frames = run.frame_writer(settings.record_queue_mb) if settings.record_frames else None
        phases: dict[str, PhaseResult] = {}
        plan: list[tuple[str, Policy]] = [("feedback", make_policy(config))]
        if config.compare_free_diffusion:
            plan.append(("free", LaserOff()))
        for name, policy in plan:
            if any(p.loop.end_reason for p in phases.values()):  # the driver was lost
                run.telemetry.event(f"phase {name} skipped: the run ended early", "warning")
                continue
            if not run.checkpoint():
                run.telemetry.event(f"phase {name} skipped: run stopped", "warning")
                continue
            run.phase(name)
            phases[name] = run_phase(config, run_dir, name, policy, progress, run.telemetry, frames)
    summary = summarize(config, phases)
    summary["plots"] = plot_run(
        run_dir,
        {n: (p.truth, p.steps) for n, p in phases.items()},
        phases["feedback"].target_um,
        step_latencies_ms(phases["feedback"].steps),
    )
    return run_dir, run.finish(summary)


SUMMARY_KEYS = (
    "rms_feedback_um",
    "rms_feedback_detected_um",
    "rms_free_um",
    "rms_ratio",
    "latency_p50_ms",
    "latency_p99_ms",
    "steps",
    "frames_received",
    "frames_skipped",
    "commands_failed",
    "detection_rmse_um",
    "frames_recorded",
    "frames_not_recorded",
)


def run_feedback_trap(config_path: Path, overrides: list[str], console: Console) -> dict[str, Any]:
    """The `feedback-trap` run kind (`agent.engine.experiments.RUN_KINDS`)."""
    return run_with_progress(load_config(config_path, overrides), console)


PROGRESS_REFRESH_S = 0.25


def run_with_progress(config: ExperimentConfig, console: Console) -> dict[str, Any]:
    """Run the experiment with a progress bar over its phases; print the summary table.

    The bar is redrawn from the loop after a step's command is out, at most every
    PROGRESS_REFRESH_S: rich's own refresh thread would draw at random moments,
    holding the GIL between a frame and its command."""
    phases = 2 if config.compare_free_diffusion else 1
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[t]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, auto_refresh=False) as progress:
        task = progress.add_task(config.name, total=config.duration_s * phases, t="")
        offsets = {"feedback": 0.0, "free": config.duration_s}
        last_drawn = [0.0]

        def on_progress(phase: str, t_s: float) -> None:
            progress.update(
                task,
                completed=offsets.get(phase, 0.0) + min(t_s, config.duration_s),
                description=f"{config.name} [{phase}]",
                t=f"{t_s:5.1f} s",
            )
            now = time.monotonic()
            if now - last_drawn[0] >= PROGRESS_REFRESH_S:
                last_drawn[0] = now
                progress.refresh()

        run_dir, summary = run_experiment(config, on_progress)
    table = Table(title="run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        if key in summary:
            value = summary[key]
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    if summary.get("end_reason"):
        console.print(f"run ended early: {summary['end_reason']}", markup=False)
    files = ["report.html", "summary.json", "events-*.jsonl", *summary.get("plots", [])]
    if "frames_recorded" in summary:
        files.insert(3, FRAMES_NAME)
    console.print(f"run written to [bold]{run_dir}[/bold] ({', '.join(files)})")
    return summary
