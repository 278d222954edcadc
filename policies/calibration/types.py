"""Result type shared by every calibration estimator."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """One calibrated quantity with its uncertainty.

    ``stderr`` is on the linear scale of ``value``; ``interval`` (when given) is the
    estimator's own 95 % interval, which need not be symmetric because most of the
    uncertainty in a stiffness is multiplicative.
    """

    value: float
    stderr: float
    unit: str
    interval: tuple[float, float] | None = None
    method: str = ""

    @property
    def log_value(self) -> float:
        """ln(value): the scale on which stiffness errors are compared (DeepCalib MAE)."""
        return math.log(self.value)
