"""Where is the particle *when the next command acts*? Three answers for the controllers.

A camera frame reports the blur average over the exposure (centred E/2 before its
end), and a command computed from it acts `delay` after the exposure ends. Plain
feedback uses the stale average; the Smith predictor adds what the commands already
sent will move the particle over that gap; the Kalman filter also models the blur
and diffusion so it weighs each new frame against the prediction (and averages down
localisation noise). Commands are piecewise constant drifts, kept in a short history.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


class CommandHistory:
    """Drift commands (um/s) as they act on the sample: each from its start time until the next."""

    def __init__(self, keep: int = 256) -> None:
        self._items: deque[tuple[float, np.ndarray]] = deque(maxlen=keep)

    def clear(self) -> None:
        self._items.clear()

    def add(self, t_start: float, velocity: np.ndarray) -> None:
        while self._items and self._items[-1][0] >= t_start:
            self._items.pop()  # a newer decision replaces one not yet acting
        self._items.append((float(t_start), np.asarray(velocity, float).copy()))

    def integral(self, t0: float, t1: float) -> np.ndarray:
        """Displacement the commands cause over [t0, t1] (zero before the first command)."""
        out = np.zeros(2)
        if t1 <= t0:
            return out
        items = list(self._items)
        for i, (start, v) in enumerate(items):
            end = items[i + 1][0] if i + 1 < len(items) else math.inf
            span = min(end, t1) - max(start, t0)
            if span > 0:
                out += v * span
        return out

    def weighted_blur(self, t_end: float, exposure: float) -> np.ndarray:
        """(1/E) int_{t_end-E}^{t_end} (s - t_end + E) u(s) ds: the commands' share of
        x(t_end) - blur average."""
        out = np.zeros(2)
        t0 = t_end - exposure
        items = list(self._items)
        for i, (start, v) in enumerate(items):
            end = items[i + 1][0] if i + 1 < len(items) else math.inf
            lo, hi = max(start, t0), min(end, t_end)
            if hi > lo:
                out += v * ((hi - t0) ** 2 - (lo - t0) ** 2) / (2.0 * exposure)
        return out


class DirectEstimate:
    """No compensation: the last blur average is taken as the position now."""

    def __init__(self, history: CommandHistory) -> None:
        self.history = history
        self._y: np.ndarray | None = None

    def reset(self) -> None:
        self._y = None

    def update(self, y: np.ndarray, t_end: float, exposure: float) -> None:
        self._y = np.asarray(y, float)

    def predict(self, t: float) -> np.ndarray:
        assert self._y is not None
        return self._y.copy()


class SmithPredictor(DirectEstimate):
    """Last blur average propagated from the blur centre to `t` with the commands sent."""

    def update(self, y: np.ndarray, t_end: float, exposure: float) -> None:
        self._y = np.asarray(y, float)
        self._t_ref = t_end - exposure / 2.0

    def predict(self, t: float) -> np.ndarray:
        assert self._y is not None
        return self._y + self.history.integral(self._t_ref, t)


class BlurKalman:
    """Scalar-per-axis Kalman filter for x(t) under known drift commands, observed through
    the exposure average plus localisation noise.

    With b the blur part of the Brownian increment, y = x_end - B_u - b + nu where
    B_u = history.weighted_blur; Var b = 2DE/3 and Cov(b, increment) = DE, so the
    innovation variance is P- - 4DE/3 + s^2 and Cov(x_end, innovation) = P- - DE.
    """

    def __init__(self, history: CommandHistory, diffusion_um2_s: float, noise_um: float) -> None:
        self.history = history
        self.d = diffusion_um2_s
        self.noise2 = noise_um**2
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._p = 0.0
        self._t = 0.0

    @property
    def variance_um2(self) -> float:
        """Posterior variance per axis at the last frame's end of exposure."""
        return self._p

    def update(self, y: np.ndarray, t_end: float, exposure: float) -> None:
        y = np.asarray(y, float)
        blur = self.history.weighted_blur(t_end, exposure)
        if self._x is None:
            # Diffuse prior: only the blur spread and noise remain about x_end.
            self._x = y + blur
            self._p = 2.0 * self.d * exposure / 3.0 + self.noise2
            self._t = t_end
            return
        dt = max(t_end - self._t, 0.0)
        e = min(exposure, dt) if dt > 0 else 0.0
        x_prior = self._x + self.history.integral(self._t, t_end)
        p_prior = self._p + 2.0 * self.d * dt
        s = p_prior - 4.0 * self.d * e / 3.0 + self.noise2
        c = p_prior - self.d * e
        gain = c / s if s > 1e-300 else 1.0
        self._x = x_prior + gain * (y + blur - x_prior)
        self._p = max(p_prior - gain * c, 0.0)
        self._t = t_end

    def predict(self, t: float) -> np.ndarray:
        assert self._x is not None
        return self._x + self.history.integral(self._t, t)
