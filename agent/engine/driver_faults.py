"""Driver faults: a driver that dies, falls silent or restarts under a running agent.

The loop asks `DriverFaults` once per iteration what state the driver is in. A driver
is *down* when its process is known to have exited (a probe, e.g. on the child
process) or when nothing came from it for `driver_silence_ms`; it has *restarted*
when its frame numbers start again (a new node numbers its frames from 0). While it
is down the loop actuates nothing and stops heartbeating, so a driver that was only
hung trips its own watchdog instead of being kept alive by a backlog of heartbeats.
When traffic comes back and the driver answers `get_state`, the loop resumes in a new
driver *session*: frame numbers restart, so the tracker and the policy are reset and
every step records its session. A driver that stays down for `driver_reconnect_s`
ends the run with `DriverLost`, whose message the summary keeps as `end_reason`.

A driver that fails to start is reported as soon as its process exits, with the line
of its log that says why (`cause_line`), not after the startup timeout.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from agent.engine.telemetry import RunTelemetry
from agent.records.recorder import EventLog
from drivers.protocol import now_ns
from drivers.transport import CommandClient, CommandError, CommandTimeout

ExitProbe = Callable[[], str | None]

_ERROR_LINE = re.compile(r"\w*(Error|Exception)\b:|^(config )?error\b", re.IGNORECASE)


class DriverSilent(RuntimeError):
    """No frame or heartbeat from the driver for longer than allowed."""


class DriverFailedToStart(DriverSilent):
    """The driver process exited before it ever answered."""


class DriverLost(DriverSilent):
    """The driver went down mid-run and did not come back within driver_reconnect_s."""


def cause_line(log_path: Path, max_bytes: int = 65_536) -> str:
    """The line of a driver log that says why it stopped: the last error or exception
    line (a traceback's last line, a `config error: ...`), else its last line."""
    try:
        with Path(log_path).open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(size - max_bytes, 0))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(driver log {log_path} unreadable: {exc.strerror})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"(driver log {log_path} is empty)"
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    return (errors or lines)[-1]


def process_probe(proc: subprocess.Popen[bytes], log_path: Path) -> ExitProbe:
    """A probe saying whether a child driver process has exited, and why."""

    def probe() -> str | None:
        code = proc.poll()
        if code is None:
            return None
        return f"driver process exited with code {code}: {cause_line(log_path)}"

    return probe


class DriverState(Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Fault:
    """What changed this iteration: the driver went down, or came back (restarted)."""

    kind: str  # "down" | "restarted"
    reason: str


class DriverFaults:
    """Tracks one driver across sessions; the loop reports traffic, this says what to do."""

    def __init__(
        self,
        reconnect_s: float = 30.0,
        silence_ms: int = 3000,
        probe: ExitProbe | None = None,
    ) -> None:
        if not 0.0 <= reconnect_s <= 3600.0:
            raise ValueError(f"driver_reconnect_s = {reconnect_s:g} is outside [0, 3600] s")
        self.reconnect_ns = int(reconnect_s * 1e9)
        self.silence_ns = int(silence_ms * 1e6)
        self.probe = probe
        self.state = DriverState.UP
        self.session = 0
        self.reason = ""
        self.down_since_ns = 0
        self._last_seq: int | None = None
        self._probe_reported: str | None = None
        self._fault_kind = ""

    @property
    def down(self) -> bool:
        return self.state is DriverState.DOWN

    def exited(self) -> str | None:
        """The probe's reason if the driver process has exited (None: alive or unknown)."""
        return self.probe() if self.probe is not None else None

    def check(self, t_ns: int, last_traffic_ns: int, frame_seq: int | None) -> Fault | None:
        """Call once per loop iteration with the newest frame's number (None: no frame)."""
        if self.state is DriverState.UP:
            if frame_seq is not None:
                last, self._last_seq = self._last_seq, frame_seq
                if last is not None and frame_seq <= last:
                    reason = f"driver restarted (frame {frame_seq} after {last})"
                    return self._go_down(t_ns, reason, "restarted")
            exited = self.exited()
            if exited is not None and exited != self._probe_reported:
                return self._go_down(t_ns, exited)
            if t_ns - last_traffic_ns > self.silence_ns:
                return self._go_down(
                    t_ns, f"no frame or heartbeat for {self.silence_ns // 1_000_000} ms"
                )
            return None
        if t_ns - self.down_since_ns > self.reconnect_ns:
            raise DriverLost(
                f"driver lost: {self.reason}; it did not come back within "
                f"{self.reconnect_ns / 1e9:g} s (agent.driver_reconnect_s)"
            )
        return None

    def went_down(
        self,
        client: CommandClient,
        fault: Fault,
        events: EventLog,
        telemetry: RunTelemetry | None,
        timeout_ms: int = 250,
    ) -> None:
        """The driver went down or restarted: try to leave it safe; log it loudly."""
        laser_off = "ok"
        if fault.kind == "down":
            try:  # a hung but living driver may still take it; a dead one will not
                client.call("laser_off", timeout_ms=timeout_ms)
            except (CommandTimeout, CommandError) as exc:
                laser_off = str(exc)
        events.write("driver_down", fault=fault.kind, reason=fault.reason, laser_off=laser_off)
        if telemetry is not None:
            telemetry.event(f"{fault.reason}: actuation stopped, waiting", "warning")

    def try_resume(
        self,
        client: CommandClient,
        last_traffic_ns: int,
        events: EventLog,
        telemetry: RunTelemetry | None,
    ) -> dict[str, Any] | None:
        """The driver's state if it answers again (a new session starts), else None.
        Asks only once something arrived from it since it went down (or it restarted)."""
        if not (self._fault_kind == "restarted" or last_traffic_ns > self.down_since_ns):
            return None
        try:
            state = client.call("get_state", timeout_ms=500).result
        except (CommandTimeout, CommandError):
            return None
        reason = self.reason
        down_ms = self.resumed() / 1e6
        events.write(
            "driver_resumed",
            session=self.session,
            reason=reason,
            down_ms=down_ms,
            driver_state=state,
        )
        if telemetry is not None:
            telemetry.event(f"driver back after {down_ms:.0f} ms: policy in control")
        return state

    def resumed(self) -> int:
        """The driver answers again: a new session starts. Returns how long it was down (ns)
        from when the loop noticed; 0 for a restart noticed only by its frame numbers."""
        down_ns = 0
        if self.state is DriverState.DOWN:
            down_ns = now_ns() - self.down_since_ns
        self._probe_reported = self.exited()  # a probe of the old process stays "exited"
        self.state = DriverState.UP
        self.session += 1
        self._last_seq = None
        return down_ns

    def _go_down(self, t_ns: int, reason: str, kind: str = "down") -> Fault:
        self.state = DriverState.DOWN
        self._fault_kind = kind
        self.down_since_ns = t_ns
        self.reason = reason
        return Fault(kind, reason)
