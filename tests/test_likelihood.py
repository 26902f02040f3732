"""Probability-flow ODE likelihoods against closed forms (Gaussian mixtures with their
exact score under VP, sub-VP and VE), NFE against counted network calls, and failure
reporting."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import gaussian_mixture_2d
from registry import (
    DIVERGENCE_SHORTHANDS,
    EXACT_DIVERGENCES,
    ODE_SOLVERS,
    SDES,
    STOCHASTIC_DIVERGENCES,
)

import scoreflow_eqx as sf
from scoreflow_eqx._solver import evaluations_per_step


def exact_flow(sde, mixture=None):
    mixture = gaussian_mixture_2d() if mixture is None else mixture
    net = sf.nets.GaussianMixtureScore(mixture, sde)
    return sf.ScoreFlow(sde, net, parameterization="score")


def analytic_nll(flow, mixture, x, z):
    """`-log p_ODE(x)` implied by the exact score: the exact flow maps p_eps to p_T, so
    `log p_eps(x) = log p_T(z) + delta` while `log p_ODE(x) = log prior(z) + delta`;
    hence `-log p_ODE(x) = -log p_eps(x) + [log p_T(z) - log prior(z)]`."""
    p_eps = mixture.diffuse(flow.sde, flow.eps)
    p_T = mixture.diffuse(flow.sde, flow.sde.T)
    mismatch = p_T.log_prob(z) - flow.sde.prior_logp(z)
    return -p_eps.log_prob(x) + mismatch


@pytest.fixture(scope="module")
def points():
    mixture = gaussian_mixture_2d()
    return jax.vmap(lambda k: mixture.sample(key=k))(jr.split(jr.key(0), 3))


@eqx.filter_jit
def _vmapped_nll(flow, xs, keys, kwargs):
    return jax.vmap(lambda x, k: sf.ode_nll(flow, x, key=k, **kwargs))(xs, keys)


# ---- divergence estimators -----------------------------------------------------------


@jax.jit
def _image_fn(x):
    # A nonlinear map on (2, 3, 4)-shaped data with a dense Jacobian.
    w = jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size
    return jnp.tanh(x * w + jnp.sum(x**2) / 10) + jnp.roll(x, 1) * jnp.sin(x)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_exact_divergence_any_shape(mode, chunk_size):
    x = jr.normal(jr.key(1), (2, 3, 4))
    jac = jax.jit(jax.jacfwd(_image_fn))(x).reshape(x.size, x.size)
    estimator = sf.ExactTrace(mode=mode, chunk_size=chunk_size)
    state = estimator.init(x, key=None)
    fx, div = jax.jit(lambda x: estimator.value_and_divergence(_image_fn, x, state))(x)
    np.testing.assert_allclose(fx, _image_fn(x))
    np.testing.assert_allclose(div, jnp.trace(jac), rtol=1e-10)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_divergence_unbiased(mode, probe):
    x = jr.normal(jr.key(1), (2, 3, 4))
    exact = jnp.trace(jax.jit(jax.jacfwd(_image_fn))(x).reshape(x.size, x.size))
    many = sf.Hutchinson(probe=probe, num_probes=4000, mode=mode)
    one = sf.Hutchinson(probe=probe, num_probes=1, mode=mode)
    probes = many.init(x, key=jr.key(2))
    assert probes.shape == (4000, *x.shape)

    @jax.jit
    def estimates(probes):
        _, est = many.value_and_divergence(_image_fn, x, probes)
        # One probe at a time, for the standard error.
        per_probe = jax.vmap(lambda v: one.value_and_divergence(_image_fn, x, v[None])[1])(probes)
        return est, per_probe

    est, per_probe = estimates(probes)
    np.testing.assert_allclose(est, per_probe.mean(), rtol=1e-10)
    se = per_probe.std() / np.sqrt(probes.shape[0])
    assert abs(est - exact) < 4 * se
    if probe == "rademacher":
        assert set(np.unique(np.asarray(probes))) == {-1.0, 1.0}


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_probes_do_not_depend_on_precision(probe):
    # The same key gives the same probes in float32 (with jax_enable_x64 off, as users
    # run) and in float64, so a float32 likelihood can be checked against a float64 solve
    # of the same estimate (`jr.rademacher` alone changes its draws with x64).
    estimator = sf.Hutchinson(probe=probe, num_probes=3)
    with jax.enable_x64(False):
        p32 = np.asarray(estimator.init(jnp.zeros((2, 5), jnp.float32), key=jr.key(4)))
    p64 = np.asarray(estimator.init(jnp.zeros((2, 5), jnp.float64), key=jr.key(4)))
    assert p32.dtype == np.float32 and p64.dtype == np.float64
    np.testing.assert_array_equal(p32.astype(np.float64), p64)
    # Zero mean, unit variance (a check that the bits are used correctly).
    many = np.asarray(estimator.init(jnp.zeros(20000), key=jr.key(5)))
    assert abs(many.mean()) < 0.02 and abs(many.var() - 1) < 0.03


def test_estimator_objects_are_checked():
    with pytest.raises(ValueError, match="valid probes"):
        sf.Hutchinson(probe="uniform")
    with pytest.raises(ValueError, match="valid modes"):
        sf.Hutchinson(mode="both")
    with pytest.raises(ValueError, match="num_probes"):
        sf.Hutchinson(num_probes=0)
    with pytest.raises(ValueError, match="chunk_size"):
        sf.ExactTrace(chunk_size=0)
    with pytest.raises(ValueError, match="pass `key=`"):
        sf.Hutchinson().init(jnp.zeros(3), key=None)


# ---- ODE NLL against the closed form -------------------------------------------------


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("divergence", list(EXACT_DIVERGENCES))
def test_exact_nll_matches_analytic(points, name, divergence):
    mixture = gaussian_mixture_2d()
    flow = exact_flow(SDES[name], mixture)
    kwargs = dict(divergence=EXACT_DIVERGENCES[divergence], rtol=1e-8, atol=1e-8)
    res = _vmapped_nll(flow, points, jr.split(jr.key(0), 3), kwargs)
    assert bool(jnp.all(dfx.is_successful(res.result)))
    expected = jax.vmap(lambda x, z: analytic_nll(flow, mixture, x, z))(points, res.z)
    np.testing.assert_allclose(res.nll, expected, atol=1e-5)
    # The parts add up, and the latent is the prior-space image of x.
    np.testing.assert_allclose(res.nll, -(res.prior_logp + res.delta_logp))
    assert res.z.shape == points.shape
    # The prior mismatch is small but larger than the tolerance used here: the test
    # would notice if it were ignored.
    p_T = mixture.diffuse(flow.sde, flow.sde.T)
    mismatch = jax.vmap(lambda z: p_T.log_prob(z) - flow.sde.prior_logp(z))(res.z)
    assert float(jnp.max(jnp.abs(mismatch))) > 1e-4


@pytest.mark.parametrize(
    "name,divergence",
    list(zip(["vp", "subvp", "ve"], STOCHASTIC_DIVERGENCES, strict=True)),
)
def test_hutchinson_nll_unbiased(points, name, divergence):
    mixture = gaussian_mixture_2d()
    flow = exact_flow(SDES[name], mixture)
    n = 96
    xs = jnp.broadcast_to(points[1], (n, 2))
    kwargs = dict(divergence=STOCHASTIC_DIVERGENCES[divergence], rtol=1e-7, atol=1e-7)
    res = _vmapped_nll(flow, xs, jr.split(jr.key(3), n), kwargs)
    assert bool(jnp.all(dfx.is_successful(res.result)))
    # The x-trajectory does not depend on the probes: same latent for every probe.
    np.testing.assert_allclose(res.z, jnp.broadcast_to(res.z[0], res.z.shape), atol=1e-5)
    expected = analytic_nll(flow, mixture, points[1], res.z[0])
    se = res.nll.std() / np.sqrt(n)
    assert se > 0  # the estimate is random
    assert abs(res.nll.mean() - expected) < 4 * se + 1e-4


# ---- NFE: an honest count ------------------------------------------------------------


class _CountingNet(eqx.Module):
    inner: eqx.Module

    def __call__(self, t, x):
        # With `x` as an argument the callback fires once per example under vmap (with
        # only `t`, a call at a time shared by the batch would fire once).
        jax.debug.callback(_record_call, t, x)
        return self.inner(t, x)


_CALLS = []


def _record_call(t, x):
    _CALLS.append(1)


def _counting_flow():
    sde = SDES["ve"]
    net = _CountingNet(sf.nets.GaussianMixtureScore(gaussian_mixture_2d(), sde))
    return sf.ScoreFlow(sde, net, parameterization="score")


def test_nfe_equals_counted_calls_under_vmap(points):
    flow = _counting_flow()
    _CALLS.clear()
    res = _vmapped_nll(flow, points, jr.split(jr.key(0), 3), dict(divergence=sf.ExactTrace()))
    jax.block_until_ready(res.nll)
    nfe = np.asarray(res.nfe)
    # 6 evaluations a Dopri5 step, 1 initial one, and 2 that choose the first step.
    np.testing.assert_array_equal(nfe, 6 * np.asarray(res.stats["num_steps"]) + 3)
    assert len(set(nfe.tolist())) > 1  # the examples took different numbers of steps
    # The batched loop runs until the slowest example is done (the callback fires once
    # per example and call): a vmapped batch costs max(nfe) batched calls, and every
    # example's own NFE is honest.
    assert len(_CALLS) == points.shape[0] * nfe.max()
    # Unbatched: the count equals the NFE exactly, and the result is the same.
    _CALLS.clear()
    single = eqx.filter_jit(lambda f, x: sf.ode_nll(f, x, divergence="exact"))(flow, points[0])
    jax.block_until_ready(single.nll)
    assert len(_CALLS) == int(single.nfe) == nfe[0]
    np.testing.assert_allclose(single.nll, res.nll[0], rtol=1e-12)


def test_nfe_other_solver_forward_mode(points):
    # Tsit5 (FSAL, 7 stages) with forward-mode Hutchinson and several probes: still one
    # network evaluation per vector-field evaluation.
    flow = _counting_flow()
    solver = dfx.Tsit5()
    fn = eqx.filter_jit(
        lambda f, x: sf.ode_nll(
            f,
            x,
            key=jr.key(0),
            solver=solver,
            divergence=sf.Hutchinson(num_probes=2, mode="forward"),
            rtol=1e-3,
            atol=1e-3,
        )
    )
    _CALLS.clear()
    res = fn(flow, points[0])
    jax.block_until_ready(res.nll)
    per_step, initial = evaluations_per_step(solver)
    assert (per_step, initial) == (6, 1)
    assert len(_CALLS) == int(res.nfe) == 6 * int(res.stats["num_steps"]) + 3
    assert evaluations_per_step(dfx.Heun()) == (2, 0)
    assert evaluations_per_step(dfx.Euler()) == (1, 0)


def test_batched_solve_agrees(points):
    # One ODE for the whole batch (shared step size), with one key per example: the
    # probes are those of the per-example solves, so at tight tolerances the results
    # agree with vmapped ode_nll to solver accuracy.
    flow = exact_flow(SDES["vp"])
    keys = jr.split(jr.key(7), 3)
    kwargs = dict(divergence=sf.Hutchinson(), rtol=1e-8, atol=1e-8)
    batched = eqx.filter_jit(lambda f, x, k: sf.ode_nll_batched(f, x, key=k, **kwargs))(
        flow, points, keys
    )
    vmapped = _vmapped_nll(flow, points, keys, kwargs)
    np.testing.assert_allclose(batched.nll, vmapped.nll, atol=1e-5)
    np.testing.assert_allclose(batched.z, vmapped.z, atol=1e-5)
    assert len(set(np.asarray(batched.nfe).tolist())) == 1  # one shared step size
    assert int(batched.nfe[0]) == 6 * int(batched.stats["num_steps"]) + 3


# ---- failures ------------------------------------------------------------------------


def test_max_steps_failure_is_reported(points):
    flow = exact_flow(SDES["ve"])
    res = _vmapped_nll(
        flow, points, jr.split(jr.key(0), 3), dict(divergence="exact", max_steps=3, throw=False)
    )
    assert bool(jnp.all(res.nfe == 6 * 3 + 3))
    assert not bool(jnp.any(dfx.is_successful(res.result)))
    assert bool(jnp.all(res.result == dfx.RESULTS.max_steps_reached))
    assert bool(jnp.all(jnp.isnan(res.nll)))
    with pytest.raises(Exception, match="maximum number of solver steps"):
        fn = eqx.filter_jit(
            lambda f, x: sf.ode_nll(f, x, divergence="exact", max_steps=3, throw=True)
        )
        jax.block_until_ready(fn(flow, points[0]).nll)


def test_bad_options():
    flow = exact_flow(SDES["ve"])
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="shorthands"):
        sf.ode_nll(flow, x, divergence="trace", key=jr.key(0))
    with pytest.raises(ValueError, match="pass `key=`"):
        sf.ode_nll(flow, x)
    with pytest.raises(ValueError, match="explicit"):
        sf.ode_nll(flow, x, divergence="exact", solver=dfx.Kvaerno5())
    with pytest.raises((TypeError, ValueError)):  # jaxtyping or our own check
        sf.ode_nll(flow, jnp.zeros(2, jnp.int32), divergence="exact")
    with pytest.raises(TypeError, match="Unexpected keyword"):
        sf.ode_nll(flow, x, divergence="exact", tolerance=1e-3)


# ---- objects and shorthands ----------------------------------------------------------


@pytest.mark.parametrize("shorthand", list(DIVERGENCE_SHORTHANDS))
def test_shorthands_give_the_objects_numbers(points, shorthand):
    flow = exact_flow(SDES["vp"])
    fn = eqx.filter_jit(lambda f, x, d: sf.ode_nll(f, x, key=jr.key(5), divergence=d, rtol=1e-4))
    by_name = fn(flow, points[0], shorthand)
    by_object = fn(flow, points[0], DIVERGENCE_SHORTHANDS[shorthand])
    assert eqx.tree_equal(by_name, by_object, typematch=True)


def test_deprecated_estimator_keywords_still_work(points):
    flow = exact_flow(SDES["vp"])
    x = points[0]
    new = sf.ode_nll(flow, x, key=jr.key(1), divergence=sf.Hutchinson("gaussian", 2, "reverse"))
    with pytest.warns(DeprecationWarning, match="sf.Hutchinson"):
        old = sf.ode_nll(
            flow, x, key=jr.key(1), probe="gaussian", num_probes=2, jacobian_mode="reverse"
        )
    assert eqx.tree_equal(new, old)
    new = sf.ode_nll(flow, x, divergence=sf.ExactTrace(mode="reverse", chunk_size=1))
    with pytest.warns(DeprecationWarning):
        old = sf.ode_nll(flow, x, divergence="exact", jacobian_mode="reverse", chunk_size=1)
    assert eqx.tree_equal(new, old)


@pytest.mark.parametrize("solver", list(ODE_SOLVERS))
def test_user_stepsize_controller_is_used(points, solver):
    flow = exact_flow(SDES["vp"])
    x, s = points[0], ODE_SOLVERS[solver]
    pid = dfx.PIDController(rtol=1e-3, atol=1e-3)
    by_tol = sf.ode_nll(flow, x, divergence="exact", solver=s, rtol=1e-3, atol=1e-3)
    by_controller = sf.ode_nll(flow, x, divergence="exact", solver=s, stepsize_controller=pid)
    assert eqx.tree_equal(by_tol, by_controller)
    # A controller that clips the steps to a grid: at least 50 steps, the same likelihood.
    capped = dfx.ClipStepSizeController(pid, step_ts=jnp.linspace(flow.eps, 1.0, 51))
    res = sf.ode_nll(flow, x, divergence="exact", solver=s, stepsize_controller=capped)
    assert int(res.stats["num_steps"]) >= 50 > int(by_tol.stats["num_steps"])
    np.testing.assert_allclose(res.nll, by_tol.nll, atol=2e-2)
    with pytest.raises(ValueError, match="not both"):
        sf.ode_nll(flow, x, divergence="exact", stepsize_controller=pid, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(rtol=-1e-5), ValueError, "rtol"),
        (dict(atol=float("nan")), ValueError, "atol"),
        (dict(rtol=0.0, atol=0.0), ValueError, "both be 0"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(dt0=0.0), ValueError, "dt0"),
        # (Under the test suite's jaxtyping hook, type errors are caught by the
        # annotations first; both messages name the argument.)
        (dict(adjoint="backsolve"), TypeError, "adjoint"),
        (dict(solver="dopri5"), TypeError, "solver"),
        (dict(stepsize_controller=1e-5), TypeError, "stepsize_controller|step-size controller"),
    ],
)
def test_bad_solve_options_fail_before_solving(kwargs, error, match):
    flow = exact_flow(SDES["vp"])
    with pytest.raises(error, match=match):
        sf.ode_nll(flow, jnp.zeros(2), divergence="exact", **kwargs)
    with pytest.raises(error, match=match):
        sf.ode_nll_batched(flow, jnp.zeros((2, 2)), divergence="exact", **kwargs)


def test_nonfinite_input_fails_at_once(points):
    flow = exact_flow(SDES["vp"])
    bad = points.at[1, 0].set(jnp.nan)
    res = _vmapped_nll(flow, bad, jr.split(jr.key(0), 3), dict(divergence="exact", throw=False))
    nonfinite = np.asarray(res.result == dfx.RESULTS.nonfinite_input)
    assert nonfinite.tolist() == [False, True, False] and bool(jnp.isnan(res.nll[1]))
    assert np.asarray(dfx.is_successful(res.result)).tolist() == [True, False, True]
    assert bool(jnp.all(jnp.isfinite(res.nll[::2])))
    assert int(res.nfe[1]) < 100  # no budget spent on it
    batched = sf.ode_nll_batched(flow, bad, divergence="exact", throw=False)
    assert batched.result == dfx.RESULTS.nonfinite_input
    assert np.isnan(batched.nll[1]) and np.all(np.isfinite(np.asarray(batched.nll[::2])))
    with pytest.raises(Exception, match="NaN or inf"):
        jax.block_until_ready(sf.ode_nll(flow, bad[1], divergence="exact").nll)


# ---- every solver offered, and nets conditioned on the log-SNR --------------------------


@pytest.mark.parametrize(
    "solver", [dfx.Dopri5(), dfx.Tsit5(), dfx.Dopri8(), dfx.Bosh3()], ids=lambda s: type(s).__name__
)
def test_every_offered_solver_matches_analytic(points, solver):
    # benchmarks/nfe_accuracy.py compares these four on the digits model; each must give
    # the closed-form likelihood, not only a small NFE.
    mixture = gaussian_mixture_2d()
    flow = exact_flow(SDES["vp"], mixture)
    kwargs = dict(divergence=sf.ExactTrace(), solver=solver, rtol=1e-7, atol=1e-7)
    res = _vmapped_nll(flow, points, jr.split(jr.key(0), 3), kwargs)
    assert bool(jnp.all(dfx.is_successful(res.result)))
    expected = jax.vmap(lambda x, z: analytic_nll(flow, mixture, x, z))(points, res.z)
    np.testing.assert_allclose(res.nll, expected, atol=1e-4)
    per_step, initial = evaluations_per_step(solver)
    np.testing.assert_array_equal(res.nfe, per_step * res.stats["num_steps"] + initial + 2)


def test_nfe_counted_for_a_log_snr_conditioned_net(points):
    # The default conditioning of the nets: the count of network calls is still the NFE.
    sde = SDES["vp"]
    net = _CountingNet(sf.nets.MLP(data_shape=(2,), width_size=16, depth=2, key=jr.key(0)))
    flow = sf.ScoreFlow(sde, net, conditioning=sf.LogSNRConditioning())
    fn = eqx.filter_jit(
        lambda f, x: sf.ode_nll(f, x, key=jr.key(1), divergence=sf.Hutchinson(), rtol=1e-4)
    )
    _CALLS.clear()
    res = fn(flow, points[0])
    jax.block_until_ready(res.nll)
    assert len(_CALLS) == int(res.nfe) == 6 * int(res.stats["num_steps"]) + 3
