"""Experiment configuration: YAML validated by pydantic, with `--set dotted.key=value` overrides.

A config with a typo fails before anything starts, with one line per problem
naming the dotted field and what it accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.detection.detectors import DetectorSettings
from agent.detection.tracking import TrackerConfig
from drivers.config import DriverConfig
from policies.feedback import ProportionalTrapConfig
from policies.registry import PolicyConfig

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot run; the message is ready to print, one line per problem."""


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_um: tuple[float, float] | None = None  # None: centre of the camera field
    detector: DetectorSettings = DetectorSettings()
    tracking: TrackerConfig = TrackerConfig()
    command_timeout_ms: int = Field(250, ge=1, le=60_000)
    heartbeat_ms: int = Field(100, ge=5, le=60_000)
    driver_silence_ms: int = Field(3000, ge=100, le=600_000)
    startup_timeout_s: float = Field(30.0, gt=0.0, le=600.0)
    # A driver that dies or restarts mid-run: wait this long (no actuation) for it to
    # answer again, then end the run (agent/engine/driver_faults.py); 0: end at once.
    driver_reconnect_s: float = Field(30.0, ge=0.0, le=3600.0)
    # Every frame the loop acts on goes to the run's frames.ome.zarr, written by a
    # writer process at idle priority; past record_queue_mb waiting, frames are counted
    # as not recorded rather than slowing the loop (agent/records/frame_writer.py).
    record_frames: bool = True
    record_queue_mb: float = Field(256.0, gt=0.0, le=65_536.0)


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["feedback-trap"] = "feedback-trap"  # see agent.engine.experiments.RUN_KINDS
    name: str = Field("experiment", min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    duration_s: float = Field(20.0, gt=0.0, le=7 * 24 * 3600.0)
    compare_free_diffusion: bool = True
    runs_dir: str = "runs"
    driver: DriverConfig = DriverConfig()
    agent: AgentSettings = AgentSettings()
    policy: PolicyConfig = ProportionalTrapConfig()

    @model_validator(mode="after")
    def _one_seed(self) -> ExperimentConfig:
        # The experiment seed is the single knob; the twin takes it from here.
        if self.driver.seed != self.seed:
            self.driver = self.driver.model_copy(update={"seed": self.seed})
        return self

    @model_validator(mode="after")
    def _policy_matches_twin_actuator(self) -> ExperimentConfig:
        # A heating-trap controller driving tweezers (or vice versa) pushes the wrong way.
        twin_actuator = self.driver.twin.particles.actuator
        policy_actuator = getattr(self.policy, "actuator", twin_actuator)
        if self.driver.kind == "twin" and policy_actuator != twin_actuator:
            raise ValueError(
                f"policy.actuator: {policy_actuator!r} does not match "
                f"driver.twin.particles.actuator {twin_actuator!r}"
            )
        return self


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `dotted.key=value` pairs (value parsed as YAML) into a raw config dict."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    return raw


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            where += ".kind"  # e.g. a policy this plan cannot use: name the field to change
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"config error: {where}: {err['msg']}{shown}")
    return "\n".join(lines)


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path`; ConfigError (one line) if missing, unreadable or not a
    mapping. Every config kind (experiments, training) is read through here."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config error: file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path} ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {path} must hold a mapping at the top level")
    return raw


def load_model_config(path: str | Path, overrides: list[str] | None, model: type[M]) -> M:
    """Read, override and validate into `model`; ConfigError, one line per problem."""
    raw = apply_overrides(read_config_mapping(path), overrides or [])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The feedback-trap experiment config; raise ConfigError with a printable message."""
    return load_model_config(path, overrides, ExperimentConfig)


def dump_config(config: BaseModel, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def load_driver_section(path: str | Path, overrides: list[str] | None = None) -> DriverConfig:
    """The `driver` section of any config kind (fields reported as `driver.<name>`)."""
    raw = apply_overrides(read_config_mapping(path), overrides or [])
    try:
        return DriverConfig.model_validate(raw.get("driver") or {})
    except ValidationError as exc:
        lines = format_validation_error(exc)
        raise ConfigError(lines.replace("config error: ", "config error: driver.")) from None
