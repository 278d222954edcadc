"""Scanning-probe driver configuration: the Nanonis controller to reach, limits, timeouts.

Validated by the driver itself, like ``drivers.config.DriverConfig``: the node must run,
and stay safe, with no agent attached, so every field has a range and a misspelt one
is an error. Lengths are um and voltages V on our side; the node converts to the SI
units Nanonis speaks.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from drivers.config import ServerAuth, StrictModel

Range = tuple[float, float]


class SpmLimits(StrictModel):
    """Hard limits enforced by the node on every command, before Nanonis sees a value."""

    bias_v: Range = (-10.0, 10.0)
    # Tip positions and every corner of a (rotated) scan frame must lie in x_um x y_um.
    x_um: Range = (-5.0, 5.0)
    y_um: Range = (-5.0, 5.0)
    max_scan_pixels: int = Field(1024, ge=1, le=8192)  # pixels per line and lines per frame
    max_spectrum_points: int = Field(4096, ge=2, le=100_000)
    max_spectrum_sweeps: int = Field(100, ge=1, le=10_000)
    max_spectra_per_batch: int = Field(10_000, ge=1, le=1_000_000)  # `spectra` positions

    @model_validator(mode="after")
    def _check_ranges(self) -> SpmLimits:
        for name in ("bias_v", "x_um", "y_um"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"limits.{name}: bounds must be finite, got ({lo}, {hi})")
            if lo > hi:
                raise ValueError(f"limits.{name}: lower bound {lo} is above upper bound {hi}")
        return self


class SpmDriverConfig(StrictModel):
    """Settings of an ``SpmNode``; satisfies ``drivers.node.NodeSettings``."""

    stream_endpoint: str = "auto"  # "auto": a private ipc:// path chosen at start
    command_endpoint: str = "auto"
    watchdog_ms: int = Field(500, ge=20, le=600_000)
    heartbeat_ms: int = Field(100, ge=5, le=60_000)
    # Frames queued per subscriber before the oldest are dropped (see DriverConfig). Deep:
    # every spectrum and scan is a measurement, and a `spectra` batch publishes them
    # faster than a busy agent may read them (1024 x 64 KB scan frames: 64 MB at most).
    stream_hwm: int = Field(1024, ge=4, le=100_000)
    auth: ServerAuth = ServerAuth()  # CURVE keys for tcp:// endpoints (drivers/auth.py)

    nanonis_host: str = "127.0.0.1"
    nanonis_port: int = Field(6501, ge=1, le=65_535)
    # The watchdog's own connection (drivers/spm_watchdog.py). A real controller serves
    # one client per port of its TCP Programming Interface list: give it another one
    # (6502). None: nanonis_port (the twin serves several clients on one port).
    watchdog_port: int | None = Field(None, ge=1, le=65_535)
    connect_timeout_s: float = Field(3.0, gt=0.0, le=60.0)
    # Longest wait for one Nanonis reply; the stream cannot be re-framed after a timeout,
    # so the link is dropped and re-opened on the next call.
    io_timeout_s: float = Field(10.0, gt=0.0, le=600.0)
    # A scan may take lines * scan_line_timeout_s + scan_timeout_margin_s before it is
    # stopped and reported as failed (line time = forward + backward trace).
    scan_line_timeout_s: float = Field(2.0, gt=0.0, le=600.0)
    scan_timeout_margin_s: float = Field(10.0, ge=0.0, le=3600.0)
    scan_poll_ms: int = Field(50, ge=1, le=10_000)  # Scan.StatusGet period while scanning
    # BiasSpectr.Start returns only when the sweep ends; its reply may take this long.
    spectrum_timeout_s: float = Field(120.0, gt=0.0, le=3600.0)
    # Points (move + sweep) of a `spectra` batch sent ahead of the sweep in progress, so
    # the controller goes from one sweep to the next without waiting for us. A sweep is
    # still never sent before its own move: if the controller refuses a queued move, the
    # sweep behind it runs at the previous point; it and the points queued after it are
    # dropped and the batch stops with an error. 0: a sweep is sent only once its move was
    # answered, so a refused move costs no sweep (the controller idles a round trip per point).
    spectra_queued: int = Field(1, ge=0, le=8)
    withdraw_timeout_ms: int = Field(5000, ge=100, le=600_000)
    # Re-read bias, tip, Z controller and scan status this often, so changes made at the
    # controller (an operator approaching the tip) count for the watchdog. 0: never.
    state_poll_ms: int = Field(500, ge=0, le=600_000)
    limits: SpmLimits = SpmLimits()
