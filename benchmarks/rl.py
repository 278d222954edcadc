"""`scopeloop bench rl`: RL on the particle twin, from the Q-table to the live loop.

- Q-table reproduction (Muinos-Landin et al. 2021): steps to convergence and steps to
  goal (decisions = grid-state transitions) at Pe 53, 80, 135; time to goal against
  Pe under a feedback delay, whose minimum is the optimal speed.
- Deep RL (PPO) on navigation and steering, trained on randomised twins, scored on
  held-out twin parameters: success rate and median frames to goal against the Q-table.
- Gathering (SLM multi-spot): PPO with one network shared by all particles, against a
  scripted push-each-particle heuristic on the same held-out twins.
- Env speed with and without rendering; vectorised (subprocess) against single-env
  training throughput, measured in the same run.
- Live: the trained navigation policy through ZeroMQ against the Micro-Manager twin
  driver, against its success rate in the gym env with the same twin and limit.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.training.rl import RlTrainConfig, load_train_config, make_env, train_sb3
from policies.rl.agents import Sb3Agent, save_qtable, save_sb3
from policies.rl.qlearning import QAgent, train_qtable
from policies.rl.rollout import evaluate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PECLETS = (53, 80, 135)


def _nominal(env_cfg: Any, **update: Any) -> Any:
    """The training twin without randomisation (the paper's single rig)."""
    from simulators.rl_envs import Randomization

    return env_cfg.model_copy(update={"randomize": Randomization(), **update})


def _qtable(task: Any, env_cfg: Any, episodes: int, seed: int) -> tuple[Any, Any, Any]:
    env = make_env(task, env_cfg)
    codec = env.unwrapped.codec
    result = train_qtable(env, task.grid**2, codec.grid_state, episodes, seed=seed)
    return env, result, QAgent(result.q, codec.grid_state)


def _qtable_cell(pe: float, seed: int, episodes: int, eval_episodes: int) -> dict[str, Any]:
    """One (Peclet, seed) Q-table training and its evaluation; a Ray task of its own."""
    config, env_cfg, _ = load_train_config(CONFIGS / "rl-microswimmer.yaml", [])
    env, result, agent = _qtable(config.task, _nominal(env_cfg, peclet=pe), episodes, seed)
    return {
        "pe": pe,
        "seed": seed,
        "conv": result.steps_to_convergence(),
        "first": float(np.mean(result.episode_decisions[:10])),
        "goal": evaluate(env, agent, eval_episodes).median_decisions_to_goal(),
        "keep": {"task": env.unwrapped.task, "q": result.q, "env": env_cfg},
    }


def qtable_reproduction(
    quick: bool, log: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, Any]]:
    """The Q-table seed study: every (Peclet, seed) cell as a Ray task through the sweep
    engine's mapper; each figure is the mean over seeds with its 95 % interval."""
    from agent.sweep.execute import map_on_ray, ray_session
    from agent.sweep.results import put_mean_interval

    episodes = 100 if quick else 400
    seeds = (0, 1) if quick else (0, 1, 2, 3, 4)
    calls = [(pe, seed, episodes, 10 if quick else 50) for pe in PECLETS for seed in seeds]
    cells: list[dict[str, Any]] = []

    def done(_i: int, cell: Any, error: BaseException | None, _s: float) -> None:
        if error is not None:
            raise error
        cells.append(cell)

    with ray_session(None, 2, 1.0) as ray:
        map_on_ray(ray, _qtable_cell, calls, workers=2, cpus_per_call=1.0, on_done=done)
    metrics: dict[str, float] = {}
    for pe in PECLETS:
        mine = [c for c in cells if c["pe"] == pe]
        for key, name in (
            ("conv", "steps_to_convergence"),
            ("goal", "steps_to_goal"),
            ("first", "steps_to_goal_first10"),
        ):
            put_mean_interval(metrics, f"qtable_pe{pe}_{name}", [float(c[key]) for c in mine])
        log(
            f"Q-table Pe {pe} ({len(mine)} seeds): converged after "
            f"{metrics[f'qtable_pe{pe}_steps_to_convergence']:.0f} steps, steps to goal "
            f"{metrics[f'qtable_pe{pe}_steps_to_goal_first10']:.1f} -> "
            f"{metrics[f'qtable_pe{pe}_steps_to_goal']:.1f}"
        )
    keep = next(c["keep"] for c in cells if c["pe"] == 80 and c["seed"] == 0)
    return metrics, keep


