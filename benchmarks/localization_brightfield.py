"""Localisation on transmitted-light images: twin brightfield frames and real ones.

1. Twin brightfield (``simulators.brightfield`` through the twin camera): 512 x 512
   frames of 300 polystyrene spheres (r = 0.5 um, 0.1 um/px) as hard spheres, a sixth of
   them in touching pairs, each frame at its own defocus (1-2.5 um: the ring changes),
   vignetting and out-of-focus dust. Every detector runs with parameters estimated
   from the first frame (``agent.detection.detect_auto``), as a new user's first run would.
   Recall within 1.5 px; RMSE per axis of the matched detections over the Cramer-Rao
   bound of an isolated sphere (Fisher information of the expected image under
   Gaussian(λ, λ + read²) noise, position only: a lower bound).
2. Real brightfield (``shared/data/brightfield``, 5 spheres, 50 frames): recall within
   1 px of trackpy's ``locate_brightfield_ring``, seeded by trackpy's ``locate`` with
   the parameters of trackpy's own brightfield tutorial for these frames (feature radius
   7 px: ``locate(frame, 9, minmass=500)`` then ``locate_brightfield_ring(frame, 15,
   previous_coords=...)``). Our detector's parameters are estimated, not given.
3. Linking on a dense field: our online linker against trackpy's (``linking``).
4. Settings outside the headline range (``hard_cases``): in focus, darkfield and the far
   side of focus, 300 spheres per 512^2 each, parameters estimated from the case's own
   first frame; ``recall_in_focus``, ``recall_darkfield``, ``recall_far_side`` within
   1.5 px of twin truth. Full runs add a sweep over more settings (``SWEEP_CASES``:
   sphere size, objective NA, both sides of focus, density), ``recall_sweep_*``.

The twin's images come from Lorenz-Mie scattering under Koehler illumination
(``simulators.brightfield``): the contrast changes strongly with defocus (a 1 um sphere's
centre falls from +3.7 at 1 um to +0.3 at 2.5 um and turns dark at 4 um), so a detector
tuned on the first frame must follow the rest (ring mode refits its filter).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from agent.detection.detect import ParticleDetector
from agent.detection.detect_auto import estimate_config
from simulators.brightfield import contrast_profile, render_contrast
from simulators.camera import CameraConfig, CameraModel

Log = Callable[[str], None]

REAL_DIR = Path(__file__).resolve().parents[1] / "shared" / "data" / "brightfield"
SHARED_REAL_DIR = Path("/work/shared/data/brightfield")
SIZE_PX = 512
N_PARTICLES = 300
PAIR_FRACTION = 1 / 6
PIXEL_UM = 0.1
RADIUS_UM = 0.5
DEFOCUS_UM = (1.0, 1.5, 2.0, 2.5)
# Beyond the headline range: near focus (weak centre) and far out (wide, strong rings),
# still with the parameters estimated from the first (0.5 um) frame.
WIDE_DEFOCUS_UM = (0.5, 1.0, 2.0, 3.0, 4.0)
EXPOSURE_S = 0.002
MATCH_PX = 1.5
REAL_MATCH_PX = 1.0


# Settings the headline range leaves out, each scored against twin truth with the
# parameters estimated from its own first frame: in focus (a weak dark blob), darkfield
# (bright spots on a dark field) and 1.5 um on the far side of focus (a dark centre
# inside a bright ring).
HARD_CASES = {
    "in_focus": ("brightfield", 0.0),
    "darkfield": ("darkfield", 1.0),
    "far_side": ("brightfield", -1.5),
}


def _camera(
    defocus_um: float,
    seed: int,
    contrast: str = "brightfield",
    shape_px: tuple[int, int] = (SIZE_PX, SIZE_PX),
    pixel_size_um: float = PIXEL_UM,
    radius_um: float = RADIUS_UM,
    numerical_aperture: float = 0.9,
) -> CameraModel:
    """The twin camera the brightfield benches share (width, height = shape_px)."""
    cfg = CameraConfig(
        width_px=shape_px[0],
        height_px=shape_px[1],
        pixel_size_um=pixel_size_um,
        contrast=contrast,
        particle_radius_um=radius_um,
        wavelength_um=0.55,
        numerical_aperture=numerical_aperture,
        defocus_um=defocus_um,
        background_photons_per_px_per_ms=500.0,
        gain_adu_per_e=0.1,
        read_noise_e=2.0,
        illumination_falloff=0.2,
        dust_count=6,
    )
    return CameraModel(cfg, seed=seed)


def hard_sphere_field(
    rng: np.random.Generator, n: int, size: int, diameter: float, height: int | None = None
) -> np.ndarray:
    """n (x, y) px centres in a size x (height or size) frame, no two closer than one
    diameter; a share placed touching."""
    margin = diameter
    height = size if height is None else height
    hi = np.array([size - 1 - margin, height - 1 - margin])
    pts: list[np.ndarray] = []

    def free(c: np.ndarray) -> bool:
        if not (margin <= c[0] <= hi[0] and margin <= c[1] <= hi[1]):
            return False
        return not pts or float(np.min(np.hypot(*(np.array(pts) - c).T))) >= diameter * 0.999

    n_pairs = int(n * PAIR_FRACTION / 2)
    while len(pts) < 2 * n_pairs:
        c = rng.uniform(margin, hi)
        angle = rng.uniform(0, 2 * np.pi)
        d = diameter * rng.uniform(1.0, 1.05)
        mate = c + d * np.array([np.cos(angle), np.sin(angle)])
        if free(c) and free(mate) and np.hypot(*(mate - c)) >= diameter * 0.999:
            pts += [c, mate]
    while len(pts) < n:
        c = rng.uniform(margin, hi)
        if free(c):
            pts.append(c)
    return np.array(pts)


def _match(truth: np.ndarray, found: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    if len(truth) == 0 or len(found) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    dist = np.hypot(truth[:, None, 0] - found[None, :, 0], truth[:, None, 1] - found[None, :, 1])
    ti, fi = linear_sum_assignment(np.where(dist <= radius, dist, 1e6))
    ok = dist[ti, fi] <= radius
    return ti[ok], fi[ok]


def brightfield_crb_px(cam: CameraModel) -> float:
    """Per-axis CRB (px) of an isolated sphere's position from its expected image."""
    cfg = cam.config
    prof = contrast_profile(
        cfg.particle_radius_um,
        cfg.particle_refractive_index,
        cfg.medium_refractive_index,
        cfg.wavelength_um,
        cfg.numerical_aperture,
        cfg.defocus_um,
        cfg.pixel_size_um,
        condenser_na=cfg.condenser_na,
    )
    shape = (64, 64)
    bg = cfg.background_photons_per_px_per_ms * EXPOSURE_S * 1e3 * cfg.quantum_efficiency
    h = 1e-3
    centre = np.array([[31.3, 31.7]])
    mu = bg * (1 + render_contrast(shape, centre, prof).astype(np.float64))
    plus = bg * (1 + render_contrast(shape, centre + np.array([h, 0.0]), prof).astype(np.float64))
    minus = bg * (1 + render_contrast(shape, centre - np.array([h, 0.0]), prof).astype(np.float64))
    dmu = (plus - minus) / (2 * h)
    fisher = float(np.sum(dmu * dmu / (mu + cfg.read_noise_e**2 + 1 / (12 * 0.1**2))))
    return 1.0 / math.sqrt(fisher)


