"""Event hooks shipped with scopeloop: smart-acquisition decisions taken inside the driver.

A hook runs on the driver node's thread for every event frame (drivers/event_hooks.py)
and answers with the next events. Name one in the driver config:

    event_hook: agent.plans.event_hooks:revisit_detections
    event_hook_args: {exposure_ms: 50, frames: 3}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent.detection.detect import DetectorConfig, ParticleDetector
from drivers.event_hooks import EventHook
from drivers.mda import EventFrame

SCREEN_ROLE = "screen"
REVISIT_ROLE = "revisit"


class RevisitSettings(BaseModel):
    """What a screening frame with objects in it earns: `frames` frames at `exposure_ms`."""

    model_config = ConfigDict(extra="forbid")

    exposure_ms: float = Field(gt=0.0, le=10_000.0)
    frames: int = Field(1, ge=1, le=1000)
    min_objects: int = Field(1, ge=1, le=100_000)
    detector: DetectorConfig = DetectorConfig()


def revisit_detections(**args: Any) -> EventHook:
    """Detect objects in every frame whose event metadata has ``role: screen``; where at
    least `min_objects` are found, queue `frames` frames at `exposure_ms` at the same
    stage position, marked ``role: revisit`` with the count and the screening event's id
    (the decision that triggered them, recorded with each frame); bad args raise
    pydantic's ValidationError, which the loader reports as one line."""
    settings = RevisitSettings.model_validate(args)
    detector = ParticleDetector(settings.detector)

    def hook(frame: EventFrame) -> list[dict[str, Any]] | None:
        event = frame.event
        if event.metadata.get("role") != SCREEN_ROLE:
            return None
        found = len(detector(frame.image))
        if found < settings.min_objects:
            return None
        here = {"x_pos": event.x_pos, "y_pos": event.y_pos, "z_pos": event.z_pos}
        where = {key: value for key, value in here.items() if value is not None}
        return [
            {
                **where,
                "exposure": settings.exposure_ms,
                "index": {**event.index, REVISIT_ROLE: k},
                "metadata": {"role": REVISIT_ROLE, "objects": found, "screen_id": frame.event_id},
            }
            for k in range(settings.frames)
        ]

    return hook
