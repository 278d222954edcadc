"""Trained agents behind one small interface, and their checkpoints.

An agent maps the codec's input vector to the codec's action: `reset()` then
`act(x)`. Checkpoints carry the task they were trained for, so the live policy
rebuilds exactly the codec the env used:
- `*.npz`: a Q-table (`q`, `task` JSON, `max_hold`);
- `*.zip`: a stable-baselines3 model, with `<name>.task.json` beside it.
torch / stable-baselines3 are imported only when an SB3 checkpoint is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import TypeAdapter

from policies.rl.codec import SwimmerCodec, TaskConfig, make_codec
from policies.rl.qlearning import QAgent

TASK_ADAPTER: TypeAdapter[Any] = TypeAdapter(TaskConfig)


class Agent(Protocol):
    def reset(self) -> None: ...

    def act(self, x: np.ndarray) -> Any: ...


class Sb3Agent:
    """A stable-baselines3 model acting deterministically (or sampling) on one input."""

    def __init__(self, model: Any, deterministic: bool = True) -> None:
        self.model = model
        self.deterministic = deterministic

    def reset(self) -> None:
        """Feed-forward policies keep no state between steps."""

    def act(self, x: np.ndarray) -> Any:
        action, _ = self.model.predict(x, deterministic=self.deterministic)
        return action


def sidecar(path: Path) -> Path:
    return path.with_suffix(".task.json")


def save_qtable(path: Path, q: np.ndarray, task: Any, max_hold: int) -> Path:
    path = Path(path).with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, q=q, task=json.dumps(task.model_dump()), max_hold=max_hold, algo="qtable")
    return path


def save_sb3(path: Path, model: Any, task: Any, algo: str) -> Path:
    path = Path(path).with_suffix(".zip")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    sidecar(path).write_text(json.dumps({"algo": algo, "task": task.model_dump()}, indent=1))
    return path


SB3_ALGOS = ("ppo", "sac", "dqn")


def sb3_class(algo: str) -> Any:
    import stable_baselines3 as sb3

    return {"ppo": sb3.PPO, "sac": sb3.SAC, "dqn": sb3.DQN}[algo]


def load_agent(path: str | Path, deterministic: bool = True) -> tuple[Any, Agent]:
    """(task, agent) from a checkpoint; raises ValueError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as data:
            task = TASK_ADAPTER.validate_python(json.loads(str(data["task"])))
            q = np.array(data["q"])
            max_hold = int(data["max_hold"])
        codec = make_codec(task)
        if not isinstance(codec, SwimmerCodec):
            raise ValueError(f"checkpoint {path}: a Q-table needs the microswimmer task")
        return task, QAgent(q, codec.grid_state, max_hold=max_hold)
    if path.suffix == ".zip":
        if not sidecar(path).exists():
            raise ValueError(f"checkpoint {path}: missing {sidecar(path).name} (task)")
        meta = json.loads(sidecar(path).read_text())
        task = TASK_ADAPTER.validate_python(meta["task"])
        import torch

        torch.set_num_threads(1)
        model = sb3_class(meta["algo"]).load(path, device="cpu")
        return task, Sb3Agent(model, deterministic)
    raise ValueError(f"checkpoint {path}: expected a .npz (Q-table) or .zip (SB3) file")
