"""Run an experiment: driver in its own process, agent here, one phase per comparison.

A feedback run is compared with a control run of the same twin, seed and
duration with the laser off (free diffusion); each phase starts a fresh driver
process so both start from the same state.

Every run publishes live telemetry (`agent.telemetry`) and writes its endpoints to
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
from agent.detectors import build_detector, needs_training, train_on_stream
from agent.evaluate import TruthRecorder, controlled_track, detection_rmse_um, rms_distance
from agent.loop import AgentLoop, DriverSilent, LoopEndpoints, LoopResult
from agent.plots import plot_run
from agent.recorder import EventLog, new_run_dir, read_events, write_json
from agent.report import write_report
from agent.telemetry import RunTelemetry
from agent.tracking import Tracker
from drivers.serve import resolve_endpoints
from policies.contract import Policy
from policies.control import CONTROL_CONFIGS, make_control_policy
from policies.feedback import LaserOff, ProportionalTrap, ProportionalTrapConfig
from policies.rl.policy import RlPolicy, RlPolicyConfig

ProgressFn = Callable[[str, float], None]
DEEP_CHECKPOINT = "lodestar.pt"


def make_policy(config: ExperimentConfig) -> Policy:
    if isinstance(config.policy, ProportionalTrapConfig):
        return ProportionalTrap(config.policy)
    if isinstance(config.policy, CONTROL_CONFIGS):
        return make_control_policy(config.policy)
    if isinstance(config.policy, RlPolicyConfig):
        return RlPolicy(config.policy)
    return LaserOff(config.policy)


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
    driver_config = resolve_endpoints(config.driver)
    phase_config = config.model_copy(update={"driver": driver_config})
    config_path = run_dir / f"driver-{name}.yaml"
    dump_config(phase_config, config_path)
    ctx = zmq.Context.instance()
    driver = DriverProcess(config_path, run_dir / f"driver-{name}.log")
    truth = TruthRecorder(ctx, driver_config.stream_endpoint, run_dir / f"truth-{name}.jsonl")
    truth.start()
    events_path = run_dir / f"events-{name}.jsonl"
    settings = config.agent
    try:
        with EventLog(events_path) as events:
            loop = AgentLoop(
                LoopEndpoints(driver_config.stream_endpoint, driver_config.command_endpoint),
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
    """Run every phase, write summary.json and plots; return (run_dir, summary)."""
    run_dir = new_run_dir(config.runs_dir, config.name)
    dump_config(config, run_dir / "config.yaml")
    with RunTelemetry(run_dir.name, zmq.Context.instance()) as telemetry:
        telemetry.write_info(run_dir)
        if needs_training(config.agent.detector):
            telemetry.set_phase("training")
            telemetry.event("training the detector on the live stream")
            train_detector_phase(config, run_dir)
        phases: dict[str, PhaseResult] = {}
        plan: list[tuple[str, Policy]] = [("feedback", make_policy(config))]
        if config.compare_free_diffusion:
            plan.append(("free", LaserOff()))
        for name, policy in plan:
            if telemetry.stop_requested:
                telemetry.event(f"phase {name} skipped: run stopped", "warning")
                continue
            telemetry.set_phase(name)
            telemetry.event(f"phase {name} started")
            phases[name] = run_phase(config, run_dir, name, policy, progress, telemetry)
        stopped = telemetry.stop_requested
        telemetry.reason = "stop command" if stopped else "finished"
    summary = summarize(config, phases)
    summary["stopped"] = stopped
    summary["plots"] = plot_run(
        run_dir,
        {n: (p.truth, p.steps) for n, p in phases.items()},
        phases["feedback"].target_um,
        step_latencies_ms(phases["feedback"].steps),
    )
    write_json(run_dir / "summary.json", summary)
    write_report(run_dir)
    return run_dir, summary
