"""Brightfield and darkfield images of dielectric spheres, for the twin camera.

Physical model: Lorenz-Mie scattering (miepython) imaged by a microscope under Koehler
illumination, partially coherent. In words:

* Illumination. Koehler illumination images the condenser's aperture into the back focal
  plane, so each point of the condenser pupil lights the sample as one plane wave, tilted
  by sin(theta_c) = s / n_m for a condenser coordinate s <= NA_c; different points are
  mutually incoherent. The image is therefore the incoherent sum of the coherent images
  of every tilted wave (Abbe's method; Hopkins' transmission cross-coefficient summed
  source point by source point). A sphere is rotationally symmetric, so the image of a
  wave tilted at azimuth alpha is the image at azimuth 0 rotated by alpha: the radially
  averaged image needs only tilts along x, at s_j = NA_c sqrt((j + 1/2) / M) (M rings of
  equal area of a uniformly filled condenser pupil, equal weights). Unpolarised light:
  the mean of x- and y-polarised incident waves.
* Scattering. For a wave of direction k_i, the sphere's scattered field in direction k_s
  is the far-field amplitude S_1, S_2 (Bohren-Huffman convention, exp(-i omega t)) at
  the scattering angle cos(theta) = k_i . k_s / k^2, with k = 2 pi n_m / lambda, size
  parameter k a and relative index n_p / n_m (+ i absorption). Projected on the focal
  plane (the Lorenz-Mie holography projection), an x-polarised wave scatters
  E_x = S_2 cos(theta) cos^2(phi) + S_1 sin^2(phi), E_y = (S_2 cos(theta) - S_1) sin(phi)
  cos(phi), phi the azimuth of k_s about k_i.
* Imaging. The far field f(k_s) e^{ikr}/r has the angular spectrum i f / (2 pi k_z)
  (Weyl's expansion, stationary phase), f = S / (-i k); the objective passes the part with
  |k_s,perp| <= 2 pi NA / lambda (its pupil) and the focal plane, dz beyond the sphere's
  centre (dz > 0: on the objective's side), adds exp(i (k_z,s - k_z,i) dz) relative to
  the unscattered wave. Each tilt is computed in the frame moving with its incident wave
  (the objective's pupil shifted by -k_i,perp), so tilts need not fall on the FFT grid.
  The image is |1 + E_x|^2 + |E_y|^2 (brightfield; the unscattered wave is 1) or
  |E_x|^2 + |E_y|^2 (darkfield: the direct wave is stopped, as a darkfield stop does,
  and also whenever the condenser's tilt lies outside the objective's pupil).
* What partial coherence does. In focus the tilted waves' images nearly coincide, so the
  in-focus image keeps the coherent image's sharp structure; out of focus each tilted
  wave's image is displaced by about dz tan(theta_c), so the rings blur by a radius that
  grows as |dz| NA_c / n_m. (The previous model's fixed Gaussian blur of 0.21 lambda / NA_c
  did the reverse: it smeared an in-focus sphere into a faint blob.)

Checks (tests/test_brightfield.py): a weak sphere (n_p - n_m = 0.03, a = 0.2 um) gives the
projection-approximation (thin phase object) image to within 2-4 % of its peak at 1-2 um
defocus; the extinction theorem holds (Re S(0) = x^2 Q_ext / 4) and the Rayleigh limit has
the exp(-i omega t) sign; and the real frames in shared/data/brightfield (bright centre in
a dark ring) match a 2.4 um silica-like sphere (n 1.45) 1.5 um out of focus at NA 0.9,
condenser NA 0.5, 0.152 um/px (assumed: the frames carry no pixel size): profile
correlation 0.987, ring radius 8.60 px against 8.44, ring depth -0.38 against -0.36 (the
real centres clip at 255). A profile costs 0.3-0.7 s (512^2 grid, 6-24 condenser rings).

The result is a radial contrast profile c(r), tabulated once per setting (lru_cache),
so that rendering costs one interpolation per window pixel (point-sampled at pixel
centres; the profile is already smooth at the optical resolution). Several particles add
their contrasts (single scattering: no optical coupling between touching spheres).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["contrast_profile", "mie_amplitudes", "render_contrast"]

_GRID = 512  # FFT grid side
_OVERSAMPLE = 4  # field samples per camera pixel
_MU_SAMPLES = 2001  # scattering-angle table over the angles the pupils can pair
_MIN_RINGS = 6  # condenser rings (tilts) at least ...
_MAX_RINGS = 24  # ... and at most; enough that neighbouring tilts' images move < 1/2 px


def mie_amplitudes(
    radius_um: float,
    n_particle: float,
    n_medium: float,
    wavelength_um: float,
    mu: np.ndarray,
    absorption_per_um: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(S_1, S_2) at cos(theta) = mu, Bohren-Huffman convention (exp(-i omega t)).

    miepython works in the exp(+i omega t) convention (its amplitudes are the complex
    conjugates of Bohren-Huffman's; its 'wiscombe' norm is their scale), so they are
    conjugated here. absorption_per_um is the intensity attenuation coefficient inside the
    particle material."""
    import miepython  # imported only when a scattering contrast is rendered

    k_im = absorption_per_um * wavelength_um / (4.0 * math.pi)
    m = complex(n_particle / n_medium, -k_im / n_medium)
    x = 2.0 * math.pi * n_medium * radius_um / wavelength_um
    s1, s2 = miepython.S1_S2(m, x, np.asarray(mu, dtype=np.float64), norm="wiscombe")
    return np.conj(s1), np.conj(s2)


