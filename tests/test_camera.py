"""Image-formation checks: noise statistics, saturation, PSF placement, blur and flux."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from policies.contract import LaserSpot
from simulators.camera import CameraConfig, CameraModel
from simulators.particles import ParticleTwinConfig
from simulators.scene import ParticleScene


def _ideal(**kw: object) -> CameraConfig:
    """Unit-gain, noiseless-readout camera so pixel values are electron counts."""
    base: dict[str, object] = {
        "read_noise_e": 0.0,
        "gain_adu_per_e": 1.0,
        "offset_adu": 0.0,
        "quantum_efficiency": 1.0,
    }
    base.update(kw)
    return CameraConfig(**base)  # type: ignore[arg-type]


def _centroid(img: np.ndarray, p: float) -> tuple[float, float]:
    rows, cols = np.indices(img.shape)
    s = img.sum()
    return float((img * cols).sum() / s * p), float((img * rows).sum() / s * p)


@pytest.mark.parametrize("mean_e", [2.0, 20.0, 200.0])
def test_flat_background_is_poisson(mean_e: float) -> None:
    """Mean and variance both equal λ below, at and above the Gaussian switch-over."""
    exposure = 0.01
    cfg = _ideal(width_px=512, height_px=512, background_photons_per_px_per_ms=mean_e / 10.0)
    cam = CameraModel(cfg, seed=0)
    none = np.zeros((1, 0, 2))
    np.testing.assert_allclose(cam.expected_electrons(none, exposure), mean_e, rtol=1e-6)
    frames = np.stack([cam.render(none, exposure) for _ in range(4)]).astype(float)
    assert frames.mean() == pytest.approx(mean_e, rel=0.02)
    assert frames.var() == pytest.approx(mean_e, rel=0.02)
    if mean_e < 20.0:  # exact Poisson: integer electrons and the right zero fraction
        assert np.mean(frames == 0) == pytest.approx(np.exp(-mean_e), rel=0.05)


def test_read_noise_gain_offset_chain() -> None:
    """ADU = gain * (Poisson + read noise) + offset: check mean and variance propagate."""
    cfg = CameraConfig(
        width_px=512,
        height_px=512,
        background_photons_per_px_per_ms=1.0,
        quantum_efficiency=0.5,
        read_noise_e=3.0,
        gain_adu_per_e=2.0,
        offset_adu=100.0,
    )
    cam = CameraModel(cfg, seed=1)
    exposure = 0.02  # 10 e per pixel
    f = np.stack([cam.render(np.zeros((1, 0, 2)), exposure) for _ in range(3)]).astype(float)
    assert f.mean() == pytest.approx(100.0 + 2.0 * 10.0, rel=0.01)
    # rounding adds 1/12 ADU^2
    assert f.var() == pytest.approx(4.0 * (10.0 + 9.0) + 1 / 12, rel=0.03)


def test_saturation_clips_at_full_scale() -> None:
    """A very bright particle saturates the ADC at 2**bit_depth - 1, never wraps."""
    cfg = CameraConfig(width_px=64, height_px=64, bit_depth=12, photons_per_particle_per_ms=1e7)
    cam = CameraModel(cfg, seed=0)
    frame = cam.render(np.array([[[3.2, 3.2]]]), 0.03)
    assert frame.dtype == np.uint16 and frame.shape == (64, 64)
    assert frame.max() == 4095
    assert np.sum(frame == 4095) > 4
    assert frame.min() >= 0 and frame[0, 0] < 4095


@pytest.mark.parametrize("xy", [(3.2, 4.7), (6.337, 2.011), (1.07, 5.53)])
def test_single_particle_centroid_at_true_position(xy: tuple[float, float]) -> None:
    """Noise-free image of one particle is centred on its true position within 0.02 px."""
    cfg = _ideal(width_px=96, height_px=80, background_photons_per_px_per_ms=0.0)
    cam = CameraModel(cfg, seed=0)
    img = cam.expected_electrons(np.array([[xy]]), 0.03).astype(float)
    cx, cy = _centroid(img, cfg.pixel_size_um)
    p = cfg.pixel_size_um
    assert abs(cx - xy[0]) / p < 0.02
    assert abs(cy - xy[1]) / p < 0.02
    # Pixel (row i, col j) centre is (j p, i p): the brightest pixel is the nearest one.
    i, j = np.unravel_index(np.argmax(img), img.shape)
    assert (j, i) == (round(xy[0] / p), round(xy[1] / p))


def test_motion_blur_elongates_along_motion() -> None:
    """Moving along x during the exposure gives a wider x profile than y profile."""
    cfg = _ideal(width_px=128, height_px=128, background_photons_per_px_per_ms=0.0)
    cam = CameraModel(cfg, seed=0)
    sub = np.array([[[4.0 + 0.4 * k, 6.0]] for k in range(5)])  # (S=5, N=1, 2)
    img = cam.expected_electrons(sub, 0.03).astype(float)
    rows, cols = np.indices(img.shape)
    cx, cy = _centroid(img, 1.0)
    var_x = (img * (cols - cx) ** 2).sum() / img.sum()
    var_y = (img * (rows - cy) ** 2).sum() / img.sum()
    assert var_x > 2.0 * var_y
    assert cx * cfg.pixel_size_um == pytest.approx(4.8, abs=0.01)  # centred on the mean path
    still = cam.expected_electrons(sub[:1].repeat(5, axis=0), 0.03)
    assert still.sum() == pytest.approx(img.sum(), rel=1e-5)  # blur moves light, not adds


def test_total_expected_electrons() -> None:
    """Sum of the noise-free image = photons * QE * exposure * N + background * pixels."""
    cfg = CameraConfig(width_px=200, height_px=150)
    cam = CameraModel(cfg, seed=0)
    exposure = 0.05
    rng = np.random.default_rng(0)
    pos = rng.uniform([2.0, 2.0], [17.0, 12.0], size=(3, 7, 2))  # well inside the frame
    img = cam.expected_electrons(pos, exposure)
    assert img.dtype == np.float32 and img.shape == (150, 200)
    q = cfg.quantum_efficiency
    expect = (
        cfg.photons_per_particle_per_ms * exposure * 1e3 * q * 7
        + cfg.background_photons_per_px_per_ms * exposure * 1e3 * q * 200 * 150
    )
    assert float(img.sum(dtype=np.float64)) == pytest.approx(expect, rel=1e-3)


def test_offframe_particles_are_skipped() -> None:
    """Particles far outside the field add no light; ones on the edge add partial light."""
    cfg = _ideal(width_px=32, height_px=32, background_photons_per_px_per_ms=0.0)
    cam = CameraModel(cfg, seed=0)
    far = cam.expected_electrons(np.array([[[-50.0, 1.0], [1.0, 1e6]]]), 0.01)
    assert far.sum() == 0.0
    edge = cam.expected_electrons(np.array([[[0.0, 1.6]]]), 0.01)
    full = cfg.photons_per_particle_per_ms * 10.0
    assert 0.45 * full < edge.sum() < 0.7 * full


def test_field_and_box() -> None:
    """box_um spans pixel centres; field_um the full sensor."""
    cfg = CameraConfig(width_px=100, height_px=50, pixel_size_um=0.2)
    assert cfg.field_um == pytest.approx((20.0, 10.0))
    assert cfg.box_um == pytest.approx((0.0, 19.8, 0.0, 9.8))


def test_camera_rng_is_reproducible_and_out_buffer_used() -> None:
    """Same seed gives the same frame; `out` is filled in place."""
    cfg = CameraConfig(width_px=64, height_px=64)
    pos = np.array([[[3.0, 3.0]]])
    a = CameraModel(cfg, seed=3).render(pos, 0.03)
    buf = np.zeros((64, 64), np.uint16)
    b = CameraModel(cfg, seed=3).render(pos, 0.03, out=buf)
    assert b is buf
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"quantum_efficiency": 1.5}, "quantum_efficiency"),
        ({"bit_depth": 20}, "bit_depth"),
        ({"width_px": 4}, "width_px"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_camera_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    """Bad values fail with a pydantic error that points at the offending field."""
    with pytest.raises(ValidationError) as err:
        CameraConfig(**kwargs)  # type: ignore[arg-type]
    assert field in str(err.value)


def test_scene_expose_shapes_callback_and_blur() -> None:
    """Scene runs S sub-steps, calls back before each, and the frame shows the particle."""
    cam_cfg = CameraConfig(width_px=128, height_px=128)
    scene = ParticleScene(ParticleTwinConfig(n_particles=3), cam_cfg, seed=0, substeps=4)
    calls: list[tuple[int, float]] = []

    def callback(sc: ParticleScene) -> Callable[[int, float], None]:
        def cb(k: int, t: float) -> None:
            calls.append((k, t))
            if k == 2:  # a mid-exposure laser change
                sc.twin.set_laser([LaserSpot(1.0, 1.0, 1.0)])

        return cb

    frame, traj = scene.expose(0.04, before_substep=callback(scene))
    assert frame.dtype == np.uint16 and frame.shape == (128, 128)
    assert traj.shape == (4, 3, 2)
    assert [k for k, _ in calls] == [0, 1, 2, 3]
    assert scene.twin.laser == (LaserSpot(1.0, 1.0, 1.0),)
    np.testing.assert_allclose([t for _, t in calls], [0.0, 0.01, 0.02, 0.03], atol=1e-12)
    assert scene.twin.t_s == pytest.approx(0.04)
    np.testing.assert_array_equal(traj[-1], scene.twin.positions_um)
    cx, cy = traj[:, 0].mean(axis=0)
    i, j = round(cy / cam_cfg.pixel_size_um), round(cx / cam_cfg.pixel_size_um)
    assert frame[i, j] > np.median(frame) + 20  # bright spot where the particle is
    # Same seed replays the same frames; twin and camera streams are independent.
    again = ParticleScene(ParticleTwinConfig(n_particles=3), cam_cfg, seed=0, substeps=4)
    frame2, traj2 = again.expose(0.04, before_substep=callback(again))
    np.testing.assert_array_equal(frame, frame2)
    np.testing.assert_array_equal(traj, traj2)


def test_render_timing_report() -> None:
    """Print (not assert) render times; run with -s to see them."""
    for w, n, s in [(256, 1, 1), (512, 100, 5)]:
        cam = CameraModel(CameraConfig(width_px=w, height_px=w), seed=0)
        rng = np.random.default_rng(0)
        pos = rng.uniform(0, w * 0.1, (n, 2))
        sub = np.stack([pos + np.array([0.02 * k, 0.0]) for k in range(s)])
        cam.render(sub, 0.03)
        t0 = time.perf_counter()
        for _ in range(20):
            frame = cam.render(sub, 0.03)
        dt = (time.perf_counter() - t0) / 20
        print(f"\nrender {w}x{w}, {n} particles x {s} sub-steps: {dt * 1e3:.2f} ms")
        assert frame.shape == (w, w)


def _radial_profile(img: np.ndarray, cx_px: float, cy_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthal mean in 0.5 px rings around (cx, cy): (radius px, mean value)."""
    rows, cols = np.indices(img.shape)
    r = np.hypot(cols - cx_px, rows - cy_px)
    b = np.floor(r / 0.5).astype(int)
    prof = np.bincount(b.ravel(), img.ravel()) / np.maximum(np.bincount(b.ravel()), 1)
    return (np.arange(len(prof)) + 0.5) * 0.5, prof


