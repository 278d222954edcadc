"""`scopeloop bench optics`: the output contract (figures are measured, not asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_optics_bench_json_contract() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "optics", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one object"
    report = json.loads(lines[0])
    assert report["bench"] == "optics"
    m = report["metrics"]
    for key in (
        "surrogate_force_error_max",
        "surrogate_speedup",
        "hologram_uniformity_10_traps",
        "hologram_efficiency",
        "hologram_ms_512",
        "hologram_iterations",
        "calibrated_stiffness_ratio",
    ):
        assert math.isfinite(m[key]) and m[key] > 0, key
    # Correctness that does not depend on machine load:
    assert m["surrogate_force_error_rms"] < m["surrogate_force_error_max"] < 0.1
    assert m["hologram_traps_found"] == 10 and m["multitrap_particles_held"] == 10
    assert 0 < m["hologram_efficiency"] <= 1
