"""Reinforcement learning on the particle twin, deployed unchanged in the live loop.

codec: Observation <-> network input / output (shared by the gym envs in
simulators/rl_envs.py and the live RlPolicy); qlearning: tabular baseline; agents:
checkpoints; policy: RlPolicy; train: `scopeloop train` (kind: rl); rollout: scoring.
"""
