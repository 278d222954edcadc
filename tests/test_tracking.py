"""Tests for agent.detection.tracking on simulated Brownian particles with known identities."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import ValidationError

import agent.detection.tracking as tracking
from agent.detection.tracking import Tracker, TrackerConfig


def _brownian(
    rng: np.random.Generator, n: int, frames: int, box_um: float, step_um: float
) -> np.ndarray:
    """(frames, n, 2) positions: uniform start, Gaussian steps of step_um per axis."""
    start = rng.uniform(0.0, box_um, (1, n, 2))
    steps = rng.normal(0.0, step_um, (frames - 1, n, 2))
    return np.concatenate((start, start + np.cumsum(steps, axis=0)))


def _track_ids(tracker: Tracker, traj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(frames, n) ids per true particle, feeding detections in a shuffled order."""
    out = np.empty(traj.shape[:2], dtype=np.int64)
    for f, pos in enumerate(traj):
        order = rng.permutation(len(pos))
        ids = tracker.update(f, pos[order])
        out[f, order] = ids
    return out


def test_brownian_ids_stable_over_200_frames() -> None:
    rng = np.random.default_rng(1)
    # 40 particles in 100 x 100 um (mean spacing ~16 um), rms step 0.2 um << 2 um gate.
    traj = _brownian(rng, 40, 200, 100.0, 0.2)
    tracker = Tracker()
    ids = _track_ids(tracker, traj, rng)
    switches = int(np.count_nonzero(ids[1:] != ids[:-1]))
    assert switches == 0
    assert len(np.unique(ids[0])) == 40
    assert sorted(tracker.active_tracks()) == sorted(ids[0].tolist())
    # History follows the particle: every frame, exact positions in order.
    tid = int(ids[0, 7])
    hist = tracker.history(tid)
    assert hist.shape == (200, 3)
    np.testing.assert_array_equal(hist[:, 0], np.arange(200))
    np.testing.assert_array_equal(hist[:, 1:], traj[:, 7])
    np.testing.assert_array_equal(tracker.active_tracks()[tid], traj[-1, 7])


