"""Units, constants and input checks shared by the calibration code.

Units: positions um, time s, stiffness fN/um, energy fN*um, friction fN*s/um.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from policies.contract import KB_FN_UM_PER_K

WATER_VISCOSITY_PA_S = 1.0e-3
# 1 N*s/m = 1e15 fN / (1e6 um/s) = 1e9 fN*s/um
_NS_PER_M_TO_FNS_PER_UM = 1.0e9


def thermal_energy(temperature_k: float) -> float:
    """kT in fN*um."""
    return KB_FN_UM_PER_K * check_positive(temperature_k, "temperature_k")


def stokes_friction(radius_um: float, viscosity_pa_s: float = WATER_VISCOSITY_PA_S) -> float:
    """Stokes friction 6*pi*eta*a in fN*s/um (1.885 for a = 100 nm in water)."""
    a_m = check_positive(radius_um, "radius_um") * 1e-6
    eta = check_positive(viscosity_pa_s, "viscosity_pa_s")
    return 6.0 * math.pi * eta * a_m * _NS_PER_M_TO_FNS_PER_UM


def faxen_lateral_factor(radius_um: float, surface_distance_um: float) -> float:
    """Faxen's correction to the drag parallel to a wall, gamma / gamma_Stokes.

    1 / (1 - 9/16 x + 1/8 x^3 - 45/256 x^4 - 1/16 x^5), x = radius / distance from the
    wall to the sphere's centre; accurate to ~1 % for x < 0.5, and refused where the
    sphere would touch the wall.
    """
    a = check_positive(radius_um, "radius_um")
    h = check_positive(surface_distance_um, "surface_distance_um")
    if h <= a:
        raise ValueError(
            f"surface_distance_um (centre to wall) must exceed the radius {a} um, got {h}"
        )
    x = a / h
    return 1.0 / (1.0 - 9.0 / 16.0 * x + x**3 / 8.0 - 45.0 / 256.0 * x**4 - x**5 / 16.0)


def drag_coefficient(
    radius_um: float,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    surface_distance_um: float | None = None,
) -> float:
    """Stokes drag in fN*s/um, Faxen-corrected for a nearby wall when its distance is given."""
    gamma = stokes_friction(radius_um, viscosity_pa_s)
    if surface_distance_um is None:
        return gamma
    return gamma * faxen_lateral_factor(radius_um, surface_distance_um)


def physics(temperature_k: float, radius_um: float, viscosity_pa_s: float) -> tuple[float, float]:
    """(kT, gamma) for the particle; diffusion D = kT / gamma."""
    return thermal_energy(temperature_k), stokes_friction(radius_um, viscosity_pa_s)


def check_positive(value: float, name: str) -> float:
    """Reject non-finite or non-positive scalars with the argument's name in the message."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a positive number, got {value!r}") from exc
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v


def check_series(x: ArrayLike, name: str = "x", min_len: int = 10) -> NDArray[np.float64]:
    """A 1-D finite float trajectory of at least ``min_len`` samples."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size < min_len:
        raise ValueError(f"{name} needs at least {min_len} samples, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def check_planar(xy: ArrayLike, name: str = "xy", min_len: int = 10) -> NDArray[np.float64]:
    """An (n, 2) finite trajectory of at least ``min_len`` samples."""
    arr = np.asarray(xy, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2), got {arr.shape}")
    if arr.shape[0] < min_len:
        raise ValueError(f"{name} needs at least {min_len} samples, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr
