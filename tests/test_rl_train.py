"""Training: Q-learning learns, SB3 trains / saves / loads, `scopeloop train` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.training.rl import RlTrainConfig, train_sb3
from policies.rl.agents import Sb3Agent, load_agent, save_sb3
from policies.rl.qlearning import QAgent, train_qtable
from policies.rl.rollout import evaluate
from simulators.particles import ParticleTwinConfig
from simulators.rl_envs import MicroswimmerEnv, TwinEnvConfig

ROOT = Path(__file__).resolve().parents[1]


def test_q_learning_learns_a_tiny_grid_task() -> None:
    particles = ParticleTwinConfig(diffusion_um2_s=0.23, heating_width_um=1.09)
    env = MicroswimmerEnv(
        task={"kind": "microswimmer", "grid": 3},
        env={"particles": particles.model_dump(), "peclet": 80, "field_um": (18.0, 18.0)},
    )
    untrained = QAgent(np.zeros((9, 8)), env.codec.grid_state, seed=1)
    before = evaluate(env, untrained, 20, seed=900)
    result = train_qtable(env, 9, env.codec.grid_state, episodes=60, seed=0)
    after = evaluate(env, QAgent(result.q, env.codec.grid_state), 20, seed=900)
    assert after.success_rate == 1.0
    assert np.mean(after.decisions) < 0.6 * np.mean(before.decisions)
    assert np.mean(after.steps) < np.mean(before.steps)
    assert 0 < result.steps_to_convergence() <= result.total_decisions


def test_short_sb3_training_saves_and_loads(tmp_path: Path) -> None:
    config = RlTrainConfig.model_validate(
        {
            "task": {"kind": "steering"},
            "training": {"n_envs": 1, "vec": "dummy", "n_steps": 64, "batch_size": 64},
        }
    )
    env_cfg = TwinEnvConfig(field_um=(25.6, 25.6), max_steps=100)
    model, stats = train_sb3(config, env_cfg, total_steps=128)
    assert model.num_timesteps >= 128 and stats["steps_per_s"] > 0
    path = save_sb3(tmp_path / "ppo", model, config.task, "ppo")
    task, agent = load_agent(path)
    assert task == config.task and isinstance(agent, Sb3Agent)
    x = np.random.default_rng(0).uniform(-1, 1, size=(10, 4)).astype(np.float32)
    for row in x:
        expected, _ = model.predict(row, deterministic=True)
        assert np.allclose(agent.act(row), expected)
    with pytest.raises(ValueError, match=r"task\.json"):
        path.with_suffix(".task.json").unlink()
        load_agent(path)


def _train(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "agent.cli", "train", str(ROOT / "configs/rl-microswimmer.yaml")]
    for item in (f"checkpoint={tmp_path / 'ckpt'}", *sets):
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_scopeloop_train_qtable_and_ppo(tmp_path: Path) -> None:
    done = _train(tmp_path, "algo=qtable", "training.episodes=30", "eval_episodes=5")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ckpt.npz").exists()
    summary = json.loads((tmp_path / "ckpt.summary.json").read_text())
    assert summary["algo"] == "qtable" and 0.0 <= summary["success_heldout"] <= 1.0
    done = _train(
        tmp_path,
        "training.total_steps=256",
        "training.n_envs=2",
        "training.n_steps=64",
        "training.batch_size=64",
        "eval_episodes=2",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ckpt.zip").exists() and (tmp_path / "ckpt.task.json").exists()
    assert "steps" in done.stdout  # progress bar


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("training.n_envs=0", "training.n_envs"),
        ("env.exposure_s=-1", "env.exposure_s"),
        ("heldout.randomize.efficiency=[2, 1]", "heldout.randomize"),
        ("algo=sac", "algo"),
    ],
)
def test_scopeloop_train_rejects_bad_config(tmp_path: Path, setting: str, field: str) -> None:
    done = _train(tmp_path, setting)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in done.stderr


def _gathering_config(**training: object) -> RlTrainConfig:
    return RlTrainConfig.model_validate(
        {
            "task": {"kind": "gathering", "n_particles": 3},
            "training": {
                "n_envs": 1,
                "vec": "dummy",
                "n_steps": 64,
                "batch_size": 64,
                "policy": "slots",
                "net_arch": [16],
                **training,
            },
        }
    )


def test_slot_policy_treats_every_particle_alike(tmp_path: Path) -> None:
    """Permuting the particles' rows permutes the actions the same way (one shared net),
    and the checkpoint reloads into the live policy, which asks for the env's spots."""
    from policies.rl.nets import SlotPolicy
    from policies.rl.policy import RlPolicy, RlPolicyConfig
    from simulators.rl_envs import GatheringEnv

    config = _gathering_config()
    env_cfg = TwinEnvConfig(field_um=(25.6, 25.6), max_steps=50)
    model, _ = train_sb3(config, env_cfg, total_steps=128)
    assert isinstance(model.policy, SlotPolicy)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0, 1.0, size=(3, 4)).astype(np.float32)
    x[:, 3] = 1.0
    a, _ = model.predict(x.reshape(-1), deterministic=True)
    perm = [2, 0, 1]
    b, _ = model.predict(x[perm].reshape(-1), deterministic=True)
    assert np.allclose(b.reshape(3, 3), a.reshape(3, 3)[perm], atol=1e-6)
    assert not np.allclose(a.reshape(3, 3)[0], a.reshape(3, 3)[1])  # rows do differ

    path = save_sb3(tmp_path / "gather", model, config.task, "ppo")
    policy = RlPolicy(RlPolicyConfig(checkpoint=str(path), task="gathering"))
    env = GatheringEnv(task=config.task, env=env_cfg)
    x, _ = env.reset(seed=3)
    policy.reset()
    for _ in range(5):
        action = policy.act(env.observation)
        expected = env.codec.decode(env.observation, model.predict(x, deterministic=True)[0])
        assert action.laser == expected.laser and len(action.laser) > 0
        x, *_ = env.step(model.predict(x, deterministic=True)[0])


def test_slot_policy_needs_the_gathering_task(tmp_path: Path) -> None:
    done = _train(tmp_path, "training.policy=slots")
    assert done.returncode == 2
    assert "training.policy" in done.stderr and "Traceback" not in done.stderr
