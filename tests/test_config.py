"""Configs: the default validates, overrides apply, typos and unsafe values fail in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "twin-feedback-trap.yaml"


def test_default_config_validates_and_overrides_apply() -> None:
    config = load_config(
        DEFAULT, ["duration_s=3.5", "driver.limits.max_laser_power_mw=1.5", "seed=11"]
    )
    assert config.duration_s == 3.5
    assert config.driver.limits.max_laser_power_mw == 1.5
    assert config.driver.seed == 11  # the experiment seed is the one knob


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("driver.limits.max_laser_pwer_mw=2", "driver.limits.max_laser_pwer_mw"),
        ("driver.watchdog_ms=5", "driver.watchdog_ms"),
        ("driver.twin.camera.pixel_size_um=-1", "driver.twin.camera.pixel_size_um"),
        ("policy.kind=telepathy", "policy"),
        ("agent.detector.classical.method=guess", "agent.detector.classical.method"),
        ("agent.detector.kind=magic", "agent.detector.kind"),
        ("driver.exposure_ms=5000", "exposure_ms"),
        ("driver.limits.stage_x_um=[10, -10]", "limits.stage_x_um"),
        ("driver.twin.particles.actuator=tweezers", "policy.actuator"),
    ],
)
def test_bad_values_fail_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT, [override])
    message = str(info.value)
    assert field in message
    assert all(line.startswith("config error:") for line in message.splitlines())


def test_malformed_override_and_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        load_config(DEFAULT, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ROOT / "configs" / "nope.yaml")


def test_cli_refuses_a_typo_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(DEFAULT.read_text().replace("duration_s: 20", "duraton_s: 20"))
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", str(bad), "--set", f"runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["config error: duraton_s: Extra inputs are not permitted (got 20)"]
    assert not any(p.is_dir() for p in tmp_path.iterdir()), "a run directory was created"
