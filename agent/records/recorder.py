"""Run records: `runs/<time>-<name>/` with config snapshot, JSONL event log and summary.

Each event goes to the operating system in one `write()` as it is made (no buffer in
this process), so a SIGKILL at any moment keeps every record written before it; only
a record being serialised at that instant can be lost, and a torn last line is
skipped on reading. A clean close appends a `log_closed` record: a log without it was
cut short. (This survives the process dying, not a power cut: that needs fsync.)
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLOSED_KIND = "log_closed"


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
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()  # one whole line per write, whichever thread writes
        self.count = 0

    def write(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "wall_time": time.time(), **fields}
        append_line(self._fd, record, self._lock)
        self.count += 1

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            append_line(fd, {"kind": CLOSED_KIND, "wall_time": time.time()})
            os.close(fd)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def append_line(fd: int | None, record: dict[str, Any], lock: threading.Lock | None = None) -> None:
    """One JSON line to an O_APPEND descriptor in as few write() calls as the OS allows."""
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    if fd is None:
        raise ValueError("event log: write after close")
    if lock is None:
        _write_all(fd, data)
        return
    with lock:
        _write_all(fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True)
class LogContents:
    """A JSONL log read back: its records, and whether it was closed (else cut short)."""

    events: list[dict[str, Any]]
    closed: bool


def read_log(path: Path) -> LogContents:
    """Read a JSONL log, skipping a torn last line from an interrupted run."""
    events = []
    closed = False
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("kind") == CLOSED_KIND:
                closed = True
                continue
            events.append(record)
            closed = False  # a log reopened after a close is open again
    return LogContents(events, closed)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log (without its close marker)."""
    return read_log(path).events


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
