"""Localisation bench: precision against the Cramer-Rao bound, speed, recall/precision.

Detectors: the classical ``ParticleDetector`` (centroid and radial symmetry), the
self-supervised LodeSTAR-style CNN (``agent.detection.lodestar``, trained once at the start on
unlabeled crops of twin frames, the way a user would) and, for speed and recall,
``trackpy.locate`` as the community baseline. All frames come from the twin camera
(``simulators.camera``): pixel-integrated Gaussian PSF, shot, read and ADC noise.

SNR is defined as the peak signal over the background noise: electrons in the
brightest pixel of a spot centred on a pixel, divided by sqrt(background electrons
per pixel + read_noise**2). It is what decides whether a spot can be seen at all, so
detection (miss rate) and localisation (error / CRB) are both plotted against it.

1. SNR sweep on single-particle 64x64 frames at random sub-pixel positions: per-axis
   RMSE / CRB (1.0 is optimal; see ``benchmarks.crb``) and the miss rate. A spot with
   no detection within ``SWEEP_MATCH_PX`` counts as missed and is left out of the RMSE;
   the bias (length of the mean error vector) tells a biased detector from a noisy one.
   RMSE and bias are NaN where a detector found fewer than ``MIN_FOUND`` spots.
2. Speed: median CPU ms per 512x512 frame with 1, 10 and 100 particles, one thread, every
   detector on the same frames in the same run; trackpy's time is the baseline.
3. Recall and precision with 100 well-separated particles at SNR 10 (1 px matching).
4. Transmitted light (``benchmarks.localization_brightfield``): twin brightfield frames
   (rings, defocus, 300 spheres per 512^2, touching pairs) and the real brightfield
   frames against trackpy's ring fit, every detector with estimated parameters.
5. LodeSTAR trained as the live loop trains it, on a twin brightfield stream: recall
   with the live loop's crop seeds (classical hits + DoG blobs) and with classical hits
   alone (``lodestar_live_recall_brightfield``, ``..._classical_seeds``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from agent.detection.detect import DetectorConfig, ParticleDetector
from benchmarks import localization_brightfield, smoke
from benchmarks.crb import mean_position_crb_px, pixel_profile
from simulators.camera import CameraConfig, CameraModel

Log = Callable[[str], None]
Detector = Callable[[np.ndarray], np.ndarray]

PIXEL_UM = 0.1
PSF_SIGMA_PX = 2.0
EXPOSURE_S = 0.01
BG_PHOTONS_PER_PX = 3.0
QE = 0.8
READ_NOISE_E = 1.5
GAIN_ADU_PER_E = 1.0  # 1 ADU/e: ADC rounding adds only 1/12 e^2 (included in the CRB)
SWEEP_FRAME_PX = 64  # big enough for a robust background estimate around one spot
SWEEP_MATCH_PX = 3.0  # 1.5 PSF sigma: farther detections are false alarms, not a fit
MIN_FOUND = 20  # fewer found spots give no meaningful RMSE (NaN instead)
MATCH_PX = 1.0  # recall/precision matching radius
MIN_SEP_PX = 6.0 * PSF_SIGMA_PX
TRAIN_SNR = 10.0
SPEED_COUNTS = (1, 10, 100)
TRACKPY_DIAMETER = 2 * round(2.0 * PSF_SIGMA_PX) + 1  # odd, ~4 sigma + 1


def _noise_e() -> float:
    """Background noise std in electrons, the SNR denominator."""
    return math.sqrt(BG_PHOTONS_PER_PX * QE + READ_NOISE_E**2)


def _peak_fraction() -> float:
    """Share of a spot's electrons in its brightest pixel (spot centred on that pixel)."""
    prof, _ = pixel_profile(0.0, PSF_SIGMA_PX, 1)
    return float(prof[0] ** 2)


def photons_for_snr(snr: float) -> float:
    """Photons per particle per exposure (before QE) that give this peak SNR."""
    return snr * _noise_e() / _peak_fraction() / QE


def crb_for_snr(snr: float) -> float:
    """Per-axis CRB (px) at this SNR for a spot at a random sub-pixel position."""
    read_eff = math.sqrt(READ_NOISE_E**2 + 1.0 / (12.0 * GAIN_ADU_PER_E**2))
    window = 2 * math.ceil(4.0 * PSF_SIGMA_PX) + 1  # the twin's PSF window
    return mean_position_crb_px(
        PSF_SIGMA_PX, photons_for_snr(snr), BG_PHOTONS_PER_PX, read_eff, QE, window
    )


