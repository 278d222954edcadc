"""The twins as gymnasium environments, hosted on the driver side like every twin.

A trainer in `agent/` validates an env's settings and builds it through here (or by
its gymnasium id, `simulators.rl_envs:scopeloop/...`, in a worker process), so the
agent still imports nothing of `simulators/`.
"""

from __future__ import annotations

from simulators.rl_envs import ENV_IDS, TwinEnvConfig, make_env

__all__ = ["ENV_IDS", "TwinEnvConfig", "make_env"]
