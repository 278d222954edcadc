"""Feedback-control bench: the control policies in a synchronous loop on the particle twin.

What it measures (`scopeloop bench feedback --json`):
- P trap, heating actuator, 30 ms frames and exposure: measured position variance and
  stiffness (equipartition, policies.calibration) vs the exact theory of the sampled,
  blurred, delayed loop (policies.control.theory) as gain and delay vary;
- at delay = 0.5 x relaxation time (1/gain) of the P trap: RMS error of the Smith
  predictor and the Kalman filter (each at the gain the theory says is best, capped at
  dead-beat 1/T) vs proportional control (policies.feedback.ProportionalTrap), next to
  the information bound no controller can beat;
- a virtual double well imposed by feedback: potential recovered from the histogram
  (-ln p) vs the imposed one; a circle steered with feedforward; four particles held
  by a tweezers SLM pattern.
Power ceilings are generous (the twin has no damage model) so the controllers work in
their linear range, which is what the theory describes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from policies.calibration import equipartition
from policies.contract import KB_FN_UM_PER_K
from policies.control import (
    KalmanTrapConfig,
    MultiTrapConfig,
    PathConfig,
    PredictiveTrapConfig,
    VirtualPotentialConfig,
    make_control_policy,
)
from policies.control.potentials import DoubleWell
from policies.control.theory import (
    LoopTiming,
    information_bound_variance,
    optimal_gain,
    position_variance,
)
from policies.feedback import ProportionalTrap, ProportionalTrapConfig
from simulators.closed_loop import LoopSim, LoopSimConfig, LoopSimResult
from simulators.particles import ParticleTwinConfig

PERIOD_S = 0.03
EXPOSURE_S = 0.03
NOISE_UM = 0.02
POWER_MW = 200.0
TEMPERATURE_K = 296.0


def _twin(**kw: Any) -> ParticleTwinConfig:
    return ParticleTwinConfig(temperature_k=TEMPERATURE_K, **kw)


def _sim(
    policy: Any, frames: int, seed: int, delay_s: float, twin: ParticleTwinConfig, **kw: Any
) -> tuple[LoopSimResult, LoopSim]:
    cfg = LoopSimConfig(
        period_s=PERIOD_S, exposure_s=EXPOSURE_S, delay_s=delay_s, noise_um=NOISE_UM, **kw
    )
    sim = LoopSim(twin, cfg, seed)
    return sim.run(policy, frames), sim


def _hold_stats(res: LoopSimResult, burn: int) -> tuple[float, float, float]:
    """(variance per axis, radial RMS about the target, equipartition stiffness fN/um)."""
    xy = res.truth_um[burn:, 0, :] - np.asarray(res.config.target_um)
    var = float(np.mean(xy.var(axis=0)))
    rms = float(np.sqrt(np.mean(np.sum(xy**2, axis=1))))
    ks = [equipartition(xy[:, a], PERIOD_S, temperature_k=TEMPERATURE_K).value for a in (0, 1)]
    return var, rms, float(np.mean(ks))


def _sweep(quick: bool, frames: int, log: Callable[[str], None]) -> dict[str, float]:
    d = _twin().diffusion_um2_s
    kt = KB_FN_UM_PER_K * TEMPERATURE_K
    gains = (4.0,) if quick else (2.0, 4.0, 8.0)
    delays = (0.0, 0.125) if quick else (0.0, 0.06, 0.125, 0.25)
    out: dict[str, float] = {}
    devs = []
    for g in gains:
        for i, delay in enumerate(delays):
            if g * delay >= 1.2:  # near or past the stability edge of P control
                continue
            policy = ProportionalTrap(ProportionalTrapConfig(gain_per_s=g, max_power_mw=POWER_MW))
            res, sim = _sim(policy, frames, 100 + i, delay, _twin())
            exposure, eff_delay = sim.effective
            timing = LoopTiming(PERIOD_S, exposure, eff_delay, d, NOISE_UM)
            theory = position_variance(timing, g)
            var, _, k_meas = _hold_stats(res, frames // 10)
            key = f"sweep_g{g:g}_d{round(delay * 1000)}ms"
            out[f"{key}_var_um2"] = var
            out[f"{key}_var_theory_um2"] = theory
            out[f"{key}_k_fn_per_um"] = k_meas
            out[f"{key}_k_theory_fn_per_um"] = kt / theory
            out[f"{key}_k_set_fn_per_um"] = kt * g / d
            devs.append(abs(var / theory - 1.0))
            log(
                f"P trap g={g:g}/s delay={delay * 1e3:.0f} ms: var {var:.4f} vs theory "
                f"{theory:.4f} um^2, k {k_meas:.1f} vs {kt / theory:.1f} (set {kt * g / d:.1f})"
            )
    out["sweep_var_rel_dev_max"] = float(max(devs))
    out["sweep_var_rel_dev_mean"] = float(np.mean(devs))
    return out


def _delay_compensation(frames: int, log: Callable[[str], None]) -> dict[str, float]:
    d = _twin().diffusion_um2_s
    g = 4.0
    delay = 0.5 / g  # half the P trap's relaxation time
    p_res, sim = _sim(
        ProportionalTrap(ProportionalTrapConfig(gain_per_s=g, max_power_mw=POWER_MW)),
        frames,
        7,
        delay,
        _twin(),
    )
    exposure, eff_delay = sim.effective
    timing = LoopTiming(PERIOD_S, exposure, eff_delay, d, NOISE_UM)
    g_best, var_best = optimal_gain(timing, predictor=True)
    loop = {"delay_s": eff_delay, "exposure_s": exposure, "localization_noise_um": NOISE_UM}
    common = {"gain_per_s": g_best, "max_power_mw": POWER_MW, "loop": loop}
    rms_p = _hold_stats(p_res, frames // 10)[1]
    out = {"delay_comp_gain_p_per_s": g, "delay_comp_delay_s": eff_delay}
    out["delay_comp_gain_comp_per_s"] = g_best
    out["rms_p_um"] = rms_p
    for name, cfg in (
        ("predictor", PredictiveTrapConfig(**common)),
        ("kalman", KalmanTrapConfig(**common)),
    ):
        res, _ = _sim(make_control_policy(cfg), frames, 7, delay, _twin())
        out[f"rms_{name}_um"] = _hold_stats(res, frames // 10)[1]
    best = min(out["rms_predictor_um"], out["rms_kalman_um"])
    out["rms_reduction_delay_comp"] = 1.0 - best / rms_p
    out["rms_reduction_predictor"] = 1.0 - out["rms_predictor_um"] / rms_p
    out["rms_reduction_kalman"] = 1.0 - out["rms_kalman_um"] / rms_p
    p_theory = position_variance(timing, g)
    out["rms_reduction_theory_predictor"] = 1.0 - math.sqrt(var_best / p_theory)
    out["rms_reduction_bound"] = 1.0 - math.sqrt(information_bound_variance(timing) / p_theory)
    log(
        f"delay {eff_delay * 1e3:.0f} ms = 0.5/g: RMS P {rms_p:.3f}, predictor "
        f"{out['rms_predictor_um']:.3f}, Kalman {out['rms_kalman_um']:.3f} um (gain {g_best:.1f}/s)"
        f"; reduction {out['rms_reduction_delay_comp']:.1%}, theory bound "
        f"{out['rms_reduction_bound']:.1%}"
    )
    return out


def _double_well(frames: int, log: Callable[[str], None]) -> dict[str, float]:
    well = DoubleWell(barrier_kt=3.0, half_distance_um=1.0, transverse_stiffness_fn_per_um=20.0)
    cfg = VirtualPotentialConfig(
        potential=well,
        max_power_mw=POWER_MW,
        estimator="predictor",
        loop={"delay_s": 0.01, "exposure_s": EXPOSURE_S, "localization_noise_um": NOISE_UM},
    )
    res, _ = _sim(make_control_policy(cfg), frames, 11, 0.01, _twin())
    x = res.truth_um[frames // 20 :, 0, 0]
    edges = np.linspace(-1.6, 1.6, 33)
    hist, _ = np.histogram(x, edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    kt = KB_FN_UM_PER_K * TEMPERATURE_K
    zeros = np.zeros_like(centres)
    imposed = well.energy_kt(centres, zeros, 0.0, kt)
    # Compare where the particle lives (U <= barrier + 1.5 kT) and bins are well sampled.
    ok = (hist >= 20) & (imposed <= well.barrier_kt + 1.5)
    measured = -np.log(np.where(ok, hist, 1) / hist.sum())
    shift = np.mean(measured[ok] - imposed[ok])
    rmse = float(np.sqrt(np.mean((measured[ok] - shift - imposed[ok]) ** 2)))
    centre_bins = np.abs(centres) < 0.15
    well_bins = np.abs(np.abs(centres) - 1.0) < 0.15
    barrier = float(np.mean(measured[centre_bins & ok]) - np.mean(measured[well_bins & ok]))
    hops = int(np.count_nonzero(np.diff(np.sign(x[np.abs(x) > 0.5])) != 0))
    log(
        f"double well (3 kT, +-1 um): barrier {barrier:.2f} kT measured, potential RMSE "
        f"{rmse:.2f} kT over {int(ok.sum())} bins (U <= 4.5 kT), {hops} crossings"
    )
    return {
        "double_well_barrier_imposed_kt": 3.0,
        "double_well_barrier_kt": barrier,
        "double_well_rmse_kt": rmse,
        "double_well_crossings": hops,
    }


def _path(frames: int, log: Callable[[str], None]) -> dict[str, float]:
    out: dict[str, float] = {}
    delay = 0.05
    base = {
        "curve": {"shape": "circle", "radius_um": (3.0, 3.0)},
        "speed_um_s": 1.0,
        "start_delay_s": 0.0,
        "max_power_mw": POWER_MW,
        "loop": {"delay_s": delay, "exposure_s": EXPOSURE_S, "localization_noise_um": NOISE_UM},
    }
    variants = {
        "path": {"estimator": "predictor", "gain_per_s": 8.0},
        "path_p": {"estimator": "none", "feedforward": False, "gain_per_s": 4.0},
    }
    for name, extra in variants.items():
        policy = make_control_policy(PathConfig(**base, **extra))
        sim = LoopSim(
            _twin(),
            LoopSimConfig(PERIOD_S, EXPOSURE_S, delay, NOISE_UM),
            seed=13,
        )
        start, _ = policy.reference.at(0.0)
        sim.place(start)
        res = sim.run(policy, frames)
        refs = np.array([policy.reference.at(t - res.t_s[0])[0] for t in res.t_s])
        err = res.truth_um[:, 0, :] - refs
        out[f"{name}_rms_um"] = float(np.sqrt(np.mean(np.sum(err[frames // 10 :] ** 2, axis=1))))
    log(
        f"circle r=3 um at 1 um/s, delay 50 ms: RMS {out['path_rms_um']:.3f} um (predictor + "
        f"feedforward) vs {out['path_p_rms_um']:.3f} um (P only)"
    )
    return out


def _multi(frames: int, log: Callable[[str], None]) -> dict[str, float]:
    n = 4
    twin = _twin(n_particles=n, actuator="tweezers")
    cfg = MultiTrapConfig(
        ring=(n, 5.0),
        actuator="tweezers",
        max_power_mw=10.0,
        gain_per_s=8.0,
        estimator="predictor",
        loop={"delay_s": 0.005, "exposure_s": EXPOSURE_S, "localization_noise_um": NOISE_UM},
    )
    policy = make_control_policy(cfg)
    sim = LoopSim(twin, LoopSimConfig(PERIOD_S, EXPOSURE_S, 0.005, NOISE_UM), seed=17)
    targets = policy.targets_rel
    sim.place(targets + 0.3)
    res = sim.run(policy, frames)
    err = res.truth_um[frames // 10 :] - targets[None]
    per = np.sqrt(np.mean(np.sum(err**2, axis=2), axis=0))
    free = math.sqrt(4 * twin.diffusion_um2_s * frames * PERIOD_S)
    log(
        f"{n} particles held by an SLM tweezers pattern: RMS {float(np.mean(per)):.3f} um "
        f"(worst {float(per.max()):.3f}; free diffusion would reach ~{free:.1f} um)"
    )
    return {"multi_hold_rms_um": float(np.mean(per)), "multi_hold_rms_max_um": float(per.max())}


def run(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    frames = 2500 if quick else 12000
    metrics: dict[str, Any] = {}
    metrics.update(_sweep(quick, frames, log))
    metrics.update(_delay_compensation(frames if quick else 2 * frames, log))
    metrics.update(_double_well(4000 if quick else 40000, log))
    metrics.update(_path(1500 if quick else 6000, log))
    metrics.update(_multi(1000 if quick else 5000, log))
    return metrics
