"""Tabular Q-learning on the grid states, as in Muinos-Landin et al. 2021.

A decision is taken when the swimmer enters a new grid cell (or after `max_hold`
frames in one cell) and held until then, so a 'step' is one state transition, the
unit in which the paper counts steps to goal. Rewards of the frames in between are
summed. The agent reads only the codec's input vector, so it runs unchanged in the
gym env and in the live loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class QAgent:
    """Greedy (or epsilon-greedy) actor over a Q-table; holds its action within a cell."""

    def __init__(
        self,
        q: np.ndarray,
        state_fn: Callable[[np.ndarray], int],
        max_hold: int = 20,
        epsilon: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.q = q
        self.state_fn = state_fn
        self.max_hold = max_hold
        self.epsilon = epsilon
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        self.state: int | None = None
        self.action = 0
        self.held = 0
        self.decisions = 0

    def decide(self, state: int) -> int:
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(self.q.shape[1]))
        row = self.q[state]
        best = np.flatnonzero(row == row.max())
        return int(best[0] if len(best) == 1 else self.rng.choice(best))

    def new_decision(self, x: np.ndarray) -> bool:
        """Whether the next `act` decides anew (new cell or held too long)."""
        return self.state_fn(x) != self.state or self.held >= self.max_hold

    def act(self, x: np.ndarray) -> int:
        if self.new_decision(x):
            self.state = self.state_fn(x)
            self.action = self.decide(self.state)
            self.held = 0
            self.decisions += 1
        self.held += 1
        return self.action


@dataclass
class QTrainResult:
    q: np.ndarray
    episode_decisions: list[int] = field(default_factory=list)
    episode_frames: list[int] = field(default_factory=list)
    episode_success: list[bool] = field(default_factory=list)
    total_decisions: int = 0

    def steps_to_convergence(self, window: int = 20, tolerance: float = 0.25) -> int:
        """Decisions taken until the running mean of steps-to-goal settles within
        `tolerance` of its final value (and stays there)."""
        steps = np.asarray(self.episode_decisions, dtype=float)
        if len(steps) < 2 * window:
            return int(self.total_decisions)
        run = np.convolve(steps, np.ones(window) / window, mode="valid")
        final = run[-1]
        outside = np.flatnonzero(np.abs(run - final) > tolerance * final + 1.0)
        first_ok = int(outside[-1]) + 1 if len(outside) else 0
        episode = min(first_ok + window - 1, len(steps) - 1)
        return int(np.sum(steps[: episode + 1]))


def train_qtable(
    env: Any,
    n_states: int,
    state_fn: Callable[[np.ndarray], int],
    episodes: int,
    alpha: float = 0.5,
    gamma: float = 0.9,
    epsilon: tuple[float, float] = (0.5, 0.02),
    max_hold: int = 20,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> QTrainResult:
    """Semi-MDP Q-learning: one update per state transition with the summed reward."""
    n_actions = int(env.action_space.n)
    q = np.zeros((n_states, n_actions))
    agent = QAgent(q, state_fn, max_hold=max_hold, seed=seed)
    result = QTrainResult(q=q)
    for episode in range(episodes):
        frac = episode / max(episodes - 1, 1)
        agent.epsilon = epsilon[0] * (epsilon[1] / epsilon[0]) ** frac if epsilon[0] > 0 else 0.0
        x, _ = env.reset(seed=seed * 1_000_003 + episode)
        agent.reset()
        a = agent.act(x)
        s, ret, frames = agent.state, 0.0, 0
        while True:
            x, r, terminated, truncated, _ = env.step(a)
            ret += r
            frames += 1
            if terminated or truncated or agent.new_decision(x):
                target = ret if terminated else ret + gamma * q[state_fn(x)].max()
                q[s, agent.action] += alpha * (target - q[s, agent.action])
                ret = 0.0
                if terminated or truncated:
                    break
            a = agent.act(x)
            s = agent.state
        result.episode_decisions.append(agent.decisions)
        result.episode_frames.append(frames)
        result.episode_success.append(bool(terminated))
        result.total_decisions += agent.decisions
        if progress is not None:
            progress(episode + 1, episodes)
    return result
