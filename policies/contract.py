"""The observation/action contract every policy, env and loop shares.

Policies see only these types: never sockets, drivers or twins. The same policy
object therefore runs in a gym env, an offline replay and the live loop.
Units are physical (um, s, mW) in the camera field frame: x along image columns,
y along image rows, origin at the centre of pixel (0, 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

KB_FN_UM_PER_K = 1.380649e-2  # Boltzmann constant in the contract's units, fN*um/K


@dataclass(frozen=True, slots=True)
class LaserSpot:
    """One focused laser spot: position in the field (um) and power (mW)."""

    x_um: float
    y_um: float
    power_mw: float


@dataclass(frozen=True, slots=True)
class Observation:
    """What a policy may know at one step: detections, not ground truth."""

    seq: int
    t_s: float
    detections_um: np.ndarray  # (N, 2) float, x/y in um; N may be 0
    target_um: tuple[float, float]
    exposure_s: float
    laser: tuple[LaserSpot, ...] = ()
    field_um: tuple[float, float] = (0.0, 0.0)  # width, height of the camera field
    track_ids: np.ndarray | None = None  # (N,) identity of each detection across frames
    confidences: np.ndarray | None = None  # (N,) in [0, 1]: 0 barely above threshold
    temperature_k: float | None = None  # the sample's, as the driver reports it

    @staticmethod
    def from_wire(
        seq: int,
        t_exposure_end_ns: int,
        exposure_s: float,
        detections_um: Any,
        target_um: Iterable[float],
        laser: Iterable[Mapping[str, Any]] | None,
        field_um: Iterable[float],
        track_ids: Any = None,
        confidences: Any = None,
        temperature_k: float | None = None,
    ) -> Observation:
        """An observation from what a frame header or a recorded step holds (laser spots as
        `{x_um, y_um, power_mw}` maps): the live loop and replay build it here, the same way."""
        tx, ty = (float(v) for v in target_um)
        fx, fy = (float(v) for v in field_um)
        spots = tuple(
            LaserSpot(float(s["x_um"]), float(s["y_um"]), float(s["power_mw"])) for s in laser or ()
        )
        ids = None if track_ids is None else np.asarray(track_ids, dtype=np.int64)
        conf = None if confidences is None else np.asarray(confidences, dtype=float)
        return Observation(
            seq=int(seq),
            t_s=int(t_exposure_end_ns) / 1e9,
            detections_um=np.asarray(detections_um, dtype=float).reshape(-1, 2),
            target_um=(tx, ty),
            exposure_s=float(exposure_s),
            laser=spots,
            field_um=(fx, fy),
            track_ids=ids,
            confidences=conf,
            temperature_k=None if temperature_k is None else float(temperature_k),
        )


@dataclass(frozen=True, slots=True)
class Action:
    """What a policy asks for. `laser=()` switches every spot off."""

    laser: tuple[LaserSpot, ...] = ()
    info: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def off() -> Action:
        return Action(laser=())


@runtime_checkable
class Policy(Protocol):
    """A decision maker: reset at the start of a run, then one action per observation."""

    def reset(self) -> None: ...

    def act(self, obs: Observation) -> Action: ...
