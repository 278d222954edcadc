"""Agent-side limits: clip what a policy asks for to what the driver will accept.

The driver refuses out-of-range commands; clipping here first keeps a policy's
over-eager request from turning into a refused command and a missed step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from policies.contract import Action, LaserSpot


@dataclass(frozen=True, slots=True)
class LaserLimits:
    x_um: tuple[float, float]
    y_um: tuple[float, float]
    max_power_mw: float
    max_spots: int

    @staticmethod
    def from_driver_state(state: dict[str, Any]) -> LaserLimits:
        """Limits as the driver reports them in `get_state` (None ranges = camera field)."""
        limits = state["limits"]
        width, height = state["field_um"]
        return LaserLimits(
            x_um=tuple(limits.get("laser_x_um") or (0.0, width)),
            y_um=tuple(limits.get("laser_y_um") or (0.0, height)),
            max_power_mw=float(limits["max_laser_power_mw"]),
            max_spots=int(limits["max_laser_spots"]) if state.get("laser_kind") == "slm" else 1,
        )

    def clip(self, action: Action) -> tuple[Action, bool]:
        """Return the clipped action and whether anything had to change."""
        spots = []
        changed = len(action.laser) > self.max_spots
        for spot in action.laser[: self.max_spots]:  # on the frame-to-command path: no numpy
            if math.isnan(spot.x_um) or math.isnan(spot.y_um) or math.isnan(spot.power_mw):
                changed = True  # a spot no number places: no light from it
                continue
            x = _clip(spot.x_um, *self.x_um)
            y = _clip(spot.y_um, *self.y_um)
            p = _clip(spot.power_mw, 0.0, self.max_power_mw)
            changed |= (x, y, p) != (spot.x_um, spot.y_um, spot.power_mw)
            spots.append(LaserSpot(x, y, p))
        return Action(laser=tuple(spots), info=action.info), changed


def _clip(value: float, low: float, high: float) -> float:
    """`float(np.clip(value, low, high))` for one number, NaN kept, at a tenth of the cost."""
    return float(min(max(value, low), high))