def _twin(
    n_frames: int, log: Log, defocus_um: tuple[float, ...] = DEFOCUS_UM, suffix: str = ""
) -> dict[str, float]:
    """Recall, precision and RMSE / CRB on twin frames, one defocus each in turn; the
    parameters are estimated from the first frame only (as a user's first run)."""
    rng = np.random.default_rng(5150)
    frames, truths, crbs = [], [], []
    for k in range(n_frames):
        cam = _camera(defocus_um[k % len(defocus_um)], seed=5150 + k)
        truth = hard_sphere_field(rng, N_PARTICLES, SIZE_PX, 2 * RADIUS_UM / PIXEL_UM)
        frames.append(cam.render(truth[None] * PIXEL_UM, EXPOSURE_S))
        truths.append(truth)
        crbs.append(brightfield_crb_px(cam))
    estimate = estimate_config(frames[:1])
    log(f"twin brightfield {defocus_um} um, first frame: {estimate.summary}")
    metrics: dict[str, float] = {"crb_px_brightfield": float(np.mean(crbs))}
    for name, method in (("centroid", "centroid"), ("radial_symmetry", "radial_symmetry")):
        det = ParticleDetector(estimate.config.model_copy(update={"method": method}))
        tp = n_true = n_found = 0
        errs = []
        per_dz: dict[float, list[int]] = {}
        for k, (frame, truth) in enumerate(zip(frames, truths, strict=True)):
            found = det(frame)
            ti, fi = _match(truth, found, MATCH_PX)
            hits = per_dz.setdefault(defocus_um[k % len(defocus_um)], [0, 0])
            hits[0] += len(ti)
            hits[1] += len(truth)
            tp += len(ti)
            n_true += len(truth)
            n_found += len(found)
            errs.append(found[fi] - truth[ti])
        err = np.concatenate(errs)
        rmse = math.sqrt(float(np.mean(err**2))) if len(err) else math.nan
        metrics[f"recall_brightfield_{name}"] = tp / n_true
        metrics[f"precision_brightfield_{name}"] = tp / n_found if n_found else math.nan
        metrics[f"rmse_px_brightfield_{name}"] = rmse
        metrics[f"rmse_over_crb_brightfield_{name}"] = rmse / metrics["crb_px_brightfield"]
        for dz, (hit, total) in per_dz.items():
            metrics[f"recall_brightfield_{name}_defocus{dz:g}um"] = hit / total
        log(
            f"twin brightfield ({N_PARTICLES} spheres/512^2, defocus {defocus_um} um): {name}"
            f" recall {tp / n_true:.3f}, precision {metrics[f'precision_brightfield_{name}']:.3f},"
            f" RMSE {rmse:.3f} px = {metrics[f'rmse_over_crb_brightfield_{name}']:.1f} x CRB"
        )
    metrics["recall_brightfield"] = metrics["recall_brightfield_radial_symmetry"]
    metrics["rmse_over_crb_brightfield"] = metrics["rmse_over_crb_brightfield_radial_symmetry"]
    return {f"{k}{suffix}": v for k, v in metrics.items()}


