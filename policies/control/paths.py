"""Reference trajectories for steering: a polyline at constant speed or a parametric curve.

Why position *and* velocity: the steering controller feeds the path's own velocity
forward, so feedback only has to correct the diffusion, not chase a moving setpoint.
Points are relative to the experiment's target; time counts from the first frame.
"""

from __future__ import annotations

import math

import numpy as np

from policies.control.config import CurveSpec


class Polyline:
    """Waypoints visited at `speed`; with `repeat` the polygon is closed and looped."""

    def __init__(self, points: list[tuple[float, float]], speed: float, repeat: bool) -> None:
        pts = np.asarray(points, float)
        if repeat and np.any(pts[0] != pts[-1]):
            pts = np.vstack([pts, pts[:1]])
        seg = np.diff(pts, axis=0)
        self.lengths = np.hypot(seg[:, 0], seg[:, 1])
        keep = self.lengths > 0
        self.pts, self.seg, self.lengths = pts, seg[keep], self.lengths[keep]
        self.starts = np.concatenate([[0.0], np.cumsum(self.lengths)])
        self.pts = np.vstack([pts[:1], pts[1:][keep]])
        self.total = float(self.starts[-1])
        self.speed, self.repeat = speed, repeat

    def at(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        if self.total == 0.0:
            return self.pts[0].copy(), np.zeros(2)
        s = max(t, 0.0) * self.speed
        if self.repeat:
            s %= self.total
        elif s >= self.total:
            return self.pts[-1].copy(), np.zeros(2)
        i = min(int(np.searchsorted(self.starts, s, side="right")) - 1, len(self.lengths) - 1)
        unit = self.seg[i] / self.lengths[i]
        moving = t >= 0.0
        return self.pts[i] + unit * (s - self.starts[i]), unit * self.speed * moving


class Curve:
    """Ellipse or Lissajous figure traced with mean speed ~`speed` (exact for a circle)."""

    def __init__(self, spec: CurveSpec, speed: float) -> None:
        self.spec = spec
        ax, ay = spec.radius_um
        fx, fy = spec.frequency_ratio if spec.shape == "lissajous" else (1.0, 1.0)
        # Mean speed of x = ax sin(fx w t + phase), y = ay cos(fy w t) over a period.
        tt = np.linspace(0.0, 2.0 * math.pi, 2049)[:-1]
        mean = float(np.mean(np.hypot(ax * fx * np.cos(fx * tt), ay * fy * np.sin(fy * tt))))
        self.omega = speed / mean if mean > 0 else 0.0
        self.f = (fx, fy)

    def at(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        ax, ay = self.spec.radius_um
        fx, fy = self.f
        w, ph = self.omega, self.spec.phase_rad
        t = max(t, 0.0)
        moving = float(t > 0.0)
        pos = np.array([ax * math.sin(fx * w * t + ph), ay * math.cos(fy * w * t)])
        vel = np.array(
            [ax * fx * w * math.cos(fx * w * t + ph), -ay * fy * w * math.sin(fy * w * t)]
        )
        return pos, vel * moving
