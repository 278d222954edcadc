"""`scopeloop twin serve spm`: the PFM twin answers the vendor Nanonis client over TCP."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nanonis_spm


def test_twin_serve_spm_answers_the_vendor_client() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "agent.cli", "twin", "serve", "spm", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        found = re.search(r"serving Nanonis TCP on ([\d.]+):(\d+)", line)
        assert found, line
        with socket.create_connection((found[1], int(found[2])), timeout=10) as sock:
            client = nanonis_spm.Nanonis(sock)
            error, _raw, values = client.Bias_Set(1.5)
            assert error == ""
            error, _raw, values = client.Bias_Get()
            assert error == "" and abs(values[0] - 1.5) < 1e-6
            error, _raw, _values = client.Bias_Set(50.0)  # beyond the +-10 V limit
            assert "bias" in error.lower() and "10" in error
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert proc.returncode == 0


def test_twin_serve_refuses_a_bad_replay_file(tmp_path: Path) -> None:
    bad = tmp_path / "grid.npz"
    bad.write_bytes(b"not an npz")
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "twin", "serve", "spm", "--replay", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "grid.npz" in proc.stderr


def test_spm_driver_node_drives_the_twin_through_nanonis(tmp_path: Path, ipc_dir: Path) -> None:
    """Twin server and driver node as separate processes, agent side via protocol v1."""
    import yaml
    import zmq

    from drivers.transport import CommandClient, StreamSubscriber

    twin = subprocess.Popen(
        [sys.executable, "-u", "-m", "agent.cli", "twin", "serve", "spm", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    driver = None
    ctx = zmq.Context()
    try:
        line = twin.stdout.readline() if twin.stdout else ""
        port = int(re.search(r":(\d+)$", line.strip())[1])
        config = yaml.safe_load(Path("configs/twin-spm-driver.yaml").read_text())
        config.update(
            nanonis_port=port,
            stream_endpoint=f"ipc://{ipc_dir}/s",
            command_endpoint=f"ipc://{ipc_dir}/c",
        )
        path = tmp_path / "spm.yaml"
        path.write_text(yaml.safe_dump(config))
        driver = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "driver", "serve-spm", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = CommandClient(ctx, f"ipc://{ipc_dir}/c", timeout_ms=20_000)
        sub = StreamSubscriber(ctx, f"ipc://{ipc_dir}/s")
        client.call("get_state", timeout_ms=30_000)
        for _ in range(100):  # subscribed once a heartbeat arrives (no slow-joiner loss)
            sub.recv_newest(timeout_ms=50)
            if sub.last_message_ns:
                break
        assert client.call("engage").result["z_controller_on"] is True  # starts withdrawn
        reply = client.call(
            "spectrum",
            {"x_um": 0.1, "y_um": -0.2, "bias_from_v": -8.0, "bias_to_v": 8.0, "points": 64},
        )
        assert len(reply.result["waveform_v"]) == 64
        frame = None
        for _ in range(50):
            frame = sub.recv_newest(timeout_ms=100) or frame
            if frame is not None and frame.header.stream == "spectrum":
                break
        assert frame is not None and frame.header.stream == "spectrum"
        assert frame.data.shape[1] == 64
        try:
            client.call("set_bias", {"bias_v": 25.0})
            raise AssertionError("a 25 V bias must be refused")
        except Exception as exc:  # CommandError
            assert "bias_v" in str(exc) and "[-10, 10]" in str(exc)
    finally:
        ctx.destroy(linger=0)
        for proc in (driver, twin):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
