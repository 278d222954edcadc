"""Running sweep points: one `run_point` (a run through the config's own entry, exactly
as `scopeloop run CONFIG --set ...` would), called in a plain loop or as a Ray task.

A point's run directory lives under `<sweep>/runs/<point_id>/`; its result (metrics or
the error line) comes back as a plain dict, so on a cluster nothing but that dict has to
travel back to the host that started the sweep.
"""

from __future__ import annotations

import contextlib
import io
import math
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console

from agent.config import ConfigError
from agent.engine.experiments import DEFAULT_RUN_KIND, RUN_KINDS, peek_kind, resolve
from agent.sweep.grid import PointResult, SweepPoint

ADDRESS_TIMEOUT_S = 5.0


def numeric_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's top-level numbers (bools, non-finite values and the seed left out)."""
    return {
        key: float(value)
        for key, value in summary.items()
        if key != "seed"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def run_point(
    config_text: str, point: SweepPoint, sweep_dir: str, overrides: list[str]
) -> PointResult:
    """One point, run to its end; a failure comes back as its error line, never raised."""
    runs_root = Path(sweep_dir) / "runs" / point.point_id
    runs_root.mkdir(parents=True, exist_ok=True)
    config_path = runs_root / "config-source.yaml"  # the text travels, not a path: a
    config_path.write_text(config_text)  # cluster node need not share this host's files
    all_overrides = [*overrides, *point.overrides(), f"runs_dir={runs_root}"]
    result = failed_result(point, None)
    started = time.monotonic()
    quiet = Console(file=io.StringIO())
    printed = io.StringIO()  # an entry that reports its own error prints it, then exits
    try:
        entry = resolve(peek_kind(config_path, DEFAULT_RUN_KIND), RUN_KINDS)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(printed):
            summary = entry(config_path, all_overrides, quiet)
        result["metrics"] = numeric_metrics(summary or {})
        result["status"] = "ok"
    except (Exception, SystemExit) as exc:  # a failed run is a row, not the end of the sweep
        said = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
        exited = isinstance(exc, SystemExit) or type(exc).__name__ == "Exit"
        result["error"] = said[-1] if exited and said else error_line(exc)
    result["seconds"] = time.monotonic() - started
    result["run_dir"] = newest_run_dir(runs_root)
    return result


def failed_result(point: SweepPoint, error: str | None) -> PointResult:
    return {
        "point_id": point.point_id,
        "label": point.label,
        "setting": dict(point.setting),
        "seed": point.seed,
        "status": "failed",
        "error": error,
        "metrics": {},
        "run_dir": None,
    }


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, ConfigError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def newest_run_dir(runs_root: Path) -> str | None:
    dirs = [d for d in runs_root.glob("*") if d.is_dir()] if runs_root.is_dir() else []
    return str(max(dirs, key=lambda d: d.stat().st_mtime)) if dirs else None


def _run_point_on_node(
    config_text: str, point: SweepPoint, sweep_dir: str, overrides: list[str]
) -> PointResult:
    """`run_point` in a Ray worker, noting which node ran it."""
    import ray

    result = run_point(config_text, point, sweep_dir, overrides)
    result["node"] = ray.get_runtime_context().get_node_id()
    return result


def run_serial(
    config_text: str, points: list[SweepPoint], sweep_dir: str, overrides: list[str]
) -> Iterator[PointResult]:
    """The plain loop (the bench's baseline; same `run_point` as the Ray tasks)."""
    for point in points:
        yield run_point(config_text, point, sweep_dir, overrides)


def check_address(address: str) -> None:
    """An explicit cluster address must answer a TCP connect within 5 s (ConfigError)."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if parsed.scheme != "ray" or not parsed.hostname or parsed.port is None:
        raise ConfigError(
            f"sweep: --address {address!r}: expected auto, ray://HOST:PORT or HOST:PORT"
        )
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=ADDRESS_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"sweep: --address {address}: no Ray cluster answered within "
            f"{ADDRESS_TIMEOUT_S:g} s ({exc.strerror or exc})"
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None, workers: int, cpus_per_run: float) -> Iterator[Any]:
    """Ray for the sweep: an embedded local instance (started and stopped here, bound to
    127.0.0.1) when `address` is None, else the cluster at `address`."""
    from agent.engine.ray_runtime import connect_ray, init_local_ray

    if address is None:
        ray = init_local_ray(math.ceil(workers * cpus_per_run))
    else:
        try:
            ray = connect_ray(address)
        except (ConnectionError, RuntimeError) as exc:
            raise ConfigError(f"sweep: --address {address}: {error_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def map_on_ray(
    ray: Any,
    fn: Callable[..., Any],
    calls: list[tuple[Any, ...]],
    *,
    workers: int,
    cpus_per_call: float,
    on_done: Callable[[int, Any, BaseException | None, float], None],
) -> None:
    """`fn(*args)` for every args tuple as a Ray task declaring `cpus_per_call` CPUs, at
    most `workers` in flight. `on_done(index, value, error, seconds)` sees each call as it
    finishes (seconds: submit -> result); a call whose worker died reports its error."""
    task = ray.remote(num_cpus=cpus_per_call, max_retries=0)(fn)
    waiting = list(enumerate(calls))
    in_flight: dict[Any, tuple[int, float]] = {}
    while waiting or in_flight:
        while waiting and len(in_flight) < workers:
            index, args = waiting.pop(0)
            in_flight[task.remote(*args)] = (index, time.monotonic())
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            index, started = in_flight.pop(ref)
            try:
                value, error = ray.get(ref), None
            except Exception as exc:  # the worker itself died (killed, out of memory)
                value, error = None, exc
            on_done(index, value, error, time.monotonic() - started)


def run_on_ray(
    ray: Any,
    config_text: str,
    points: list[SweepPoint],
    sweep_dir: str,
    overrides: list[str],
    *,
    workers: int,
    cpus_per_run: float,
    on_result: Callable[[PointResult], None],
) -> list[PointResult]:
    """Every point as a Ray task (see `map_on_ray`); `on_result` sees each result as it
    finishes (progress, resume files)."""
    results: list[PointResult] = []

    def collect(index: int, value: Any, error: BaseException | None, seconds: float) -> None:
        result = failed_result(points[index], error_line(error)) if error else value
        result["task_seconds"] = seconds  # queue + run + return
        results.append(result)
        on_result(result)

    calls = [(config_text, point, sweep_dir, overrides) for point in points]
    map_on_ray(
        ray, _run_point_on_node, calls, workers=workers, cpus_per_call=cpus_per_run, on_done=collect
    )
    return results
