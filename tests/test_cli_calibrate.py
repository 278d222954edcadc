"""`scopeloop calibrate`: file formats, JSON shape, recovered stiffness, one-line errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat
from typer.testing import CliRunner

from agent.cli import app
from policies.calibration import simulate_ou
from policies.calibration.doublewell import simulate_double_well
from policies.calibration.rotational import simulate_rotational

runner = CliRunner()
DT = "0.01"


def _run(*args: str):
    return runner.invoke(app, ["calibrate", *args])


@pytest.fixture(scope="module")
def traj(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("traj")
    np.savetxt(
        d / "h.csv",
        simulate_ou(20.0, 1500, 0.01, rng=1, dims=2),
        delimiter=",",
        header="x,y",
        comments="",
    )
    np.savetxt(d / "plain.csv", simulate_ou(20.0, 1500, 0.01, rng=2), delimiter=",")
    np.save(d / "rot.npy", simulate_rotational(30.0, 6.0, 3000, 0.01, rng=3))
    np.save(d / "dw.npy", simulate_double_well(1.5, 3.0, 1500, 0.01, rng=8))
    savemat(d / "h.mat", {"x": simulate_ou(20.0, 1500, 0.01, rng=4)})
    bad = simulate_ou(20.0, 100, 0.01, rng=5)
    bad[7] = np.nan
    np.savetxt(d / "nan.csv", bad, delimiter=",")
    np.savetxt(d / "short.csv", np.zeros(5), delimiter=",")
    (d / "noheader_y.csv").write_text("t,pos\n" + "\n".join(f"{i},{i}" for i in range(50)))
    (d / "junk.npy").write_bytes(b"not numpy")
    np.savetxt(d / "const.csv", np.full(200, 0.7), delimiter=",")
    drifting = simulate_ou(20.0, 1500, 0.01, rng=6) + np.linspace(0.0, 30.0, 1500)
    np.savetxt(d / "drift.csv", drifting, delimiter=",")
    t = np.arange(1500) * 0.005
    timed = np.c_[t, simulate_ou(20.0, 1500, 0.005, rng=7)]
    np.savetxt(d / "timed.csv", timed, delimiter=",", header="t,x", comments="")
    return d


@pytest.mark.parametrize("name", ["h.csv", "plain.csv", "h.mat"])
def test_json_is_one_object_with_k_near_truth(traj: Path, name: str) -> None:
    res = _run(str(traj / name), "--dt", DT, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model"] == "harmonic" and out["recommended"] == "bayes_ou"
    assert {"equipartition", "forma", "ou_mle", "bayes_ou"} <= set(out["estimates"])
    k = out["estimates"]["bayes_ou"]["k"]
    assert k["unit"] == "fN/um" and k["stderr"] > 0
    assert out["drag"] == "fit" and out["reason"].startswith("bayes_ou: ")
    assert out["estimates"]["bayes_ou"]["D"]["unit"] == "um^2/s"
    for params in out["estimates"].values():  # every estimate carries its interval
        for e in params.values():
            lo, hi = e["interval_95"]
            assert lo <= e["value"] <= (math.inf if hi is None else hi)
    assert abs(math.log(k["value"] / 20.0)) < 0.35
    assert ("k_y" in out["estimates"]["bayes_ou"]) == (name == "h.csv")


def test_rotational_model_and_single_method(traj: Path) -> None:
    res = _run(
        str(traj / "rot.npy"),
        "--dt",
        DT,
        "--model",
        "rotational",
        "--method",
        "exact_mle",
        "--json",
    )
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)["estimates"]
    assert list(est) == ["exact_mle"]
    assert est["exact_mle"]["omega"]["unit"] == "rad/s"
    assert abs(est["exact_mle"]["omega"]["value"] - 6.0) < 4 * est["exact_mle"]["omega"]["stderr"]


def test_table_output(traj: Path) -> None:
    res = _run(str(traj / "plain.csv"), "--dt", DT, "--method", "forma")
    assert res.exit_code == 0 and "forma" in res.stdout and "fN/um" in res.stdout


@pytest.mark.parametrize(
    ("file", "extra", "needle"),
    [
        ("missing.csv", [], "does not exist"),
        ("nan.csv", [], "column x has NaN"),
        ("short.csv", [], "need >= 20"),
        ("noheader_y.csv", [], "column x missing"),
        ("junk.npy", [], "cannot read"),
        ("plain.csv", ["--model", "rotational"], "needs a y column"),
        ("plain.csv", ["--model", "cubic"], "--model"),
        ("plain.csv", ["--method", "magic"], "--method"),
        ("plain.csv", ["--method", "learned"], "--checkpoint"),
        ("plain.csv", ["--exposure", "0.5"], "--exposure"),
        ("plain.csv", ["--drag", "guess"], "--drag"),
        ("plain.csv", ["--surface-distance-um", "0.05"], "--surface-distance-um"),
        ("const.csv", [], "constant"),
        ("drift.csv", [], "no restoring force"),
        ("timed.csv", [], "contradicts the file's time column"),
    ],
)
def test_bad_input_is_one_line_exit_2(traj: Path, file: str, extra: list[str], needle: str) -> None:
    res = _run(str(traj / file), "--dt", DT, *extra)
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize("dt", ["0", "-0.01"])
def test_non_positive_dt(traj: Path, dt: str) -> None:
    res = _run(str(traj / "plain.csv"), "--dt", dt)
    assert res.exit_code == 2 and "--dt" in res.stderr


def test_time_column_gives_dt_and_json_has_the_regime(traj: Path) -> None:
    res = _run(str(traj / "timed.csv"), "--method", "bayes_ou", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    diag = out["diagnostics"]["x"]
    assert diag["relaxations_spanned"] == pytest.approx(1500 * 0.005 * 20.0 / 1.885, rel=0.3)
    assert out["estimates"]["bayes_ou"]["k"]["interval_95"][0] < 20.0


def test_fixed_stokes_drag_that_disagrees_with_the_data_is_warned(traj: Path) -> None:
    # the data were made with a 100 nm bead; claim 1 um: D 10x too small
    res = _run(str(traj / "plain.csv"), "--dt", DT, "--drag", "stokes", "--radius-nm", "1000")
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "--drag fit" in warnings[0]
    right = _run(str(traj / "plain.csv"), "--dt", DT, "--drag", "stokes", "--json")
    assert json.loads(right.stdout)["warnings"] == []


@pytest.mark.parametrize(("name", "model"), [("rot.npy", "rotational"), ("dw.npy", "double-well")])
def test_fixed_drag_of_other_models_checked_against_their_own_fit(
    traj: Path, name: str, model: str
) -> None:
    args = [str(traj / name), "--dt", DT, "--model", model, "--method", "forma", "--json"]
    wrong = json.loads(_run(*args, "--drag", "stokes", "--radius-nm", "1100").stdout)
    assert len(wrong["warnings"]) == 1, wrong["warnings"]
    assert f"({model} fit" in wrong["warnings"][0]
    off = float(re.search(r"([0-9.]+)x off", wrong["warnings"][0]).group(1))
    assert 7.0 < off < 17.0  # 1100 nm for a 100 nm bead: the data's D is ~11x the fixed one
    right = json.loads(_run(*args, "--drag", "stokes").stdout)
    assert right["warnings"] == []
    fitted = json.loads(_run(*args).stdout)  # drag fitted: nothing to check
    assert fitted["warnings"] == []