def optimal_speed(quick: bool, log: Callable[[str], None]) -> dict[str, float]:
    """Time to goal against Pe with a feedback delay: too slow wastes time, too fast
    overshoots on stale positions."""
    config, env_cfg, _ = load_train_config(CONFIGS / "rl-microswimmer.yaml", [])
    peclets = (20, 80, 320) if quick else (10, 20, 40, 80, 135, 200, 320, 500)
    delay = 6  # frames (186 ms, about one 180 ms exposure of the paper)
    times = {}
    for pe in peclets:
        env_d = _nominal(env_cfg, peclet=pe, max_steps=600)
        env_d.randomize.delay_frames = (delay, delay)
        env, _, agent = _qtable(config.task, env_d, 100 if quick else 300, 0)
        scored = evaluate(env, agent, 10 if quick else 60)
        frames = np.where(scored.success, scored.steps, env_d.max_steps)
        times[pe] = float(np.mean(frames)) * (env_d.exposure_s + env_d.readout_s)
        log(f"delay {delay} frames, Pe {pe}: mean time to goal {times[pe]:.2f} s")
    best = min(times, key=times.__getitem__)
    out = {f"delay_time_to_goal_s_pe{pe}": t for pe, t in times.items()}
    out["delay_frames"] = float(delay)
    out["optimal_peclet_under_delay"] = float(best)
    return out


def deep_rl(
    quick: bool, log: Callable[[str], None], q_keep: dict[str, Any], workdir: Path
) -> tuple[dict[str, float], Path]:
    metrics: dict[str, float] = {}
    episodes = 5 if quick else 100
    successes = []
    swimmer_ckpt = workdir / "microswimmer-ppo.zip"
    for name in ("microswimmer", "steering"):
        config, env_cfg, held_cfg = load_train_config(CONFIGS / f"rl-{name}.yaml", [])
        steps = 2048 if quick else config.training.total_steps
        model, stats = train_sb3(config, env_cfg, total_steps=steps)
        held = make_env(config.task, held_cfg)
        deep = evaluate(held, Sb3Agent(model), episodes, seed=50_000)
        metrics[f"success_heldout_{name}"] = deep.success_rate
        metrics[f"median_steps_to_goal_{name}"] = deep.median_steps_to_goal()
        successes.append(deep.success_rate)
        log(
            f"PPO {name}: {steps} steps in {stats['seconds']:.0f} s, held-out success "
            f"{deep.success_rate:.2f}, median {deep.median_steps_to_goal():.0f} frames"
        )
        if name == "microswimmer":
            save_sb3(swimmer_ckpt, model, held.unwrapped.task, "ppo")
            q_agent = QAgent(q_keep["q"], held.unwrapped.codec.grid_state)
            qt = evaluate(held, q_agent, episodes, seed=50_000)
            metrics["qtable_success_heldout"] = qt.success_rate
            metrics["qtable_median_steps_to_goal"] = qt.median_steps_to_goal()
            metrics["steps_ratio_vs_qtable"] = (
                deep.median_steps_to_goal() / qt.median_steps_to_goal()
            )
            # The Q-table trained on the same randomised twins as PPO (fairer baseline).
            _, _, q_rand_agent = _qtable(config.task, env_cfg, 100 if quick else 400, 0)
            qr = evaluate(held, q_rand_agent, episodes, seed=50_000)
            metrics["qtable_randomized_median_steps_to_goal"] = qr.median_steps_to_goal()
            metrics["steps_ratio_vs_qtable_randomized"] = (
                deep.median_steps_to_goal() / qr.median_steps_to_goal()
            )
            # Geometric oracle: the 8-direction nearest the true bearing to the goal cell.
            oracle = evaluate(held, _BearingOracle(held.unwrapped), episodes, seed=50_000)
            metrics["oracle_median_steps_to_goal"] = oracle.median_steps_to_goal()
            bound = float(np.median(straight_line_frames(held, episodes, seed=50_000)))
            metrics["straight_line_median_steps_to_goal"] = bound
            metrics["steps_ratio_bound"] = bound / qt.median_steps_to_goal()
        held.close()
    metrics["success_heldout"] = float(min(successes))
    metrics.update(gathering(quick, log))
    return metrics, swimmer_ckpt


