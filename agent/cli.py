"""`scopeloop` command line: demo, run, driver serve, bench."""

from __future__ import annotations

import importlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from agent.config import ConfigError, ExperimentConfig, apply_overrides, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
driver_app = typer.Typer(no_args_is_help=True, help="Driver nodes (instrument side).")
app.add_typer(driver_app, name="driver")
twin_app = typer.Typer(no_args_is_help=True, help="Digital twins served as instruments.")
app.add_typer(twin_app, name="twin")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one error, one line

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "twin-feedback-trap.yaml"
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: dotted.key=value (repeatable)."),
]


def _load(config: Path, overrides: list[str] | None) -> ExperimentConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None


def _run(config: ExperimentConfig) -> dict[str, Any]:
    """The feedback trap with its progress bar; a silent driver is one error line."""
    from agent.engine.driver_faults import DriverSilent
    from agent.plans.feedback_trap import run_with_progress

    try:
        return run_with_progress(config, console)
    except DriverSilent as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None


@app.command()
def demo(overrides: SetOption = None) -> None:
    """Run the default experiment: a thermophoretic feedback trap on the particle twin."""
    config = _load(DEFAULT_CONFIG, overrides)
    summary = _run(config)
    ratio = summary.get("rms_ratio", math.nan)
    console.print(f"trapped RMS distance / free-diffusion RMS distance = [bold]{ratio:.3f}[/bold]")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    overrides: SetOption = None,
    dashboard: Annotated[
        int | None,
        typer.Option("--dashboard", help="Serve the live dashboard on this port (0: any)."),
    ] = None,
    dashboard_host: Annotated[
        str, typer.Option("--dashboard-host", help="Bind address (non-loopback needs --token).")
    ] = "127.0.0.1",
    token: Annotated[
        str | None, typer.Option("--token", help="Dashboard token (page and buttons need it).")
    ] = None,
) -> None:
    """Run any experiment config (its top-level `kind`; default feedback-trap).

    With --dashboard the page runs in a thread of this process and attaches to the run
    this command starts, through its runs/<run>/telemetry.json (see agent.dashboard)."""
    from agent.engine.driver_faults import DriverSilent
    from agent.engine.experiments import DEFAULT_RUN_KIND, RUN_KINDS, peek_kind, resolve

    try:
        entry = resolve(peek_kind(config, DEFAULT_RUN_KIND), RUN_KINDS)
    except ConfigError as exc:
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None
    server = _start_dashboard(config, overrides or [], dashboard, dashboard_host, token)
    try:
        entry(config, overrides or [], console)
    except ConfigError as exc:
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None
    except DriverSilent as exc:  # a driver that never answered, or failed to start
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    finally:
        if server is not None:
            server.stop()


