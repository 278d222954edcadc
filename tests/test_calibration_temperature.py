"""The sample temperature travels from the driver to the live calibration: headers say it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import zmq

from drivers.config import DriverConfig
from drivers.mmcore_node import DriverNode
from drivers.serve import build_node
from drivers.transport import CommandClient, StreamSubscriber
from policies.calibration import simulate_ou
from policies.calibration.online import LiveCalibration
from policies.contract import Observation


def _state(node: DriverNode, ctx: zmq.Context) -> dict:
    client = CommandClient(ctx, node.endpoints[1], timeout_ms=3000)
    try:
        return client.call("get_state", timeout_ms=5000).result
    finally:
        client.close()


def test_twin_headers_carry_its_sample_temperature(
    make_node: Callable[[DriverConfig], DriverNode], zmq_ctx: zmq.Context
) -> None:
    config = DriverConfig.model_validate(
        {"twin": {"particles": {"temperature_k": 291.5}}, "temperature_k": 310.0}
    )
    node = make_node(config)
    _state(node, zmq_ctx)
    sub = StreamSubscriber(zmq_ctx, node.endpoints[0])
    try:
        frame = None
        for _ in range(100):
            frame = frame or sub.recv_newest(timeout_ms=100)
        assert frame is not None
        assert frame.header.state["temperature_k"] == 291.5  # the twin's, not the config's
        assert frame.header.state["temperature_source"] == "twin"
    finally:
        sub.close()


def test_rig_reads_the_named_sensor_property_else_says_it_uses_the_config(
    make_node: Callable[[DriverConfig], DriverNode], zmq_ctx: zmq.Context
) -> None:
    sensor = make_node(
        DriverConfig(kind="mmcore", mm_config="demo", temperature_property="Camera.CCDTemperature")
    )
    state = _state(sensor, zmq_ctx)
    celsius = float(sensor.core.getProperty("Camera", "CCDTemperature"))
    assert state["temperature_k"] == pytest.approx(celsius + 273.15)
    assert state["temperature_source"] == "property Camera.CCDTemperature"
    plain = make_node(DriverConfig(kind="mmcore", mm_config="demo", temperature_k=297.0))
    state = _state(plain, zmq_ctx)
    assert state["temperature_k"] == 297.0
    assert state["temperature_source"] == "config driver.temperature_k"


def test_a_misnamed_temperature_property_fails_at_start(zmq_ctx: zmq.Context) -> None:
    config = DriverConfig(kind="mmcore", mm_config="demo", temperature_property="Camera.Tmp")
    with pytest.raises(ValueError, match=r"driver\.temperature_property: 'Camera\.Tmp'"):
        build_node(config, ctx=zmq_ctx)


def test_live_calibration_takes_kt_at_the_reported_temperature() -> None:
    x = simulate_ou(20.0, 3000, 0.01, rng=1, dims=2, temperature_k=296.0)
    t = np.arange(3000) * 0.01
    default = LiveCalibration().update(x, t)
    live = LiveCalibration()
    live.temperature_k = 296.0  # what the twin's header says
    warm = live.update(x, t)
    assert default is not None and warm is not None
    ratio = warm.k[0].value / default.k[0].value
    assert ratio == pytest.approx(296.0 / 300.0, rel=1e-6)  # k = kT / variance
    obs = Observation.from_wire(1, 10, 0.01, [[1.0, 2.0]], (0, 0), None, (5, 5), None, None, 296)
    assert obs.temperature_k == 296.0
