"""Nanonis TCP server driven by the unmodified vendor client (nanonis_spm) over loopback."""

from __future__ import annotations

import ast
import inspect
import socket
import struct
import textwrap
import time
from collections.abc import Iterator

import numpy as np
import pytest

from drivers import nanonis_wire as wire
from drivers.nanonis_server import (
    FAKE_SIGNALS,
    FakeSpmBackend,
    NanonisLimits,
    NanonisServer,
    SpmBackend,
)

nanonis_spm = pytest.importorskip("nanonis_spm")
Nanonis = nanonis_spm.Nanonis

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def backend() -> FakeSpmBackend:
    return FakeSpmBackend(seed=1)


@pytest.fixture
def server(backend: FakeSpmBackend) -> Iterator[NanonisServer]:
    limits = NanonisLimits(bias_v=(-10.0, 10.0), xy_m=(-5e-6, 5e-6))
    with NanonisServer(backend, "127.0.0.1", 0, limits=limits) as srv:
        yield srv


def _connect(srv: NanonisServer) -> socket.socket:
    sock = socket.create_connection(srv.address, timeout=5)
    return sock


@pytest.fixture
def client(server: NanonisServer) -> Iterator[Nanonis]:
    sock = _connect(server)
    yield Nanonis(sock)
    sock.close()


def _ok(result: tuple) -> list:
    """The client returns (error string, raw body, values); no exception on errors."""
    err, _raw, values = result
    assert err == ""
    return values


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _raw_call(sock: socket.socket, message: bytes) -> tuple[str, bytes]:
    sock.sendall(message)
    raw_name, size, _flag = wire.unpack_header(_recv_exact(sock, wire.HEADER_SIZE))
    return raw_name.decode("ascii", "replace"), _recv_exact(sock, size)


# ------------------------------------------------------------------ spec vs client


def _client_quicksend(command: str) -> tuple[str, list[str], list[str]]:
    method = getattr(Nanonis, command.replace(".", "_"))
    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "quickSend":
            name, arg_types, ret_types = (ast.literal_eval(node.args[i]) for i in (0, 2, 3))
            return name, arg_types, ret_types
    raise AssertionError(f"no quickSend in {command}")


# Commands nanonis-spm 1.0.9 lacks, with their layout from the Nanonis TCP Programmer's
# Guide in the client's notation: Signals.InSlotsGet returns the slot names (size, count,
# strings) and the signal index of each slot (count, ints).
NOT_IN_VENDOR_CLIENT = {"Signals.InSlotsGet": ([], ["i", "i", "*+c", "i", "*i"])}


@pytest.mark.parametrize("command", sorted(wire.COMMANDS))
def test_spec_matches_vendor_client_source(command: str) -> None:
    spec = wire.COMMANDS[command]
    if command in NOT_IN_VENDOR_CLIENT:
        assert not hasattr(Nanonis, command.replace(".", "_")), "now in the client: check it"
        assert (spec.client_arg_codes(), spec.client_return_codes()) == NOT_IN_VENDOR_CLIENT[
            command
        ]
        return
    name, arg_types, ret_types = _client_quicksend(command)
    assert name == command
    assert spec.client_arg_codes() == arg_types
    assert spec.client_return_codes() == ret_types


def test_fake_backend_implements_protocol(backend: FakeSpmBackend) -> None:
    assert isinstance(backend, SpmBackend)


# ------------------------------------------------------------------ round trips


def test_bias_round_trip(client: Nanonis, backend: FakeSpmBackend) -> None:
    _ok(client.Bias_Set(1.25))
    assert backend.bias_v == pytest.approx(1.25)
    assert _ok(client.Bias_Get()) == [pytest.approx(1.25)]


def test_tip_position_round_trip(client: Nanonis) -> None:
    _ok(client.FolMe_XYPosSet(1.5e-6, -2.25e-6, 1))
    assert _ok(client.FolMe_XYPosGet(0)) == [1.5e-6, -2.25e-6]  # float64 on the wire


