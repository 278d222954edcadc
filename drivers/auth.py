"""CURVE authentication for tcp:// endpoints, with pyzmq's own `zmq.auth` (never our own scheme).

Keys are ZeroMQ certificate files made by `zmq.auth.create_certificates` (`scopeloop keys
new NAME`): `NAME.key` holds the public key, `NAME.key_secret` both keys. A server (a
driver node, a run's telemetry) holds its secret file and a directory of the public
`.key` files of the clients it lets in; a client holds its own secret file and the
server's public `.key`. One `zmq.auth.ThreadAuthenticator` per context answers ZAP
requests from every CURVE server socket of that context; a client whose key is not in
the directory never completes the handshake, so nothing it sends is ever delivered.

ipc:// endpoints carry no CURVE: a Unix socket is guarded by its directory, which must
be private (0700), so only this user can connect. tcp:// on loopback without keys is
still allowed for one-user development; any other tcp:// bind without keys is refused.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SECRET_SUFFIX = ".key_secret"
PUBLIC_SUFFIX = ".key"


class ServerAuthSettings(Protocol):
    secret_key: str | None
    allowed_clients_dir: str | None


class ClientAuthSettings(Protocol):
    secret_key: str | None
    server_public_key: str | None


@dataclass(frozen=True)
class ServerKeys:
    """A server's key pair and the directory of client public keys it accepts."""

    public: bytes
    secret: bytes
    allowed_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the public key of the server it connects to."""

    public: bytes
    secret: bytes
    server_public: bytes


# --- loading keys (one-line errors naming the config field) --------------------------


def _read_certificate(path: str, field: str) -> tuple[bytes, bytes | None]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{field}: key file {file} does not exist")
    try:
        return zmq.auth.load_certificate(file)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{field}: cannot read key file {file} ({exc})") from None


def read_secret_key(path: str, field: str) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file, refusing a public-only file."""
    public, secret = _read_certificate(path, field)
    if secret is None:
        raise ValueError(
            f"{field}: {path} holds no secret key "
            f"(give the {SECRET_SUFFIX} file, not {PUBLIC_SUFFIX})"
        )
    return public, secret


def read_public_key(path: str, field: str) -> bytes:
    return _read_certificate(path, field)[0]


def load_server_keys(
    auth: ServerAuthSettings | None, where: str = "driver.auth"
) -> ServerKeys | None:
    """The server keys a config names, None when it names none."""
    if auth is None or auth.secret_key is None:
        return None
    public, secret = read_secret_key(auth.secret_key, f"{where}.secret_key")
    field = f"{where}.allowed_clients_dir"
    if auth.allowed_clients_dir is None:
        raise ValueError(f"{field}: required with {where}.secret_key (the allowed client keys)")
    folder = Path(auth.allowed_clients_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{field}: directory {folder} does not exist")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ValueError(f"{field}: directory {folder} is not readable")
    return ServerKeys(public, secret, folder.resolve())


def load_client_keys(
    auth: ClientAuthSettings | None, where: str = "driver.client_auth"
) -> ClientKeys | None:
    """The client keys a config names, None when it names none."""
    if auth is None or auth.secret_key is None:
        return None
    public, secret = read_secret_key(auth.secret_key, f"{where}.secret_key")
    if auth.server_public_key is None:
        raise ValueError(
            f"{where}.server_public_key: required with {where}.secret_key (the driver's .key)"
        )
    server = read_public_key(auth.server_public_key, f"{where}.server_public_key")
    return ClientKeys(public, secret, server)


# --- key files (`scopeloop keys`) ------------------------------------------------------

DEFAULT_KEY_DIR = Path("~/.scopeloop/keys")
KEY_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


def _private_folder(folder: Path) -> Path:
    folder = folder.expanduser()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    return folder


def create_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """NAME.key (public, 0644) and NAME.key_secret (0600) in a 0700 folder; never overwrites."""
    import re

    if not re.match(KEY_NAME, name):
        raise ValueError(f"NAME: {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    folder = _private_folder(folder)
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    if public.exists() or secret.exists():
        raise ValueError(f"NAME: a key pair {name!r} already exists in {folder}")
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    secret.chmod(0o600)
    public.chmod(0o644)
    return public, secret


@dataclass(frozen=True)
class KeyInfo:
    name: str
    public_key: str
    has_secret: bool
    path: Path


def list_keys(folder: Path) -> list[KeyInfo]:
    """Every key in a folder: pairs once (with their secret file), lone public keys too."""
    folder = folder.expanduser()
    if not folder.is_dir():
        return []
    out: dict[str, KeyInfo] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in (PUBLIC_SUFFIX, SECRET_SUFFIX):
            continue
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError):
            continue
        info = KeyInfo(path.stem, public.decode(), secret is not None, path)
        if path.stem not in out or info.has_secret:
            out[path.stem] = info
    return list(out.values())


def allow_client(public_file: Path, allowed_dir: Path) -> Path:
    """Copy a client's public key into a server's allowed-clients folder."""
    public = read_public_key(str(public_file), "KEY_FILE")
    _, secret = zmq.auth.load_certificate(public_file.expanduser())
    if secret is not None:
        raise ValueError(
            f"KEY_FILE: {public_file} holds a secret key; give the public {PUBLIC_SUFFIX} file"
        )
    folder = _private_folder(allowed_dir)
    target = folder / f"{public_file.expanduser().stem}{PUBLIC_SUFFIX}"
    if target.exists() and read_public_key(str(target), "KEY_FILE") != public:
        raise ValueError(f"KEY_FILE: {target} already allows a different key of that name")
    target.write_bytes(public_file.expanduser().read_bytes())
    target.chmod(0o644)
    return target


# --- endpoints ---------------------------------------------------------------------


def tcp_host(endpoint: str) -> str | None:
    """The host of a tcp:// endpoint (None for any other transport)."""
    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    return host.strip("[]")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or hostname: assume reachable from outside


def check_bind(endpoint: str, keys: ServerKeys | None, name: str = "endpoint") -> None:
    """Refuse, in one line naming the endpoint, a bind that would let strangers in."""
    host = tcp_host(endpoint)
    if host is not None and keys is None and not is_loopback_host(host):
        raise ValueError(
            f"{name}: refusing to bind {endpoint} without CURVE keys (not a loopback address); "
            "set auth.secret_key and auth.allowed_clients_dir (scopeloop keys)"
        )
    if endpoint.startswith("ipc://"):
        check_ipc_dir(endpoint, name)


def check_ipc_dir(endpoint: str, name: str = "endpoint") -> None:
    """An ipc socket is as private as its directory: that must be ours and 0700."""
    path = endpoint[len("ipc://") :]
    if not path or path.startswith("@") or path == "*":
        raise ValueError(
            f"{name}: {endpoint} has no private directory; use ipc:///a/0700/dir/name or 'auto'"
        )
    folder = Path(path).parent
    try:
        info = folder.stat()
    except OSError:
        raise ValueError(f"{name}: directory {folder} of {endpoint} does not exist") from None
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"{name}: directory {folder} of {endpoint} has mode {stat.S_IMODE(info.st_mode):o}; "
            "it must be this user's and 0700"
        )


