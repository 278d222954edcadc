"""`scopeloop sweep`: grid points, intervals, bad input before any run, and whole sweeps
on Ray — an embedded instance, and a two-node cluster the test starts (`ray start --head`
plus a worker node with its own resources) in its own network and pid namespaces, so
nothing can reach off the host and every Ray process ends with the test."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

from agent.cli import app
from agent.config import ConfigError, load_config
from agent.sweep.grid import SweepPoint, parse_grid, read_settings_file, sweep_points
from agent.sweep.results import mean_interval

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "twin-feedback-trap.yaml"
SHORT = ["--set", "duration_s=1", "--set", "compare_free_diffusion=false"]


def test_grid_is_the_product_of_axes_times_seeds_and_ids_are_stable() -> None:
    axes = parse_grid(
        ["policy.gain_per_s=2,6", "agent.detector.classical.method=radial_symmetry,centroid"]
    )
    points = sweep_points(axes, [0, 1, 2])
    assert len(points) == 2 * 2 * 3
    assert len({p.point_id for p in points}) == len(points)
    again = sweep_points(
        parse_grid(
            ["policy.gain_per_s=2,6", "agent.detector.classical.method=radial_symmetry,centroid"]
        ),
        [0, 1, 2],
    )
    assert [p.point_id for p in again] == [p.point_id for p in points]
    assert points[0].overrides() == [
        "policy.gain_per_s=2",
        'agent.detector.classical.method="radial_symmetry"',
        "seed=0",
    ]
    # A string that reads as a number stays a string once the value goes back through YAML.
    assert SweepPoint((("name", "007"),), 0).overrides()[0] == 'name="007"'


def test_listed_settings_go_together_and_cross_the_grid(tmp_path: Path) -> None:
    listed = tmp_path / "scopes.yaml"
    listed.write_text(
        "- {driver.connect: 'tcp://127.0.0.1:7001', agent.auth.server_public_key: a.key}\n"
        "- {driver.connect: 'tcp://127.0.0.1:7002', agent.auth.server_public_key: b.key}\n"
    )
    points = sweep_points(parse_grid(["policy.gain_per_s=2,6"]), [0, 1], read_settings_file(listed))
    assert len(points) == 2 * 2 * 2
    pairs = {
        (dict(p.setting)["driver.connect"], dict(p.setting)["agent.auth.server_public_key"])
        for p in points
    }
    assert pairs == {("tcp://127.0.0.1:7001", "a.key"), ("tcp://127.0.0.1:7002", "b.key")}
    listed.write_text("- {seed: 3}\n")
    with pytest.raises(ConfigError, match="use --seeds"):
        read_settings_file(listed)
    listed.write_text("just text\n")
    with pytest.raises(ConfigError, match="non-empty list of mappings"):
        read_settings_file(listed)


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["policy.gain_per_s"], "expected dotted.key=v1,v2"),
        (["seed=1,2"], "use --seeds"),
        (["a=1", "a=2"], "given twice"),
        (["a=1,,2"], "empty value"),
    ],
)
def test_bad_grid_items_name_themselves(items: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_grid(items)


def test_mean_interval_is_the_student_t_interval() -> None:
    values = [0.9, 1.3, 1.1, 1.7]
    mean, low, high = mean_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (low, high) == pytest.approx(expected)
    assert mean_interval([2.0])[1:] == (None, None)


def test_unknown_key_or_bad_value_fails_in_one_line_before_any_run(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    runner = CliRunner()
    for grid, needle in (
        ("policy.gainz=1,2", "policy.proportional.gainz"),
        ("policy.gain_per_s=2,-1", "gain_per_s"),
    ):
        result = runner.invoke(app, ["sweep", str(CONFIG), "--grid", grid, "--out", str(out)])
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], result.output
        assert not out.exists()  # nothing started


def test_unreachable_address_is_named_before_any_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            str(CONFIG),
            "--grid",
            "policy.gain_per_s=2",
            "--address",
            "ray://127.0.0.1:9",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 2
    assert "--address ray://127.0.0.1:9" in result.output
    assert not (tmp_path / "s").exists()


def _sweep(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "sweep",
            str(CONFIG),
            *SHORT,
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )


def test_embedded_sweep_table_failures_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    # 0.001 s is too short for any driver to come up: those runs fail, the sweep goes on.
    grid = ["--grid", "agent.startup_timeout_s=30,0.001", "--seeds", "2", "--workers", "2"]
    first = _sweep(out, *grid)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert len(rows) == 4
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(ok) == 2 and len(failed) == 2
    assert all(r["setting"] == "agent.startup_timeout_s=0.001" and r["error"] for r in failed)
    assert all("\n" not in r["error"] for r in failed)
    settings = {r["setting"]: r for r in csv.DictReader((out / "settings.csv").open())}
    good = settings["agent.startup_timeout_s=30"]
    values = [float(r["rms_feedback_um"]) for r in ok]
    assert float(good["rms_feedback_um_mean"]) == pytest.approx(np.mean(values))
    low, high = float(good["rms_feedback_um_ci95_low"]), float(good["rms_feedback_um_ci95_high"])
    assert low <= np.mean(values) <= high
    assert (out / "plots" / "rms_feedback_um.png").stat().st_size > 0
    page = (out / "index.html").read_text()
    for r in ok:  # every finished run's own report is linked from the summary
        report = Path(r["run_dir"]) / "report.html"
        assert report.exists()
        assert str(report.relative_to(out)) in page
    # Each run got exactly the config `scopeloop run CONFIG --set ...` would have given it.
    point = json.loads(next((out / "points").glob("*.json")).read_text())
    overrides = [
        "duration_s=1",
        "compare_free_diffusion=false",
        *[f"{k}={json.dumps(v)}" for k, v in point["setting"].items()],
        f"seed={point['seed']}",
        f"runs_dir={out / 'runs' / point['point_id']}",
    ]
    if point["status"] == "ok":
        snapshot = yaml.safe_load((Path(point["run_dir"]) / "config.yaml").read_text())
        assert snapshot == load_config(CONFIG, overrides).model_dump(mode="json")
    # Re-running skips what finished and retries what failed.
    again = _sweep(out, *grid)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 runs, 2 already finished" in again.stdout
    assert len(list(csv.DictReader((out / "points.csv").open()))) == 4


CLUSTER_SCRIPT = """
set -e
ip link set lo up
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # an embedded Ray earlier in this process sets it
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN={token}
{ray} start --head --port=26379 --num-cpus=1 --include-dashboard=false \
    --disable-usage-stats >/dev/null
{ray} start --address=127.0.0.1:26379 --num-cpus=1 --resources='{{"second_node": 1}}' >/dev/null
{python} -m agent.cli sweep {config} --set duration_s=1 --set compare_free_diffusion=false \\
    --grid policy.gain_per_s=2,6 --address auto --workers 2 --out {out}
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_sweep_on_a_two_node_cluster(tmp_path: Path) -> None:
    import secrets

    out = tmp_path / "sweep"
    script = CLUSTER_SCRIPT.format(
        token=secrets.token_hex(32),
        ray=Path(sys.executable).parent / "ray",
        python=sys.executable,
        config=CONFIG,
        out=out,
    )
    # Own network namespace (loopback only) and pid namespace: the cluster cannot reach
    # off the host, and all its processes end when the script does.
    done = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["status"] for p in points] == ["ok", "ok"]
    # Two runs at once on two 1-CPU nodes: one ran on each node.
    assert len({p["node"] for p in points}) == 2
