"""One instrument's scene: a particle twin imaged by a camera, one exposure at a time.

The exposure is split into equal physics sub-steps so that motion blur is rendered and
laser changes can land mid-exposure, as they would on a real rig.
"""

from __future__ import annotations

from collections.abc import Callable

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
    ) -> None:
        if not 1 <= int(substeps) <= 100:
            raise ValueError(f"substeps must be in 1..100, got {substeps}")
        self.substeps = int(substeps)
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
        move shifts it), so the frame shows positions minus that offset.
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
        frame = self.camera.render(traj - np.asarray(view_offset_um), exposure_s, out=out)
        return frame, traj
