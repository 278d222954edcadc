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
    assert "SPM prediction" in html and (run_dir / "report-spm-maps.png").is_file()


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
        ],
        _quiet(),
    )
    assert summary["measured"] == 20 and summary["grid_points"] == 144
    assert 0.0 <= summary["top1pct_found"] <= 1.0


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
