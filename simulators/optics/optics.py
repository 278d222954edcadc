"""The optical trap's physical description, shared by the exact model and its surrogate
(kept free of scipy so loading a surrogate stays light)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SPEED_OF_LIGHT_M_S = 299_792_458.0
#: n P / c for P = 1 mW, per unit medium index, in fN.
FN_PER_MW = 1e-3 / SPEED_OF_LIGHT_M_S * 1e15


class TrapOptics(BaseModel):
    """The optical trap: laser, objective and materials (defaults: 1064 nm, NA 1.2 water
    immersion, polystyrene in water)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wavelength_um: float = Field(1.064, gt=0.2, le=3.0)  # in vacuum
    numerical_aperture: float = Field(1.2, gt=0.0, le=1.7)
    n_medium: float = Field(1.33, ge=1.0, le=2.0)
    n_particle: float = Field(1.59, gt=0.0, le=4.0)
    filling_factor: float = Field(1.0, gt=0.05, le=20.0)  # Gaussian 1/e^2 radius / pupil radius
    polarization: Literal["circular", "x"] = "circular"

    @model_validator(mode="after")
    def _na_below_medium(self) -> TrapOptics:
        if self.numerical_aperture >= self.n_medium:
            raise ValueError(
                f"numerical_aperture must be below n_medium ({self.n_medium}), "
                f"got {self.numerical_aperture}"
            )
        return self

    @property
    def wavenumber_per_um(self) -> float:
        """k in the medium, 1/um."""
        return 2.0 * math.pi * self.n_medium / self.wavelength_um

    @property
    def fn_per_mw(self) -> float:
        """Force unit n_m P / c for 1 mW, fN."""
        return self.n_medium * FN_PER_MW
