"""The localisation bench reports error / CRB, so the bound itself must be right:
checked against closed forms in their limits and against a near-efficient fitter."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import least_squares

from benchmarks.crb import mean_position_crb_px, pixel_profile, position_crb_px


def _mortensen_px(sigma_px: float, photons: float, background: float) -> float:
    """Mortensen et al. (Nat. Methods 2010) eq. 6: MLE limit with pixelation and background."""
    sa2 = sigma_px**2 + 1.0 / 12.0
    if background == 0.0:
        return math.sqrt(sa2 / photons)
    tau = 2.0 * math.pi * sa2 * background / photons
    integral = quad(lambda t: math.log(t) / (1.0 + t / tau), 0.0, 1.0)[0]
    return math.sqrt(sa2 / photons / (1.0 + integral))


def test_tiny_pixels_no_background_is_sigma_over_sqrt_n() -> None:
    # sigma = 20 px: pixels are 1/20 of the PSF, window +-5 sigma keeps all the light.
    crb = position_crb_px(20.0, 1e4, 0.0, window_px=201)
    assert crb == pytest.approx(20.0 / math.sqrt(1e4), rel=0.05)


@pytest.mark.parametrize("sigma", [0.8, 1.3, 2.0])
def test_pixelation_factor_without_background(sigma: float) -> None:
    # Poisson-only, pixelated: var = (sigma^2 + a^2/12) / N.
    crb = mean_position_crb_px(sigma, 2000.0, 0.0, window_px=31)
    assert crb == pytest.approx(_mortensen_px(sigma, 2000.0, 0.0), rel=0.01)


@pytest.mark.parametrize(
    ("sigma", "photons", "bg"), [(1.5, 1000, 10), (2.0, 500, 5), (1.2, 300, 20)]
)
def test_background_factor_matches_mortensen(sigma: float, photons: float, bg: float) -> None:
    crb = mean_position_crb_px(sigma, photons, bg, window_px=31)
    assert crb == pytest.approx(_mortensen_px(sigma, photons, bg), rel=0.02)


def test_scales_as_one_over_sqrt_photons() -> None:
    # With background the bound is only 1/sqrt(N) at fixed signal-to-background ratio.
    a = position_crb_px(1.5, 1000.0, 0.0)
    b = position_crb_px(1.5, 4000.0, 0.0)
    assert a / b == pytest.approx(2.0, rel=1e-3)
    a = position_crb_px(1.5, 1000.0, 10.0, read_noise_e=0.0)
    b = position_crb_px(1.5, 4000.0, 40.0, read_noise_e=0.0)
    assert a / b == pytest.approx(2.0, rel=1e-3)


def test_increases_with_background_read_noise_and_lower_qe() -> None:
    base = position_crb_px(1.5, 1000.0, 5.0)
    assert position_crb_px(1.5, 1000.0, 20.0) > base
    assert position_crb_px(1.5, 1000.0, 5.0, read_noise_e=2.0) > base
    assert position_crb_px(1.5, 1000.0, 5.0, qe=0.5) > base
    # Photons and background both count after QE: halving QE = halving both.
    assert position_crb_px(1.5, 1000.0, 5.0, qe=0.5) == pytest.approx(
        position_crb_px(1.5, 500.0, 2.5)
    )


def test_pixel_profile_sums_to_one_and_derivative_matches_finite_difference() -> None:
    prof, deriv = pixel_profile(7.3, 1.5, 15)
    assert prof.sum() == pytest.approx(1.0, abs=1e-5)
    h = 1e-6
    up, _ = pixel_profile(7.3 + h, 1.5, 15)
    down, _ = pixel_profile(7.3 - h, 1.5, 15)
    np.testing.assert_allclose(deriv, (up - down) / (2 * h), atol=1e-7)


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        position_crb_px(0.0, 100.0, 1.0)
    with pytest.raises(ValueError):
        position_crb_px(1.0, 100.0, -1.0)


def _model(theta: np.ndarray, sigma: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Spot (x, y, signal, background) on an n x n window, and its (n*n, 4) Jacobian."""
    x, y, s, b = theta
    px, dpx = pixel_profile(x, sigma, n)
    py, dpy = pixel_profile(y, sigma, n)
    psf = np.outer(py, px)
    jac = np.stack([s * np.outer(py, dpx), s * np.outer(dpy, px), psf, np.ones_like(psf)], axis=-1)
    return s * psf + b, jac.reshape(-1, 4)


def _fit(img: np.ndarray, sigma: float, read: float) -> tuple[float, float]:
    """Weighted least squares, weights 1/(model + read^2) frozen from the previous pass.

    Iteratively reweighted with model (not data) variances this converges to the
    Gaussian-approximation MLE, which is efficient at high SNR.
    """
    n = img.shape[0]
    d = img.ravel()
    b0 = float(np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])))
    theta = np.array([(n - 1) / 2, (n - 1) / 2, max(float(d.sum() - b0 * d.size), 1.0), b0])
    var = np.maximum(d, 1.0) + read**2
    for _ in range(3):
        w = 1.0 / np.sqrt(var)

        def res(t: np.ndarray, w: np.ndarray = w) -> np.ndarray:
            return (_model(t, sigma, n)[0].ravel() - d) * w

        def jac(t: np.ndarray, w: np.ndarray = w) -> np.ndarray:
            return _model(t, sigma, n)[1] * w[:, None]

        theta = least_squares(res, theta, jac=jac, method="lm").x
        var = np.maximum(_model(theta, sigma, n)[0].ravel(), 1e-6) + read**2
    return float(theta[0]), float(theta[1])


def test_monte_carlo_fitter_reaches_the_bound_at_high_snr() -> None:
    rng = np.random.default_rng(12)
    sigma, photons, bg, read, n = 1.5, 3000.0, 10.0, 1.5, 15
    trials = 300
    errs = []
    for _ in range(trials):
        true = (n - 1) / 2 + rng.uniform(-0.5, 0.5, size=2)
        mu, _ = _model(np.array([true[0], true[1], photons, bg]), sigma, n)
        img = rng.poisson(mu) + rng.normal(0.0, read, size=mu.shape)
        fx, fy = _fit(img, sigma, read)
        errs.extend([fx - true[0], fy - true[1]])
    rmse = math.sqrt(float(np.mean(np.square(errs))))
    crb = mean_position_crb_px(sigma, photons, bg, read_noise_e=read, window_px=n)
    # 600 axis errors: the RMSE itself is known to ~3 %; the fitter should sit at ~1.0.
    assert 0.9 < rmse / crb < 1.15, (rmse, crb)


def test_bench_snr_definition_matches_the_twin_camera() -> None:
    # SNR = electrons in the brightest pixel of a pixel-centred spot / background noise.
    from benchmarks import localization as loc

    snr = 7.0
    cam = loc._camera(32, snr, seed=0)
    e = cam.expected_electrons(np.array([[[16 * loc.PIXEL_UM, 16 * loc.PIXEL_UM]]]), loc.EXPOSURE_S)
    bg = loc.BG_PHOTONS_PER_PX * loc.QE
    peak = float(e.max()) - bg
    noise = math.sqrt(bg + loc.READ_NOISE_E**2)
    assert peak / noise == pytest.approx(snr, rel=1e-3)
    assert loc.crb_for_snr(20.0) < loc.crb_for_snr(10.0) < loc.crb_for_snr(5.0)
