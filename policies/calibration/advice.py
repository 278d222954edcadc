"""What the data say about themselves: regime, recommended method and why, drag check.

Read off the drag-free posterior (``dragfree``), which every harmonic calibration
computes anyway: how many relaxation times the record spans, how correlated successive
frames are, how large the localisation noise is against the trap's spread, and how the
exposure compares with the relaxation time. These decide which estimator to trust and
whether a fixed (Stokes) drag is consistent with the data.
"""

from __future__ import annotations

import math
from typing import Any

from .dragfree import DragFreePosterior

MIN_RELAXATIONS = 0.5  # posterior-median record length / relaxation time below which we refuse
# Log-likelihood gain of the trap over (nearly) free diffusion below which we warn. It is
# only ~lambda T / 4 nats on average, so a record of 3 relaxation times sits near 1: too
# weak to refuse on (that would refuse most honest short records), worth saying.
WEAK_RESTORING_LR = 1.0
CHECK_LEVEL = 0.99  # credible level of the D interval a fixed drag must fall in


def diagnose(post: DragFreePosterior, dt: float, exposure_s: float) -> dict[str, float]:
    """Regime of one record: relaxations spanned, lag-1 correlation, noise/sd, blur/tau."""
    lam = math.exp(post.ln_lam_quantile(0.5))
    return {
        "relaxation_time_s": 1.0 / lam,
        "relaxations_spanned": lam * post.record_s,
        "lag1_correlation": math.exp(-lam * dt),
        "noise_to_sd": math.sqrt(post.noise_ratio) if math.isfinite(post.noise_ratio) else 0.0,
        "exposure_to_relaxation": exposure_s * lam,
    }


def refuse_untrapped(post: DragFreePosterior, diag: dict[str, float], name: str) -> None:
    """No restoring force visible: raise with what a usable record would need."""
    spanned = diag["relaxations_spanned"]
    if spanned >= MIN_RELAXATIONS and post.lam_edge_mass[0] < 0.05:
        return
    raise ValueError(
        f"column {name}: no restoring force detected (the record spans about {spanned:.2g} "
        f"relaxation times, or the particle drifts away / is not trapped); a calibration "
        f"needs a stationary record of at least ~3 relaxation times (here > "
        f"{3.0 * post.record_s / max(spanned, 1e-9):.3g} s of data at this trap)"
    )


def weak_trap_warning(post: DragFreePosterior, diag: dict[str, float]) -> str | None:
    """The record barely tells a trap from free diffusion: say so next to the numbers."""
    if post.restoring_lr >= WEAK_RESTORING_LR:
        return None
    return (
        f"the record barely shows a restoring force (log-likelihood {post.restoring_lr:.2g} "
        f"above free diffusion; ~{diag['relaxations_spanned']:.2g} relaxation times): k rests on "
        "a few excursions and its interval is wide; record longer or fix the drag"
    )


def recommend(drag: str, diag: dict[str, float]) -> tuple[str, str]:
    """(method, one-line reason) for a harmonic record."""
    spanned, phi = diag["relaxations_spanned"], diag["lag1_correlation"]
    noise, blur = diag["noise_to_sd"], diag["exposure_to_relaxation"]
    regime = f"record spans {spanned:.3g} relaxation times (lag-1 correlation {phi:.3f})"
    extras = []
    if noise > 0.05:
        extras.append(f"localisation noise ~{noise:.2f} of the trap sd")
    if blur > 0.1:
        extras.append(f"exposure {blur:.2g} relaxation times (blur)")
    nuisances = ("; " + ", ".join(extras)) if extras else ""
    if drag == "stokes":
        return "bayes_ou", (
            f"bayes_ou: exact likelihood with the drag fixed; {regime}{nuisances}; "
            "the interval assumes the fixed drag is right"
        )
    if spanned < 30:
        why = "short record: the exact likelihood with the centre integrated out stays unbiased"
    elif blur > 0.3 or noise > 0.1:
        why = "blur/noise bias the spectral, ACF and FORMA fits; the exact model has both"
    else:
        why = "exact likelihood, drag and noise estimated; the classical fits agree at this length"
    return "bayes_ou", f"bayes_ou: {why}; {regime}{nuisances}"


def identifiability_warning(diag: dict[str, float]) -> str | None:
    """With D free, k rests on the variance; blur hides it once tau is below the exposure."""
    if diag["exposure_to_relaxation"] <= 2.0:
        return None
    return (
        f"relaxation time {diag['relaxation_time_s']:.3g} s is shorter than the exposure: with "
        "the drag free, k and D are only partly separable (wide interval); fix the drag "
        "(--drag stokes) or shorten the exposure"
    )


def drag_check(post: DragFreePosterior, d_fixed: float, what: str) -> str | None:
    """One-line warning when the fixed drag's D is outside the data's 99 % D interval."""
    tail = 0.5 * (1.0 - CHECK_LEVEL)
    lo, hi = math.exp(post.ln_d_quantile(tail)), math.exp(post.ln_d_quantile(1.0 - tail))
    if lo <= d_fixed <= hi:
        return None
    med = math.exp(post.ln_d_quantile(0.5))
    return (
        f"drag: {what} gives D = {d_fixed:.3g} um^2/s but the data give D = {med:.3g} "
        f"[{lo:.3g}, {hi:.3g}] um^2/s ({CHECK_LEVEL:.0%}), "
        f"{max(d_fixed / med, med / d_fixed):.2g}x off: stiffnesses that use this drag "
        "are biased; use --drag fit or check radius, viscosity, temperature and surface "
        "distance"
    )


def summary(diag: dict[str, float]) -> dict[str, Any]:
    """JSON-ready diagnostics, rounded to what they mean."""
    return {k: float(f"{v:.4g}") for k, v in diag.items()}


__all__ = [
    "diagnose",
    "drag_check",
    "identifiability_warning",
    "recommend",
    "refuse_untrapped",
    "summary",
    "weak_trap_warning",
]
