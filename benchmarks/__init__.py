"""Benchmarks (`scopeloop bench NAME`): each module has `run(quick, log) -> metrics dict`.

Benchmarks measure; they are not tests. Timings are reported as ratios against a
baseline measured in the same run, because shared machines are noisy.
"""

BENCHMARKS: dict[str, str] = {
    "transport": "benchmarks.transport",
    "twin": "benchmarks.twin",
    "localization": "benchmarks.localization",
    "spm": "benchmarks.spm",
}
