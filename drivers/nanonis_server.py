"""Nanonis-TCP-compatible server in front of an SPM backend (real twin or in-memory fake).

Speaks the wire format of ``drivers.nanonis_wire`` so software written for a Nanonis
controller (the vendor's ``nanonis_spm`` client, or anything on its protocol) drives a
digital twin unchanged. Each connection is served by its own thread and carries any
number of sequential commands; backend calls are serialised by one lock, so a backend
need not be thread-safe. As on a Nanonis controller, several clients are served at
once: a bias sweep that takes wall-clock time (``sweep_time_s``) runs with the lock
released, so a second connection (the driver's watchdog link) is answered meanwhile,
and a ``BiasSpectr.Stop``, ``ZCtrl.Withdraw``, ``ZCtrl.OnOffSet 0`` or ``Bias.Set``
from it interrupts the sweep at once: the sweep's reply is an error that says so.
Commands that would fight the running sweep (another sweep, a scan start, a move, new
sweep settings) are refused.

Requests that fail (unknown command, malformed body, value outside the
construction-time limits, backend exception) get the protocol's error response and
the connection keeps going; only a header whose body size cannot be
trusted ends a connection, since the byte stream can no longer be framed.

Bounded resources (``NanonisLimits``): at most ``max_connections`` clients at once (one
more is answered by a close), a connection idle for ``idle_timeout_s`` is dropped, every
numeric setting has a range, and a request whose estimated run time exceeds
``max_request_s`` is refused (2**31 sweeps would run for years).

The backend is any object implementing ``SpmBackend``; all quantities are SI (m, V, s)
like Nanonis itself, angles in degrees.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Protocol, runtime_checkable

import numpy as np

from drivers import nanonis_wire as wire

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ backend protocol


class ScanAction(IntEnum):
    """Scan.Action codes as Nanonis numbers them."""

    START = 0
    STOP = 1
    PAUSE = 2
    RESUME = 3
    FREEZE = 4
    UNFREEZE = 5
    GO_TO_CENTER = 6


@dataclass(frozen=True)
class ScanFrame:
    """Scan frame in the sample plane; angle positive = clockwise, as in Nanonis."""

    center_x_m: float
    center_y_m: float
    width_m: float
    height_m: float
    angle_deg: float = 0.0


@dataclass(frozen=True)
class ScanBuffer:
    """Recorded channels (signal indexes), pixels per line and number of lines."""

    channel_indexes: tuple[int, ...]
    pixels: int
    lines: int


@dataclass(frozen=True)
class ScanImage:
    """One channel of the last frame: data is (lines, pixels), row 0 first acquired."""

    channel_name: str
    data: np.ndarray
    direction_up: bool


@dataclass(frozen=True)
class SpectroscopyProps:
    """Bias-spectroscopy settings; name tuples describe what Start returns."""

    num_sweeps: int = 1
    num_points: int = 256
    backward_sweep: bool = False
    z_offset_m: float = 0.0
    save_all: bool = False
    autosave: bool = False
    show_save_dialog: bool = False
    channels: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()
    fixed_parameters: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpectroscopyResult:
    """Sweep data: one row per channel (row 0 the swept bias), one column per point.

    ``parameters`` are the fixed parameters then the parameters, as BiasSpectr.Start
    returns them.
    """

    channel_names: tuple[str, ...]
    data: np.ndarray
    parameters: tuple[float, ...] = ()


@runtime_checkable
class SpmBackend(Protocol):
    """Instrument operations behind the Nanonis commands. SI units; raise to report errors.

    An exception's message becomes the error description the client sees. Calls come
    one at a time (the server holds a lock), from server threads.
    """

    # Bias.Get / Bias.Set
    def get_bias(self) -> float: ...
    def set_bias(self, bias_v: float) -> None: ...

    # FolMe.XYPosGet / FolMe.XYPosSet; wait: return only when the move has ended.
    def get_tip_xy(self) -> tuple[float, float]: ...
    def move_tip_xy(self, x_m: float, y_m: float, wait: bool) -> None: ...

    # Scan.FrameGet/FrameSet, BufferGet/BufferSet, Action, StatusGet, FrameDataGrab
    def get_scan_frame(self) -> ScanFrame: ...
    def set_scan_frame(self, frame: ScanFrame) -> None: ...
    def get_scan_buffer(self) -> ScanBuffer: ...
    def set_scan_buffer(self, buffer: ScanBuffer) -> None: ...
    def scan_action(self, action: ScanAction, direction_up: bool) -> None: ...
    def scan_running(self) -> bool: ...
    def grab_scan_frame(self, channel_index: int, forward: bool) -> ScanImage: ...

    # BiasSpectr.Open/PropsGet/PropsSet/LimitsGet/LimitsSet/Start
    def open_bias_spectroscopy(self) -> None: ...
    def get_spectroscopy_props(self) -> SpectroscopyProps: ...
    def set_spectroscopy_props(self, props: SpectroscopyProps) -> None: ...
    def get_spectroscopy_limits(self) -> tuple[float, float]: ...
    def set_spectroscopy_limits(self, start_v: float, end_v: float) -> None: ...
    def run_bias_spectroscopy(self, save_base_name: str) -> SpectroscopyResult: ...
    # Wall-clock seconds the next BiasSpectr.Start takes (0: it returns at once); the
    # server waits them out unlocked, then calls end_sweep (also when interrupted).
    def sweep_time_s(self) -> float: ...
    def end_sweep(self) -> None: ...

    # Signals.NamesGet / Signals.ValGet (index into signal_names())
    def signal_names(self) -> Sequence[str]: ...
    def signal_value(self, index: int) -> float: ...

    # ZCtrl.Withdraw (Z controller off, tip fully retracted), ZCtrl.OnOffGet, ZCtrl.ZPosGet
    def withdraw(self, wait: bool, timeout_s: float | None) -> None: ...
    def z_controller_on(self) -> bool: ...
    def set_z_controller(self, on: bool) -> None: ...
    def get_z(self) -> float: ...


# ------------------------------------------------------------------ limits


@dataclass(frozen=True)
class NanonisLimits:
    """Hard limits enforced before the backend sees a value (the twin stays in range)."""

    bias_v: tuple[float, float] = (-10.0, 10.0)
    xy_m: tuple[float, float] = (-5e-6, 5e-6)
    max_pixels: int = 4096
    max_spectrum_points: int = 100_000
    max_spectrum_sweeps: int = 10_000
    z_offset_m: tuple[float, float] = (-1e-6, 1e-6)
    max_withdraw_timeout_ms: int = 600_000
    # Longest a single request may keep the backend busy, and the time the estimates
    # assume per sweep point (settling + integration) and per scan pixel.
    max_request_s: float = 600.0
    spectrum_point_s: float = 1e-3
    scan_pixel_s: float = 1e-5
    max_connections: int = 8
    idle_timeout_s: float = 300.0

    def sweep_s(self, points: int, sweeps: int, backward: bool) -> float:
        """Estimated run time of one BiasSpectr.Start with these settings."""
        return max(points, 1) * max(sweeps, 1) * (2 if backward else 1) * self.spectrum_point_s

    def check_duration(self, command: str, what: str, seconds: float) -> None:
        if seconds > self.max_request_s:
            raise CommandError(
                f"{command}: {what} would run about {_fmt(seconds)} s, the allowed range is "
                f"[0, {_fmt(self.max_request_s)}] s (max_request_s)"
            )


class CommandError(Exception):
    """A request refused by the server; str() is the one-line error description."""


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _check_range(command: str, name: str, value: float, lo: float, hi: float, unit: str) -> None:
    # float32 on the wire: allow a rounding's worth of slack at the bounds.
    slack = 1e-6 * max(abs(lo), abs(hi), 1e-30)
    if not math.isfinite(value) or value < lo - slack or value > hi + slack:
        raise CommandError(
            f"{command}: {name}={_fmt(value)} {unit} is outside the allowed range "
            f"[{_fmt(lo)}, {_fmt(hi)}] {unit}"
        )


def _tri_state(command: str, name: str, code: int) -> bool | None:
    """Nanonis 0 = no change, 1 = on, 2 = off."""
    if code not in (0, 1, 2):
        raise CommandError(f"{command}: {name}={code} must be 0 (no change), 1 (on) or 2 (off)")
    return None if code == 0 else code == 1


# ------------------------------------------------------------------ server


Handler = Callable[..., tuple[Any, ...]]


SIGNAL_SLOTS = 24  # Signals Manager slots on a Nanonis controller
# Commands whose reply must not wait for the next request to be answered too.
SLOW_COMMANDS = frozenset(
    {b"BiasSpectr.Start", b"Scan.Action", b"Scan.FrameDataGrab", b"ZCtrl.Withdraw"}
)
# Refused while a sweep runs: each would change what the sweep is doing.
REFUSED_DURING_SWEEP = frozenset(
    {
        "BiasSpectr.Start",
        "BiasSpectr.PropsSet",
        "BiasSpectr.LimitsSet",
        "FolMe.XYPosSet",
        "Scan.FrameSet",
        "Scan.BufferSet",
    }
)


@dataclass(frozen=True)
class _Running:
    """A sweep computed under the lock whose wall-clock time is still to run (unlocked)."""

    values: tuple[Any, ...]
    duration_s: float


class NanonisServer:
    """Threaded TCP server answering the commands in ``nanonis_wire.COMMANDS``.

    ``start()`` serves in a background thread; ``address`` is the bound (host, port)
    (port 0 picks a free one). Use as a context manager to stop it reliably.
    """

    def __init__(
        self,
        backend: SpmBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: NanonisLimits | None = None,
        max_request_bytes: int = 1 << 20,
        slots: Sequence[int] | None = None,
    ) -> None:
        """``slots``: the signal index (into ``signal_names()``) assigned to each Signals
        Manager slot; scan buffers and frame grabs name channels by slot, as Nanonis
        does. Default: the first 24 signals in order."""
        self.backend = backend
        n_signals = len(backend.signal_names())
        self.slots = tuple(int(i) for i in (slots if slots is not None else range(n_signals)))[
            :SIGNAL_SLOTS
        ]
        if not self.slots or any(not 0 <= i < n_signals for i in self.slots):
            raise ValueError(f"slots must be 1 to {SIGNAL_SLOTS} indexes in [0, {n_signals - 1}]")
        self.limits = limits or NanonisLimits()
        self.max_request_bytes = max_request_bytes
        self._lock = threading.Lock()
        self._sweep_done = threading.Condition(self._lock)  # woken by an interrupt
        self._sweeping = False
        self._interrupted_by = ""  # the command that ended the running sweep early
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._handlers: dict[str, Handler] = {
            "Bias.Set": self._bias_set,
            "Bias.Get": lambda: (backend.get_bias(),),
            "FolMe.XYPosSet": self._xy_set,
            "FolMe.XYPosGet": lambda _wait: backend.get_tip_xy(),
            "Scan.Action": self._scan_action,
            "Scan.StatusGet": lambda: (int(backend.scan_running()),),
            "Scan.FrameSet": self._frame_set,
            "Scan.FrameGet": self._frame_get,
            "Scan.BufferSet": self._buffer_set,
            "Scan.BufferGet": self._buffer_get,
            "Scan.FrameDataGrab": self._frame_grab,
            "BiasSpectr.Open": self._spectr_open,
            "BiasSpectr.Start": self._spectr_start,
            "BiasSpectr.Stop": self._spectr_stop,
            "BiasSpectr.PropsSet": self._props_set,
            "BiasSpectr.PropsGet": self._props_get,
            "BiasSpectr.LimitsSet": self._limits_set,
            "BiasSpectr.LimitsGet": lambda: tuple(backend.get_spectroscopy_limits()),
            "Signals.NamesGet": lambda: (list(backend.signal_names()),),
            "Signals.InSlotsGet": self._in_slots,
            "Signals.ValGet": self._signal_val,
            "ZCtrl.Withdraw": self._withdraw,
            "ZCtrl.OnOffSet": self._z_on_off,
            "ZCtrl.OnOffGet": lambda: (int(backend.z_controller_on()),),
            "ZCtrl.ZPosGet": lambda: (backend.get_z(),),
        }
        missing = set(self._handlers) ^ set(wire.COMMANDS)
        assert not missing, f"handlers and wire specs disagree: {sorted(missing)}"
        self._routes = {
            name.encode("ascii"): (name, spec, self._handlers[name])
            for name, spec in wire.COMMANDS.items()
        }

        owner = self

        class _Conn(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner._serve_connection(self.request)

        class _Tcp(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._tcp = _Tcp((host, port), _Conn)

    # ---------------------------------------------------------------- lifecycle

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._tcp.server_address[:2]
        return str(host), int(port)

    def start(self) -> NanonisServer:
        self._thread = threading.Thread(
            target=self._tcp.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="nanonis-server",
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._tcp.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop accepting, drop open connections (their threads then exit), release the port."""
        with self._lock:
            self._interrupt("server stop")
        if self._thread is not None:
            self._tcp.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._tcp.server_close()

    def __enter__(self) -> NanonisServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- connection

    def _serve_connection(self, conn: socket.socket) -> None:
        """Serve one client until it hangs up.

        Requests are framed out of one receive buffer, so requests that arrive together
        (a move and the sweep queued behind it) cost one receive call. A quick command's
        reply rides along with the next quick reply when the next request is already
        here; replies held leave before a sweep that takes wall-clock time, and a slow
        command's reply (a sweep, a scan) leaves at once.
        """
        with self._conns_lock:
            full = len(self._conns) >= self.limits.max_connections
            if not full:
                self._conns.add(conn)
        peer = conn.getpeername()
        if full:
            log.warning(
                "nanonis: refused %s: %d connections open (max_connections)",
                peer,
                self.limits.max_connections,
            )
            return  # socketserver closes the socket
        conn.settimeout(self.limits.idle_timeout_s)  # a stalled client is dropped
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies leave at once
        log.debug("nanonis: client %s connected", peer)
        buffer = bytearray()
        replies: list[bytes] = []
        try:
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    if buffer:
                        log.debug("nanonis: %s closed mid-request", peer)
                    break
                buffer += chunk
                pos = self._serve_buffered(conn, buffer, replies)
                if pos < 0:
                    break
                del buffer[:pos]
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.debug("nanonis: client %s dropped: %s", peer, exc)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            log.debug("nanonis: client %s disconnected", peer)

    def _serve_buffered(self, conn: socket.socket, buffer: bytearray, replies: list[bytes]) -> int:
        """Answer every complete request in ``buffer``; bytes consumed, or -1 to hang up."""
        pos, end = 0, len(buffer)
        header_size = wire.HEADER_SIZE
        while end - pos >= header_size:
            raw_name, size, flag = wire.unpack_header(bytes(buffer[pos : pos + header_size]))
            if size < 0 or size > self.max_request_bytes:
                # Cannot skip a body of unknown length: answer, then hang up.
                name = wire.decode_name(raw_name)
                log.warning("nanonis: sent body size %d for %r; closing", size, name)
                if flag:
                    msg = (
                        f"{name or '<empty>'}: malformed header: body size {size} not in "
                        f"[0, {self.max_request_bytes}]"
                    )
                    replies.append(wire.encode_response(raw_name, None, (), msg))
                    conn.sendall(b"".join(replies))
                return -1
            stop = pos + header_size + size
            if stop > end:
                break  # the rest of this request is still on its way
            if replies and raw_name == b"BiasSpectr.Start" and self.backend.sweep_time_s() > 0:
                conn.sendall(b"".join(replies))  # held replies leave before a real-time sweep
                replies.clear()
            reply = self.handle_message(raw_name, bytes(buffer[pos + header_size : stop]))
            pos = stop
            if flag:
                replies.append(reply)
            if replies and (raw_name in SLOW_COMMANDS or not _complete(buffer, pos)):
                conn.sendall(b"".join(replies) if len(replies) > 1 else replies[0])
                replies.clear()
        return pos

    def handle_message(self, raw_name: bytes, body: bytes) -> bytes:
        """Full response for one request; never raises (errors become error responses)."""
        route = self._routes.get(raw_name)
        if route is None:
            name = wire.decode_name(raw_name)
            return wire.encode_response(
                raw_name, None, (), f"{name or '<empty>'}: unknown or unsupported command"
            )
        name, spec, handler = route
        try:
            args = wire.decode_args(spec, body)
        except wire.WireError as exc:
            return wire.encode_response(
                raw_name, None, spec.returns, f"{name}: malformed body: {exc}"
            )
        try:
            with self._lock:
                self._check_not_fighting_a_sweep(name, args)
                values = handler(*args)
            if isinstance(values, _Running):
                values = self._run_out(name, values)
            return wire.encode_response(raw_name, values, spec.returns)
        except CommandError as exc:
            message = str(exc)
        except Exception as exc:  # backend failures must not kill the connection
            log.exception("nanonis: %s failed", name)
            message = f"{name}: {type(exc).__name__}: {exc}"
        return wire.encode_response(raw_name, None, spec.returns, message)

    # ---------------------------------------------------------------- long sweeps

    def _check_not_fighting_a_sweep(self, name: str, args: Sequence[Any]) -> None:
        """Under the lock: refuse what would change a running sweep (scan starts too)."""
        if not self._sweeping:
            return
        starts_scan = name == "Scan.Action" and args and args[0] == ScanAction.START
        engages = name == "ZCtrl.OnOffSet" and args and args[0]
        if name in REFUSED_DURING_SWEEP or starts_scan or engages:
            raise CommandError(
                f"{name}: refused while a bias sweep is running (BiasSpectr.Stop, "
                f"ZCtrl.Withdraw or Bias.Set interrupts it)"
            )

    def _interrupt(self, by: str) -> None:
        """Under the lock: end the running sweep now (the safe state wins over a sweep)."""
        if self._sweeping and not self._interrupted_by:
            self._interrupted_by = by
            self._sweep_done.notify_all()

    def _run_out(self, name: str, running: _Running) -> tuple[Any, ...]:
        """Wait out a sweep's wall-clock time with the lock released; an interrupt from
        another connection ends it at once, and its reply says so (no data)."""
        t0 = time.monotonic()
        deadline = t0 + running.duration_s
        with self._sweep_done:
            while not self._interrupted_by and (left := deadline - time.monotonic()) > 0:
                self._sweep_done.wait(left)
            by, self._interrupted_by, self._sweeping = self._interrupted_by, "", False
            self.backend.end_sweep()
        if by:
            raise CommandError(
                f"{name}: interrupted by {by} after {_fmt(time.monotonic() - t0)} of "
                f"{_fmt(running.duration_s)} s; sweep stopped, no data returned"
            )
        return running.values

    # ---------------------------------------------------------------- handlers

    def _bias_set(self, bias_v: float) -> tuple[()]:
        _check_range("Bias.Set", "bias_v", bias_v, *self.limits.bias_v, "V")
        self._interrupt("Bias.Set")
        self.backend.set_bias(bias_v)
        return ()

    def _xy_set(self, x_m: float, y_m: float, wait: int) -> tuple[()]:
        lo, hi = self.limits.xy_m
        _check_range("FolMe.XYPosSet", "x_m", x_m, lo, hi, "m")
        _check_range("FolMe.XYPosSet", "y_m", y_m, lo, hi, "m")
        self.backend.move_tip_xy(x_m, y_m, bool(wait))
        return ()

    def _scan_action(self, action: int, direction_up: int) -> tuple[()]:
        try:
            act = ScanAction(action)
        except ValueError:
            raise CommandError(f"Scan.Action: action={action} is not one of 0..6") from None
        self.backend.scan_action(act, bool(direction_up))
        return ()

    def _frame_set(self, cx: float, cy: float, w: float, h: float, angle: float) -> tuple[()]:
        cmd = "Scan.FrameSet"
        lo, hi = self.limits.xy_m
        for name, v in (("width_m", w), ("height_m", h)):
            if not (math.isfinite(v) and v > 0):
                raise CommandError(f"{cmd}: {name}={_fmt(v)} m must be > 0")
        if not math.isfinite(angle):
            raise CommandError(f"{cmd}: angle_deg={angle} must be finite")
        a = math.radians(angle)
        ext_x = 0.5 * (w * abs(math.cos(a)) + h * abs(math.sin(a)))
        ext_y = 0.5 * (w * abs(math.sin(a)) + h * abs(math.cos(a)))
        for axis, c, e in (("x", cx, ext_x), ("y", cy, ext_y)):
            for edge in (c - e, c + e):
                try:
                    _check_range(cmd, f"frame {axis} edge", edge, lo, hi, "m")
                except CommandError:
                    raise CommandError(
                        f"{cmd}: frame {axis} span [{_fmt(c - e)}, {_fmt(c + e)}] m "
                        f"(center_{axis}_m={_fmt(c)}, width/height/angle) is outside the "
                        f"allowed range [{_fmt(lo)}, {_fmt(hi)}] m"
                    ) from None
        self.backend.set_scan_frame(ScanFrame(cx, cy, w, h, angle))
        return ()

    def _frame_get(self) -> tuple[float, ...]:
        f = self.backend.get_scan_frame()
        return (f.center_x_m, f.center_y_m, f.width_m, f.height_m, f.angle_deg)

    def _in_slots(self) -> tuple[list[str], np.ndarray]:
        names = self.backend.signal_names()
        return [names[i] for i in self.slots], np.asarray(self.slots, np.int32)

    def _buffer_set(self, indexes: np.ndarray, pixels: int, lines: int) -> tuple[()]:
        cmd = "Scan.BufferSet"
        n_slots = len(self.slots)
        bad = [int(i) for i in indexes if not 0 <= i < n_slots]
        if bad or len(indexes) == 0:
            raise CommandError(
                f"{cmd}: channel_indexes {bad or '[]'} invalid: need 1+ Signals Manager "
                f"slot indexes in [0, {n_slots - 1}]"
            )
        top = self.limits.max_pixels
        if not 1 <= pixels <= top:
            raise CommandError(f"{cmd}: pixels={pixels} is outside the allowed range [1, {top}]")
        if lines == 0:  # Nanonis: 0 keeps the current pixels/lines ratio
            cur = self.backend.get_scan_buffer()
            lines = max(1, round(pixels * cur.lines / cur.pixels))
        if not 1 <= lines <= top:
            raise CommandError(f"{cmd}: lines={lines} is outside the allowed range [1, {top}]")
        self.limits.check_duration(
            cmd, f"a {pixels}x{lines} scan", 2 * pixels * lines * self.limits.scan_pixel_s
        )
        signals = tuple(self.slots[int(i)] for i in indexes)
        self.backend.set_scan_buffer(ScanBuffer(signals, pixels, lines))
        return ()

    def _slot_of(self, signal_index: int) -> int:
        return self.slots.index(signal_index) if signal_index in self.slots else -1

    def _buffer_get(self) -> tuple[Any, ...]:
        b = self.backend.get_scan_buffer()
        slots = [self._slot_of(i) for i in b.channel_indexes]
        return (np.asarray(slots, np.int32), b.pixels, b.lines)

    def _frame_grab(self, channel_index: int, forward: int) -> tuple[Any, ...]:
        recorded = self.backend.get_scan_buffer().channel_indexes
        slots = [self._slot_of(i) for i in recorded]
        if channel_index not in slots:
            raise CommandError(
                f"Scan.FrameDataGrab: channel_index={channel_index} is not a recorded "
                f"channel slot {slots} (see Scan.BufferSet)"
            )
        img = self.backend.grab_scan_frame(self.slots[channel_index], bool(forward))
        return (img.channel_name, np.asarray(img.data, ">f4"), int(img.direction_up))

    def _spectr_open(self) -> tuple[()]:
        self.backend.open_bias_spectroscopy()
        return ()

    def _spectr_start(self, get_data: int, save_base_name: str) -> tuple[Any, ...] | _Running:
        p = self.backend.get_spectroscopy_props()
        duration_s = self.backend.sweep_time_s()
        self.limits.check_duration(
            "BiasSpectr.Start",
            f"{p.num_sweeps} sweep(s) of {p.num_points} points",
            max(duration_s, self.limits.sweep_s(p.num_points, p.num_sweeps, p.backward_sweep)),
        )
        res = self.backend.run_bias_spectroscopy(save_base_name)
        try:
            values = self._spectrum_values(res) if get_data else self._no_spectrum()
        except CommandError:
            self.backend.end_sweep()
            raise
        if duration_s > 0:
            self._sweeping, self._interrupted_by = True, ""
            return _Running(values, duration_s)
        return values

    def _spectr_stop(self) -> tuple[()]:
        self._interrupt("BiasSpectr.Stop")  # nothing to stop: a no-op, as on the controller
        return ()

    @staticmethod
    def _no_spectrum() -> tuple[Any, ...]:
        return ([], np.zeros((0, 0), np.float32), np.zeros(0, np.float32))

    def _spectrum_values(self, res: SpectroscopyResult) -> tuple[Any, ...]:
        data = np.asarray(res.data, ">f4")  # the wire's own dtype: encoded without a copy
        if data.ndim != 2 or data.shape[0] != len(res.channel_names):
            raise CommandError(
                f"BiasSpectr.Start: backend returned data {data.shape} for "
                f"{len(res.channel_names)} channels"
            )
        return (list(res.channel_names), data, np.asarray(res.parameters, np.float32))

    def _props_set(
        self,
        save_all: int,
        num_sweeps: int,
        backward: int,
        num_points: int,
        z_offset_m: float,
        autosave: int,
        show_dialog: int,
    ) -> tuple[()]:
        cmd = "BiasSpectr.PropsSet"
        top = self.limits.max_spectrum_points
        sweeps_top = self.limits.max_spectrum_sweeps
        if not 0 <= num_sweeps <= sweeps_top:
            raise CommandError(
                f"{cmd}: num_sweeps={num_sweeps} is outside the allowed range [0, {sweeps_top}] "
                f"(0 = no change)"
            )
        if not 0 <= num_points <= top:
            raise CommandError(
                f"{cmd}: num_points={num_points} is outside the allowed range [0, {top}]"
            )
        _check_range(cmd, "z_offset_m", z_offset_m, *self.limits.z_offset_m, "m")
        flags = {
            name: _tri_state(cmd, name, code)
            for name, code in (
                ("save_all", save_all),
                ("backward_sweep", backward),
                ("autosave", autosave),
                ("show_save_dialog", show_dialog),
            )
        }
        changes: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
        if num_sweeps:
            changes["num_sweeps"] = num_sweeps
        if num_points:
            changes["num_points"] = num_points
        changes["z_offset_m"] = z_offset_m
        current = self.backend.get_spectroscopy_props()
        wanted = replace(current, **changes)
        self.limits.check_duration(
            cmd,
            f"num_sweeps={wanted.num_sweeps} x num_points={wanted.num_points}",
            self.limits.sweep_s(wanted.num_points, wanted.num_sweeps, wanted.backward_sweep),
        )
        self.backend.set_spectroscopy_props(wanted)
        return ()

    def _props_get(self) -> tuple[Any, ...]:
        p = self.backend.get_spectroscopy_props()
        return (
            int(p.save_all),
            p.num_sweeps,
            int(p.backward_sweep),
            p.num_points,
            list(p.channels),
            list(p.parameters),
            list(p.fixed_parameters),
        )

    def _limits_set(self, start_v: float, end_v: float) -> tuple[()]:
        lo, hi = self.limits.bias_v
        _check_range("BiasSpectr.LimitsSet", "start_v", start_v, lo, hi, "V")
        _check_range("BiasSpectr.LimitsSet", "end_v", end_v, lo, hi, "V")
        self.backend.set_spectroscopy_limits(start_v, end_v)
        return ()

    def _signal_val(self, index: int, _wait: int) -> tuple[float]:
        n = len(self.backend.signal_names())
        if not 0 <= index < n:
            raise CommandError(
                f"Signals.ValGet: signal_index={index} is outside the allowed range [0, {n - 1}]"
            )
        return (self.backend.signal_value(index),)

    def _z_on_off(self, on: int) -> tuple[()]:
        if not on:
            self._interrupt("ZCtrl.OnOffSet")
        self.backend.set_z_controller(bool(on))
        return ()

    def _withdraw(self, wait: int, timeout_ms: int) -> tuple[()]:
        # Clamped, not refused: a withdraw is the safe state and must always run.
        top = self.limits.max_withdraw_timeout_ms
        timeout_ms = top if timeout_ms < 0 or timeout_ms > top else timeout_ms
        self._interrupt("ZCtrl.Withdraw")
        self.backend.withdraw(bool(wait), timeout_ms / 1000.0)
        return ()


