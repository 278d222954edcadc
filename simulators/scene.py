"""One instrument's scene: a particle twin imaged by a camera, one exposure at a time.

The exposure is split into equal physics sub-steps so that motion blur is rendered and
laser changes can land mid-exposure, as they would on a real rig. An optional slow stage
drift moves the field of view over the sample, the nuisance feedback loops must reject.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from simulators.camera import CameraConfig, CameraModel
from simulators.particles import ParticleTwin, ParticleTwinConfig


class ParticleScene:
    """Particle twin + camera sharing one seed (independent streams via SeedSequence)."""

    def __init__(
        self,
        twin_config: ParticleTwinConfig,
        camera_config: CameraConfig,
        seed: int,
        substeps: int = 5,
        stage_drift_um_s: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        if not 1 <= int(substeps) <= 100:
            raise ValueError(f"substeps must be in 1..100, got {substeps}")
        drift = np.asarray(stage_drift_um_s, dtype=float)
        if drift.shape != (2,) or not np.all(np.isfinite(drift)):
            raise ValueError(f"stage_drift_um_s must be two finite numbers, got {stage_drift_um_s}")
        self.substeps = int(substeps)
        self.stage_drift_um_s = (float(drift[0]), float(drift[1]))
        twin_ss, cam_ss = np.random.SeedSequence(seed).spawn(2)
        # Integer seeds drawn from the spawned sequences keep both classes' int-seed API.
        twin_seed = int(twin_ss.generate_state(1, dtype=np.uint64)[0])
        cam_seed = int(cam_ss.generate_state(1, dtype=np.uint64)[0])
        self.camera = CameraModel(camera_config, cam_seed)
        self.twin = ParticleTwin(twin_config, camera_config.box_um, twin_seed)

    def expose(
        self,
        exposure_s: float,
        before_substep: Callable[[int, float], None] | None = None,
        out: np.ndarray | None = None,
        view_offset_um: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run one exposure; returns (uint16 frame, (S, N, 2) sample positions per sub-step).

        `before_substep(k, t_s)` is called before sub-step k so a real-time device can
        pace itself and apply laser changes that take effect mid-exposure.
        `view_offset_um` is where the camera field's origin sits on the sample (a stage
        move shifts it), so the frame shows positions minus that offset; stage drift adds
        `stage_drift_um_s * t` (t = twin time of each sub-step sample) on top. Returned
        positions stay in sample coordinates.
        """
        if exposure_s < 0.0:
            raise ValueError(f"exposure_s must be >= 0, got {exposure_s}")
        dt = exposure_s / self.substeps
        n = self.twin.config.n_particles
        traj = np.empty((self.substeps, n, 2))
        for k in range(self.substeps):
            if before_substep is not None:
                before_substep(k, self.twin.t_s)
            traj[k] = self.twin.step(dt)
        offset = np.asarray(view_offset_um, dtype=float)
        if self.stage_drift_um_s != (0.0, 0.0):
            times = self.twin.t_s - dt * np.arange(self.substeps - 1, -1, -1.0)
            offset = offset + times[:, None, None] * np.asarray(self.stage_drift_um_s)
        frame = self.camera.render(traj - offset, exposure_s, out=out)
        return frame, traj

    def drift_offset_um(self, t_s: float | None = None) -> tuple[float, float]:
        """Stage-drift part of the view offset at twin time t_s (default: now)."""
        t = self.twin.t_s if t_s is None else float(t_s)
        return (self.stage_drift_um_s[0] * t, self.stage_drift_um_s[1] * t)

    def ground_truth(self) -> dict[str, Any]:
        """JSON-friendly state now: sample-frame positions (N, 2), orientations (N,) and
        absolute temperatures (N,), for scoring detectors and controllers."""
        twin = self.twin
        return {
            "t_s": twin.t_s,
            "positions_um": twin.positions_um.tolist(),
            "orientations_rad": twin.orientations_rad.tolist(),
            "temperatures_k": twin.temperature_at_particles_k().tolist(),
            "drift_offset_um": list(self.drift_offset_um()),
        }
