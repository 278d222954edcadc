"""`scopeloop bench engine`: is the feedback-trap plan through the engine (run dir,
telemetry with pause/stop, driver faults, safety clipping, tracking, live calibration,
step log, truth log and frame recording, as `scopeloop run` runs it) as fast as a
bare loop with the same detector and policy?

All loops attach (`agent.engine.link`, as `driver.connect` does) to one twin driver
process started from `configs/twin-feedback-trap.yaml`. Latency is the driver's own
measure (frame published -> command applied, `latency_ns` in the reply), the figure
the demo reports.

How it is measured, so that load on a shared machine hits every kind alike: rounds of
`round_s` seconds, one per kind (bare, engine, engine without recording) in turn, the
order rotated each round (`rounds` is a multiple of the 3 kinds, so each kind goes
first, second and third equally often). A round's p99 comes from ~30 steps a second,
so one stall moves it: the headline is the median over rounds of the per-round ratio,
with every round's ratio and the quartiles of those ratios beside it, and the pooled
ratio (the p99 of all rounds' steps together, the figure a long run would show; one
burst of load in one round moves it most). A full run has 24 rounds: with 12, three
identical quiet runs gave 0.97, 1.05 and 1.09, the median of 12 ratios spread that
wide; 24 halve its variance.

- `latency_p99_ratio`: engine (recording on, the default) p99 / bare p99, median over
  rounds; `_rounds` every round's, `_quartiles` their 25th and 75th percentiles,
  `_pooled` from all steps together.
- `latency_p99_ratio_no_recording` the same with `agent.record_frames: false`, and
  `recording_p99_ratio` what recording costs (engine / engine without recording).
- `latency_p50_ratio`: medians, from all steps together.
- `load_average_1min`: the machine's load at the start and at the end; above its
  core count the ratios say more about the scheduler than about the engine.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "twin-feedback-trap.yaml"


def _bare_round(config: Any, link: Any, duration_s: float, ctx: zmq.Context) -> list[float]:
    """Newest frame -> detect -> policy -> command; nothing else."""
    from agent.detection.detectors import build_detector
    from agent.plans.feedback_trap import make_policy
    from drivers.transport import CommandClient, CommandError, StreamSubscriber
    from policies.contract import Observation

    settings = config.agent
    detector = build_detector(settings.detector, Path(tempfile.mkdtemp()) / "unused.pt")
    policy = make_policy(config)
    client = CommandClient(ctx, link.command_endpoint, settings.command_timeout_ms)
    sub = StreamSubscriber(ctx, link.stream_endpoint)
    latencies: list[float] = []
    try:
        client.call("acquire_control")  # as every agent does on a leased node
        field_um = client.call("get_state").result["field_um"]
        target = settings.target_um or (field_um[0] / 2, field_um[1] / 2)
        policy.reset()
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            frame = sub.recv_newest(100)
            if frame is None:
                continue
            h = frame.header
            pixel = float(h.state.get("pixel_size_um", 1.0))
            obs = Observation.from_wire(
                h.seq,
                h.t_exposure_end_ns,
                (h.t_exposure_end_ns - h.t_exposure_start_ns) / 1e9,
                detector(frame.data) * pixel,
                target,
                h.state.get("laser"),
                field_um,
            )
            spots = [
                {"x_um": s.x_um, "y_um": s.y_um, "power_mw": s.power_mw}
                for s in policy.act(obs).laser
            ]
            cmd, args = ("set_laser", {"spots": spots}) if spots else ("laser_off", {})
            try:
                reply = client.call(cmd, {**args, "frame_seq": h.seq}).result
            except CommandError:
                continue
            if "latency_ns" in reply:
                latencies.append(reply["latency_ns"] / 1e6)
    finally:
        client.call("laser_off")
        client.call("release_control")
        sub.close()
        client.close()
    return latencies


def _plan_round(
    config: Any,
    link: Any,
    duration_s: float,
    ctx: zmq.Context,
    record: bool,
) -> tuple[list[float], dict[str, Any]]:
    """The feedback-trap plan through the engine, as `scopeloop run` runs it (run dir,
    config snapshot, telemetry, driver faults, limits, step log, frame recording when
    `record`), on the shared driver (`driver.connect`, as a user attaches)."""
    from agent.engine.run import RunEngine
    from agent.plans.feedback_trap import RUN_EVENTS, make_policy, run_phase, step_latencies_ms

    attached = config.model_copy(
        update={
            "duration_s": duration_s,
            "driver": config.driver.model_copy(update={"connect": link.command_endpoint}),
        }
    )
    with RunEngine(attached, RUN_EVENTS, ctx) as run:
        frames = run.frame_writer(config.agent.record_queue_mb) if record else None
        run.phase("feedback")
        phase = run_phase(
            attached, run.run_dir, "feedback", make_policy(config), None, run.telemetry, frames
        )
    stats = run.frames.stats() if run.frames is not None else {}
    return step_latencies_ms(phase.steps), stats


KINDS = ("bare", "engine", "engine_no_recording")


def run(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from agent.config import load_config
    from agent.engine.link import driver_for

    rounds, duration_s = (3, 2.0) if quick else (24, 3.0)  # a multiple of the 3 kinds
    folder = Path(tempfile.mkdtemp(prefix="sl-bench-engine-"))
    config = load_config(CONFIG, [f"runs_dir={folder}"])
    ctx = zmq.Context.instance()
    p99: dict[str, list[float]] = {k: [] for k in KINDS}
    pooled: dict[str, list[float]] = {k: [] for k in KINDS}
    recorded = not_recorded = 0
    load_start = os.getloadavg()[0]
    with driver_for(config.driver, folder, "bench", ctx) as link:
        for k in range(rounds):
            order = KINDS[k % 3 :] + KINDS[: k % 3]  # rotated: load drifts hit all alike
            for which in order:
                if which == "bare":
                    lat = _bare_round(config, link, duration_s, ctx)
                else:
                    lat, stats = _plan_round(config, link, duration_s, ctx, which == "engine")
                    recorded += stats.get("frames_recorded", 0)
                    not_recorded += stats.get("frames_not_recorded", 0)
                p99[which].append(float(np.percentile(lat, 99)) if lat else float("nan"))
                pooled[which] += lat
                log(f"round {k} {which}: {len(lat)} steps, p99 {p99[which][-1]:.2f} ms")

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(p99[a], p99[b], strict=True)]

    def pooled_ratio(a: str, b: str, q: float = 99) -> float:
        return float(np.percentile(pooled[a], q) / np.percentile(pooled[b], q))

    engine_bare = ratios("engine", "bare")
    return {
        "latency_p99_ratio": float(np.median(engine_bare)),
        "latency_p99_ratio_rounds": engine_bare,
        "latency_p99_ratio_quartiles": [float(q) for q in np.percentile(engine_bare, [25, 75])],
        # every round's steps together: the figure a long run would show
        "latency_p99_ratio_pooled": pooled_ratio("engine", "bare"),
        "latency_p99_ratio_no_recording": float(np.median(ratios("engine_no_recording", "bare"))),
        "latency_p99_ratio_no_recording_rounds": ratios("engine_no_recording", "bare"),
        "latency_p99_ratio_no_recording_pooled": pooled_ratio("engine_no_recording", "bare"),
        "recording_p99_ratio": float(np.median(ratios("engine", "engine_no_recording"))),
        "latency_p50_ratio": pooled_ratio("engine", "bare", 50),
        "engine_latency_p99_ms": float(np.median(p99["engine"])),
        "engine_no_recording_latency_p99_ms": float(np.median(p99["engine_no_recording"])),
        "bare_latency_p99_ms": float(np.median(p99["bare"])),
        "engine_latency_p50_ms": float(np.percentile(pooled["engine"], 50)),
        "bare_latency_p50_ms": float(np.percentile(pooled["bare"], 50)),
        "engine_steps": len(pooled["engine"]),
        "bare_steps": len(pooled["bare"]),
        "frames_recorded": recorded,
        "frames_not_recorded": not_recorded,
        "rounds": rounds,
        "round_s": duration_s,
        "load_average_1min": [load_start, os.getloadavg()[0]],
    }
