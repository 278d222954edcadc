"""Reports per plan: one tiny real run per plan (made once per module), its report read
back for the plan's headline and sections, units and scale bars, and nothing shown as
"Not available"; then the same run cut short (what a SIGKILL leaves) and without truth.
The feedback trap's report is checked on its own run in test_report_replay.py."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from agent.engine.experiments import DEFAULT_RUN_KIND, RUN_KINDS, peek_kind, resolve
from agent.records.frame_recording import sidecar_path
from agent.records.plots import length_label, nice_length
from agent.records.report import write_report

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPM_SHORT = ["grid=8", "policy.budget=8", "policy.initial=2", "policy.batch=2"]
SCALE_BAR = re.compile(r"scale bar \d+(\.\d+)? (nm|µm|mm)")


def _run(config: str, overrides: list[str], runs: Path) -> tuple[Path, dict[str, Any]]:
    """Run a shipped config through its kind's entry point, as `scopeloop run` does."""
    path = CONFIGS / config
    entry = resolve(peek_kind(path, DEFAULT_RUN_KIND), RUN_KINDS)
    console = Console(file=io.StringIO())
    summary = entry(path, [f"runs_dir={runs}", *overrides], console)
    return Path(summary["run_dir"]), summary


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def _headline(page: str) -> str:
    return page.split('<p class="headline">')[1].split("</p>")[0]


def _titles(page: str) -> list[str]:
    return re.findall(r"<h2>([^<]+)</h2>", page)


def _check_page(run_dir: Path, page: str, sections: list[str]) -> None:
    """The plan's sections in order, before the shared ones; every image on disk."""
    assert "Not available" not in page
    titles = _titles(page)
    assert titles[: len(sections)] == sections, titles
    assert page.index('class="headline"') < page.index("<h2>")  # the result first
    for image in re.findall(r'<img src="([^"]+)"', page):
        assert not Path(image).is_absolute()
        assert (run_dir / image).stat().st_size > 4096, image
    assert not {"Laser power", "Loop latency", "True trajectories"} & set(titles)  # not a trap


def _cut_short(run_dir: Path) -> None:
    """What a SIGKILL after the run's last record leaves: no summary, logs never closed."""
    (run_dir / "summary.json").unlink()
    for log in [*run_dir.glob("events-*.jsonl"), sidecar_path(run_dir / "frames.ome.zarr")]:
        if log.is_file():
            lines = log.read_text().splitlines(keepends=True)
            kept = [line for line in lines if '"log_closed"' not in line and '"closed"' not in line]
            log.write_text("".join(kept))


def test_scale_bar_lengths_read_as_round_numbers() -> None:
    assert [nice_length(s) for s in (2.0, 128.0, 1024.0, 7.0)] == pytest.approx(
        [0.2, 20.0, 200.0, 1.0]
    )
    assert [length_label(v) for v in (0.2, 20.0, 2000.0)] == ["200 nm", "20 µm", "2 mm"]
    with pytest.raises(ValueError, match="span"):
        nice_length(0.0)


# --- smart acquisition ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    runs = tmp_path_factory.mktemp("smart")
    return _run(
        "twin-smart-acquisition.yaml",
        ["grid.nx=3", "grid.ny=3", "revisit.timepoints=2", "dose_budget=null"],
        runs,
    )


