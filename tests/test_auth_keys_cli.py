"""`scopeloop keys`: new / list / allow, with private files and one-line refusals."""

from __future__ import annotations

import stat
from pathlib import Path

from typer.testing import CliRunner

from agent.cli import app


def test_keys_new_list_and_allow(tmp_path: Path) -> None:
    runner = CliRunner()
    folder, allowed = tmp_path / "keys", tmp_path / "allowed"
    made = runner.invoke(app, ["keys", "new", "scope1", "--dir", str(folder)])
    assert made.exit_code == 0, made.output
    secret = folder / "scope1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    listed = runner.invoke(app, ["keys", "list", "--dir", str(folder)])
    assert listed.exit_code == 0 and "scope1" in listed.output and "pair" in listed.output

    again = runner.invoke(app, ["keys", "new", "scope1", "--dir", str(folder)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert len(again.output.strip().splitlines()) == 1

    public = folder / "scope1.key"
    ok = runner.invoke(app, ["keys", "allow", str(public), "--allowed-dir", str(allowed)])
    assert ok.exit_code == 0 and (allowed / "scope1.key").read_bytes() == public.read_bytes()
    refused = runner.invoke(app, ["keys", "allow", str(secret), "--allowed-dir", str(allowed)])
    assert refused.exit_code == 2 and "secret key" in refused.output
    missing = runner.invoke(app, ["keys", "allow", str(tmp_path / "nope.key"),
                                  "--allowed-dir", str(allowed)])  # fmt: skip
    assert missing.exit_code == 2 and "does not exist" in missing.output
