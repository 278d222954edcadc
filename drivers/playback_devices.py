"""A recorded run as pure-Python Micro-Manager devices: the camera plays the recording.

"Real first" means a plan that runs on a twin also runs on what a real instrument
recorded. The playback camera serves a recording's frames (a scopeloop run's OME-Zarr,
or a microscope's TIFF stack / image files) at the configured frame interval, looping,
through the same `DriverNode`, gate, watchdog and protocol as a live rig. The stage,
laser and SLM take every command the gate passes and report it in the frame headers,
but the recording is open loop: nothing commanded changes what was recorded, and the
headers say so (`playback`). No light reaches any sample, so there is no light truth.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pymmcore_plus.experimental.unicore import UniMMCore

from drivers.config import DeviceNames, PlaybackSettings
from drivers.light import SlmCalibration, slm_image_spots
from drivers.recorded_frames import (
    FRAMES_NAME,
    IMAGE_SUFFIXES,
    ImageReadError,
    iter_frames,
    read_recording,
)
from drivers.twin_devices import RigCamera, TwinLaser, TwinSLM, TwinXYStage, _sleep_until

FrameSource = Callable[[], Iterator[np.ndarray]]  # a fresh pass over the recording


def _recording_source(path: Path) -> tuple[FrameSource, int, float | None]:
    """A scopeloop OME-Zarr recording: its frames, and the pixel size its frames carry."""
    recording = read_recording(path)
    if len(recording) == 0:
        raise ValueError(f"driver.playback.path: {path} holds no readable frames")
    meta = recording.frame_metadata(0) or (recording.metadata[0] if recording.metadata else {})
    size = recording.pixel_size_um if recording.unit in (None, "micrometer") else None
    size = size or meta.get("pixel_size_um", (meta.get("state") or {}).get("pixel_size_um"))

    def frames() -> Iterator[np.ndarray]:
        return (recording.frame(i) for i in range(len(recording)))

    return frames, len(recording), float(size) if size else None


def _image_paths(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"driver.playback.path: {path} has no {'/'.join(sorted(IMAGE_SUFFIXES))} files"
            )
        return files
    return [path]


def _tiff_pixel_size_um(path: Path) -> float | None:
    """Pixel size from an OME-TIFF's PhysicalSizeX (µm), if the file states one."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                from xml.etree import ElementTree

                root = ElementTree.fromstring(tif.ome_metadata)
                for element in root.iter():
                    if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
                        unit = element.attrib.get("PhysicalSizeXUnit", "µm")
                        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
                        if scale:
                            return float(element.attrib["PhysicalSizeX"]) * scale
    except Exception:  # no OME metadata: the config must state the pixel size
        return None
    return None


def open_playback(path: Path) -> tuple[FrameSource, int, float | None]:
    """(a fresh pass over the frames, frame count, pixel size in µm if recorded)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"driver.playback.path: {path} does not exist")
    if (path / FRAMES_NAME).exists():
        path = path / FRAMES_NAME  # a run directory
    if path.is_dir() and ((path / "zarr.json").is_file() or path.name.endswith(".ome.zarr")):
        return _recording_source(path)
    files = _image_paths(path)
    try:
        count = sum(1 for _ in iter_frames(files))
    except ImageReadError as exc:
        raise ValueError(f"driver.playback.path: {exc}") from None
    size = _tiff_pixel_size_um(files[0]) if files[0].suffix.lower() in {".tif", ".tiff"} else None
    return (lambda: (frame for _, _, frame in iter_frames(files))), count, size


def _as_uint16(frame: np.ndarray) -> np.ndarray:
    """The playback camera is 16-bit like the rig's: integers are kept, floats rescaled."""
    if np.issubdtype(frame.dtype, np.integer):
        return np.clip(frame, 0, 65535).astype(np.uint16, copy=False)
    finite = np.nan_to_num(frame.astype(np.float64))
    lo, hi = float(finite.min()), float(finite.max())
    return ((finite - lo) * (65535.0 / (hi - lo if hi > lo else 1.0))).astype(np.uint16)


