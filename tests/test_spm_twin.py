"""SPM (PFM) twin: sample determinism, realism vs the real PTO scans, scans, spectroscopy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from simulators.spm import (
    C_DOWN,
    C_UP,
    REAL_PFM_REFERENCE,
    FerroelectricSample,
    FerroelectricSampleConfig,
    PFMScanner,
    ScanConfig,
    SpectroscopyConfig,
    SwitchingSpectroscopy,
    TipState,
    export_twin_grid,
    load_replay_grid,
    loop_features,
    pfm_statistics,
    triangular_waveform,
)

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "pfm-pto"


@pytest.fixture(scope="module")
def sample() -> FerroelectricSample:
    return FerroelectricSample(seed=1)


def fresh(seed: int = 1) -> FerroelectricSample:
    return FerroelectricSample(seed=seed)


def test_same_seed_same_sample_different_seed_differs(sample: FerroelectricSample) -> None:
    again = fresh(1)
    other = fresh(2)
    assert np.array_equal(sample.domain_type, again.domain_type)
    assert np.array_equal(sample.height_nm, again.height_nm)
    assert not np.array_equal(sample.domain_type, other.domain_type)
    assert np.mean(sample.domain_type != other.domain_type) > 0.05


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="down_fraction"):
        FerroelectricSampleConfig(down_fraction=2.0)
    with pytest.raises(ValidationError, match="bogus"):
        FerroelectricSampleConfig(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="scan_speed_um_s"):
        ScanConfig(scan_speed_um_s=0.0)


def test_ground_truth_maps_are_consistent(sample: FerroelectricSample) -> None:
    fr = np.bincount(sample.domain_type.ravel(), minlength=3) / sample.domain_type.size
    assert 0.02 < fr[C_DOWN] < 0.12 and fr[C_UP] > 0.7
    assert np.all(sample.vc_pos > sample.vc_neg)
    props = sample.properties_at(1.0, 1.0)
    assert set(props) >= {"domain_type", "wall_distance_um", "defect_density_per_um2", "loop_area"}
    near = sample.wall_distance_um < 0.01
    far = sample.wall_distance_um >= 0.1
    width = sample.vc_pos - sample.vc_neg
    assert width[near].mean() < 0.85 * width[far].mean()


def _twin_stats(seed: int, **scan_kw: object) -> dict[str, float]:
    s = fresh(seed)
    r = PFMScanner(s, ScanConfig(**scan_kw), seed=seed).scan((0.5, 0.5, 1.0, 1.0), (256, 256))
    return pfm_statistics(r["phase_deg"], r["amplitude_pm"], r["height_nm"], 1.0 / 256)


@pytest.mark.skipif(not REAL_DIR.exists(), reason="real PFM reference data not present")
def test_reference_constants_match_real_scans() -> None:
    d = np.load(REAL_DIR / "pto_scan_1.npz")
    st = pfm_statistics(
        d["PhaseRetrace"], d["AmplitudeRetrace"] * 1e12, d["HeightRetrace"] * 1e9, 1.0 / 255
    )
    for key in ("minority_fraction", "wall_crossings_per_um", "phase_noise_deg"):
        assert st[key] == pytest.approx(REAL_PFM_REFERENCE[key][0], rel=0.05), key


def test_twin_scan_statistics_match_real_data() -> None:
    stats = [_twin_stats(seed) for seed in (1, 2, 3)]
    for key in (
        "minority_fraction",
        "wall_crossings_per_um",
        "wall_amp_contrast",
        "phase_noise_deg",
        "amp_cv_interior",
        "height_rms_flat",
    ):
        twin = float(np.mean([s[key] for s in stats]))
        real = float(np.nanmean(REAL_PFM_REFERENCE[key]))
        assert real / 1.6 < twin < real * 1.6, (key, twin, real)
    for s in stats:
        # Bimodal phase ~180 deg apart, as the real scans (170-175 deg).
        assert s["phase_mode_sep_deg"] >= 160.0
        assert -5.5 < s["height_psd_slope"] < -3.0


def test_phase_histogram_is_bimodal(sample: FerroelectricSample) -> None:
    r = PFMScanner(sample, seed=0).scan((0.0, 0.0, 2.0, 2.0), (256, 256))
    ph = r["phase_deg"]
    assert ph.dtype == np.float32 and ph.min() >= -90.0 and ph.max() < 270.0
    hist, edges = np.histogram(ph, bins=36, range=(-90, 270))
    main = edges[np.argmax(hist)] + 5
    opposite = (ph > main + 150) & (ph < main + 210)
    gap = (ph > main + 70) & (ph < main + 110)
    assert opposite.sum() > 2 * gap.sum() > 0


def test_line_offsets_and_drift_toggle(sample: FerroelectricSample) -> None:
    on = dict(line_offsets=True, line_offset_nm=0.5, drift=True, drift_um_s=(1e-3, 0.0))
    off = dict(line_offsets=False, drift=False, height_noise_nm=0.05)
    win = (0.5, 0.5, 0.5, 0.5)
    r_on = PFMScanner(sample, ScanConfig(**on), seed=0).scan(win, (128, 128))
    r_off = PFMScanner(sample, ScanConfig(**off), seed=0).scan(win, (128, 128))
    from simulators.spm.stats import line_offset_ratio

    assert line_offset_ratio(r_on["height_nm"]) > 3 * line_offset_ratio(r_off["height_nm"])
    assert np.all(r_off["drift_um"] == 0)
    d = r_on["drift_um"]
    assert d[-1, 0] > d[0, 0] + 0.05  # 128 lines x 0.5 s at 1 nm/s
    # Drift shows in the image: scanning the same window later gives a shifted image.
    sc = PFMScanner(sample, ScanConfig(**{**off, "drift": True, "drift_um_s": (2e-3, 0.0)}))
    late = sc.scan(win, (128, 128), t_start_s=50.0)["height_nm"]
    still = PFMScanner(sample, ScanConfig(**off), seed=1).scan(win, (128, 128))["height_nm"]
    assert np.abs(late - r_off["height_nm"]).mean() > 3 * np.abs(still - r_off["height_nm"]).mean()


def test_scan_time_scales_with_lines_and_is_fast(sample: FerroelectricSample) -> None:
    sc = PFMScanner(sample, ScanConfig(scan_speed_um_s=2.0), seed=0)
    a = sc.scan((0, 0, 1.0, 1.0), (64, 64))
    b = sc.scan((0, 0, 1.0, 1.0), (128, 64), t_start_s=a["t_end_s"])
    assert a["elapsed_s"] == pytest.approx(64 * 2 * 1.0 / 2.0)
    assert b["elapsed_s"] == pytest.approx(2 * a["elapsed_s"])
    sc.scan((0, 0, 1.0, 1.0), (256, 256))
    t0 = time.perf_counter()
    sc.scan((0, 0, 1.0, 1.0), (256, 256))
    assert time.perf_counter() - t0 < 0.1
    with pytest.raises(ValueError, match="window_um"):
        sc.scan((1.5, 0, 1.0, 1.0), (8, 8))


def test_feedback_lag_makes_deflection_signal(sample: FerroelectricSample) -> None:
    base = dict(line_offsets=False, drift=False)
    lag = PFMScanner(sample, ScanConfig(**base, feedback_lag_px=5.0)).scan((0, 0, 1, 1), (64, 64))
    none = PFMScanner(sample, ScanConfig(**base)).scan((0, 0, 1, 1), (64, 64))
    assert np.abs(none["deflection_nm"]).max() == 0.0
    assert np.abs(lag["deflection_nm"]).mean() > 0.05


def test_loop_area_positive_and_softer_near_walls_and_defects() -> None:
    s = fresh(4)
    sp = SwitchingSpectroscopy(s, SpectroscopyConfig(switching=False), seed=0)
    rng = np.random.default_rng(0)
    ii, jj = rng.integers(0, 512, (2, 3000))
    pick = s.domain_type[ii, jj] != 2
    ii, jj = ii[pick], jj[pick]
    d = s.wall_distance_um[ii, jj]
    rho = s.defect_density[ii, jj]
    widths, areas = [], []
    for i, j in zip(ii, jj, strict=True):
        f = sp.spectrum((j + 0.5) * s.pixel_um, (i + 0.5) * s.pixel_um)["features"]
        widths.append(f["coercive_width_v"])
        areas.append(f["area"])
    widths_a, areas_a = np.array(widths), np.array(areas)
    assert np.all(areas_a > 0)
    soft = (d < 0.015) | (rho > np.quantile(rho, 0.9))
    interior = (d > 0.1) & (rho < np.quantile(rho, 0.5))
    assert soft.sum() > 20 and interior.sum() > 20
    assert np.nanmean(widths_a[soft]) < 0.85 * np.nanmean(widths_a[interior])


def test_loop_features_on_ideal_loop() -> None:
    v = triangular_waveform(10.0, 200)
    rising = np.gradient(v) > 0
    r = np.where(rising, np.tanh((v - 3.0) / 0.3), np.tanh((v + 2.0) / 0.3))
    f = loop_features(v, r)
    assert f["vc_pos_v"] == pytest.approx(3.0, abs=0.2)
    assert f["vc_neg_v"] == pytest.approx(-2.0, abs=0.2)
    assert f["imprint_v"] == pytest.approx(0.5, abs=0.2)
    assert f["area"] == pytest.approx(2 * 5.0, rel=0.1)
    assert f["remanent"] == pytest.approx(1.0, abs=0.05)


def test_switching_flips_local_domain_only_within_tip_radius() -> None:
    s = fresh(5)
    r_tip = 0.03
    sp = SwitchingSpectroscopy(s, SpectroscopyConfig(tip_radius_um=r_tip), seed=0)
    # A c+ interior point far from walls.
    cand = np.argwhere((s.domain_type == C_UP) & (s.wall_distance_um >= 0.1))
    i, j = cand[len(cand) // 2]
    x, y = (j + 0.5) * s.pixel_um, (i + 0.5) * s.pixel_um
    before = s.domain_type.copy()
    scanner = PFMScanner(s, ScanConfig(drift=False, line_offsets=False), seed=0)
    win = (x - 0.1, y - 0.1, 0.2, 0.2)
    img0 = scanner.scan(win, (64, 64))["phase_deg"]
    out = sp.spectrum(x, y)  # 0 -> +10 -> -10 -> 0 leaves the spot down-polarised
    assert out["switched_points"] > 0
    changed = np.argwhere(s.domain_type != before)
    dist = np.hypot(changed[:, 0] + 0.5 - (i + 0.5), changed[:, 1] + 0.5 - (j + 0.5)) * s.pixel_um
    assert dist.max() <= r_tip + s.pixel_um
    assert len(changed) > 0.5 * np.pi * (r_tip / s.pixel_um) ** 2
    assert s.domain_type[i, j] == C_DOWN
    img1 = scanner.scan(win, (64, 64))["phase_deg"]
    centre = (slice(28, 36), slice(28, 36))
    corner = (slice(0, 8), slice(0, 8))
    flip = np.abs(((img1 - img0 + 180) % 360) - 180)
    assert np.median(flip[centre]) > 120 and np.median(flip[corner]) < 40
    # Positive-only waveform ending up switches it back.
    sp.spectrum(x, y, np.concatenate([np.linspace(0, -10, 16), np.linspace(-10, 10, 32)]))
    assert s.domain_type[i, j] == C_UP


def test_tip_wear_reduces_amplitude_monotonically() -> None:
    s = fresh(6)
    tip = TipState()
    sp = SwitchingSpectroscopy(
        s, SpectroscopyConfig(tip_wear_per_spectrum=0.05, noise_pm=0.0, switching=False), tip=tip
    )
    sat = [sp.spectrum(1.0, 1.0)["features"]["saturation"] for _ in range(10)]
    assert np.all(np.diff(sat) < 0)
    assert tip.n_spectra == 10 and tip.amplitude_factor == pytest.approx(0.95**10)
    # The same tip state dims the scan amplitude too.
    worn = PFMScanner(s, ScanConfig(amplitude_noise_pm=0.0), tip=tip).scan((0, 0, 1, 1), (32, 32))
    new = PFMScanner(s, ScanConfig(amplitude_noise_pm=0.0)).scan((0, 0, 1, 1), (32, 32))
    assert worn["amplitude_pm"].mean() < 0.7 * new["amplitude_pm"].mean()


def test_spectrum_time_scales_with_length_and_is_fast(sample: FerroelectricSample) -> None:
    sp = SwitchingSpectroscopy(sample, SpectroscopyConfig(switching=False), seed=0)
    a = sp.spectrum(0.5, 0.5, triangular_waveform(10.0, 32))["elapsed_s"]
    b = sp.spectrum(0.5, 0.5, triangular_waveform(10.0, 64))["elapsed_s"]
    assert b == pytest.approx(2 * a) and a > 0
    t0 = time.perf_counter()
    for k in range(50):
        sp.spectrum(0.2 + 0.02 * k, 0.7)
    assert (time.perf_counter() - t0) / 50 < 0.002


def test_replay_roundtrip_and_rejections(tmp_path: Path) -> None:
    s = fresh(7)
    path = export_twin_grid(s, tmp_path / "grid.npz", grid=50)
    g = load_replay_grid(path)
    assert g.image.shape[1:] == (50, 50) and g.spectra.shape == (50, 50, 64)
    assert g.extent_um == pytest.approx(s.extent_um)
    assert g.spectrum_at(0.01, 0.01).shape == (64,)
    assert np.array_equal(g.spectrum_at(1.99, 1.99), g.spectra[49, 49])
    good = dict(np.load(path))
    bad_variants = {
        "image": {k: v for k, v in good.items() if k != "image"},
        "spectra": {**good, "spectra": good["spectra"][:40]},
        "waveform": {**good, "waveform": good["waveform"][:10]},
        "extent_um": {**good, "extent_um": np.array([1.0, 2.0, 3.0])},
    }
    for key, data in bad_variants.items():
        p = tmp_path / f"bad_{key}.npz"
        np.savez(p, **data)
        with pytest.raises(ValueError, match=rf"^{key}:") as err:
            load_replay_grid(p)
        assert "\n" not in str(err.value)
    p = tmp_path / "bad_ndim.npz"
    np.savez(p, **{**good, "image": good["image"][0]})
    with pytest.raises(ValueError, match=r"^image:"):
        load_replay_grid(p)
