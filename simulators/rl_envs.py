"""Gymnasium environments over the particle twin, speaking the live loop's language.

Each step is one camera frame: the twin (`ParticleTwin`, the very class the
Micro-Manager twin driver hosts) is integrated sub-step by sub-step, the frame's
observation is the exposure-averaged position plus localisation noise, and the
command computed from it lands like a live command: a latency of some sub-steps
into the next frame, plus whole frames of extra feedback delay. The network sees
`codec.encode(Observation)` and its output becomes laser spots through
`codec.decode`, the same methods `policies.rl.policy.RlPolicy` calls live.

Domain randomisation draws D, laser efficiency (heating per mW), localisation
noise, latency and delay per episode, so a policy meets twins it was not trained on.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.contract import LaserSpot, Observation
from policies.rl.codec import (
    GatheringTask,
    SteeringTask,
    SwimmerTask,
    TaskConfig,
    make_codec,
)
from simulators.particles import ParticleTwin, ParticleTwinConfig

Span = tuple[float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Randomization(_Strict):
    """Per-episode draws (uniform in [lo, hi]); equal bounds switch a draw off."""

    diffusion_scale: Span = (1.0, 1.0)
    efficiency: Span = (1.0, 1.0)  # fraction of the nominal heating per mW on the sample
    noise_um: Span = (0.02, 0.02)  # localisation noise (1 sigma per axis)
    delay_frames: tuple[int, int] = (0, 0)  # whole frames of extra feedback delay
    latency_substeps: tuple[int, int] = (1, 1)  # command lands this far into the next frame

    @model_validator(mode="after")
    def _ordered(self) -> Randomization:
        for name in type(self).model_fields:
            lo, hi = getattr(self, name)
            if lo > hi or lo < 0:
                raise ValueError(f"randomize.{name}: need 0 <= lo <= hi, got {(lo, hi)}")
        return self


class TwinEnvConfig(_Strict):
    """The twin and camera timing an env simulates (the live twin's settings)."""

    particles: ParticleTwinConfig = ParticleTwinConfig()
    field_um: Span = (30.0, 30.0)
    exposure_s: float = Field(0.03, gt=0.0, le=10.0)
    readout_s: float = Field(0.001, ge=0.0, le=10.0)
    substeps: int = Field(5, ge=1, le=100)
    max_steps: int = Field(400, ge=1, le=1_000_000)
    target_um: tuple[float, float] | None = None  # None: a new target each episode
    min_start_distance_um: float = Field(3.0, ge=0.0, le=1000.0)
    peclet: float | None = Field(None, gt=0.0, le=10_000.0)  # microswimmer: sets power
    particle_radius_um: float = Field(1.09, gt=0.0, le=100.0)  # Pe = v R / D
    randomize: Randomization = Randomization()


def swim_speed_um_s(particles: ParticleTwinConfig, power_mw: float, offset_um: float) -> float:
    """Thermophoretic speed of a particle `offset_um` from a heating spot (twin's physics)."""
    twin = ParticleTwin(particles.model_copy(update={"n_particles": 1}), (-1e3, 1e3, -1e3, 1e3), 0)
    twin.set_laser((LaserSpot(0.0, 0.0, power_mw),))
    return float(np.hypot(*twin.drift_velocity_um_s(np.array([[offset_um, 0.0]]))[0]))


def power_for_peclet(
    peclet: float, particles: ParticleTwinConfig, offset_um: float, radius_um: float
) -> float:
    """Laser power giving swim speed v = Pe D / R (drift is linear in power)."""
    per_mw = swim_speed_um_s(particles, 1.0, offset_um)
    return peclet * particles.diffusion_um2_s / radius_um / per_mw


def peclet_of(task: SwimmerTask, particles: ParticleTwinConfig, radius_um: float) -> float:
    v = swim_speed_um_s(particles, task.power_mw, task.spot_offset_um)
    return v * radius_um / particles.diffusion_um2_s


class TwinControlEnv(gym.Env):
    """One particle twin, one camera frame per step; subclasses define goal and reward."""

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 30}  # noqa: RUF012
    default_task: type[BaseModel]  # each env's task when none is given

    def __init__(
        self,
        task: dict[str, Any] | TaskConfig | None = None,
        env: dict[str, Any] | TwinEnvConfig | None = None,
        render_mode: str | None = None,
    ) -> None:
        from pydantic import TypeAdapter

        task = task or self.default_task()
        self.task = TypeAdapter(TaskConfig).validate_python(
            task.model_dump() if isinstance(task, BaseModel) else task
        )
        cfg = env if isinstance(env, TwinEnvConfig) else TwinEnvConfig.model_validate(env or {})
        self.config = self._prepare(cfg)
        if isinstance(self.task, SwimmerTask) and self.config.peclet is not None:
            power = power_for_peclet(
                self.config.peclet,
                self.config.particles,
                self.task.spot_offset_um,
                self.config.particle_radius_um,
            )
            self.task = self.task.model_copy(update={"power_mw": power})
        self.codec = make_codec(self.task)
        self.render_mode = render_mode
        n_in = self.codec.n_inputs
        self.observation_space = spaces.Box(-2.0, 2.0, shape=(n_in,), dtype=np.float32)
        self.action_space = self._action_space()
        self._camera = None
        self._traj = np.zeros((self.config.substeps, self.config.particles.n_particles, 2))
        self._twin: ParticleTwin | None = None

    # ------------------------------------------------------------ overridables
    def _prepare(self, cfg: TwinEnvConfig) -> TwinEnvConfig:
        return cfg

    def _action_space(self) -> spaces.Space:
        return spaces.Box(-1.0, 1.0, shape=(self.codec.n_actions,), dtype=np.float32)

    def _draw_target(self) -> np.ndarray:
        if self.config.target_um is not None:
            return np.asarray(self.config.target_um, dtype=float)
        w, h = self.config.field_um
        m = 0.15
        return self.np_random.uniform((m * w, m * h), ((1 - m) * w, (1 - m) * h))

    def _success(self, xy: np.ndarray) -> bool:
        raise NotImplementedError

    def _distance(self, xy: np.ndarray) -> float:
        raise NotImplementedError

    def _reward_scale_um(self) -> float:
        return 1.0

    # ------------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        cfg, rnd, rng = self.config, self.config.randomize, self.np_random
        p = cfg.particles
        self.params = {
            "diffusion_um2_s": p.diffusion_um2_s * rng.uniform(*rnd.diffusion_scale),
            "efficiency": float(rng.uniform(*rnd.efficiency)),
            "noise_um": float(rng.uniform(*rnd.noise_um)),
            "delay_frames": int(rng.integers(rnd.delay_frames[0], rnd.delay_frames[1] + 1)),
            "latency_substeps": int(
                rng.integers(rnd.latency_substeps[0], rnd.latency_substeps[1] + 1)
            ),
        }
        if options:
            self.params.update({k: v for k, v in options.items() if k in self.params})
        twin_cfg = p.model_copy(
            update={
                "diffusion_um2_s": self.params["diffusion_um2_s"],
                "heating_k_per_mw": p.heating_k_per_mw * self.params["efficiency"],
                "initial": "random",
            }
        )
        w, h = cfg.field_um
        self._twin = ParticleTwin(twin_cfg, (0.0, w, 0.0, h), int(rng.integers(2**31)))
        self.target = self._draw_target()
        self._place_start()
        self._pending: deque[tuple[LaserSpot, ...]] = deque()
        self._active: tuple[LaserSpot, ...] = ()
        self._steps = 0
        self._t = 0.0
        self.codec.reset()
        self._traj[:] = self._twin.positions_um[None]
        self._mean_xy = self._twin.positions_um
        self._obs = self._observe()
        self._dist = self._distance(self._mean_xy)
        return self.codec.encode(self._obs), self._info(False)

    def _place_start(self) -> None:
        """Random start away from the goal (redrawn from the twin's own layout)."""
        twin = self._twin
        for _ in range(100):
            xy = twin.positions_um
            if not self._success(xy) and self._distance(xy) >= self.config.min_start_distance_um:
                return
            w, h = self.config.field_um
            twin._xy = self.np_random.uniform((0.0, 0.0), (w, h), size=xy.shape)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        cfg = self.config
        self._pending.append(self.codec.decode(self._obs, action).laser)
        switch = None
        if len(self._pending) > self.params["delay_frames"]:
            switch = min(self.params["latency_substeps"], cfg.substeps)
        h = cfg.exposure_s / cfg.substeps
        twin = self._twin
        for k in range(cfg.substeps):
            if k == switch:
                self._active = self._pending.popleft()
                twin.set_laser(self._active)
            self._traj[k] = twin.step(h)
        if switch is not None and switch >= cfg.substeps:  # lands after this frame
            self._active = self._pending.popleft()
            twin.set_laser(self._active)
        if cfg.readout_s > 0:
            twin.step(cfg.readout_s)
        self._t += cfg.exposure_s + cfg.readout_s
        self._steps += 1
        self._mean_xy = self._traj.mean(axis=0)
        self._obs = self._observe()
        dist = self._distance(self._mean_xy)
        success = self._success(self._mean_xy)
        reward = (self._dist - dist) / self._reward_scale_um() - 0.01 + (1.0 if success else 0.0)
        self._dist = dist
        truncated = self._steps >= cfg.max_steps and not success
        return self.codec.encode(self._obs), float(reward), success, truncated, self._info(success)

    def _observe(self) -> Observation:
        noise = self.np_random.normal(0.0, self.params["noise_um"], self._mean_xy.shape)
        n = len(self._mean_xy)
        return Observation(
            seq=self._steps,
            t_s=self._t,
            detections_um=self._mean_xy + noise,
            target_um=(float(self.target[0]), float(self.target[1])),
            exposure_s=self.config.exposure_s,
            laser=self._active,
            field_um=self.config.field_um,
            track_ids=np.arange(n),
        )

    def _info(self, success: bool) -> dict[str, Any]:
        return {"is_success": success, "steps": self._steps, "t_s": self._t}

    @property
    def observation(self) -> Observation:
        """The last `Observation` (what a live loop would hand the policy)."""
        return self._obs

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        from simulators.camera import CameraConfig, CameraModel

        if self._camera is None:
            w, h = self.config.field_um
            px = 0.1
            cam = CameraConfig(width_px=round(w / px), height_px=round(h / px), pixel_size_um=px)
            self._camera = CameraModel(cam, 0)
        frame = self._camera.render(self._traj, self.config.exposure_s)
        lo, hi = np.percentile(frame, (1.0, 99.9))
        gray = ((frame - lo) / max(hi - lo, 1.0) * 255.0).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)