class PlaybackRig:
    """What the playback devices share: the frame source, pacing and commanded state."""

    def __init__(
        self, settings: PlaybackSettings, source: FrameSource, count: int, exposure_ms: float
    ) -> None:
        self.settings = settings
        self._source = source
        self.count = count
        self._frames = source()
        first = next(self._source())
        self.shape = first.shape
        self.exposure_ms = exposure_ms
        self.stage_um = (0.0, 0.0)
        self.laser_x_um = self.laser_y_um = self.laser_power_mw = 0.0
        self.slm_image = np.zeros((settings.slm_px, settings.slm_px), dtype=np.uint8)
        self.slm_spots: tuple[Any, ...] = ()
        self.names = DeviceNames()
        self.index = 0  # frames served, over every pass
        self._lock = threading.Lock()
        self._next_start_s = 0.0

    def record_command(self) -> None:
        """Commands change nothing in a recording; the node's headers report them."""

    def display_slm(self, image: np.ndarray) -> None:
        self.slm_image = image.copy()
        self.slm_spots = tuple(slm_image_spots(image, SlmCalibration.from_devices(self.names)))

    def next_frame(self) -> tuple[np.ndarray, int]:
        with self._lock:
            frame = next(self._frames, None)
            if frame is None:  # end of the recording: start the next pass
                self._frames = self._source()
                frame = next(self._frames)
            index = self.index
            self.index += 1
        if frame.shape != self.shape:
            raise ValueError(
                f"driver.playback.path: frame {index % self.count} has shape {frame.shape}, "
                f"the first has {self.shape}"
            )
        return frame, index

    def acquire(self, buffer: np.ndarray) -> dict[str, Any]:
        """Serve the next recorded frame, paced like an exposure plus readout."""
        interval_s = (self.settings.frame_interval_ms or self.exposure_ms) / 1000.0
        t0 = max(time.monotonic(), self._next_start_s)
        _sleep_until(t0)
        frame, index = self.next_frame()
        buffer[:] = _as_uint16(frame)
        t_end = t0 + min(self.exposure_ms / 1000.0, interval_s)
        _sleep_until(t_end)
        self._next_start_s = t0 + interval_s
        return {
            "playback_frame": index % self.count,
            "t_exp_start_ns": int(t0 * 1e9),
            "t_exp_end_ns": int(t_end * 1e9),
        }


class PlaybackCamera(RigCamera):
    """A camera whose photons were recorded earlier."""

    def sensor_shape(self) -> tuple[int, int]:
        return self._rig.shape

    def snap(self, buffer: np.ndarray) -> Mapping[str, Any]:
        return self._rig.acquire(buffer)


def build_playback_core(
    settings: PlaybackSettings, exposure_ms: float, names: DeviceNames
) -> tuple[UniMMCore, PlaybackRig, float]:
    """UniMMCore with the playback camera, an XY stage, a laser and an SLM; and the
    pixel size (the recording's own unless the config states one)."""
    if settings.path is None:
        raise ValueError("driver.playback.path: kind 'playback' needs a recording to play")
    source, count, recorded_px = open_playback(Path(settings.path))
    pixel_um = settings.pixel_size_um or recorded_px
    if pixel_um is None:
        raise ValueError(
            f"driver.playback.pixel_size_um: {settings.path} does not say its pixel size; "
            "set it (µm per pixel, > 0)"
        )
    rig = PlaybackRig(settings, source, count, exposure_ms)
    rig.names = names
    if len(rig.shape) != 2:
        raise ValueError(f"driver.playback.path: frames must be 2-D, got shape {rig.shape}")
    core = UniMMCore()
    core.loadPyDevice("Camera", PlaybackCamera(rig))
    core.loadPyDevice("XY", TwinXYStage(rig))
    core.loadPyDevice(names.laser, TwinLaser(rig))  # type: ignore[arg-type]
    core.loadPyDevice(names.slm, TwinSLM(rig))  # type: ignore[arg-type]
    core.initializeAllDevices()
    core.setCameraDevice("Camera")
    core.setXYStageDevice("XY")
    core.setSLMDevice(names.slm)
    core.setExposure(exposure_ms)
    return core, rig, float(pixel_um)
