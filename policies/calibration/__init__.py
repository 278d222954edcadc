"""Force-field calibration of optical/magnetic traps from particle trajectories.

Classical estimators, exact OU likelihood (with localisation noise via a Kalman
filter), the Bayes-optimal posterior of the DeepCalib protocol, and its Cramer-Rao
bound. Units: um, s, fN/um, fN*um.
"""

from __future__ import annotations

from .bayes import Posterior, bayes_ou, ou_posterior
from .crb import crb_ln_k, fisher_ln_k, observed_information_ln_k
from .harmonic import (
    autocorrelation_fit,
    equipartition,
    forma,
    ou_mle,
    power_spectrum_fit,
)
from .likelihood import ou_loglik
from .physics import KB_FN_UM_PER_K, stokes_friction, thermal_energy
from .rotational import forma_rotational, simulate_rotational
from .simulate import simulate_ou
from .types import Estimate

__all__ = [
    "KB_FN_UM_PER_K",
    "Estimate",
    "Posterior",
    "autocorrelation_fit",
    "bayes_ou",
    "crb_ln_k",
    "equipartition",
    "fisher_ln_k",
    "forma",
    "forma_rotational",
    "observed_information_ln_k",
    "ou_loglik",
    "ou_mle",
    "ou_posterior",
    "power_spectrum_fit",
    "simulate_ou",
    "simulate_rotational",
    "stokes_friction",
    "thermal_energy",
]
