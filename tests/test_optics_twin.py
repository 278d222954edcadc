"""The twin's tweezers with the learned Mie-force surrogate: shape, size, escape,
calibration and a ten-trap holographic plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.cli import app
from policies.contract import KB_FN_UM_PER_K, LaserSpot
from simulators.optics.forces import ExactForceModel
from simulators.optics.hologram import SlmCalibration, hologram_trap_powers, phase_for_traps
from simulators.optics.surrogate import ForceSurrogate
from simulators.particles import WATER_VISCOSITY_FN_S_PER_UM2, ParticleTwin, ParticleTwinConfig

BOX = (-15.0, 15.0, -15.0, 15.0)
T_K = 296.0


def _stokes_d(radius_um: float) -> float:
    return KB_FN_UM_PER_K * T_K / (6 * math.pi * WATER_VISCOSITY_FN_S_PER_UM2 * radius_um)


def _twin(
    radius_um: float = 0.5, n: int = 1, trap_model: str = "surrogate", **extra
) -> ParticleTwin:
    cfg = ParticleTwinConfig(
        n_particles=n,
        actuator="tweezers",
        trap_model=trap_model,  # type: ignore[arg-type]
        particle_radius_um=radius_um,
        diffusion_um2_s=_stokes_d(radius_um),
        temperature_k=T_K,
        **extra,
    )
    return ParticleTwin(cfg, BOX, seed=3)


def test_shipped_surrogate_matches_exact_forces() -> None:
    """Spot checks of the shipped weights against the exact model (1 % of the peak)."""
    sur = ForceSurrogate()
    assert sur.path.stat().st_size < 300_000
    rng = np.random.default_rng(11)
    dom = sur.domain
    n = 60
    pts = np.column_stack(
        (
            rng.uniform(-dom.rho_max_um, dom.rho_max_um, n) / math.sqrt(2),
            rng.uniform(-dom.rho_max_um, dom.rho_max_um, n) / math.sqrt(2),
            rng.uniform(dom.z_min_um, dom.z_max_um, n),
        )
    )
    exact = ExactForceModel(sur.optics, dom.radius_max_um, dom.reach_um)
    for radius in (dom.radius_min_um, 0.5 * (dom.radius_min_um + dom.radius_max_um)):
        want = exact.efficiency(pts, radius)
        got = sur.efficiency(pts, radius)
        assert np.abs(got - want).max() < 0.03 * sur.meta["output_scale"]


def test_surrogate_trap_is_anharmonic_escapable_and_size_dependent() -> None:
    twin = _twin()
    trap = twin.trap
    assert trap is not None and trap.z_um > 0  # held downstream of the focus
    twin.set_laser([LaserSpot(0.0, 0.0, 1.0)])
    x = np.linspace(0.01, 2.0, 200)
    v = twin.drift_velocity_um_s(np.column_stack((x, np.zeros_like(x))))
    mobility = twin.config.diffusion_um2_s / (KB_FN_UM_PER_K * T_K)
    force = v[:, 0] / mobility
    k0 = trap.stiffness_fn_per_um_per_mw
    assert k0 > 0
    assert force[0] == pytest.approx(-k0 * x[0], rel=0.05)  # harmonic at the centre
    peak = int(np.argmin(force))
    assert 0.15 < x[peak] < 1.0  # the restoring force peaks, then falls: escape force
    assert abs(force[-1]) < 0.1 * abs(force[peak])
    assert abs(force[peak]) < 0.8 * k0 * x[peak]  # softer than the spring it starts as
    bigger = _twin(radius_um=0.65)
    assert bigger.trap is not None
    assert bigger.trap.stiffness_fn_per_um_per_mw != pytest.approx(k0, rel=0.1)


def test_a_drag_beyond_the_escape_force_pulls_the_particle_out() -> None:
    """Flow slower than the escape speed (mobility x peak force) is held, faster is not."""
    power = 0.2
    probe = _twin()
    probe.set_laser([LaserSpot(0.0, 0.0, power)])
    x = np.linspace(0.0, 2.0, 400)
    escape_speed = -probe.drift_velocity_um_s(np.column_stack((x, np.zeros_like(x))))[:, 0].min()
    assert escape_speed > 0
    hold = _twin(drift_um_s=(0.6 * escape_speed, 0.0))
    hold.set_laser([LaserSpot(0.0, 0.0, power)])
    escape = _twin(drift_um_s=(1.5 * escape_speed, 0.0))
    escape.set_laser([LaserSpot(0.0, 0.0, power)])
    for _ in range(20):
        hold.step(0.05)
        escape.step(0.05)
    assert np.hypot(*hold.positions_um[0]) < 1.0
    assert np.hypot(*escape.positions_um[0]) > 3.0


def test_bad_radius_names_the_field() -> None:
    with pytest.raises(ValueError, match="particle_radius_um"):
        _twin(radius_um=3.0)


def test_calibrate_recovers_the_surrogate_stiffness(tmp_path: Path) -> None:
    """`scopeloop calibrate` on the twin's trajectory finds k = -dF/drho at the centre.

    0.3 mW: ~1200 fN/um, so the particle stays where the trap is harmonic (rms ~60 nm,
    a weaker trap lets it wander into the soft flanks); frames every 2 ms resolve the
    ~8 ms relaxation, and fine internal steps keep Euler's variance bias ~3 %."""
    power = 0.3
    twin = _twin(max_internal_step_s=0.0005)
    assert twin.trap is not None
    k_true = twin.trap.stiffness_fn_per_um_per_mw * power
    twin.set_laser([LaserSpot(0.0, 0.0, power)])
    dt = 0.002
    xy = np.array([twin.step(dt)[0] for _ in range(5000)])
    path = tmp_path / "trap.csv"
    np.savetxt(path, xy, delimiter=",", header="x,y", comments="")
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(path),
            "--dt",
            str(dt),
            "--temperature",
            str(T_K),
            "--radius-nm",
            "500",
            "--method",
            "ou_mle",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    k = json.loads(res.stdout)["estimates"]["ou_mle"]["k"]["value"]
    assert abs(math.log(k / k_true)) < 0.15


