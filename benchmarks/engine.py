"""`scopeloop bench engine`: is the feedback-trap plan through the engine (run dir,
telemetry with pause/stop, driver faults, safety clipping, tracking, live calibration,
step log and frame recording, as `scopeloop run` runs it) as fast as a bare loop with
the same detector and policy?

All loops attach (`agent.engine.link`, as `driver.connect` does) to one twin driver
process started from `configs/twin-feedback-trap.yaml`, in rotated rounds so load on
a shared machine hits each alike. Latency is the driver's own measure (frame
published -> command applied, `latency_ns` in the reply), the figure the demo reports.
`latency_p99_ratio` = engine (recording on, the default) p99 / bare p99, median over
rounds (`latency_p99_ratio_pooled`: the p99s of all rounds' steps together);
`latency_p99_ratio_no_recording` the same with `agent.record_frames: false`, and
`recording_p99_ratio` what recording costs (engine / engine without recording).
"""

from __future__ import annotations

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


def run(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from agent.config import load_config
    from agent.engine.link import driver_for

    rounds, duration_s = (3, 2.0) if quick else (9, 3.0)  # a multiple of the 3 kinds
    folder = Path(tempfile.mkdtemp(prefix="sl-bench-engine-"))
    config = load_config(CONFIG, [f"runs_dir={folder}"])
    ctx = zmq.Context.instance()
    kinds = ("bare", "engine", "engine_no_recording")
    p99: dict[str, list[float]] = {k: [] for k in kinds}
    p50: dict[str, list[float]] = {k: [] for k in kinds}
    steps: dict[str, int] = dict.fromkeys(kinds, 0)
    pooled: dict[str, list[float]] = {k: [] for k in kinds}
    recorded = not_recorded = 0
    with driver_for(config.driver, folder, "bench", ctx) as link:
        for k in range(rounds):
            order = kinds[k % 3 :] + kinds[: k % 3]  # rotated: load drifts hit all alike
            for which in order:
                if which == "bare":
                    lat = _bare_round(config, link, duration_s, ctx)
                else:
                    lat, stats = _plan_round(config, link, duration_s, ctx, which == "engine")
                    recorded += stats.get("frames_recorded", 0)
                    not_recorded += stats.get("frames_not_recorded", 0)
                p99[which].append(float(np.percentile(lat, 99)) if lat else float("nan"))
                p50[which].append(float(np.percentile(lat, 50)) if lat else float("nan"))
                steps[which] += len(lat)
                pooled[which] += lat
                log(f"round {k} {which}: {len(lat)} steps, p99 {p99[which][-1]:.2f} ms")

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(p99[a], p99[b], strict=True)]

    median = {k: float(np.median(v)) for k, v in p99.items()}
    median50 = {k: float(np.median(v)) for k, v in p50.items()}
    return {
        "latency_p99_ratio": float(np.median(ratios("engine", "bare"))),
        "latency_p99_ratio_rounds": ratios("engine", "bare"),
        # every round's steps together: the figure a long run would show
        "latency_p99_ratio_pooled": float(
            np.percentile(pooled["engine"], 99) / np.percentile(pooled["bare"], 99)
        ),
        "latency_p99_ratio_no_recording": float(np.median(ratios("engine_no_recording", "bare"))),
        "recording_p99_ratio": float(np.median(ratios("engine", "engine_no_recording"))),
        "latency_p50_ratio": median50["engine"] / median50["bare"],
        "engine_latency_p99_ms": median["engine"],
        "engine_no_recording_latency_p99_ms": median["engine_no_recording"],
        "bare_latency_p99_ms": median["bare"],
        "engine_latency_p50_ms": median50["engine"],
        "bare_latency_p50_ms": median50["bare"],
        "engine_steps": steps["engine"],
        "bare_steps": steps["bare"],
        "frames_recorded": recorded,
        "frames_not_recorded": not_recorded,
        "rounds": rounds,
        "round_s": duration_s,
    }
