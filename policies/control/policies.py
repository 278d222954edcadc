"""Feedback-control policies: PID / predictive / Kalman traps, virtual potentials, path
steering and multi-spot holding. All share one per-particle channel (estimate where the
particle will be when the command acts, then a control law) and one actuator.

Times: a command decided on the frame whose exposure ended at t acts from
t + loop.delay_s; the channel records the drift each command really gives so the
predictors can integrate it. Time-dependent references use seconds since the first
frame after `reset()`.
"""

from __future__ import annotations

import numpy as np

from policies.contract import KB_FN_UM_PER_K, Action, Observation
from policies.control.actuation import Actuator
from policies.control.config import (
    Estimator,
    KalmanTrapConfig,
    MultiTrapConfig,
    PathConfig,
    PidGains,
    PidTrapConfig,
    PredictiveTrapConfig,
    VirtualPotentialConfig,
    _ControlBase,
)
from policies.control.estimation import BlurKalman, CommandHistory, DirectEstimate, SmithPredictor
from policies.control.paths import Curve, Polyline
from policies.control.select import MultiFollower

_MIN_EXPOSURE_S = 1e-6


class Channel:
    """One controlled particle: command history, estimator and PID memory."""

    def __init__(self, config: _ControlBase, estimator: Estimator) -> None:
        self.config = config
        self.history = CommandHistory()
        if estimator == "kalman":
            self.estimator: DirectEstimate | BlurKalman = BlurKalman(
                self.history,
                config.particle.diffusion_um2_s,
                config.loop.localization_noise_um,
            )
        elif estimator == "predictor":
            self.estimator = SmithPredictor(self.history)
        else:
            self.estimator = DirectEstimate(self.history)
        self.reset()

    def reset(self) -> None:
        self.history.clear()
        self.estimator.reset()
        self._integral = np.zeros(2)
        self._last_error: np.ndarray | None = None
        self._last_t: float | None = None

    def estimate(self, y: np.ndarray, obs: Observation) -> tuple[np.ndarray, float]:
        """(position expected when this frame's command acts, that time)."""
        exposure = self.config.loop.exposure_s or max(obs.exposure_s, _MIN_EXPOSURE_S)
        self.estimator.update(y, obs.t_s, exposure)
        t_apply = obs.t_s + self.config.loop.delay_s
        return self.estimator.predict(t_apply), t_apply

    def pid(self, error: np.ndarray, t: float, gains: PidGains) -> np.ndarray:
        dt = 0.0 if self._last_t is None else max(t - self._last_t, 0.0)
        out = gains.gain_per_s * error
        if gains.integral_gain_per_s2 > 0.0:
            self._integral += error * dt
            cap = gains.integral_limit_um_s / gains.integral_gain_per_s2
            self._integral = np.clip(self._integral, -cap, cap)
            out = out + gains.integral_gain_per_s2 * self._integral
        if gains.derivative_gain > 0.0 and self._last_error is not None and dt > 0.0:
            out = out + gains.derivative_gain * (error - self._last_error) / dt
        self._last_error, self._last_t = error.copy(), t
        return -out

    def commit(self, t_apply: float, realised: np.ndarray) -> None:
        self.history.add(t_apply, realised)


class _Controller:
    """Shared plumbing: particle selection, channels, actuation, info."""

    estimator: Estimator = "none"

    def __init__(self, config: _ControlBase, targets_rel: np.ndarray, absolute: bool = False):
        self.config = config
        self.targets_rel = np.asarray(targets_rel, float).reshape(-1, 2)
        self.absolute = absolute
        spot_cap = getattr(config, "max_power_per_spot_mw", None)
        self.actuator = Actuator(config, spot_cap)
        self.follower = MultiFollower(len(self.targets_rel), config.track_radius_um)
        self.channels = [Channel(config, self.estimator) for _ in self.targets_rel]
        self.kt = KB_FN_UM_PER_K * config.particle.temperature_k
        self.reset()

    def reset(self) -> None:
        self.follower.reset()
        for ch in self.channels:
            ch.reset()
        self._t0: float | None = None

    def targets(self, obs: Observation) -> np.ndarray:
        if self.absolute:
            return self.targets_rel
        return self.targets_rel + np.asarray(obs.target_um, float)

    def law(self, k: int, x_hat: np.ndarray, t_apply: float, obs: Observation) -> np.ndarray:
        raise NotImplementedError

    def act(self, obs: Observation) -> Action:
        if self._t0 is None:
            self._t0 = obs.t_s
        targets = self.targets(obs)
        detections = np.asarray(obs.detections_um, float).reshape(-1, 2)
        before = list(self.follower.ids)
        index = self.follower.assign(detections, obs.track_ids, targets)
        t_apply = obs.t_s + self.config.loop.delay_s
        positions, wanted, live = [], [], []
        info: dict[str, float] = {"tracked": float(sum(i is not None for i in index))}
        errors = []
        for k, idx in enumerate(index):
            ch = self.channels[k]
            if idx is None:
                ch.reset()
                continue
            if before[k] is not None and self.follower.ids[k] != before[k]:
                ch.reset()  # a different particle: the old history says nothing about it
            x_hat, t_apply = ch.estimate(detections[idx], obs)
            positions.append(x_hat)
            wanted.append(self.law(k, x_hat, t_apply, obs))
            live.append(k)
            errors.append(float(np.hypot(*(detections[idx] - self._setpoint(k, targets)))))
        if not live:
            return Action(laser=(), info=info)
        spots, realised = self.actuator.spots_for(np.array(positions), np.array(wanted))
        for j, k in enumerate(live):
            self.channels[k].commit(t_apply, realised[j])
        first = positions[0]
        info.update(
            x_um=float(first[0]),
            y_um=float(first[1]),
            error_um=float(np.sqrt(np.mean(np.square(errors)))),
            power_mw=float(sum(s.power_mw for s in spots)),
        )
        return Action(laser=spots, info=info)

    def _setpoint(self, k: int, targets: np.ndarray) -> np.ndarray:
        return targets[k]

    def elapsed(self, t: float) -> float:
        return t - (self._t0 if self._t0 is not None else t)


