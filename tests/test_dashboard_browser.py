"""The live dashboard end to end in headless Chromium (Debian's /usr/bin/chromium, driven
by Playwright): a twin run with `--dashboard`, frames and plots updating, pause (laser
off, no decisions), resume, stop (safe state, the run ends), policy maps, and the token.

Chromium missing is a failure, not a skip: CI installs it (`.ci/run`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zmq

from agent.engine.telemetry import RunTelemetry
from agent.records.recorder import read_events
from drivers.transport import CommandClient, CommandTimeout

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "twin-feedback-trap.yaml"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium "
            "chromium-driver) to run the dashboard browser tests"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data-dir per test
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 860},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def _wait(what: str, predicate: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _int_text(page: Any, selector: str) -> int:
    text = page.text_content(selector) or ""
    return int(text) if text.strip().isdigit() else -1


def _status(base: str, token: str | None = None) -> dict[str, Any]:
    url = f"{base}api/status" + (f"?token={token}" if token else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _laser(client: CommandClient) -> list[Any]:
    return client.call("get_state", timeout_ms=2000).result["laser"]


def test_dashboard_follows_pauses_resumes_and_stops_a_twin_run(
    browser_page: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    log_path = tmp_path / "run.log"
    command = [
        sys.executable, "-m", "agent.cli", "run", str(CONFIG),
        "--set", "duration_s=120", "--set", "compare_free_diffusion=false",
        "--set", f"runs_dir={runs}", "--dashboard", "0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    client: CommandClient | None = None
    ctx = zmq.Context()
    page = browser_page
    try:
        match = _wait(
            "the dashboard URL",
            lambda: re.search(r"dashboard on (http://\S+/)", log_path.read_text()),
            60,
        )
        base = match.group(1)
        _wait("the run to be attached and running", lambda: _status(base)["state"]["state"]
              == "running", 90)  # fmt: skip
        run_dir = Path(_status(base)["run_dir"])
        driver = yaml.safe_load((run_dir / "driver-feedback.yaml").read_text())["driver"]
        client = CommandClient(ctx, driver["command_endpoint"], timeout_ms=2000)

        page.goto(base)
        first = _wait("a frame on the page", lambda: max(_int_text(page, "#frame-seq"), 0))
        _wait("newer frames", lambda: _int_text(page, "#frame-seq") > first + 5)
        plot = "#plot-latency_ms"
        points = _wait("latency points", lambda: int(page.get_attribute(plot, "data-points") or 0))
        _wait(
            "the latency plot to grow",
            lambda: int(page.get_attribute(plot, "data-points")) > points,
        )
        assert page.is_visible("#plot-tracking_error_um")
        assert page.text_content("#run-name") == run_dir.name
        # Published before this page (maybe before the server) attached: replayed on attach.
        _wait("early events", lambda: "phase feedback started" in page.text_content("#events"))
        _wait("the laser on under feedback", lambda: _laser(client), 20)

        page.click("#btn-pause")
        _wait("the page to show paused", lambda: page.text_content("#state") == "paused")
        assert _status(base)["state"]["state"] == "paused"  # the run's own telemetry state
        _wait("the laser off after pause", lambda: _laser(client) == [], 5)
        paused_seq = _int_text(page, "#frame-seq")
        t_pause = time.monotonic()
        while time.monotonic() - t_pause < 1.5:  # no actuation at all while paused
            assert _laser(client) == [], "laser switched on while paused"
            time.sleep(0.05)
        assert _int_text(page, "#frame-seq") > paused_seq, "frames must keep coming while paused"
        assert page.is_enabled("#btn-resume") and not page.is_enabled("#btn-pause")

        page.click("#btn-resume")
        _wait("the page to show running", lambda: page.text_content("#state") == "running")
        _wait("the laser back on after resume", lambda: _laser(client), 20)
        _wait("the overlays", lambda: "laser off" not in (page.text_content("#frame-info") or ""))
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"dashboard screenshot: {shot}")
        assert shot.stat().st_size > 10_000

        page.click("#btn-stop")  # arms
        page.click("#btn-stop")  # confirms
        safe = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not safe:
            try:
                safe = _laser(client) == []
            except CommandTimeout:
                break  # driver already shut down after the run ended
        proc.wait(timeout=90)
        assert proc.returncode == 0, log_path.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        if client is not None:
            client.close()
        ctx.term()
    events = read_events(run_dir / "events-feedback.jsonl")
    kinds = [e["kind"] for e in events]
    pause, resume = kinds.index("pause"), kinds.index("resume")
    assert pause < resume < kinds.index("stop") < kinds.index("end")
    assert "step" not in kinds[pause:resume], "the loop decided while paused"
    assert any(e["kind"] == "step" and e["laser"] for e in events[resume:]), (
        "no control after resume"
    )
    end = events[kinds.index("end")]
    assert end["laser_after"] == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] is True and summary["duration_s"] == 120
    telemetry = json.loads((run_dir / "telemetry.json").read_text())
    assert telemetry["live"] is False


class FakeRun:
    """A run that publishes frames, a GP-style map and metrics, and obeys its control."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True)
        self.run_dir = run_dir
        self.ready = threading.Event()
        self.done = threading.Event()
        self.commands: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tm = RunTelemetry(self.run_dir.name, zmq.Context.instance(), max_frame_hz=30)
        tm.write_info(self.run_dir)
        tm.set_phase("scan")
        tm.set_state("running")
        self.ready.set()
        yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
        seq = 0
        try:
            while not self.done.is_set() and not tm.stop_requested:
                self.commands += tm.poll_control()
                image = (1000 * np.exp(-((xx - 20 - seq % 20) ** 2 + (yy - 30) ** 2) / 8)).astype(
                    np.uint16
                )
                tm.frame(image, seq, 0.5, [[10.0 + (seq % 20) / 2, 15.0]], (16.0, 16.0))
                if seq % 10 == 0:
                    mean = np.sin(xx / 9 + seq / 50) * np.cos(yy / 7)
                    tm.map("gp", {"mean": mean, "std": np.abs(mean) + 0.1},
                           (0, 32, 0, 32), points=[[4, 4], [20, 8], [12, 28]])  # fmt: skip
                tm.metrics({"reward": float(np.sin(seq / 10)), "latency_ms": 1.0 + seq % 3})
                seq += 1
                time.sleep(0.01)
        finally:
            tm.close("stop command" if tm.stop_requested else "finished")


