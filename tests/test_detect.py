"""Tests for agent.detection.detect on synthetic camera frames with known sub-pixel truth."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage
from scipy.special import erf

from agent.detection.detect import (
    DetectorConfig,
    ParticleDetector,
    _flatten,
    _isolated,
    _label_sparse,
    _local_maxima,
    _noise_gain_1d,
    _suppress,
    centroid_center,
    estimate_background,
    radial_symmetry_center,
)

OFFSET = 100.0
PSF_SIGMA = 2.0
READ_NOISE = 2.0


def _spots(
    shape: tuple[int, int], xy: np.ndarray, photons: np.ndarray, sigma: float = PSF_SIGMA
) -> np.ndarray:
    """Expected photons per pixel: Gaussian spots integrated over each pixel's area."""
    rows = np.arange(shape[0], dtype=np.float64)
    cols = np.arange(shape[1], dtype=np.float64)
    s2 = np.sqrt(2.0) * sigma
    img = np.zeros(shape)
    for (x, y), n in zip(xy, photons, strict=True):
        px = 0.5 * (erf((cols + 0.5 - x) / s2) - erf((cols - 0.5 - x) / s2))
        py = 0.5 * (erf((rows + 0.5 - y) / s2) - erf((rows - 0.5 - y) / s2))
        img += n * np.outer(py, px)
    return img


def _frame(
    rng: np.random.Generator,
    shape: tuple[int, int],
    xy: np.ndarray | list[tuple[float, float]],
    photons: np.ndarray | list[float],
    background: float = 10.0,
) -> np.ndarray:
    """Camera frame: Poisson shot noise + Gaussian read noise + offset, as uint16."""
    lam = _spots(shape, np.asarray(xy, dtype=float).reshape(-1, 2), np.asarray(photons)) + (
        background
    )
    adu = rng.poisson(lam) + rng.normal(0.0, READ_NOISE, shape) + OFFSET
    return np.clip(np.round(adu), 0, 65535).astype(np.uint16)


