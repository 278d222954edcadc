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


@pytest.fixture
def pycro_node(make_node: Callable[[DriverConfig], DriverNode]) -> Iterator[DriverNode]:
    from pycromanager import stop_headless

    node = make_node(DriverConfig(kind="pycromanager", mm_config="demo", exposure_ms=2.0))
    yield node
    node.stop.set()
    deadline = time.monotonic() + 10
    while node.server.socket.closed is False and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_headless()


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