def hard_cases(n_frames: int, log: Log) -> dict[str, float]:
    """recall_<case> within MATCH_PX of twin truth for each of HARD_CASES."""
    metrics: dict[str, float] = {}
    for name, (contrast, dz) in HARD_CASES.items():
        rng = np.random.default_rng(5150)
        tp = n_true = 0
        det = None
        for k in range(n_frames):
            cam = _camera(dz, seed=5150 + k, contrast=contrast)
            truth = hard_sphere_field(rng, N_PARTICLES, SIZE_PX, 2 * RADIUS_UM / PIXEL_UM)
            frame = cam.render(truth[None] * PIXEL_UM, EXPOSURE_S)
            if det is None:
                estimate = estimate_config([frame])
                log(f"twin {name} ({contrast}, defocus {dz:g} um): {estimate.summary}")
                det = ParticleDetector(estimate.config)
            ti, _ = _match(truth, det(frame), MATCH_PX)
            tp += len(ti)
            n_true += len(truth)
        metrics[f"recall_{name}"] = tp / n_true
        log(f"twin {name}: recall {tp / n_true:.3f} ({tp}/{n_true})")
    return metrics


# Settings beyond the hard cases (full runs only), each with parameters from its own first
# frame: (contrast, defocus um, sphere radius um, objective NA, spheres per 512^2). Not met
# yet (reported so the gap stays measured): -2.5 um brightfield (~0.55: wide rings
# overlapping at 300 per 512^2; the detector gets ~0.58 even with the true profile) and
# 2 um darkfield (~0.9: flat-topped blobs wider than the touching distance).
SWEEP_CASES = (
    ("brightfield", -2.5, 0.5, 0.9, 300),
    ("brightfield", -0.5, 0.5, 0.9, 300),
    ("brightfield", 0.5, 0.5, 0.9, 300),
    ("darkfield", 0.0, 0.5, 0.9, 300),
    ("darkfield", 2.0, 0.5, 0.9, 300),
    ("darkfield", -1.5, 0.5, 0.9, 300),
    ("brightfield", 1.5, 1.0, 0.9, 100),
    ("brightfield", 0.0, 1.0, 0.9, 100),
    ("brightfield", -2.0, 1.0, 0.9, 100),
    ("brightfield", 0.0, 0.5, 0.5, 300),
    ("brightfield", 2.0, 0.5, 0.5, 300),
    ("brightfield", 3.0, 0.5, 0.9, 60),
)


