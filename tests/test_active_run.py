"""`spm-active` runs over the protocol on the PFM twin and on a replay grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from agent.config import ConfigError
from agent.plans.spm_active import run_spm_active

pytestmark = pytest.mark.timeout(180)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KEYS = ("measured", "grid_points", "top1pct_found", "reward_rmse")


def _quiet() -> Console:
    return Console(quiet=True)


def test_short_dkl_run_on_the_twin_writes_summary_and_maps(tmp_path: Path) -> None:
    summary = run_spm_active(
        CONFIGS / "twin-spm-dkl.yaml",
        [f"runs_dir={tmp_path}", "grid=16", "policy.budget=30", "policy.initial=10", "seed=3"],
        _quiet(),
    )
    run_dir = Path(summary["run_dir"])
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in KEYS:
        assert key in saved
    assert saved["measured"] == 30 and saved["grid_points"] == 256
    assert 0.0 <= saved["top1pct_found"] <= 1.0 and saved["reward_rmse"] > 0
    maps = sorted((run_dir / "maps").glob("step-*.npz"))
    assert len(maps) == 3
    html = (run_dir / "report.html").read_text()
    assert "Maps: measured, predicted, uncertainty" in html
    assert (run_dir / "report-spm-maps.png").is_file()
    # the scores came from the twin's truth topic, recorded by evaluation
    kinds = {json.loads(line).get("record") for line in (run_dir / "spm-truth.jsonl").open()}
    assert {"scan", "spectrum", "loops"} <= kinds


def test_twin_truth_topic_carries_its_walls_and_loops(tmp_path: Path) -> None:
    """What the SPM twin publishes on truth/spm is its unperturbed sample: the loops at a
    whole-sample scan's pixel centres, and the walls as that scan saw them."""
    import numpy as np
    import zmq

    from agent.plans.spm_session import spm_driver
    from agent.records.evaluate import (
        TruthRecorder,
        spm_scan_truth,
        spm_tip_on_wall,
        spm_true_loops,
    )
    from drivers.spm_host import SpmHostConfig
    from drivers.spm_truth import scan_wall_mask, twin_spectra
    from simulators.spm import FerroelectricSample, PFMScanner

    ctx = zmq.Context()
    with spm_driver(SpmHostConfig(seed=5), ctx, ["Amplitude"]) as spm:
        assert spm.link.truth
        recorder = TruthRecorder(ctx, spm.link.stream_endpoint, tmp_path / "t.jsonl")
        recorder.start()
        assert recorder.connected.wait(10)
        spm.scan(8, ["Amplitude"])
        scan_seq = spm.last_scan_seq
        spm.spectrum(0.3, 0.4, 5.0, 16)
        aim = (spm.last_spectrum_seq, spm.to_node_xy(0.3, 0.4))
        records = recorder.stop()
    ctx.term()
    loops = spm_true_loops(records)
    assert loops is not None
    v, maps = loops
    ex, ey = spm.extent_um
    sample = FerroelectricSample(seed=5)
    centre = (np.arange(8) + 0.5) * ex / 8
    xy = np.stack(np.meshgrid(centre, centre), axis=-1).reshape(-1, 2)
    expected_loops = twin_spectra(sample, xy, v, 5 + 7919).reshape(8, 8, -1)
    np.testing.assert_allclose(maps, expected_loops, atol=1e-3)
    walls, drift, window = spm_scan_truth(records, scan_seq)
    expected, _ = scan_wall_mask(sample, PFMScanner(sample, seed=5), (0, 0, ex, ey), (8, 8), 0.0)
    assert walls.shape == (8, 8) and np.array_equal(walls, expected)
    assert window == (-ex / 2, -ey / 2, ex, ey) and drift.shape == (8, 2)
    assert spm_tip_on_wall(records, scan_seq, [aim]) is not None
    assert spm_tip_on_wall(records, scan_seq + 999, [aim]) is None


def test_replay_run_with_a_twin_exported_grid(tmp_path: Path) -> None:
    from simulators.spm import FerroelectricSample, export_twin_grid

    path = export_twin_grid(FerroelectricSample(seed=4), tmp_path / "grid.npz", grid=12)
    summary = run_spm_active(
        CONFIGS / "replay-spm-dkl.yaml",
        [
            f"runs_dir={tmp_path}",
            f"driver.replay={path}",
            "grid=12",
            "policy.kind=random",
            "policy.budget=20",
            "scan_channels=[Height, Polarization]",  # not the export's truth maps
        ],
        _quiet(),
    )
    assert summary["measured"] == 20 and summary["grid_points"] == 144
    # a recorded grid has no truth topic: the truth scores are left out, not faked
    assert "top1pct_found" not in summary and "reward_rmse" not in summary
    assert not (Path(summary["run_dir"]) / "spm-truth.jsonl").exists()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("policy.kind=magic", "policy.kind"),
        ("policy.budget=0", "policy.budget"),
        ("seed=-1", "seed"),
        ("policy.patch=4", "policy.patch"),
        ("reward=__import__('os')", "reward"),
        ("grid=1000", "grid"),
    ],
)
def test_bad_config_values_give_one_line_errors(tmp_path: Path, override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        run_spm_active(CONFIGS / "twin-spm-dkl.yaml", [f"runs_dir={tmp_path}", override], _quiet())
    text = str(err.value)
    assert "\n" not in text and field in text


def test_replay_config_requires_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"driver\.replay"):
        run_spm_active(CONFIGS / "replay-spm-dkl.yaml", [f"runs_dir={tmp_path}"], _quiet())


def test_active_run_streams_maps_to_the_dashboard_and_obeys_stop(tmp_path: Path) -> None:
    """A dashboard attached to a live `spm-active` run sees the scan, the model's maps and
    metrics; its stop ends the run early (the session then makes the tip safe)."""
    import threading
    import time

    from agent.engine.telemetry import TelemetrySubscriber, find_live_run, send_control

    result: dict[str, object] = {}
    overrides = [f"runs_dir={tmp_path}", "grid=16", "policy.budget=200", "policy.initial=10"]
    worker = threading.Thread(
        target=lambda: result.update(
            run_spm_active(CONFIGS / "twin-spm-dkl.yaml", overrides, _quiet())
        )
    )
    worker.start()
    deadline = time.monotonic() + 60
    info = None
    while info is None and time.monotonic() < deadline:
        info = find_live_run(tmp_path)
        time.sleep(0.05)
    assert info is not None, "no live telemetry.json"
    sub = TelemetrySubscriber(info.publish)
    kinds: dict[str, object] = {}
    try:
        while not {"frame", "map", "metric"} <= set(kinds) and time.monotonic() < deadline:
            for message in sub.poll(200):
                kinds.setdefault(message.kind, message)
        send_control(info.control, "stop")
    finally:
        sub.close()
        worker.join(120)
    assert {"frame", "map", "metric"} <= set(kinds)
    layers = kinds["map"].header["layers"]  # type: ignore[attr-defined]
    assert [layer["name"] for layer in layers] == ["mean", "std"]
    assert result["stopped"] is True and result["measured"] < 200