class PushHeuristic:
    """Scripted gathering: every spot pushes its particle straight at the target at full
    power; `gated` switches a spot off once its particle is inside the goal disc (its
    heat otherwise pushes the gathered ones back out). Reads the codec's own input, so
    its spots come from `GatheringCodec.decode` like the network's."""

    def __init__(self, gated: bool = True) -> None:
        self.gated = gated

    def reset(self) -> None:
        """Stateless."""

    def act(self, x: np.ndarray) -> np.ndarray:
        from policies.rl.codec import GatheringCodec

        rows = np.asarray(x).reshape(-1, GatheringCodec.width)
        a = np.zeros((len(rows), GatheringCodec.per_slot))
        a[:, 0] = 1.0  # inward
        outside = rows[:, 2] > 0.0  # excess distance beyond the goal disc
        a[:, 2] = np.where(outside | (not self.gated), 1.0, -1.0)
        return a.reshape(-1)


def gathering(quick: bool, log: Callable[[str], None]) -> dict[str, float]:
    """PPO gathering on held-out twins, beside the gated and the always-on heuristic."""
    config, env_cfg, held_cfg = load_train_config(CONFIGS / "rl-gathering.yaml", [])
    steps = 2048 if quick else config.training.total_steps
    episodes = 5 if quick else 100
    model, stats = train_sb3(config, env_cfg, total_steps=steps)
    held = make_env(config.task, held_cfg)
    out: dict[str, float] = {"train_seconds_gathering": stats["seconds"]}
    for key, agent in (
        ("", Sb3Agent(model)),
        ("heuristic_", PushHeuristic(gated=True)),
        ("heuristic_full_power_", PushHeuristic(gated=False)),
    ):
        scored = evaluate(held, agent, episodes, seed=50_000)
        out[f"{key}success_heldout_gathering"] = scored.success_rate
        out[f"{key}median_steps_to_goal_gathering"] = scored.median_steps_to_goal()
    held.close()
    out["steps_ratio_vs_heuristic_gathering"] = (
        out["median_steps_to_goal_gathering"] / out["heuristic_median_steps_to_goal_gathering"]
    )
    log(
        f"PPO gathering: {steps} steps in {stats['seconds']:.0f} s, held-out success "
        f"{out['success_heldout_gathering']:.2f}, median "
        f"{out['median_steps_to_goal_gathering']:.0f} frames (heuristic "
        f"{out['heuristic_success_heldout_gathering']:.2f}, "
        f"{out['heuristic_median_steps_to_goal_gathering']:.0f} frames)"
    )
    return out


def straight_line_frames(env: Any, episodes: int, seed: int) -> list[float]:
    """Frames to the goal cell when the swimmer of each evaluation episode (same seeds,
    same twin: D scale, efficiency, delay, latency) drives straight at its own top speed,
    with no Brownian motion and no noise: no policy on these twins can be faster, so
    this over the Q-table's median is the lowest `steps_ratio_vs_qtable` there is."""
    inner = env.unwrapped
    out = []
    for episode in range(episodes):
        inner.reset(seed=seed + episode)
        distance = inner._dist  # from the start to the goal cell
        timing = {k: inner.params[k] for k in ("delay_frames", "latency_substeps", "efficiency")}
        inner.reset(seed=seed, options={**timing, "noise_um": 0.0, "diffusion_um2_s": 0.0})
        start = np.array([[0.1 * inner.config.field_um[0], 0.5 * inner.config.field_um[1]]])
        inner._twin._xy[:] = start
        inner._mean_xy = inner._twin.positions_um
        inner._obs = inner._observe()
        inner.codec.reset()
        inner.codec.encode(inner._obs)  # the codec now follows this particle
        travelled, frames = 0.0, 0
        while travelled < distance and frames < inner.config.max_steps:
            inner.step(0)  # direction 0: +x, along the field
            frames += 1
            travelled = float(inner._mean_xy[0, 0] - start[0, 0])
        out.append(float(frames))
    return out


