"""The pycromanager driver (its Python backend on mm-test-adapters) behind protocol v1."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from drivers.config import DriverConfig
from drivers.mmcore_node import DriverNode
from drivers.protocol import FRAME_PREFIX, decode_frame
from drivers.pycromanager_node import CamelCore, PycromanagerNode, start_python_backend
from drivers.transport import CommandClient, CommandError


def _stop_backend() -> None:
    """Stop the headless backend so the next test can start one: pycromanager 1.0.2 keeps
    its shut-down acquisition engine as the singleton, which a new start would reuse."""
    from pycromanager import stop_headless
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

    stop_headless()
    if hasattr(Engine, "singleton"):
        del Engine.singleton


@pytest.fixture
def pycro_node(make_node: Callable[[DriverConfig], DriverNode]) -> Iterator[DriverNode]:
    node = make_node(DriverConfig(kind="pycromanager", mm_config="demo", exposure_ms=2.0))
    yield node
    node.stop.set()
    deadline = time.monotonic() + 10
    while node.server.socket.closed is False and time.monotonic() < deadline:
        time.sleep(0.05)
    _stop_backend()


def test_camel_core_maps_mmcore_names_to_pycromanager_snake_case() -> None:
    class Snake:
        def get_xy_stage_device(self) -> str:
            return "XY"

        def set_exposure(self, value: float) -> float:
            return value

    core = CamelCore(Snake())
    assert core.getXYStageDevice() == "XY"
    assert core.setExposure(3.0) == 3.0


def test_pycromanager_node_streams_and_runs_commands_and_events(
    pycro_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    assert isinstance(pycro_node, PycromanagerNode)
    client = CommandClient(zmq_ctx, pycro_node.endpoints[1], timeout_ms=5000)
    sub = zmq_ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, FRAME_PREFIX)
    sub.connect(pycro_node.endpoints[0])
    try:
        state = client.call("get_state", timeout_ms=10_000).result
        assert state["backend"] == "pycromanager" and state["exposure_ms"] == pytest.approx(2.0)
        assert sub.poll(5000)
        live = decode_frame(sub.recv_multipart())
        assert live.data.shape == (512, 512) and "event" not in live.header.state

        assert client.call("move_stage", {"x_um": 7.0, "y_um": 3.0}).result["stage_um"] == [
            7.0,
            3.0,
        ]
        with pytest.raises(CommandError) as unknown:
            client.call("set_property", {"device": "Toaster", "property": "Heat", "value": 1})
        assert unknown.value.code == "bad_args" and "Toaster" in str(unknown.value)
        with pytest.raises(CommandError) as far:
            client.call("submit_events", {"events": [{"x_pos": 1e7}]})
        assert far.value.code == "out_of_limits"

        events = [
            {"x_pos": 10.0 + i, "exposure": 1.0, "index": {"p": i}, "metadata": {"k": i}}
            for i in range(3)
        ]
        ids = client.call("submit_events", {"events": events}).result["ids"]
        got = {}
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            if sub.poll(100):
                frame = decode_frame(sub.recv_multipart())
                event = frame.header.state.get("event")
                if event is not None:
                    got[event["id"]] = event
        assert sorted(got) == ids
        assert [got[i]["metadata"] for i in ids] == [{"k": 0}, {"k": 1}, {"k": 2}]
        assert pycro_node.core.getXYPosition()[0] == pytest.approx(12.0, abs=0.01)
    finally:
        client.close()
        sub.close()


def test_missing_config_for_pycromanager_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"driver\.mm_config: file .* does not exist"):
        start_python_backend(str(tmp_path / "none.cfg"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _event_frames(sub: zmq.Socket, seconds: float) -> list[int]:
    ids, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sub.poll(100):
            event = decode_frame(sub.recv_multipart()).header.state.get("event")
            if event is not None:
                ids.append(int(event["id"]))
    return ids


def test_attach_uses_the_running_micro_manager_and_stop_events_stops_it(
    make_node: Callable[[DriverConfig], DriverNode],
    zmq_ctx: zmq.Context,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Micro-Manager already running (the headless backend started here stands in for
    the GUI) is attached to, never started again; stop_events aborts its acquisition."""
    from mmpycorex import launcher

    import drivers.pycromanager_node as pn

    gui = start_python_backend("demo")

    def second_start(*_args: object) -> None:
        raise AssertionError("attach started a second Micro-Manager")

    monkeypatch.setattr(pn, "start_python_backend", second_start)
    config = DriverConfig(
        kind="pycromanager", exposure_ms=2.0, pycromanager={"attach": True, "port": _free_port()}
    )
    node = make_node(config)
    client = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=20_000)
    sub = zmq_ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, FRAME_PREFIX)
    sub.connect(node.endpoints[0])
    try:
        cores, same = len(launcher._PYMMCORES), node.core._core is gui  # no core reprs
        assert (cores, same) == (1, True)
        assert sub.poll(5000)  # live frames through the attached core
        events = [{"exposure": 100.0, "index": {"t": i}} for i in range(40)]
        ids = client.call("submit_events", {"events": events}).result["ids"]
        reply = client.call("stop_events").result
        assert reply["running"] is False and reply["cancelled"]
        got = _event_frames(sub, 2.0)
        assert len(set(got) & set(ids)) < len(ids)  # the rest of the 4 s series never ran
        # the node keeps serving: a new event runs on the fresh acquisition
        again = client.call("submit_events", {"events": [{"exposure": 2.0}]}).result["ids"]
        assert again[0] in _event_frames(sub, 5.0)
    finally:
        client.close()
        sub.close()
        node.stop.set()
        deadline = time.monotonic() + 10
        while node.server.socket.closed is False and time.monotonic() < deadline:
            time.sleep(0.05)
        _stop_backend()


def test_attach_to_a_port_nobody_listens_on_fails_in_one_line_naming_it() -> None:
    from drivers.config import PycromanagerSettings
    from drivers.pycromanager_node import attach_running

    _stop_backend()  # no backend in this process: the GUI's port is the only way in
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(ValueError) as err:
        attach_running(PycromanagerSettings(attach=True, port=port))
    assert time.monotonic() - t0 < 5.0
    message = str(err.value)
    assert "\n" not in message and f"localhost:{port}" in message
    assert message.startswith("driver.pycromanager.port:")