def test_scan_frame_buffer_and_grab(client: Nanonis) -> None:
    _ok(client.Scan_FrameSet(1e-6, -0.5e-6, 2e-6, 1e-6, 30.0))
    got = _ok(client.Scan_FrameGet())
    assert got == pytest.approx([1e-6, -0.5e-6, 2e-6, 1e-6, 30.0], rel=1e-6)

    _ok(client.Scan_BufferSet([1, 6], 48, 32))
    n, idx, pixels, lines = _ok(client.Scan_BufferGet())
    assert (n, [i[0] for i in idx], pixels, lines) == (2, [1, 6], 48, 32)

    for channel, name in ((1, "Z (m)"), (6, "Phase (deg)")):
        for forward in (1, 0):
            size, cname, rows, cols, data, up = _ok(client.Scan_FrameDataGrab(channel, forward))
            assert (size, cname) == (len(name), name)
            assert (rows, cols) == (32, 48)
            assert data.shape == (32, 48)
            assert np.isfinite(data).all() and data.std() > 0
            assert up in (0, 1)


def test_scan_action_and_status(client: Nanonis) -> None:
    assert _ok(client.Scan_StatusGet()) == [0]
    _ok(client.Scan_Action(0, 1))  # start, up
    assert _ok(client.Scan_StatusGet()) == [1]
    _ok(client.Scan_Action(2, 1))  # pause
    assert _ok(client.Scan_StatusGet()) == [0]
    _ok(client.Scan_Action(3, 1))  # resume
    assert _ok(client.Scan_StatusGet()) == [1]
    assert _ok(client.Scan_FrameDataGrab(1, 1))[5] == 1  # direction up
    _ok(client.Scan_Action(1, 0))  # stop
    assert _ok(client.Scan_StatusGet()) == [0]


def test_bias_spectroscopy(client: Nanonis, backend: FakeSpmBackend) -> None:
    _ok(client.BiasSpectr_Open())
    assert backend.spectroscopy_open
    _ok(client.BiasSpectr_LimitsSet(-4.0, 4.0))
    assert _ok(client.BiasSpectr_LimitsGet()) == [-4.0, 4.0]
    _ok(client.BiasSpectr_PropsSet(0, 1, 1, 101, 0.0, 2, 2))
    props = _ok(client.BiasSpectr_PropsGet())
    assert props[:4] == [0, 1, 1, 101]
    assert props[6] == ["Amplitude (m)", "Phase (deg)", "Amplitude [bwd] (m)", "Phase [bwd] (deg)"]
    assert props[9] == ["X (m)", "Y (m)", "Z offset (m)"]
    assert props[12] == ["Sweep Start (V)", "Sweep End (V)"]

    _size, n_ch, names, rows, cols, data, n_par, params = _ok(client.BiasSpectr_Start(1, "run"))
    assert n_ch == len(names) == rows == 5 and cols == 101
    assert names[0] == "Bias calc (V)"
    assert data.shape == (5, 101)
    np.testing.assert_allclose(data[0], np.linspace(-4, 4, 101), atol=1e-6)  # waveform
    phase_up, phase_down = data[2], data[4]
    # Hysteresis: at 0 V the up and down branches hold opposite polarisations.
    assert abs(phase_up[50] - phase_down[50]) > 90
    assert n_par == 5 and [p[0] for p in params[:2]] == [-4.0, 4.0]

    # Get data = 0: runs, returns no arrays.
    assert _ok(client.BiasSpectr_Start(0, ""))[:5] == [0, 0, [], 0, 0]


