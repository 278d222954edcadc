"""Online particle linking: give each detection a track id as frames arrive.

The loop needs ids per frame (to follow one particle while steering the stage), so
linking is frame-by-frame rather than a global offline solve. Each frame, live tracks
and detections are matched by one global nearest-neighbour assignment
(``scipy.optimize.linear_sum_assignment``) on squared distances from each track's last
position. There is deliberately no velocity model: for diffusing particles the last
position is the best predictor, and a wrong velocity estimate is worse than none.

A pair is allowed only within a gate of ``max_displacement_um * sqrt(gap + 1)``, where
``gap`` is how many frames the track has gone unseen: diffusive spread grows with the
square root of elapsed time, so a briefly lost particle (blink, defocus) can be picked
up again. Pairs outside the gate cost more than any complete set of in-gate pairs, so
the solver first maximises the number of links and only then minimises their total
squared length. Tracks unseen for more than ``max_gap_frames`` frames are retired.

Memory stays bounded for arbitrarily long runs: each track keeps its last
``MAX_TRACK_POINTS`` points in a ring buffer, and retired tracks' histories go into a
FIFO capped both in tracks and in total points, the oldest being dropped first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

__all__ = ["MAX_TRACK_POINTS", "Tracker", "TrackerConfig"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

MAX_TRACK_POINTS = 10_000  # points kept per track; older ones are overwritten.
_MAX_RETIRED_TRACKS = 10_000  # retired histories kept for history() look-ups ...
_MAX_RETIRED_POINTS = 2_000_000  # ... and their total points (48 MB of float64).
_FIRST_CAPACITY = 16  # ring buffers start small: most tracks are short.
_DENSE_PAIRS = 40_000  # above this many track x detection pairs, gate with a k-d tree.
_SMALL_PAIRS = 16  # up to this many, gate in plain Python (`Tracker._separate_links`).


class TrackerConfig(BaseModel):
    """Linking settings; validated so a bad config fails at load, not mid-run."""

    model_config = ConfigDict(extra="forbid")

    # Largest step between consecutive frames; across a gap it grows as sqrt(gap + 1).
    max_displacement_um: float = Field(default=2.0, gt=0, le=1e4)
    # Frames a track may go undetected and still be continued.
    max_gap_frames: int = Field(default=3, ge=0, le=1000)
    # Tracks with fewer detections are tentative: not in active_tracks() and not archived.
    min_track_length: int = Field(default=1, ge=1, le=1_000_000)


class _Ring:
    """Last MAX_TRACK_POINTS (frame, x, y) rows of one track; grows by doubling."""

    __slots__ = ("buf", "n", "start")

    def __init__(self) -> None:
        self.buf = np.empty((_FIRST_CAPACITY, 3), dtype=np.float64)
        self.n = 0
        self.start = 0

    def append(self, frame: int, x: float, y: float) -> None:
        cap = self.buf.shape[0]
        if self.n == cap and cap < MAX_TRACK_POINTS:
            # Never full-and-wrapped here: start stays 0 until the cap is reached.
            grown = np.empty((min(2 * cap, MAX_TRACK_POINTS), 3), dtype=np.float64)
            grown[:cap] = self.buf
            self.buf, cap = grown, grown.shape[0]
        if self.n < cap:
            self.buf[self.n] = (frame, x, y)
            self.n += 1
        else:
            self.buf[self.start] = (frame, x, y)
            self.start = (self.start + 1) % cap

    def array(self) -> FloatArray:
        """Oldest-first copy, so callers never see the buffer being overwritten."""
        if self.start == 0:
            return self.buf[: self.n].copy()
        return np.concatenate((self.buf[self.start :], self.buf[: self.start]))


def _check_detections(detections_um: np.ndarray) -> FloatArray:
    """Reject input that would otherwise fail deep inside the assignment with a vague error."""
    arr = np.asarray(detections_um)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"detections_um must have shape (N, 2), got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":  # signed, unsigned, floating; not bool or complex
        raise ValueError(f"detections_um must be a real numeric array, got dtype {arr.dtype}")
    out = arr.astype(np.float64, copy=False)
    if not np.isfinite(out).all():
        raise ValueError("detections_um contains NaN or inf values")
    return out


class Tracker:
    """Frame-by-frame linker: ``update`` returns one track id per detection row.

    Ids are never reused within a run (until ``reset``). Not thread-safe: use one
    tracker per stream.
    """

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config if config is not None else TrackerConfig()
        self.reset()

    def reset(self) -> None:
        """Forget all tracks and history; ids restart at 0 as in a new tracker."""
        self._next_id = 0
        self._frame: int | None = None
        # Live tracks as parallel arrays, so gating and costs are vectorised.
        self._ids: IntArray = np.zeros(0, dtype=np.int64)
        self._pos: FloatArray = np.zeros((0, 2), dtype=np.float64)
        self._last: IntArray = np.zeros(0, dtype=np.int64)
        self._count: IntArray = np.zeros(0, dtype=np.int64)
        self._history: dict[int, _Ring] = {}
        self._retired: OrderedDict[int, FloatArray] = OrderedDict()
        self._retired_points = 0

    def update(self, frame_index: int, detections_um: np.ndarray) -> IntArray:
        """Link one frame's (N, 2) detections; returns their (N,) track ids in row order.

        Frame indices must increase; skipped indices count as frames without detections.
        """
        det = _check_detections(detections_um)
        if isinstance(frame_index, bool) or not isinstance(frame_index, int | np.integer):
            raise ValueError(f"frame_index must be an integer, got {frame_index!r}")
        frame = int(frame_index)
        if self._frame is not None and frame <= self._frame:
            raise ValueError(f"frame_index must increase: got {frame} after {self._frame}")
        self._frame = frame
        self._retire(frame)

        n = det.shape[0]
        ids = np.empty(n, dtype=np.int64)
        matched = np.zeros(n, dtype=bool)
        linked = 0
        if n and self._ids.size:
            rows, cols = self._assign(frame, det)
            linked = rows.size
            if linked:
                ids[cols] = self._ids[rows]
                matched[cols] = True
                self._pos[rows] = det[cols]
                self._last[rows] = frame
                self._count[rows] += 1
                hist = self._history
                for tid, (x, y) in zip(ids[cols].tolist(), det[cols].tolist(), strict=True):
                    hist[tid].append(frame, x, y)
        if linked == n:  # every detection continued a track (a held particle, each frame)
            return ids

        new = np.flatnonzero(~matched)
        if new.size:
            new_ids = np.arange(self._next_id, self._next_id + new.size, dtype=np.int64)
            self._next_id += new.size
            ids[new] = new_ids
            self._ids = np.concatenate((self._ids, new_ids))
            self._pos = np.concatenate((self._pos, det[new]))
            self._last = np.concatenate((self._last, np.full(new.size, frame, dtype=np.int64)))
            self._count = np.concatenate((self._count, np.ones(new.size, dtype=np.int64)))
            for tid, (x, y) in zip(new_ids.tolist(), det[new].tolist(), strict=True):
                ring = _Ring()
                ring.append(frame, x, y)
                self._history[tid] = ring
        return ids

    def _assign(self, frame: int, det: FloatArray) -> tuple[IntArray, IntArray]:
        """Gated global nearest-neighbour assignment: (track rows, detection rows) linked."""
        if self._ids.size * det.shape[0] <= _SMALL_PAIRS:
            links = self._separate_links(frame, det)
            if links is not None:
                return links
        gate2 = self.config.max_displacement_um**2 * (frame - self._last + 0.0)  # gap + 1
        ti, di, d2 = self._candidate_pairs(det, gate2)
        if ti.size == 0:
            return ti, di
        # A pair whose track and detection have no other in-gate partner is its own
        # component of the assignment problem, so it is linked without the solver.
        row_deg = np.bincount(ti, minlength=self._ids.size)
        col_deg = np.bincount(di, minlength=det.shape[0])
        alone = (row_deg[ti] == 1) & (col_deg[di] == 1)
        link_t, link_d = [ti[alone]], [di[alone]]
        if not alone.all():
            ti, di, d2 = ti[~alone], di[~alone], d2[~alone]
            rows, r_inv = np.unique(ti, return_inverse=True)
            cols, c_inv = np.unique(di, return_inverse=True)
            # Out-of-gate cost exceeds any full set of in-gate links: most links first.
            forbidden = float(d2.max()) * (min(rows.size, cols.size) + 1.0) + 1.0
            cost = np.full((rows.size, cols.size), forbidden)
            cost[r_inv, c_inv] = d2
            r, c = linear_sum_assignment(cost)
            keep = cost[r, c] < forbidden
            link_t.append(rows[r[keep]])
            link_d.append(cols[c[keep]])
        return np.concatenate(link_t), np.concatenate(link_d)

    def _separate_links(self, frame: int, det: FloatArray) -> tuple[IntArray, IntArray] | None:
        """A few tracks and detections (a trap's one particle), in plain Python: numpy's
        per-call cost would dominate, and it sets the loop's frame-to-command time. The
        in-gate pairs when each is its own component (no track or detection in two of
        them): what `_assign` links without the solver, by the same arithmetic. None
        when the solver is needed."""
        scale = self.config.max_displacement_um**2
        points = det.tolist()
        pairs: list[tuple[int, int]] = []
        for row, ((tx, ty), last) in enumerate(
            zip(self._pos.tolist(), self._last.tolist(), strict=True)
        ):
            gate2 = scale * (frame - last + 0.0)
            for col, (x, y) in enumerate(points):
                dx, dy = tx - x, ty - y
                if dx * dx + dy * dy <= gate2:
                    pairs.append((row, col))
        rows = [r for r, _ in pairs]
        cols = [c for _, c in pairs]
        if len(set(rows)) < len(rows) or len(set(cols)) < len(cols):
            return None
        return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)

    def _candidate_pairs(
        self, det: FloatArray, gate2: FloatArray
    ) -> tuple[IntArray, IntArray, FloatArray]:
        """In-gate (track row, detection row, squared distance) triples.

        Small problems use a dense distance matrix; large ones a k-d tree, since the
        dense matrix alone costs ~10 ms at 1000 x 1000.
        """
        pos = self._pos
        if pos.shape[0] * det.shape[0] <= _DENSE_PAIRS:
            dx = pos[:, 0, None] - det[None, :, 0]
            dy = pos[:, 1, None] - det[None, :, 1]
            d2 = dx * dx + dy * dy
            ti, di = np.nonzero(d2 <= gate2[:, None])
            return ti.astype(np.int64), di.astype(np.int64), d2[ti, di]
        pairs = cKDTree(pos).sparse_distance_matrix(
            cKDTree(det), float(np.sqrt(gate2.max())), output_type="ndarray"
        )
        ti, di = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
        d2 = pairs["v"] * pairs["v"]
        ok = d2 <= gate2[ti]
        return ti[ok], di[ok], d2[ok]

    def _retire(self, frame: int) -> None:
        """Move tracks unseen for more than max_gap_frames into the bounded archive."""
        dead = (frame - self._last - 1) > self.config.max_gap_frames
        if not dead.any():
            return
        min_len = self.config.min_track_length
        for tid, count in zip(self._ids[dead].tolist(), self._count[dead].tolist(), strict=True):
            ring = self._history.pop(tid)
            if count >= min_len:
                self._archive(tid, ring.array())
        live = ~dead
        self._ids, self._pos = self._ids[live], self._pos[live]
        self._last, self._count = self._last[live], self._count[live]

    def _archive(self, track_id: int, points: FloatArray) -> None:
        """Keep a retired history, dropping the oldest retired tracks beyond the caps."""
        self._retired[track_id] = points
        self._retired_points += points.shape[0]
        while self._retired and (
            len(self._retired) > _MAX_RETIRED_TRACKS or self._retired_points > _MAX_RETIRED_POINTS
        ):
            _, old = self._retired.popitem(last=False)
            self._retired_points -= old.shape[0]

    def active_tracks(self) -> dict[int, FloatArray]:
        """Live tracks with at least min_track_length detections: id -> last (x, y)."""
        keep = np.flatnonzero(self._count >= self.config.min_track_length)
        pos = self._pos[keep].copy()
        return {tid: pos[i] for i, tid in enumerate(self._ids[keep].tolist())}

    def history(self, track_id: int) -> FloatArray:
        """(T, 3) rows of (frame_index, x, y), oldest first, for a live or archived track.

        Raises KeyError for ids never issued, tentative tracks that were retired, or
        archived tracks already dropped to bound memory.
        """
        ring = self._history.get(int(track_id))
        if ring is not None:
            return ring.array()
        points = self._retired.get(int(track_id))
        if points is None:
            raise KeyError(f"track_id {track_id} has no stored history")
        return points.copy()
