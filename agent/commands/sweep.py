"""`scopeloop sweep CONFIG`: a grid of settings x seeds, each point one run of CONFIG as a
Ray task; a table with means and 95 % intervals, a plot per metric and an HTML summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.config import ConfigError, read_config_mapping

err_console = Console(stderr=True, soft_wrap=True)
console = Console(soft_wrap=True)  # paths and error lines stay whole


def _fail(message: str) -> None:
    err_console.print(message, markup=False, highlight=False)
    raise typer.Exit(2)


def default_sweep_dir(
    config: Path, grid: list[str], seeds: list[int], overrides: list[str]
) -> Path:
    """`<runs_dir>/sweeps/<name>-<hash>`: the same command finds the same folder (resume)."""
    raw = read_config_mapping(config)
    text = json.dumps([config.read_text(), grid, seeds, overrides])
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    name = str(raw.get("name", config.stem))
    return Path(str(raw.get("runs_dir", "runs"))) / "sweeps" / f"{name}-{digest}"


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        config: Annotated[Path, typer.Argument(help="Experiment YAML (any run kind).")],
        grid: Annotated[
            list[str] | None,
            typer.Option("--grid", help="dotted.key=v1,v2,... (repeatable; cartesian product)."),
        ] = None,
        settings_file: Annotated[
            Path | None,
            typer.Option("--settings", help="YAML list of {dotted.key: value} settings (x grid)."),
        ] = None,
        seeds: Annotated[
            int, typer.Option("--seeds", min=1, max=100_000, help="Seeds per setting.")
        ] = 1,
        first_seed: Annotated[
            int, typer.Option("--first-seed", min=0, help="Seeds start here.")
        ] = 0,
        address: Annotated[
            str | None,
            typer.Option(
                "--address", help="Ray cluster: auto or ray://HOST:PORT (default: local)."
            ),
        ] = None,
        workers: Annotated[
            int, typer.Option("--workers", min=1, max=100_000, help="Runs in flight at once.")
        ] = 2,
        cpus_per_run: Annotated[
            float,
            typer.Option("--cpus-per-run", min=0.05, max=1024, help="CPUs each run declares."),
        ] = 1.0,
        out: Annotated[
            Path | None,
            typer.Option("--out", help="Sweep folder (default: runs/sweeps/NAME-HASH)."),
        ] = None,
        overrides: Annotated[
            list[str] | None, typer.Option("--set", help="dotted.key=value for every run.")
        ] = None,
    ) -> None:
        """Run CONFIG over a grid of settings and seeds; finished runs are skipped on re-run."""
        from agent.engine.experiments import validate_run_config
        from agent.sweep.execute import check_address, ray_session, run_on_ray
        from agent.sweep.grid import parse_grid, read_settings_file, sweep_points
        from agent.sweep.results import write_outputs

        grid_items, base = list(grid or []), list(overrides or [])
        seed_list = list(range(first_seed, first_seed + seeds))
        try:
            listed = read_settings_file(settings_file) if settings_file else None
            points = sweep_points(parse_grid(grid_items), seed_list, listed)
            if settings_file:  # the folder name follows what the runs are
                grid_items = [*grid_items, settings_file.read_text()]
            for point in points:  # every point is checked before any run starts
                try:
                    validate_run_config(config, [*base, *point.overrides()])
                except ConfigError as exc:
                    _fail(f"sweep: point {point.label}: {str(exc).splitlines()[0]}")
            sweep_dir = out or default_sweep_dir(config, grid_items, seed_list, base)
            if address is not None:
                check_address(address)
        except ConfigError as exc:
            _fail(str(exc).splitlines()[0])
        points_dir = sweep_dir / "points"
        points_dir.mkdir(parents=True, exist_ok=True)
        done = _finished(points_dir)
        todo = [p for p in points if p.point_id not in done]
        console.print(
            f"sweep {sweep_dir}: {len(points)} runs, {len(points) - len(todo)} already finished",
            markup=False,
            highlight=False,
        )
        results = [done[p.point_id] for p in points if p.point_id in done]
        if todo:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                TimeElapsedColumn(),
            )
            try:
                with (
                    ray_session(address, workers, cpus_per_run) as ray,
                    Progress(*columns, console=console) as progress,
                ):
                    task = progress.add_task("sweep", total=len(todo), failed=0)
                    failed = 0

                    def on_result(result: dict) -> None:
                        nonlocal failed
                        (points_dir / f"{result['point_id']}.json").write_text(json.dumps(result))
                        failed += result["status"] != "ok"
                        progress.update(task, advance=1, failed=failed)

                    results += run_on_ray(
                        ray,
                        config.read_text(),
                        todo,
                        str(sweep_dir),
                        base,
                        workers=workers,
                        cpus_per_run=cpus_per_run,
                        on_result=on_result,
                    )
            except ConfigError as exc:
                _fail(str(exc).splitlines()[0])
        paths = write_outputs(sweep_dir, results)
        _print_table(results)
        console.print(f"summary: {paths['html']}", markup=False, highlight=False)


def _finished(points_dir: Path) -> dict[str, dict]:
    """Points already run to success (failed ones run again)."""
    finished = {}
    for path in points_dir.glob("p-*.json"):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a half-written file: the point runs again
        if result.get("status") == "ok":
            finished[result["point_id"]] = result
    return finished


def _print_table(results: list[dict]) -> None:
    """Per setting and metric: mean and 95 % interval over its seeds."""
    from agent.sweep.results import summarize_settings

    table = Table("setting", "metric", "mean", "95 % interval", "runs ok")
    for s in summarize_settings(results):
        for name, m in s["metrics"].items():
            low, high = m["ci95"]
            interval = f"[{low:.4g}, {high:.4g}]" if low is not None else "(one run)"
            table.add_row(
                s["label"], name, f"{m['mean']:.4g}", interval, f"{s['runs'] - s['failed']}"
            )
    console.print(table)
    for r in results:
        if r["status"] != "ok":
            line = f"failed: {r['label']} seed {r['seed']}: {r['error']}"
            console.print(line, markup=False, highlight=False)
