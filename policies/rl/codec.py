"""Observation -> network input and network output -> Action: the one RL code path.

The gym envs (simulators/rl_envs.py) and the live `RlPolicy` build the same
`Observation` and call these same codec methods, so a trained network meets exactly
the inputs it was trained on and its outputs become the same laser spots.

Three tasks:
- microswimmer (Muinos-Landin et al. 2021): a self-thermophoretic swimmer is pushed
  away from a laser spot placed on its rim; 8 steering actions pick the direction,
  the power (hence the Peclet number) is fixed. Input: position relative to the target
  and in the field; a 5 x 5 grid state for the Q-table is derived from the same input.
- steering: a passive particle pushed by a heating spot; continuous action (push
  direction, power).
- gathering: several particles, one spot each (SLM pattern), pushed into a region;
  each particle's action is in its own frame toward the target.

A codec keeps only what a policy may know (which detection it follows, the last
action); it never sees ground truth.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.contract import Action, LaserSpot, Observation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SwimmerTask(_Strict):
    """Muinos-Landin navigation: 8 directions on a grid; target cell holds the target."""

    kind: Literal["microswimmer"] = "microswimmer"
    grid: int = Field(5, ge=2, le=50)
    n_directions: int = Field(8, ge=2, le=64)
    power_mw: float = Field(3.6, gt=0.0, le=1000.0)  # sets the swim speed (Peclet number)
    spot_offset_um: float = Field(0.77, gt=0.0, le=100.0)  # laser on the rim, behind
    track_radius_um: float = Field(3.0, gt=0.0, le=1000.0)


class SteeringTask(_Strict):
    """Passive particle to a point: action = (push x, push y, power) in [-1, 1]."""

    kind: Literal["steering"] = "steering"
    max_power_mw: float = Field(2.0, gt=0.0, le=1000.0)
    spot_offset_um: float = Field(5.13, gt=0.0, le=100.0)  # steepest slope: width / sqrt 2
    goal_radius_um: float = Field(1.0, gt=0.0, le=100.0)
    track_radius_um: float = Field(3.0, gt=0.0, le=1000.0)


class GatheringTask(_Strict):
    """N particles into a disc around the target; one spot per particle (SLM)."""

    kind: Literal["gathering"] = "gathering"
    n_particles: int = Field(4, ge=1, le=32)
    max_power_mw: float = Field(1.0, gt=0.0, le=1000.0)
    spot_offset_um: float = Field(5.13, gt=0.0, le=100.0)
    goal_radius_um: float = Field(4.0, gt=0.0, le=1000.0)


TaskConfig = Annotated[SwimmerTask | SteeringTask | GatheringTask, Field(discriminator="kind")]


def _unit(v: np.ndarray) -> tuple[np.ndarray, float]:
    n = float(np.hypot(v[0], v[1]))
    return (v / n if n > 1e-9 else np.zeros(2)), n


class _FollowOne:
    """Which detection is 'the' particle: same track id, else nearest the last fix,
    else nearest the target (what a feedback trap does)."""

    def __init__(self, radius_um: float) -> None:
        self.radius_um = radius_um
        self.reset()

    def reset(self) -> None:
        self.last: np.ndarray | None = None
        self.track_id: int | None = None

    def pick(self, obs: Observation) -> np.ndarray | None:
        det = np.asarray(obs.detections_um, dtype=float).reshape(-1, 2)
        if len(det) == 0:
            return self.last  # hold the last fix through a missed detection
        target = np.asarray(obs.target_um, dtype=float)
        best: int | None = None
        if obs.track_ids is not None and self.track_id is not None:
            same = np.flatnonzero(np.asarray(obs.track_ids) == self.track_id)
            best = int(same[0]) if len(same) else None
        if best is None:
            ref = self.last if self.last is not None else target
            dist = np.hypot(*(det - ref).T)
            best = int(np.argmin(dist))
            if self.last is not None and dist[best] > self.radius_um:
                best = int(np.argmin(np.hypot(*(det - target).T)))
        if obs.track_ids is not None:
            self.track_id = int(np.asarray(obs.track_ids)[best])
        self.last = det[best].copy()
        return self.last


class SwimmerCodec:
    """Input: [dx, dy] to target / half field, [x, y] in field -> [-1, 1]; action: int."""

    n_inputs = 4

    def __init__(self, task: SwimmerTask) -> None:
        self.task = task
        self.follow = _FollowOne(task.track_radius_um)
        angles = 2.0 * math.pi * np.arange(task.n_directions) / task.n_directions
        self.directions = np.column_stack((np.cos(angles), np.sin(angles)))

    def reset(self) -> None:
        self.follow.reset()

    def encode(self, obs: Observation) -> np.ndarray:
        p = self.follow.pick(obs)
        return _position_input(p, obs)

    def grid_state(self, x: np.ndarray) -> int:
        """Grid cell (row-major) of the encoded position: the Q-table's state."""
        g = self.task.grid
        col = min(int((x[2] + 1.0) / 2.0 * g), g - 1)
        row = min(int((x[3] + 1.0) / 2.0 * g), g - 1)
        return max(row, 0) * g + max(col, 0)

    def goal_state(self, obs: Observation) -> int:
        return self.grid_state(_position_input(np.asarray(obs.target_um, float), obs))

    def decode(self, obs: Observation, action: int | np.ndarray) -> Action:
        """Spot on the swimmer's rim opposite the chosen direction: it swims away from it."""
        p = self.follow.last
        if p is None or action is None:
            return Action.off()
        k = int(np.asarray(action).reshape(-1)[0])
        d = self.directions[k]
        spot = p - self.task.spot_offset_um * d
        return Action(
            laser=(LaserSpot(float(spot[0]), float(spot[1]), self.task.power_mw),),
            info={"rl_action": float(k)},
        )


