"""Run records: `runs/<time>-<name>/` with config snapshot, JSONL event log and summary.

Events are appended line by line and flushed often, so a crash loses at most the
last fraction of a second of the log, never the run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

FLUSH_EVERY_S = 0.5


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(runs_dir) / f"{stamp}-{name}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


class EventLog:
    """Append-only JSONL log; each record gets a wall-clock time and a kind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._last_flush = time.monotonic()
        self.count = 0

    def write(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "wall_time": time.time(), **fields}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.count += 1
        now = time.monotonic()
        if now - self._last_flush > FLUSH_EVERY_S:
            self._file.flush()
            self._last_flush = now

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL log, skipping a torn last line from an interrupted run."""
    events = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