def test_ten_trap_hologram_holds_ten_particles() -> None:
    """The multi-trap plan: a WGS hologram of 10 traps, its Fourier-plane traps as spots,
    and 10 particles stay in them for 5 s."""
    cal = SlmCalibration(slm_px=128, focal_length_um=500.0)
    angle = np.linspace(0.0, 2.0 * math.pi, 10, endpoint=False)
    wanted = np.column_stack((6.0 * np.cos(angle), 6.0 * np.sin(angle)))
    phase, _ = phase_for_traps(wanted, cal, iterations=20)
    traps = hologram_trap_powers(phase, cal, total_power_mw=4.0, min_fraction=0.02)
    assert len(traps) == 10
    twin = _twin(n=10)
    centres = np.array([(x, y) for x, y, _ in traps])
    twin._xy = centres.copy()  # start each particle in its trap
    twin.set_laser([LaserSpot(x, y, p) for x, y, p in traps])
    for _ in range(50):
        twin.step(0.1)
    dist = np.linalg.norm(twin.positions_um - centres, axis=1)
    assert dist.max() < 0.5


@pytest.mark.parametrize("trap_model", ["surrogate", "harmonic"])
def test_stiff_trap_keeps_the_boltzmann_variance(trap_model: str) -> None:
    """A 5 mW trap relaxes in ~0.5 ms, under the twin's 2 ms step: the exponential
    integrator must still give <x^2> = kT / k (explicit Euler would blow it up)."""
    extra = {} if trap_model == "surrogate" else {"trap_stiffness_fn_per_um_per_mw": 4000.0}
    twin = _twin(trap_model=trap_model, **extra)
    k_per_mw = twin.trap.stiffness_fn_per_um_per_mw if twin.trap else 4000.0
    power = 5.0
    twin.set_laser([LaserSpot(0.0, 0.0, power)])
    assert twin._is_stiff(twin.config.max_internal_step_s)
    xy = np.array([twin.step(0.004)[0] for _ in range(3000)])
    k_seen = KB_FN_UM_PER_K * T_K / xy.var(axis=0).mean()
    assert abs(math.log(k_seen / (k_per_mw * power))) < 0.12
