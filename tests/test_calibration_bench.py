"""`bench calibration --quick`: the metric contract and its internal consistency."""

from __future__ import annotations

import json
import math

from benchmarks import BENCHMARKS
from benchmarks.calibration import run


def test_quick_bench_metrics_are_consistent() -> None:
    assert BENCHMARKS["calibration"] == "benchmarks.calibration"
    m = run(quick=True, log=lambda _m: None)
    json.dumps(m, allow_nan=False)  # strict JSON: no NaN/inf metrics
    for tag in ("", "_noisy"):
        best, limit = m[f"best_mae_lnk_n1000{tag}"], m[f"bayes_mae_lnk_n1000{tag}"]
        per_method = [
            v for k, v in m.items() if k.startswith("mae_lnk_") and k.endswith(f"_n1000{tag}")
        ]
        assert best == min(per_method) and len(per_method) >= 7
        assert m[f"best_ratio_n1000{tag}"] == best / limit
        assert 0.05 < limit < 0.5  # protocol limit is ~0.2 in ln k at N = 1000
        # The learned estimator is trained in the bench and scored in the same cells; the
        # prior midpoint scores ~1.7, so a network that did not learn fails here.
        for n, worst in ((100, 1.2), (1000, 0.6)):
            assert 0.0 < m[f"mae_lnk_learned_n{n}{tag}"] < worst
        assert m[f"learned_train_seconds{tag}"] > 0
    assert m["learned_train_steps"] > 0
    assert 0.8 <= m["coverage_95"] <= 1.0
    assert 0.7 <= m["coverage_95_learned"] <= 1.0
    assert m["dw_exact_mae_barrier_kt"] < m["dw_forma_mae_barrier_kt"]
    assert m["rot_exact_mae_lnk"] < m["rot_forma_mae_lnk"]
    # drag unknown: ours against the noise-known limit, tweezepy on the same records
    for tag in ("", "_noisy"):
        ours, lim = m[f"mae_lnk_n1000_drag_free{tag}"], m[f"bayes_mae_lnk_n1000_drag_free{tag}"]
        assert m[f"ratio_n1000_drag_free{tag}"] == ours / lim and 0.05 < lim < 0.6
    best_peer = min(m["mae_lnk_short_tweezepy_psd"], m["mae_lnk_short_tweezepy_av"])
    assert m["mae_ratio_vs_tweezepy"] == m["mae_lnk_short"] / best_peer
    assert 0.0 <= m["coverage_95_short"] <= 1.0 and m["median_bias_short"] >= 0.0
    assert m["mae_lnk_short"] < 1.2  # the prior range spans ~8 in ln k
    assert 0.0 < m["mae_lnk_n1000_drag_free_learned"] < 0.8
    # fixed-drag check of the other models: rates per model, records counted
    for model in ("rotational", "double_well", "switching"):
        rates = [
            m[f"drag_check_{what}_{model}"] for what in ("false_alarm", "detect_2x", "detect_11x")
        ]
        assert all(0.0 <= r <= 1.0 for r in rates) and m[f"drag_check_records_{model}"] >= 1
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
