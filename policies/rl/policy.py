"""`RlPolicy`: a trained agent as a live `Policy`, through the envs' own codec.

The live loop hands it the same `Observation` the gym env builds; `codec.encode`
turns it into the network input and `codec.decode` turns the network output into
laser spots, the same methods (same function objects) the env calls in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.contract import Action, Observation
from policies.rl.codec import Codec, make_codec


class RlPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["rl"] = "rl"
    checkpoint: str = Field(..., min_length=1)  # .npz Q-table or .zip SB3 model
    task: Literal["microswimmer", "steering", "gathering"] | None = None  # checked if given
    deterministic: bool = True

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, value: str) -> str:
        # Fail at config time, not after the driver has started.
        path = Path(value)
        if path.suffix not in (".npz", ".zip"):
            raise ValueError(f"must be a .npz (Q-table) or .zip (SB3) file, got {value!r}")
        if not path.exists():
            raise ValueError(f"file {value!r} does not exist (train it: scopeloop train ...)")
        return value


class RlPolicy:
    """Loads the checkpoint once; reset() starts a new episode."""

    def __init__(self, config: RlPolicyConfig, base_dir: Path | None = None) -> None:
        from policies.rl.agents import load_agent

        path = Path(config.checkpoint)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        task, self.agent = load_agent(path, config.deterministic)
        if config.task is not None and task.kind != config.task:
            raise ValueError(
                f"policy.task: {config.task!r} does not match the checkpoint's task {task.kind!r}"
            )
        self.task = task
        self.codec: Codec = make_codec(task)

    def reset(self) -> None:
        self.codec.reset()
        self.agent.reset()

    def act(self, obs: Observation) -> Action:
        x = self.codec.encode(obs)
        action = self.codec.decode(obs, self.agent.act(x))
        info: dict[str, Any] = dict(action.info)
        return Action(laser=action.laser, info={k: float(v) for k, v in info.items()})
