"""Which detection is which controlled particle, frame after frame.

Identity comes from the tracker's ids when the loop provides them, else from
proximity to the last fix; a lost particle is replaced by the detection nearest its
target. Several targets are matched one-to-one (Hungarian assignment) so two spots
never chase the same particle.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


class MultiFollower:
    """Keeps a detection index per target; `None` where no particle is available."""

    def __init__(self, n_targets: int, track_radius_um: float) -> None:
        self.n = n_targets
        self.radius = track_radius_um
        self.reset()

    def reset(self) -> None:
        self.ids: list[int | None] = [None] * self.n
        self.last: list[np.ndarray | None] = [None] * self.n

    def assign(
        self, detections: np.ndarray, track_ids: np.ndarray | None, targets: np.ndarray
    ) -> list[int | None]:
        """Detection index for each target; also returns changed identities via `self.ids`."""
        out: list[int | None] = [None] * self.n
        taken: set[int] = set()
        for k in range(self.n):  # keep whoever we already hold
            idx = self._same(detections, track_ids, k)
            if idx is not None and idx not in taken:
                out[k] = idx
                taken.add(idx)
        free_t = [k for k in range(self.n) if out[k] is None]
        free_d = [i for i in range(len(detections)) if i not in taken]
        if free_t and free_d:
            cost = np.hypot(
                *(detections[free_d][None, :, :] - targets[free_t][:, None, :]).transpose(2, 0, 1)
            )
            rows, cols = linear_sum_assignment(cost)
            for r, c in zip(rows, cols, strict=True):
                out[free_t[r]] = free_d[c]
        for k, idx in enumerate(out):
            if idx is None:
                self.ids[k], self.last[k] = None, None
                continue
            new_id = int(track_ids[idx]) if track_ids is not None else None
            if self.last[k] is None or (track_ids is not None and new_id != self.ids[k]):
                self.ids[k] = new_id
            self.last[k] = np.asarray(detections[idx], float)
        return out

    def _same(self, detections: np.ndarray, track_ids: np.ndarray | None, k: int) -> int | None:
        if len(detections) == 0 or self.last[k] is None:
            return None
        if track_ids is not None and self.ids[k] is not None:
            same = np.flatnonzero(track_ids == self.ids[k])
            return int(same[0]) if len(same) else None
        d = np.hypot(*(detections - self.last[k]).T)
        best = int(np.argmin(d))
        return best if d[best] <= self.radius else None
