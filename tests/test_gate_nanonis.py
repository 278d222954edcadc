"""The Nanonis twin server's bounds: connections capped, idle ones dropped, every numeric
setting ranged, and a request that would run too long refused (issue 16)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from drivers.nanonis_server import FakeSpmBackend, NanonisLimits, NanonisServer

nanonis_spm = pytest.importorskip("nanonis_spm")
Nanonis = nanonis_spm.Nanonis

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def backend() -> FakeSpmBackend:
    return FakeSpmBackend(seed=1)


@pytest.fixture
def server(backend: FakeSpmBackend) -> Iterator[NanonisServer]:
    limits = NanonisLimits(max_connections=3, idle_timeout_s=0.3, max_request_s=60.0)
    with NanonisServer(backend, "127.0.0.1", 0, limits=limits) as srv:
        yield srv


def _client(srv: NanonisServer) -> tuple[socket.socket, Nanonis]:
    sock = socket.create_connection(srv.address, timeout=5)
    return sock, Nanonis(sock)


def _closed_by_server(sock: socket.socket, timeout_s: float = 5.0) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_num_sweeps_2_31_is_refused_and_the_lock_stays_free(
    server: NanonisServer, backend: FakeSpmBackend
) -> None:
    sock, client = _client(server)
    try:
        client.BiasSpectr_Open()
        err, _, _ = client.BiasSpectr_PropsSet(0, 2**31 - 1, 1, 101, 0.0, 2, 2)
        assert "num_sweeps=2147483647" in err and "[0, 10000]" in err
        err, _, _ = client.BiasSpectr_PropsSet(0, 10_000, 1, 10_000, 0.0, 2, 2)
        assert "would run about" in err and "max_request_s" in err
        err, _, _ = client.BiasSpectr_PropsSet(0, 1, 1, 101, 1.0, 2, 2)
        assert "z_offset_m=1" in err
        assert backend.get_spectroscopy_props().num_sweeps < 10_000
        # A sweep set some other way is still checked when it would start.
        from dataclasses import replace

        backend.set_spectroscopy_props(
            replace(backend.get_spectroscopy_props(), num_sweeps=2**31 - 1)
        )
        err, _, _ = client.BiasSpectr_Start(1, "")
        assert "would run about" in err
        assert client.Bias_Get()[0] == ""  # the server is still free to answer
    finally:
        sock.close()


def test_connections_are_capped_and_idle_ones_dropped(server: NanonisServer) -> None:
    held = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
    try:
        time.sleep(0.05)  # the server has accepted all three
        extra = socket.create_connection(server.address, timeout=5)
        try:
            assert _closed_by_server(extra)  # over max_connections: closed at once
        finally:
            extra.close()
        for sock in held:  # silent past idle_timeout_s: dropped
            assert _closed_by_server(sock)
        sock, client = _client(server)  # room again for a working client
        try:
            assert client.Bias_Get()[0] == ""
        finally:
            sock.close()
    finally:
        for sock in held:
            sock.close()


def test_a_huge_scan_is_refused_as_too_long(backend: FakeSpmBackend) -> None:
    limits = NanonisLimits(max_request_s=1.0)
    with NanonisServer(backend, "127.0.0.1", 0, limits=limits) as srv:
        sock, client = _client(srv)
        try:
            err, _, _ = client.Scan_BufferSet([0], 4096, 4096)
            assert "would run about" in err and "[0, 1] s" in err
            assert client.Scan_BufferSet([0], 64, 64)[0] == ""
        finally:
            sock.close()