def private_dir(prefix: str) -> Path:
    """A fresh 0700 directory for ipc sockets (mkdtemp makes it 0700 and ours)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix))


# --- sockets -----------------------------------------------------------------------


class _Authenticators:
    """One ThreadAuthenticator per context, shared by its CURVE server sockets.

    ZAP binds one inproc address per context, so two authenticators cannot coexist;
    each allowed-clients directory is its own ZAP domain. The thread stops with the
    last socket, so `ctx.term()` never waits on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_ctx: dict[int, tuple[ThreadAuthenticator, set[int]]] = {}

    def attach(self, ctx: zmq.Context, sock: zmq.Socket, allowed_dir: Path) -> None:
        with self._lock:
            entry = self._by_ctx.get(id(ctx))
            if entry is None:
                auth = ThreadAuthenticator(ctx)
                auth.start()
                entry = self._by_ctx[id(ctx)] = (auth, set())
            auth, users = entry
            domain = str(allowed_dir)
            auth.configure_curve(domain=domain, location=domain)  # reads the keys now
            users.add(id(sock))
        sock.zap_domain = domain.encode()

    def detach(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        with self._lock:
            entry = self._by_ctx.get(id(ctx))
            if entry is None or id(sock) not in entry[1]:
                return
            entry[1].discard(id(sock))
            if not entry[1]:
                entry[0].stop()
                del self._by_ctx[id(ctx)]


_AUTHENTICATORS = _Authenticators()


def secure_server(sock: zmq.Socket, endpoint: str, keys: ServerKeys | None) -> None:
    """Make `sock` a CURVE server for a tcp endpoint (call before bind)."""
    if keys is None or tcp_host(endpoint) is None:
        return
    _AUTHENTICATORS.attach(sock.context, sock, keys.allowed_dir)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def release_server(sock: zmq.Socket) -> None:
    """Close `sock` and stop the context's authenticator once no socket needs it."""
    ctx = sock.context
    sock.close()
    _AUTHENTICATORS.detach(ctx, sock)


def secure_client(sock: zmq.Socket, endpoint: str, keys: ClientKeys | None) -> None:
    """Give `sock` our key pair and the server's key for a tcp endpoint (call before connect)."""
    if keys is None or tcp_host(endpoint) is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


# CURVE wraps each message part in a MESSAGE command (name, nonce, MAC): the limit is
# checked on that wire size, so a part of exactly the allowed size needs this much more.
WIRE_MARGIN_BYTES = 256


def set_max_message(sock: zmq.Socket, max_bytes: int) -> None:
    """A peer sending one message part larger than max_bytes is disconnected before it
    is read, so no message can make this process allocate more."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + WIRE_MARGIN_BYTES)
