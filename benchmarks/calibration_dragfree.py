"""Calibration with the drag unknown: the parts of `bench calibration` that need no drag.

1. DeepCalib protocol at N = 1000 (k log-uniform 0.3-316 fN/um, dt 10 ms, 100 nm bead,
   clean and 20 nm noise + full-frame blur), D unknown to every method. Ours is the
   drag-free posterior median (``dragfree``) with the noise unknown; the limit
   (``bayes_mae_lnk_n1000_drag_free``) is the same posterior with the noise known, i.e.
   everything but D known; both get the protocol's trap centre and prior range, as the
   known-drag cells do.
2. Short records: 1000 points spanning 3-10 relaxation times (uniform), k log-uniform
   0.3-1000 fN/um (dt follows from the span), localisation noise 0-30 % of the trap sd,
   full-frame blur. Nothing but dt, temperature and exposure is known: the centre, D and
   the noise are estimated. ``coverage_95_short``: fraction of our 95 % intervals that
   hold the truth; ``median_bias_short``: |median(k_hat / k) - 1|.
3. Learned, D unknown: the conv + GRU estimator trained here (briefly) on the
   protocol's k range with each trajectory's D drawn log-uniform within a factor
   ``LEARNED_D_SPREAD`` of the 100 nm bead's and the trap centre known, scored against
   ours on fresh clean N = 1000 records with D drawn the same way
   (``mae_lnk_n1000_drag_free_learned`` vs ``mae_lnk_n1000_drag_free_random_d``).
4. Peers: tweezepy 1.2.7's PSD (Lansdorp aliased + filtered PSD, tracking error) and
   Allan-variance fits, by maximum likelihood with D (their gamma) free, on the same
   short records and on the clean N = 1000 protocol records. ``mae_ratio_vs_tweezepy``
   = our MAE in ln k / the better of theirs, short records. A fit that fails or returns a
   non-positive k counts as a miss of ln 10 (a factor 10), its count reported.
"""

from __future__ import annotations

import io
import math
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from policies.calibration import simulate_ou, stokes_friction, thermal_energy
from policies.calibration.dragfree import drag_free_posterior, known_noise_posterior
from policies.calibration.learned import TrainCalibrationConfig, learned_estimate, train_estimator

Log = Callable[[str], None]
DT = 0.01
K_MIN, K_MAX = 0.3, 316.0
NOISE_UM = 0.02
SHORT_N = 1000
SHORT_K = (0.3, 1000.0)
SHORT_SPAN = (3.0, 10.0)
SHORT_NOISE_TO_SD = 0.3
FAILED_MISS = math.log(10.0)
LEARNED_D_SPREAD = 3.0
LEARNED_STEPS = {True: 200, False: 1000}  # by quick
KT = thermal_energy(300.0)
GAMMA = stokes_friction(0.1)


def _tweezepy() -> Any:
    """Import tweezepy; its __init__ needs pkg_resources, gone from setuptools >= 81."""
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")

            class DistributionNotFound(Exception):
                pass

            def get_distribution(_name: str) -> Any:
                raise DistributionNotFound

            shim.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
            shim.get_distribution = get_distribution  # type: ignore[attr-defined]
            sys.modules["pkg_resources"] = shim
    import tweezepy

    return tweezepy


def tweezepy_k(x_um: np.ndarray, dt: float, kind: str) -> float:
    """tweezepy's k (fN/um) by its PSD or AV MLE fit, gamma and tracking error free."""
    tw = _tweezepy()
    kt_pn_nm = KT  # 1 fN um = 1 pN nm
    trace = np.asarray(x_um, dtype=float) * 1e3  # nm
    with redirect_stdout(io.StringIO()), warnings.catch_warnings():  # it prints its failures
        warnings.simplefilter("ignore")
        fit = tw.PSD(trace, 1.0 / dt) if kind == "psd" else tw.AV(trace, 1.0 / dt)
        fit.mlefit(tracking_error=True, kT=kt_pn_nm, radius=100.0, viscosity=1e-9)
    k_pn_nm = float(fit.results["k"])
    return k_pn_nm * 1e6 if math.isfinite(k_pn_nm) and k_pn_nm > 0 else math.nan


