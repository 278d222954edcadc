"""Image statistics shared by the real-data reference and the twin's tests.

One measurement code path for both, so "the twin matches the real scans" means the
same numbers computed the same way rather than two hand-tuned estimators.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _wrap_deg(a: np.ndarray) -> np.ndarray:
    return (a + 180.0) % 360.0 - 180.0


def phase_modes_deg(
    phase_deg: np.ndarray, amplitude: np.ndarray | None = None, bins: int = 72
) -> tuple[float, float]:
    """Main and secondary modes of a circular phase histogram (deg, in [-180, 180)).

    Amplitude weighting suppresses the flat background of random phases from
    low-amplitude pixels, so the secondary (opposite-polarisation) mode stands out.
    """
    ph = _wrap_deg(np.asarray(phase_deg, dtype=float).ravel())
    w = None if amplitude is None else np.abs(np.asarray(amplitude, dtype=float).ravel())
    hist, edges = np.histogram(ph, bins=bins, range=(-180.0, 180.0), weights=w)
    # Circular smoothing so a mode split by the wrap still shows as one peak.
    hs = ndimage.uniform_filter1d(hist.astype(float), 5, mode="wrap")
    centres = 0.5 * (edges[:-1] + edges[1:])
    m1 = float(centres[int(np.argmax(hs))])
    far = np.abs(_wrap_deg(centres - m1)) > 120.0
    m2 = float(centres[far][int(np.argmax(hs[far]))])
    return m1, m2


def domain_mask(
    phase_deg: np.ndarray, amplitude: np.ndarray | None = None, smooth_px: int = 5
) -> np.ndarray:
    """True where phase is >90 deg from the main mode; median-cleaned against speckle."""
    m1, _ = phase_modes_deg(phase_deg, amplitude)
    minority = np.abs(_wrap_deg(np.asarray(phase_deg, dtype=float) - m1)) > 90.0
    if smooth_px > 1:
        minority = ndimage.median_filter(minority.astype(np.uint8), size=smooth_px) > 0
    return minority


def _flatten_rows(img: np.ndarray) -> np.ndarray:
    """AFM 'flatten order 1': remove a straight line from every scan line."""
    a = np.asarray(img, dtype=float)
    x = np.linspace(-1.0, 1.0, a.shape[1])
    coef = np.polyfit(x, a.T, 1)
    return a - (coef[0][:, None] * x[None, :] + coef[1][:, None])


def radial_psd(img: np.ndarray, pixel_um: float, n_bins: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum (k in 1/um, log-spaced bins) of a windowed image."""
    a = np.asarray(img, dtype=float)
    a = a - a.mean()
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    p = np.abs(np.fft.fft2(a * win)) ** 2 / win.sum() ** 2
    ky = np.fft.fftfreq(a.shape[0], d=pixel_um)
    kx = np.fft.fftfreq(a.shape[1], d=pixel_um)
    k = np.hypot(ky[:, None], kx[None, :])
    kmin = 1.0 / (pixel_um * max(a.shape))
    kmax = 0.5 / pixel_um
    edges = np.geomspace(kmin, kmax, n_bins + 1)
    idx = np.digitize(k.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < n_bins)
    s = np.bincount(idx[ok], weights=p.ravel()[ok], minlength=n_bins)
    c = np.bincount(idx[ok], minlength=n_bins)
    centres = np.sqrt(edges[:-1] * edges[1:])
    good = c > 0
    return centres[good], s[good] / c[good]


def psd_slope(img: np.ndarray, pixel_um: float) -> float:
    """Log-log slope of the radial PSD between 4 and 0.25*Nyquist cycles (roughness exponent)."""
    k, s = radial_psd(img, pixel_um)
    lo = 4.0 / (pixel_um * max(np.shape(img)))
    hi = 0.25 * 0.5 / pixel_um
    sel = (k >= lo) & (k <= hi) & (s > 0)
    return float(np.polyfit(np.log(k[sel]), np.log(s[sel]), 1)[0])


def line_offset_ratio(img: np.ndarray) -> float:
    """Std of jumps between consecutive line medians / in-line pixel-to-pixel noise.

    Large (>> 1) when every scan line carries its own offset, ~0-1 without.
    """
    a = np.asarray(img, dtype=float)
    jumps = np.diff(np.median(a, axis=1))
    inline = np.median(np.abs(np.diff(a, axis=1)), axis=1)
    return float(
        1.4826 * np.median(np.abs(jumps - np.median(jumps))) / max(np.median(inline), 1e-30)
    )


