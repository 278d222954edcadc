"""The SPM watchdog trips during a sweep (issue 16): the twin server serves a second
connection while a sweep runs, a withdraw from it interrupts the sweep, and the node's
watchdog uses such a connection of its own. Order of events, never elapsed time."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from drivers.nanonis_server import FakeSpmBackend, NanonisLimits, NanonisServer
from drivers.protocol import EVENT_TOPIC, HEARTBEAT_TOPIC, Reply, now_ns
from drivers.spm_config import SpmDriverConfig
from drivers.spm_twin_backend import PfmTwinBackend, spm_limits
from drivers.transport import CommandClient, CommandError, StreamSubscriber
from simulators.spm import SpectroscopyConfig

nanonis_spm = pytest.importorskip("nanonis_spm")
Nanonis = nanonis_spm.Nanonis
from drivers import spm_watchdog  # noqa: E402
from drivers.spm_node import SpmNode  # noqa: E402  (needs nanonis_spm)
from drivers.spm_watchdog import WatchdogLink  # noqa: E402

pytestmark = pytest.mark.timeout(30)

LONG_SWEEP_S = 60.0  # far longer than any test: only an interrupt ends it


@pytest.fixture
def backend() -> FakeSpmBackend:
    return FakeSpmBackend(seed=1, sweep_duration_s=LONG_SWEEP_S)


@pytest.fixture
def server(backend: FakeSpmBackend) -> Iterator[NanonisServer]:
    with NanonisServer(backend, "127.0.0.1", 0, limits=NanonisLimits(max_request_s=600)) as srv:
        yield srv


@pytest.fixture
def log_calls(server: NanonisServer) -> list[tuple[str, str, int]]:
    """("begin" | "end", command, thread) for every request the controller served."""
    events: list[tuple[str, str, int]] = []
    handle = server.handle_message

    def recording(raw_name: bytes, body: bytes) -> bytes:
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        events.append(("begin", name, threading.get_ident()))
        try:
            return handle(raw_name, body)
        finally:
            events.append(("end", name, threading.get_ident()))

    server.handle_message = recording  # type: ignore[method-assign]
    return events


def _connect(server: NanonisServer) -> tuple[socket.socket, Any]:
    sock = socket.create_connection(server.address, timeout=20)
    return sock, Nanonis(sock)


def _start_sweep(server: NanonisServer) -> tuple[socket.socket, Any, threading.Thread, list]:
    """A sweep started on a first connection, running in a thread; returns its reply box."""
    sock, client = _connect(server)
    client.ZCtrl_OnOffSet(1)
    client.BiasSpectr_Open()
    reply: list[Any] = []
    thread = threading.Thread(target=lambda: reply.append(client.BiasSpectr_Start(1, "")))
    thread.start()
    return sock, client, thread, reply


def _wait_until_refused_as_sweeping(other: Any) -> str:
    """The second connection learns the sweep runs: a harmless settings write (the
    limits as they are) is refused as busy. Never a sweep of its own: it could win."""
    _err, _raw, limits = other.BiasSpectr_LimitsGet()
    while True:
        err, _, _ = other.BiasSpectr_LimitsSet(*limits)
        if "bias sweep is running" in err:
            return str(err)


def test_a_second_connection_is_served_and_its_withdraw_interrupts_the_sweep(
    server: NanonisServer, backend: FakeSpmBackend
) -> None:
    sock, _client, thread, reply = _start_sweep(server)
    sock2, other = _connect(server)
    try:
        refused = _wait_until_refused_as_sweeping(other)
        assert refused.startswith("BiasSpectr.LimitsSet: refused")
        err, _, _ = other.BiasSpectr_Start(1, "")
        assert "refused while a bias sweep is running" in err  # one sweep at a time
        assert other.Bias_Get()[0] == ""  # served while the sweep runs
        err, _, _ = other.FolMe_XYPosSet(1e-7, 1e-7, 1)
        assert "refused while a bias sweep is running" in err
        assert thread.is_alive()  # the sweep is still running: only an interrupt ends it
        assert other.ZCtrl_Withdraw(1, 1000)[0] == ""
        thread.join(20)
        err, _raw, _values = reply[0]
        assert "interrupted by ZCtrl.Withdraw" in err and "no data" in err
        assert not backend.z_on
        assert other.FolMe_XYPosSet(1e-7, 1e-7, 1)[0] == ""  # moves are allowed again
    finally:
        sock.close()
        sock2.close()


@pytest.mark.parametrize(("command", "args"), [("BiasSpectr_Stop", ()), ("Bias_Set", (0.0,))])
def test_a_sweep_stop_or_a_bias_set_from_another_connection_interrupts_it(
    server: NanonisServer, command: str, args: tuple[Any, ...]
) -> None:
    sock, _client, thread, reply = _start_sweep(server)
    sock2, other = _connect(server)
    try:
        _wait_until_refused_as_sweeping(other)
        assert getattr(other, command)(*args)[0] == ""
        thread.join(20)
        assert f"interrupted by {command.replace('_', '.')}" in reply[0][0]
    finally:
        sock.close()
        sock2.close()


def test_the_twin_truth_shows_the_tip_safe_when_the_withdraw_lands() -> None:
    twin = PfmTwinBackend(
        seed=0, realtime=True, spectroscopy_config=SpectroscopyConfig(step_time_s=1.0)
    )
    assert twin.sweep_time_s() >= LONG_SWEEP_S  # 64 points x 2 cycles x 1 s
    with NanonisServer(twin, "127.0.0.1", 0, limits=spm_limits(twin)) as server:
        sock, _client, thread, reply = _start_sweep(server)
        sock2, other = _connect(server)
        try:
            _wait_until_refused_as_sweeping(other)
            assert twin.sweeping and not twin.truth_log[-1].safe
            before = now_ns()
            assert other.ZCtrl_Withdraw(1, 1000)[0] == ""
            safe_at = twin.safe_since_ns(before)
            assert safe_at is not None  # stamped by the withdraw itself
            thread.join(20)
            assert "interrupted by ZCtrl.Withdraw" in reply[0][0]
            assert twin.truth_log[-1].safe and twin.bias_v == 0.0
            err, _, _ = other.Bias_Set(1.0)
            assert err == "" and not twin.truth_log[-1].safe  # bias is on the sample again
        finally:
            sock.close()
            sock2.close()


# ------------------------------------------------------------------ the node


def _node(server: NanonisServer, ipc_dir: Path, ctx: zmq.Context, **overrides: Any) -> SpmNode:
    host, port = server.address
    settings: dict[str, Any] = {
        "stream_endpoint": f"ipc://{ipc_dir}/stream",
        "command_endpoint": f"ipc://{ipc_dir}/command",
        "nanonis_host": host,
        "nanonis_port": port,
        "watchdog_ms": 200,
        "heartbeat_ms": 20,
        "state_poll_ms": 0,
        **overrides,
    }
    return SpmNode(SpmDriverConfig(**settings), ctx=ctx)


def test_the_watchdog_withdraws_the_tip_while_the_node_is_blocked_in_a_sweep(
    server: NanonisServer,
    backend: FakeSpmBackend,
    log_calls: list[tuple[str, str, int]],
    ipc_dir: Path,
    zmq_ctx: zmq.Context,
    run_node: Any,
) -> None:
    node = run_node(_node(server, ipc_dir, zmq_ctx))
    sub = StreamSubscriber(zmq_ctx, node.endpoints[0], topics=(EVENT_TOPIC, HEARTBEAT_TOPIC))
    agent = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=10_000)
    try:
        agent.call("engage")
        agent.call("set_bias", {"bias_v": 0.5})
        sweep = {"x_um": 0, "y_um": 0, "bias_from_v": -1, "bias_to_v": 1, "points": 8}
        request = agent.send("spectrum", sweep)  # the agent's last word: then silence
        assert agent.socket.poll(20_000), "the sweep was never interrupted"
        reply = Reply.from_wire(agent.socket.recv())
        assert reply.id == request and not reply.ok and reply.error_code == "device_error"
        assert "aborted by watchdog" in reply.error_message
        assert "interrupted by ZCtrl.Withdraw" in reply.error_message
        assert not backend.z_on  # the withdraw came first; bias 0 follows it
        events: list[dict[str, Any]] = []
        while not any(m.get("event") == "watchdog" for m in events):
            sub.recv_newest(50)
            events += [m for t, m in sub.take_messages() if t == EVENT_TOPIC]
        state = agent.call("get_state").result
        assert state["watchdog_tripped"] is True and state["z_controller_on"] is False
        assert state["watchdog_link_ok"] is True and backend.bias_v == 0.0
        # The withdraw came on another connection while the sweep still ran there.
        start = next(e for e in log_calls if e[:2] == ("begin", "BiasSpectr.Start"))
        withdraw = next(
            i for i, e in enumerate(log_calls) if e[:2] == ("begin", "ZCtrl.Withdraw")
            and e[2] != start[2]
        )  # fmt: skip
        start_end = log_calls.index(("end", "BiasSpectr.Start", start[2]))
        assert withdraw < start_end
        assert ("begin", "Bias.Set", log_calls[withdraw][2]) in log_calls[withdraw:]
    finally:
        agent.close()
        sub.close()


def test_a_sweep_past_its_timeout_ends_with_the_tip_safe(
    server: NanonisServer,
    backend: FakeSpmBackend,
    ipc_dir: Path,
    zmq_ctx: zmq.Context,
    run_node: Any,
) -> None:
    """The node waits no longer than its config allows, and a sweep it gave up on is
    not left running at the controller."""
    node = run_node(
        _node(server, ipc_dir, zmq_ctx, watchdog_ms=5000, spectrum_timeout_s=0.1, io_timeout_s=0.1)
    )
    agent = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=10_000)
    try:
        agent.call("engage")
        agent.call("set_bias", {"bias_v": 0.5})
        sweep = {"x_um": 0, "y_um": 0, "bias_from_v": -1, "bias_to_v": 1, "points": 8}
        with pytest.raises(CommandError) as err:
            agent.call("spectrum", sweep)
        assert "not answered within 0.2 s (spectrum_timeout_s + io_timeout_s)" in str(err.value)
        assert "tip made safe" in str(err.value)
        assert not backend.z_on and backend.bias_v == 0.0
        state = agent.call("get_state").result
        assert state["busy"] == "" and state["link_ok"] is True  # a fresh link, in step
    finally:
        agent.close()


def test_a_node_whose_watchdog_link_cannot_open_fails_in_one_line(
    server: NanonisServer, ipc_dir: Path, zmq_ctx: zmq.Context
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(ConnectionError) as err:
        _node(server, ipc_dir, zmq_ctx, watchdog_port=closed_port, connect_timeout_s=1.0)
    message = str(err.value)
    assert "\n" not in message and f"127.0.0.1:{closed_port}" in message
    assert "watchdog link" in message and "watchdog_port" in message


def test_a_dropped_watchdog_link_is_reported_once_and_reopened(
    server: NanonisServer,
    backend: FakeSpmBackend,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(spm_watchdog, "PING_S", 0.0)  # every keep_alive pings
    host, port = server.address
    link = WatchdogLink(host, port, 1.0, 5.0, quick_timeout_s=5.0)
    link.open()
    try:
        link.keep_alive()  # answered: the controller has taken the connection
        assert link.up
        with server._conns_lock:  # the controller drops it (a restart, a cable)
            for conn in server._conns:
                conn.shutdown(socket.SHUT_RDWR)
        with caplog.at_level(logging.ERROR, logger="drivers.spm_watchdog"):
            link.keep_alive()  # the ping finds it gone
        assert not link.up and "lost" in link.error
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(lines) == 1 and f"{host}:{port}" in lines[0] and "\n" not in lines[0]
        link.keep_alive()  # the next check reopens it
        assert link.up and link.error == ""
        backend.z_on, backend.bias_v = True, 2.0
        link.make_safe(1000)
        assert not backend.z_on and backend.bias_v == 0.0
    finally:
        link.close()


def test_with_its_link_gone_the_watchdog_falls_back_to_the_node_thread_and_says_so(
    server: NanonisServer,
    backend: FakeSpmBackend,
    ipc_dir: Path,
    zmq_ctx: zmq.Context,
    run_node: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The watchdog link on a port of its own (as on a controller) that goes away: the
    loss is logged in one line per change, get_state says so, and a trip still makes the
    tip safe, from the node thread over the main link."""
    watchdog_port = NanonisServer(backend, "127.0.0.1", 0).start()
    node = run_node(_node(server, ipc_dir, zmq_ctx, watchdog_port=watchdog_port.address[1]))
    sub = StreamSubscriber(zmq_ctx, node.endpoints[0], topics=(EVENT_TOPIC, HEARTBEAT_TOPIC))
    agent = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=10_000)
    address = f"127.0.0.1:{watchdog_port.address[1]}"
    try:
        with caplog.at_level(logging.ERROR):
            agent.call("engage")
            agent.call("set_bias", {"bias_v": 0.5})
            watchdog_port.stop()  # the port goes away; the agent then falls silent
            events: list[dict[str, Any]] = []
            while not any(m.get("event") == "watchdog" for m in events):
                sub.recv_newest(50)
                events += [m for t, m in sub.take_messages() if t == EVENT_TOPIC]
        assert not backend.z_on and backend.bias_v == 0.0
        state = agent.call("get_state").result
        assert state["watchdog_tripped"] is True and state["watchdog_link_ok"] is False
        assert address in state["watchdog_link_error"] and "\n" not in state["watchdog_link_error"]
        lines = [r.getMessage() for r in caplog.records if r.name == "drivers.spm_watchdog"]
        assert lines and all(address in line and "\n" not in line for line in lines)
        assert len(lines) == len(set(lines))  # each change of state told once
    finally:
        agent.close()
        sub.close()
