"""An SB3 `VecEnv` whose environments live in Ray actors, for RL rollouts on randomised
twin envs spread over Ray workers (one host or a cluster).

Why SB3 + Ray actors rather than RLlib: the policies, checkpoints and the live
`RlPolicy` stay exactly those of today's SB3 training; only where the env steps run
changes. Each actor holds a slice of the envs in SB3's own `DummyVecEnv`, so auto-reset,
`terminal_observation` and `TimeLimit.truncated` follow SB3's semantics, and a step costs
one Ray call per actor (not per env), which is what keeps the overhead small.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices


class EnvSlice:
    """The body of one Ray actor: some of the envs, stepped together."""

    def __init__(self, factories: list[Callable[[], Any]]) -> None:
        self.vec = DummyVecEnv(factories)

    def spaces(self) -> tuple[Any, Any]:
        return self.vec.observation_space, self.vec.action_space

    def reset(self, seeds: list[int | None], options: list[dict]) -> tuple[Any, list[dict]]:
        if seeds[0] is not None:
            self.vec.seed(seeds[0])  # SB3 seeds env i with seed + i, as the caller did
        self.vec.set_options(options)
        obs = self.vec.reset()
        return obs, list(self.vec.reset_infos)

    def step(
        self, actions: np.ndarray
    ) -> tuple[Any, np.ndarray, np.ndarray, list[dict], list[dict]]:
        obs, rewards, dones, infos = self.vec.step(actions)
        return obs, rewards, dones, list(infos), list(self.vec.reset_infos)

    def call(self, name: str, args: tuple, kwargs: dict, local: list[int]) -> list[Any]:
        return getattr(self.vec, name)(*args, indices=local, **kwargs)

    def close(self) -> None:
        self.vec.close()


class RayVecEnv(VecEnv):
    """`n` envs in `workers` Ray actors (contiguous slices); starts an embedded local Ray
    on loopback if none is running, and stops it again on close."""

    def __init__(
        self, factories: list[Callable[[], Any]], workers: int = 2, cpus_per_worker: float = 1.0
    ) -> None:
        from agent.engine.ray_runtime import init_local_ray

        running = sys.modules.get("ray")
        self._owns_ray = running is None or not running.is_initialized()
        cpus = int(np.ceil(workers * cpus_per_worker))
        ray = init_local_ray(cpus) if self._owns_ray else running
        self._ray = ray
        workers = max(1, min(workers, len(factories)))
        bounds = np.linspace(0, len(factories), workers + 1).round().astype(int)
        self._slices = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
        actor = ray.remote(num_cpus=cpus_per_worker)(EnvSlice)
        self._actors = [actor.remote([factories[i] for i in s]) for s in self._slices]
        observation_space, action_space = ray.get(self._actors[0].spaces.remote())
        super().__init__(len(factories), observation_space, action_space)
        self._pending: list[Any] = []
        self.closed = False

    def _split(self, values: Sequence[Any]) -> list[list[Any]]:
        return [[values[i] for i in s] for s in self._slices]

    def reset(self) -> Any:
        calls = [
            a.reset.remote(seeds, options)
            for a, seeds, options in zip(
                self._actors, self._split(self._seeds), self._split(self._options), strict=True
            )
        ]
        results = self._ray.get(calls)
        self.reset_infos = [info for _, infos in results for info in infos]
        self._reset_seeds()
        self._reset_options()
        return np.concatenate([obs for obs, _ in results])

    def step_async(self, actions: np.ndarray) -> None:
        self._pending = [
            a.step.remote(actions[s]) for a, s in zip(self._actors, self._slices, strict=True)
        ]

    def step_wait(self) -> Any:
        results = self._ray.get(self._pending)
        self._pending = []
        obs = np.concatenate([r[0] for r in results])
        rewards = np.concatenate([r[1] for r in results])
        dones = np.concatenate([r[2] for r in results])
        infos = [info for r in results for info in r[3]]
        self.reset_infos = [info for r in results for info in r[4]]
        return obs, rewards, dones, infos

    def _per_actor(self, name: str, indices: VecEnvIndices, *args: Any, **kwargs: Any) -> list[Any]:
        wanted = set(self._get_indices(indices))
        calls = []
        for actor, s in zip(self._actors, self._slices, strict=True):
            local = [j for j, i in enumerate(s) if i in wanted]
            if local:
                calls.append(actor.call.remote(name, args, kwargs, local))
        return [value for values in self._ray.get(calls) for value in values]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._per_actor("get_attr", indices, attr_name)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._per_actor("set_attr", indices, attr_name, value)

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        return self._per_actor("env_method", indices, method_name, *method_args, **method_kwargs)

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return self._per_actor("env_is_wrapped", indices, wrapper_class)

    def close(self) -> None:
        if self.closed:
            return
        self._ray.get([a.close.remote() for a in self._actors])
        for actor in self._actors:
            self._ray.kill(actor)
        if self._owns_ray:
            self._ray.shutdown()
        self.closed = True