def test_signals(client: Nanonis, backend: FakeSpmBackend) -> None:
    _size, n, names = _ok(client.Signals_NamesGet())
    assert names == list(FAKE_SIGNALS) and n == len(FAKE_SIGNALS)
    _ok(client.Bias_Set(0.75))
    assert _ok(client.Signals_ValGet(names.index("Bias (V)"), 1)) == [pytest.approx(0.75)]
    err, _, values = client.Signals_ValGet(99, 0)
    assert "signal_index=99" in err and "[0, 6]" in err
    assert values == [0.0]  # error responses carry default return values


def test_withdraw(client: Nanonis, backend: FakeSpmBackend) -> None:
    _ok(client.Scan_Action(0, 1))
    assert _ok(client.ZCtrl_OnOffGet()) == [1]
    _ok(client.ZCtrl_Withdraw(1, -1))
    assert _ok(client.ZCtrl_OnOffGet()) == [0]
    assert _ok(client.ZCtrl_ZPosGet()) == [pytest.approx(backend.z_withdrawn_m)]
    assert _ok(client.Scan_StatusGet()) == [0]  # safe state: no scan


# ------------------------------------------------------------------ limits and errors


def test_limits_are_errors_the_client_reports(client: Nanonis, backend: FakeSpmBackend) -> None:
    _ok(client.Bias_Set(0.5))
    err, raw, values = client.Bias_Set(12.0)
    assert "bias_v=12" in err and "[-10, 10] V" in err and values == []
    assert wire.decode_error(raw, 0)[0] != 0  # non-zero status on the wire
    assert backend.bias_v == pytest.approx(0.5)

    err, _, _ = client.FolMe_XYPosSet(0.0, 6e-6, 1)
    assert "y_m=6e-06" in err and "[-5e-06, 5e-06] m" in err
    assert backend.tip_xy_m == (0.0, 0.0)

    err, _, _ = client.Scan_FrameSet(4.5e-6, 0.0, 2e-6, 1e-6, 0.0)
    assert "frame x span" in err and "[-5e-06, 5e-06] m" in err
    err, _, _ = client.BiasSpectr_LimitsSet(-20.0, 1.0)
    assert "start_v=-20" in err
    err, _, _ = client.Scan_Action(9, 0)
    assert "action=9" in err
    err, _, _ = client.Scan_FrameDataGrab(0, 1)  # channel 0 is not recorded
    assert "channel_index=0" in err

    # An error response still carries default return values: the client stays in sync.
    assert _ok(client.Bias_Get()) == [pytest.approx(0.5)]


def test_backend_exception_becomes_error(client: Nanonis, backend: FakeSpmBackend) -> None:
    def boom(bias_v: float) -> None:
        raise RuntimeError("HV amplifier\noffline")

    backend.set_bias = boom  # type: ignore[method-assign]
    err, _, _ = client.Bias_Set(1.0)
    assert err == "Bias.Set: RuntimeError: HV amplifier offline"
    assert _ok(client.Bias_Get()) == [pytest.approx(0.1)]


def test_unknown_command_then_connection_keeps_working(server: NanonisServer) -> None:
    with _connect(server) as sock:
        name, body = _raw_call(sock, wire.pack_header("Foo.Bar", 4) + b"\0\0\0\1")
        assert name == "Foo.Bar"
        values, status, message = wire.decode_response(None, body)
        assert values == () and status != 0 and message == "Foo.Bar: unknown or unsupported command"
        assert "\n" not in message

        # Non-ASCII name: still framed, so still an error response on the same connection.
        name, body = _raw_call(sock, wire.pack_header(b"Bias.\xffGet", 0))
        assert "Bias.\\xffGet: unknown" in wire.decode_response(None, body)[2]

        # A known command with a truncated body.
        name, body = _raw_call(sock, wire.pack_header("Bias.Set", 2) + b"\0\0")
        _, status, message = wire.decode_response(wire.COMMANDS["Bias.Set"], body)
        assert status != 0 and message.startswith("Bias.Set: malformed body")

        # And the same socket then works with the vendor client.
        client = Nanonis(sock)
        _ok(client.Bias_Set(2.0))
        assert _ok(client.Bias_Get()) == [2.0]


