"""RL rollouts on Ray: the envs in Ray actors step exactly as SB3's own DummyVecEnv steps
them (same seeds, same auto-reset), and PPO trains on them into the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

from agent.engine.ray_runtime import init_local_ray
from agent.training.ray_vec_env import RayVecEnv
from agent.training.rl import RlTrainConfig, _env_factory, train_sb3
from policies.rl.agents import Sb3Agent, load_agent, save_sb3
from simulators.rl_envs import TwinEnvConfig

TASK = RlTrainConfig.model_validate({"task": {"kind": "steering"}}).task
# Short episodes, so auto-reset happens inside the compared window.
ENV = TwinEnvConfig(field_um=(25.6, 25.6), max_steps=15)


@pytest.fixture(scope="module", autouse=True)
def one_ray() -> object:
    """One embedded Ray for the module (a vec env uses a running Ray, else starts its own)."""
    ray = init_local_ray(2)
    yield ray
    ray.shutdown()


def _rollout(vec, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    vec.seed(11)
    obs = [vec.reset()]
    rewards, dones, terminal = [], [], []
    for a in actions:
        o, r, d, infos = vec.step(a)
        obs.append(o)
        rewards.append(r)
        dones.append(d)
        terminal += [i["terminal_observation"] for i in infos if "terminal_observation" in i]
    vec.close()
    return np.array(obs), np.array(rewards), np.array(dones), terminal


def test_ray_actors_step_like_sb3s_dummy_vec_env() -> None:
    factories = [_env_factory(TASK, ENV, rank, seed=5) for rank in range(5)]
    ray_vec = RayVecEnv(factories, workers=2)
    dim = ray_vec.action_space.shape[0]
    actions = np.random.default_rng(0).uniform(-1, 1, size=(40, 5, dim)).astype(np.float32)
    assert ray_vec.num_envs == 5
    assert (
        ray_vec.get_attr("spec", indices=[3])[0].id
        == DummyVecEnv(factories[:1]).get_attr("spec")[0].id
    )
    got = _rollout(ray_vec, actions)
    expected = _rollout(DummyVecEnv(factories), actions)
    assert got[2].any()  # episodes ended and were reset inside the window
    for a, b in zip(got[:3], expected[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(got[3]) == len(expected[3])
    for a, b in zip(got[3], expected[3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_ppo_trains_on_ray_workers_into_the_usual_checkpoint(tmp_path: Path) -> None:
    config = RlTrainConfig.model_validate(
        {
            "task": {"kind": "steering"},
            "training": {
                "n_envs": 2,
                "vec": "ray",
                "ray_workers": 2,
                "n_steps": 64,
                "batch_size": 64,
            },
        }
    )
    model, stats = train_sb3(config, ENV, total_steps=128)
    assert model.num_timesteps >= 128 and stats["steps_per_s"] > 0
    task, agent = load_agent(save_sb3(tmp_path / "ppo", model, config.task, "ppo"))
    assert task == config.task and isinstance(agent, Sb3Agent)
    row = np.zeros(4, np.float32)
    assert np.allclose(agent.act(row), model.predict(row, deterministic=True)[0])