def pfm_statistics(
    phase_deg: np.ndarray,
    amplitude: np.ndarray,
    height: np.ndarray,
    pixel_um: float,
) -> dict[str, float]:
    """Domain, wall, noise, line-artefact and roughness statistics of one PFM scan.

    Units follow the inputs: amplitude ratios are unitless, roughness is in the height
    unit. Walls are where the cleaned domain mask changes between neighbours.
    """
    ph = np.asarray(phase_deg, dtype=float)
    amp = np.asarray(amplitude, dtype=float)
    m1, m2 = phase_modes_deg(ph, amp)
    mask = domain_mask(ph, amp)
    ny, nx = mask.shape
    cross_x = np.count_nonzero(mask[:, 1:] != mask[:, :-1]) / (ny * (nx - 1) * pixel_um)
    cross_y = np.count_nonzero(mask[1:, :] != mask[:-1, :]) / ((ny - 1) * nx * pixel_um)
    crossings = 0.5 * (cross_x + cross_y)
    dist = np.where(
        mask, ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask)
    )
    at_wall = dist <= 1.0
    interior = dist >= 5.0
    med_int = float(np.median(amp[interior])) if interior.any() else float("nan")
    wall_contrast = float(np.median(amp[at_wall]) / med_int) if at_wall.any() else float("nan")
    # Wall width: distance (um) at which the median amplitude recovers halfway to interior.
    width = float("nan")
    if at_wall.any() and interior.any():
        prof = np.array(
            [
                np.median(amp[(dist > d - 0.5) & (dist <= d + 0.5)])
                if np.any((dist > d - 0.5) & (dist <= d + 0.5))
                else np.nan
                for d in range(1, 12)
            ]
        )
        a0, a_inf = prof[0], med_int
        half = a0 + 0.5 * (a_inf - a0)
        above = np.nonzero(prof >= half)[0] if a_inf > a0 else np.array([], dtype=int)
        if above.size:
            width = float(2.0 * (above[0] + 1) * pixel_um)
    maj_int = (~mask) & interior
    dev = np.deg2rad(_wrap_deg(ph[maj_int] - m1))
    r = np.hypot(np.mean(np.cos(dev)), np.mean(np.sin(dev)))
    circ_std = float(np.rad2deg(np.sqrt(-2.0 * np.log(max(r, 1e-12)))))
    lab, n = ndimage.label(mask)
    sizes = np.bincount(lab.ravel())[1:] if n else np.zeros(0)
    sizes = sizes[sizes >= 9]
    eq_diam = float(np.median(2.0 * np.sqrt(sizes / np.pi)) * pixel_um) if sizes.size else 0.0
    h = _flatten_rows(height)
    up = amp[(~mask) & interior]
    dn = amp[mask & interior]
    return {
        "phase_mode_sep_deg": float(abs(_wrap_deg(np.array(m2 - m1)))),
        "minority_fraction": float(mask.mean()),
        "wall_crossings_per_um": float(crossings),
        "minority_domain_diam_um": eq_diam,
        "n_minority_domains": float(sizes.size),
        "wall_amp_contrast": wall_contrast,
        "wall_width_um": width,
        "amp_ratio_minority_majority": float(np.median(dn) / np.median(up))
        if dn.size and up.size
        else float("nan"),
        "amp_cv_interior": float(np.std(up) / np.mean(up)) if up.size else float("nan"),
        "phase_noise_deg": circ_std,
        "height_line_offset_ratio_raw": line_offset_ratio(height),
        "amp_line_offset_ratio": line_offset_ratio(amp),
        "height_rms_flat": float(np.std(h)),
        "height_psd_slope": psd_slope(h, pixel_um),
        "amp_psd_slope": psd_slope(amp, pixel_um),
    }


#: `pfm_statistics` of the three real PbTiO3 scans (shared/data/pfm-pto, 256x256; scans 1
#: and 3 are 1 um wide, scan 2 is 5 um), amplitude in pm and height in nm. The twin's
#: defaults are tuned so a 1 um, 256x256 scan lands inside these ranges.
REAL_PFM_REFERENCE: dict[str, tuple[float, float, float]] = {
    "phase_mode_sep_deg": (125.0, 170.0, 175.0),
    "minority_fraction": (0.0698, 0.0294, 0.0292),
    "wall_crossings_per_um": (3.533, 0.754, 1.697),
    "minority_domain_diam_um": (0.0301, 0.0885, 0.0351),
    "wall_amp_contrast": (0.311, 0.791, 0.309),
    "wall_width_um": (0.0392, 0.157, float("nan")),
    "amp_ratio_minority_majority": (3.44, float("nan"), 1.48),
    "amp_cv_interior": (0.847, 0.915, 0.618),
    "phase_noise_deg": (26.8, 35.1, 17.8),
    "height_line_offset_ratio_raw": (0.915, 0.439, 0.324),
    "amp_line_offset_ratio": (0.254, 0.220, 0.371),
    "height_rms_flat": (4.01, 5.33, 2.89),
    "height_psd_slope": (-5.25, -3.16, -4.16),
    "amp_psd_slope": (-3.63, -1.30, -4.45),
}
