"""Sweep bench: the same short twin runs once in a plain serial loop and once as Ray tasks
with 2 workers, in one process, one after the other (the same `run_point` does each run).

- `sweep_speedup_2_workers`: serial wall time / Ray wall time (Ray start excluded, reported
  as `ray_start_s`).
- `ray_overhead_s_per_run`: mean over runs of (submit -> result, as the sweep sees it)
  minus the run's own time inside the task: scheduling, argument and result transfer.
A twin run is paced on the wall clock, as hardware is, so two runs at once on two cores
are limited by the CPU each needs, not by their duration.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.sweep.execute import ray_session, run_on_ray, run_serial
from agent.sweep.grid import parse_grid, sweep_points

Log = Callable[[str], None]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "twin-feedback-trap.yaml"
SHORT_RUN = ["duration_s=1.5", "compare_free_diffusion=false"]
WORKERS = 2


def run(quick: bool, log: Log) -> dict[str, float | int | str]:
    n_runs = 6 if quick else 20
    points = sweep_points(parse_grid(["policy.gain_per_s=2,6"]), list(range(n_runs // 2)))
    metrics: dict[str, float | int | str] = {"runs": len(points), "workers": WORKERS}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        t0 = time.perf_counter()
        serial = list(run_serial(str(CONFIG), points, f"{tmp}/serial", SHORT_RUN))
        serial_s = time.perf_counter() - t0
        log(f"serial: {len(serial)} runs in {serial_s:.1f} s")
        t0 = time.perf_counter()
        with ray_session(None, WORKERS, 1.0) as ray:
            metrics["ray_start_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            parallel = run_on_ray(
                ray,
                str(CONFIG),
                points,
                f"{tmp}/ray",
                SHORT_RUN,
                workers=WORKERS,
                cpus_per_run=1.0,
                on_result=lambda _r: None,
            )
            ray_s = time.perf_counter() - t1
        log(f"ray, {WORKERS} workers: {len(parallel)} runs in {ray_s:.1f} s")
    metrics["serial_s"] = serial_s
    metrics["ray_s"] = ray_s
    metrics["sweep_speedup_2_workers"] = serial_s / ray_s
    metrics["ray_overhead_s_per_run"] = float(
        np.mean([r["task_seconds"] - r["seconds"] for r in parallel])
    )
    metrics["run_s_serial_mean"] = float(np.mean([r["seconds"] for r in serial]))
    metrics["run_s_ray_mean"] = float(np.mean([r["seconds"] for r in parallel]))
    metrics["failed_runs"] = sum(r["status"] != "ok" for r in [*serial, *parallel])
    return metrics
