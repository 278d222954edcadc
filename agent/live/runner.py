"""Run an experiment: driver in its own process, agent here, one phase per comparison.

A feedback run is compared with a control run of the same twin, seed and
duration with the laser off (free diffusion); each phase starts a fresh driver
process so both start from the same state.

Every run publishes live telemetry (`agent.engine.telemetry`) and writes its endpoints to
`runs/<run>/telemetry.json`, so `scopeloop dashboard` can attach to any run going;
a `stop` from the control channel ends the current phase and skips the rest.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from agent.config import ExperimentConfig, dump_config
from agent.detection.detectors import build_detector, needs_training, train_on_stream
from agent.detection.tracking import Tracker
from agent.engine.driver_faults import DriverFaults, process_probe
from agent.engine.link import FEEDBACK_NEEDS, AttachedDriver, attach_configured, client_keys
from agent.engine.run import RunEngine
from agent.engine.telemetry import RunTelemetry
from agent.live.loop import AgentLoop, DriverSilent, LoopEndpoints, LoopResult
from agent.records.evaluate import TruthRecorder, controlled_track, detection_rmse_um, rms_distance
from agent.records.plots import plot_run
from agent.records.recorder import EventLog, read_events
from drivers.serve import resolve_endpoints
from policies import registry
from policies.contract import Policy
from policies.feedback import LaserOff

ProgressFn = Callable[[str, float], None]
DEEP_CHECKPOINT = "lodestar.pt"
RUN_EVENTS = "run-events.jsonl"  # not events-*.jsonl: those are the phases' step logs


def make_policy(config: ExperimentConfig) -> Policy:
    """The experiment's policy, from the one registry run, replay, train and bench share."""
    return registry.make_policy(config.policy)


@dataclass
class PhaseResult:
    name: str
    loop: LoopResult
    truth: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    target_um: tuple[float, float]
    driver_returncode: int | None


class DriverProcess:
    """`scopeloop driver serve` as a child process, stopped gracefully (SIGTERM) at exit."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "driver", "serve", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def run_phase(
    config: ExperimentConfig,
    run_dir: Path,
    name: str,
    policy: Policy,
    progress: ProgressFn | None = None,
    telemetry: RunTelemetry | None = None,
) -> PhaseResult:
    ctx = zmq.Context.instance()
    driver: DriverProcess | AttachedDriver
    if config.driver.connect is not None:  # a node already running: use it, leave it on
        driver_config, driver = attach_configured(config.driver, FEEDBACK_NEEDS, config.kind)
    else:
        driver_config = resolve_endpoints(config.driver)
        phase_config = config.model_copy(update={"driver": driver_config})
        config_path = run_dir / f"driver-{name}.yaml"
        dump_config(phase_config, config_path)
        driver = DriverProcess(config_path, run_dir / f"driver-{name}.log")
    keys = client_keys(config.driver.client_auth)
    truth = TruthRecorder(
        ctx, driver_config.stream_endpoint, run_dir / f"truth-{name}.jsonl", keys
    )
    truth.start()
    events_path = run_dir / f"events-{name}.jsonl"
    settings = config.agent
    try:
        with EventLog(events_path) as events:
            loop = AgentLoop(
                LoopEndpoints(
                    driver_config.stream_endpoint, driver_config.command_endpoint, keys
                ),
                build_detector(settings.detector, run_dir / DEEP_CHECKPOINT),
                policy,
                events,
                target_um=settings.target_um,
                command_timeout_ms=settings.command_timeout_ms,
                heartbeat_ms=settings.heartbeat_ms,
                driver_silence_ms=settings.driver_silence_ms,
                ctx=ctx,
                tracker=Tracker(settings.tracking),
                telemetry=telemetry,
                faults=DriverFaults(
                    settings.driver_reconnect_s,
                    settings.driver_silence_ms,
                    process_probe(driver.proc, driver.log_path),
                ),
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
    )


def step_latencies_ms(steps: list[dict[str, Any]]) -> list[float]:
    """Frame published -> command applied, for every step whose command was applied."""
    return [s["latency_ms"] for s in steps if s.get("latency_ms") is not None]


def train_detector_phase(config: ExperimentConfig, run_dir: Path) -> None:
    """Train the deep detector on the instrument's own stream before the experiment,
    so the experiment phases start from the same state as their controls."""
    driver: DriverProcess | AttachedDriver
    if config.driver.connect is not None:
        driver_config, driver = attach_configured(config.driver, FEEDBACK_NEEDS, config.kind)
    else:
        driver_config = resolve_endpoints(config.driver)
        config_path = run_dir / "driver-training.yaml"
        dump_config(config.model_copy(update={"driver": driver_config}), config_path)
        driver = DriverProcess(config_path, run_dir / "driver-training.log")
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
    summary: dict[str, Any] = {
        "name": config.name,
        "seed": config.seed,
        "duration_s": config.duration_s,
        "target_um": list(target),
        "rms_feedback_um": rms_distance(track, target),
        "steps": feedback.loop.steps,
        "frames_received": feedback.loop.frames_received,
        "frames_skipped": feedback.loop.frames_skipped,
        "commands_failed": feedback.loop.commands_failed,
        "actions_clipped": feedback.loop.actions_clipped,
        "latency_p50_ms": _percentile(latencies, 50),
        "latency_p99_ms": _percentile(latencies, 99),
        "latency_max_ms": max(latencies, default=float("nan")),
        "detection_rmse_um": detection_rmse_um(feedback.steps, feedback.truth),
        "driver_events": list(feedback.loop.driver_events),
        "driver_sessions": feedback.loop.driver_sessions,
        "end_reason": next((p.loop.end_reason for p in phases.values() if p.loop.end_reason), None),
        "trap_calibration": feedback.loop.trap_calibration,  # live drag-free k, D, changes
    }
    if "free" in phases:
        free = phases["free"]
        free_track = controlled_track(free.truth, target)
        summary["rms_free_um"] = rms_distance(free_track, target)
        summary["rms_ratio"] = summary["rms_feedback_um"] / summary["rms_free_um"]
    return summary


def run_experiment(
    config: ExperimentConfig, progress: ProgressFn | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run every phase, write summary.json and plots; return (run_dir, summary).

    The engine owns the run dir, telemetry and stop; each phase logs its own steps
    (`events-<phase>.jsonl`), the engine's log (`run-events.jsonl`) the phases."""
    with RunEngine(config, RUN_EVENTS, zmq.Context.instance()) as run:
        run_dir = run.run_dir
        if needs_training(config.agent.detector):
            run.phase("training")
            train_detector_phase(config, run_dir)
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
            phases[name] = run_phase(config, run_dir, name, policy, progress, run.telemetry)
    summary = summarize(config, phases)
    summary["plots"] = plot_run(
        run_dir,
        {n: (p.truth, p.steps) for n, p in phases.items()},
        phases["feedback"].target_um,
        step_latencies_ms(phases["feedback"].steps),
    )
    return run_dir, run.finish(summary)