@pytest.mark.parametrize("xy", [(3.2, 4.7), (6.337, 2.011)])
def test_airy_conserves_flux_and_is_centred(xy: tuple[float, float]) -> None:
    """Airy PSF: all photons land in the frame, centroid on the true position."""
    cfg = _ideal(width_px=128, height_px=96, background_photons_per_px_per_ms=0.0, psf="airy")
    cam = CameraModel(cfg, seed=0)
    img = cam.expected_electrons(np.array([[xy]]), 0.03).astype(float)
    assert img.sum() == pytest.approx(cfg.photons_per_particle_per_ms * 30.0, rel=1e-5)
    p = cfg.pixel_size_um
    cx, cy = _centroid(img, p)
    assert abs(cx - xy[0]) / p < 0.02
    assert abs(cy - xy[1]) / p < 0.02
    i, j = np.unravel_index(np.argmax(img), img.shape)
    assert (j, i) == (round(xy[0] / p), round(xy[1] / p))


def test_airy_first_dark_ring_at_0_61_lambda_over_na() -> None:
    """Finely sampled noise-free Airy image: first minimum of the radial profile at
    0.61 λ / NA, and the first bright ring is much dimmer than the core (~1.7 %)."""
    p = 0.02
    cfg = _ideal(
        width_px=200,
        height_px=200,
        pixel_size_um=p,
        background_photons_per_px_per_ms=0.0,
        psf="airy",
        wavelength_um=0.6,
        numerical_aperture=1.0,
    )
    cam = CameraModel(cfg, seed=0)
    x0 = 100 * p + 0.003
    img = cam.expected_electrons(np.array([[[x0, x0]]]), 0.03).astype(float)
    r, prof = _radial_profile(img, x0 / p, x0 / p)
    first_min = int(np.argmax(np.diff(prof) > 0))  # profile stops falling here
    assert r[first_min] * p == pytest.approx(0.61 * 0.6 / 1.0, rel=0.05)
    ring = prof[first_min : first_min + 20].max()
    assert 0.005 < ring / prof[0] < 0.03


