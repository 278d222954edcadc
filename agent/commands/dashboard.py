"""`scopeloop dashboard`: serve the live web dashboard for a run already going."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err_console = Console(stderr=True, soft_wrap=True)
console = Console()


def register(app: typer.Typer) -> None:
    @app.command()
    def dashboard(
        port: Annotated[int, typer.Option("--port", help="HTTP port (0: any free port).")] = 8050,
        run: Annotated[
            Path | None,
            typer.Option("--run", help="Run directory to attach to (default: newest live run)."),
        ] = None,
        runs_dir: Annotated[
            Path, typer.Option("--runs-dir", help="Where to look for live runs.")
        ] = Path("runs"),
        host: Annotated[
            str, typer.Option("--host", help="Bind address; non-loopback needs --token.")
        ] = "127.0.0.1",
        token: Annotated[
            str | None, typer.Option("--token", help="Required by the page and its buttons.")
        ] = None,
        fps: Annotated[float, typer.Option("--fps", help="Max updates/s per browser.")] = 15.0,
    ) -> None:
        """Serve a live dashboard (frames, plots, events, pause/resume/stop) for a run."""
        from agent.dashboard.attach import fixed_run, newest_live_run
        from agent.dashboard.hub import TelemetryHub
        from agent.dashboard.server import DashboardOptions, DashboardServer, check_bind
        from agent.engine.telemetry import TELEMETRY_FILE, find_live_run

        options = DashboardOptions(port=port, host=host, token=token, fps=fps)
        try:
            check_bind(options)
        except ValueError as exc:
            err_console.print(f"dashboard: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        if run is not None:
            if not (run / TELEMETRY_FILE).is_file():
                err_console.print(
                    f"dashboard: --run {run} has no {TELEMETRY_FILE} (not a run directory, "
                    "or a run from before live telemetry)",
                    markup=False,
                    highlight=False,
                )
                raise typer.Exit(2)
            locate = fixed_run(run)
        else:
            locate = newest_live_run(runs_dir)
            if find_live_run(runs_dir) is None:
                console.print(f"no live run under {runs_dir} yet; waiting for one", markup=False)
        try:
            server = DashboardServer(TelemetryHub(locate), options)
        except OSError as exc:
            err_console.print(f"dashboard: --port {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        console.print(f"dashboard on {server.url} (Ctrl-C to quit)", markup=False)
        server.serve_forever()
