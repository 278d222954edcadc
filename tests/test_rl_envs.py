"""RL envs over the particle twin: gym API, one obs/action code path with the live policy,
physics of the steering actions, delay and domain randomisation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from policies.contract import Observation
from policies.rl.agents import save_qtable
from policies.rl.codec import GatheringCodec, GatheringTask, SteeringTask, SwimmerTask
from policies.rl.policy import RlPolicy, RlPolicyConfig
from simulators.particles import ParticleTwinConfig
from simulators.rl_envs import (
    ENV_IDS,
    GatheringEnv,
    MicroswimmerEnv,
    Randomization,
    SteeringEnv,
    TwinEnvConfig,
    peclet_of,
)

SWIMMER = ParticleTwinConfig(diffusion_um2_s=0.23, heating_width_um=1.09)


def swimmer_env(**env: object) -> MicroswimmerEnv:
    return MicroswimmerEnv(env={"particles": SWIMMER.model_dump(), "peclet": 80, **env})


@pytest.mark.parametrize("cls", [MicroswimmerEnv, SteeringEnv, GatheringEnv])
def test_envs_pass_gymnasium_check(cls: type) -> None:
    env = cls(env={"max_steps": 50})
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)


def test_envs_are_registered_and_render() -> None:
    for env_id in ENV_IDS.values():
        env = gym.make(env_id, render_mode="rgb_array", env={"field_um": (12.8, 12.8)})
        env.reset(seed=0)
        env.step(env.action_space.sample())
        frame = env.render()
        assert frame.dtype == np.uint8 and frame.shape == (128, 128, 3)
        assert frame.max() > frame.min()  # the particle is in the picture
        env.close()


def test_peclet_sets_the_laser_power() -> None:
    low, high = swimmer_env(peclet=53), swimmer_env(peclet=135)
    assert high.task.power_mw == pytest.approx(low.task.power_mw * 135 / 53)
    assert peclet_of(high.task, SWIMMER, 1.09) == pytest.approx(135.0)


@pytest.mark.parametrize("action", [0, 2, 5])
def test_steering_action_moves_the_swimmer_that_way(action: int) -> None:
    env = swimmer_env(target_um=(27.0, 27.0), max_steps=1000, min_start_distance_um=0.0)
    env.reset(seed=3)
    env.unwrapped._twin._xy[:] = (15.0, 15.0)
    env.codec.reset()
    env._mean_xy = env._twin.positions_um
    env._obs = env._observe()
    env.codec.encode(env._obs)
    for _ in range(10):
        env.step(action)
    moved = env._mean_xy[0] - 15.0
    direction = env.codec.directions[action]
    assert moved @ direction > 3.0  # ~16 um/s nominal at Pe 80, 0.3 s
    assert abs(moved @ np.array([-direction[1], direction[0]])) < 0.5 * (moved @ direction)


def test_feedback_delay_holds_the_old_command() -> None:
    env = swimmer_env(randomize={"delay_frames": (2, 2)})
    env.reset(seed=0)
    env.step(0)
    env.step(0)
    assert env._twin.laser == ()  # two frames of delay: still dark
    env.step(0)
    assert len(env._twin.laser) == 1


def test_domain_randomisation_draws_within_ranges() -> None:
    rnd = Randomization(diffusion_scale=(0.5, 1.5), efficiency=(0.8, 1.2), delay_frames=(0, 2))
    env = swimmer_env(randomize=rnd.model_dump())
    draws = []
    for seed in range(30):
        env.reset(seed=seed)
        draws.append(env.params)
        assert env._twin.config.diffusion_um2_s == pytest.approx(env.params["diffusion_um2_s"])
    d = np.array([p["diffusion_um2_s"] for p in draws])
    eff = np.array([p["efficiency"] for p in draws])
    assert 0.5 * 0.23 <= d.min() < d.max() <= 1.5 * 0.23 and d.std() > 0.02
    assert 0.8 <= eff.min() < eff.max() <= 1.2
    assert {p["delay_frames"] for p in draws} == {0, 1, 2}
    with pytest.raises(ValueError, match=r"randomize\.noise_um"):
        Randomization(noise_um=(0.1, 0.0))


def test_env_and_live_policy_share_one_code_path(tmp_path) -> None:
    env = swimmer_env()
    rng = np.random.default_rng(0)
    q = rng.normal(size=(25, 8))
    ckpt = save_qtable(tmp_path / "q.npz", q, env.task, max_hold=20)
    policy = RlPolicy(RlPolicyConfig(checkpoint=str(ckpt), task="microswimmer"))
    # The same function objects, not copies.
    assert type(policy.codec) is type(env.codec)
    assert policy.codec.encode.__func__ is env.codec.encode.__func__
    assert policy.codec.decode.__func__ is env.codec.decode.__func__
    # Fed the env's own Observations, the live policy asks for the spots the env applies.
    x, _ = env.reset(seed=4)
    policy.reset()
    for _ in range(15):
        obs: Observation = env.observation
        action = policy.act(obs)
        assert np.allclose(policy.codec.encode(obs), x)
        k = int(np.argmax(q[env.codec.grid_state(x)]))
        expected = env.codec.decode(obs, k)
        assert action.laser == expected.laser
        x, *_ = env.step(k)


def test_steering_policy_pushes_toward_the_target() -> None:
    """The shipped PPO checkpoint puts the heating spot behind the particle."""
    policy = RlPolicy(RlPolicyConfig(checkpoint="policies/rl/checkpoints/steering-ppo.zip"))
    assert isinstance(policy.task, SteeringTask)
    policy.reset()
    for p, target in (((4.0, 5.0), (12.8, 12.8)), ((20.0, 8.0), (6.0, 18.0))):
        obs = Observation(
            seq=0,
            t_s=0.0,
            detections_um=np.array([p]),
            target_um=target,
            exposure_s=0.03,
            field_um=(25.6, 25.6),
        )
        policy.reset()
        (spot,) = policy.act(obs).laser
        behind = np.subtract((spot.x_um, spot.y_um), p)
        assert behind @ np.subtract(target, p) < 0  # far side: the particle is pushed on
        assert spot.power_mw > 1.0


def test_swimmer_task_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="grid"):
        SwimmerTask(grid=1)
    with pytest.raises(ValueError, match="exposure_s"):
        TwinEnvConfig(exposure_s=0.0)


def _gathering_obs(detections: np.ndarray, track_ids: np.ndarray | None = None) -> Observation:
    return Observation(
        seq=0,
        t_s=0.0,
        detections_um=detections,
        target_um=(12.8, 12.8),
        exposure_s=0.03,
        field_um=(25.6, 25.6),
        track_ids=track_ids,
    )


def test_gathering_codec_slots_do_not_depend_on_detection_order() -> None:
    """Slot k is the k-th nearest particle whatever order detections arrive in, and the
    action of slot k lands behind that same particle (not whichever came k-th)."""
    codec = GatheringCodec(GatheringTask(n_particles=4, spot_offset_um=2.0))
    det = np.array([[20.0, 12.8], [12.8, 4.0], [14.0, 13.0], [3.0, 3.0]])
    x = codec.encode(_gathering_obs(det))
    rows = x.reshape(4, GatheringCodec.width)
    assert np.all(np.diff(np.hypot(rows[:, 0], rows[:, 1])) > 0)  # nearest first
    assert rows[0, 2] < 0 < rows[1, 2]  # inside / outside the 4 um goal disc
    perm = np.array([3, 0, 2, 1])
    obs = _gathering_obs(det[perm], track_ids=np.arange(4)[perm])
    assert np.array_equal(codec.encode(obs), x)
    # Push inward at full power from every slot but the nearest (switched off).
    action = np.tile([1.0, 0.0, 1.0], 4)
    action[2] = -1.0
    spots = codec.decode(obs, action).laser
    assert len(spots) == 3
    for spot, p in zip(spots, det[[0, 1, 3]], strict=True):  # slots 1-3, nearest first
        behind = np.subtract((spot.x_um, spot.y_um), p)
        assert np.hypot(*behind) == pytest.approx(2.0)
        assert behind @ np.subtract((12.8, 12.8), p) < 0  # the far side: pushed inward


def test_gathering_action_frame_turns_with_the_particle() -> None:
    """The same slot action pushes every particle the same way relative to the target:
    'sideways' is perpendicular to the bearing, whichever side of the target it is on."""
    codec = GatheringCodec(GatheringTask(n_particles=2, spot_offset_um=1.0))
    det = np.array([[20.0, 12.8], [12.8, 22.0]])
    codec.encode(_gathering_obs(det))
    laser = codec.decode(_gathering_obs(det), [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]).laser
    for spot, p in zip(laser, det, strict=True):
        push = p - np.array([spot.x_um, spot.y_um])
        assert push @ (np.array([12.8, 12.8]) - p) == pytest.approx(0.0, abs=1e-9)


def test_gated_push_heuristic_gathers_on_the_twin() -> None:
    """The baseline the bench compares PPO against gathers all four particles; without
    the gate (every spot always on) the spots' heat keeps the disc from filling up."""
    from benchmarks.rl import PushHeuristic
    from policies.rl.rollout import evaluate

    env = GatheringEnv(
        task=GatheringTask(spot_offset_um=2.12),
        env={
            "field_um": (25.6, 25.6),
            "target_um": (12.8, 12.8),
            "max_steps": 500,
            "particles": {"heating_width_um": 3.0},
        },
    )
    gated = evaluate(env, PushHeuristic(gated=True), 4, seed=50_000)
    full = evaluate(env, PushHeuristic(gated=False), 4, seed=50_000)
    assert gated.success_rate == 1.0 and gated.median_steps_to_goal() < 400
    assert full.success_rate <= 0.25


def test_straight_line_bound_is_never_beaten_on_the_same_episodes() -> None:
    """The bench's bound on steps to goal: no agent reaches the goal cell faster than the
    swimmer driven straight at its twin's top speed without noise, episode by episode."""
    from agent.training.rl import load_train_config, make_env
    from benchmarks.rl import CONFIGS, _BearingOracle, straight_line_frames
    from policies.rl.rollout import evaluate

    config, _env_cfg, held_cfg = load_train_config(CONFIGS / "rl-microswimmer.yaml", [])
    held = make_env(config.task, held_cfg)
    bound = straight_line_frames(held, 6, seed=50_000)
    oracle = evaluate(held, _BearingOracle(held.unwrapped), 6, seed=50_000)
    held.close()
    assert all(b >= 1 for b in bound)
    for frames, steps, ok in zip(bound, oracle.steps, oracle.success, strict=True):
        assert ok and steps >= frames - 1  # within a frame of noise luck
    assert sum(oracle.steps) > sum(bound)
