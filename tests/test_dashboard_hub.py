"""The dashboard server keeps up with a fast run by sending each browser only the newest
frame at its own rate; a slow browser never builds a backlog."""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from agent.dashboard.attach import fixed_run, newest_live_run
from agent.dashboard.hub import ClientCursor, TelemetryHub, block_reduce
from agent.dashboard.server import DashboardOptions, DashboardServer, check_bind
from agent.engine.telemetry import RunTelemetry


def _decode(payload: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<I", payload[:4])
    return json.loads(payload[4 : 4 + n]), payload[4 + n :]


def _publish(tm: RunTelemetry, seqs: range, size: int = 512) -> None:
    image = np.zeros((size, size), dtype=np.uint16)
    for seq in seqs:
        image[seq % size, :] = 1000  # a moving bright line
        tm.frame(image, seq, 0.1, [[1.0, 2.0]], (25.0, 25.0))
        tm.metrics({"latency_ms": 1.0 + seq % 5})


def _wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_a_client_that_looks_late_gets_only_the_newest_frame(tmp_path: Path) -> None:
    run_dir = tmp_path / "20260101-000000-fast"
    run_dir.mkdir()
    ctx = zmq.Context.instance()
    tm = RunTelemetry(run_dir.name, ctx, max_frame_hz=0.0, max_px=512)  # every frame goes out
    tm.write_info(run_dir)
    hub = TelemetryHub(fixed_run(run_dir), ctx).start()
    try:
        _wait_for(lambda: hub.status()["attached"])
        _wait_for(lambda: (tm.event("ping"), hub.status()["received"] > 0)[1])
        cursor = ClientCursor()
        for start in range(0, 300, 10):  # 300 frames while this client is not looking
            _publish(tm, range(start, start + 10))
            time.sleep(0.01)
        time.sleep(0.3)
        _publish(tm, range(299, 300))
        _wait_for(lambda: hub.status()["frame_version"] >= 50)
        time.sleep(0.3)
        binaries, update = hub.update_for(cursor)
        frames = [_decode(b) for b in binaries if _decode(b)[0]["type"] == "frame"]
        assert len(frames) == 1, "a late client gets one frame, not a backlog"
        header, pixels = frames[0]
        assert header["seq"] == 299
        assert max(header["width"], header["height"]) <= 256  # downsampled for the browser
        assert len(pixels) == header["width"] * header["height"]
        assert update is not None and len(update["metrics"]["latency_ms"]) >= 50
        again, _ = hub.update_for(cursor)
        assert again == [], "nothing new, nothing sent"
        _publish(tm, range(300, 301))
        _wait_for(lambda: hub.status()["frame_version"] >= 251)
        time.sleep(0.1)
        binaries, update = hub.update_for(cursor)
        assert [_decode(b)[0]["seq"] for b in binaries] == [300]
        assert update is not None and len(update["metrics"]["latency_ms"]) == 1
    finally:
        hub.stop()
        tm.close()


def test_websocket_clients_are_rate_limited_and_current_under_a_100_fps_stream(
    tmp_path: Path,
) -> None:
    from websockets.sync.client import connect

    run_dir = tmp_path / "runs" / "20260101-000000-fast"
    run_dir.mkdir(parents=True)
    ctx = zmq.Context.instance()
    tm = RunTelemetry(run_dir.name, ctx, max_frame_hz=0.0)
    tm.write_info(run_dir)
    server = DashboardServer(
        TelemetryHub(newest_live_run(tmp_path / "runs"), ctx), DashboardOptions(port=0)
    ).start()
    stop = threading.Event()
    published: list[int] = []

    def run() -> None:  # 100 fps, 512 x 512 frames, for as long as the client listens
        seq = 0
        while not stop.is_set():
            _publish(tm, range(seq, seq + 1))
            published.append(seq)
            seq += 1
            time.sleep(0.01)

    thread = threading.Thread(target=run)
    thread.start()
    seqs: list[int] = []
    try:
        with connect(f"ws://127.0.0.1:{server.port}/ws?fps=5") as ws:
            t0 = None
            while t0 is None or time.monotonic() - t0 < 2.0:
                message = ws.recv(timeout=10)
                if isinstance(message, bytes):
                    seqs.append(_decode(message)[0]["seq"])
                    t0 = t0 or time.monotonic()
            newest_published = published[-1]
    finally:
        stop.set()
        thread.join()
        server.stop()
        tm.close()
    assert 3 <= len(seqs) <= 14, f"{len(seqs)} frames in 2 s at fps=5"
    assert seqs == sorted(set(seqs))
    assert len(published) > 5 * len(seqs)  # most frames were never sent to this client
    assert newest_published - seqs[-1] < 60  # what it saw was recent (< ~0.6 s old)


def test_block_reduce_keeps_small_spots_and_bounds_the_size() -> None:
    image = np.zeros((2048, 1536), dtype=np.uint16)
    image[1001, 700] = 6400  # a one-pixel spot a stride would miss
    small = block_reduce(image, 256)
    assert max(small.shape) <= 256
    assert small.max() == pytest.approx(6400 / 64)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (DashboardOptions(port=8000, host="0.0.0.0"), "--token is required"),
        (DashboardOptions(port=8000, host="192.168.1.5", token="short"), "at least 8"),
        (DashboardOptions(port=70000), "--port must be within [0, 65535]"),
        (DashboardOptions(port=8000, fps=500), "--fps must be within"),
    ],
)
def test_bad_binds_are_refused_with_one_line(options: DashboardOptions, message: str) -> None:
    with pytest.raises(ValueError, match=None) as refused:
        check_bind(options)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_loopback_needs_no_token() -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(DashboardOptions(port=0, host=host))
    check_bind(DashboardOptions(port=0, host="0.0.0.0", token="long-enough-token"))


def test_dashboard_command_attaches_to_the_newest_live_run(tmp_path: Path) -> None:
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    runs = tmp_path / "runs"
    (runs / "20250101-000000-old").mkdir(parents=True)  # an old run without telemetry
    run_dir = runs / "20260101-000000-live"
    run_dir.mkdir()
    tm = RunTelemetry(run_dir.name, zmq.Context.instance())
    tm.write_info(run_dir)
    tm.set_state("running")
    log = tmp_path / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "dashboard", "--port", "0",
             "--runs-dir", str(runs)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
    accepted: list[str] = []
    try:
        _wait_for(lambda: "dashboard on" in log.read_text(), 60)
        base = re.search(r"dashboard on (http://\S+/)", log.read_text()).group(1)  # type: ignore[union-attr]

        def status() -> dict[str, Any]:
            accepted.extend(tm.poll_control())  # this test is the run: answer its control
            with urllib.request.urlopen(f"{base}api/status", timeout=5) as response:
                return json.loads(response.read())

        _wait_for(lambda: status()["run"] == run_dir.name, 30)
        request = urllib.request.Request(
            f"{base}api/command", data=json.dumps({"cmd": "pause"}).encode(), method="POST"
        )
        reply: list[dict[str, Any]] = []

        def post() -> None:
            with urllib.request.urlopen(request, timeout=10) as response:
                reply.append(json.loads(response.read()))

        sender = threading.Thread(target=post)
        sender.start()
        _wait_for(lambda: (accepted.extend(tm.poll_control()), bool(reply))[1], 10)
        sender.join()
        assert reply[0]["ok"] and reply[0]["state"] == "paused" and accepted == ["pause"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        tm.close()
    assert proc.returncode == 0, log.read_text()


def test_dashboard_command_refuses_a_run_dir_without_telemetry(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "dashboard", "--port", "0", "--run", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "has no telemetry.json" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
