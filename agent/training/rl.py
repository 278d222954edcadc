"""`scopeloop train configs/rl-*.yaml`: train on randomised twins, save a checkpoint,
score it on held-out twin parameters.

The env is reached by its gymnasium id (`simulators.rl_envs:scopeloop/...`) and its
settings are validated through the driver side (`drivers.gym_envs`), so the agent
imports no simulator code; torch and stable-baselines3 are imported only when a deep
agent is trained. (Moved here from `policies/rl/train.py`: policies do not train.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.rl.codec import GatheringTask, SwimmerTask, TaskConfig

ENV_MODULE = "simulators.rl_envs"
ENV_IDS = {
    "microswimmer": "scopeloop/Microswimmer-v0",
    "steering": "scopeloop/Steering-v0",
    "gathering": "scopeloop/Gathering-v0",
}
Log = Callable[[str], None]


class TrainingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    total_steps: int = Field(100_000, ge=1, le=100_000_000)  # deep RL env steps
    episodes: int = Field(400, ge=1, le=1_000_000)  # Q-table episodes
    n_envs: int = Field(4, ge=1, le=64)
    # subproc: one process per env; ray: the envs in `ray_workers` Ray actors
    vec: Literal["subproc", "dummy", "ray"] = "subproc"
    ray_workers: int = Field(2, ge=1, le=4096)
    learning_rate: float = Field(3e-4, gt=0.0, le=1.0)
    n_steps: int = Field(256, ge=8, le=100_000)  # PPO rollout per env
    batch_size: int = Field(256, ge=8, le=100_000)
    gamma: float = Field(0.99, gt=0.0, le=1.0)
    net_arch: list[int] = Field(default_factory=lambda: [64, 64])  # slots: [width]
    # mlp: SB3's MlpPolicy; slots: one network shared by every particle (policies.rl.nets)
    policy: Literal["mlp", "slots"] = "mlp"
    log_std_init: float = Field(0.0, ge=-5.0, le=2.0)  # PPO/SAC: initial exploration
    # Q-table (semi-MDP) settings
    alpha: float = Field(0.5, gt=0.0, le=1.0)
    q_gamma: float = Field(0.9, gt=0.0, le=1.0)
    epsilon: tuple[float, float] = (0.5, 0.02)
    max_hold: int = Field(20, ge=1, le=10_000)


class RlTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["rl"] = "rl"
    name: str = Field("rl", min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    algo: Literal["qtable", "ppo", "sac", "dqn"] = "ppo"
    task: TaskConfig = SwimmerTask()
    env: dict[str, Any] = Field(default_factory=dict)  # simulators.rl_envs.TwinEnvConfig
    heldout: dict[str, Any] = Field(default_factory=dict)  # env overrides for evaluation
    training: TrainingSettings = TrainingSettings()
    checkpoint: str = "runs/rl/checkpoint"  # suffix .npz (Q-table) or .zip (SB3) is added
    eval_episodes: int = Field(50, ge=0, le=100_000)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_train_config(path: Path, overrides: list[str]) -> tuple[RlTrainConfig, Any, Any]:
    """(config, training env config, held-out env config); ConfigError on bad input."""
    from agent.config import ConfigError, format_validation_error, load_model_config
    from drivers.gym_envs import TwinEnvConfig

    config = load_model_config(path, overrides, RlTrainConfig)
    envs = []
    for section, data in (
        ("env", config.env),
        ("heldout", _deep_merge(config.env, config.heldout)),
    ):
        try:
            envs.append(TwinEnvConfig.model_validate(data))
        except ValidationError as exc:
            text = format_validation_error(exc).replace(
                "config error: ", f"config error: {section}."
            )
            raise ConfigError(text) from None
    if config.algo == "qtable" and config.task.kind != "microswimmer":
        raise ConfigError("config error: algo: qtable needs task.kind microswimmer (grid states)")
    if config.algo == "dqn" and config.task.kind != "microswimmer":
        raise ConfigError("config error: algo: dqn needs a discrete task (microswimmer)")
    if config.algo == "sac" and config.task.kind == "microswimmer":
        raise ConfigError("config error: algo: sac needs a continuous task (steering, gathering)")
    if config.training.policy == "slots" and (
        config.algo != "ppo" or config.task.kind != "gathering"
    ):
        raise ConfigError("config error: training.policy: slots needs algo ppo, task gathering")
    return config, envs[0], envs[1]


def make_env(task: Any, env: Any, render_mode: str | None = None) -> Any:
    import gymnasium as gym

    return gym.make(
        f"{ENV_MODULE}:{ENV_IDS[task.kind]}", task=task, env=env, render_mode=render_mode
    )


def _env_factory(task: Any, env: Any, rank: int, seed: int) -> Callable[[], Any]:
    def build() -> Any:
        from stable_baselines3.common.monitor import Monitor

        e = Monitor(make_env(task, env))
        e.reset(seed=seed + rank)
        return e

    return build


def make_vec_env(
    task: Any, env: Any, n_envs: int, vec: str, seed: int, ray_workers: int = 2
) -> Any:
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    factories = [_env_factory(task, env, i, seed) for i in range(n_envs)]
    if vec == "ray":
        from agent.training.ray_vec_env import RayVecEnv

        return RayVecEnv(factories, workers=ray_workers)
    if vec == "subproc" and n_envs > 1:
        return SubprocVecEnv(factories, start_method="fork")
    return DummyVecEnv(factories)


def build_sb3_model(config: RlTrainConfig, vec_env: Any) -> Any:
    import torch

    from policies.rl.agents import sb3_class

    torch.set_num_threads(1)
    t = config.training
    policy: Any = "MlpPolicy"
    net: dict[str, Any] = {"net_arch": list(t.net_arch)}
    if t.policy == "slots":
        from policies.rl.nets import SlotPolicy

        assert isinstance(config.task, GatheringTask)  # load_train_config checks it
        policy = SlotPolicy
        net = {"slots": config.task.n_particles, "hidden": t.net_arch[0]}
    if config.algo != "dqn" and config.task.kind != "microswimmer":
        net["log_std_init"] = t.log_std_init
    kwargs: dict[str, Any] = {
        "learning_rate": t.learning_rate,
        "gamma": t.gamma,
        "seed": config.seed,
        "device": "cpu",
        "verbose": 0,
        "policy_kwargs": net,
    }
    if config.algo == "ppo":
        kwargs.update(n_steps=t.n_steps, batch_size=t.batch_size)
    else:
        kwargs.update(batch_size=t.batch_size, learning_starts=min(1000, t.total_steps // 10))
    return sb3_class(config.algo)(policy, vec_env, **kwargs)


def _progress_callback(total: int, progress: Callable[[int, int], None] | None) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class Progress(BaseCallback):
        def _on_step(self) -> bool:
            if progress is not None and self.n_calls % 50 == 0:
                progress(min(self.num_timesteps, total), total)
            return True

    return Progress()


def train_sb3(
    config: RlTrainConfig,
    env_cfg: Any,
    progress: Callable[[int, int], None] | None = None,
    vec: str | None = None,
    n_envs: int | None = None,
    total_steps: int | None = None,
) -> tuple[Any, dict[str, float]]:
    """Train a deep agent; returns (model, {"seconds", "steps_per_s"})."""
    t = config.training
    total = total_steps or t.total_steps
    vec_env = make_vec_env(
        config.task, env_cfg, n_envs or t.n_envs, vec or t.vec, config.seed * 1000, t.ray_workers
    )
    try:
        model = build_sb3_model(config, vec_env)
        start = time.perf_counter()
        model.learn(total, callback=_progress_callback(total, progress))
        seconds = time.perf_counter() - start
    finally:
        vec_env.close()
    return model, {"seconds": seconds, "steps_per_s": model.num_timesteps / seconds}


def train(
    config: RlTrainConfig,
    env_cfg: Any,
    heldout_cfg: Any,
    progress: Callable[[int, int], None] | None = None,
    log: Log = lambda _m: None,
) -> dict[str, Any]:
    """Train per `config`, save the checkpoint, evaluate on held-out twins."""
    from policies.rl.agents import QAgent, Sb3Agent, save_qtable, save_sb3
    from policies.rl.qlearning import train_qtable
    from policies.rl.rollout import evaluate

    summary: dict[str, Any] = {"name": config.name, "algo": config.algo, "task": config.task.kind}
    env = make_env(config.task, env_cfg)
    task = env.unwrapped.task  # resolved (e.g. power from the Peclet number)
    start = time.perf_counter()
    if config.algo == "qtable":
        t = config.training
        codec = env.unwrapped.codec
        result = train_qtable(
            env,
            task.grid**2,
            codec.grid_state,
            t.episodes,
            alpha=t.alpha,
            gamma=t.q_gamma,
            epsilon=t.epsilon,
            max_hold=t.max_hold,
            seed=config.seed,
            progress=progress,
        )
        path = save_qtable(Path(config.checkpoint), result.q, task, t.max_hold)
        agent: Any = QAgent(result.q, codec.grid_state, max_hold=t.max_hold)
        summary["steps_to_convergence"] = result.steps_to_convergence()
        summary["train_decisions"] = result.total_decisions
    else:
        model, stats = train_sb3(config, env_cfg, progress)
        path = save_sb3(Path(config.checkpoint), model, task, config.algo)
        agent = Sb3Agent(model)
        summary["train_steps_per_s"] = stats["steps_per_s"]
    summary["train_seconds"] = time.perf_counter() - start
    summary["checkpoint"] = str(path)
    log(f"checkpoint written to {path}")
    if config.eval_episodes:
        held = make_env(task, heldout_cfg)
        result_eval = evaluate(held, agent, config.eval_episodes, seed=config.seed + 10_000)
        summary["success_heldout"] = result_eval.success_rate
        summary["median_steps_to_goal"] = result_eval.median_steps_to_goal()
        summary["median_decisions_to_goal"] = result_eval.median_decisions_to_goal()
        held.close()
    env.close()
    return summary


def train_entry(config_path: Path, overrides: list[str], console: Any) -> dict[str, Any]:
    """The `rl` train kind: progress bar, checkpoint, held-out score (train_summary.json)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    config, env_cfg, heldout_cfg = load_train_config(config_path, overrides)
    unit = "episodes" if config.algo == "qtable" else "steps"
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} " + unit),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        total = config.training.episodes if config.algo == "qtable" else config.training.total_steps
        task_id = bar.add_task(f"{config.name} [{config.algo}]", total=total)
        summary = train(
            config,
            env_cfg,
            heldout_cfg,
            progress=lambda done, _total: bar.update(task_id, completed=done),
            log=console.print,
        )
    out = Path(summary["checkpoint"]).with_suffix(".summary.json")
    out.write_text(json.dumps(_jsonable(summary), indent=1))
    for key, value in summary.items():
        console.print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return summary


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}