class _BearingOracle:
    """Reads the true position (no delay, no noise) and picks the direction nearest the
    bearing to the goal cell: what 8 actions at this speed can do at best."""

    def __init__(self, env: Any) -> None:
        self.env = env

    def reset(self) -> None:
        """Stateless."""

    def act(self, _x: np.ndarray) -> int:
        env = self.env
        p = env._mean_xy[0]
        col, row = env._cell(env.target)
        cell = np.asarray(env.cell_um)
        lo = np.array([col, row]) * cell + 0.25 * cell
        v = np.clip(p, lo, lo + 0.5 * cell) - p
        step = 2.0 * np.pi / env.task.n_directions
        return int(np.round(np.arctan2(v[1], v[0]) / step)) % env.task.n_directions


def env_speed(quick: bool) -> dict[str, float]:
    config, env_cfg, _ = load_train_config(CONFIGS / "rl-microswimmer.yaml", [])
    out = {}
    for key, mode, n in (
        ("env_steps_per_s", None, 3000),
        ("env_steps_per_s_render", "rgb_array", 150),
    ):
        env = make_env(config.task, env_cfg, render_mode=mode)
        env.reset(seed=0)
        env.action_space.seed(0)
        n = n // 3 if quick else n
        start = time.perf_counter()
        for _ in range(n):
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            if mode:
                env.render()
            if term or trunc:
                env.reset()
        out[key] = n / (time.perf_counter() - start)
    return out


def vec_throughput(quick: bool, log: Callable[[str], None]) -> dict[str, float]:
    config, env_cfg, _ = load_train_config(CONFIGS / "rl-microswimmer.yaml", [])
    steps = 1024 if quick else 16384
    cfg = RlTrainConfig.model_validate({**config.model_dump(), "seed": 1})
    _, single = train_sb3(cfg, env_cfg, vec="dummy", n_envs=1, total_steps=steps)
    _, vec = train_sb3(cfg, env_cfg, vec="subproc", n_envs=4, total_steps=steps)
    _, batched = train_sb3(cfg, env_cfg, vec="dummy", n_envs=4, total_steps=steps)
    log(
        f"training throughput: 1 env {single['steps_per_s']:.0f} steps/s, "
        f"4 subprocess envs {vec['steps_per_s']:.0f} steps/s"
    )
    return {
        "train_steps_per_s_single": single["steps_per_s"],
        "train_steps_per_s_vec4": vec["steps_per_s"],
        "train_steps_per_s_dummy4": batched["steps_per_s"],  # 4 envs, one process
        "vec_speedup": vec["steps_per_s"] / single["steps_per_s"],
    }