def _blink(absent: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of a drifting particle (plus a static neighbour) before and after `absent` frames off."""
    tracker = Tracker()  # default max_gap_frames = 3
    other = np.array([50.0, 50.0])
    before, after = [], []
    for f in range(20):
        p = np.array([10.0 + 0.3 * f, 10.0])
        if 10 <= f < 10 + absent:
            ids = tracker.update(f, other[None])
            continue
        ids = tracker.update(f, np.stack((p, other)))
        (before if f < 10 else after).append(ids)
    return np.array(before), np.array(after)


def test_gap_of_two_frames_keeps_id() -> None:
    before, after = _blink(2)
    assert set(before[:, 0]) == set(after[:, 0]) == {0}
    assert set(after[:, 1]) == {1}  # the neighbour is unaffected


def test_gap_of_five_frames_gets_new_id() -> None:
    before, after = _blink(5)
    assert set(before[:, 0]) == {0}
    assert set(after[:, 0]) == {2}  # the old track was retired; ids are never reused
    assert set(after[:, 1]) == {1}


def test_retired_history_kept_and_gap_grows_gate() -> None:
    tracker = Tracker(TrackerConfig(max_displacement_um=1.0, max_gap_frames=3))
    tracker.update(0, np.array([[0.0, 0.0]]))
    # After 3 missed frames the gate is 1 * sqrt(4) = 2 um: 1.9 um links, 2.1 um would not.
    assert tracker.update(4, np.array([[1.9, 0.0]])).tolist() == [0]
    assert tracker.update(5, np.array([[3.0, 0.0]])).tolist() == [1]  # 1.1 um > 1 um gate
    tracker.update(10, np.zeros((0, 2)))
    assert tracker.active_tracks() == {}
    np.testing.assert_array_equal(tracker.history(0), [[0, 0, 0], [4, 1.9, 0]])
    with pytest.raises(KeyError, match="track_id"):
        tracker.history(99)
    tracker.reset()
    assert tracker.update(0, np.array([[5.0, 5.0]])).tolist() == [0]


def _cross(offset_um: float) -> np.ndarray:
    """(frames, 2) ids of two particles moving head-on at 0.4 um/frame, `offset_um` apart in y."""
    tracker = Tracker()
    out = []
    for f in range(25):
        a = (-4.9 + 0.4 * f, 0.0)
        b = (4.9 - 0.4 * f, offset_um)
        out.append(tracker.update(f, np.array([a, b])))
    return np.array(out)


def test_crossing_far_apart_keeps_ids() -> None:
    # Closest approach 5 um > 2 x gate: the paths never compete.
    ids = _cross(5.0)
    assert (ids == [0, 1]).all()


def test_crossing_close_swaps_ids() -> None:
    # Documented limitation: with no motion model, particles passing within less than a
    # frame's step of each other are linked to the nearer new position, i.e. they swap.
    # No track is lost or created; only the identities exchange after the crossing.
    ids = _cross(0.1)
    assert (ids[:13] == [0, 1]).all()
    assert (ids[13:] == [1, 0]).all()
    assert ids.max() == 1


def test_min_track_length_hides_tentative_tracks() -> None:
    tracker = Tracker(TrackerConfig(min_track_length=3))
    for f in range(2):
        tracker.update(f, np.array([[1.0, 1.0]]))
    assert tracker.active_tracks() == {}
    tracker.update(2, np.array([[1.0, 1.0]]))
    assert list(tracker.active_tracks()) == [0]


def test_history_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "MAX_TRACK_POINTS", 50)
    monkeypatch.setattr(tracking, "_MAX_RETIRED_TRACKS", 3)
    tracker = Tracker(TrackerConfig(max_gap_frames=0))
    for f in range(120):
        tracker.update(f, np.array([[0.0, 0.0]]))
    hist = tracker.history(0)
    np.testing.assert_array_equal(hist[:, 0], np.arange(70, 120))  # last 50, oldest first
    # Short-lived far-apart tracks: only the 3 most recently retired are kept.
    for k in range(6):
        tracker.update(200 + 2 * k, np.array([[100.0 * (k + 1), 0.0]]))
    tracker.update(300, np.zeros((0, 2)))
    assert len(tracker._retired) == 3
    with pytest.raises(KeyError):
        tracker.history(0)
    assert tracker.history(6).shape == (1, 3)


@pytest.mark.parametrize("dense_pairs", [10**9, 0])
def test_dense_and_kdtree_gating_agree(monkeypatch: pytest.MonkeyPatch, dense_pairs: int) -> None:
    # Crowded, with dropouts, so both the solver and the uncontested shortcut are exercised.
    rng = np.random.default_rng(3)
    traj = _brownian(rng, 300, 40, 40.0, 0.6)
    keep = rng.random(traj.shape[:2]) > 0.1
    results = []
    for pairs in (10**9, dense_pairs):
        monkeypatch.setattr(tracking, "_DENSE_PAIRS", pairs)
        tracker = Tracker()
        results.append(
            np.concatenate(
                [tracker.update(f, p[k]) for f, (p, k) in enumerate(zip(traj, keep, strict=True))]
            )
        )
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_few_particles_link_as_the_numpy_path_does(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    # A trap's few particles, close enough to contest each other's gates, with dropouts
    # and a spurious detection now and then: the plain-Python links give the same ids.
    rng = np.random.default_rng(5 + n)
    traj = _brownian(rng, n, 300, 3.0, 0.8)
    keep = rng.random(traj.shape[:2]) > 0.15
    extra = rng.random(300) < 0.1
    frames = [
        np.vstack([p[k], rng.uniform(0.0, 3.0, (1, 2))]) if e else p[k]
        for p, k, e in zip(traj, keep, extra, strict=True)
    ]
    results = []
    for small in (0, tracking._SMALL_PAIRS):
        monkeypatch.setattr(tracking, "_SMALL_PAIRS", small)
        tracker = Tracker()
        results.append(np.concatenate([tracker.update(f, d) for f, d in enumerate(frames)]))
    np.testing.assert_array_equal(results[0], results[1])
    assert len(np.unique(results[0])) > n  # the gates were contested: some tracks broke


def test_100_detections_per_frame_is_fast() -> None:
    rng = np.random.default_rng(4)
    traj = _brownian(rng, 100, 200, 300.0, 0.2)
    tracker = Tracker()
    times = []
    for f, pos in enumerate(traj):
        t0 = time.perf_counter()
        tracker.update(f, pos)
        times.append(time.perf_counter() - t0)
    # Target is < 1 ms typical; the bound is loose for shared CI machines.
    assert float(np.median(times)) < 5e-3


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(4),
        np.zeros((3, 3)),
        np.zeros((2, 2, 2)),
        np.array([[1.0, np.nan]]),
        np.array([["a", "b"]]),
        np.ones((2, 2), dtype=bool),
    ],
)
def test_bad_detections_raise(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="detections_um"):
        Tracker().update(0, bad)


def test_bad_frame_index_raises() -> None:
    tracker = Tracker()
    tracker.update(5, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="frame_index"):
        tracker.update(5, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="frame_index"):
        tracker.update(6.0, np.zeros((0, 2)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_displacement_um", 0.0),
        ("max_displacement_um", -1.0),
        ("max_gap_frames", -1),
        ("min_track_length", 0),
        ("unknown", 1),
    ],
)
def test_config_bounds(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        TrackerConfig(**{field: value})