def sweep(n_frames: int, log: Log) -> dict[str, float]:
    """recall_sweep_<case> within MATCH_PX for each of SWEEP_CASES, and their minimum."""
    metrics: dict[str, float] = {}
    for contrast, dz, radius, na, n in SWEEP_CASES:
        rng = np.random.default_rng(77)
        tp = n_true = n_found = 0
        det = None
        for k in range(n_frames):
            cam = _camera(dz, 77 + k, contrast, radius_um=radius, numerical_aperture=na)
            truth = hard_sphere_field(rng, n, SIZE_PX, 2 * radius / PIXEL_UM)
            frame = cam.render(truth[None] * PIXEL_UM, EXPOSURE_S)
            if det is None:
                estimate = estimate_config([frame])
                det = ParticleDetector(estimate.config)
            found = det(frame)
            tp += len(_match(truth, found, MATCH_PX)[0])
            n_true, n_found = n_true + len(truth), n_found + len(found)
        key = f"recall_sweep_{contrast}_dz{dz:g}_r{radius:g}_na{na:g}_n{n}"
        metrics[key] = tp / n_true
        log(
            f"sweep {contrast} dz {dz:g} um, r {radius:g} um, NA {na:g}, {n} spheres: recall "
            f"{tp / n_true:.3f}, precision {tp / max(n_found, 1):.3f} ({estimate.summary[:60]}...)"
        )
    metrics["recall_sweep_min"] = min(metrics.values())
    return metrics


def _real_dir() -> Path | None:
    for d in (REAL_DIR, SHARED_REAL_DIR):
        if d.is_dir() and any(d.glob("bf_*.png")):
            return d
    return None


def _real(n_frames: int, log: Log) -> dict[str, float]:
    import trackpy

    trackpy.quiet()
    where = _real_dir()
    if where is None:
        log("real brightfield frames not found: real_bf_recall_vs_trackpy is NaN")
        return {"real_bf_recall_vs_trackpy": math.nan}
    files = sorted(where.glob("bf_*.png"))[:n_frames]
    frames = [np.asarray(Image.open(f)) for f in files]
    estimate = estimate_config(frames)
    log(f"real brightfield ({len(frames)} frames): {estimate.summary}")
    det = ParticleDetector(estimate.config)
    hits = n_ref = 0
    dists = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for frame in frames:
            seeds = trackpy.locate(frame, 9, minmass=500)
            seeds["particle"] = np.arange(len(seeds))  # trackpy reports losses by it
            ref = trackpy.locate_brightfield_ring(frame, 15, previous_coords=seeds, processes=1)
            ref_xy = ref[["x", "y"]].to_numpy(dtype=np.float64)
            found = det(frame)
            ti, fi = _match(ref_xy, found, REAL_MATCH_PX)
            hits += len(ti)
            n_ref += len(ref_xy)
            dists.append(np.hypot(*(ref_xy[ti] - found[fi]).T))
    d = np.concatenate(dists) if dists else np.zeros(0)
    recall = hits / n_ref if n_ref else math.nan
    log(
        f"real brightfield: recall vs trackpy's ring fit {recall:.3f} within "
        f"{REAL_MATCH_PX:g} px ({hits}/{n_ref}), median distance {np.median(d):.2f} px"
    )
    return {
        "real_bf_recall_vs_trackpy": recall,
        "real_bf_median_px_vs_trackpy": float(np.median(d)) if d.size else math.nan,
    }


