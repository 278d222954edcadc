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
