"""The solver helpers: the first step of adaptive solves (diffrax's own selection, which
`diffeqsolve(dt0=None)` does not reach in diffrax 0.7) and the NFE bookkeeping."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import RK45

from scoreflow_eqx._solver import INITIAL_STEP_EVALUATIONS, initial_step_size


def _vector_field(t, y, args):
    return jnp.stack([y[1], -args * jnp.sin(y[0]) - 0.3 * t * y[1]])


@pytest.mark.parametrize("t0, t1", [(0.1, 2.0), (2.0, 0.1)])
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_initial_step_matches_hairer_norsett_wanner(t0, t1, tol):
    # scipy's implementation of the same algorithm (Hairer, Norsett & Wanner, Sec. II.4)
    # for an embedded pair whose error estimate has order 4 (RK45 / Dopri5).
    y0 = np.array([1.2, -0.4])
    args = 3.0
    solver = dfx.Dopri5()
    controller = dfx.PIDController(rtol=tol, atol=tol)
    calls = []

    def counted(t, y, args):
        jax.debug.callback(lambda t: calls.append(1), t)
        return _vector_field(t, y, args)

    dt0 = jax.jit(lambda y0: initial_step_size(counted, solver, controller, t0, t1, y0, args))(
        jnp.asarray(y0)
    )
    direction = np.sign(t1 - t0)
    fun = lambda t, y: np.asarray(_vector_field(t, jnp.asarray(y), args))
    expected = RK45(fun, t0, y0, t1, rtol=tol, atol=tol).h_abs  # its first step
    np.testing.assert_allclose(float(dt0), direction * expected, rtol=1e-10)
    assert len(calls) == INITIAL_STEP_EVALUATIONS == 2


def test_diffeqsolve_without_dt0_starts_at_a_fixed_step():
    # Why the helper exists: diffrax wraps the terms before its controller sees them, so
    # its own selection falls back to a first step of 0.01 whatever the problem.
    # (If a diffrax release fixes this, this test fails: then drop the helper.)
    ts = []

    def vf(t, y, args):
        jax.debug.callback(lambda t: ts.append(float(t)), t)
        return -50.0 * y

    sol = dfx.diffeqsolve(
        dfx.ODETerm(vf),
        dfx.Dopri5(),
        0.0,
        1.0,
        None,
        jnp.ones(2),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
        max_steps=1,
        throw=False,
    )
    jax.block_until_ready(sol.ys)
    assert ts[0] == 0.0 and ts[1] == pytest.approx(0.2 * 0.01)  # first stage at c2 * dt0


def test_initial_step_trial_point_stays_in_the_interval():
    # A slow field defined only for t >= 0: the rule's trial step (0.01 |y| / |f| = 10)
    # is longer than the interval [0, 1], and must not leave it (diffrax's own rule
    # would evaluate at t = -9 and return NaN).
    def vf(t, y, args):
        return -1e-3 * jnp.sqrt(t) * y

    y0 = np.array([2.0, -1.0])
    controller = dfx.PIDController(rtol=1e-5, atol=1e-5)
    dt0 = initial_step_size(vf, dfx.Dopri5(), controller, 1.0, 0.0, jnp.asarray(y0))
    fun = lambda t, y: np.asarray(vf(t, jnp.asarray(y), None))
    expected = RK45(fun, 1.0, y0, 0.0, rtol=1e-5, atol=1e-5).h_abs
    assert np.isfinite(float(dt0))
    np.testing.assert_allclose(float(dt0), -expected, rtol=1e-10)
