"""`scopeloop calibrate TRAJ`: force-field calibration of a recorded trajectory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True, soft_wrap=True)
console = Console()


def _fail(message: str) -> None:
    err_console.print(f"calibrate: {message}", markup=False, highlight=False)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    @app.command()
    def calibrate(
        traj: Annotated[Path, typer.Argument(help="Positions in um: .csv, .npy or .mat.")],
        dt: Annotated[
            float | None,
            typer.Option("--dt", help="Frame interval, s (> 0); default: the file's time column."),
        ] = None,
        model: Annotated[
            str, typer.Option("--model", help="harmonic | rotational | double-well | switching.")
        ] = "harmonic",
        method: Annotated[str, typer.Option("--method", help="An estimator name, or all.")] = "all",
        drag: Annotated[
            str,
            typer.Option(
                "--drag", help="fit: drag from the data (default) | stokes: from radius etc."
            ),
        ] = "fit",
        temperature: Annotated[float, typer.Option("--temperature", help="Kelvin (> 0).")] = 300.0,
        radius_nm: Annotated[
            float, typer.Option("--radius-nm", help="Particle radius in nm (> 0), --drag stokes.")
        ] = 100.0,
        viscosity: Annotated[
            float, typer.Option("--viscosity", help="mPa s (> 0; water 1.0), --drag stokes.")
        ] = 1.0,
        surface_um: Annotated[
            float | None,
            typer.Option(
                "--surface-distance-um",
                help="Bead centre to the cover glass, um (> radius): Faxen correction.",
            ),
        ] = None,
        exposure: Annotated[
            float, typer.Option("--exposure", help="Camera exposure per frame, s (0..dt).")
        ] = 0.0,
        noise_nm: Annotated[
            float | None,
            typer.Option("--noise-nm", help="Localisation noise, nm (default: inferred)."),
        ] = None,
        k_min: Annotated[float, typer.Option("--k-min", help="Prior lower k, fN/um.")] = 0.01,
        k_max: Annotated[float, typer.Option("--k-max", help="Prior upper k, fN/um.")] = 1e6,
        checkpoint: Annotated[
            Path | None, typer.Option("--checkpoint", help="Learned-estimator checkpoint.")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    ) -> None:
        """Estimate force-field parameters with uncertainties (stiffness k in fN/um)."""
        from policies.calibration.cli_core import MODELS, load_trajectory
        from policies.calibration.cli_core import calibrate as run_calibration

        checks = [
            (dt is None or (math.isfinite(dt) and dt > 0), f"--dt must be > 0 seconds, got {dt}"),
            (drag in ("fit", "stokes"), f"--drag must be fit or stokes, got {drag!r}"),
            (
                math.isfinite(viscosity) and viscosity > 0,
                f"--viscosity must be > 0 mPa s, got {viscosity}",
            ),
            (
                surface_um is None or (math.isfinite(surface_um) and surface_um > radius_nm / 1e3),
                f"--surface-distance-um must exceed the radius ({radius_nm / 1e3:g} um), "
                f"got {surface_um}",
            ),
            (model in MODELS, f"--model must be one of {', '.join(MODELS)}, got {model!r}"),
            (
                math.isfinite(temperature) and temperature > 0,
                f"--temperature must be > 0 K, got {temperature}",
            ),
            (
                math.isfinite(radius_nm) and radius_nm > 0,
                f"--radius-nm must be > 0, got {radius_nm}",
            ),
            (
                math.isfinite(exposure) and 0 <= exposure <= (dt or math.inf),
                f"--exposure must be in [0, dt={dt}] s, got {exposure}",
            ),
            (
                noise_nm is None or (math.isfinite(noise_nm) and noise_nm >= 0),
                f"--noise-nm must be >= 0, got {noise_nm}",
            ),
            (
                0 < k_min < k_max,
                f"--k-min/--k-max must satisfy 0 < k-min < k-max, got {k_min}, {k_max}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                _fail(message)
        try:
            cols = load_trajectory(traj)
            result = run_calibration(
                cols,
                model,
                method,
                dt=dt,
                drag=drag,
                temperature_k=temperature,
                radius_um=radius_nm / 1000.0,
                viscosity_pa_s=viscosity * 1e-3,
                surface_distance_um=surface_um,
                exposure_s=exposure,
                noise_um=None if noise_nm is None else noise_nm / 1000.0,
                k_min=k_min,
                k_max=k_max,
                checkpoint=str(checkpoint) if checkpoint else None,
            )
        except ValueError as exc:
            _fail(str(exc))
            return
        if as_json:
            print(json.dumps(result))
            return
        table = Table(
            title=f"{traj.name}: {model}, drag {result['drag']} "
            f"(recommended: {result['recommended']})"
        )
        for col in ("method", "parameter", "value", "stderr", "95 % interval", "unit"):
            table.add_column(col, justify="left" if col in ("method", "parameter") else "right")
        for name, params in result["estimates"].items():
            for param, e in params.items():
                table.add_row(
                    name,
                    param,
                    _num(e["value"], ".4g"),
                    _num(e["stderr"], ".2g"),
                    _interval(e["interval_95"]),
                    e["unit"],
                )
        console.print(table)
        console.print(f"why: {result['reason']}", markup=False, highlight=False)
        for warning in result["warnings"]:
            err_console.print(f"warning: {warning}", markup=False, highlight=False)


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _interval(iv: list[float | None] | None) -> str:
    if iv is None:
        return "n/a"
    lo, hi = iv
    return f"[{_num(lo, '.3g')}, {'inf' if hi is None else format(hi, '.3g')}]"