def run(quick: bool, log: Log) -> dict[str, float]:
    """All parts; quick uses 4 twin frames and 10 linking frames (full: 12 and 40)."""
    from benchmarks import localization_dense

    metrics = _twin(4 if quick else 12, log)
    metrics |= _twin(len(WIDE_DEFOCUS_UM), log, WIDE_DEFOCUS_UM, "_wide")
    metrics |= hard_cases(2 if quick else 4, log)
    if not quick:
        metrics |= sweep(2, log)
    metrics |= _real(50, log)  # all 50 frames even when quick: cheap, and the headline
    metrics |= localization_dense.run(quick, log)
    metrics |= linking(10 if quick else 40, log)
    return metrics


def _links(
    ids_a: np.ndarray, ids_b: np.ndarray, truth_a: np.ndarray, truth_b: np.ndarray
) -> tuple[int, int]:
    """(correct, total) frame-to-frame links: same id on the same true particle."""
    same_id = ids_a[:, None] == ids_b[None, :]
    ia, ib = np.nonzero(same_id)
    return int(np.sum(truth_a[ia] == truth_b[ib])), len(truth_a)


def linking(n_frames: int, log: Log) -> dict[str, float]:
    """Our online linker vs trackpy's on a dense diffusing field (detections with noise).

    300 particles per 512^2 px diffusing 1.5 px rms per axis per frame, 5 % of them
    missed each frame, 0.1 px localisation noise: the fraction of true frame-to-frame
    links each linker gets right, and its time per frame.
    """
    import time

    import pandas as pd
    import trackpy

    from agent.detection.tracking import Tracker, TrackerConfig

    trackpy.quiet()
    rng = np.random.default_rng(77)
    pos = hard_sphere_field(rng, N_PARTICLES, SIZE_PX, 10.0)
    frames = []
    for _ in range(n_frames):
        seen = np.flatnonzero(rng.random(len(pos)) > 0.05)
        frames.append((seen, pos[seen] + rng.normal(0, 0.1, (len(seen), 2))))
        pos = pos + rng.normal(0, 1.5, pos.shape)
    reach = 6.0  # px: 4 sigma of a frame's step
    tracker = Tracker(TrackerConfig(max_displacement_um=reach, max_gap_frames=2))
    t0 = time.perf_counter()
    ours = [tracker.update(k, xy) for k, (_, xy) in enumerate(frames)]
    ms_ours = (time.perf_counter() - t0) * 1e3 / n_frames
    table = pd.DataFrame(
        [(k, x, y) for k, (_, xy) in enumerate(frames) for x, y in xy], columns=["frame", "x", "y"]
    )
    t0 = time.perf_counter()
    linked = trackpy.link(table, reach, memory=2)
    ms_tp = (time.perf_counter() - t0) * 1e3 / n_frames
    theirs = [linked.particle.to_numpy()[linked.frame.to_numpy() == k] for k in range(n_frames)]
    metrics: dict[str, float] = {}
    for name, ids, ms in (("ours", ours, ms_ours), ("trackpy", theirs, ms_tp)):
        good = total = 0
        for k in range(1, n_frames):
            g, t = _links(
                np.asarray(ids[k - 1]), np.asarray(ids[k]), frames[k - 1][0], frames[k][0]
            )
            good, total = good + g, total + t
        metrics[f"link_accuracy_{name}"] = good / total
        metrics[f"link_ms_per_frame_{name}"] = ms
    log(
        f"linking {N_PARTICLES} dense diffusing particles, {n_frames} frames: ours "
        f"{metrics['link_accuracy_ours']:.3f} correct links in {ms_ours:.2f} ms/frame, trackpy "
        f"{metrics['link_accuracy_trackpy']:.3f} in {ms_tp:.2f} ms/frame"
    )
    return metrics
