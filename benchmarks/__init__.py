"""Benchmarks (`scopeloop bench NAME`): each module has `run(quick, log) -> metrics dict`.

Benchmarks measure; they are not tests. Timings are reported as ratios against a
baseline measured in the same run, because shared machines are noisy.
"""

BENCHMARKS: dict[str, str] = {
    "rl": "benchmarks.rl",
    "transport": "benchmarks.transport",
    "twin": "benchmarks.twin",
    "localization": "benchmarks.localization",
    "spm": "benchmarks.spm",
    "active": "benchmarks.active",
    "mmcore": "benchmarks.mmcore",
    "calibration": "benchmarks.calibration",
    "feedback": "benchmarks.feedback",
    "sweep": "benchmarks.sweep",
    "engine": "benchmarks.engine",
    "faults": "benchmarks.faults",
    "optics": "benchmarks.optics",
}

SMOKE_ENV = "SCOPELOOP_BENCH_SMOKE"


def smoke(quick: bool) -> bool:
    """The smallest run (`--quick` and SCOPELOOP_BENCH_SMOKE=1): a bench's JSON contract in
    seconds for the tests, its slowest sections left out (their own tests cover them)."""
    import os

    return quick and os.environ.get(SMOKE_ENV) == "1"
