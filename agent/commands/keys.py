"""`scopeloop keys`: make, list and allow the CURVE key pairs of tcp:// endpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err_console = Console(stderr=True, soft_wrap=True)
console = Console()

DirOption = Annotated[
    Path, typer.Option("--dir", help="Key folder (made 0700; default ~/.scopeloop/keys).")
]


def _fail(message: str) -> None:
    err_console.print(f"keys: {message}", markup=False, highlight=False)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    from drivers.auth import DEFAULT_KEY_DIR

    keys_app = typer.Typer(
        help="CURVE key pairs: a driver node's, an agent's, and who may connect (docs/protocol.md)."
    )
    app.add_typer(keys_app, name="keys")

    @keys_app.command("new")
    def new(
        name: Annotated[str, typer.Argument(help="Key name: NAME.key and NAME.key_secret.")],
        folder: DirOption = DEFAULT_KEY_DIR,
    ) -> None:
        """Make a key pair: NAME.key (public, share it) and NAME.key_secret (0600, keep it)."""
        from drivers.auth import create_key_pair

        try:
            public, secret = create_key_pair(folder, name)
        except (ValueError, OSError) as exc:
            _fail(str(exc))
        console.print(f"public key: {public}\nsecret key: {secret}", markup=False)

    @keys_app.command("list")
    def list_(folder: DirOption = DEFAULT_KEY_DIR) -> None:
        """The keys in a folder: name, public key (Z85), whether its secret is here."""
        from drivers.auth import list_keys

        found = list_keys(folder)
        if not found:
            console.print(f"no keys in {folder.expanduser()}", markup=False)
        for key in found:
            kind = "pair" if key.has_secret else "public"
            console.print(f"{key.name}\t{kind}\t{key.public_key}\t{key.path}", markup=False)

    @keys_app.command("allow")
    def allow(
        key_file: Annotated[Path, typer.Argument(help="A client's public NAME.key file.")],
        allowed_dir: Annotated[
            Path,
            typer.Option("--allowed-dir", help="The server's auth.allowed_clients_dir."),
        ],
    ) -> None:
        """Let a client in: copy its public key into a server's allowed-clients folder
        (a running node reads the folder when it starts)."""
        from drivers.auth import allow_client

        try:
            target = allow_client(key_file, allowed_dir)
        except (ValueError, OSError) as exc:
            _fail(str(exc))
        console.print(f"allowed: {target}", markup=False)