def _match(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Distance from each true position to its nearest detection."""
    d = np.hypot(found[None, :, 0] - truth[:, None, 0], found[None, :, 1] - truth[:, None, 1])
    return d.min(axis=1)


@pytest.mark.parametrize("method", ["centroid", "radial_symmetry"])
def test_single_bright_particle_within_0p1_px(method: str) -> None:
    rng = np.random.default_rng(11)
    det = ParticleDetector(DetectorConfig(method=method))
    for _ in range(5):
        truth = np.array([[60.0, 70.0]]) + rng.uniform(-0.5, 0.5, (1, 2))
        found = det(_frame(rng, (128, 128), truth, [20000.0]))
        assert found.shape == (1, 2)
        assert found.dtype == np.float64
        assert _match(found, truth)[0] < 0.1


def test_radial_symmetry_beats_centroid_with_background() -> None:
    rng = np.random.default_rng(3)
    rs = ParticleDetector(DetectorConfig(method="radial_symmetry"))
    cen = ParticleDetector(DetectorConfig(method="centroid"))
    err_rs, err_cen = [], []
    for _ in range(50):
        truth = np.array([[32.0, 32.0]]) + rng.uniform(-0.5, 0.5, (1, 2))
        frame = _frame(rng, (64, 64), truth, [3000.0], background=50.0)
        found_rs, found_cen = rs(frame), cen(frame)
        assert len(found_rs) == 1
        assert len(found_cen) == 1
        err_rs.append(_match(found_rs, truth)[0])
        err_cen.append(_match(found_cen, truth)[0])
    rms_rs = float(np.sqrt(np.mean(np.square(err_rs))))
    rms_cen = float(np.sqrt(np.mean(np.square(err_cen))))
    assert rms_rs < rms_cen
    assert rms_rs < 0.2


def test_twenty_separated_particles_all_found() -> None:
    rng = np.random.default_rng(5)
    grid = np.stack(np.meshgrid(np.arange(5) * 45 + 30, np.arange(4) * 55 + 40), -1)
    truth = grid.reshape(-1, 2).astype(float) + rng.uniform(-0.5, 0.5, (20, 2))
    photons = rng.uniform(3000.0, 8000.0, 20)
    found = ParticleDetector()(_frame(rng, (256, 256), truth, photons))
    assert found.shape == (20, 2)
    assert np.all(_match(found, truth) < 0.3)
    # Brightest first: the first detection is the brightest particle.
    assert _match(found[:1], truth[np.argmax(photons)][None])[0] < 0.3


def test_pure_noise_gives_no_detections() -> None:
    rng = np.random.default_rng(8)
    det = ParticleDetector()
    for _ in range(5):
        found = det(_frame(rng, (256, 256), np.zeros((0, 2)), np.zeros(0)))
        assert found.shape == (0, 2)


@pytest.mark.parametrize("truth_xy", [(1.3, 60.2), (126.2, 2.0), (64.4, 126.6), (2.7, 3.1)])
def test_particle_near_edge(truth_xy: tuple[float, float]) -> None:
    rng = np.random.default_rng(13)
    truth = np.array([truth_xy])
    found = ParticleDetector()(_frame(rng, (128, 128), truth, [5000.0]))
    assert found.shape == (1, 2)
    assert _match(found, truth)[0] < 0.5


def test_max_objects_keeps_brightest() -> None:
    rng = np.random.default_rng(21)
    truth = np.array([[20.0, 20.0], [60.0, 60.0], [100.0, 30.0]])
    photons = np.array([3000.0, 12000.0, 6000.0])
    frame = _frame(rng, (128, 128), truth, photons)
    found = ParticleDetector(DetectorConfig(max_objects=2))(frame)
    assert found.shape == (2, 2)
    assert _match(found, truth[[1, 2]]).max() < 0.3


def test_patch_refiners_on_noiseless_spot() -> None:
    truth = np.array([[5.3, 4.6]])
    patch = _spots((11, 11), truth, np.array([1000.0]))
    x, y = radial_symmetry_center(patch)
    assert np.hypot(x - 5.3, y - 4.6) < 0.05
    # A constant offset must not move the radial-symmetry centre (to float32 rounding).
    x2, y2 = radial_symmetry_center(patch + 7.0)
    assert np.hypot(x2 - x, y2 - y) < 1e-6
    cx, cy = centroid_center(patch)
    assert np.hypot(cx - 5.3, cy - 4.6) < 0.05
    # Nothing positive: centroid falls back to the patch centre instead of dividing by zero.
    assert centroid_center(-np.ones((5, 7))) == (3.0, 2.0)


def test_estimate_background_matches_noise_model() -> None:
    rng = np.random.default_rng(2)
    frame = _frame(rng, (256, 256), np.zeros((0, 2)), np.zeros(0), background=10.0)
    level, sigma = estimate_background(frame)
    true_sigma = np.sqrt(10.0 + READ_NOISE**2)
    assert abs(level - (OFFSET + 10.0)) < 0.5
    assert abs(sigma - true_sigma) / true_sigma < 0.1


@pytest.mark.parametrize("bad", [np.zeros(10), np.zeros((2, 3, 4)), np.zeros((0, 5))])
def test_bad_frame_raises(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="frame"):
        ParticleDetector()(bad)
    with pytest.raises(ValueError, match="frame"):
        estimate_background(bad)


def test_bad_patch_raises() -> None:
    with pytest.raises(ValueError, match="patch"):
        radial_symmetry_center(np.zeros(9))


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="threshold_sigma"):
        DetectorConfig(threshold_sigma=-1)
    with pytest.raises(ValidationError, match="window_px"):
        DetectorConfig(window_px=1)
    with pytest.raises(ValidationError):
        DetectorConfig(unknown=1)  # type: ignore[call-arg]


def test_edge_noise_gain_matches_filtered_white_noise() -> None:
    # The threshold must follow the larger smoothed-noise sigma at reflect-mode edges.
    rng = np.random.default_rng(4)
    noise = ndimage.gaussian_filter1d(rng.normal(size=(20000, 40)), 1.0, axis=1, mode="reflect")
    measured = noise.std(axis=0)
    predicted = _noise_gain_1d(1.0, 40)
    assert predicted[0] > 1.2 * predicted[20]
    np.testing.assert_allclose(measured, predicted, rtol=0.03)


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 40), (9, 9)])
def test_tiny_frames_do_not_crash(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    frame = rng.normal(100.0, 3.0, shape)
    frame[shape[0] // 2, shape[1] // 2] += 500.0
    for method in ("centroid", "radial_symmetry"):
        for smooth in (0.0, 1.0):
            cfg = DetectorConfig(method=method, smooth_sigma_px=smooth, min_area_px=1)
            found = ParticleDetector(cfg)(frame)
            assert found.ndim == 2
            assert found.shape[1] == 2


def _separated_grid(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    g = np.linspace(20.0, n - 20.0, k)
    gx, gy = np.meshgrid(g, g)
    return np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.5, 0.5, (k * k, 2))


@pytest.mark.parametrize("n", [512, 1024])
@pytest.mark.parametrize("method", ["centroid", "radial_symmetry"])
def test_binned_path_matches_full_resolution(n: int, method: str) -> None:
    rng = np.random.default_rng(n)
    binned = ParticleDetector(DetectorConfig(method=method))
    full = ParticleDetector(DetectorConfig(method=method, segment_bin_px=1))
    truth = _separated_grid(rng, n, 8)
    frame = _frame(rng, (n, n), truth, rng.uniform(3000.0, 8000.0, len(truth)))
    found = binned(frame)
    assert binned._get_plan(frame.shape).b > 1  # the auto path really binned
    assert full._get_plan(frame.shape).b == 1
    reference = full(frame)
    assert found.shape == reference.shape == truth.shape
    # Strong radial-symmetry seeds come from the binned peaks (their window may sit a
    # pixel off, shifting the brightness order of near-equal spots), not the position.
    assert np.all(_match(found, reference) < 0.05)
    if method == "centroid":  # window-dependent: every seed confirmed at full resolution
        np.testing.assert_allclose(found, reference, atol=0.05)
    assert np.all(_match(found, truth) < 0.3)


def test_binned_seeds_confirm_only_marginal_candidates() -> None:
    # Strong spots seed from their binned peaks; a faint one (binned SNR under the
    # confirmation margin) still goes through the full-resolution check and is found.
    rng = np.random.default_rng(5)
    truth = _separated_grid(rng, 512, 6)
    amps = np.full(len(truth), 6000.0)
    amps[7] = 250.0  # about the full threshold once binned
    frame = _frame(rng, (512, 512), truth, amps)
    det = ParticleDetector(DetectorConfig(threshold_sigma=6.0))
    calls: list[int] = []
    original = det._confirm

    def spy(frame, rows, *args):  # type: ignore[no-untyped-def]
        calls.append(rows.size)
        return original(frame, rows, *args)

    det._confirm = spy  # type: ignore[method-assign]
    found = det(frame)
    assert det._get_plan(frame.shape).b > 1
    assert calls and 0 < calls[0] < len(truth) // 4  # only the marginal few
    reference = ParticleDetector(DetectorConfig(threshold_sigma=6.0, segment_bin_px=1))(frame)
    assert found.shape == reference.shape == truth.shape
    assert np.all(_match(found, reference) < 0.05)
    assert _match(found, truth)[7] < 1.0 and np.delete(_match(found, truth), 7).max() < 0.3


def test_binned_pure_noise_gives_no_detections() -> None:
    det = ParticleDetector()
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        frame = _frame(rng, (512, 512), np.zeros((0, 2)), np.zeros(0))
        assert det._get_plan(frame.shape).b > 1
        assert det(frame).shape == (0, 2)


@pytest.mark.parametrize(
    "truth_xy", [(1.3, 260.2), (510.2, 2.0), (264.4, 510.6), (2.7, 3.1), (0.2, 0.3)]
)
def test_binned_particle_near_edge(truth_xy: tuple[float, float]) -> None:
    rng = np.random.default_rng(13)
    truth = np.array([truth_xy])
    frame = _frame(rng, (512, 512), truth, [5000.0])
    found = ParticleDetector()(frame)
    assert found.shape == (1, 2)
    assert _match(found, truth)[0] < 0.5
    reference = ParticleDetector(DetectorConfig(segment_bin_px=1))(frame)
    np.testing.assert_allclose(found, reference, atol=0.05)


def test_binned_odd_shape_and_close_pair() -> None:
    # A shape not divisible by the bin factor, a particle in its last partial bin row,
    # and a close pair that the coarser binned mask merges but full resolution resolves.
    rng = np.random.default_rng(17)
    truth = np.array([[300.0, 200.0], [310.5, 203.2], [696.6, 511.4], [50.2, 100.7]])
    frame = _frame(rng, (513, 700), truth, [4000.0, 3000.0, 5000.0, 5000.0])
    found = ParticleDetector()(frame)
    assert found.shape == (4, 2)
    assert np.all(_match(found, truth) < 0.5)
    reference = ParticleDetector(DetectorConfig(segment_bin_px=1))(frame)
    assert np.all(_match(found, reference) < 0.05)


def test_sparse_labels_match_ndimage() -> None:
    rng = np.random.default_rng(6)
    for density in (0.005, 0.05, 0.5):  # scattered (graph) and compact (box) branches
        mask = rng.random((80, 120)) < density
        idx = np.flatnonzero(mask)
        ours = _label_sparse(idx, mask.shape)
        ref = ndimage.label(mask)[0].ravel()[idx]
        pairs = set(zip(ours.tolist(), ref.tolist(), strict=True))
        assert len(pairs) == len(set(ours.tolist())) == len(set(ref.tolist()))


def test_segment_bin_validation() -> None:
    with pytest.raises(ValidationError, match="segment_bin_px"):
        DetectorConfig(segment_bin_px=-1)
    # Forcing a bin on a tiny frame or with smoothing off must not crash.
    rng = np.random.default_rng(2)
    frame = _frame(rng, (64, 48), [(20.3, 30.6)], [5000.0])
    for cfg in (
        DetectorConfig(segment_bin_px=4),
        DetectorConfig(segment_bin_px=2, smooth_sigma_px=0),
    ):
        found = ParticleDetector(cfg)(frame)
        assert found.shape == (1, 2)
        assert _match(found, np.array([[20.3, 30.6]]))[0] < 0.3


def test_dense_binned_field_seeds_from_the_binned_peaks() -> None:
    # 400 spots on 416^2: confirmation patches would cover more than the frame, so the
    # binned peaks seed directly; the result must still match full resolution.
    rng = np.random.default_rng(11)
    truth = _separated_grid(rng, 416, 20)
    frame = _frame(rng, (416, 416), truth, rng.uniform(3000.0, 8000.0, len(truth)))
    cfg = DetectorConfig(smooth_sigma_px=2.0, separation_px=4.0)
    binned = ParticleDetector(cfg)
    plan = binned._get_plan(frame.shape)
    assert plan.b > 1 and len(truth) * plan.confirm_px > 0.5 * frame.size
    found = binned(frame)
    reference = ParticleDetector(cfg.model_copy(update={"segment_bin_px": 1}))(frame)
    assert found.shape == reference.shape == truth.shape
    assert np.all(_match(found, truth) < 0.3)
    assert np.all(_match(found, reference) < 0.05)


@pytest.mark.parametrize("shape", [(96, 128), (99, 130)])  # whole blocks, and leftovers
def test_local_background_flattens_uneven_illumination(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    frame = (1000 + 0.5 * xx + 0.3 * yy + rng.normal(0, 2, shape)).astype(np.uint16)
    bright = _flatten(frame, 33, 1.0)
    dark = _flatten(frame, 33, -1.0)
    np.testing.assert_allclose(dark, -bright, atol=1e-3)  # one pass, either polarity
    inner = bright[20:-20, 20:-20]
    assert abs(float(np.median(inner))) < 0.5 and float(np.std(inner)) < 2.5
    # A particle-free ramp gives no detections once flattened (away from the edges, where
    # the reflected box of a ramp is biased).
    found = ParticleDetector(DetectorConfig(background_px=33))(frame)
    inside = (found > 17).all(axis=1) & (found < np.array(shape[::-1]) - 17).all(axis=1)
    assert not inside.any()


@pytest.mark.parametrize(
    ("polarity", "background_px", "bin_px", "shape"),
    [
        ("dark", 37, 2, (203, 258)),  # leftover rows and columns past the last block
        ("bright", 41, 4, (256, 330)),
        ("dark", 0, 2, (130, 141)),  # polarity flip only
    ],
)
def test_spot_path_flattens_on_the_fly_as_the_whole_frame(
    polarity: str,
    background_px: int,
    bin_px: int,
    shape: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spot path flattens only where it reads (the binned image, the background's
    sample, windows); those reads equal the whole flattened frame's at the same pixels,
    and so do the detections."""
    import agent.detection.detect as detect

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    truth = rng.uniform(12, np.array(shape[::-1]) - 12, (25, 2))
    spots = _spots(shape, truth, np.full(len(truth), 3000.0))
    tilt = 1.0 if background_px else 0.0  # uneven only where a background is removed
    ramp = 1000 + tilt * (2.0 * xx + 1.3 * yy) + rng.normal(0, 3, shape)
    frame = (ramp + (-1 if polarity == "dark" else 1) * spots).astype(np.uint16)
    cfg = DetectorConfig(
        polarity=polarity, background_px=background_px, segment_bin_px=bin_px, smooth_sigma_px=2.0
    )
    det = ParticleDetector(cfg)
    plan = det._get_plan(frame.shape)
    flat = det._prepare(frame, plan)
    assert flat.frame is frame  # no full-size flattened copy was made
    binned = plan.src.copy()
    whole = det._preprocess(frame)
    plan.load(whole)
    np.testing.assert_allclose(binned, plan.src, rtol=0, atol=2e-3)
    rows = rng.integers(0, shape[0], (50, 1))
    cols = rng.integers(0, shape[1], (1, 40))
    assert np.array_equal(flat.take(rows, cols), whole[rows, cols])
    assert flat.level_and_sigma() == pytest.approx(detect._background(whole), abs=1e-9)
    found = det(frame)
    monkeypatch.setattr(detect, "_lazy_flatten", lambda *_: False)
    reference = ParticleDetector(cfg)(frame)
    assert len(found) == len(reference) >= 20
    np.testing.assert_allclose(found, reference, atol=1e-4)


def test_merged_touching_pair_split_by_elongation():
    """Two wide dark images 9 px apart are one peak; with contact_px set the detector
    splits that blob along its major axis into the two particles (round ones stay one)."""
    from agent.detection.pair_split import split_elongated

    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:80, 0:120]
    truth = np.array([[30.0, 40.0], [37.4, 45.2], [90.0, 40.0]])  # a pair, one single
    img = np.full((80, 120), 1000.0)
    for x, y in truth:
        img -= 300.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.5**2))
    frame = (img + rng.normal(0, 5.0, img.shape)).astype(np.float32)
    blob = np.array([[33.7, 42.6], [90.0, 40.0]])
    xy, src = split_elongated(frame, blob, -1.0, 9.0)
    assert len(xy) == 3 and sorted(src.tolist()) == [0, 0, 1]
    d = np.hypot(*(truth[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)).min(axis=1)
    assert np.all(d < 1.5), d
    cfg = DetectorConfig(
        polarity="dark",
        smooth_sigma_px=2.0,
        window_px=4,
        separation_px=4.0,
        threshold_sigma=5.0,
        contact_px=9.0,
    )
    found, score, conf = ParticleDetector(cfg).detect_with_confidence(frame)
    assert len(found) == 3 and len(score) == 3 and len(conf) == 3
    assert len(ParticleDetector(cfg.model_copy(update={"contact_px": 0.0}))(frame)) == 2


@pytest.mark.parametrize("share", [0.002, 0.5])  # few candidates (neighbour reads), many (passes)
def test_local_maxima_are_strict_over_the_in_image_neighbours(share: float) -> None:
    rng = np.random.default_rng(5)
    img = rng.normal(0, 1, (61, 83)).astype(np.float32)
    img[0, 10] = img[0, 11] = 9.0  # a tie on the border: neither is strict
    img[30, 0] = 9.0  # a border maximum
    idx = np.flatnonzero(img.ravel() >= np.quantile(img, 1 - share))
    footprint = np.ones((3, 3), dtype=bool)
    footprint[1, 1] = False
    nb = ndimage.maximum_filter(img, footprint=footprint, mode="constant", cval=-np.inf)
    expected = img.ravel()[idx] > nb.ravel()[idx]
    found = _local_maxima(img, idx, img.ravel()[idx])
    assert np.array_equal(found, expected) and expected.any()
    assert found[np.searchsorted(idx, 30 * 83)] and not found[np.searchsorted(idx, 10)]


def test_suppression_flags_resolved_neighbours_among_the_kept() -> None:
    """One tree serves suppression and pair split's test: the flags are exactly which
    kept detections have another kept one within the near radius."""
    rng = np.random.default_rng(9)
    xy = rng.uniform(0, 60, (150, 2))
    kept, crowded = _suppress(xy, 2.0, 5.0, limit=100)
    assert np.array_equal(kept, _isolated(xy, 2.0)[:100])
    d = np.hypot(*(xy[kept, None, :] - xy[None, kept, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert crowded is not None and np.array_equal(crowded, (d <= 5.0).any(axis=1))
    assert crowded.any() and not crowded.all()


def test_confirmation_filter_and_labels_match_ndimage_on_the_inner_span() -> None:
    """The binned candidates' check smooths only each patch's inner span (a band
    kernel) and labels the stack as one sheet: both as ndimage does on whole patches."""
    from agent.detection.detect import _band_kernel, _label_stack

    rng = np.random.default_rng(4)
    sigma, span = 1.9, 6
    r = int(4.0 * sigma + 0.5)
    patch = rng.normal(0, 1, (7, span + 2 * r, span + 2 * r)).astype(np.float32)
    full = ndimage.gaussian_filter1d(patch, sigma, axis=1, truncate=4.0)
    full = ndimage.gaussian_filter1d(full, sigma, axis=2, truncate=4.0)
    band = _band_kernel(sigma, span)
    inner = slice(r, r + span)
    np.testing.assert_allclose(band @ patch @ band.T, full[:, inner, inner], atol=1e-5)
    mask = rng.random((7, span, span)) > 0.5
    cross = np.zeros((3, 3, 3), dtype=bool)
    cross[1] = ndimage.generate_binary_structure(2, 1)
    expected, _ = ndimage.label(mask, structure=cross)
    labels = _label_stack(mask)
    # Same partition (label numbers may differ): equal labels exactly where expected's are.
    pairs = {(int(a), int(b)) for a, b in zip(expected.ravel(), labels.ravel(), strict=True)}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert np.array_equal(labels > 0, mask)
