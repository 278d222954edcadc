"""The dashboard obeys only its own origin and its token: a cross-origin POST, a foreign
websocket Origin and a rebinding Host are refused even without a token; the token is
taken from the first URL into an HttpOnly SameSite=Strict cookie, never from the URL again."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dashboard.hub import TelemetryHub
from agent.dashboard.server import TOKEN_COOKIE, DashboardOptions, DashboardServer

TOKEN = "a-token-for-tests-123"


class RecordingHub(TelemetryHub):
    """No run attached; remembers every command that got through to the run's channel."""

    def __init__(self) -> None:
        super().__init__(lambda: None)
        self.forwarded: list[str] = []

    def command(self, cmd: str, timeout_ms: int = 2000) -> dict[str, Any]:
        self.forwarded.append(cmd)
        return {"ok": True, "state": "paused"}


def _serve(host: str, token: str | None) -> Iterator[tuple[DashboardServer, RecordingHub]]:
    hub = RecordingHub()
    server = DashboardServer(hub, DashboardOptions(port=0, host=host, token=token)).start()
    try:
        yield server, hub
    finally:
        server.stop()


@pytest.fixture
def loopback() -> Iterator[tuple[DashboardServer, RecordingHub]]:
    yield from _serve("127.0.0.1", None)


@pytest.fixture
def guarded() -> Iterator[tuple[DashboardServer, RecordingHub]]:
    yield from _serve("127.0.0.1", TOKEN)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def _http(
    port: int, path: str, body: dict[str, Any] | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data else "GET"
    )
    for name, value in headers.items():
        request.add_header(name.replace("_", "-"), value)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _ws_accepted(port: int, query: str = "", **headers: str) -> bool:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    origin = headers.pop("Origin", None)
    try:
        with connect(
            f"ws://127.0.0.1:{port}/ws{query}",
            origin=origin,
            additional_headers=headers,
            open_timeout=5,
        ) as ws:
            ws.recv(timeout=5)  # the first update: only an accepted socket gets one
    except (InvalidStatus, ConnectionClosed):
        return False
    except TimeoutError:
        return True  # open, just nothing new to send
    return True


def test_a_cross_origin_post_is_refused_on_the_tokenless_loopback_dashboard(
    loopback: tuple[DashboardServer, RecordingHub],
) -> None:
    server, hub = loopback
    own = f"http://127.0.0.1:{server.port}"
    code, _, _ = _http(server.port, "/api/command", {"cmd": "stop"}, Origin="http://evil.example")
    assert code == 403
    code, _, _ = _http(server.port, "/api/command", {"cmd": "stop"}, Origin="null")
    assert code == 403
    assert hub.forwarded == []
    assert _http(server.port, "/api/command", {"cmd": "pause"}, Origin=own)[0] == 200
    assert _http(server.port, "/api/command", {"cmd": "pause"})[0] == 200  # a local script
    assert hub.forwarded == ["pause", "pause"]


def test_a_rebinding_host_is_refused_on_loopback(
    loopback: tuple[DashboardServer, RecordingHub],
) -> None:
    server, hub = loopback
    evil = f"evil.example:{server.port}"
    code, _, _ = _http(server.port, "/api/command", {"cmd": "stop"}, Host=evil,
                       Origin=f"http://{evil}")  # fmt: skip
    assert code == 403
    assert _http(server.port, "/api/status", Host=evil)[0] == 403
    assert hub.forwarded == []
    assert _http(server.port, "/api/status", Host=f"localhost:{server.port}")[0] == 200


def test_a_websocket_with_a_foreign_origin_is_refused(
    loopback: tuple[DashboardServer, RecordingHub],
) -> None:
    server, _ = loopback
    assert not _ws_accepted(server.port, Origin="http://evil.example")
    assert _ws_accepted(server.port, Origin=f"http://127.0.0.1:{server.port}")


def test_the_token_moves_from_the_first_url_into_a_strict_httponly_cookie(
    guarded: tuple[DashboardServer, RecordingHub],
) -> None:
    server, hub = guarded
    code, headers, _ = _http(server.port, f"/?token={TOKEN}")
    assert code == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{TOKEN_COOKIE}={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    wrong_code, wrong_headers, _ = _http(server.port, "/?token=not-the-token")
    assert wrong_code == 200 and "set-cookie" not in {k.lower() for k in wrong_headers}

    given = f"{TOKEN_COOKIE}={TOKEN}"
    assert _http(server.port, f"/api/status?token={TOKEN}")[0] == 401  # not from the URL
    assert _http(server.port, "/api/status", Cookie=given)[0] == 200
    assert _http(server.port, "/api/status", X_Scopeloop_Token=TOKEN)[0] == 200

    assert _http(server.port, "/api/command", {"cmd": "stop", "token": TOKEN})[0] == 401
    assert (
        _http(server.port, "/api/command", {"cmd": "stop"}, X_Scopeloop_Token="wrong-one")[0] == 401
    )
    assert hub.forwarded == []
    assert _http(server.port, "/api/command", {"cmd": "pause"}, Cookie=given)[0] == 200
    assert hub.forwarded == ["pause"]

    assert not _ws_accepted(server.port, f"?token={TOKEN}")
    assert _ws_accepted(server.port, Cookie=given)
    assert not _ws_accepted(server.port, Cookie=given, Origin="http://evil.example")
