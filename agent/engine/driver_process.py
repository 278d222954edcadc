"""A driver node the engine starts for a run: `scopeloop driver serve CONFIG` as a
child process with its own log, stopped gracefully (SIGTERM, then SIGKILL) at exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class DriverProcess:
    """`scopeloop driver serve` as a child process, stopped gracefully (SIGTERM) at exit."""

    def __init__(self, config_path: Path, log_path: Path, serve: str = "serve") -> None:
        """`serve`: the `scopeloop driver` sub-command (`serve`, or `serve-spm` for SPM)."""
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "driver", serve, str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
