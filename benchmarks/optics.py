"""Optics bench: the learned force surrogate against the exact Mie model, and holograms.

- surrogate: fresh random points (x, y, z, radius) over the shipped surrogate's trained
  domain; max and rms error of the force as a fraction of the peak exact force there;
  time per force evaluation of both models over the same points in one run, on one
  BLAS thread (process time, so a loaded machine changes both alike). The exact model
  is timed batched (its fastest use) and one point per call (how a dynamics loop
  would call it).
- hologram: slmsuite WGS-Kim for 10 traps on a 512 x 512 SLM (FFT 1024 x 1024), its
  time and iteration count, and the trap powers it makes as the twin's Fourier
  optics sees them: uniformity 1 - (max - min) / (max + min), efficiency (fraction of
  the SLM's light in the traps).
- multitrap: 10 particles in the Fourier-plane traps of that hologram, with the
  surrogate's forces, for 5 s of twin time: how many stay within 0.5 um.
- calibration: the stiffness `ou_mle` recovers from a twin trajectory in one surrogate
  trap, over the surrogate's own centre stiffness.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from policies.calibration.harmonic import ou_mle
from policies.contract import KB_FN_UM_PER_K, LaserSpot
from simulators.optics.forces import ExactForceModel
from simulators.optics.hologram import SlmCalibration, hologram_trap_powers, phase_for_traps
from simulators.optics.surrogate import ForceSurrogate
from simulators.particles import WATER_VISCOSITY_FN_S_PER_UM2, ParticleTwin, ParticleTwinConfig

Log = Callable[[str], None]
T_K = 296.0
RADIUS_UM = 0.5


def _random_points(sur: ForceSurrogate, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = sur.domain
    rho = d.rho_max_um * np.sqrt(rng.uniform(0.0, 1.0, n))
    phi = rng.uniform(0.0, 2.0 * math.pi, n)
    z = rng.uniform(d.z_min_um, d.z_max_um, n)
    radius = rng.uniform(d.radius_min_um, d.radius_max_um, n)
    return np.column_stack((rho * np.cos(phi), rho * np.sin(phi), z)), radius


def _surrogate_metrics(quick: bool, log: Log) -> dict[str, float]:
    sur = ForceSurrogate()
    exact = ExactForceModel(sur.optics, sur.domain.radius_max_um, sur.domain.reach_um)
    n = 400 if quick else 2000
    pts, radius = _random_points(sur, n, seed=2026)
    with threadpool_limits(1):
        t0 = time.process_time()
        want = exact.efficiency(pts, radius)
        exact_s = (time.process_time() - t0) / n
        singles = 10 if quick else 40
        t1 = time.process_time()
        for i in range(singles):
            exact.efficiency(pts[i : i + 1], radius[i])
        exact_single_s = (time.process_time() - t1) / singles
        got = np.empty_like(want)
        for r in np.unique(radius):  # efficiency() takes one radius per call
            sel = radius == r
            got[sel] = sur.efficiency(pts[sel], float(r))
        rho_z_a = np.column_stack((np.hypot(pts[:, 0], pts[:, 1]), pts[:, 2], radius))
        reps = 20
        t2 = time.process_time()
        for _ in range(reps):
            sur.cylindrical(rho_z_a)
        sur_s = (time.process_time() - t2) / (reps * n)
    peak = float(np.linalg.norm(want, axis=1).max())
    err = np.linalg.norm(got - want, axis=1)
    m = {
        "surrogate_force_error_max": float(err.max() / peak),
        "surrogate_force_error_rms": float(np.sqrt(np.mean(err**2)) / peak),
        "surrogate_peak_force_fn_per_mw": peak * sur.optics.fn_per_mw,
        "exact_us_per_force": exact_s * 1e6,
        "exact_us_per_force_single_call": exact_single_s * 1e6,
        "surrogate_us_per_force": sur_s * 1e6,
        "surrogate_speedup": exact_s / sur_s,
        "surrogate_speedup_single_call": exact_single_s / sur_s,
    }
    log(
        f"surrogate vs exact over {n} points: max error {100 * m['surrogate_force_error_max']:.2f}"
        f" % of peak ({m['surrogate_peak_force_fn_per_mw']:.0f} fN/mW), rms "
        f"{100 * m['surrogate_force_error_rms']:.3f} %"
    )
    log(
        f"per force: exact {m['exact_us_per_force']:.0f} us batched, "
        f"{m['exact_us_per_force_single_call']:.0f} us per call; surrogate "
        f"{m['surrogate_us_per_force']:.2f} us: {m['surrogate_speedup']:.0f}x "
        f"({m['surrogate_speedup_single_call']:.0f}x per call)"
    )
    return m


def _ring(n: int, radius_um: float) -> np.ndarray:
    angle = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.column_stack((radius_um * np.cos(angle), radius_um * np.sin(angle)))


def _hologram_metrics(quick: bool, log: Log) -> tuple[dict[str, float], list]:
    cal = SlmCalibration(slm_px=512, focal_length_um=2000.0)
    iterations = 30
    traps_um = _ring(10, 8.0)
    t0, c0 = time.perf_counter(), time.process_time()
    phase, result = phase_for_traps(traps_um, cal, iterations=iterations)
    ms = (time.perf_counter() - t0) * 1e3
    cpu_ms = (time.process_time() - c0) * 1e3
    total_mw = 40.0
    traps = hologram_trap_powers(phase, cal, total_mw, min_fraction=0.02)
    m = {
        "hologram_uniformity_10_traps": result.uniformity,
        "hologram_efficiency": result.efficiency,
        "hologram_ms_512": ms,
        "hologram_cpu_ms_512": cpu_ms,
        "hologram_iterations": float(iterations),
        "hologram_traps_found": float(len(traps)),
    }
    log(
        f"WGS-Kim 512x512 SLM, 10 traps, {iterations} iterations: {ms:.0f} ms wall, "
        f"{cpu_ms:.0f} ms CPU; uniformity {result.uniformity:.4f}, "
        f"efficiency {result.efficiency:.3f}, {len(traps)} traps in the Fourier plane"
    )
    return m, traps


def _stokes_d(radius_um: float) -> float:
    return KB_FN_UM_PER_K * T_K / (6 * math.pi * WATER_VISCOSITY_FN_S_PER_UM2 * radius_um)


def _surrogate_twin(n: int, seed: int, max_internal_step_s: float = 0.002) -> ParticleTwin:
    cfg = ParticleTwinConfig(
        max_internal_step_s=max_internal_step_s,
        n_particles=n,
        actuator="tweezers",
        trap_model="surrogate",
        particle_radius_um=RADIUS_UM,
        diffusion_um2_s=_stokes_d(RADIUS_UM),
        temperature_k=T_K,
    )
    return ParticleTwin(cfg, (-20.0, 20.0, -20.0, 20.0), seed=seed)


def _multitrap_metrics(traps: list, log: Log) -> dict[str, float]:
    twin = _surrogate_twin(len(traps), seed=7)
    centres = np.array([(x, y) for x, y, _ in traps])
    twin._xy = centres.copy()
    twin.set_laser([LaserSpot(x, y, p) for x, y, p in traps])
    for _ in range(50):
        twin.step(0.1)
    held = int(np.sum(np.linalg.norm(twin.positions_um - centres, axis=1) < 0.5))
    log(f"multi-trap: {held}/{len(traps)} particles held for 5 s in the hologram's traps")
    return {"multitrap_particles_held": float(held), "multitrap_traps": float(len(traps))}


def _calibration_metrics(quick: bool, log: Log) -> dict[str, float]:
    power = 0.3  # harmonic region: rms ~60 nm; 2 ms frames resolve the ~8 ms relaxation
    twin = _surrogate_twin(1, seed=9, max_internal_step_s=0.0005)
    assert twin.trap is not None
    k_true = twin.trap.stiffness_fn_per_um_per_mw * power
    twin.set_laser([LaserSpot(0.0, 0.0, power)])
    dt = 0.002
    x = np.array([twin.step(dt)[0, 0] for _ in range(5000 if quick else 20000)])
    est = ou_mle(x, dt, temperature_k=T_K, radius_um=RADIUS_UM)
    ratio = float(est.value / k_true)
    log(
        f"calibration: ou_mle k = {est.value:.0f} fN/um vs surrogate centre stiffness "
        f"{k_true:.0f} fN/um (ratio {ratio:.3f})"
    )
    return {"calibrated_stiffness_ratio": ratio, "surrogate_stiffness_fn_per_um": k_true}


def run(quick: bool = False, log: Log = print) -> dict[str, float]:
    """Surrogate accuracy and speed, hologram quality and speed, multi-trap hold."""
    metrics = _surrogate_metrics(quick, log)
    holo, traps = _hologram_metrics(quick, log)
    metrics.update(holo)
    metrics.update(_multitrap_metrics(traps, log))
    metrics.update(_calibration_metrics(quick, log))
    return metrics
