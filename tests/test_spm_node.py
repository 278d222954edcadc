"""SPM driver node against the Nanonis TCP server and its in-memory fake, over loopback."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from drivers.nanonis_server import FakeSpmBackend, NanonisLimits, NanonisServer
from drivers.protocol import EVENT_TOPIC, HEARTBEAT_TOPIC, Frame, Reply, decode_frame
from drivers.spm_config import SpmDriverConfig
from drivers.transport import CommandClient, CommandError, StreamSubscriber

pytest.importorskip("nanonis_spm")
from drivers.spm_node import SpmNode, nanonis_values  # after importorskip: needs nanonis_spm

pytestmark = pytest.mark.timeout(30)

MakeNode = Callable[..., SpmNode]


@pytest.fixture
def backend() -> FakeSpmBackend:
    return FakeSpmBackend(seed=1, scan_time_s=0.2)


@pytest.fixture
def server(backend: FakeSpmBackend) -> Iterator[NanonisServer]:
    with NanonisServer(backend, "127.0.0.1", 0) as srv:
        yield srv


@pytest.fixture
def sent(server: NanonisServer) -> list[str]:
    """Names of the Nanonis commands the controller received, in order."""
    names: list[str] = []
    handle = server.handle_message

    def recording(raw_name: bytes, body: bytes) -> bytes:
        names.append(raw_name.decode("ascii", "replace"))
        return handle(raw_name, body)

    server.handle_message = recording  # type: ignore[method-assign]
    return names


@pytest.fixture
def make_node(
    server: NanonisServer,
    ipc_dir: Path,
    zmq_ctx: zmq.Context,
    run_node: Callable[[SpmNode], SpmNode],
) -> MakeNode:
    numbers = itertools.count()

    def start(**overrides: Any) -> SpmNode:
        host, port = server.address
        n = next(numbers)
        settings: dict[str, Any] = {
            "stream_endpoint": f"ipc://{ipc_dir}/stream{n}",
            "command_endpoint": f"ipc://{ipc_dir}/command{n}",
            "nanonis_host": host,
            "nanonis_port": port,
            "watchdog_ms": 5000,
            "heartbeat_ms": 20,
            "state_poll_ms": 0,
            **overrides,
        }
        return run_node(SpmNode(SpmDriverConfig(**settings), ctx=zmq_ctx))

    return start


@pytest.fixture
def node(make_node: MakeNode) -> SpmNode:
    return make_node()


@pytest.fixture
def client(node: SpmNode, zmq_ctx: zmq.Context) -> Iterator[CommandClient]:
    c = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=5000)
    c.call("get_state")  # the node has finished its start-up safe state
    yield c
    c.close()


def _subscriber(ctx: zmq.Context, node: SpmNode, topic: bytes) -> StreamSubscriber:
    """A subscriber that has provably joined (it received a heartbeat)."""
    sub = StreamSubscriber(ctx, node.endpoints[0], topics=(topic, HEARTBEAT_TOPIC))
    deadline = time.monotonic() + 5
    while not any(t == HEARTBEAT_TOPIC for t, _ in sub.take_messages()):
        assert time.monotonic() < deadline, "no heartbeat"
        sub.recv_newest(50)
    return sub


def _frame(sub: StreamSubscriber, timeout_s: float = 5.0) -> Frame:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = sub.recv_newest(50)
        if frame is not None:
            return frame
    raise AssertionError("no frame")


# ------------------------------------------------------------------ helpers


def test_nanonis_values_turns_errors_into_runtime_errors() -> None:
    assert nanonis_values("Bias.Get", ("", b"", [1.5])) == [1.5]
    with pytest.raises(RuntimeError, match=r"Nanonis Bias.Set failed: Bias.Set: boom now"):
        nanonis_values("Bias.Set", ("Bias.Set: boom\nnow", b"", []))
    with pytest.raises(RuntimeError, match=r"Nanonis Scan\.StatusGet: no reply"):
        nanonis_values("Scan.StatusGet", ())


# ------------------------------------------------------------------ start and state


def test_start_makes_safe_and_get_state_reports(
    client: CommandClient, backend: FakeSpmBackend
) -> None:
    assert backend.bias_v == 0.0 and not backend.z_on  # fake starts at 0.1 V, approached
    result = client.call("get_state").result
    assert result["bias_v"] == 0.0 and result["z_controller_on"] is False
    assert result["scan_running"] is False and result["link_ok"] is True
    assert result["limits"]["bias_v"] == [-10.0, 10.0]
    assert result["limits"]["x_um"] == [-5.0, 5.0]
    assert result["z_um"] == pytest.approx(backend.z_withdrawn_m * 1e6)


def test_unreachable_controller_names_host_and_port(zmq_ctx: zmq.Context) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    config = SpmDriverConfig(
        nanonis_port=port,
        connect_timeout_s=0.5,
        stream_endpoint="inproc://s",
        command_endpoint="inproc://c",
    )
    with pytest.raises(ConnectionError, match=rf"Nanonis controller at 127\.0\.0\.1:{port}"):
        SpmNode(config, ctx=zmq_ctx)


# ------------------------------------------------------------------ move and bias


def test_move_and_bias_within_limits_are_applied(
    client: CommandClient, backend: FakeSpmBackend
) -> None:
    assert client.call("move_tip", {"x_um": 1.5, "y_um": -2.25}).result == {"tip_um": [1.5, -2.25]}
    assert backend.tip_xy_m == pytest.approx((1.5e-6, -2.25e-6))
    assert client.call("set_bias", {"bias_v": 2.5}).result == {"bias_v": 2.5}
    assert backend.bias_v == pytest.approx(2.5)
    state = client.call("get_state").result
    assert state["bias_v"] == pytest.approx(2.5)
    assert state["tip_um"] == pytest.approx([1.5, -2.25])


@pytest.mark.parametrize(
    ("cmd", "args", "field", "rng"),
    [
        ("set_bias", {"bias_v": 10.5}, "bias_v", "[-10, 10] V"),
        ("move_tip", {"x_um": 0.0, "y_um": -6.0}, "y_um", "[-5, 5] um"),
        (
            "scan",
            {
                "x_um": 0,
                "y_um": 0,
                "width_um": 1,
                "height_um": 1,
                "pixels": 2048,
                "lines": 8,
                "channels": ["Z"],
            },
            "pixels",
            "[1, 1024] pixels",
        ),
        (
            "spectrum",
            {"x_um": 0, "y_um": 0, "bias_from_v": -12, "bias_to_v": 1, "points": 10},
            "bias_from_v",
            "[-10, 10] V",
        ),
        (
            "spectrum",
            {"x_um": 0, "y_um": 0, "bias_from_v": -1, "bias_to_v": 1, "points": 5000},
            "points",
            "[2, 4096] points",
        ),
    ],
)
def test_out_of_limits_refused_and_nothing_sent(
    client: CommandClient,
    backend: FakeSpmBackend,
    sent: list[str],
    cmd: str,
    args: dict[str, Any],
    field: str,
    rng: str,
) -> None:
    sent.clear()
    with pytest.raises(CommandError) as err:
        client.call(cmd, args)
    assert err.value.code == "out_of_limits"
    assert f"field '{field}'" in str(err.value) and rng in str(err.value)
    assert sent == []
    assert backend.bias_v == 0.0 and backend.tip_xy_m == (0.0, 0.0)
    client.call("get_state")
    assert "Bias.Get" in sent  # the recorder does see what reaches the controller


def test_scan_frame_outside_limits_refused(client: CommandClient, sent: list[str]) -> None:
    sent.clear()
    args = {"x_um": 4.5, "y_um": 0, "width_um": 2, "height_um": 1, "pixels": 8, "lines": 8,
            "channels": ["Z"]}  # fmt: skip
    with pytest.raises(CommandError, match=r"frame x span \[3.5, 5.5\] um.*\[-5, 5\] um") as err:
        client.call("scan", args)
    assert err.value.code == "out_of_limits"
    # Rotated, the frame reaches further out in x: still refused.
    with pytest.raises(CommandError, match="frame x span"):
        client.call("scan", {**args, "angle_deg": 10})
    assert sent == []


# ------------------------------------------------------------------ scan


def test_scan_publishes_one_frame_per_channel(
    client: CommandClient, node: SpmNode, backend: FakeSpmBackend, zmq_ctx: zmq.Context
) -> None:
    subs = {
        name: _subscriber(zmq_ctx, node, f"frame/scan/{name}".encode()) for name in ("Z", "Phase")
    }
    args = {"x_um": 1.0, "y_um": -0.5, "width_um": 2.0, "height_um": 1.0, "pixels": 48,
            "lines": 32, "angle_deg": 0, "channels": ["Z", "Phase (deg)"]}  # fmt: skip
    reply = client.call("scan", args, timeout_ms=10_000).result
    assert reply["streams"] == ["scan/Z", "scan/Phase"]
    assert reply["shape"] == [32, 48]
    assert backend.frame.width_m == pytest.approx(2e-6)
    assert backend.buffer.pixels == 48 and backend.buffer.lines == 32
    for name, unit in (("Z", "um"), ("Phase", "deg")):
        frame = _frame(subs[name])
        assert frame.header.stream == f"scan/{name}"
        assert frame.header.seq == reply["seqs"][name]
        assert frame.data.shape == (32, 48) and frame.data.dtype == np.float32
        assert frame.header.state["channel"] == name and frame.header.state["units"] == unit
        assert frame.header.state["window"]["width_um"] == 2.0
        assert frame.header.t_exposure_end_ns - frame.header.t_exposure_start_ns >= 0.15e9
        assert frame.data.std() > 0
        subs[name].close()
    # Z arrives in um: the fake's plane is a few nm around 5 nm.
    state = client.call("get_state").result
    assert state["scan_running"] is False and state["scans_done"] == 1


def test_scan_unknown_channel_is_bad_args(client: CommandClient) -> None:
    args = {"x_um": 0, "y_um": 0, "width_um": 1, "height_um": 1, "pixels": 8, "lines": 8,
            "channels": ["Nope"]}  # fmt: skip
    with pytest.raises(CommandError, match=r"channels\[0\]' = 'Nope' is not one of") as err:
        client.call("scan", args)
    assert err.value.code == "bad_args"


def test_withdraw_aborts_a_running_scan(
    node: SpmNode, client: CommandClient, backend: FakeSpmBackend, zmq_ctx: zmq.Context
) -> None:
    backend.scan_time_s = 5.0
    args = {"x_um": 0, "y_um": 0, "width_um": 1, "height_um": 1, "pixels": 8, "lines": 8,
            "channels": ["Z"]}  # fmt: skip
    scan_id = client.send("scan", args)
    other = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=2000)
    try:
        deadline = time.monotonic() + 3
        while not backend.scan_running():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = other.call("get_state").result  # served while the scan runs
        assert busy["busy"] == "scan" and busy["scan_running"] is True
        with pytest.raises(CommandError, match="refused while a scan is in progress"):
            other.call("set_bias", {"bias_v": 1.0})
        other.call("withdraw")
    finally:
        other.close()
    assert not backend.scan_running() and not backend.z_on
    assert client.socket.poll(3000)  # the scan's own reply, after the withdraw
    got = Reply.from_wire(client.socket.recv())
    assert got.id == scan_id and not got.ok and got.error_code == "device_error"
    assert "aborted by withdraw" in got.error_message


# ------------------------------------------------------------------ spectrum


def test_spectrum_publishes_curves_and_waveform(
    client: CommandClient, node: SpmNode, backend: FakeSpmBackend, zmq_ctx: zmq.Context
) -> None:
    sub = _subscriber(zmq_ctx, node, b"frame/spectrum")
    args = {"x_um": 1.0, "y_um": -1.0, "bias_from_v": -3.0, "bias_to_v": 3.0, "points": 64,
            "sweeps": 1, "backward": True}  # fmt: skip
    reply = client.call("spectrum", args, timeout_ms=10_000).result
    assert backend.tip_xy_m == pytest.approx((1e-6, -1e-6))
    np.testing.assert_allclose(reply["waveform_v"], np.linspace(-3, 3, 64), atol=1e-5)
    assert reply["channels"] == [
        "Bias calc",
        "Amplitude",
        "Phase",
        "Amplitude [bwd]",
        "Phase [bwd]",
    ]
    assert reply["units"] == ["V", "um", "deg", "um", "deg"]
    frame = _frame(sub)
    assert frame.header.stream == "spectrum" and frame.header.seq == reply["seq"]
    assert frame.data.shape == (5, 64) and frame.data.dtype == np.float32
    assert frame.header.state["channels"] == reply["channels"]
    np.testing.assert_allclose(frame.data[0], reply["waveform_v"])
    # Hysteresis survives the trip: at 0 V the branches hold opposite phases.
    assert abs(frame.data[2, 32] - frame.data[4, 32]) > 90
    sub.close()

    without = client.call("spectrum", {**args, "backward": False, "points": 16}).result
    assert without["shape"] == [3, 16]


# ------------------------------------------------------------------ errors and safety


def test_nanonis_error_is_device_error_and_node_keeps_serving(
    client: CommandClient, backend: FakeSpmBackend
) -> None:
    def boom(bias_v: float) -> None:
        raise RuntimeError("HV amplifier offline")

    original = backend.set_bias
    backend.set_bias = boom  # type: ignore[method-assign]
    with pytest.raises(CommandError) as err:
        client.call("set_bias", {"bias_v": 1.0})
    assert err.value.code == "device_error"
    assert "Nanonis Bias.Set failed" in str(err.value) and "HV amplifier offline" in str(err.value)
    backend.set_bias = original  # type: ignore[method-assign]
    assert client.call("move_tip", {"x_um": 0.5, "y_um": 0.5}).result["tip_um"] == [0.5, 0.5]
    assert client.call("set_bias", {"bias_v": 1.0}).result == {"bias_v": 1.0}
    assert client.call("get_state").result["commands_rejected"] >= 1


def test_watchdog_withdraws_and_zeroes_bias(
    make_node: MakeNode, backend: FakeSpmBackend, zmq_ctx: zmq.Context
) -> None:
    node = make_node(watchdog_ms=200, state_poll_ms=50)
    sub = _subscriber(zmq_ctx, node, EVENT_TOPIC)
    agent = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=2000)
    try:
        backend.z_on, backend.z_m = True, 5e-9  # an operator approached the tip
        agent.call("set_bias", {"bias_v": 1.5})
        t_last = time.monotonic()
        assert backend.bias_v == pytest.approx(1.5)
        deadline = t_last + 0.2 + 0.5
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not (events and backend.bias_v == 0.0):
            sub.recv_newest(20)
            events += [
                m
                for t, m in sub.take_messages()
                if t == EVENT_TOPIC and m["event"] == "watchdog"  # not "control"
            ]
        elapsed = time.monotonic() - t_last
        assert backend.bias_v == 0.0 and not backend.z_on
        assert backend.z_m == pytest.approx(backend.z_withdrawn_m)
        assert events and events[0]["event"] == "watchdog"
        assert 0.18 <= elapsed < 0.7
        state = agent.call("get_state").result
        assert state["watchdog_tripped"] is True and state["bias_v"] == 0.0
    finally:
        agent.close()
        sub.close()


def test_scan_timeout_stops_the_scan(
    make_node: MakeNode, backend: FakeSpmBackend, zmq_ctx: zmq.Context
) -> None:
    backend.scan_time_s = 10.0
    node = make_node(scan_line_timeout_s=0.02, scan_timeout_margin_s=0.0)
    agent = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=5000)
    args = {"x_um": 0, "y_um": 0, "width_um": 1, "height_um": 1, "pixels": 8, "lines": 10,
            "channels": ["Z"]}  # fmt: skip
    try:
        with pytest.raises(CommandError, match=r"not finished within 0.2 s.*scan stopped") as err:
            agent.call("scan", args)
        assert err.value.code == "device_error"
        assert not backend.scan_running()
        assert agent.call("get_state").result["scan_running"] is False
    finally:
        agent.close()


def test_lost_controller_is_device_error_naming_it(
    client: CommandClient, server: NanonisServer
) -> None:
    host, port = server.address
    server.stop()
    with pytest.raises(CommandError, match=rf"{host}:{port}") as err:
        client.call("set_bias", {"bias_v": 1.0})
    assert err.value.code == "device_error"
    state = client.call("get_state").result  # still serving, and says the link is down
    assert state["link_ok"] is False and f"{host}:{port}" in state["link_error"]


def test_long_spectrum_does_not_trip_the_watchdog_while_the_agent_heartbeats(
    make_node: MakeNode, backend: FakeSpmBackend, zmq_ctx: zmq.Context
) -> None:
    """An agent waiting on a sweep's reply keeps talking; only silence trips the watchdog
    (the silent case: tests/test_spm_watchdog.py)."""
    backend.sweep_duration_s = 0.4  # on the wall clock, the server lock released
    node = make_node(watchdog_ms=200)
    agent = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=5000)
    try:
        agent.call("set_bias", {"bias_v": 0.5})
        args = {"x_um": 0, "y_um": 0, "bias_from_v": -1, "bias_to_v": 1, "points": 8}
        request = agent.send("spectrum", args)
        while not agent.socket.poll(50):
            agent.send("heartbeat", reply=False)
        assert agent.take_reply(request, "spectrum") is not None
        state = agent.call("get_state").result
        assert state["watchdog_tripped"] is False and backend.bias_v == pytest.approx(0.5)
    finally:
        agent.close()


# ------------------------------------------------------------------ bulk-data fast path


@pytest.fixture
def bare_node(server: NanonisServer, ipc_dir: Path, zmq_ctx: zmq.Context) -> Iterator[SpmNode]:
    """A node that is not serving: the test thread may call Nanonis through it."""
    host, port = server.address
    config = SpmDriverConfig(
        stream_endpoint=f"ipc://{ipc_dir}/bare-stream",
        command_endpoint=f"ipc://{ipc_dir}/bare-command",
        nanonis_host=host,
        nanonis_port=port,
    )
    node = SpmNode(config, ctx=zmq_ctx)
    yield node
    node.teardown()
    node.publisher.close()
    node.server.close()


def test_bulk_scan_frames_equal_the_vendor_decode(
    bare_node: SpmNode, backend: FakeSpmBackend
) -> None:
    node = bare_node
    backend.scan_time_s = 0.0
    node.nanonis("Scan.FrameSet", 0.5e-6, -0.5e-6, 2e-6, 1e-6, 0.0)
    node.nanonis("Scan.BufferSet", [1, 5, 6], 24, 16)
    node.nanonis("Scan.Action", 0, 1)
    assert not node.nanonis("Scan.StatusGet")[0]
    grab = backend.grab_scan_frame
    grabbed: dict[tuple[int, bool], Any] = {}  # the fake adds fresh noise to every grab

    def same_frame(channel_index: int, forward: bool) -> Any:
        key = (channel_index, forward)
        if key not in grabbed:
            grabbed[key] = grab(*key)
        return grabbed[key]

    backend.grab_scan_frame = same_frame  # type: ignore[method-assign]
    for index in (1, 5, 6):
        for forward in (1, 0):
            slow = node.nanonis("Scan.FrameDataGrab", index, forward)
            fast = node.nanonis_fast("Scan.FrameDataGrab", index, forward)
            assert fast[:4] == slow[:4] and fast[5] == slow[5]
            assert fast[2:4] == [16, 24] and fast[4].dtype == np.float32
            np.testing.assert_array_equal(fast[4], np.asarray(slow[4], np.float32))
    assert node.nanonis("Bias.Get")[0] == pytest.approx(backend.bias_v)  # still in step


def test_bulk_spectrum_equals_the_vendor_decode(
    bare_node: SpmNode, backend: FakeSpmBackend
) -> None:
    node = bare_node
    node.nanonis("BiasSpectr.Open")
    node.nanonis("BiasSpectr.PropsSet", 0, 1, 1, 32, 0.0, 2, 2)
    node.nanonis("BiasSpectr.LimitsSet", -2.0, 2.0)
    result = backend.run_bias_spectroscopy("")
    backend.run_bias_spectroscopy = lambda _name: result  # type: ignore[method-assign]
    slow = node.nanonis("BiasSpectr.Start", 1, "")
    fast = node.nanonis_fast("BiasSpectr.Start", 1, "")
    assert fast[:5] == slow[:5]  # names: byte size, count, names; rows, columns
    assert fast[3:5] == [5, 32] and fast[5].dtype == np.float32
    np.testing.assert_array_equal(fast[5], np.asarray(slow[5], np.float32))
    assert fast[6] == len(result.parameters)
    np.testing.assert_allclose(fast[7], result.parameters, rtol=1e-6)
    assert node.nanonis("Bias.Get")[0] == pytest.approx(backend.bias_v)  # still in step


def test_bulk_errors_are_device_errors_and_the_link_stays_in_step(
    client: CommandClient, backend: FakeSpmBackend
) -> None:
    def no_frame(channel_index: int, forward: bool) -> Any:
        raise RuntimeError("frame buffer empty")

    def no_sweep(save_base_name: str) -> Any:
        raise RuntimeError("spectroscopy module closed")

    backend.scan_time_s = 0.0
    backend.grab_scan_frame = no_frame  # type: ignore[method-assign]
    backend.run_bias_spectroscopy = no_sweep  # type: ignore[method-assign]
    scan = {"x_um": 0, "y_um": 0, "width_um": 1, "height_um": 1, "pixels": 8, "lines": 4,
            "channels": ["Z"]}  # fmt: skip
    with pytest.raises(CommandError, match=r"Nanonis Scan\.FrameDataGrab failed") as err:
        client.call("scan", scan)
    assert err.value.code == "device_error" and "frame buffer empty" in str(err.value)
    spectrum = {"x_um": 0, "y_um": 0, "bias_from_v": -1, "bias_to_v": 1, "points": 8}
    with pytest.raises(CommandError, match=r"Nanonis BiasSpectr\.Start failed") as err:
        client.call("spectrum", spectrum)
    assert err.value.code == "device_error" and "spectroscopy module closed" in str(err.value)
    state = client.call("get_state").result
    assert state["link_ok"] is True and state["scan_running"] is False
    assert client.call("set_bias", {"bias_v": 1.0}).result == {"bias_v": 1.0}


# ------------------------------------------------------------------ spectra batches


@pytest.fixture
def stream(node: SpmNode, zmq_ctx: zmq.Context) -> Iterator[StreamSubscriber]:
    sub = _subscriber(zmq_ctx, node, b"frame/spectrum")
    yield sub
    sub.close()


def _frames(sub: StreamSubscriber, topic: str, count: int) -> list[Frame]:
    """Every frame on `topic`, in order (recv_newest would keep only the last)."""
    frames: list[Frame] = []
    deadline = time.monotonic() + 5
    while len(frames) < count and time.monotonic() < deadline:
        if sub.socket.poll(50):
            parts = sub.socket.recv_multipart(copy=False)
            if bytes(parts[0].buffer) == topic.encode():
                frames.append(decode_frame(parts))
    assert len(frames) == count, f"{len(frames)} of {count} frames on {topic}"
    return frames


def _sweep(**extra: Any) -> dict[str, Any]:
    return {"bias_from_v": -1.0, "bias_to_v": 1.0, "points": 16, "backward": False, **extra}


def test_spectra_batch_publishes_one_frame_per_position_in_order(
    client: CommandClient, stream: StreamSubscriber, sent: list[str]
) -> None:
    positions = [[0.1, 0.2], [-0.3, 0.4], [0.5, -0.6]]
    reply = client.call("spectra", _sweep(positions_um=positions)).result
    assert reply["positions_um"] == positions and len(reply["seqs"]) == 3
    frames = _frames(stream, "frame/spectrum", 3)
    assert [f.header.seq for f in frames] == reply["seqs"]
    assert [f.header.state["position_um"] for f in frames] == positions
    # Every sweep only after its move; the sweep settings sent once for the batch.
    moves_and_sweeps = [n for n in sent if n in ("FolMe.XYPosSet", "BiasSpectr.Start")]
    assert moves_and_sweeps == ["FolMe.XYPosSet", "BiasSpectr.Start"] * 3
    assert sent.count("BiasSpectr.PropsSet") == 1
    client.call("spectra", _sweep(positions_um=[[0.0, 0.0]]))
    assert sent.count("BiasSpectr.PropsSet") == 1  # unchanged settings: not re-sent
    client.call("spectra", _sweep(positions_um=[[0.0, 0.0]], points=32))
    assert sent.count("BiasSpectr.PropsSet") == 2


def test_spectra_position_out_of_limits_refused_before_any_move(
    client: CommandClient, sent: list[str]
) -> None:
    before = len(sent)
    with pytest.raises(CommandError, match=r"positions_um\[1\].*x_um") as err:
        client.call("spectra", _sweep(positions_um=[[0.0, 0.0], [99.0, 0.0]]))
    assert err.value.code == "out_of_limits"
    assert "FolMe.XYPosSet" not in sent[before:]
    with pytest.raises(CommandError, match=r"positions_um") as err:
        client.call("spectra", _sweep(positions_um=[[0.0]]))
    assert err.value.code == "bad_args"
    with pytest.raises(CommandError, match=r"positions_um.*1 to") as err:
        client.call("spectra", _sweep(positions_um=[]))
    assert err.value.code == "bad_args"


def test_spectra_failing_sweep_keeps_earlier_spectra_and_the_link_in_step(
    client: CommandClient, backend: FakeSpmBackend, stream: StreamSubscriber
) -> None:
    sweep = backend.run_bias_spectroscopy
    calls = itertools.count()

    def third_fails(save_base_name: str) -> Any:
        if next(calls) == 2:
            raise RuntimeError("lock-in overload")
        return sweep(save_base_name)

    backend.run_bias_spectroscopy = third_fails  # type: ignore[method-assign]
    positions = [[0.1 * i, 0.0] for i in range(5)]
    with pytest.raises(CommandError, match="lock-in overload") as err:
        client.call("spectra", _sweep(positions_um=positions))
    assert err.value.code == "device_error"
    frames = _frames(stream, "frame/spectrum", 2)
    assert [f.header.state["position_um"] for f in frames] == positions[:2]
    assert client.call("spectrum", _sweep(x_um=0.0, y_um=0.0)).result["seq"] > 0


def test_queued_move_refused_by_the_controller_drops_the_sweep_behind_it(
    server: NanonisServer, make_node: MakeNode, zmq_ctx: zmq.Context, sent: list[str]
) -> None:
    """The controller's range is narrower than the driver's limits: the queued sweep behind
    the refused move runs at the previous point, so it must not be published as the new
    one; the earlier spectra stay published and the link stays in step."""
    server.limits = NanonisLimits(xy_m=(-0.3e-6, 0.3e-6))
    node = make_node(spectra_queued=1)
    sub = _subscriber(zmq_ctx, node, b"frame/spectrum")
    client = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=5000)
    try:
        positions = [[0.0, 0.0], [0.1, 0.0], [0.5, 0.0], [0.0, 0.1]]
        with pytest.raises(
            CommandError, match=r"move to positions_um\[2\] failed after 2 of 4.*2 point"
        ):
            client.call("spectra", _sweep(positions_um=positions))
        frames = _frames(sub, "frame/spectrum", 2)
        assert [f.header.state["position_um"] for f in frames] == positions[:2]
        # The sweep at the wrong place was not published (heartbeats may arrive).
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            if sub.socket.poll(50):
                assert sub.socket.recv_multipart()[0] != b"frame/spectrum"
        # The controller ran the queued sweeps (the one at the wrong place and the next
        # point's): that is the cost of queuing, and both were dropped.
        assert sent.count("BiasSpectr.Start") == 4
        assert client.call("spectrum", _sweep(x_um=0.2, y_um=0.0)).result["seq"] == 2
    finally:
        client.close()
        sub.close()


def test_without_queuing_a_refused_move_runs_no_sweep(
    server: NanonisServer, make_node: MakeNode, zmq_ctx: zmq.Context, sent: list[str]
) -> None:
    """spectra_queued=0: a sweep goes out only once its move was answered, so a refused
    move costs no sweep at the wrong place."""
    server.limits = NanonisLimits(xy_m=(-0.3e-6, 0.3e-6))
    node = make_node(spectra_queued=0)
    client = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=5000)
    try:
        positions = [[0.0, 0.0], [0.1, 0.0], [0.5, 0.0], [0.0, 0.1]]
        with pytest.raises(CommandError, match=r"move to positions_um\[2\] failed after 2 of 4"):
            client.call("spectra", _sweep(positions_um=positions))
        assert sent.count("BiasSpectr.Start") == 2
        assert client.call("spectra", _sweep(positions_um=[[0.2, 0.0]] * 3)).result["seqs"] == [
            2,
            3,
            4,
        ]
    finally:
        client.close()


def test_withdraw_aborts_a_spectra_batch_between_points(
    make_node: MakeNode, backend: FakeSpmBackend, zmq_ctx: zmq.Context
) -> None:
    sweep = backend.run_bias_spectroscopy

    def slow(save_base_name: str) -> Any:
        time.sleep(0.15)
        return sweep(save_base_name)

    backend.run_bias_spectroscopy = slow  # type: ignore[method-assign]
    node = make_node()
    agent = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=10_000)
    operator = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=10_000)
    try:
        agent.call("set_bias", {"bias_v": 0.5})
        request = agent.send("spectra", _sweep(positions_um=[[0.0, 0.0]] * 20))
        time.sleep(0.4)
        busy = operator.call("get_state").result  # served between the points
        assert busy["busy"] == "spectra"
        operator.call("withdraw")
        assert agent.socket.poll(5000)
        reply = Reply.from_wire(agent.socket.recv())
        assert reply.id == request and not reply.ok and reply.error_code == "device_error"
        assert "aborted by withdraw" in reply.error_message
        done = int(reply.error_message.split("after ")[1].split(" of")[0])
        assert 1 <= done < 20
        assert backend.bias_v == 0.0 and not backend.z_on
    finally:
        agent.close()
        operator.close()


# ------------------------------------------------------------------ signal slots


def test_scan_channels_map_through_the_signals_manager_slots(
    backend: FakeSpmBackend, ipc_dir: Path, zmq_ctx: zmq.Context, run_node: Callable[..., SpmNode]
) -> None:
    """A real controller numbers scan channels by slot, not by signal: with slots assigned
    in another order than Signals.NamesGet, the node must still grab the asked signal."""
    backend.scan_time_s = 0.0
    slots = [6, 1, 5, 0]  # Phase, Z, Amplitude, Current in slots 0..3
    with NanonisServer(backend, "127.0.0.1", 0, slots=slots) as server:
        host, port = server.address
        node = run_node(
            SpmNode(
                SpmDriverConfig(
                    stream_endpoint=f"ipc://{ipc_dir}/slots-stream",
                    command_endpoint=f"ipc://{ipc_dir}/slots-command",
                    nanonis_host=host,
                    nanonis_port=port,
                    watchdog_ms=5000,
                    state_poll_ms=0,
                ),
                ctx=zmq_ctx,
            )
        )
        client = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=5000)
        sub = _subscriber(zmq_ctx, node, b"frame/scan/")
        try:
            args = {"x_um": 0, "y_um": 0, "width_um": 1, "height_um": 1, "pixels": 16,
                    "lines": 8, "channels": ["Z", "Phase"]}  # fmt: skip
            client.call("scan", args)
            assert backend.buffer.channel_indexes == (1, 6)  # signals, via slots 1 and 0
            frames = _frames(sub, "frame/scan/Z", 1) + _frames(sub, "frame/scan/Phase", 1)
            assert [f.header.state["slot"] for f in frames] == [1, 0]
            assert [f.header.state["grabbed_channel"] for f in frames] == ["Z (m)", "Phase (deg)"]
            with pytest.raises(CommandError, match=r"channels\[0\].*'Bias'.*not one of"):
                client.call("scan", {**args, "channels": ["Bias"]})  # not in any slot
        finally:
            sub.close()
            client.close()