def _camera(size_px: int, snr: float, seed: int) -> CameraModel:
    exposure_ms = EXPOSURE_S * 1e3
    cfg = CameraConfig(
        width_px=size_px,
        height_px=size_px,
        pixel_size_um=PIXEL_UM,
        psf_sigma_um=PSF_SIGMA_PX * PIXEL_UM,
        photons_per_particle_per_ms=photons_for_snr(snr) / exposure_ms,
        background_photons_per_px_per_ms=BG_PHOTONS_PER_PX / exposure_ms,
        quantum_efficiency=QE,
        read_noise_e=READ_NOISE_E,
        gain_adu_per_e=GAIN_ADU_PER_E,
        offset_adu=100.0,
    )
    return CameraModel(cfg, seed=seed)


def _render(cam: CameraModel, xy_px: np.ndarray) -> np.ndarray:
    """Noisy uint16 frame with static particles at (N, 2) pixel positions."""
    return cam.render(xy_px[None] * PIXEL_UM, EXPOSURE_S)


def _separated_positions(
    rng: np.random.Generator, n: int, size_px: int, margin_px: float, min_sep_px: float
) -> np.ndarray:
    """n random (x, y) px positions at least min_sep_px apart (random sequential addition)."""
    out = np.zeros((0, 2))
    for _ in range(200):
        cand = rng.uniform(margin_px, size_px - 1 - margin_px, size=(4 * n, 2))
        for c in cand:
            if len(out) == n:
                return out
            if len(out) == 0 or np.min(np.hypot(*(out - c).T)) >= min_sep_px:
                out = np.vstack([out, c])
    raise RuntimeError(f"could not place {n} particles {min_sep_px} px apart")


