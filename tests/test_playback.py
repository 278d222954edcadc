"""A recorded run served as a live camera: the same node, gate and protocol as a rig,
and a plan written for the twin runs on it unchanged."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq
from PIL import Image

from drivers.config import DriverConfig
from drivers.playback_devices import open_playback
from drivers.serve import build_node
from drivers.transport import CommandClient, CommandError, StreamSubscriber

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _spots(n_frames: int, shape: tuple[int, int] = (96, 96)) -> tuple[np.ndarray, np.ndarray]:
    """Frames of one Gaussian particle walking to the right, and its true centres (x, y)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = np.array([[30.0 + 1.5 * i, 48.0 + 0.5 * i] for i in range(n_frames)])
    frames = np.stack(
        [
            100 + 2000 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.0**2))
            for cx, cy in centres
        ]
    ).astype(np.uint16)
    return frames, centres


@pytest.fixture
def ome_tiff(tmp_path: Path) -> Path:
    frames, _ = _spots(8)
    path = tmp_path / "recorded.ome.tif"
    tifffile.imwrite(
        path, frames, ome=True, metadata={"axes": "TYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1}
    )
    return path


def test_a_tiff_recording_states_its_pixel_size(ome_tiff: Path) -> None:
    source, count, pixel_um = open_playback(ome_tiff)
    frames, _ = _spots(8)
    assert count == 8 and pixel_um == pytest.approx(0.1)
    np.testing.assert_array_equal(np.stack(list(source())), frames)


def test_bad_recordings_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"playback.path: .* does not exist"):
        open_playback(tmp_path / "missing.tif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"playback.path: .* has no .*png"):
        open_playback(tmp_path / "empty")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a.png")
    config = DriverConfig(kind="playback", playback={"path": str(tmp_path / "a.png")})
    with pytest.raises(ValueError, match=r"driver\.playback\.pixel_size_um") as info:
        build_node(config, ctx=zmq.Context.instance())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"playback\.path"):
        DriverConfig(kind="playback")


def _serve(config: DriverConfig) -> tuple[object, threading.Thread]:
    node = build_node(config, ctx=zmq.Context.instance())
    thread = threading.Thread(target=node.serve, daemon=True)
    thread.start()
    return node, thread


def test_the_node_serves_the_recording_in_order_and_keeps_its_limits(
    ome_tiff: Path, tmp_path: Path
) -> None:
    config = DriverConfig(
        kind="playback",
        playback={"path": str(ome_tiff)},
        exposure_ms=20.0,
        stream_endpoint=f"ipc://{tmp_path}/s",
        command_endpoint=f"ipc://{tmp_path}/c",
    )
    node, thread = _serve(config)
    ctx = zmq.Context.instance()
    client = CommandClient(ctx, config.command_endpoint, timeout_ms=5000)
    sub = StreamSubscriber(ctx, config.stream_endpoint, rcvhwm=64)
    try:
        client.call("get_state", timeout_ms=5000)
        actuators = set(client.call("get_capabilities").result["actuators"])
        assert actuators == {"camera", "laser", "slm", "xy_stage"}
        frames, _ = _spots(8)
        seen: list[tuple[int, np.ndarray]] = []
        deadline = time.monotonic() + 10
        while len(seen) < 12 and time.monotonic() < deadline:
            frame = sub.recv_newest(timeout_ms=200)
            if frame is not None:
                seen.append((frame.header.state["playback_frame"], frame.data.copy()))
        assert len(seen) >= 12
        for index, data in seen:
            np.testing.assert_array_equal(data, frames[index])
        order = [i for i, _ in seen]
        assert any(b < a for a, b in itertools.pairwise(order))  # it loops
        header_state = frame.header.state
        assert header_state["open_loop"] is True
        assert header_state["pixel_size_um"] == pytest.approx(0.1)
        # The gate is the rig's: a recording does not make out-of-limit light acceptable.
        limit = config.limits.max_laser_power_mw
        with pytest.raises(CommandError, match="power"):
            client.call("set_laser", {"spots": [{"x_um": 1, "y_um": 1, "power_mw": limit * 10}]})
        client.call("set_laser", {"spots": [{"x_um": 1, "y_um": 1, "power_mw": limit / 2}]})
    finally:
        sub.close()
        client.close()
        node.stop.set()
        thread.join(10)


def test_the_feedback_trap_runs_unchanged_on_a_recording(ome_tiff: Path, tmp_path: Path) -> None:
    """The twin's feedback-trap config with only the driver swapped: it runs, acts on
    what it sees, and leaves out what only a twin's truth could give."""
    from agent.config import load_config
    from agent.plans.feedback_trap import run_experiment

    experiment = load_config(
        CONFIGS / "twin-feedback-trap.yaml",
        [
            f"runs_dir={tmp_path}",
            "duration_s=1.0",
            "compare_free_diffusion=false",
            "driver.kind=playback",
            f"driver.playback.path={ome_tiff}",
            "driver.exposure_ms=10",
        ],
    )
    run_dir, summary = run_experiment(experiment)
    assert summary["steps"] > 5 and summary["commands_failed"] == 0
    # No truth topic: what only a twin could say is null (valid JSON), not NaN; what the
    # agent saw is still measured: the recorded particle walks 1.5 px/frame away.
    saved = json.loads((run_dir / "summary.json").read_text(), parse_constant=_no_nan)
    assert saved["rms_feedback_um"] is None and saved["detection_rmse_um"] is None
    assert saved["rms_feedback_detected_um"] > 0.1


def _no_nan(name: str) -> float:
    raise AssertionError(f"summary.json holds {name}, which is not JSON")
