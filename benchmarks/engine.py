"""`scopeloop bench engine`: is the feedback-trap loop through the engine (`AgentLoop`:
tracking, safety clipping, event log, telemetry, pause/stop) as fast as a bare loop
with the same detector and policy?

Both loops attach (`agent.engine.link`, as `driver.connect` does) to one twin driver
process started from `configs/twin-feedback-trap.yaml`, in interleaved rounds so load
on a shared machine hits both alike. Latency is the driver's own measure (frame
published -> command applied, `latency_ns` in the reply), the figure the demo reports.
`latency_p99_ratio` = engine p99 / bare p99 (median over rounds).
"""

from __future__ import annotations

import tempfile
import threading
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
    from agent.live.runner import make_policy
    from drivers.transport import CommandClient, CommandError, StreamSubscriber
    from policies.contract import Observation

    settings = config.agent
    detector = build_detector(settings.detector, Path(tempfile.mkdtemp()) / "unused.pt")
    policy = make_policy(config)
    client = CommandClient(ctx, link.command_endpoint, settings.command_timeout_ms)
    sub = StreamSubscriber(ctx, link.stream_endpoint)
    latencies: list[float] = []
    try:
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
        sub.close()
        client.close()
    return latencies


def _engine_round(
    config: Any, link: Any, duration_s: float, ctx: zmq.Context, folder: Path, k: int
) -> list[float]:
    """The same detector and policy through the engine's feedback loop."""
    from agent.detection.detectors import build_detector
    from agent.detection.tracking import Tracker
    from agent.engine.telemetry import RunTelemetry
    from agent.live.loop import AgentLoop, LoopEndpoints
    from agent.live.runner import make_policy, step_latencies_ms
    from agent.records.recorder import EventLog, read_events

    settings = config.agent
    path = folder / f"events-{k}.jsonl"
    with EventLog(path) as events, RunTelemetry(f"bench-{k}", ctx) as telemetry:
        AgentLoop(
            LoopEndpoints(link.stream_endpoint, link.command_endpoint),
            build_detector(settings.detector, folder / "unused.pt"),
            make_policy(config),
            events,
            target_um=settings.target_um,
            command_timeout_ms=settings.command_timeout_ms,
            heartbeat_ms=settings.heartbeat_ms,
            driver_silence_ms=settings.driver_silence_ms,
            ctx=ctx,
            tracker=Tracker(settings.tracking),
            telemetry=telemetry,
        ).run(duration_s, threading.Event(), settings.startup_timeout_s)
    return step_latencies_ms([e for e in read_events(path) if e["kind"] == "step"])


def run(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from agent.config import load_config
    from agent.engine.link import driver_for

    rounds, duration_s = (2, 2.0) if quick else (5, 4.0)
    folder = Path(tempfile.mkdtemp(prefix="sl-bench-engine-"))
    config = load_config(CONFIG, [f"runs_dir={folder}"])
    ctx = zmq.Context.instance()
    p99: dict[str, list[float]] = {"engine": [], "bare": []}
    p50: dict[str, list[float]] = {"engine": [], "bare": []}
    steps: dict[str, int] = {"engine": 0, "bare": 0}
    with driver_for(config.driver, folder, "bench", ctx) as link:
        for k in range(rounds):
            order = ("bare", "engine") if k % 2 == 0 else ("engine", "bare")
            for which in order:
                lat = (
                    _bare_round(config, link, duration_s, ctx)
                    if which == "bare"
                    else _engine_round(config, link, duration_s, ctx, folder, k)
                )
                p99[which].append(float(np.percentile(lat, 99)) if lat else float("nan"))
                p50[which].append(float(np.percentile(lat, 50)) if lat else float("nan"))
                steps[which] += len(lat)
                log(f"round {k} {which}: {len(lat)} steps, p99 {p99[which][-1]:.2f} ms")
    ratios = [e / b for e, b in zip(p99["engine"], p99["bare"], strict=True)]
    return {
        "latency_p99_ratio": float(np.median(ratios)),
        "latency_p99_ratio_rounds": ratios,
        "latency_p50_ratio": float(np.median(p50["engine"]) / np.median(p50["bare"])),
        "engine_latency_p99_ms": float(np.median(p99["engine"])),
        "bare_latency_p99_ms": float(np.median(p99["bare"])),
        "engine_latency_p50_ms": float(np.median(p50["engine"])),
        "bare_latency_p50_ms": float(np.median(p50["bare"])),
        "engine_steps": steps["engine"],
        "bare_steps": steps["bare"],
        "rounds": rounds,
        "round_s": duration_s,
    }