def _match(truth: np.ndarray, found: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching (Hungarian) of detections to truth within radius: index pairs."""
    if len(truth) == 0 or len(found) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    dist = np.hypot(truth[:, None, 0] - found[None, :, 0], truth[:, None, 1] - found[None, :, 1])
    cost = np.where(dist <= radius, dist, 1e6)
    ti, fi = linear_sum_assignment(cost)
    ok = dist[ti, fi] <= radius
    return ti[ok], fi[ok]


# --- detectors ---------------------------------------------------------------


def _train_deep(quick: bool, log: Log, seed: int = 0) -> tuple[Detector, dict[str, float]]:
    """Train the LodeSTAR detector on unlabeled crops of twin frames, via its own API."""
    from agent.detection.lodestar import LodeStarConfig, LodeStarDetector, crops_from_frames

    rng = np.random.default_rng(7 + 1000 * seed)
    cam = _camera(128, TRAIN_SNR, seed=7)
    # A jittered 3 x 3 grid per frame: isolated spots, the crops the method is meant for.
    grid = np.array([(x, y) for x in (24.0, 64.0, 104.0) for y in (24.0, 64.0, 104.0)])
    frames = [_render(cam, grid + rng.uniform(-2.0, 2.0, grid.shape)) for _ in range(40)]
    config = LodeStarConfig(crop_px=32, seed=seed, **({"train_steps": 600} if quick else {}))
    crops = crops_from_frames(frames, config.crop_px, 300, rng)
    det = LodeStarDetector(config)
    stats = det.fit(crops)
    log(
        f"deep detector: trained on {len(crops)} unlabeled crops in {stats['seconds']:.1f} s "
        f"({stats.get('attempts', 1):.0f} attempt(s), converged={bool(stats.get('converged'))}, "
        f"held-out equivariance {stats.get('eq_rms_px', float('nan')):.3f} px)"
    )
    return det, stats


def _seed_success(n_seeds: int, quick: bool, log: Log) -> dict[str, float]:
    """Does training converge reliably? Success: the self-check passes AND the trained
    detector finds every particle at SNR 10 within 1.5x the CRB (labels used only here)."""
    snr, n_frames = 10.0, 40
    cam = _camera(SWEEP_FRAME_PX, snr, seed=4242)
    rng = np.random.default_rng(4242)
    truths = (SWEEP_FRAME_PX - 1) / 2.0 + rng.uniform(-1.5, 1.5, size=(n_frames, 2))
    frames = [_render(cam, t[None]) for t in truths]
    successes, seconds = 0, []
    for seed in range(n_seeds):
        det, stats = _train_deep(quick, lambda _m: None, seed=seed)
        seconds.append(float(stats["seconds"]))
        errors = []
        for frame, truth in zip(frames, truths, strict=True):
            found = det(frame)
            d = np.hypot(*(found - truth).T) if len(found) else np.zeros(0)
            errors.append(float(d.min()) if len(d) else math.inf)
        rmse = math.sqrt(float(np.mean(np.square(errors))))
        ok = bool(stats.get("converged")) and rmse <= 1.5 * crb_for_snr(snr)
        successes += ok
        log(
            f"deep seed {seed}: {stats['seconds']:.1f} s, converged={bool(stats.get('converged'))},"
            f" RMSE {rmse:.3f} px at SNR 10 -> {'ok' if ok else 'FAILED'}"
        )
    return {
        "deep_seeds": float(n_seeds),
        "deep_success_rate_seeds": successes / n_seeds,
        "deep_train_s_max": max(seconds),
    }


def _trackpy_locate(minmass: float) -> Detector:
    """trackpy.locate with the bench's diameter and a tuned minmass, as (N, 2) (x, y)."""
    import trackpy

    def locate(frame: np.ndarray) -> np.ndarray:
        f = trackpy.locate(frame, TRACKPY_DIAMETER, minmass=minmass, characterize=False)
        return f[["x", "y"]].to_numpy(dtype=np.float64)

    return locate


def _tune_trackpy(log: Log) -> float:
    """minmass maximising F1 on a calibration frame (100 particles, SNR 10, own seed).

    trackpy's mass threshold is in post-bandpass intensity units and has no default
    that fits a given camera, so a fair comparison picks the best one from labelled data.
    """
    import trackpy

    trackpy.quiet()
    rng = np.random.default_rng(99)
    cam = _camera(512, 10.0, seed=99)
    truth = _separated_positions(rng, 100, 512, 8.0, MIN_SEP_PX)
    frame = _render(cam, truth)
    f = trackpy.locate(frame, TRACKPY_DIAMETER, minmass=0, characterize=False)
    found = f[["x", "y"]].to_numpy(dtype=np.float64)
    mass = f["mass"].to_numpy(dtype=np.float64)
    _, fi = _match(truth, found, MATCH_PX)
    is_true = np.zeros(len(found), bool)
    is_true[fi] = True
    order = np.argsort(-mass)
    tp = np.cumsum(is_true[order])
    k = np.arange(1, len(order) + 1)
    f1 = 2 * tp / (k + len(truth))
    best = int(np.argmax(f1))
    minmass = float(mass[order[best]] * 0.999)
    log(f"trackpy: diameter {TRACKPY_DIAMETER}, tuned minmass {minmass:.0f} (F1 {f1[best]:.3f})")
    return minmass


# --- bench parts -------------------------------------------------------------


def _sweep(
    dets: dict[str, Detector], snrs: tuple[float, ...], n_frames: int, log: Log
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    size = SWEEP_FRAME_PX
    for snr in snrs:
        rng = np.random.default_rng(1000 + int(snr * 10))
        cam = _camera(size, snr, seed=1000 + int(snr * 10))
        crb = crb_for_snr(snr)
        truths = (size - 1) / 2.0 + rng.uniform(-1.5, 1.5, size=(n_frames, 2))
        frames = [_render(cam, t[None]) for t in truths]
        k = f"{snr:g}"
        parts = []
        for name, det in dets.items():
            errs = []
            missed = 0
            for frame, t in zip(frames, truths, strict=True):
                found = det(frame)
                d = np.hypot(*(found - t).T) if len(found) else np.zeros(0)
                if len(d) == 0 or d.min() > SWEEP_MATCH_PX:
                    missed += 1
                    continue
                errs.append(found[int(np.argmin(d))] - t)
            enough = len(errs) >= MIN_FOUND
            rmse = math.sqrt(float(np.mean(np.square(errs)))) if enough else math.nan
            metrics[f"rmse_over_crb_{name}_snr{k}"] = rmse / crb
            metrics[f"rmse_px_{name}_snr{k}"] = rmse
            # Systematic offset (px): separates a biased detector from a noisy one.
            bias = float(np.hypot(*np.mean(errs, axis=0))) if enough else math.nan
            metrics[f"bias_px_{name}_snr{k}"] = bias
            metrics[f"miss_rate_{name}_snr{k}"] = missed / n_frames
            parts.append(
                f"{name} {rmse / crb:.2f} x CRB (bias {bias:.3f} px, miss {missed / n_frames:.0%})"
            )
        metrics[f"crb_px_snr{k}"] = crb
        log(f"SNR {k:>3} (CRB {crb:.3f} px): " + ", ".join(parts))
    return metrics


def _speed(dets: dict[str, Detector], reps: int, log: Log) -> dict[str, float]:
    """Median ms per 512x512 frame; detectors interleaved on the same frames. CPU time
    of the process (every detector runs on one thread here), so other load on a shared
    machine does not count; on an idle one it equals wall time."""
    metrics: dict[str, float] = {}
    for n in SPEED_COUNTS:
        rng = np.random.default_rng(2000 + n)
        cam = _camera(512, 10.0, seed=2000 + n)
        frames = [
            _render(cam, _separated_positions(rng, n, 512, 8.0, MIN_SEP_PX)) for _ in range(3)
        ]
        times: dict[str, list[float]] = {name: [] for name in dets}
        for det in dets.values():
            det(frames[0])  # warm-up: caches, plans, first-call allocations
        for r in range(reps):
            frame = frames[r % len(frames)]
            for name, det in dets.items():
                t0 = time.process_time()
                det(frame)
                times[name].append((time.process_time() - t0) * 1e3)
        for name, ts in times.items():
            metrics[f"ms_{name}_512_{n}p"] = float(np.median(ts))
        log(
            f"512x512, {n:>3} particles: "
            + ", ".join(f"{name} {metrics[f'ms_{name}_512_{n}p']:.2f} ms" for name in dets)
        )
    return metrics


def _recall(dets: dict[str, Detector], n_frames: int, log: Log) -> dict[str, float]:
    """Pooled recall and precision over frames of 100 particles at SNR 10."""
    metrics: dict[str, float] = {}
    rng = np.random.default_rng(3000)
    cam = _camera(512, 10.0, seed=3000)
    truths = [_separated_positions(rng, 100, 512, 8.0, MIN_SEP_PX) for _ in range(n_frames)]
    frames = [_render(cam, t) for t in truths]
    parts = []
    for name, det in dets.items():
        tp = n_found = n_true = 0
        for frame, truth in zip(frames, truths, strict=True):
            found = det(frame)
            ti, _ = _match(truth, found, MATCH_PX)
            tp += len(ti)
            n_found += len(found)
            n_true += len(truth)
        recall = tp / n_true
        precision = tp / n_found if n_found else math.nan
        metrics[f"recall_{name}_100p_snr10"] = recall
        metrics[f"precision_{name}_100p_snr10"] = precision
        parts.append(f"{name} recall {recall:.3f} precision {precision:.3f}")
    log("100 particles, SNR 10, 1 px matching: " + ", ".join(parts))
    return metrics


LIVE_BF_SPHERES = 150  # per 512^2 frame, at the larger defoci: the classical detector misses
LIVE_BF_DEFOCUS_UM = (2.0, 2.5)


def _brightfield_stream(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Twin brightfield frames of a live stream: hard spheres with touching pairs, each
    frame at the next defocus of the cycle (rings change), vignetting and dust."""
    bf = localization_brightfield
    frames, truths = [], []
    for k in range(n):
        cam = bf._camera(LIVE_BF_DEFOCUS_UM[k % len(LIVE_BF_DEFOCUS_UM)], seed=seed + k)
        rng = np.random.default_rng(seed + k)
        truth = bf.hard_sphere_field(rng, LIVE_BF_SPHERES, bf.SIZE_PX, 2 * bf.RADIUS_UM / PIXEL_UM)
        frames.append(cam.render(truth[None] * PIXEL_UM, bf.EXPOSURE_S))
        truths.append(truth)
    return frames, truths


def _live_lodestar_brightfield(quick: bool, log: Log) -> dict[str, float]:
    """LodeSTAR trained the way the live loop trains it (``train_from_frames`` on a frame
    stream, no labels) on a twin brightfield stream where the classical detector misses
    spheres (defocused rings: ~1 in 5 at 2.5 um); recall within 1.5 px on held-out frames
    of the same stream, with crops seeded by classical hits + DoG blobs (the live loop's)
    and by classical hits alone, beside the adaptive classical detector itself. Truth is
    used only to score."""
    from agent.detection.detect_auto import estimate_config
    from agent.detection.detectors import DetectorSettings, train_from_frames

    n_train, n_test = (12, 4) if quick else (32, 8)
    frames, _ = _brightfield_stream(n_train, seed=7100)
    test, truths = _brightfield_stream(n_test, seed=9100)
    lodestar = {"train_frames": 8 if quick else 24, "max_train_frames": n_train}
    if quick:
        lodestar["train_steps"] = 400
    settings = DetectorSettings.model_validate({"kind": "lodestar", "lodestar": lodestar})

    def score(det: Detector) -> tuple[float, float]:
        tp = n_found = n_true = 0
        for frame, truth in zip(test, truths, strict=True):
            found = np.asarray(det(frame)).reshape(-1, 2)
            tp += len(localization_brightfield._match(truth, found, 1.5)[0])
            n_found += len(found)
            n_true += len(truth)
        return tp / n_true, (tp / n_found if n_found else math.nan)

    metrics: dict[str, float] = {}
    classical = ParticleDetector(estimate_config(frames[:5]).config)
    recall, precision = score(classical)
    metrics["classical_recall_brightfield_stream"] = recall
    metrics["classical_precision_brightfield_stream"] = precision
    for key, sources in (("", ("classical", "blob")), ("_classical_seeds", ("classical",))):
        model, stats = train_from_frames(settings, iter(frames), log=log, sources=sources)
        recall, precision = score(model)
        metrics[f"lodestar_live_recall_brightfield{key}"] = recall
        metrics[f"lodestar_live_precision_brightfield{key}"] = precision
        metrics[f"lodestar_live_converged_brightfield{key}"] = float(bool(stats["converged"]))
        metrics[f"lodestar_live_crops_blob_brightfield{key}"] = stats["crops_blob"]
        metrics[f"lodestar_live_crops_classical_brightfield{key}"] = stats["crops_classical"]
    log(
        f"live-trained LodeSTAR on a twin brightfield stream ({LIVE_BF_SPHERES} spheres/512^2):"
        f" recall {metrics['lodestar_live_recall_brightfield']:.3f} with hits + DoG-blob seeds,"
        f" {metrics['lodestar_live_recall_brightfield_classical_seeds']:.3f} with classical"
        f" seeds only; the classical detector {metrics['classical_recall_brightfield_stream']:.3f}"
    )
    return metrics


def run(quick: bool = False, log: Log = print) -> dict[str, float]:
    """Run the whole bench; quick trims SNR points, frames and repeats (not the method)."""
    t_start = time.perf_counter()
    metrics: dict[str, float] = {}
    snrs = (5.0, 10.0, 20.0) if quick else (2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
    n_sweep = 60 if quick else 250
    dets: dict[str, Detector] = {
        "centroid": ParticleDetector(DetectorConfig(method="centroid")),
        "radial_symmetry": ParticleDetector(DetectorConfig(method="radial_symmetry")),
    }
    deep, stats = _train_deep(quick, log)
    dets["deep"] = deep
    metrics["deep_train_s"] = float(stats["seconds"])
    metrics["deep_converged"] = float(bool(stats.get("converged", 0.0)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # speed is reported per core, like the classical detectors
    try:
        metrics |= _sweep(dets, snrs, n_sweep, log)
        metrics["deep_rmse_over_crb_snr5"] = metrics["rmse_over_crb_deep_snr5"]
        metrics["radial_rmse_over_crb_snr10"] = metrics["rmse_over_crb_radial_symmetry_snr10"]

        with_tp = dict(dets)
        # Parameters estimated from the first frame it sees, as a new user's run.
        with_tp["radial_symmetry_auto"] = ParticleDetector(DetectorConfig(adapt=True))
        with_tp["trackpy"] = _trackpy_locate(_tune_trackpy(log))
        metrics |= _speed(with_tp, 7 if quick else 21, log)
        ref = metrics["ms_trackpy_512_100p"]
        metrics["speedup_vs_trackpy_100p"] = ref / metrics["ms_radial_symmetry_auto_512_100p"]
        metrics["speedup_vs_trackpy_100p_fixed_params"] = (
            ref / metrics["ms_radial_symmetry_512_100p"]
        )
        metrics["deep_speedup_vs_trackpy_100p"] = ref / metrics["ms_deep_512_100p"]
        log(
            f"speed-up vs trackpy at 100 particles: radial symmetry "
            f"{metrics['speedup_vs_trackpy_100p']:.1f}x, deep "
            f"{metrics['deep_speedup_vs_trackpy_100p']:.2f}x"
        )
        metrics |= _recall(with_tp, 2 if quick else 6, log)
        metrics |= localization_brightfield.run(quick, log)
        torch.set_num_threads(threads)  # training uses both cores, as in live use
        metrics |= _seed_success(1 if smoke(quick) else 3 if quick else 10, quick, log)
        if smoke(quick):  # two trainings; tests/test_training_crops.py covers the seeding
            metrics["smoke_sections_left_out"] = 1
        else:
            metrics |= _live_lodestar_brightfield(quick, log)
    finally:
        torch.set_num_threads(threads)
    metrics["bench_s"] = time.perf_counter() - t_start
    return metrics