def live_vs_gym(
    checkpoint: Path, episodes: int, max_frames: int, log: Callable[[str], None], workdir: Path
) -> dict[str, float]:
    """Same checkpoint, same twin: gym episodes against live ZeroMQ episodes."""
    from agent.config import load_config
    from agent.engine.driver_faults import DriverSilent
    from agent.plans.feedback_trap import make_policy, run_phase
    from policies.rl.agents import load_agent
    from simulators.rl_envs import MicroswimmerEnv, TwinEnvConfig

    base = CONFIGS / "twin-rl-microswimmer.yaml"
    probe = load_config(base, [f"policy.checkpoint={checkpoint}"])
    twin = probe.driver.twin
    field = twin.camera.field_um
    task, agent = load_agent(checkpoint)
    gym_cfg = TwinEnvConfig(
        particles=twin.particles,
        field_um=field,
        exposure_s=probe.driver.exposure_ms / 1000.0,
        readout_s=twin.readout_ms / 1000.0,
        substeps=twin.substeps,
        max_steps=max_frames,
        target_um=probe.agent.target_um,
    )
    env = MicroswimmerEnv(task=task, env=gym_cfg)
    gym = evaluate(env, agent, 20 if episodes < 4 else 100, seed=70_000)
    seeds = _live_seeds(probe, env, episodes)
    hits: list[bool] = []
    errors = 0
    for seed in seeds:
        overrides = [
            f"policy.checkpoint={checkpoint}",
            f"seed={seed}",
            f"duration_s={max_frames * (gym_cfg.exposure_s + gym_cfg.readout_s) + 1.5:.2f}",
            f"runs_dir={workdir}",
        ]
        config = load_config(base, overrides)
        run_dir = workdir / f"live-{seed}"
        phase = None
        for attempt in range(2):  # a driver that fails to start is retried once
            (run_dir / str(attempt)).mkdir(parents=True, exist_ok=True)
            try:
                phase = run_phase(config, run_dir / str(attempt), "feedback", make_policy(config))
                break
            except DriverSilent as exc:
                log_path = run_dir / str(attempt) / "driver-feedback.log"
                tail = log_path.read_text()[-300:] if log_path.exists() else ""
                log(f"live episode seed {seed}: driver failed ({exc}) {tail}")
        if phase is None:
            errors += 1
            continue
        hits.append(_reached(phase, env, max_frames))
        log(f"live episode seed {seed}: {'reached' if hits[-1] else 'missed'} the goal cell")
    return {
        "gym_success": gym.success_rate,
        "live_success": float(np.mean(hits)) if hits else float("nan"),
        "live_episodes": float(len(hits)),
        "live_errors": float(errors),  # episodes whose driver never started (not scored)
    }


def _live_seeds(config: Any, env: Any, n: int) -> list[int]:
    """Seeds whose twin starts as the gym env's episodes do (outside the goal, >= the
    minimum start distance), read from the twin's deterministic initial layout."""
    from simulators.scene import ParticleScene

    twin = config.driver.twin
    seeds = []
    for seed in range(1000):
        scene = ParticleScene(twin.particles, twin.camera, seed=seed, substeps=twin.substeps)
        xy = scene.twin.positions_um
        inner = env.unwrapped
        if not inner._success(xy) and inner._distance(xy) >= inner.config.min_start_distance_um:
            seeds.append(seed)
        if len(seeds) == n:
            break
    return seeds


def _reached(phase: Any, env: Any, max_frames: int) -> bool:
    """Goal cell entered (exposure-averaged truth, as in the env) within the limit,
    counting from the first frame the policy acted on."""
    steps = phase.steps
    if not steps:
        return False
    first = steps[0]["seq"]
    inner = env.unwrapped
    for record in phase.truth:
        if record["seq"] <= first:
            continue
        if record["seq"] > first + max_frames:
            break
        if inner._success(np.asarray(record["positions_um"], dtype=float).reshape(-1, 2)):
            return True
    return False


def run(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
        workdir = Path(tmp)
        q_metrics, q_keep = qtable_reproduction(quick, log)
        log(f"({time.perf_counter() - start:.0f} s)")
        metrics.update(q_metrics)
        metrics.update(env_speed(quick))
        if quick:
            q_path = save_qtable(workdir / "q.npz", q_keep["q"], q_keep["task"], 20)
            metrics.update(live_vs_gym(q_path, 1, 100, log, workdir))
            metrics.update(optimal_speed(quick, log))
            deep, _ = deep_rl(quick, log, q_keep, workdir)
            metrics.update(deep)
            metrics.update(vec_throughput(quick, log))
        else:
            metrics.update(optimal_speed(quick, log))
            deep, swimmer = deep_rl(quick, log, q_keep, workdir)
            metrics.update(deep)
            metrics.update(vec_throughput(quick, log))
            metrics.update(live_vs_gym(swimmer, 8, 150, log, workdir))
    metrics["seconds"] = time.perf_counter() - start
    return metrics