def _start_dashboard(
    config: Path, overrides: list[str], port: int | None, host: str, token: str | None
) -> Any:
    """The dashboard server for `run --dashboard` (None without the option)."""
    if port is None:
        if token is not None:
            err_console.print("run: --token needs --dashboard PORT")
            raise typer.Exit(2)
        return None
    import yaml

    from agent.dashboard.attach import runs_started_from_now
    from agent.dashboard.hub import TelemetryHub
    from agent.dashboard.server import DashboardOptions, DashboardServer, check_bind

    options = DashboardOptions(port=port, host=host, token=token)
    try:
        check_bind(options)
    except ValueError as exc:
        message = str(exc).replace("--port", "--dashboard").replace("--host", "--dashboard-host")
        err_console.print(f"run: {message}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    try:  # every run kind keeps its records under `runs_dir` (default runs/)
        raw = apply_overrides(yaml.safe_load(config.read_text()) or {}, overrides)
        runs_dir = Path(str(raw.get("runs_dir", "runs")))
    except (OSError, yaml.YAMLError, ConfigError, AttributeError):
        runs_dir = Path("runs")  # the run itself reports a broken config
    try:
        server = DashboardServer(TelemetryHub(runs_started_from_now(runs_dir)), options).start()
    except OSError as exc:
        err_console.print(f"run: --dashboard {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    console.print(f"dashboard on {server.url}", markup=False, highlight=False)
    return server


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training YAML (top-level `kind`).")],
    overrides: SetOption = None,
) -> None:
    """Train a model on the twin (its `kind` picks the trainer) and save a checkpoint."""
    from agent.engine.experiments import TRAIN_KINDS, peek_kind, resolve

    try:
        resolve(peek_kind(config, None), TRAIN_KINDS)(config, overrides or [], console)
    except ConfigError as exc:
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None


@driver_app.command("serve")
def driver_serve(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (its `driver` section).")],
    overrides: SetOption = None,
) -> None:
    """Serve a driver node (a twin in UniMMCore, or Micro-Manager) until SIGINT/SIGTERM or
    `shutdown`. A feedback-trap config is read whole (its seed reaches the twin); any other
    kind contributes only its `driver` section."""
    from agent.config import load_driver_section
    from agent.engine.experiments import DEFAULT_RUN_KIND, peek_kind
    from drivers.serve import serve

    try:
        feedback = peek_kind(config, DEFAULT_RUN_KIND) == DEFAULT_RUN_KIND
        driver = (
            _load(config, overrides).driver
            if feedback
            else load_driver_section(config, overrides or [])
        )
    except ConfigError as exc:
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve(driver)
    except ValueError as exc:  # a refused bind, an unreadable key, a config the instrument refuses
        err_console.print(f"config error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # the agent waiting on this node reports this line at once
        logging.getLogger("drivers.serve").exception("driver failed")
        err_console.print(f"driver failed: {type(exc).__name__}: {exc}", markup=False)
        raise typer.Exit(1) from None


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory under runs/.")]) -> None:
    """Write report.html with PNG plots for any finished run."""
    from agent.records.report import load_run, write_report

    try:
        path = write_report(run_dir)
    except ValueError as exc:
        err_console.print(f"report: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    console.print(f"report written to {path}", markup=False, highlight=False)
    note = load_run(run_dir).end_note()
    if note:
        console.print(f"run {note}", markup=False, highlight=False)


@app.command()
def replay(
    run_dir: Annotated[Path, typer.Argument(help="A run directory under runs/.")],
    overrides: SetOption = None,
    phase: Annotated[str, typer.Option("--phase", help="feedback or free.")] = "feedback",
) -> None:
    """Re-run the policy offline over a recorded run; report what would have changed.

    `--set policy.gain_per_s=12` (any `policy.*` override) replays another policy."""
    import yaml

    from agent.records.replay import replay_run

    policy = None
    if overrides:
        try:
            recorded = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            raw = apply_overrides({"policy": recorded.get("policy", {})}, overrides)
        except (OSError, yaml.YAMLError, ConfigError) as exc:
            err_console.print(f"replay: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        if set(raw) != {"policy"}:
            err_console.print("replay: --set takes policy.* keys only")
            raise typer.Exit(2)
        policy = raw["policy"]
    try:
        result = replay_run(run_dir, policy=policy, phase=phase)
    except ValueError as exc:
        err_console.print(f"replay: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    if "message" in result:  # a frames replay (agent/records/replay.py replay_frames)
        console.print(result["message"], markup=False, highlight=False)
        return
    moved = result["mean_spot_displacement_um"]  # None: no recorded spot to compare with
    console.print(
        f"{result['steps_differing']} of {result['steps']} decisions differ "
        f"(mean spot move {'n/a' if moved is None else f'{moved:.3f}'} um, mean power change "
        f"{result['mean_power_change_mw']:+.3f} mW); written to {result['output']}"
        + (f" (run {result['cut_short']})" if result.get("cut_short") else ""),
        markup=False,
        highlight=False,
    )
    if "frames_replay" in result:  # the run recorded its frames: detection re-ran on them
        console.print(result["frames_replay"]["message"], markup=False, highlight=False)


@twin_app.command("serve")
def twin_serve(
    kind: Annotated[str, typer.Argument(help="Which twin: spm.")],
    port: Annotated[int, typer.Option("--port", help="TCP port (Nanonis default 6501).")] = 6501,
    host: Annotated[str, typer.Option("--host", help="Bind address.")] = "127.0.0.1",
    seed: Annotated[int, typer.Option("--seed", help="Sample seed.")] = 0,
    replay: Annotated[
        Path | None, typer.Option("--replay", help="NPZ grid (image, spectra, waveform).")
    ] = None,
) -> None:
    """Serve the PFM twin (or a recorded grid) over the Nanonis TCP protocol."""
    import signal
    import threading

    from drivers.spm_twin_backend import serve_spm

    if kind != "spm":
        err_console.print(f"twin serve: KIND must be one of ['spm'], got {kind!r}")
        raise typer.Exit(2)
    if not 0 <= port <= 65535:
        err_console.print(f"twin serve: --port must be within [0, 65535], got {port}")
        raise typer.Exit(2)
    try:
        server = serve_spm(port=port, host=host, seed=seed, replay=replay)
    except (ValueError, OSError) as exc:
        err_console.print(f"twin serve: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    what = f"replay of {replay}" if replay else f"PFM twin (seed {seed})"
    console.print(
        f"{what} serving Nanonis TCP on {server.address[0]}:{server.address[1]}",
        markup=False,
        highlight=False,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()


DETECTORS = ("radial_symmetry", "centroid", "lodestar")


@app.command()
def detect(
    images: Annotated[list[Path], typer.Argument(help="TIFF/PNG files or stacks.")],
    out: Annotated[Path, typer.Option("--out", help="CSV: frame,file,x,y,score.")],
    detector: Annotated[str, typer.Option("--detector", help=f"One of {DETECTORS}.")] = (
        "radial_symmetry"
    ),
    diameter: Annotated[
        float | None, typer.Option("--diameter", help="Feature diameter in pixels (auto).")
    ] = None,
    polarity: Annotated[
        str | None, typer.Option("--polarity", help="bright, dark or ring (auto).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="lodestar: trained weights to load.")
    ] = None,
) -> None:
    """Detect particles in recorded images; x, y in pixels (x = column).

    Settings not given are estimated from the images and printed first.
    """
    from agent.detection.detectors import run_detect
    from agent.detection.offline import ImageReadError

    if detector not in DETECTORS:
        err_console.print(f"detect: --detector must be one of {list(DETECTORS)}, got {detector!r}")
        raise typer.Exit(2)
    if diameter is not None and not 1.0 <= diameter <= 200.0:
        err_console.print(f"detect: --diameter must be within [1, 200] px, got {diameter:g}")
        raise typer.Exit(2)
    if polarity is not None and polarity not in ("bright", "dark", "ring"):
        err_console.print(f"detect: --polarity must be bright, dark or ring, got {polarity!r}")
        raise typer.Exit(2)
    try:
        run_detect(images, out, detector, diameter, polarity, checkpoint, console)
    except (ImageReadError, FileNotFoundError, ValueError) as exc:
        err_console.print(f"detect: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None


@driver_app.command("serve-spm")
def driver_serve_spm(
    config: Annotated[Path, typer.Argument(help="SPM driver YAML (nanonis host/port, limits).")],
    overrides: SetOption = None,
) -> None:
    """Serve an SPM driver node in front of a Nanonis controller (or the PFM twin)."""
    import signal

    import yaml
    from pydantic import ValidationError

    from agent.config import ConfigError, apply_overrides, format_validation_error
    from drivers.serve import resolve_endpoints
    from drivers.spm_config import SpmDriverConfig
    from drivers.spm_node import SpmNode

    try:
        raw = apply_overrides(yaml.safe_load(config.read_text()) or {}, overrides or [])
        settings = resolve_endpoints(SpmDriverConfig.model_validate(raw))
    except ValidationError as exc:
        err_console.print(format_validation_error(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        err_console.print(f"config error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        node = SpmNode(settings)
    except ConnectionError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    except ValueError as exc:  # a refused bind or an unreadable key file
        err_console.print(f"driver: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop.set())
    print(f"spm driver ready: stream={node.endpoints[0]} command={node.endpoints[1]}", flush=True)
    node.serve()


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark name, e.g. transport.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Short run (checks, not figures).")
    ] = False,
) -> None:
    """Measure and print a table; with --json one object {"bench": NAME, "metrics": {...}}."""
    from benchmarks import BENCHMARKS

    if name not in BENCHMARKS:
        err_console.print(f"bench: NAME must be one of {sorted(BENCHMARKS)}, got {name!r}")
        raise typer.Exit(2)
    module = importlib.import_module(BENCHMARKS[name])
    metrics = module.run(quick=quick, log=(lambda _m: None) if as_json else console.print)
    if as_json:
        # Strict JSON: a metric that could not be measured is null, never NaN.
        clean = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in metrics.items()
        }
        sys.stdout.write(json.dumps({"bench": name, "metrics": clean}, allow_nan=False) + "\n")
        return
    table = Table(title=f"bench {name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def _register_commands() -> None:
    """Add the sub-commands of every module in `agent.commands`."""
    import pkgutil

    import agent.commands

    for info in sorted(pkgutil.iter_modules(agent.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"agent.commands.{info.name}").register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
