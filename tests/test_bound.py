"""The Theorem 3 bound (DSM form, with the eps correction) against closed forms."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import registry
from helpers import gaussian_mixture_2d

import scoreflow_eqx as sf


MEAN = jnp.array([0.3, -0.5, 1.0])
STD = jnp.array([0.2, 0.5, 0.3])
SDES = {
    **registry.SDES,
    # A large sigma_min makes the eps correction large: it must be right, not just
    # small.
    "ve-wide": sf.VESDE(sigma_min=0.1, sigma_max=50.0),
}


def exact_flow(sde, mixture):
    net = sf.nets.GaussianMixtureScore(mixture, sde)
    return sf.ScoreFlow(sde, net, parameterization="score")


@eqx.filter_jit
def _bounds(flow, xs, key, kwargs):
    keys = jr.split(key, xs.shape[0])
    return jax.vmap(lambda x, k: sf.nll_bound(flow, x, key=k, **kwargs))(xs, keys)


def gaussian_expected_bound(sde, eps, x):
    """The expectation of the bound for data N(MEAN, diag(STD^2)) and its exact score.

    With the exact score and the Fokker-Planck equation, the time integral equals
    `E[log p_T(x_T)] - E[log p_eps(x_eps)]` (expectations under p_0t(. | x)), so the
    bound is `E[-log prior(x_T) + log p_T(x_T)] + E[-log p_eps(x_eps)] + correction`;
    for a Gaussian all of these are closed forms. Returns (bound, correction,
    -log p_model(x)) where p_model is the Gaussian that the SDE model with the Tweedie
    decoder defines.
    """
    v = STD**2

    def expected_neg_logpdf(mean, var, centre, spread):
        # E[-log N(y; mean, var)] for y ~ N(centre, spread), per dimension, summed.
        return 0.5 * jnp.sum(jnp.log(2 * math.pi * var) + ((centre - mean) ** 2 + spread) / var)

    a_T, s_T = sde.marginal(sde.T)
    prior_var = sde.prior_std() ** 2
    mismatch = expected_neg_logpdf(0.0, prior_var, a_T * x, s_T**2) - expected_neg_logpdf(
        a_T * MEAN, a_T**2 * v + s_T**2, a_T * x, s_T**2
    )
    a, s = sde.marginal(eps)
    V = a**2 * v + s**2
    at_eps = expected_neg_logpdf(a * MEAN, V, a * x, s**2)
    # z + sigma s(eps, x_eps) = z (1 - s^2 / V) - s a (x - m) / V
    correction = -x.size * jnp.log(a) + 0.5 * jnp.sum(
        (1 - s**2 / V) ** 2 - 1 + (s * a * (x - MEAN) / V) ** 2
    )
    model_var = a**2 * v**2 / V + s**2 / a**2
    neg_log_model = expected_neg_logpdf(MEAN, model_var, x, 0.0)
    return mismatch + at_eps + correction, correction, neg_log_model


@pytest.mark.parametrize("name", ["vp", "subvp", "ve-wide"])
def test_bound_matches_closed_form_gaussian(name):
    sde = SDES[name]
    gaussian = sf.GaussianMixture(jnp.array([1.0]), MEAN[None], STD[None])
    flow = exact_flow(sde, gaussian)
    xs = jax.vmap(lambda k: gaussian.sample(key=k))(jr.split(jr.key(0), 3))
    kwargs = dict(num_t=20_000, num_eps_samples=2000)
    res = _bounds(flow, xs, jr.key(1), kwargs)
    expected, correction, neg_log_model = jax.vmap(
        lambda x: gaussian_expected_bound(sde, flow.eps, x)
    )(xs)
    assert bool(jnp.all(res.stderr > 0))
    np.testing.assert_array_less(jnp.abs(res.nll - expected), 4 * res.stderr)
    np.testing.assert_allclose(res.nll, res.prior_term + res.diffusion_term + res.eps_correction)
    assert bool(jnp.all(res.nfe == 22_000))
    # The (exact) expected bound is an upper bound on the model's NLL, and tight up to
    # the small-time decoder gap.
    assert bool(jnp.all(expected >= neg_log_model - 1e-3))  # up to the prior mismatch
    assert float(jnp.max(expected - neg_log_model)) < 0.05
    if name == "ve-wide":
        # A correction this large would be noticed if it were missing or wrong.
        assert bool(jnp.all(jnp.abs(correction) > 0.15))
        np.testing.assert_array_less(jnp.abs(res.eps_correction - correction), 0.05)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_bound_tight_for_mixture(name):
    # With the exact score the bound is tight (in expectation) for every data point:
    # its expectation is -log p_0(x) up to the prior mismatch and the decoder gap, which
    # are far below the Monte Carlo error here.
    mixture = gaussian_mixture_2d()
    flow = exact_flow(SDES[name], mixture)
    xs = jax.vmap(lambda k: mixture.sample(key=k))(jr.split(jr.key(2), 4))
    res = _bounds(flow, xs, jr.key(3), dict(num_t=30_000))
    exact = -jax.vmap(mixture.log_prob)(xs)
    gap = jnp.mean(res.nll - exact)
    se = jnp.sqrt(jnp.sum(res.stderr**2)) / xs.shape[0]
    assert -4 * se < gap < 4 * se + 0.01


def test_bound_stderr_calibrated_and_wrong_score_is_penalised():
    mixture = gaussian_mixture_2d()
    sde = SDES["vp"]
    flow = exact_flow(sde, mixture)
    x = mixture.sample(key=jr.key(4))
    n = 64
    xs = jnp.broadcast_to(x, (n, 2))
    res = _bounds(flow, xs, jr.key(5), dict(num_t=200))
    # The reported standard error matches the spread of independent estimates.
    ratio = float(jnp.std(res.nll, ddof=1) / jnp.mean(res.stderr))
    assert 0.75 < ratio < 1.33
    # Uniform time sampling: the same expectation.
    uni = _bounds(flow, xs, jr.key(6), dict(num_t=200, importance_sampling=False))
    diff = jnp.mean(uni.nll) - jnp.mean(res.nll)
    assert abs(diff) < 4 * jnp.sqrt(jnp.var(uni.nll) / n + jnp.var(res.nll) / n)
    # A wrong score raises the bound by 1/2 int g^2 E||s - s_true||^2 > 0.
    wrong = sf.ScoreFlow(
        sde,
        lambda t, y: 0.7 * mixture.diffuse(sde, t).score(y),
        parameterization="score",
    )
    res_wrong = _bounds(wrong, xs, jr.key(5), dict(num_t=200))
    diff = jnp.mean(res_wrong.nll - res.nll)
    assert diff > 4 * jnp.std(res_wrong.nll - res.nll) / math.sqrt(n)


def test_bound_bad_input():
    flow = exact_flow(SDES["ve"], gaussian_mixture_2d())
    with pytest.raises(ValueError, match="num_t"):
        sf.nll_bound(flow, jnp.zeros(2), key=jr.key(0), num_t=0)
    with pytest.raises((TypeError, ValueError)):  # jaxtyping or our own check
        sf.nll_bound(flow, jnp.zeros(2, jnp.int32), key=jr.key(0))