def _rings(defocus_um: float, condenser_na: float, n_medium: float, pixel_um: float) -> int:
    """Condenser rings: the outermost tilt displaces a defocused image by about
    |dz| tan(theta_c); neighbouring rings then differ by well under half a pixel."""
    sin_c = min(condenser_na / n_medium, 0.999)
    shift_px = abs(defocus_um) * sin_c / math.sqrt(1.0 - sin_c**2) / pixel_um
    return int(min(max(math.ceil(shift_px), _MIN_RINGS), _MAX_RINGS))


@lru_cache(maxsize=16)
def contrast_profile(
    radius_um: float,
    n_particle: float,
    n_medium: float,
    wavelength_um: float,
    numerical_aperture: float,
    defocus_um: float,
    pixel_um: float,
    darkfield: bool = False,
    condenser_na: float = 0.3,
    absorption_per_um: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(r in px, contrast) of one sphere: I / I_background - 1 (brightfield) or I / I_0
    of the illuminating wave (darkfield). Radii extend to where the contrast has decayed."""
    dx = pixel_um / _OVERSAMPLE
    n = _GRID
    k = 2.0 * math.pi * n_medium / wavelength_um
    k_obj = 2.0 * math.pi * min(numerical_aperture, 0.999 * n_medium) / wavelength_um
    q = 2.0 * math.pi * np.fft.fftfreq(n, d=dx)
    qx, qy = q[:, None], q[None, :]
    # Angles a tilt (<= NA_c) and the objective (<= NA) can pair: the S table's range.
    na_c = min(condenser_na, 0.999 * n_medium)
    widest = math.asin(k_obj / k) + math.asin(na_c / n_medium)
    mu = np.linspace(math.cos(min(widest, math.pi)) - 1e-6, 1.0, _MU_SAMPLES)
    s1_tab, s2_tab = mie_amplitudes(
        radius_um, n_particle, n_medium, wavelength_um, mu, absorption_per_um
    )
    rings = _rings(defocus_um, na_c, n_medium, pixel_um)
    scale = (2.0 * math.pi / dx) ** 2  # sum over the FFT grid -> integral over k_perp
    image = np.zeros((n, n))
    for j in range(rings):
        kix = 2.0 * math.pi * na_c * math.sqrt((j + 0.5) / rings) / wavelength_um
        kiz = math.sqrt(k * k - kix * kix)
        ksx = qx + kix  # scattered direction, in the frame moving with the incident wave
        ks2 = ksx**2 + qy**2
        ksz = np.sqrt(np.maximum(k * k - ks2, 0.0))
        cos_t = np.clip((ksx * kix + ksz * kiz) / (k * k), mu[0], 1.0)
        s1 = np.interp(cos_t, mu, s1_tab.real) + 1j * np.interp(cos_t, mu, s1_tab.imag)
        s2 = np.interp(cos_t, mu, s2_tab.real) + 1j * np.interp(cos_t, mu, s2_tab.imag)
        phi = np.arctan2(np.broadcast_to(qy, ks2.shape), np.broadcast_to(qx, ks2.shape))
        cos2, sin2, sincos = np.cos(phi) ** 2, np.sin(phi) ** 2, np.sin(phi) * np.cos(phi)
        # Angular spectrum of S e^{ikr} / (-ikr), in the objective's pupil, at the focal plane.
        propagate = np.exp(1j * (ksz - kiz) * defocus_um)
        amplitude = -scale / (2.0 * math.pi * k * np.maximum(ksz, 1e-12))
        spectrum = np.where(ks2 <= k_obj**2, amplitude * propagate, 0.0)
        direct = 0.0 if darkfield or kix > k_obj else 1.0
        s2c = s2 * cos_t
        cross = np.fft.ifft2(spectrum * (s2c - s1) * sincos)
        for along in (s2c * cos2 + s1 * sin2, s2c * sin2 + s1 * cos2):  # x- and y-polarised
            field = np.fft.ifft2(spectrum * along)
            image += 0.5 * (np.abs(direct + field) ** 2 + np.abs(cross) ** 2)
    image = np.fft.fftshift(image / rings)
    contrast = image if darkfield else image - 1.0
    centre = n // 2
    coords = (np.arange(n) - centre) * dx
    r_px = np.hypot(*np.meshgrid(coords, coords, indexing="ij")).ravel() / pixel_um
    bins = np.rint(r_px * _OVERSAMPLE).astype(np.intp)
    counts = np.bincount(bins)
    keep = counts > 0
    prof = np.bincount(bins, contrast.ravel())[keep] / counts[keep]
    radii = (np.bincount(bins, r_px)[keep] / counts[keep])[:centre]
    prof = prof[: radii.size]
    # Cut where the profile stays within 0.2 % of the background.
    alive = np.flatnonzero(np.abs(prof) > 2e-3)
    end = min(radii.size, (alive[-1] + 2) if alive.size else 2)
    prof = prof[:end].copy()
    prof[-1] = 0.0
    return radii[:end], prof


def render_contrast(
    shape: tuple[int, int], xy_px: np.ndarray, profile: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """(H, W) float32 sum of the radial contrast profile at each (x, y) px position."""
    h, w = shape
    out = np.zeros(h * w, dtype=np.float32)
    radii, prof = profile
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    half = math.ceil(radii[-1])
    keep = (xy[:, 0] > -half) & (xy[:, 0] < w + half) & (xy[:, 1] > -half) & (xy[:, 1] < h + half)
    xy = xy[keep]
    if len(xy) == 0 or half < 1:
        return out.reshape(h, w)
    offs = np.arange(-half, half + 1)
    jx, jy = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    cols = jx[:, None] + offs
    rows = jy[:, None] + offs
    dx = cols - xy[:, 0, None]
    dy = rows - xy[:, 1, None]
    dist = np.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2)
    vals = np.interp(dist, radii, prof, right=0.0).astype(np.float32)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    idx = (np.clip(rows, 0, h - 1)[:, :, None] * w + np.clip(cols, 0, w - 1)[:, None, :])[valid]
    np.add.at(out, idx, vals[valid])
    return out.reshape(h, w)
