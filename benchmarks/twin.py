"""Particle-twin bench: how fast the digital twin makes frames, and whether its noise is right.

- speed: `ParticleScene.expose` for a 512x512 camera, 100 particles, 5 sub-steps and a
  30 ms exposure (default noise), Gaussian and Airy PSF; best of several timed runs,
  since the machine is shared. Run with OMP_NUM_THREADS=1 to measure one core.
- tweezers: the same frames with 10 optical-tweezers spots of 5 mW on, the learned
  Mie-force surrogate (`trap_model: surrogate`) vs a harmonic trap of the same centre
  stiffness (`tweezers_surrogate_fps_ratio`, surrogate frames/s over harmonic) and vs
  the default, 200x softer harmonic trap (`..._vs_default`: that one also skips the
  stiff-trap integrator), timed in interleaved rounds.
- statistics: large flat frames (read noise 0, gain 1, offset 0) at 2, 20 and 200
  expected electrons per pixel; mean and variance must both equal λ (Poisson), which
  the fast table sampler must not trade away for speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from policies.contract import LaserSpot
from simulators.camera import CameraConfig, CameraModel
from simulators.particles import ParticleTwinConfig
from simulators.scene import ParticleScene

Log = Callable[[str], None]
EXPOSURE_S = 0.03


def _expose_ms(psf: str, frames: int, repeats: int) -> float:
    """Best per-frame time over `repeats` runs of `frames` exposures, after warm-up."""
    scene = ParticleScene(
        ParticleTwinConfig(n_particles=100, initial="random"),
        CameraConfig(width_px=512, height_px=512, psf=psf),  # type: ignore[arg-type]
        seed=0,
        substeps=5,
    )
    out = np.empty((512, 512), np.uint16)
    for _ in range(10):
        scene.expose(EXPOSURE_S, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(frames):
            scene.expose(EXPOSURE_S, out=out)
        best = min(best, (time.perf_counter() - t0) / frames)
    return best * 1e3


def _tweezers_scene(trap_model: str, **trap: float) -> ParticleScene:
    scene = ParticleScene(
        ParticleTwinConfig(
            n_particles=100,
            initial="random",
            actuator="tweezers",
            trap_model=trap_model,  # type: ignore[arg-type]
            particle_radius_um=0.5,
            **trap,  # type: ignore[arg-type]
        ),
        CameraConfig(width_px=512, height_px=512),
        seed=0,
        substeps=5,
    )
    ring = np.linspace(0.0, 2.0 * np.pi, 10, endpoint=False)
    scene.twin.set_laser(
        [LaserSpot(25.0 + 10.0 * np.cos(a), 25.0 + 10.0 * np.sin(a), 5.0) for a in ring]
    )
    return scene


def _tweezers_ms(frames: int, repeats: int) -> dict[str, float]:
    """Best per-frame ms of the surrogate trap, of a harmonic trap matched to it (same
    centre stiffness, Gaussian cut at the surrogate's peak-force distance: the same
    physics class, so the same stiff-trap integrator) and of the default harmonic trap,
    measured in alternating rounds."""
    surrogate = _tweezers_scene("surrogate")
    trap = surrogate.twin.trap
    assert trap is not None
    rho = np.linspace(0.0, trap.rho_max_um, 2001)
    peak_um = float(rho[np.argmax(trap.secant_stiffness_fn_per_um_per_mw(rho) * rho)])
    scenes = {
        "surrogate": surrogate,
        "harmonic_matched": _tweezers_scene(
            "harmonic",
            trap_stiffness_fn_per_um_per_mw=trap.stiffness_fn_per_um_per_mw,
            trap_range_um=peak_um,
        ),
        "harmonic_default": _tweezers_scene("harmonic"),
    }
    out = np.empty((512, 512), np.uint16)
    best = dict.fromkeys(scenes, float("inf"))
    for scene in scenes.values():
        for _ in range(5):
            scene.expose(EXPOSURE_S, out=out)
    for _ in range(repeats):
        for model, scene in scenes.items():
            t0 = time.perf_counter()
            for _ in range(frames):
                scene.expose(EXPOSURE_S, out=out)
            best[model] = min(best[model], (time.perf_counter() - t0) / frames)
    return {k: v * 1e3 for k, v in best.items()}


def _noise_errors(mean_e: float, frames: int, lit: bool = False) -> tuple[float, float]:
    """(|mean/λ - 1|, |var/λ - 1|) over `frames` flat 1024x1024 frames at λ = mean_e.

    lit=True puts half of λ in hot pixels (10 % of the frame) and measures those, which
    exercises the per-pixel chain that particles use instead of the background table.
    """
    bg_e = mean_e / 2.0 if lit else mean_e
    cfg = CameraConfig(
        hot_pixel_fraction=0.1 if lit else 0.0,
        hot_pixel_e_per_ms=(mean_e - bg_e) / (EXPOSURE_S * 1e3),
        width_px=1024,
        height_px=1024,
        read_noise_e=0.0,
        gain_adu_per_e=1.0,
        offset_adu=0.0,
        quantum_efficiency=1.0,
        background_photons_per_px_per_ms=bg_e / (EXPOSURE_S * 1e3),
    )
    cam = CameraModel(cfg, seed=1)
    none = np.zeros((1, 0, 2))
    f = np.stack([cam.render(none, EXPOSURE_S).ravel() for _ in range(frames)]).astype(float)
    if lit:
        f = f[:, cam.hot_pixels]
    return float(abs(f.mean() / mean_e - 1.0)), float(abs(f.var() / mean_e - 1.0))


def run(quick: bool = False, log: Log = print) -> dict[str, float]:
    """Measure twin speed (frames/s) and shot-noise fidelity; returns flat metrics."""
    frames, repeats = (50, 3) if quick else (200, 5)
    metrics: dict[str, float] = {}
    gauss_ms = _expose_ms("gaussian", frames, repeats)
    metrics["ms_per_frame_512_100p"] = gauss_ms
    metrics["frames_per_s_512_100p"] = 1e3 / gauss_ms
    log(f"expose 512x512, 100 particles x 5 sub-steps, gaussian: {gauss_ms:.2f} ms/frame")
    airy_ms = _expose_ms("airy", frames, repeats)
    metrics["ms_per_frame_512_100p_airy"] = airy_ms
    metrics["frames_per_s_512_100p_airy"] = 1e3 / airy_ms
    log(f"expose 512x512, 100 particles x 5 sub-steps, airy: {airy_ms:.2f} ms/frame")
    tw = _tweezers_ms(frames // 2, repeats)
    metrics["ms_per_frame_512_100p_tweezers_surrogate"] = tw["surrogate"]
    metrics["ms_per_frame_512_100p_tweezers_harmonic"] = tw["harmonic_matched"]
    metrics["ms_per_frame_512_100p_tweezers_harmonic_default"] = tw["harmonic_default"]
    metrics["tweezers_surrogate_fps_ratio"] = tw["harmonic_matched"] / tw["surrogate"]
    metrics["tweezers_surrogate_fps_ratio_vs_default"] = tw["harmonic_default"] / tw["surrogate"]
    log(
        f"tweezers, 10 spots x 5 mW: surrogate {tw['surrogate']:.2f} ms/frame, harmonic of "
        f"the same stiffness {tw['harmonic_matched']:.2f} (fps ratio "
        f"{metrics['tweezers_surrogate_fps_ratio']:.3f}), default soft harmonic "
        f"{tw['harmonic_default']:.2f} "
        f"(ratio {metrics['tweezers_surrogate_fps_ratio_vs_default']:.3f})"
    )
    worst = worst_lit = 0.0
    for mean_e in (2.0, 20.0, 200.0):
        err_mean, err_var = _noise_errors(mean_e, 2 if quick else 8)
        metrics[f"noise_mean_error_{mean_e:g}e"] = err_mean
        metrics[f"noise_var_error_{mean_e:g}e"] = err_var
        worst = max(worst, err_mean, err_var)
        log(f"flat {mean_e:g} e: |mean/λ-1| = {err_mean:.4f}, |var/λ-1| = {err_var:.4f}")
        lit_mean, lit_var = _noise_errors(mean_e, 2 if quick else 8, lit=True)
        metrics[f"noise_lit_mean_error_{mean_e:g}e"] = lit_mean
        metrics[f"noise_lit_var_error_{mean_e:g}e"] = lit_var
        worst_lit = max(worst_lit, lit_mean, lit_var)
        log(f"lit {mean_e:g} e: |mean/λ-1| = {lit_mean:.4f}, |var/λ-1| = {lit_var:.4f}")
    metrics["noise_var_error_max"] = worst
    metrics["noise_lit_var_error_max"] = worst_lit
    return metrics
