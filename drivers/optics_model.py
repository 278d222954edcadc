"""The twin's optical-force model, hosted on the driver side like every twin.

The surrogate trainer in `agent/training/optics.py` samples the exact model and saves
the surrogate the twin's tweezers use through here, so the agent still imports nothing
of `simulators/`.
"""

from __future__ import annotations

from simulators.optics.forces import ExactForceModel, TrapOptics
from simulators.optics.surrogate import ForceSurrogate, SurrogateDomain, exact_samples

__all__ = ["ExactForceModel", "ForceSurrogate", "SurrogateDomain", "TrapOptics", "exact_samples"]
