"""Scanning-probe driver node: a Nanonis controller (real or twin) behind protocol v1.

Talks to the controller through the unmodified vendor client ``nanonis_spm.Nanonis``,
only ever from the node thread, so Nanonis calls, commands and published frames are
strictly ordered. Our side speaks um, V and s; Nanonis speaks SI (m, V, s).

Commands (limits from ``SpmDriverConfig.limits``, enforced before Nanonis sees a value):

- ``move_tip {x_um, y_um}``: Follow-Me move, waits for the end of the move.
- ``set_bias {bias_v}``.
- ``scan {x_um, y_um, width_um, height_um, pixels, lines, angle_deg=0, channels}``:
  frame and buffer set, scan started and awaited, then every channel published as a
  float32 (lines, pixels) frame on stream ``scan/<channel>``; reply ``seqs``.
- ``spectrum {x_um, y_um, bias_from_v, bias_to_v, points, sweeps=1, backward=true}``:
  tip moved, bias sweep run, the curves published as one float32 (channels, points)
  frame on stream ``spectrum``; reply ``seq``, ``channels`` and ``waveform_v``.
- ``spectra {positions_um: [[x, y], ...], bias_from_v, ...}``: the same at every
  position (an active-learning batch), one frame each, the next sweep running while a
  spectrum is published; reply ``seqs``, ``positions_um``, ``channels``, ``waveform_v``.
  All positions are checked against the limits before the first move.
- ``withdraw {}``: the safe state on demand.
- ``get_state``: bias, tip, Z controller, scan status (read live), limits, counters.

Safety: the safe state (at start, on shutdown, on ``withdraw`` and when the watchdog
trips) stops any scan, withdraws the tip (Z controller off) and only then sets the bias
to 0 V: zeroing the bias first would make an STM feedback loop drive the tip into the
sample. The actuators count as live while the bias is non-zero, a scan runs, or the Z
controller is on (tip approached), as last seen by the node; the state is re-read every
``state_poll_ms``, so a tip approached at the controller is withdrawn after
``watchdog_ms`` unless an agent is in control. If the safe state cannot be reached the
node stops serving (loudly) rather than pretend the instrument is safe.

The watchdog does not wait for the node thread: it has its own Nanonis connection
(``drivers/spm_watchdog.py``, ``watchdog_port``), opened with the node, over which it
withdraws the tip and zeroes the bias while the node thread is still blocked in a sweep
or a scan; the controller interrupts the sweep, whose reply then says so. Only the
controlling agent's messages feed the watchdog, during long commands too: an agent
waiting for a scan or a sweep keeps sending heartbeats, or the tip is made safe.

While a scan runs the node keeps publishing heartbeats and answers ``get_state``,
``heartbeat``, ``withdraw`` (which aborts the scan) and ``shutdown``; other actuating
commands are refused. ``spectrum``/``spectra`` block the node inside
``BiasSpectr.Start`` for a sweep; between the points of a batch it serves the same
commands as during a scan (withdraw aborts).
Sweep settings are sent only when they change (the node is the controller's remote user;
the cache is dropped with the link), and hot-path calls use ``nanonis_fast``.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq
from nanonis_spm import Nanonis

from drivers import nanonis_wire as wire
from drivers.node import InstrumentNode
from drivers.protocol import ProtocolError, now_ns
from drivers.spm_config import SpmDriverConfig
from drivers.spm_gate import SpectrumSettings, SpmGate
from drivers.spm_watchdog import WatchdogLink

log = logging.getLogger(__name__)

SPECTRUM_STREAM = "spectrum"
SCAN_STREAM_PREFIX = "scan/"
M_TO_UM = 1e6
_SIGNAL = re.compile(r"^(?P<name>.*?)\s*\((?P<unit>[^()]*)\)\s*$")


def nanonis_values(command: str, response: Sequence[Any]) -> list[Any]:
    """Values of a vendor-client call; its error text becomes a RuntimeError.

    The client never raises for Nanonis errors: it prints them and returns
    ``(error, raw, values)``, or an empty tuple when the reply named another command.
    """
    if len(response) != 3:
        raise RuntimeError(f"Nanonis {command}: no reply for this command (stream out of step)")
    error, _raw, values = response
    if error:
        text = " ".join(str(error).split())
        raise RuntimeError(f"Nanonis {command} failed: {text}")
    return list(values)


def vendor_shape(spec: wire.CommandSpec, values: Sequence[Any]) -> list[Any]:
    """Decoded return values laid out as the vendor client returns them.

    The client also returns the counts that prefix strings and arrays on the wire:
    a string is (byte count, text), a string array (byte size, count, strings), a 2-D
    array (rows, columns, data) and a 1-D array (count, data).
    """
    out: list[Any] = []
    for field, value in zip(spec.returns, values, strict=True):
        if field.kind == wire.STR:
            out += [len(value.encode("utf-8")), value]
        elif field.kind == wire.STR_ARRAY:
            size = sum(4 + len(str(v).encode("utf-8")) for v in value)
            out += [size, len(value), list(value)]
        elif field.kind == wire.ARRAY2D_F:
            out += [value.shape[0], value.shape[1], value]
        elif field.kind in wire.ARRAYS:
            out += [len(value), value]
        else:
            out.append(value)
    return out


def split_signal(name: str) -> tuple[str, str]:
    """'Z (m)' -> ('Z', 'm'): Nanonis puts the unit in the signal name."""
    match = _SIGNAL.match(name)
    return (match["name"], match["unit"]) if match else (name, "")


def to_our_units(data: np.ndarray, unit: str) -> tuple[np.ndarray, str]:
    """Lengths in um like every other length on our side; other units unchanged."""
    if unit == "m":
        return np.multiply(data, M_TO_UM, dtype=np.float32), "um"
    return np.ascontiguousarray(data, np.float32), unit


class SpmNode(InstrumentNode):
    """Serves one Nanonis-controlled SPM over protocol v1 until `stop` is set."""

    ACTUATING = frozenset({"move_tip", "set_bias", "scan", "spectrum", "spectra", "engage"})

    def __init__(self, config: SpmDriverConfig, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.gate = SpmGate(config.limits)
        self.address = f"{config.nanonis_host}:{config.nanonis_port}"
        self._sock: socket.socket | None = None
        self._client: Nanonis | None = None
        self._in_flight: deque[str] = deque()  # requests sent, replies not read yet
        self._plan_names: tuple[str, ...] | None = None
        self._plan: tuple[list[str], list[str], list[str], np.ndarray] = ([], [], [], np.ones(0))
        self.watchdog_link = WatchdogLink(
            config.nanonis_host,
            config.watchdog_port or config.nanonis_port,
            config.connect_timeout_s,
            config.io_timeout_s,
            quick_timeout_s=min(config.io_timeout_s, max(0.05, config.watchdog_ms / 2000)),
        )
        # Connect before binding our sockets: an unreachable controller fails construction.
        self._connect()
        try:
            self.watchdog_link.open()
            super().__init__(config, ctx)
        except Exception:
            self._drop_link()
            self.watchdog_link.close()
            raise
        self.bias_v = 0.0
        self.tip_um = (0.0, 0.0)
        self.z_on = False
        self.z_um = 0.0
        self.scan_running = False
        self.link_error = ""
        self.scans_done = 0
        self.spectra_done = 0
        self._busy = ""  # name of the long command in progress
        self._abort = ""  # why that command must stop
        self._last_poll_ns = 0
        self.handlers.update(
            {
                "get_state": self._cmd_get_state_live,
                "move_tip": self._cmd_move_tip,
                "set_bias": self._cmd_set_bias,
                "scan": self._cmd_scan,
                "spectrum": self._cmd_spectrum,
                "spectra": self._cmd_spectra,
                "withdraw": self._cmd_withdraw,
                "engage": self._cmd_engage,
            }
        )

    # --- the Nanonis link ---------------------------------------------------------

    def _connect(self) -> None:
        host, port = self.config.nanonis_host, self.config.nanonis_port
        try:
            sock = socket.create_connection((host, port), timeout=self.config.connect_timeout_s)
        except OSError as exc:
            raise ConnectionError(
                f"cannot reach the Nanonis controller at {self.address} within "
                f"{self.config.connect_timeout_s:g} s: {exc}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._client = sock, Nanonis(sock)
        self._spectrum_applied: SpectrumSettings | None = None
        log.info("connected to Nanonis at %s", self.address)

    def _drop_link(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._client = None, None
        self._spectrum_applied = None
        self._in_flight.clear()

    def _settle(self) -> None:
        """Read (and drop) the replies still owed to queued requests, so the next call's
        reply is its own; only an abort mid-batch leaves any (see ``_run_spectra``)."""
        while self._in_flight:
            command = self._in_flight[0]
            try:
                self._read_reply(command)
            except RuntimeError as exc:
                log.warning("queued %s ended while aborting: %s", command, exc)

    def nanonis(self, command: str, *args: Any, timeout_s: float | None = None) -> list[Any]:
        """One Nanonis call by its dotted name; errors raise RuntimeError naming it."""
        if self._client is None or self._sock is None:
            self._connect()  # the previous link broke: one fresh attempt per call
        self._settle()
        assert self._client is not None and self._sock is not None
        # The client resets the timeout to 1000 s after each call: set ours every time.
        self._sock.settimeout(timeout_s or self.config.io_timeout_s)
        try:
            response = getattr(self._client, command.replace(".", "_"))(*args)
        except Exception as exc:  # socket or parse failure: the byte stream is lost
            self._drop_link()
            raise RuntimeError(
                f"Nanonis {command}: link to {self.address} failed "
                f"({type(exc).__name__}: {exc}); reconnecting on the next call"
            ) from exc
        if len(response) != 3:
            self._drop_link()  # the reply belonged to another command: out of step
        return nanonis_values(command, response)

    def nanonis_fast(self, command: str, *args: Any, timeout_s: float | None = None) -> list[Any]:
        """One call on the hot path, without the vendor client's per-call cost.

        The request bytes are those the vendor client sends (``nanonis_wire`` mirrors
        it, tested byte-equal), so this works against a real controller; values come back
        in the vendor client's layout (``vendor_shape``), 2-D data as a float32 array.
        Errors raise RuntimeError exactly as ``nanonis`` does.
        """
        self._settle()
        self._send_request(command, args)
        return self._read_reply(command, timeout_s)

    def nanonis_batch(self, requests: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """Several calls in one write, their replies read in order (one round trip, not
        one per call). Every reply is read before the first error is raised, so the link
        stays in step; only calls that may all run whatever the others answer belong here.
        """
        self._settle()
        self._send_requests(requests)
        out: list[list[Any]] = []
        error: RuntimeError | None = None
        for command, _args in requests:
            try:
                out.append(self._read_reply(command))
            except RuntimeError as exc:
                if self._sock is None:  # the link broke: the other replies are gone
                    raise
                error = error or exc
                out.append([])
        if error is not None:
            raise error
        return out

    def _send_request(self, command: str, args: Sequence[Any]) -> None:
        """Send without waiting; replies are read in order with ``_read_reply``."""
        self._send_requests([(command, args)])

    def _send_requests(self, requests: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Several requests in one write: the controller answers them in order."""
        if self._client is None or self._sock is None:
            self._connect()
        assert self._sock is not None
        command = requests[0][0]
        try:
            self._sock.sendall(
                b"".join(wire.encode_request(wire.COMMANDS[c], args) for c, args in requests)
            )
            self._in_flight.extend(c for c, _args in requests)
        except OSError as exc:
            self._drop_link()
            raise RuntimeError(
                f"Nanonis {command}: link to {self.address} failed "
                f"({type(exc).__name__}: {exc}); reconnecting on the next call"
            ) from exc

    def _read_reply(self, command: str, timeout_s: float | None = None) -> list[Any]:
        sock = self._sock
        if sock is None:
            raise RuntimeError(f"Nanonis {command}: link to {self.address} is down")
        if not self._in_flight or self._in_flight[0] != command:
            raise RuntimeError(f"Nanonis {command}: no such request is waiting for its reply")
        self._in_flight.popleft()
        spec = wire.COMMANDS[command]
        sock.settimeout(timeout_s or self.config.io_timeout_s)
        try:
            values, message = wire.read_response(sock, spec)
        except (OSError, wire.WireError) as exc:
            self._drop_link()
            raise RuntimeError(
                f"Nanonis {command}: link to {self.address} failed "
                f"({type(exc).__name__}: {exc}); reconnecting on the next call"
            ) from exc
        if message:  # like the client: an error whenever there is a description
            raise RuntimeError(f"Nanonis {command} failed: {' '.join(message.split())}")
        return vendor_shape(spec, values)

    def slot_names(self) -> list[str]:
        """Signal names by Signals Manager slot: scan buffers and frame grabs number their
        channels by slot (0-23), not by signal. Read at every scan: slots can be
        reassigned at the controller. (Not in the vendor client: sent with our codec.)"""
        return [str(s) for s in self.nanonis_fast("Signals.InSlotsGet")[2]]

    # --- InstrumentNode hooks -------------------------------------------------------

    def pump(self) -> None:
        period = self.config.state_poll_ms
        if period and now_ns() - self._last_poll_ns >= period * 1_000_000:
            self._refresh()

    def teardown(self) -> None:
        self._drop_link()
        self.watchdog_link.close()

    def actuators_live(self) -> bool:
        """Bias on, a scan, the tip in feedback, or a long command (a sweep applies bias)."""
        return self.bias_v != 0.0 or self.scan_running or self.z_on or bool(self._busy)

    def emergency_off(self, reason: str) -> bool:
        """Watchdog thread: withdraw + bias 0 over the watchdog's own link, whatever the
        node thread is blocked in; a long command in progress is marked aborted. False
        (the node thread does it at its next tick) only if that link is down."""
        if self._busy:
            self._abort = reason
        try:
            self.watchdog_link.make_safe(self.config.withdraw_timeout_ms)
        except (RuntimeError, ConnectionError) as exc:
            log.error("SPM safe-off (%s) on the watchdog link failed: %s", reason, exc)
            return False
        self.z_on, self.bias_v, self.scan_running = False, 0.0, False
        log.warning("SPM safe (%s) over the watchdog link: tip withdrawn, bias 0 V", reason)
        return True

    def _watch(self) -> None:
        """The watchdog's check, then its link kept alive (pinged, reopened if dropped).
        A shutdown asked while the node thread is blocked in a sweep ends it the same way."""
        super()._watch()
        if self.stop.is_set() and self._busy and not self._abort:
            self.emergency_off("shutdown")
        self.watchdog_link.keep_alive()

    def safe_state(self, reason: str) -> None:
        """Stop the scan, withdraw the tip, stop a sweep, then bias 0; every step tried
        even if one fails."""
        if self._busy:
            self._abort = reason
        errors: list[str] = []
        withdraw_ms = self.config.withdraw_timeout_ms
        steps: list[tuple[str, tuple[Any, ...], float | None]] = [
            ("Scan.Action", (1, 1), None),  # 1 = stop
            ("ZCtrl.Withdraw", (1, withdraw_ms), withdraw_ms / 1000 + self.config.io_timeout_s),
            ("BiasSpectr.Stop", (), None),  # a sweep this node gave up on may still run
            ("Bias.Set", (0.0,), None),
        ]
        for command, args, timeout in steps:
            try:
                self.nanonis(command, *args, timeout_s=timeout)
            except Exception as exc:
                errors.append(str(exc))
                continue
            if command == "Scan.Action":
                self.scan_running = False
            elif command == "ZCtrl.Withdraw":
                self.z_on = False
            else:
                self.bias_v = 0.0
        if errors:
            message = f"SPM safe state ({reason}) incomplete: " + "; ".join(errors)
            log.error(message)
            self.link_error = message
            if reason != "shutdown":  # at shutdown there is nobody left to tell
                raise RuntimeError(message)
        else:
            log.info("SPM safe (%s): scan stopped, tip withdrawn, bias 0 V", reason)

    def actuators(self) -> set[str]:
        return {"tip", "bias", "scan"}  # Z controller, tip bias, scanner

    def state(self) -> dict[str, Any]:
        return {
            "bias_v": self.bias_v,
            "tip_um": list(self.tip_um),
            "z_controller_on": self.z_on,
            "z_um": self.z_um,
            "scan_running": self.scan_running,
            "busy": self._busy,
            "link_ok": self._client is not None and not self.link_error,
            "watchdog_link_ok": self.watchdog_link.up,
            "watchdog_tripped": self.watchdog_tripped,
        }

    def status(self) -> dict[str, Any]:
        return {
            "nanonis": self.address,
            "link_error": self.link_error,
            "watchdog_link": self.watchdog_link.address,
            "watchdog_link_error": self.watchdog_link.error,
            "scans_done": self.scans_done,
            "spectra_done": self.spectra_done,
            "limits": self.config.limits.model_dump(),
        }

    def _refresh(self) -> None:
        """Re-read the controller's state; a failure is reported in state, not raised."""
        self._last_poll_ns = now_ns()
        try:
            self.bias_v = float(self.nanonis("Bias.Get")[0])
            x_m, y_m = self.nanonis("FolMe.XYPosGet", 0)[:2]
            self.tip_um = (float(x_m) * M_TO_UM, float(y_m) * M_TO_UM)
            self.z_on = bool(self.nanonis("ZCtrl.OnOffGet")[0])
            self.z_um = float(self.nanonis("ZCtrl.ZPosGet")[0]) * M_TO_UM
            self.scan_running = bool(self.nanonis("Scan.StatusGet")[0])
        except Exception as exc:
            if str(exc) != self.link_error:
                log.warning("SPM state not readable: %s", exc)
            self.link_error = str(exc)
        else:
            self.link_error = ""

    # --- commands -----------------------------------------------------------------------

    def _not_busy(self, cmd: str) -> None:
        if self._busy:
            raise ProtocolError(
                "device_error",
                f"{cmd}: refused while a {self._busy} is in progress (send withdraw to abort it)",
            )

    def _cmd_get_state_live(self, args: dict[str, Any]) -> dict[str, Any]:
        self._refresh()
        return self._cmd_get_state(args)

    def _move_tip(self, x_um: float, y_um: float) -> None:
        self.nanonis_fast("FolMe.XYPosSet", *self._tip_m(x_um, y_um))
        self.tip_um = (x_um, y_um)

    def _cmd_move_tip(self, args: dict[str, Any]) -> dict[str, Any]:
        x, y = self.gate.tip("move_tip", args)
        self._not_busy("move_tip")
        self._move_tip(x, y)
        self.watchdog_tripped = False
        return {"tip_um": [x, y]}

    def _cmd_set_bias(self, args: dict[str, Any]) -> dict[str, Any]:
        bias = self.gate.bias("set_bias", args)
        self._not_busy("set_bias")
        if bias != 0.0:
            self.bias_v = bias  # live from the moment we ask: a failed reply may have applied it
        self.nanonis("Bias.Set", bias)
        self.bias_v = bias
        self.watchdog_tripped = False
        return {"bias_v": bias}

    def _cmd_withdraw(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.safe_state("withdraw")
        return self.state()

    def _cmd_engage(self, _args: dict[str, Any]) -> dict[str, Any]:
        """Z controller on (tip in feedback): an explicit agent decision, watchdog-guarded."""
        self._not_busy("engage")
        self.z_on = True  # live from the moment we ask
        self.nanonis("ZCtrl.OnOffSet", 1)
        self.watchdog_tripped = False
        return {"z_controller_on": True}

    # --- scan --------------------------------------------------------------------------

    def _scan_channels(self, wanted: list[str]) -> list[tuple[int, str]]:
        """Requested channels as (slot index, Nanonis name); bare names ('Z') accepted."""
        names = self.slot_names()
        out: list[tuple[int, str]] = []
        for i, channel in enumerate(wanted):
            index = next(
                (k for k, n in enumerate(names) if channel in (n, split_signal(n)[0])), None
            )
            if index is None:
                known = [split_signal(n)[0] for n in names]
                raise ProtocolError(
                    "bad_args", f"scan: field 'channels[{i}]' = {channel!r} is not one of {known}"
                )
            if any(index == k for k, _ in out):
                raise ProtocolError(
                    "bad_args", f"scan: field 'channels[{i}]' = {channel!r} is listed twice"
                )
            out.append((index, names[index]))
        return out

    def _cmd_scan(self, args: dict[str, Any]) -> dict[str, Any]:
        cmd = "scan"
        request = self.gate.scan(args)
        window, pixels, lines = request.window, request.pixels, request.lines
        self._not_busy(cmd)
        channels = self._scan_channels(request.channels)  # reads the signal list: after the limits

        frame = (
            window["x_um"] / M_TO_UM,
            window["y_um"] / M_TO_UM,
            window["width_um"] / M_TO_UM,
            window["height_um"] / M_TO_UM,
            window["angle_deg"],
        )
        buffer = ([index for index, _ in channels], pixels, lines)
        self.nanonis_batch([("Scan.FrameSet", frame), ("Scan.BufferSet", buffer)])
        timeout_s = lines * self.config.scan_line_timeout_s + self.config.scan_timeout_margin_s
        t_start = now_ns()
        self.scan_running = True  # live before the request leaves: it may start regardless
        self._busy, self._abort = cmd, ""
        try:  # the first status read rides with the start: a short scan is done already
            _, (running, *_rest) = self.nanonis_batch(
                [("Scan.Action", (0, 1)), ("Scan.StatusGet", ())]  # 0 = start, direction up
            )
            if running:
                self._await_scan(timeout_s)
            self.scan_running = False
        finally:
            self._busy = ""
        t_end = now_ns()
        self.watchdog_tripped = False

        seqs: dict[str, int] = {}
        streams: list[str] = []
        shape: list[int] = []
        self._settle()
        # Every grab asked at once: each frame is published while the next is encoded.
        self._send_requests([("Scan.FrameDataGrab", (index, 1)) for index, _ in channels])
        try:
            for index, signal in channels:
                _size, grabbed, _rows, _cols, data, direction_up = self._read_reply(
                    "Scan.FrameDataGrab"
                )
                if split_signal(str(grabbed))[0] != split_signal(signal)[0]:
                    log.warning(
                        "slot %d grabbed %r, expected %r: slots reassigned?", index, grabbed, signal
                    )
                image, unit = to_our_units(np.asarray(data, np.float32), split_signal(signal)[1])
                name = split_signal(signal)[0]
                stream = SCAN_STREAM_PREFIX + name
                header = self.publisher.publish_frame(
                    stream,
                    image,
                    t_start,
                    t_end,
                    {
                        **self.state(),
                        "window": window,
                        "channel": name,
                        "signal": signal,
                        "slot": index,
                        "grabbed_channel": str(grabbed),  # the controller's name for the data
                        "units": unit,
                        "direction": "forward",
                        "direction_up": bool(direction_up),
                    },
                )
                seqs[name] = header.seq
                streams.append(stream)
                shape = list(image.shape)
        finally:
            self._settle()  # replies of grabs after a failed one
        self.scans_done += 1
        return {
            "seqs": seqs,
            "streams": streams,
            "shape": shape,
            "window": window,
            "t_start_ns": t_start,
            "t_end_ns": t_end,
        }

    def _await_scan(self, timeout_s: float) -> None:
        """Poll Scan.StatusGet, serving heartbeats and the few commands allowed meanwhile."""
        deadline = time.monotonic() + timeout_s
        wait_ms = 0  # first status read at once: a short (or simulated) scan is done already
        while True:
            self._serve_while_busy(wait_ms)  # the agent's heartbeats keep feeding the lease
            if self._abort:
                raise RuntimeError(f"aborted by {self._abort}; no frames published")
            if not self.nanonis_fast("Scan.StatusGet")[0]:
                self.scan_running = False
                return
            wait_ms = self.config.scan_poll_ms
            if time.monotonic() > deadline:
                self.nanonis("Scan.Action", 1, 1)
                self.scan_running = False
                raise RuntimeError(
                    f"scan not finished within {timeout_s:g} s "
                    f"(lines x scan_line_timeout_s + scan_timeout_margin_s); scan stopped"
                )

    # --- spectrum ----------------------------------------------------------------------

    def _cmd_spectrum(self, args: dict[str, Any]) -> dict[str, Any]:
        cmd = "spectrum"
        xy = self.gate.tip(cmd, args)
        settings = self.gate.spectrum(cmd, args)
        self._not_busy(cmd)
        return self._run_spectra(cmd, [xy], settings)[0]

    def _cmd_spectra(self, args: dict[str, Any]) -> dict[str, Any]:
        """A batch of spectra: one frame each, the controller never idle between them."""
        cmd = "spectra"
        positions = self.gate.positions(cmd, args.get("positions_um"))
        settings = self.gate.spectrum(cmd, args)
        self._not_busy(cmd)
        done = self._run_spectra(cmd, positions, settings)
        return {
            "seqs": [d["seq"] for d in done],
            "positions_um": [d["position_um"] for d in done],
            "stream": SPECTRUM_STREAM,
            "channels": done[0]["channels"],
            "units": done[0]["units"],
            "shape": done[0]["shape"],
            "waveform_v": done[0]["waveform_v"],
        }

    def _apply_spectrum_settings(self, settings: SpectrumSettings) -> None:
        """Open the module and send the sweep settings, only when they changed: this node
        is the controller's only remote user, and the cache dies with the link."""
        if self._spectrum_applied == settings:
            return
        self._spectrum_applied = None
        backward = 1 if settings.backward else 2  # 1 = on, 2 = off
        self.nanonis_fast("BiasSpectr.Open")
        # save_all, autosave and the save dialog: 0 = unchanged, 2 = off.
        self.nanonis_fast(
            "BiasSpectr.PropsSet", 0, settings.sweeps, backward, settings.points, 0.0, 2, 2
        )
        self.nanonis_fast("BiasSpectr.LimitsSet", settings.start_v, settings.end_v)
        self._spectrum_applied = settings

    def _run_spectra(
        self, cmd: str, positions: list[tuple[float, float]], settings: SpectrumSettings
    ) -> list[dict[str, Any]]:
        """Move + sweep at every position; spectra are published as their sweeps return.

        With ``spectra_queued`` >= 1, each point goes out as one write (move, then sweep)
        and that many points wait at the controller behind the sweep in progress, so it
        never idles while we publish; a refused queued move is caught before the sweep
        behind it is published (that sweep ran at the previous point: it and the points
        queued after it are dropped). With 0, a sweep is sent only once its move was
        answered. Commands that arrive (heartbeats, ``withdraw``, ``shutdown``) are served
        once the queued points have returned, never with a reply outstanding.
        """
        self._apply_spectrum_settings(settings)
        self._settle()
        done: list[dict[str, Any]] = []
        timeout = self.config.spectrum_timeout_s + self.config.io_timeout_s
        confirm = self.config.spectra_queued == 0
        depth = 1 + self.config.spectra_queued  # points in flight: the sweep running + queued
        n = len(positions)
        self._busy, self._abort = cmd, ""
        sent = 0  # points whose sweep went out
        failure: RuntimeError | None = None  # a refused confirmed move, raised after publishing

        def send_next(returned: int) -> None:
            """Send the next point if there is room and no command is waiting."""
            nonlocal sent, failure
            if failure is None and sent < n and sent - returned < depth:
                if self.server.waiting():
                    return
                try:
                    self._send_point(positions[sent], confirm)
                except RuntimeError as exc:
                    failure = RuntimeError(
                        f"{cmd}: move to positions_um[{sent}] failed after {sent} of {n} "
                        f"spectra (those were published): {exc}"
                    )
                    return
                sent += 1

        t_start = now_ns()
        try:
            for i, xy in enumerate(positions):
                while failure is None and sent - i < depth and sent < n:
                    before = sent
                    send_next(i)
                    if sent == before:
                        break  # a command is waiting, or the move was refused
                while sent == i and failure is None and not self._abort:
                    self._serve_while_busy()  # a command came in and nothing is queued
                    send_next(i)
                if self._abort:  # withdraw, shutdown or the watchdog made it safe
                    raise RuntimeError(
                        f"{cmd}: aborted by {self._abort} after {i} of {n} spectra "
                        f"(those were published)"
                    )
                if failure is not None and sent == i:
                    raise failure
                if not confirm:
                    try:
                        self._read_reply("FolMe.XYPosSet", timeout)
                    except RuntimeError as exc:
                        if self._sock is None:  # link lost: the sweep behind may run on
                            raise self._sweep_failed(cmd, i, n, timeout, exc) from exc
                        self._settle()  # the sweep behind the refused move ran elsewhere
                        raise RuntimeError(
                            f"{cmd}: move to positions_um[{i}] failed after {i} of {n} spectra "
                            f"(those were published; the {sent - i} point(s) queued from "
                            f"there on were dropped): {exc}"
                        ) from exc
                self.tip_um = xy
                try:
                    started = self._read_reply("BiasSpectr.Start", timeout)
                except RuntimeError as exc:
                    failed = self._sweep_failed(cmd, i, n, timeout, exc)
                    if failed is exc:
                        raise
                    raise failed from exc
                t_end = now_ns()
                self.watchdog_tripped = False
                send_next(i + 1)  # before publishing: the controller must not wait for us
                done.append(self._publish_spectrum(started, xy, settings, t_start, t_end))
                self._tick()
                t_start = t_end
        finally:
            self._settle()
            self._busy = ""
        return done

    def _sweep_failed(
        self, cmd: str, i: int, n: int, timeout_s: float, exc: RuntimeError
    ) -> RuntimeError:
        """The error for a sweep that did not return. Aborted (withdraw, watchdog): the
        controller interrupted it. Link lost or timed out: the controller may still be
        sweeping, so the tip is made safe (on a fresh link) before the error is told."""
        done = f"after {i} of {n} spectra (those were published)"
        if self._abort:
            return RuntimeError(
                f"{cmd}: aborted by {self._abort} {done}; the sweep in progress was "
                f"interrupted: {exc}"
            )
        if self._sock is not None:  # the controller answered with an error: link in step
            return exc
        try:
            self.safe_state(f"{cmd} sweep not answered")
            outcome = "tip made safe"
        except RuntimeError as safe_exc:
            outcome = f"safe state failed too: {safe_exc}"
        return RuntimeError(
            f"{cmd}: sweep {i + 1} of {n} not answered within {timeout_s:g} s "
            f"(spectrum_timeout_s + io_timeout_s) {done}; {outcome}: {exc}"
        )

    def _spectrum_plan(
        self, names: tuple[str, ...]
    ) -> tuple[list[str], list[str], list[str], np.ndarray]:
        """Channel names, our units, signal names and per-row scale for a sweep's signals
        (the same for every sweep of a batch, so worked out once)."""
        if self._plan_names != names:
            split = [split_signal(str(n)) for n in names]
            units = ["um" if unit == "m" else unit for _name, unit in split]
            scale = np.array([[M_TO_UM if unit == "m" else 1.0] for _n, unit in split])
            self._plan = ([n for n, _u in split], units, [str(n) for n in names], scale)
            self._plan_names = names
        channels, units, signals, scale = self._plan
        return list(channels), list(units), list(signals), scale

    def _send_point(self, xy: tuple[float, float], confirm: bool) -> None:
        """Move there, then sweep. confirm: the sweep goes out once the move was answered
        (a refused move raises, nothing else sent); else both in one write, replies read
        in that order."""
        if confirm:
            self._move_tip(*xy)
            self._send_request("BiasSpectr.Start", (1, ""))
        else:
            sweep = ("BiasSpectr.Start", (1, ""))
            self._send_requests([("FolMe.XYPosSet", self._tip_m(*xy)), sweep])

    @staticmethod
    def _tip_m(x_um: float, y_um: float) -> tuple[float, float, int]:
        """FolMe.XYPosSet arguments: metres, and wait for the end of the move."""
        return (x_um / M_TO_UM, y_um / M_TO_UM, 1)

    def _serve_while_busy(self, wait_ms: int = 0) -> None:
        """Answer what may come in during a long command (heartbeats, withdraw, shutdown)."""
        for incoming in self.server.poll(timeout_ms=wait_ms):
            self._handle(incoming)
        self._tick()
        if self.stop.is_set() and not self._abort:
            self.safe_state("shutdown during " + (self._busy or "a command"))

    def _publish_spectrum(
        self,
        started: list[Any],
        xy: tuple[float, float],
        settings: SpectrumSettings,
        t_start: int,
        t_end: int,
    ) -> dict[str, Any]:
        _size, _n, names, _rows, _cols, data, _n_par, params = started
        channels, units, signals, scale = self._spectrum_plan(tuple(names))
        rows = np.asarray(data, np.float32)
        if rows.ndim != 2 or len(rows) != len(scale):
            raise RuntimeError(
                f"Nanonis BiasSpectr.Start: {len(scale)} channels but data shaped {rows.shape}"
            )
        curves = (rows * scale).astype(np.float32) if len(rows) else np.zeros((0, 0), np.float32)
        header = self.publisher.publish_frame(
            SPECTRUM_STREAM,
            curves,
            t_start,
            t_end,
            {
                **self.state(),
                "channels": channels,
                "units": units,
                "signals": signals,
                "position_um": list(xy),
                "bias_from_v": settings.start_v,
                "bias_to_v": settings.end_v,
                "points": settings.points,
                "sweeps": settings.sweeps,
                "backward": settings.backward,
                "parameters": np.asarray(params, np.float64).ravel().tolist(),
            },
        )
        self.spectra_done += 1
        return {
            "seq": header.seq,
            "stream": SPECTRUM_STREAM,
            "channels": channels,
            "units": units,
            "shape": list(curves.shape),
            "waveform_v": curves[0].tolist() if len(curves) else [],
            "position_um": list(xy),
            "t_start_ns": t_start,
            "t_end_ns": t_end,
        }