def test_policy_maps_render_and_the_token_guards_every_command(
    browser_page: Any, tmp_path: Path
) -> None:
    from agent.dashboard.attach import fixed_run
    from agent.dashboard.hub import TelemetryHub
    from agent.dashboard.server import DashboardOptions, DashboardServer

    run = FakeRun(tmp_path / "runs" / "20260101-000000-fake")
    run.thread.start()
    assert run.ready.wait(10)
    # A non-loopback bind is allowed only with a token (the refusal is tested below).
    options = DashboardOptions(port=0, host="0.0.0.0", token=TOKEN)
    server = DashboardServer(TelemetryHub(fixed_run(run.run_dir)), options).start()
    base = f"http://127.0.0.1:{server.port}/"
    page = browser_page
    try:
        page.goto(base)  # no token: the page says so and shows nothing
        _wait("the token notice", lambda: "token" in (page.text_content("#notice") or ""), 10)
        assert _int_text(page, "#frame-seq") == -1

        with pytest.raises(urllib.error.HTTPError) as denied:
            _status(base)
        assert denied.value.code == 401
        for given in (None, "wrong-token-123"):
            body = json.dumps({"cmd": "stop", **({"token": given} if given else {})}).encode()
            request = urllib.request.Request(f"{base}api/command", data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as rejected:
                urllib.request.urlopen(request, timeout=5)
            assert rejected.value.code == 401
        assert _websocket_refused(f"ws://127.0.0.1:{server.port}/ws")
        assert run.commands == [] and not run.done.is_set()

        page.goto(f"{base}?token={TOKEN}")
        _wait("a frame", lambda: _int_text(page, "#frame-seq") > 0, 15)
        _wait("the map panel", lambda: page.is_visible("#maps-card"), 10)
        assert page.locator("#map-gp canvas").count() == 2  # mean and std layers
        updates = int(page.get_attribute("#map-gp", "data-updates") or 0)
        _wait("map updates", lambda: int(page.get_attribute("#map-gp", "data-updates")) > updates)
        _wait(
            "the reward plot", lambda: int(page.get_attribute("#plot-reward", "data-points") or 0)
        )
        shot = tmp_path / "dashboard-maps.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"dashboard screenshot: {shot}")

        page.click("#btn-pause")
        _wait("pause through the control channel", lambda: "pause" in run.commands, 10)
        _wait("the page to show paused", lambda: page.text_content("#state") == "paused")
    finally:
        run.done.set()
        run.thread.join(timeout=10)
        server.stop()


def _websocket_refused(url: str) -> bool:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, open_timeout=5) as ws:
            ws.recv(timeout=5)
    except (InvalidStatus, ConnectionClosed):
        return True
    return False


@pytest.mark.parametrize(
    "argv",
    [
        ["dashboard", "--host", "0.0.0.0", "--port", "0"],
        ["run", str(CONFIG), "--dashboard", "0", "--dashboard-host", "0.0.0.0"],
    ],
)
def test_binding_beyond_localhost_without_a_token_is_refused(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token is required" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