def test_airy_width_scales_with_lambda_over_na() -> None:
    """Higher NA narrows the spot: second moment scales like (λ / NA)^2 in the core."""
    widths = []
    for na in (0.7, 1.4):
        cfg = _ideal(
            width_px=160,
            height_px=160,
            background_photons_per_px_per_ms=0.0,
            psf="airy",
            numerical_aperture=na,
            medium_refractive_index=1.52,
        )
        img = CameraModel(cfg, seed=0).expected_electrons(np.array([[[8.0, 8.0]]]), 0.03)
        widths.append(np.sum(img > 0.5 * img.max()))  # pixels above half maximum
    assert widths[0] == pytest.approx(4 * widths[1], rel=0.25)


def _defocus_image(defocus_um: float) -> tuple[np.ndarray, CameraConfig]:
    cfg = _ideal(
        width_px=160,
        height_px=160,
        background_photons_per_px_per_ms=0.0,
        psf="defocus",
        defocus_um=defocus_um,
        psf_sigma_um=0.15,
    )
    img = CameraModel(cfg, seed=0).expected_electrons(np.array([[[8.0, 8.0]]]), 0.03)
    return img.astype(float), cfg


def test_defocus_ring_dark_centre_and_radius_grows() -> None:
    """Large defocus: a ring brighter than its centre, at the marginal-ray radius
    |dz| NA / sqrt(n^2 - NA^2), growing linearly with defocus; flux is conserved."""
    radii = []
    for dz in (0.5, 1.0, 2.0):
        img, cfg = _defocus_image(dz)
        assert img.sum() == pytest.approx(cfg.photons_per_particle_per_ms * 30.0, rel=1e-5)
        r, prof = _radial_profile(img, 80.0, 80.0)
        peak = r[np.argmax(prof)] * cfg.pixel_size_um
        assert peak == pytest.approx(cfg.defocus_ring_radius_um, abs=0.1)
        assert img[80, 80] < 0.2 * prof.max()  # dark centre
        radii.append(peak)
    assert radii[0] < radii[1] < radii[2]
    assert radii[2] == pytest.approx(2.0 * radii[1], rel=0.1)  # linear in defocus
    # In focus the defocus model is the plain Gaussian PSF.
    focus, _ = _defocus_image(0.0)
    gauss = CameraModel(
        _ideal(
            width_px=160, height_px=160, background_photons_per_px_per_ms=0.0, psf_sigma_um=0.15
        ),
        seed=0,
    ).expected_electrons(np.array([[[8.0, 8.0]]]), 0.03)
    np.testing.assert_allclose(focus, gauss, rtol=0.02, atol=1e-3 * gauss.max())


