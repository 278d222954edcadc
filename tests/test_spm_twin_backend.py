"""PFM twin and replay grid behind the Nanonis server, driven by the unmodified vendor client."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from drivers import spm_twin_backend as stb
from drivers.nanonis_server import NanonisServer, ScanFrame, SpmBackend
from drivers.spm_twin_backend import (
    PFM_SIGNALS,
    Z_RETRACTED_M,
    PfmTwinBackend,
    ReplayBackend,
    serve_spm,
    spm_limits,
)
from simulators.spm import (
    C_DOWN,
    C_UP,
    FerroelectricSample,
    FerroelectricSampleConfig,
    PFMScanner,
    export_twin_grid,
    loop_features,
    pfm_statistics,
    triangular_waveform,
)

nanonis_spm = pytest.importorskip("nanonis_spm")
Nanonis = nanonis_spm.Nanonis

pytestmark = pytest.mark.timeout(30)

SEED = 3
#: A 1 um film at the default pixel size: same statistics, 4x cheaper to build.
SMALL = FerroelectricSampleConfig(extent_um=(1.0, 1.0), grid=256)
HEIGHT, AMP, PHASE = (PFM_SIGNALS.index(n) for n in ("Height (m)", "Amplitude (m)", "Phase (deg)"))


def _ok(result: tuple) -> list:
    err, _raw, values = result
    assert err == ""
    return values


@pytest.fixture
def backend() -> PfmTwinBackend:
    return PfmTwinBackend(SMALL, seed=SEED)


@pytest.fixture
def client(backend: PfmTwinBackend) -> Iterator[Nanonis]:
    with NanonisServer(backend, "127.0.0.1", 0, limits=spm_limits(backend)) as srv:
        sock = socket.create_connection(srv.address, timeout=5)
        yield Nanonis(sock)
        sock.close()


def _grab(client: Nanonis, channel: int, forward: int = 1) -> tuple[str, np.ndarray]:
    _size, name, _rows, _cols, data, _up = _ok(client.Scan_FrameDataGrab(channel, forward))
    return name, np.asarray(data)


def _scan(client: Nanonis, channels: list[int], frame: tuple, px: int) -> dict[str, np.ndarray]:
    _ok(client.Scan_FrameSet(*frame, 0.0))
    _ok(client.Scan_BufferSet(channels, px, px))
    _ok(client.Scan_Action(0, 1))
    assert _ok(client.Scan_StatusGet()) == [0]  # not realtime: done at once
    return dict(_grab(client, c) for c in channels)


def _interior_c_up(sample: FerroelectricSample) -> tuple[float, float]:
    """Sample (um) point of a c+ domain far from any wall, away from the edges."""
    ok = (sample.domain_type == C_UP) & (sample.wall_distance_um >= 0.1)
    m = ok.shape[0] // 4
    ok[:m], ok[-m:], ok[:, :m], ok[:, -m:] = False, False, False, False
    i, j = np.argwhere(ok)[0]
    return (j + 0.5) * sample.pixel_um, (i + 0.5) * sample.pixel_um


def test_backends_implement_protocol(backend: PfmTwinBackend) -> None:
    assert isinstance(backend, SpmBackend)
    assert all(len(n) < 40 for n in PFM_SIGNALS)


def test_signals_and_coordinate_mapping(client: Nanonis, backend: PfmTwinBackend) -> None:
    _size, n, names = _ok(client.Signals_NamesGet())
    assert names == list(PFM_SIGNALS) and n == len(PFM_SIGNALS)
    assert backend.to_sample_um(0.0, 0.0) == (0.5, 0.5)  # origin = sample centre
    assert backend.to_nanonis_m(0.0, 1.0) == (-0.5e-6, 0.5e-6)
    _ok(client.FolMe_XYPosSet(-0.2e-6, 0.1e-6, 1))
    _ok(client.Bias_Set(1.5))
    vals = {name: _ok(client.Signals_ValGet(k, 1))[0] for k, name in enumerate(names)}
    assert vals["Bias (V)"] == pytest.approx(1.5)
    assert (vals["X (m)"], vals["Y (m)"]) == pytest.approx((-0.2e-6, 0.1e-6))
    assert -700e-9 < vals["Z (m)"] < -500e-9  # twin height offset -600 nm
    assert vals["Z (m)"] == pytest.approx(_ok(client.ZCtrl_ZPosGet())[0])
    assert 1e-12 < vals["Amplitude (m)"] < 1e-9
    assert -90.0 <= vals["Phase (deg)"] < 270.0


def test_scan_matches_twin_own_scan(client: Nanonis, backend: PfmTwinBackend) -> None:
    frame = (0.1e-6, -0.05e-6, 0.6e-6, 0.6e-6)
    imgs = _scan(client, [HEIGHT, AMP, PHASE], frame, 96)
    assert set(imgs) == {"Height (m)", "Amplitude (m)", "Phase (deg)"}
    assert all(v.shape == (96, 96) for v in imgs.values())
    got = _ok(client.Scan_FrameGet())
    window = backend.window_um(ScanFrame(*got))
    assert window == pytest.approx((0.3, 0.15, 0.6, 0.6), abs=1e-6)

    # The twin on its own, same seed and window: identical data (SI on the wire).
    own = PFMScanner(FerroelectricSample(SMALL, seed=SEED), seed=SEED).scan(window, (96, 96))
    np.testing.assert_array_equal(imgs["Phase (deg)"], own["phase_deg"])
    for name, key, scale in (
        ("Height (m)", "height_nm", 1e-9),
        ("Amplitude (m)", "amplitude_pm", 1e-12),
    ):
        want = (own[key].astype(np.float64) * scale).astype(np.float32)
        np.testing.assert_array_equal(imgs[name], want)

    # Bimodal phase ~180 deg apart, as the twin (and the real PTO scans).
    stats = pfm_statistics(imgs["Phase (deg)"], imgs["Amplitude (m)"], imgs["Height (m)"], 0.6 / 96)
    assert stats["phase_mode_sep_deg"] >= 160.0

    # Backward trace: same structure, its own noise; second scan advances the clock.
    _name, bwd = _grab(client, PHASE, 0)
    assert bwd.shape == (96, 96) and not np.array_equal(bwd, imgs["Phase (deg)"])
    flip = np.abs((bwd - imgs["Phase (deg)"] + 180) % 360 - 180)
    assert np.median(flip) < 30
    assert backend.clock_s == pytest.approx(96 * 2 * 0.6 / 2.0)


def test_same_seed_same_data_and_direction_down() -> None:
    a, b = PfmTwinBackend(SMALL, seed=7), PfmTwinBackend(SMALL, seed=7)
    from drivers.nanonis_server import ScanAction, ScanBuffer

    for be, up in ((a, True), (b, False)):
        be.set_scan_frame(ScanFrame(0.0, 0.0, 0.4e-6, 0.4e-6))
        be.set_scan_buffer(ScanBuffer((HEIGHT,), 32, 32))
        be.scan_action(ScanAction.START, up)
    up_img, down_img = (be.grab_scan_frame(HEIGHT, True) for be in (a, b))
    assert up_img.direction_up and not down_img.direction_up
    np.testing.assert_array_equal(up_img.data, down_img.data[::-1])  # row 0 = first line


def test_spectroscopy_loop_and_switched_domain(client: Nanonis, backend: PfmTwinBackend) -> None:
    s = backend.sample
    x_um, y_um = _interior_c_up(s)
    i, j = s.index_of(x_um, y_um)
    x_m, y_m = backend.to_nanonis_m(x_um, y_um)
    _ok(client.FolMe_XYPosSet(x_m, y_m, 1))
    frame = (x_m, y_m, 0.2e-6, 0.2e-6)
    before = _scan(client, [PHASE], frame, 64)["Phase (deg)"]

    # Below the coercive bias: a thin loop, no switching.
    _ok(client.BiasSpectr_Open())
    _ok(client.BiasSpectr_LimitsSet(1.0, -1.0))
    _ok(client.BiasSpectr_PropsSet(0, 1, 2, 64, 0.0, 2, 2))
    *_, names, _r, _c, small, _n, _p = _ok(client.BiasSpectr_Start(1, ""))
    assert s.domain_type[i, j] == C_UP

    # 0 -> +10 -> -10 -> 0 V (the twin's triangular waveform) ends beyond -Vc: poles down.
    _ok(client.BiasSpectr_LimitsSet(10.0, -10.0))
    props = _ok(client.BiasSpectr_PropsGet())
    assert props[3] == 64 and props[6] == ["Piezoresponse (m)", "Amplitude (m)", "Phase (deg)"]
    _size, n_ch, names, rows, cols, data, _n, params = _ok(client.BiasSpectr_Start(1, "loop"))
    assert names == ["Bias calc (V)", "Piezoresponse (m)", "Amplitude (m)", "Phase (deg)"]
    assert n_ch == rows == 4 and cols == 64 and data.shape == (4, 64)
    np.testing.assert_array_equal(data[0], triangular_waveform(10.0, 64).astype(np.float32))
    assert [p[0] for p in params] == pytest.approx([10.0, -10.0, x_m, y_m, 0.0], abs=1e-9)
    feats = loop_features(data[0], data[1] / 1e-12)
    thin = loop_features(small[0], small[1] / 1e-12)
    assert feats["area"] > 0.3 * s.properties_at(x_um, y_um)["loop_area"] > 0
    assert feats["area"] > 5 * thin["area"]
    assert feats["vc_pos_v"] > 0 > feats["vc_neg_v"]
    assert s.domain_type[i, j] == C_DOWN

    after = _scan(client, [PHASE], frame, 64)["Phase (deg)"]
    flip = np.abs(((after - before + 180) % 360) - 180)
    centre, corner = (slice(28, 36), slice(28, 36)), (slice(0, 8), slice(0, 8))
    assert np.median(flip[centre]) > 120 and np.median(flip[corner]) < 40

    # Backward sweep: bwd channels aligned with the forward bias; the loop returns up.
    _ok(client.BiasSpectr_PropsSet(0, 0, 1, 0, 0.0, 0, 0))
    *_, names, rows, _c, data, _n, _p = _ok(client.BiasSpectr_Start(1, ""))
    assert rows == 7 and names[4:] == [
        "Piezoresponse [bwd] (m)",
        "Amplitude [bwd] (m)",
        "Phase [bwd] (deg)",
    ]
    assert s.domain_type[i, j] == C_UP  # the reverse sweep ends at +10 V


def test_withdraw_is_safe_state(client: Nanonis, backend: PfmTwinBackend) -> None:
    backend.realtime = True
    _ok(client.Scan_FrameSet(0.0, 0.0, 0.5e-6, 0.5e-6, 0.0))
    _ok(client.Bias_Set(2.0))
    _ok(client.Scan_Action(0, 1))
    assert _ok(client.Scan_StatusGet()) == [1]
    assert _ok(client.ZCtrl_OnOffGet()) == [1]
    _ok(client.ZCtrl_Withdraw(1, 1000))
    assert _ok(client.ZCtrl_OnOffGet()) == [0]
    assert _ok(client.Scan_StatusGet()) == [0]
    assert _ok(client.Bias_Get()) == [0.0]
    assert _ok(client.ZCtrl_ZPosGet()) == [pytest.approx(Z_RETRACTED_M)]
    _ok(client.Scan_Action(3, 1))  # resume does not restart a stopped scan
    assert _ok(client.Scan_StatusGet()) == [0]
    err, _, _ = client.Scan_Action(0, 1)
    assert "withdrawn" in err
    err, _, _ = client.BiasSpectr_Start(1, "")
    assert "withdrawn" in err
    backend.engage()
    _ok(client.Scan_Action(0, 1))


def test_realtime_scan_reveals_lines(backend: PfmTwinBackend) -> None:
    from drivers.nanonis_server import ScanAction, ScanBuffer

    backend.realtime = True
    backend.set_scan_frame(ScanFrame(0.0, 0.0, 0.05e-6, 0.05e-6))  # 0.05 s per line
    backend.set_scan_buffer(ScanBuffer((HEIGHT,), 16, 16))
    backend.scan_action(ScanAction.START, True)
    assert backend.scan_running()
    assert np.isnan(backend.grab_scan_frame(HEIGHT, True).data[-1]).all()
    deadline = time.monotonic() + 5
    while backend.scan_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backend.scan_running()
    assert np.isfinite(backend.grab_scan_frame(HEIGHT, True).data).all()


def test_out_of_range_requests_name_parameter_and_range() -> None:
    backend = PfmTwinBackend(FerroelectricSampleConfig(extent_um=(1.0, 0.5), grid=128), seed=1)
    with NanonisServer(backend, "127.0.0.1", 0, limits=spm_limits(backend)) as srv:
        sock = socket.create_connection(srv.address, timeout=5)
        client = Nanonis(sock)
        err, _, _ = client.FolMe_XYPosSet(0.0, 2e-6, 1)  # server limit: the longer side
        assert "y_m=2e-06" in err and "[-5e-07, 5e-07] m" in err
        err, _, _ = client.FolMe_XYPosSet(0.0, 0.4e-6, 1)  # the backend: the shorter side
        assert "y_m=4e-07" in err and "[-2.5e-07, 2.5e-07] m" in err
        err, _, _ = client.Bias_Set(12.0)
        assert "bias_v=12" in err and "[-10, 10] V" in err
        err, _, _ = client.BiasSpectr_LimitsSet(-11.0, 1.0)
        assert "start_v=-11" in err
        err, _, _ = client.Scan_FrameSet(0.0, 0.2e-6, 0.2e-6, 0.2e-6, 0.0)
        assert "frame y span" in err and "[-2.5e-07, 2.5e-07] m" in err
        err, _, _ = client.Scan_FrameSet(0.0, 0.0, 0.2e-6, 0.2e-6, 30.0)
        assert "angle_deg=30" in err
        assert _ok(client.FolMe_XYPosGet(0)) == [0.0, 0.0]
        sock.close()


def test_serve_spm_twin_defaults() -> None:
    srv = serve_spm(port=0, seed=2)
    try:
        assert isinstance(srv.backend, PfmTwinBackend) and srv.backend.seed == 2
        assert srv.limits.xy_m == pytest.approx((-1e-6, 1e-6))  # default 2 um sample
        sock = socket.create_connection(srv.address, timeout=5)
        client = Nanonis(sock)
        assert _ok(client.Scan_FrameGet()) == pytest.approx([0, 0, 2e-6, 2e-6, 0])
        assert _ok(client.BiasSpectr_LimitsGet()) == [10.0, -10.0]
        sock.close()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sample = FerroelectricSample(FerroelectricSampleConfig(extent_um=(1.0, 1.0), grid=128), seed=4)
    path = tmp_path_factory.mktemp("replay") / "grid.npz"
    return export_twin_grid(sample, path, grid=8, waveform=triangular_waveform(8.0, 32), seed=0)


def test_replay_serves_recorded_spectra_and_images(replay_file: Path) -> None:
    rec = np.load(replay_file)
    srv = serve_spm(port=0, replay=replay_file)
    try:
        backend = srv.backend
        assert isinstance(backend, ReplayBackend)
        assert srv.limits.xy_m == pytest.approx((-0.5e-6, 0.5e-6))  # the grid extent
        sock = socket.create_connection(srv.address, timeout=5)
        client = Nanonis(sock)
        _size, _n, names = _ok(client.Signals_NamesGet())
        assert names[4:] == [
            "Height (m)",
            "Polarization (a.u.)",
            "Wall distance (m)",
            "Loop area (a.u.)",
        ]

        i, j = 2, 5  # grid cell centre -> Nanonis metres
        x_m, y_m = ((j + 0.5) / 8 - 0.5) * 1e-6, ((i + 0.5) / 8 - 0.5) * 1e-6
        _ok(client.FolMe_XYPosSet(x_m, y_m, 1))
        _ok(client.BiasSpectr_PropsSet(0, 1, 1, 101, 0.0, 0, 0))  # ignored: recorded data
        *_, names, rows, cols, data, _n, _p = _ok(client.BiasSpectr_Start(1, ""))
        assert names == ["Bias calc (V)", "Piezoresponse (m)"] and (rows, cols) == (2, 32)
        np.testing.assert_array_equal(data[0], rec["waveform"])
        want = (rec["spectra"][i, j].astype(np.float64) * 1e-12).astype(np.float32)
        np.testing.assert_array_equal(data[1], want)
        assert _ok(client.BiasSpectr_LimitsGet()) == [8.0, -8.0]

        # A frame over the whole grid at the grid's resolution returns the recorded image.
        _ok(client.Scan_FrameSet(0.0, 0.0, 1e-6, 1e-6, 0.0))
        _ok(client.Scan_BufferSet([4, 5], 8, 8))
        _ok(client.Scan_Action(0, 1))
        _name, height = _grab(client, 4)
        np.testing.assert_array_equal(
            height, (rec["image"][0].astype(np.float64) * 1e-9).astype(np.float32)
        )
        _ok(client.Scan_BufferSet([5], 16, 16))  # finer than the grid: nearest neighbour
        _ok(client.Scan_Action(0, 1))
        _name, pol = _grab(client, 5)
        np.testing.assert_array_equal(pol, np.kron(rec["image"][1], np.ones((2, 2))))
        sock.close()
    finally:
        srv.stop()


def test_bad_replay_file_fails_before_serving(
    tmp_path: Path, replay_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("server started for a bad replay file")

    monkeypatch.setattr(stb, "NanonisServer", no_server)
    rec = dict(np.load(replay_file))
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{k: v for k, v in rec.items() if k != "spectra"})
    with pytest.raises(ValueError, match="spectra: missing"):
        serve_spm(port=0, replay=bad)
    np.savez(bad, **{**rec, "waveform": rec["waveform"][:-1]})
    with pytest.raises(ValueError, match="waveform: shape"):
        serve_spm(port=0, replay=bad)
    with pytest.raises(ValueError, match="does not exist"):
        serve_spm(port=0, replay=tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not an NPZ"):
        serve_spm(port=0, replay=tmp_path / "text.npz")