def _complete(buffer: bytearray, pos: int) -> bool:
    """Whether a whole request (header and body) starts at ``pos`` of ``buffer``."""
    if len(buffer) - pos < wire.HEADER_SIZE:
        return False
    size = int.from_bytes(
        buffer[pos + wire.NAME_SIZE : pos + wire.NAME_SIZE + 4], "big", signed=True
    )
    return size < 0 or len(buffer) - pos - wire.HEADER_SIZE >= size


# ------------------------------------------------------------------ fake backend


FAKE_SIGNALS: tuple[str, ...] = (
    "Current (A)",
    "Z (m)",
    "Bias (V)",
    "X (m)",
    "Y (m)",
    "Amplitude (m)",
    "Phase (deg)",
)


@dataclass
class FakeSpmBackend:
    """In-memory SPM for tests and demos: PFM-like images and a hysteresis spectrum.

    Images are computed from the pixels' sample coordinates (so moving the frame moves
    the features): a tilted plane plus noise for Z, stripe domains for phase, their
    amplitude. A scan "runs" for ``scan_time_s`` after Start. Withdraw turns the Z
    controller off, retracts Z and stops the scan.
    """

    bias_v: float = 0.1
    tip_xy_m: tuple[float, float] = (0.0, 0.0)
    frame: ScanFrame = field(default_factory=lambda: ScanFrame(0.0, 0.0, 1e-6, 1e-6, 0.0))
    buffer: ScanBuffer = field(default_factory=lambda: ScanBuffer((1, 5, 6), 64, 64))
    spectr_props: SpectroscopyProps = field(
        default_factory=lambda: SpectroscopyProps(
            num_points=128,
            parameters=("X (m)", "Y (m)", "Z offset (m)"),
            fixed_parameters=("Sweep Start (V)", "Sweep End (V)"),
        )
    )
    spectr_limits_v: tuple[float, float] = (-5.0, 5.0)
    coercive_v: float = 2.0
    scan_time_s: float = 1.0
    sweep_duration_s: float = 0.0  # wall-clock time of a BiasSpectr.Start (0: at once)
    z_m: float = 5e-9
    z_withdrawn_m: float = 2e-7
    z_on: bool = True
    spectroscopy_open: bool = False
    noise: float = 0.02
    seed: int = 0
    _scan_elapsed_s: float = 0.0
    _scan_since: float | None = None
    _direction_up: bool = True
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    # bias / tip
    def get_bias(self) -> float:
        return self.bias_v

    def set_bias(self, bias_v: float) -> None:
        self.bias_v = bias_v

    def get_tip_xy(self) -> tuple[float, float]:
        return self.tip_xy_m

    def move_tip_xy(self, x_m: float, y_m: float, wait: bool) -> None:
        self.tip_xy_m = (x_m, y_m)

    # scan
    def get_scan_frame(self) -> ScanFrame:
        return self.frame

    def set_scan_frame(self, frame: ScanFrame) -> None:
        self.frame = frame

    def get_scan_buffer(self) -> ScanBuffer:
        return self.buffer

    def set_scan_buffer(self, buffer: ScanBuffer) -> None:
        self.buffer = buffer

    def _pause(self) -> None:
        if self._scan_since is not None:
            self._scan_elapsed_s += time.monotonic() - self._scan_since
            self._scan_since = None

    def scan_action(self, action: ScanAction, direction_up: bool) -> None:
        if action == ScanAction.START:
            self._scan_elapsed_s, self._scan_since = 0.0, time.monotonic()
            self._direction_up = direction_up
        elif action in (ScanAction.STOP, ScanAction.GO_TO_CENTER):
            self._scan_since, self._scan_elapsed_s = None, self.scan_time_s
            if action == ScanAction.GO_TO_CENTER:
                self.tip_xy_m = (self.frame.center_x_m, self.frame.center_y_m)
        elif action in (ScanAction.PAUSE, ScanAction.FREEZE):
            self._pause()
        elif self._scan_since is None and self._scan_elapsed_s < self.scan_time_s:
            self._scan_since = time.monotonic()  # RESUME / UNFREEZE

    def scan_running(self) -> bool:
        if self._scan_since is None:
            return False
        return self._scan_elapsed_s + time.monotonic() - self._scan_since < self.scan_time_s

    def _sample(self, index: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Noise-free signal `index` at sample coordinates (m)."""
        period = 400e-9
        domain = np.sign(np.sin(2 * np.pi * (x + 0.3 * y) / period) + 0.2)
        name = FAKE_SIGNALS[index]
        out: np.ndarray
        if name == "Z (m)":
            out = self.z_m + 2e-9 * (x / 1e-6) + 1e-9 * (y / 1e-6) + 0.3e-9 * domain
        elif name == "Amplitude (m)":
            edge = np.abs(np.sin(2 * np.pi * (x + 0.3 * y) / period))
            out = 20e-12 * np.minimum(1.0, 4 * edge)
        elif name == "Phase (deg)":
            out = 90.0 + 90.0 * domain
        elif name == "Current (A)":
            out = np.full_like(x, 1e-10 * self.bias_v if self.z_on else 0.0)
        elif name == "Bias (V)":
            out = np.full_like(x, self.bias_v)
        else:
            out = x if name == "X (m)" else y
        return out

    def grab_scan_frame(self, channel_index: int, forward: bool) -> ScanImage:
        f, b = self.frame, self.buffer
        u = (np.arange(b.pixels) + 0.5) / b.pixels - 0.5
        v = (np.arange(b.lines) + 0.5) / b.lines - 0.5
        uu, vv = np.meshgrid(u * f.width_m, v * f.height_m)
        a = -math.radians(f.angle_deg)  # clockwise positive
        x = f.center_x_m + uu * math.cos(a) - vv * math.sin(a)
        y = f.center_y_m + uu * math.sin(a) + vv * math.cos(a)
        if not forward:
            x = x + 5e-9  # backward trace lags a little
        clean = self._sample(channel_index, x, y)
        scale = float(np.ptp(clean)) or abs(float(clean.flat[0])) or 1.0
        data = clean + self.noise * scale * self._rng.standard_normal(clean.shape)
        return ScanImage(FAKE_SIGNALS[channel_index], data.astype(np.float32), self._direction_up)

    # spectroscopy
    def open_bias_spectroscopy(self) -> None:
        self.spectroscopy_open = True

    def get_spectroscopy_props(self) -> SpectroscopyProps:
        names = ["Amplitude (m)", "Phase (deg)"]
        if self.spectr_props.backward_sweep:
            names += ["Amplitude [bwd] (m)", "Phase [bwd] (deg)"]
        return replace(self.spectr_props, channels=tuple(names))

    def set_spectroscopy_props(self, props: SpectroscopyProps) -> None:
        self.spectr_props = props

    def get_spectroscopy_limits(self) -> tuple[float, float]:
        return self.spectr_limits_v

    def set_spectroscopy_limits(self, start_v: float, end_v: float) -> None:
        self.spectr_limits_v = (start_v, end_v)

    def _branch(self, v: np.ndarray, rising: bool) -> tuple[np.ndarray, np.ndarray]:
        """PFM loop branch: polarisation switches at +Vc going up, -Vc going down."""
        width = 0.15 * self.coercive_v
        pol = np.tanh((v - self.coercive_v if rising else v + self.coercive_v) / width)
        amp = 20e-12 * np.abs(pol) + 0.5e-12 * self._rng.standard_normal(v.shape)
        phase = np.where(pol > 0, 180.0, 0.0) + 2.0 * self._rng.standard_normal(v.shape)
        return amp, phase

    def run_bias_spectroscopy(self, save_base_name: str) -> SpectroscopyResult:
        p = self.get_spectroscopy_props()
        start, end = self.spectr_limits_v
        v = np.linspace(start, end, p.num_points)
        rows = [v, *self._branch(v, rising=end >= start)]
        if p.backward_sweep:
            rows += [*self._branch(v, rising=end < start)]
        x, y = self.tip_xy_m
        params = (start, end, x, y, p.z_offset_m)
        return SpectroscopyResult(("Bias calc (V)", *p.channels), np.array(rows), params)

    def sweep_time_s(self) -> float:
        return self.sweep_duration_s

    def end_sweep(self) -> None:
        """Nothing to undo: the fake's sweep has no state beyond its result."""

    # signals
    def signal_names(self) -> Sequence[str]:
        return FAKE_SIGNALS

    def signal_value(self, index: int) -> float:
        x, y = self.tip_xy_m
        z = self.z_m
        if FAKE_SIGNALS[index] == "Z (m)":
            return z
        return float(self._sample(index, np.array([x]), np.array([y]))[0])

    # z
    def withdraw(self, wait: bool, timeout_s: float | None) -> None:
        self.z_on, self.z_m = False, self.z_withdrawn_m
        self.scan_action(ScanAction.STOP, self._direction_up)

    def z_controller_on(self) -> bool:
        return self.z_on

    def set_z_controller(self, on: bool) -> None:
        if on:
            self.z_on = True
        else:
            self.withdraw(False, None)

    def get_z(self) -> float:
        return self.z_m


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the fake backend, e.g. for trying a Nanonis script without an instrument."""
    ap = argparse.ArgumentParser(description="Nanonis TCP server on an in-memory fake SPM")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6501)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = NanonisServer(FakeSpmBackend(), args.host, args.port)
    log.info("nanonis fake SPM on %s:%d", *server.address)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