def test_smart_acquisition_report(smart_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir = _copy(smart_run[0], tmp_path)
    summary = smart_run[1]
    assert summary["positions_revisited"] >= 1  # the twin's sample has an object in view
    page = write_report(run_dir).read_text()
    _check_page(run_dir, page, ["Screened positions", "Dose spent", "Revisited positions"])
    headline = _headline(page)
    # the dose, summed from the frames logged, is the plan's own account of it
    assert f"Dose spent: {summary['dose_used']:.4g} (ms at full intensity)" in headline
    percent = 100 * summary["dose_used"] / summary["dose_all_high"]
    assert f"{percent:.1f} % of imaging all 9 positions" in headline
    assert f"({summary['dose_all_high']:.4g};" in headline
    assert f"revisited {summary['positions_revisited']}" in headline
    assert SCALE_BAR.search(page) and "stage coordinates in µm" in page
    assert 'class="left-out"' not in page
    rows = page.split("<h2>Revisited positions</h2>")[1].split("</table>")[0].count("<tr>")
    assert rows == 1 + summary["positions_revisited"]


def test_smart_acquisition_report_cut_short(
    smart_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir = _copy(smart_run[0], tmp_path)
    _cut_short(run_dir)
    page = write_report(run_dir).read_text()
    assert "Cut short: no summary.json" in page and "events-smart.jsonl never closed" in page
    assert "frames.ome.zarr: cut short" in page
    assert "Dose spent so far:" in _headline(page)
    _check_page(run_dir, page, ["Screened positions", "Dose spent", "Revisited positions"])


# --- SPM: inverse (DKL) on the twin, sparse (GP) on a replay grid, forward ---------------


@pytest.fixture(scope="module")
def dkl_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    runs = tmp_path_factory.mktemp("dkl")
    return _run("twin-spm-dkl.yaml", [*SPM_SHORT, "policy.fit_steps_first=30"], runs)


SPM_SECTIONS = [
    "Maps: measured, predicted, uncertainty",
    "Measured points in order",
    "Reward and model error against steps",
    "Top-k found against budget",
]


def test_spm_dkl_report(dkl_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir = _copy(dkl_run[0], tmp_path)
    summary = dkl_run[1]
    page = write_report(run_dir).read_text()
    _check_page(run_dir, page, SPM_SECTIONS)
    k = max(1, round(0.01 * summary["grid_points"]))
    found = round(summary["top1pct_found"] * k)
    headline = _headline(page)
    assert f"Found {found} of the top-{k} true cells (top 1 %) with 8 spectra" in headline
    assert f"off by {summary['reward_nrmse']:.2f} SD" in headline
    assert "Axes in µm over the 2 x 2 µm scan" in page and SCALE_BAR.search(page)


def test_spm_report_cut_short(dkl_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir = _copy(dkl_run[0], tmp_path)
    _cut_short(run_dir)
    steps = sorted((run_dir / "maps").glob("step-*.npz"))
    steps[-1].unlink()  # killed before its last step's maps were written
    (run_dir / "truth-reward.npz").unlink()  # ... so before the truth was scored
    page = write_report(run_dir).read_text()
    assert "Cut short: no summary.json" in page and "events-spm.jsonl never closed" in page
    headline = _headline(page)
    with np.load(steps[-2]) as last:
        measured = len(last["measured"])
        best = float(np.nanmax(last["values"]))
    assert headline.startswith(f"Best reward {best:.4g} (area) at (")
    assert f"µm, after {measured} spectra" in headline and "so far" in headline
    _check_page(run_dir, page, SPM_SECTIONS[:3])
    assert "Top-k found against budget (no true reward map" in page  # left out, said why


@pytest.fixture(scope="module")
def sparse_replay_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from simulators.spm import FerroelectricSample, export_twin_grid

    runs = tmp_path_factory.mktemp("replay")
    grid = export_twin_grid(FerroelectricSample(seed=4), runs / "grid.npz", grid=8)
    overrides = ["workflow=sparse", "policy.kind=gp", "policy.acquisition=ipv", "policy.patch=3"]
    return _run("replay-spm-dkl.yaml", [*SPM_SHORT, *overrides, f"driver.replay={grid}"], runs)


def test_spm_sparse_replay_report(
    sparse_replay_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir = _copy(sparse_replay_run[0], tmp_path)
    page = write_report(run_dir).read_text()
    # A recorded grid is a real instrument's: no truth topic, so no top-k section, and
    # the headline is what the run itself measured.
    _check_page(run_dir, page, SPM_SECTIONS[:3])
    assert _headline(page).startswith("Best reward") and SCALE_BAR.search(page)
    assert json.loads((run_dir / "summary.json").read_text())["workflow"] == "sparse"


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from agent.training.spm_segmenter import SegmenterTrainConfig, train_segmenter

    runs = tmp_path_factory.mktemp("forward")
    tiny = SegmenterTrainConfig(
        seeds=[10_001], calib_seeds=[10_101, 10_102], pixels=32, steps=3, members=2
    )
    segmenter, _ = train_segmenter(tiny)
    segmenter.save(runs / "seg.pt")
    overrides = [
        "policy.budget=6",
        "forward.scan_pixels=32",
        f"forward.checkpoint={runs / 'seg.pt'}",
        "forward.wall_threshold=0.02",  # a 3-step ensemble is unsure everywhere
        "forward.register_every=3",
    ]
    return _run("twin-spm-forward.yaml", overrides, runs)


def test_spm_forward_report(forward_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir = _copy(forward_run[0], tmp_path)
    summary = forward_run[1]
    page = write_report(run_dir).read_text()
    assert not summary["ood_flagged"] and summary["measured"] == 6
    _check_page(
        run_dir,
        page,
        [
            "Maps: scan, wall probability, uncertainty",
            "Measured points in order",
            "Reward and walls measured against spectra",
        ],
    )
    headline = _headline(page)
    walls = f"{100 * summary['walls_measured_fraction']:.0f} % of the true wall segments"
    assert headline.startswith("Took 6 spectra on detected domain walls") and walls in headline
    assert "Axes in µm over the 2 x 2 µm scan" in page and SCALE_BAR.search(page)