class MicroswimmerEnv(TwinControlEnv):
    """Muinos-Landin navigation: reach the target's grid cell with 8 steering actions."""

    default_task = SwimmerTask

    def __init__(
        self,
        task: dict[str, Any] | TaskConfig | None = None,
        env: dict[str, Any] | TwinEnvConfig | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(task, env, render_mode)
        assert isinstance(self.task, SwimmerTask)
        w, h = self.config.field_um
        self.cell_um = (w / self.task.grid, h / self.task.grid)

    def _prepare(self, cfg: TwinEnvConfig) -> TwinEnvConfig:
        if cfg.target_um is None:  # default: cell (row 1, col 3) of the grid, as a fixed goal
            w, h = cfg.field_um
            g = self.task.grid
            cfg = cfg.model_copy(update={"target_um": ((g - 1.5) * w / g, 1.5 * h / g)})
        return cfg

    def _action_space(self) -> spaces.Space:
        return spaces.Discrete(self.task.n_directions)

    def _cell(self, xy: np.ndarray) -> tuple[int, int]:
        g = self.task.grid
        return (
            min(max(int(xy[0] / self.cell_um[0]), 0), g - 1),
            min(max(int(xy[1] / self.cell_um[1]), 0), g - 1),
        )

    def _success(self, xy: np.ndarray) -> bool:
        return self._cell(xy[0]) == self._cell(self.target)

    def _distance(self, xy: np.ndarray) -> float:
        """Distance to the goal cell (zero inside): success is entering the cell."""
        col, row = self._cell(self.target)
        lo = np.array([col * self.cell_um[0], row * self.cell_um[1]])
        gap = np.maximum(np.maximum(lo - xy[0], xy[0] - (lo + self.cell_um)), 0.0)
        return float(np.hypot(*gap))

    def _reward_scale_um(self) -> float:
        return self.cell_um[0]


class SteeringEnv(TwinControlEnv):
    """Passive particle to a random target with one heating spot (continuous action)."""

    default_task = SteeringTask

    def _success(self, xy: np.ndarray) -> bool:
        return self._distance(xy) <= self.task.goal_radius_um

    def _distance(self, xy: np.ndarray) -> float:
        return float(np.hypot(*(xy[0] - self.target)))


class GatheringEnv(TwinControlEnv):
    """Several particles into a disc around the target with an SLM spot pattern."""

    default_task = GatheringTask

    def _prepare(self, cfg: TwinEnvConfig) -> TwinEnvConfig:
        n = self.task.n_particles
        return cfg.model_copy(
            update={"particles": cfg.particles.model_copy(update={"n_particles": n})}
        )

    def _excess(self, xy: np.ndarray) -> np.ndarray:
        return np.maximum(np.hypot(*(xy - self.target).T) - self.task.goal_radius_um, 0.0)

    def _success(self, xy: np.ndarray) -> bool:
        return bool(np.all(self._excess(xy) == 0.0))

    def _distance(self, xy: np.ndarray) -> float:
        return float(self._excess(xy).sum())

    def _reward_scale_um(self) -> float:
        return 1.0  # um of summed excess distance removed


ENV_IDS = {
    "microswimmer": "scopeloop/Microswimmer-v0",
    "steering": "scopeloop/Steering-v0",
    "gathering": "scopeloop/Gathering-v0",
}


def register_envs() -> None:
    for entry, env_id in (
        ("MicroswimmerEnv", ENV_IDS["microswimmer"]),
        ("SteeringEnv", ENV_IDS["steering"]),
        ("GatheringEnv", ENV_IDS["gathering"]),
    ):
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=f"simulators.rl_envs:{entry}")


register_envs()


def make_env(task: TaskConfig, env: TwinEnvConfig, render_mode: str | None = None) -> gym.Env:
    """The registered env for a task (through gym.make, so wrappers match training)."""
    return gym.make(ENV_IDS[task.kind], task=task, env=env, render_mode=render_mode)


def steps_to_seconds(steps: float, env: TwinEnvConfig) -> float:
    return steps * (env.exposure_s + env.readout_s)


__all__ = [
    "ENV_IDS",
    "GatheringEnv",
    "MicroswimmerEnv",
    "Randomization",
    "SteeringEnv",
    "TwinControlEnv",
    "TwinEnvConfig",
    "make_env",
    "peclet_of",
    "power_for_peclet",
]
