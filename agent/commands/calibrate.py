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
        dt: Annotated[float, typer.Option("--dt", help="Frame interval in seconds (> 0).")],
        model: Annotated[
            str, typer.Option("--model", help="harmonic | rotational | double-well | switching.")
        ] = "harmonic",
        method: Annotated[str, typer.Option("--method", help="An estimator name, or all.")] = "all",
        temperature: Annotated[float, typer.Option("--temperature", help="Kelvin (> 0).")] = 300.0,
        radius_nm: Annotated[
            float, typer.Option("--radius-nm", help="Particle radius in nm (> 0).")
        ] = 100.0,
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
            (math.isfinite(dt) and dt > 0, f"--dt must be > 0 seconds, got {dt}"),
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
                math.isfinite(exposure) and 0 <= exposure <= dt,
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
                temperature_k=temperature,
                radius_um=radius_nm / 1000.0,
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
        table = Table(title=f"{traj.name}: {model} (recommended: {result['recommended']})")
        for col in ("method", "parameter", "value", "stderr", "unit"):
            table.add_column(col, justify="right" if col in ("value", "stderr") else "left")
        for name, params in result["estimates"].items():
            for param, e in params.items():
                table.add_row(
                    name,
                    param,
                    "n/a" if e["value"] is None else f"{e['value']:.4g}",
                    "inf" if e["stderr"] is None else f"{e['stderr']:.2g}",
                    e["unit"],
                )
        console.print(table)