def test_defocus_needs_na_below_medium_index() -> None:
    """Geometric ring radius diverges at NA = n: reject such configs with a clear error."""
    with pytest.raises(ValidationError, match="numerical_aperture"):
        CameraConfig(psf="defocus", numerical_aperture=1.4, medium_refractive_index=1.33)


def test_hot_pixels_fixed_and_bright() -> None:
    """Hot pixels: a seed-fixed set, the brightest pixels of every frame, with shot noise."""
    cfg = CameraConfig(width_px=64, height_px=64, hot_pixel_fraction=0.01)
    cam = CameraModel(cfg, seed=5)
    hot = cam.hot_pixels
    assert len(hot) == round(0.01 * 64 * 64)
    np.testing.assert_array_equal(CameraModel(cfg, seed=5).hot_pixels, hot)
    assert not np.array_equal(CameraModel(cfg, seed=6).hot_pixels, hot)
    none = np.zeros((1, 0, 2))
    frames = np.stack([cam.render(none, 0.03).ravel() for _ in range(20)]).astype(float)
    for f in frames:
        np.testing.assert_array_equal(np.sort(np.argsort(f)[-len(hot) :]), hot)
    # Dark current 50 e/ms x 30 ms = 1500 e above background, in ADU (gain 0.5).
    excess = frames[:, hot].mean() - np.delete(frames, hot, axis=1).mean()
    assert excess == pytest.approx(0.5 * 1500.0, rel=0.02)
    assert frames[:, hot].std(axis=0).mean() > 0.5 * 0.5 * np.sqrt(1500.0)  # shot noise
    expected = cam.expected_electrons(none, 0.03).ravel()
    np.testing.assert_allclose(expected[hot] - expected[0 if 0 not in hot else 1], 1500.0)