class PidTrap(_Controller):
    """Hold one particle at the target; the estimator is set by the config kind."""

    def __init__(self, config: PidTrapConfig | PredictiveTrapConfig | KalmanTrapConfig) -> None:
        self.estimator = {"pid": "none", "predictive": "predictor", "kalman": "kalman"}[config.kind]
        self.gains: PidGains = config
        super().__init__(config, np.zeros((1, 2)))

    def law(self, k: int, x_hat: np.ndarray, t_apply: float, obs: Observation) -> np.ndarray:
        return self.channels[k].pid(x_hat - self.targets(obs)[k], t_apply, self.gains)


class VirtualPotentialTrap(_Controller):
    """Drift -D grad(U/kT) at the predicted position: the particle feels U (Jun & Bechhoefer)."""

    def __init__(self, config: VirtualPotentialConfig) -> None:
        self.estimator = config.estimator
        self.potential = config.potential
        centre = config.center_um
        super().__init__(
            config, np.zeros((1, 2)) if centre is None else [centre], centre is not None
        )

    def law(self, k: int, x_hat: np.ndarray, t_apply: float, obs: Observation) -> np.ndarray:
        rel = x_hat - self.targets(obs)[0]
        grad = self.potential.gradient_kt(rel[0], rel[1], self.elapsed(t_apply), self.kt)
        return -self.config.particle.diffusion_um2_s * np.asarray(grad, float).reshape(2)


class PathSteering(_Controller):
    """Follow a reference r(t) relative to the target: feedforward r'(t) plus PID on x - r."""

    def __init__(self, config: PathConfig) -> None:
        self.estimator = config.estimator
        self.path_config = config
        if config.curve is not None:
            self.reference: Polyline | Curve = Curve(config.curve, config.speed_um_s)
        else:
            assert config.waypoints_um is not None
            self.reference = Polyline(config.waypoints_um, config.speed_um_s, config.repeat)
        super().__init__(config, np.zeros((1, 2)))

    def reference_at(self, t_abs: float, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        """Reference position (field frame) and velocity at absolute time `t_abs`."""
        pos, vel = self.reference.at(self.elapsed(t_abs) - self.path_config.start_delay_s)
        return pos + np.asarray(obs.target_um, float), vel

    def law(self, k: int, x_hat: np.ndarray, t_apply: float, obs: Observation) -> np.ndarray:
        ref, vel = self.reference_at(t_apply, obs)
        v = self.channels[k].pid(x_hat - ref, t_apply, self.path_config)
        return v + vel if self.path_config.feedforward else v

    def _setpoint(self, k: int, targets: np.ndarray) -> np.ndarray:
        return self._last_ref if hasattr(self, "_last_ref") else targets[k]

    def act(self, obs: Observation) -> Action:
        if self._t0 is None:
            self._t0 = obs.t_s
        self._last_ref, _ = self.reference_at(obs.t_s, obs)  # error vs where it should be now
        action = super().act(obs)
        action.info.update(ref_x_um=float(self._last_ref[0]), ref_y_um=float(self._last_ref[1]))
        return action


class MultiTrap(_Controller):
    """One channel and one spot (heating: up to three) per target; SLM drivers show them all."""

    def __init__(self, config: MultiTrapConfig) -> None:
        self.estimator = config.estimator
        self.gains = config
        if config.ring is not None:
            n, radius = config.ring
            ang = 2.0 * np.pi * np.arange(int(n)) / int(n)
            targets = np.column_stack((radius * np.cos(ang), radius * np.sin(ang)))
        else:
            targets = np.asarray(config.targets_um, float)
        super().__init__(config, targets, config.absolute)

    def law(self, k: int, x_hat: np.ndarray, t_apply: float, obs: Observation) -> np.ndarray:
        return self.channels[k].pid(x_hat - self.targets(obs)[k], t_apply, self.gains)


def make_control_policy(config: _ControlBase) -> _Controller:
    """The policy object for any of this package's configs."""
    if isinstance(config, PidTrapConfig | PredictiveTrapConfig | KalmanTrapConfig):
        return PidTrap(config)
    if isinstance(config, VirtualPotentialConfig):
        return VirtualPotentialTrap(config)
    if isinstance(config, PathConfig):
        return PathSteering(config)
    if isinstance(config, MultiTrapConfig):
        return MultiTrap(config)
    raise TypeError(f"not a control config: {type(config).__name__}")
