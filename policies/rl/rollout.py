"""Run an agent for whole episodes in an env and score it (success, steps to goal)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class EvalResult:
    success: list[bool]
    steps: list[int]  # env steps (camera frames) per episode
    decisions: list[int]  # agent decisions (Q-table: state transitions; else = steps)

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.success)) if self.success else float("nan")

    def median_steps_to_goal(self) -> float:
        done = [s for s, ok in zip(self.steps, self.success, strict=True) if ok]
        return float(np.median(done)) if done else float("nan")

    def median_decisions_to_goal(self) -> float:
        done = [s for s, ok in zip(self.decisions, self.success, strict=True) if ok]
        return float(np.median(done)) if done else float("nan")


def evaluate(env: Any, agent: Any, episodes: int, seed: int = 10_000) -> EvalResult:
    """Episodes seeded seed, seed+1, ... so two agents meet the same twins and starts."""
    result = EvalResult([], [], [])
    for episode in range(episodes):
        x, _ = env.reset(seed=seed + episode)
        agent.reset()
        steps = 0
        while True:
            x, _, terminated, truncated, _ = env.step(agent.act(x))
            steps += 1
            if terminated or truncated:
                break
        result.success.append(bool(terminated))
        result.steps.append(steps)
        result.decisions.append(int(getattr(agent, "decisions", steps)))
    return result