@pytest.mark.parametrize("mean_e", [2.0, 20.0, 200.0])
def test_lit_pixels_are_poisson(mean_e: float) -> None:
    """Pixels that carry signal (here hot pixels with half of λ) take the per-pixel path:
    it must match Poisson mean and variance as well as the background table does."""
    cfg = _ideal(
        width_px=512,
        height_px=512,
        background_photons_per_px_per_ms=mean_e / 20.0,
        hot_pixel_fraction=0.1,
        hot_pixel_e_per_ms=mean_e / 20.0,
    )
    cam = CameraModel(cfg, seed=0)
    none = np.zeros((1, 0, 2))
    f = np.stack([cam.render(none, 0.01).ravel()[cam.hot_pixels] for _ in range(4)]).astype(float)
    assert f.mean() == pytest.approx(mean_e, rel=0.02)
    assert f.var() == pytest.approx(mean_e, rel=0.02)


def test_particle_pixels_have_poisson_statistics() -> None:
    """Per-pixel mean and variance under a particle (faint wings to bright core) match
    the noise-free λ over many frames: the faint-pixel shortcut is exact."""
    cfg = _ideal(width_px=16, height_px=16, background_photons_per_px_per_ms=0.1)
    cam = CameraModel(cfg, seed=2)
    pos = np.array([[[0.75, 0.8]]])
    lam = cam.expected_electrons(pos, 0.03).astype(float)
    n = 4000
    f = np.stack([cam.render(pos, 0.03) for _ in range(n)]).astype(float)
    z = (f.mean(axis=0) - lam) / np.sqrt(lam / n)
    assert np.abs(z).max() < 5.0
    faint = (lam > 3.0) & (lam < 3.5)  # background 3 e plus a faint wing
    assert faint.sum() > 10
    ratio = f.var(axis=0) / (lam + np.where(lam >= 20.0, 1 / 12, 0.0))
    assert np.mean(ratio[faint]) == pytest.approx(1.0, rel=0.03)
    assert np.mean(ratio[lam >= 20.0]) == pytest.approx(1.0, rel=0.03)
    assert np.mean(ratio[(lam > 4.0) & (lam < 20.0)]) == pytest.approx(1.0, rel=0.03)
