"""Benchmarks are measured, not tested for speed: check the output contract only."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_transport_bench_json_contract() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "transport", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one object"
    report = json.loads(lines[0])
    assert report["bench"] == "transport"
    metrics = report["metrics"]
    for key in (
        "throughput_ratio_512",
        "throughput_ratio_2048",
        "rtt_p50_ms",
        "rtt_p99_ms",
        "raw_rtt_p99_ms",
        "rss_growth_mb",
    ):
        assert math.isfinite(metrics[key]), key
    assert metrics["throughput_ratio_512"] > 0 and metrics["throughput_ratio_2048"] > 0
    assert metrics["rtt_p99_ms"] >= metrics["rtt_p50_ms"] > 0
    # Lossless by construction in the throughput part: the credit window never overruns.
    assert metrics["soak_frames_delivered"] >= 0.95 * metrics["soak_s"] * 100


def test_unknown_bench_is_refused_with_the_allowed_names() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "warp-drive", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "transport" in proc.stderr and "warp-drive" in proc.stderr
