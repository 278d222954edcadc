"""Physics checks of the particle twin against analytic Brownian/thermophoretic results."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from policies.contract import LaserSpot
from simulators.particles import KB_FN_UM_PER_K, ParticleTwin, ParticleTwinConfig

BIG_BOX = (0.0, 1000.0, 0.0, 1000.0)


def test_free_diffusion_msd_is_4dt() -> None:
    """Laser off: mean squared displacement must follow 4 D t (2-D Brownian motion)."""
    d, t_total, n = 0.33, 1.0, 4000
    twin = ParticleTwin(ParticleTwinConfig(n_particles=n, diffusion_um2_s=d), BIG_BOX, seed=1)
    start = twin.positions_um
    for _ in range(10):
        twin.step(t_total / 10)
    assert twin.t_s == pytest.approx(t_total)
    msd = np.mean(np.sum((twin.positions_um - start) ** 2, axis=1))
    # r^2 is exponential in 2-D: relative std of the mean is 1/sqrt(n) ~ 1.6 %.
    assert msd == pytest.approx(4 * d * t_total, rel=0.08)


def test_tweezers_equipartition() -> None:
    """Harmonic trap: per-axis variance must equal kB T / k once equilibrated."""
    cfg = ParticleTwinConfig(
        n_particles=3000,
        actuator="tweezers",
        trap_stiffness_fn_per_um_per_mw=0.5,
        trap_range_um=100.0,  # effectively uncut: pure harmonic well
    )
    # Start scattered over +-3 um (far wider than the trap's ~0.3 um spread; the walls
    # sit ten standard deviations out and never touch the equilibrium distribution).
    twin = ParticleTwin(cfg, (497.0, 503.0, 497.0, 503.0), seed=2)
    centre = np.array([500.0, 500.0])
    power = 100.0
    twin.set_laser([LaserSpot(float(centre[0]), float(centre[1]), power)])
    k = 0.5 * power
    expected = KB_FN_UM_PER_K * cfg.temperature_k / k
    tau = expected / cfg.diffusion_um2_s  # relaxation time of the variance is tau / 2
    twin.step(10 * tau)
    var = np.var(twin.positions_um - centre, axis=0)
    assert var[0] == pytest.approx(expected, rel=0.1)
    assert var[1] == pytest.approx(expected, rel=0.1)


def test_tweezers_gaussian_cut_weakens_far_force() -> None:
    """Beyond the trap range the optical force must fade, not keep growing."""
    cfg = ParticleTwinConfig(actuator="tweezers", trap_range_um=1.0)
    twin = ParticleTwin(cfg, BIG_BOX, seed=0)
    twin.set_laser([LaserSpot(500.0, 500.0, 10.0)])
    v = twin.drift_velocity_um_s(np.array([[501.0, 500.0], [505.0, 500.0]]))
    assert v[0, 0] < 0.0  # pulled back toward the spot
    assert abs(v[1, 0]) < 1e-3 * abs(v[0, 0])


@pytest.mark.parametrize("r_um", [0.5, 3.0, 7.25, 20.0])
def test_heating_drift_away_and_matches_dt_grad_t(r_um: float) -> None:
    """Thermophoresis: v = -D_T grad T, pointing away from the hot spot."""
    cfg = ParticleTwinConfig()
    twin = ParticleTwin(cfg, BIG_BOX, seed=0)
    spot = np.array([500.0, 500.0])
    twin.set_laser([LaserSpot(500.0, 500.0, 1.5)])
    direction = np.array([0.6, -0.8])
    xy = spot + r_um * direction
    v = twin.drift_velocity_um_s(xy[None])[0]
    # Independent gradient: central finite differences of the temperature field.
    eps = 1e-4
    grad = np.array(
        [
            (
                twin.temperature_rise_k((xy + e)[None])[0]
                - twin.temperature_rise_k((xy - e)[None])[0]
            )
            / (2 * eps)
            for e in (np.array([eps, 0.0]), np.array([0.0, eps]))
        ]
    )
    assert np.dot(v, direction) > 0.0  # away from the spot
    assert np.linalg.norm(v) == pytest.approx(
        cfg.thermodiffusion_um2_per_k_s * np.linalg.norm(grad), rel=1e-5
    )
    np.testing.assert_allclose(v, -cfg.thermodiffusion_um2_per_k_s * grad, rtol=1e-5)


def test_heating_matches_anchor_peak_and_curvature() -> None:
    """Defaults reproduce ~20 K/mW at the centre and ~0.38 K/um^2 curvature (Franzl et al.)."""
    twin = ParticleTwin(ParticleTwinConfig(), BIG_BOX, seed=0)
    twin.set_laser([LaserSpot(500.0, 500.0, 1.0)])
    h = 0.05
    t = twin.temperature_rise_k(np.array([[500.0 - h, 500.0], [500.0, 500.0], [500.0 + h, 500.0]]))
    assert t[1] == pytest.approx(20.0, rel=1e-6)
    assert -(t[0] - 2 * t[1] + t[2]) / h**2 == pytest.approx(0.38, rel=0.01)


def test_heating_pushes_particles_away_on_average() -> None:
    """Many particles next to a hot spot end farther from it than laser-off twins."""
    cfg = ParticleTwinConfig(n_particles=500, initial="random")
    box = (480.0, 520.0, 480.0, 520.0)
    on = ParticleTwin(cfg, box, seed=3)
    off = ParticleTwin(cfg, box, seed=3)
    spot = np.array([500.0, 500.0])
    near = np.hypot(*(on.positions_um - spot).T) < 10.0
    on.set_laser([LaserSpot(500.0, 500.0, 5.0)])
    on.step(1.0)
    off.step(1.0)
    dist_on = np.hypot(*(on.positions_um[near] - spot).T)
    dist_off = np.hypot(*(off.positions_um[near] - spot).T)
    assert np.mean(dist_on) > np.mean(dist_off) + 1.0


def test_reflecting_walls_keep_particles_inside() -> None:
    """Fast diffusion in a small box for a long time: nothing may leak out."""
    box = (0.0, 5.0, 1.0, 3.0)
    cfg = ParticleTwinConfig(n_particles=300, diffusion_um2_s=50.0, initial="random")
    twin = ParticleTwin(cfg, box, seed=4)
    for _ in range(50):
        xy = twin.step(0.1)
        assert np.all((xy[:, 0] >= box[0]) & (xy[:, 0] <= box[1]))
        assert np.all((xy[:, 1] >= box[2]) & (xy[:, 1] <= box[3]))
    # And walls do not trap them: particles still fill the box.
    assert np.ptp(xy[:, 0]) > 4.0 and np.ptp(xy[:, 1]) > 1.5


def test_same_seed_is_reproducible_and_reset_replays() -> None:
    """Same seed, laser off: identical trajectories; reset replays the run exactly."""
    cfg = ParticleTwinConfig(n_particles=20, initial="random")
    a = ParticleTwin(cfg, (0.0, 25.5, 0.0, 25.5), seed=7)
    b = ParticleTwin(cfg, (0.0, 25.5, 0.0, 25.5), seed=7)
    ta = [a.step(0.03) for _ in range(20)]
    tb = [b.step(0.03) for _ in range(20)]
    np.testing.assert_array_equal(np.array(ta), np.array(tb))
    a.reset()
    assert a.t_s == 0.0
    np.testing.assert_array_equal(np.array([a.step(0.03) for _ in range(20)]), np.array(ta))
    c = ParticleTwin(cfg, (0.0, 25.5, 0.0, 25.5), seed=8)
    assert not np.allclose(c.step(0.03), ta[0])


def test_thermal_noise_independent_of_laser() -> None:
    """Laser on vs off with one seed: per-step displacements differ exactly by drift * dt."""
    cfg = ParticleTwinConfig(n_particles=50, max_internal_step_s=0.002)
    dt = cfg.max_internal_step_s  # one Euler–Maruyama piece per call
    on = ParticleTwin(cfg, BIG_BOX, seed=11)
    off = ParticleTwin(cfg, BIG_BOX, seed=11)
    c = on.positions_um[0]
    on.set_laser([LaserSpot(float(c[0]) + 1.0, float(c[1]) - 0.5, 2.0)])
    x_on, x_off = on.positions_um, off.positions_um
    for k in range(100):
        if k == 50:  # laser state changes mid-run must not shift the noise stream either
            on.set_laser([])
        drift = on.drift_velocity_um_s(x_on)
        new_on, new_off = on.step(dt), off.step(dt)
        np.testing.assert_allclose(
            (new_on - x_on) - drift * dt, new_off - x_off, rtol=0, atol=1e-12
        )
        x_on, x_off = new_on, new_off
    assert not np.allclose(x_on, x_off)  # the laser did act


def test_step_split_depends_only_on_dt() -> None:
    """A long step equals the same number of short steps (same noise, same integrator)."""
    cfg = ParticleTwinConfig(n_particles=5, initial="random")
    a = ParticleTwin(cfg, (0.0, 25.5, 0.0, 25.5), seed=5)
    b = ParticleTwin(cfg, (0.0, 25.5, 0.0, 25.5), seed=5)
    assert a.n_internal_steps(0.03) == 15
    a.step(0.03)
    for _ in range(15):
        b.step(0.002)
    np.testing.assert_allclose(a.positions_um, b.positions_um, atol=1e-12)


def test_constant_drift_moves_the_mean() -> None:
    """Flow/stage drift shifts the ensemble mean by v t."""
    cfg = ParticleTwinConfig(n_particles=2000, drift_um_s=(1.5, -0.5))
    twin = ParticleTwin(cfg, BIG_BOX, seed=6)
    start = twin.positions_um.mean(axis=0)
    twin.step(2.0)
    shift = twin.positions_um.mean(axis=0) - start
    # std of the mean: sqrt(2 D t / n) ~ 0.026 um
    np.testing.assert_allclose(shift, [3.0, -1.0], atol=0.12)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"diffusion_um2_s": -1.0}, "diffusion_um2_s"),
        ({"n_particles": 0}, "n_particles"),
        ({"actuator": "magnet"}, "actuator"),
        ({"bogus_field": 1}, "bogus_field"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    """Bad values fail with a pydantic error that points at the offending field."""
    with pytest.raises(ValidationError) as err:
        ParticleTwinConfig(**kwargs)  # type: ignore[arg-type]
    assert field in str(err.value)


def test_bad_box_and_dt_rejected() -> None:
    """Degenerate boxes and negative steps are programming errors, caught early."""
    with pytest.raises(ValueError, match="box_um"):
        ParticleTwin(ParticleTwinConfig(), (1.0, 1.0, 0.0, 2.0), seed=0)
    twin = ParticleTwin(ParticleTwinConfig(), (0.0, 1.0, 0.0, 1.0), seed=0)
    with pytest.raises(ValueError, match="dt_s"):
        twin.step(-0.1)


def test_center_start_puts_one_particle_at_the_centre_and_scatters_the_rest() -> None:
    """A trap holds the centre particle; distractors must not be stacked on it."""
    twin = ParticleTwin(ParticleTwinConfig(n_particles=10), (0.0, 20.0, 0.0, 20.0), seed=5)
    xy = twin.positions_um
    np.testing.assert_allclose(xy[0], [10.0, 10.0])
    assert len({tuple(p) for p in np.round(xy, 6)}) == 10


def _janus_cfg(**kw: object) -> ParticleTwinConfig:
    """Janus swimmers in uniform light (wide illumination), no thermophoretic drift."""
    base: dict[str, object] = {
        "n_particles": 2000,
        "initial": "random",
        "particle_kind": "janus",
        "illumination_radius_um": 1e4,
        "thermodiffusion_um2_per_k_s": 0.0,
    }
    base.update(kw)
    return ParticleTwinConfig(**base)  # type: ignore[arg-type]


def test_stokes_einstein_rotational_diffusion() -> None:
    """D_r = kB T / (8 pi eta a^3): ~1.30 rad^2/s for a 0.5 um sphere in water at 296 K."""
    assert ParticleTwinConfig().rotational_diffusion == pytest.approx(1.301, rel=2e-3)
    assert ParticleTwinConfig(particle_radius_um=1.0).rotational_diffusion == pytest.approx(
        1.301 / 8, rel=2e-3
    )
    assert ParticleTwinConfig(rotational_diffusion_rad2_s=0.2).rotational_diffusion == 0.2


def test_janus_swims_along_orientation_when_lit() -> None:
    """Laser on: displacement along the initial heading = v0 (1 - exp(-D_r t)) / D_r;
    passive particles under the same light show no net motion along their heading."""
    power, t = 5.0, 0.1
    box = (-100.0, 100.0, -100.0, 100.0)  # light ~uniform: R = 1e4 um
    janus = ParticleTwin(_janus_cfg(), box, seed=21)
    passive = ParticleTwin(_janus_cfg(particle_kind="passive"), box, seed=21)
    for twin in (janus, passive):
        twin.set_laser([LaserSpot(0.0, 0.0, power)])
    th0 = janus.orientations_rad
    np.testing.assert_array_equal(th0, passive.orientations_rad)
    heading = np.column_stack((np.cos(th0), np.sin(th0)))
    start = janus.positions_um
    janus.step(t)
    passive.step(t)
    along_j = np.mean(np.sum((janus.positions_um - start) * heading, axis=1))
    along_p = np.mean(np.sum((passive.positions_um - start) * heading, axis=1))
    v0 = janus.config.swim_speed_um_s_per_mw * power
    dr = janus.config.rotational_diffusion
    # Brownian std of the mean ~ sqrt(2 D t / n) ~ 0.006 um against ~0.94 um of swimming.
    assert along_j == pytest.approx(v0 * (1 - np.exp(-dr * t)) / dr, rel=0.05)
    assert along_j > 0.9 * v0 * t
    assert abs(along_p) < 0.03


def test_janus_swim_speed_follows_local_light() -> None:
    """Propulsion is v0 = speed * sum P exp(-r^2 / 2 R^2): fades away from the spot."""
    cfg = ParticleTwinConfig(particle_kind="janus", illumination_radius_um=1.0)
    twin = ParticleTwin(cfg, BIG_BOX, seed=0)
    twin.set_laser([LaserSpot(500.0, 500.0, 2.0), LaserSpot(510.0, 500.0, 1.0)])
    xy = np.array([[500.0, 500.0], [501.0, 500.0], [510.0, 500.0], [520.0, 520.0]])
    light = twin.illumination_mw(xy)
    np.testing.assert_allclose(light[:3], [2.0, 2.0 * np.exp(-0.5), 1.0], rtol=1e-6, atol=1e-12)
    assert light[3] < 1e-20
    v = twin.swim_velocity_um_s(xy, np.array([0.0, np.pi / 2, np.pi, 0.0]))
    np.testing.assert_allclose(v[0], [4.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(v[1], [0.0, 4.0 * np.exp(-0.5)], atol=1e-12)
    np.testing.assert_allclose(v[2], [-2.0, 0.0], atol=1e-12)
    passive = ParticleTwin(ParticleTwinConfig(), BIG_BOX, seed=0)
    passive.set_laser([LaserSpot(500.0, 500.0, 2.0)])
    assert not passive.swim_velocity_um_s(xy, np.zeros(4)).any()


@pytest.mark.parametrize(("dr", "t"), [(None, 0.5), (0.2, 2.0)])
def test_rotational_diffusion_decorrelates_heading(dr: float | None, t: float) -> None:
    """<cos(th(t) - th(0))> = exp(-D_r t) for planar rotational diffusion."""
    cfg = _janus_cfg(n_particles=4000, rotational_diffusion_rad2_s=dr)
    twin = ParticleTwin(cfg, BIG_BOX, seed=22)
    th0 = twin.orientations_rad
    for _ in range(10):
        twin.step(t / 10)
    corr = np.mean(np.cos(twin.orientations_rad - th0))
    # std of the mean <= 0.71 / sqrt(4000) ~ 0.011
    assert corr == pytest.approx(np.exp(-cfg.rotational_diffusion * t), abs=0.04)
    # Initial headings are uniform on the circle.
    assert abs(np.mean(np.exp(1j * th0))) < 0.05


def test_translational_noise_independent_of_janus_and_rotation() -> None:
    """Same seed: passive, Janus in the dark and Janus in light feel identical kicks;
    per-step displacements differ exactly by (drift + swim) * dt."""
    base = {"n_particles": 50, "initial": "random"}
    cfg_p = ParticleTwinConfig(**base)  # type: ignore[arg-type]
    cfg_j = ParticleTwinConfig(**base, particle_kind="janus", illumination_radius_um=5.0)  # type: ignore[arg-type]
    box = (0.0, 50.0, 0.0, 50.0)
    passive = ParticleTwin(cfg_p, box, seed=23)
    dark = ParticleTwin(cfg_j, box, seed=23)
    lit = ParticleTwin(cfg_j, box, seed=23)
    dt = cfg_p.max_internal_step_s
    lit.set_laser([LaserSpot(25.0, 25.0, 3.0)])
    x_p, x_l = passive.positions_um, lit.positions_um
    for _ in range(50):
        v = lit.drift_velocity_um_s(x_l) + lit.swim_velocity_um_s(x_l, lit.orientations_rad)
        new_p, new_l = passive.step(dt), lit.step(dt)
        np.testing.assert_array_equal(dark.step(dt), new_p)
        np.testing.assert_allclose((new_l - x_l) - v * dt, new_p - x_p, rtol=0, atol=1e-12)
        x_p, x_l = new_p, new_l
    np.testing.assert_array_equal(passive.orientations_rad, lit.orientations_rad)
    assert np.abs(x_l - x_p).max() > 0.05  # the light did push the swimmers


def test_temperature_at_particles() -> None:
    """Ambient plus the superposed rise of all heating spots, evaluated at each particle."""
    twin = ParticleTwin(ParticleTwinConfig(n_particles=3), BIG_BOX, seed=0)
    xy = twin.positions_um
    np.testing.assert_allclose(twin.temperature_at_particles_k(), 296.0)
    spots = [LaserSpot(float(xy[0, 0]), float(xy[0, 1]), 1.0), LaserSpot(0.0, 0.0, 0.5)]
    twin.set_laser(spots)
    t = twin.temperature_at_particles_k()
    assert t.shape == (3,)
    np.testing.assert_allclose(t, 296.0 + twin.temperature_rise_k(xy))
    assert t[0] > 296.0 + 20.0  # on the first spot, plus a little from the second