def _peer_errors(x: np.ndarray, dt: float, truth: float) -> dict[str, float]:
    out = {}
    for kind in ("psd", "av"):
        try:
            k = tweezepy_k(x, dt, kind)
        except Exception:  # a peer's crash is a failed fit, whatever it raises
            k = math.nan
        out[kind] = abs(math.log(k) - truth) if math.isfinite(k) else math.nan
    return out


def _protocol(noisy: bool, draws: int, seed: int, peers: bool) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    exposure = DT if noisy else 0.0
    noise = NOISE_UM if noisy else 0.0
    err: dict[str, list[float]] = {"ours": [], "limit": [], "psd": [], "av": []}
    for k in np.exp(rng.uniform(math.log(K_MIN), math.log(K_MAX), draws)):
        x = simulate_ou(k, 1000, DT, rng=rng, noise_um=noise, blur=noisy, exposure_s=exposure)
        truth = math.log(k)
        common = {"exposure_s": exposure, "center_um": 0.0, "k_min": K_MIN, "k_max": K_MAX}
        ours = drag_free_posterior(x, DT, **common)
        if noisy:
            lim = known_noise_posterior(x, DT, noise, **common)
        else:
            lim = drag_free_posterior(x, DT, noise_um=0.0, **common)
        err["ours"].append(abs(ours.ln_k_quantile(0.5) - truth))
        err["limit"].append(abs(lim.ln_k_quantile(0.5) - truth))
        if peers:
            for kind, e in _peer_errors(x, DT, truth).items():
                err[kind].append(e)
    return err