class SteeringCodec:
    """Input: as the swimmer; action (ax, ay, ap) in [-1, 1]^3: push along (ax, ay)."""

    n_inputs = 4
    n_actions = 3

    def __init__(self, task: SteeringTask) -> None:
        self.task = task
        self.follow = _FollowOne(task.track_radius_um)

    def reset(self) -> None:
        self.follow.reset()

    def encode(self, obs: Observation) -> np.ndarray:
        return _position_input(self.follow.pick(obs), obs)

    def decode(self, obs: Observation, action: np.ndarray) -> Action:
        p = self.follow.last
        a = np.clip(np.asarray(action, dtype=float).reshape(-1), -1.0, 1.0)
        direction, norm = _unit(a[:2])
        power = 0.5 * (a[2] + 1.0) * self.task.max_power_mw
        if p is None or norm < 1e-6 or power <= 0.0:
            return Action(laser=(), info={"power_mw": 0.0})
        spot = p - self.task.spot_offset_um * direction
        return Action(
            laser=(LaserSpot(float(spot[0]), float(spot[1]), float(power)),),
            info={"power_mw": float(power)},
        )


class GatheringCodec:
    """Per slot (nearest the target first, zero-padded): offset from the target / half
    field, excess distance beyond the goal disc / goal radius, presence flag. Action per
    slot (inward, sideways, power) in that particle's own frame toward the target: every
    slot asks the same question, so one shared per-particle network (policies.rl.nets)
    can answer for all, and "push inward" is the same output for every particle."""

    width = 4  # inputs per slot
    per_slot = 3  # actions per slot

    def __init__(self, task: GatheringTask) -> None:
        self.task = task
        self.n_inputs = self.width * task.n_particles
        self.n_actions = self.per_slot * task.n_particles
        self._slots = np.zeros((0, 2))

    def reset(self) -> None:
        self._slots = np.zeros((0, 2))

    def encode(self, obs: Observation) -> np.ndarray:
        """Slots sorted by distance: a canonical order, so the input does not depend on
        how detections happen to be listed; `decode` acts on these same slots."""
        n = self.task.n_particles
        det = np.asarray(obs.detections_um, dtype=float).reshape(-1, 2)
        target = np.asarray(obs.target_um, dtype=float)
        dist = np.hypot(*(det - target).T)
        order = np.argsort(dist, kind="stable")[:n]
        self._slots = det[order]
        half = 0.5 * max(obs.field_um)
        goal = self.task.goal_radius_um
        x = np.zeros((n, self.width), dtype=np.float32)
        k = len(order)
        x[:k, :2] = np.clip((self._slots - target) / half, -2.0, 2.0)
        x[:k, 2] = np.clip((dist[order] - goal) / goal, -1.0, 2.0)
        x[:k, 3] = 1.0
        return x.reshape(-1)

    def decode(self, obs: Observation, action: np.ndarray) -> Action:
        """One spot `spot_offset_um` behind each slot's particle, opposite its push."""
        a = np.clip(np.asarray(action, dtype=float).reshape(-1, self.per_slot), -1.0, 1.0)
        target = np.asarray(obs.target_um, dtype=float)
        spots = []
        for p, (inward, side, ap) in zip(self._slots, a, strict=False):
            u, r = _unit(target - p)
            if r <= 1e-9:  # on the target: any fixed frame will do
                u = np.array([1.0, 0.0])
            direction, norm = _unit(inward * u + side * np.array([-u[1], u[0]]))
            power = 0.5 * (ap + 1.0) * self.task.max_power_mw
            if norm < 1e-6 or power <= 1e-6:
                continue
            s = p - self.task.spot_offset_um * direction
            spots.append(LaserSpot(float(s[0]), float(s[1]), float(power)))
        return Action(laser=tuple(spots), info={"n_spots": float(len(spots))})


Codec = SwimmerCodec | SteeringCodec | GatheringCodec


def _position_input(p: np.ndarray | None, obs: Observation) -> np.ndarray:
    """[(x - tx), (y - ty)] / half field and [x, y] mapped to [-1, 1]; zeros if unseen."""
    if p is None:
        return np.zeros(4, dtype=np.float32)
    width, height = obs.field_um
    tx, ty = obs.target_um
    return np.array(
        [
            2.0 * (p[0] - tx) / width,
            2.0 * (p[1] - ty) / height,
            2.0 * p[0] / width - 1.0,
            2.0 * p[1] / height - 1.0,
        ],
        dtype=np.float32,
    ).clip(-2.0, 2.0)


def make_codec(task: SwimmerTask | SteeringTask | GatheringTask) -> Codec:
    if isinstance(task, SwimmerTask):
        return SwimmerCodec(task)
    if isinstance(task, SteeringTask):
        return SteeringCodec(task)
    return GatheringCodec(task)