def test_requests_sent_together_are_answered_in_order(
    server: NanonisServer, backend: FakeSpmBackend
) -> None:
    """A client may queue requests (a move, then the sweep there): each gets its reply, in
    order, and the sweep runs where the move put the tip."""
    with _connect(server) as sock:
        move = wire.encode_request(wire.COMMANDS["FolMe.XYPosSet"], [1e-7, -2e-7, 1])
        where = wire.encode_request(wire.COMMANDS["FolMe.XYPosGet"], [0])
        bias = wire.encode_request(wire.COMMANDS["Bias.Get"], [])
        sock.sendall(move + where + bias)
        replies = []
        for _ in range(3):
            raw_name, size, _flag = wire.unpack_header(_recv_exact(sock, wire.HEADER_SIZE))
            replies.append((raw_name.decode(), _recv_exact(sock, size)))
        assert [n for n, _ in replies] == ["FolMe.XYPosSet", "FolMe.XYPosGet", "Bias.Get"]
        xy, status, _ = wire.decode_response(wire.COMMANDS["FolMe.XYPosGet"], replies[1][1])
        assert status == 0 and xy == pytest.approx((1e-7, -2e-7))
        # A request split across writes is answered once it is whole.
        sock.sendall(bias[:7])
        time.sleep(0.05)
        sock.sendall(bias[7:])
        assert _raw_call(sock, b"")[0] == "Bias.Get"


def test_no_response_when_flag_clear(server: NanonisServer) -> None:
    with _connect(server) as sock:
        spec = wire.COMMANDS["Bias.Set"]
        sock.sendall(wire.encode_request(spec, [3.0], send_response=False))
        name, body = _raw_call(sock, wire.encode_request(wire.COMMANDS["Bias.Get"], []))
        assert name == "Bias.Get"
        assert wire.decode_response(wire.COMMANDS["Bias.Get"], body) == ((3.0,), 0, "")


def test_malformed_header_closes_cleanly(server: NanonisServer) -> None:
    with _connect(server) as sock:
        name, body = _raw_call(sock, wire.pack_header("Bias.Get", -7))
        assert name == "Bias.Get"
        _, status, message = wire.decode_response(None, body)
        assert status != 0 and "body size -7" in message
        assert sock.recv(1) == b""  # server hung up: stream cannot be re-framed

    with _connect(server) as sock:  # huge body size: refused without reading it
        sock.sendall(struct.pack(">32siHH", b"Scan.FrameSet", 1 << 30, 1, 0))
        assert "malformed header" in wire.decode_response(None, _raw_call(sock, b"")[1])[2]

    with _connect(server) as sock:  # half a header, then gone
        sock.sendall(b"Bias.Get\0\0")

    client_sock = _connect(server)
    try:
        assert _ok(Nanonis(client_sock).Bias_Get()) == [pytest.approx(0.1)]
    finally:
        client_sock.close()


def test_two_clients_in_turn_and_together(server: NanonisServer) -> None:
    first = _connect(server)
    a = Nanonis(first)
    _ok(a.Bias_Set(-1.5))
    first.close()

    second, third = _connect(server), _connect(server)
    try:
        b, c = Nanonis(second), Nanonis(third)
        assert _ok(b.Bias_Get()) == [-1.5]
        _ok(c.FolMe_XYPosSet(1e-7, 2e-7, 0))
        assert _ok(b.FolMe_XYPosGet(0)) == [1e-7, 2e-7]
        assert _ok(c.Bias_Get()) == [-1.5]
    finally:
        second.close()
        third.close()


def test_stop_releases_clients(backend: FakeSpmBackend) -> None:
    srv = NanonisServer(backend).start()
    sock = _connect(srv)
    assert _ok(Nanonis(sock).Bias_Get()) == [pytest.approx(0.1)]  # accepted and served
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 3
    assert sock.recv(1) == b""
    sock.close()