def _short(draws: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {"ratio": [], "covered": [], "ours": [], "psd": [], "av": []}
    for _ in range(draws):
        k = math.exp(rng.uniform(*np.log(SHORT_K)))
        tau = GAMMA / k
        dt = rng.uniform(*SHORT_SPAN) * tau / SHORT_N
        noise = rng.uniform(0.0, SHORT_NOISE_TO_SD) * math.sqrt(KT / k)
        x = simulate_ou(k, SHORT_N, dt, rng=rng, noise_um=noise, blur=True, exposure_s=dt)
        post = drag_free_posterior(x, dt, exposure_s=dt)
        med = math.exp(post.ln_k_quantile(0.5))
        lo, hi = math.exp(post.ln_k_quantile(0.025)), math.exp(post.ln_k_quantile(0.975))
        rows["ratio"].append(med / k)
        rows["covered"].append(float(lo <= k <= hi))
        rows["ours"].append(abs(math.log(med / k)))
        for kind, e in _peer_errors(x, dt, math.log(k)).items():
            rows[kind].append(e)
    return rows


def _learned(quick: bool, draws: int, folder: Path, log: Log) -> dict[str, float]:
    cfg = TrainCalibrationConfig(
        checkpoint=str(folder / "learned_drag_free.pt"),
        dt=DT,
        n_points=1000,
        n_points_min=300,
        k_min=K_MIN,
        k_max=K_MAX,
        diffusion_spread=LEARNED_D_SPREAD,
        known_center=True,
        steps=LEARNED_STEPS[quick],
        seed=3,
        log_every=LEARNED_STEPS[quick],
    )
    summary = train_estimator(cfg, log=lambda msg: log(f"learned (D unknown): {msg}"))
    rng = np.random.default_rng(9000)
    err: dict[str, list[float]] = {"learned": [], "ours": []}
    spread = math.log(LEARNED_D_SPREAD)
    for k in np.exp(rng.uniform(math.log(K_MIN), math.log(K_MAX), draws)):
        eta = 1e-3 * math.exp(rng.uniform(-spread, spread))
        x = simulate_ou(k, 1000, DT, rng=rng, viscosity_pa_s=eta)
        est = learned_estimate(x, DT, summary["checkpoint"], center_um=0.0)
        post = drag_free_posterior(x, DT, center_um=0.0, k_min=K_MIN, k_max=K_MAX)
        err["learned"].append(abs(math.log(est.value / k)))
        err["ours"].append(abs(post.ln_k_quantile(0.5) - math.log(k)))
    out = {
        "mae_lnk_n1000_drag_free_learned": float(np.mean(err["learned"])),
        "mae_lnk_n1000_drag_free_random_d": float(np.mean(err["ours"])),
        "learned_drag_free_train_seconds": float(summary["seconds"]),
    }
    log(f"N=1000, D within x/{LEARNED_D_SPREAD:g} unknown ({draws} draws): {out}")
    return out


def _peer_mae(errors: list[float]) -> tuple[float, int]:
    arr = np.asarray(errors, dtype=float)
    failed = int(np.sum(~np.isfinite(arr)))
    return float(np.mean(np.where(np.isfinite(arr), arr, FAILED_MISS))), failed


def run(quick: bool, log: Log) -> dict[str, float | int]:
    draws_n1000 = 24 if quick else 150
    draws_short = 40 if quick else 400
    m: dict[str, float | int] = {}
    for noisy in (False, True):
        tag = "_noisy" if noisy else ""
        err = _protocol(noisy, draws_n1000, seed=7000 + noisy, peers=not noisy)
        ours, lim = float(np.mean(err["ours"])), float(np.mean(err["limit"]))
        m[f"mae_lnk_n1000_drag_free{tag}"] = ours
        m[f"bayes_mae_lnk_n1000_drag_free{tag}"] = lim
        m[f"ratio_n1000_drag_free{tag}"] = ours / lim
        line = f"N=1000 D unknown {'noise+blur' if noisy else 'clean'} ({draws_n1000} draws): "
        line += f"ours {ours:.3f}  limit (noise known) {lim:.3f}"
        if not noisy:
            for kind in ("psd", "av"):
                mae, failed = _peer_mae(err[kind])
                m[f"mae_lnk_n1000_drag_free_tweezepy_{kind}"] = mae
                m[f"tweezepy_{kind}_failed_n1000"] = failed
                line += f"  tweezepy {kind} {mae:.3f} ({failed} failed)"
        log(line)
    rows = _short(draws_short, seed=8000)
    ratio = np.asarray(rows["ratio"])
    m["coverage_95_short"] = float(np.mean(rows["covered"]))
    m["median_bias_short"] = float(abs(np.median(ratio) - 1.0))
    m["mae_lnk_short"] = float(np.mean(rows["ours"]))
    # the sampling error of the median ratio, so a reader can tell bias from noise
    m["median_bias_short_se"] = float(
        1.2533 * np.std(np.log(ratio)) / math.sqrt(ratio.size) * np.median(ratio)
    )
    best = math.inf
    for kind in ("psd", "av"):
        mae, failed = _peer_mae(rows[kind])
        m[f"mae_lnk_short_tweezepy_{kind}"] = mae
        m[f"tweezepy_{kind}_failed_short"] = failed
        best = min(best, mae)
    m["mae_ratio_vs_tweezepy"] = m["mae_lnk_short"] / best
    m["draws_short"] = draws_short
    with tempfile.TemporaryDirectory(prefix="bench-calibration-dragfree-") as tmp:
        m.update(_learned(quick, draws_n1000, Path(tmp), log))
    log(
        f"short records (N={SHORT_N}, {SHORT_SPAN[0]:g}-{SHORT_SPAN[1]:g} relaxation times, "
        f"k {SHORT_K[0]:g}-{SHORT_K[1]:g}, noise <= {SHORT_NOISE_TO_SD:g} sd, blur; "
        f"{draws_short} draws): coverage {m['coverage_95_short']:.3f}, median bias "
        f"{m['median_bias_short']:.3f} (+-{m['median_bias_short_se']:.3f}), MAE ln k ours "
        f"{m['mae_lnk_short']:.3f} vs tweezepy psd {m['mae_lnk_short_tweezepy_psd']:.3f} "
        f"/ av {m['mae_lnk_short_tweezepy_av']:.3f}"
    )
    return m
