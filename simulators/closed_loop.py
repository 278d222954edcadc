"""A synchronous closed loop: twin physics, camera blur, loop delay, any Policy.

Why: the live loop runs on the wall clock over ZeroMQ, which is too slow and too
noisy to sweep delays and gains. This harness feeds the *same* policy objects
(Observation in, Action out) from `simulators.particles.ParticleTwin` with exactly
known timing: frames every `period_s`, each reporting the blur average of the last
`exposure_s` (trapezoid over substeps) plus Gaussian localisation noise, and each
action acting `delay_s` after its exposure ended. Identities are perfect (track_ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.contract import Action, LaserSpot, Observation, Policy
from simulators.particles import ParticleTwin, ParticleTwinConfig


@dataclass(frozen=True)
class LoopSimConfig:
    period_s: float = 0.03
    exposure_s: float = 0.03
    delay_s: float = 0.0
    noise_um: float = 0.0
    substep_s: float = 0.002
    box_um: tuple[float, float, float, float] = (-500.0, 500.0, -500.0, 500.0)
    target_um: tuple[float, float] = (0.0, 0.0)


@dataclass
class LoopSimResult:
    t_s: np.ndarray  # (F,) end of each exposure
    truth_um: np.ndarray  # (F, N, 2) true positions at the end of each exposure
    measured_um: np.ndarray  # (F, N, 2) what the policy saw
    power_mw: np.ndarray  # (F,) total power commanded on each frame
    config: LoopSimConfig


class LoopSim:
    """Drive `policy` for `n_frames` frames on a fresh twin with the given seed."""

    def __init__(self, twin: ParticleTwinConfig, config: LoopSimConfig, seed: int = 0) -> None:
        if not 0.0 < config.exposure_s <= config.period_s:
            raise ValueError("need 0 < exposure_s <= period_s")
        self.config = config
        self.twin = ParticleTwin(twin, config.box_um, seed)
        self.k = max(1, math.ceil(config.period_s / config.substep_s - 1e-9))
        self.h = config.period_s / self.k
        self.n_exp = max(1, round(config.exposure_s / self.h))
        self.n_delay = round(config.delay_s / self.h)
        self._rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3])

    @property
    def effective(self) -> tuple[float, float]:
        """(exposure, delay) as simulated, rounded to whole substeps."""
        return self.n_exp * self.h, self.n_delay * self.h

    def place(self, positions: np.ndarray) -> None:
        """Start the particles at `positions` (N, 2) instead of the twin's own layout."""
        self.twin._xy = np.asarray(positions, float).reshape(self.twin._xy.shape).copy()

    def run(self, policy: Policy, n_frames: int) -> LoopSimResult:
        cfg, twin, k = self.config, self.twin, self.k
        n = twin.config.n_particles
        policy.reset()
        pending: list[tuple[int, tuple[LaserSpot, ...]]] = []
        times = np.empty(n_frames)
        truth = np.empty((n_frames, n, 2))
        measured = np.empty((n_frames, n, 2))
        power = np.zeros(n_frames)
        ids = np.arange(n)
        exposure_s = self.n_exp * self.h
        step = 0
        for f in range(n_frames):
            blur = np.zeros((n, 2))
            for j in range(k):
                while pending and pending[0][0] <= step:
                    twin.set_laser(pending.pop(0)[1])
                in_exposure = j >= k - self.n_exp
                if in_exposure and j == k - self.n_exp:
                    blur += 0.5 * twin._xy
                twin.step(self.h)
                step += 1
                if in_exposure:
                    blur += twin._xy if j < k - 1 else 0.5 * twin._xy
            t_end = step * self.h
            seen = blur / self.n_exp
            if cfg.noise_um > 0:
                seen = seen + self._rng.normal(0.0, cfg.noise_um, seen.shape)
            obs = Observation(
                seq=f,
                t_s=t_end,
                detections_um=seen,
                target_um=cfg.target_um,
                exposure_s=exposure_s,
                field_um=(cfg.box_um[1] - cfg.box_um[0], cfg.box_um[3] - cfg.box_um[2]),
                track_ids=ids,
                laser=twin.laser,
            )
            action: Action = policy.act(obs)
            pending.append((step + self.n_delay, action.laser))
            pending.sort(key=lambda item: item[0])
            times[f], truth[f], measured[f] = t_end, twin._xy, seen
            power[f] = sum(s.power_mw for s in action.laser)
        return LoopSimResult(times, truth, measured, power, cfg)
