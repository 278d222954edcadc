"""HTTP + websocket server of the dashboard (FastAPI on uvicorn, in a background thread).

Each browser gets one websocket. A sender task wakes at the client's rate (<= 30 Hz)
and sends only what changed since that client's last tick: the newest frame (never
a backlog), new metric points, new events, state and maps. Commands come back on the
same websocket (or `POST /api/command` for scripts) and go to the run's control
channel. With a token set, the websocket, the status API and every command require it.

Who is let in: every request's Host must be this server's own address when it listens
on loopback (a DNS-rebinding page names its own host), and a request that carries an
Origin (every browser does for POST and websockets) must come from this very origin,
so no other web page can drive the dashboard, token or not. The token travels in the
URL only once: `/?token=T` sets an HttpOnly SameSite=Strict cookie and redirects to `/`;
after that the page, its websocket and scripts (header `X-Scopeloop-Token`) present it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers

from agent.dashboard.hub import ClientCursor, TelemetryHub
from drivers.auth import is_loopback_host

STATIC_DIR = Path(__file__).parent / "static"
CLIENT_COMMANDS = ("pause", "resume", "stop")
MIN_TOKEN_CHARS = 8
TOKEN_HEADER = "x-scopeloop-token"
TOKEN_COOKIE = "scopeloop_token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
FPS_RANGE = (1.0, 30.0)


@dataclass(frozen=True)
class DashboardOptions:
    """Where to serve and how to guard it; validated by `check_bind`."""

    port: int
    host: str = "127.0.0.1"
    token: str | None = None
    fps: float = 15.0


def check_bind(options: DashboardOptions) -> None:
    """Raise ValueError (one line, names the option) for a bind we must refuse."""
    if not 0 <= options.port <= 65535:
        raise ValueError(f"--port must be within [0, 65535] (0: any free port), got {options.port}")
    if options.token is not None and len(options.token) < MIN_TOKEN_CHARS:
        raise ValueError(f"--token must be at least {MIN_TOKEN_CHARS} characters")
    if not is_loopback_host(options.host) and not options.token:
        raise ValueError(
            f"--token is required when binding --host {options.host} (not a loopback address): "
            "anyone who can reach it could stop your experiment"
        )
    if not FPS_RANGE[0] <= options.fps <= FPS_RANGE[1]:
        raise ValueError(f"--fps must be within [{FPS_RANGE[0]:g}, {FPS_RANGE[1]:g}]")


def _authorized(token: str | None, given: str | None) -> bool:
    if token is None:
        return True
    return given is not None and hmac.compare_digest(token.encode(), given.encode())


def _given_token(headers: Headers, cookies: dict[str, str]) -> str | None:
    """The token a request presents: header (scripts) or cookie (the page); never the URL."""
    return headers.get(TOKEN_HEADER) or cookies.get(TOKEN_COOKIE)


def same_origin_refusal(headers: Headers, loopback: bool) -> str | None:
    """Why a request must be refused for where it comes from (None: it may go on).

    On a loopback bind the Host must be a loopback name (DNS rebinding sends the
    attacker's); any Origin present must be this server's own."""
    host = headers.get("host", "")
    if loopback and host.rsplit(":", 1)[0] not in LOOPBACK_NAMES:
        return f"host {host!r} is not this dashboard's"
    origin = headers.get("origin")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        return f"origin {origin!r} is not this dashboard's"
    return None


def create_app(
    hub: TelemetryHub, token: str | None = None, fps: float = 15.0, loopback: bool = True
) -> FastAPI:
    app = FastAPI(title="scopeloop dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    index_html = (STATIC_DIR / "index.html").read_text()

    @app.middleware("http")
    async def same_origin_only(request: Request, call_next: Any) -> Response:
        refusal = same_origin_refusal(request.headers, loopback)
        if refusal is not None:
            return JSONResponse({"ok": False, "error": refusal}, status_code=403)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> Response:
        given = request.query_params.get("token")
        if token is not None and given is not None and _authorized(token, given):
            # First load: the token moves into a cookie and out of the address bar.
            response: Response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        return HTMLResponse(index_html)  # harmless without the token: it shows nothing

    @app.get("/api/status")
    async def status(request: Request) -> JSONResponse:
        if not _authorized(token, _given_token(request.headers, request.cookies)):
            return JSONResponse({"error": "token required"}, status_code=401)
        return JSONResponse({**hub.status(), "token_required": token is not None})

    @app.post("/api/command")
    async def command(request: Request) -> JSONResponse:
        if not _authorized(token, _given_token(request.headers, request.cookies)):
            return JSONResponse({"ok": False, "error": "token required"}, status_code=401)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"ok": False, "error": "body must be a JSON object"}, 400)
        cmd = body.get("cmd")
        if cmd not in CLIENT_COMMANDS:
            error = f"cmd must be one of {list(CLIENT_COMMANDS)}, got {cmd!r}"
            return JSONResponse({"ok": False, "error": error}, status_code=400)
        result = await asyncio.to_thread(hub.command, cmd)
        return JSONResponse(result, status_code=200 if result.get("ok") else 409)

    @app.websocket("/ws")
    async def stream(ws: WebSocket) -> None:
        refusal = same_origin_refusal(ws.headers, loopback)
        if refusal is not None:
            await ws.close(code=4403, reason=refusal)
            return
        if not _authorized(token, _given_token(ws.headers, ws.cookies)):
            await ws.close(code=4401, reason="token required")
            return
        try:
            rate = float(ws.query_params.get("fps", fps))
        except ValueError:
            rate = fps
        rate = min(max(rate, FPS_RANGE[0]), FPS_RANGE[1])
        await ws.accept()
        send_lock = asyncio.Lock()
        sender = asyncio.create_task(_send_updates(ws, hub, rate, send_lock))
        try:
            await _receive_commands(ws, hub, send_lock)
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    return app


async def _send_updates(ws: WebSocket, hub: TelemetryHub, rate: float, lock: asyncio.Lock) -> None:
    """Newest-first, rate-limited: a slow browser skips frames instead of queueing them."""
    cursor = ClientCursor()
    period = 1.0 / rate
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        binaries, update = hub.update_for(cursor)
        async with lock:  # awaits the socket's drain: a slow client slows only itself
            for payload in binaries:
                await ws.send_bytes(payload)
            if update is not None:
                await ws.send_text(json.dumps(update, separators=(",", ":")))
        await asyncio.sleep(max(period - (loop.time() - t0), 0.005))


async def _receive_commands(ws: WebSocket, hub: TelemetryHub, lock: asyncio.Lock) -> None:
    while True:
        text = await ws.receive_text()
        try:
            cmd = json.loads(text).get("cmd")
        except (ValueError, AttributeError):
            cmd = None
        reply: dict[str, Any]
        if cmd not in CLIENT_COMMANDS:
            reply = {"ok": False, "error": f"cmd must be one of {list(CLIENT_COMMANDS)}"}
        else:
            reply = await asyncio.to_thread(hub.command, cmd)
        async with lock:
            await ws.send_text(json.dumps({"type": "command", "cmd": cmd, **reply}))


class DashboardServer:
    """uvicorn in a daemon thread; the socket is bound up front so errors surface at once."""

    def __init__(self, hub: TelemetryHub, options: DashboardOptions) -> None:
        check_bind(options)
        self.hub = hub
        self.options = options
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((options.host, options.port))
        except OSError as exc:
            self._socket.close()
            raise OSError(
                f"cannot listen on {options.host}:{options.port} ({exc.strerror})"
            ) from None
        self._socket.listen(128)  # browsers may connect as soon as the URL is printed
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            create_app(hub, options.token, options.fps, is_loopback_host(options.host)),
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.options.host
        shown = f"[{host}]" if ":" in host else host
        query = f"?token={self.options.token}" if self.options.token else ""
        return f"http://{shown}:{self.port}/{query}"

    def start(self, timeout_s: float = 10.0) -> DashboardServer:
        self.hub.start()
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            daemon=True,
            name="dashboard-http",
        )
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.02)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.02)
        if not self._server.started:
            self.stop()
            raise OSError(f"dashboard server did not start on {self.options.host}:{self.port}")
        return self

    def serve_forever(self) -> None:
        """Run in this thread until SIGINT/SIGTERM (uvicorn's own signal handling)."""
        self.hub.start()
        try:
            self._server.run(sockets=[self._socket])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled gracefully: that is a normal exit
        finally:
            self.hub.stop()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.hub.stop()
        self._socket.close()
