"""Sweep bench: the same short twin runs once in a plain serial loop and once as Ray tasks
with 2 workers, in one process, one after the other (the same `run_point` does each run).

- `sweep_speedup_2_workers`: serial wall time / Ray wall time (Ray start excluded, reported
  as `ray_start_s`).
- `ray_overhead_s_per_run`: mean over runs of (submit -> result, as the sweep sees it)
  minus the run's own time inside the task: scheduling, argument and result transfer.
- `rl_env_steps_per_s_*`: env steps/s of the steering twin env through today's
  SubprocVecEnv (one process per env) and through Ray actors (`RayVecEnv`, 1 and 2
  workers, each stepping its slice of the envs in one call); `rl_ray_vs_subproc` is
  2 Ray workers / SubprocVecEnv at the training default of 4 envs (also 8 and 32).
  The floor under it: `ray_actor_roundtrip_ms` (a no-op actor call) vs
  `pipe_roundtrip_ms` (SubprocVecEnv's transport), and `rl_ray_vs_subproc_bound`, the
  best ratio 2 actors could reach at 4 envs (a whole SubprocVecEnv step / (one actor
  round trip + half the envs' in-process work)).
A twin run is paced on the wall clock, as hardware is, so two runs at once on two cores
are limited by the CPU each needs, not by their duration.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.sweep.execute import ray_session, run_on_ray, run_serial
from agent.sweep.grid import parse_grid, sweep_points

Log = Callable[[str], None]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "twin-feedback-trap.yaml"
SHORT_RUN = ["duration_s=1.5", "compare_free_diffusion=false"]
WORKERS = 2
RL_CONFIG = CONFIG.parent / "rl-steering.yaml"
RL_ENVS = 4  # the training default (training.n_envs)


def run(quick: bool, log: Log) -> dict[str, float | int | str]:
    n_runs = 6 if quick else 20
    points = sweep_points(parse_grid(["policy.gain_per_s=2,6"]), list(range(n_runs // 2)))
    metrics: dict[str, float | int | str] = {"runs": len(points), "workers": WORKERS}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        t0 = time.perf_counter()
        serial = list(run_serial(CONFIG.read_text(), points, f"{tmp}/serial", SHORT_RUN))
        serial_s = time.perf_counter() - t0
        log(f"serial: {len(serial)} runs in {serial_s:.1f} s")
        t0 = time.perf_counter()
        with ray_session(None, WORKERS, 1.0) as ray:
            metrics["ray_start_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            parallel = run_on_ray(
                ray,
                CONFIG.read_text(),
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
    metrics.update(rl_rollouts(quick, log))
    return metrics


def _env_steps_per_s(vec: str, n_envs: int, workers: int, seconds: float) -> float:
    """Random-action env steps per second through a vec env of the steering twin env."""
    from agent.training.rl import load_train_config, make_vec_env

    config, env, _ = load_train_config(RL_CONFIG, [])
    vec_env = make_vec_env(config.task, env, n_envs, vec, 0, workers)
    try:
        vec_env.reset()
        rng = np.random.default_rng(0)
        actions = rng.uniform(-1, 1, size=(n_envs, *vec_env.action_space.shape)).astype(np.float32)
        for _ in range(10):  # warm-up: first steps pay imports and allocation
            vec_env.step(actions)
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            vec_env.step(actions)
            steps += n_envs
        return steps / (time.perf_counter() - t0)
    finally:
        vec_env.close()


class _Echo:
    """A Ray actor that does nothing: its round trip is the floor of any actor step."""

    def step(self, x: Any) -> Any:
        return x


def _echo_child(conn: Any) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def call_floors(calls: int) -> dict[str, float]:
    """Round trip of a no-op call to a Ray actor vs a pipe to a forked process (what a
    SubprocVecEnv step costs per env before any env work), one after the other."""
    import multiprocessing as mp

    from agent.engine.ray_runtime import init_local_ray

    payload = np.zeros(8, np.float32)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo_child, args=(child,), daemon=True)
    proc.start()
    for _ in range(50):
        parent.send(payload)
        parent.recv()
    t0 = time.perf_counter()
    for _ in range(calls):
        parent.send(payload)
        parent.recv()
    pipe_ms = (time.perf_counter() - t0) / calls * 1e3
    parent.send(None)
    proc.join(5)
    ray = init_local_ray(2)
    try:
        echo = ray.remote(num_cpus=1)(_Echo).remote()
        for _ in range(50):
            ray.get(echo.step.remote(payload))
        t0 = time.perf_counter()
        for _ in range(calls):
            ray.get(echo.step.remote(payload))
        ray_ms = (time.perf_counter() - t0) / calls * 1e3
    finally:
        ray.shutdown()
    return {"pipe_roundtrip_ms": pipe_ms, "ray_actor_roundtrip_ms": ray_ms}


def rl_rollouts(quick: bool, log: Log) -> dict[str, float | int | str]:
    """`rl_env_steps_per_s` with today's SubprocVecEnv and with 1 and 2 Ray workers, same
    env, same number of envs, measured one after the other in this run."""
    seconds = 2.0 if quick else 6.0
    metrics: dict[str, float | int | str] = {}
    for n_envs in (RL_ENVS,) if quick else (RL_ENVS, 2 * RL_ENVS, 8 * RL_ENVS):
        tag = f"_{n_envs}envs"
        subproc = _env_steps_per_s("subproc", n_envs, 0, seconds)
        ray_1 = _env_steps_per_s("ray", n_envs, 1, seconds)
        ray_2 = _env_steps_per_s("ray", n_envs, 2, seconds)
        rates = f"subproc {subproc:.0f}, ray 1 worker {ray_1:.0f}, 2 workers {ray_2:.0f}"
        log(f"{n_envs} envs: {rates} steps/s")
        metrics[f"rl_env_steps_per_s_subproc{tag}"] = subproc
        metrics[f"rl_env_steps_per_s_ray_1{tag}"] = ray_1
        metrics[f"rl_env_steps_per_s_ray_2{tag}"] = ray_2
        metrics[f"rl_ray_vs_subproc{tag}"] = ray_2 / subproc
    metrics["rl_ray_vs_subproc"] = metrics[f"rl_ray_vs_subproc_{RL_ENVS}envs"]
    floors = call_floors(300 if quick else 2000)
    metrics.update(floors)
    # The bound at RL_ENVS envs: a step served by 2 actors costs at least one actor round
    # trip plus half the envs' own work (measured in process, no transport).
    env_ms = 1e3 / _env_steps_per_s("dummy", 1, 0, seconds)
    metrics["env_step_ms_in_process"] = env_ms
    subproc_step_ms = 1e3 * RL_ENVS / float(metrics[f"rl_env_steps_per_s_subproc_{RL_ENVS}envs"])
    best_ray_step_ms = floors["ray_actor_roundtrip_ms"] + RL_ENVS * env_ms / 2
    metrics["rl_ray_vs_subproc_bound"] = subproc_step_ms / best_ray_step_ms
    log(
        f"floors: pipe {floors['pipe_roundtrip_ms']:.3f} ms, Ray actor "
        f"{floors['ray_actor_roundtrip_ms']:.3f} ms per round trip"
    )
    return metrics
