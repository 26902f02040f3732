"""The denoising score-matching objective against its closed form for Gaussian data."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.integrate
from registry import SDES  # VP/subVP beta in [0.1, 20], VE sigma in [0.01, 50]

import scoreflow_eqx as sf


D = 2
DATA_MU, DATA_STD = 0.5, 0.8  # the data: N(DATA_MU, DATA_STD^2 I)
MODEL_MU, MODEL_STD = 0.2, 1.1  # the model's score: exact score of a *different* Gaussian


def _gaussian(mu, std):
    return sf.GaussianMixture(jnp.ones(1), jnp.full((1, D), mu), jnp.full((1,), std))


def _flow(sde, eps):
    net = sf.nets.GaussianMixtureScore(_gaussian(MODEL_MU, MODEL_STD), sde)
    return sf.ScoreFlow(sde, net, parameterization="score", eps=eps)


def _expected(sde, eps, weighting):
    """1/2 int_eps^T lambda(t) E||s(t, x_t) - grad log p_0t(x_t | x_0)||^2 dt, in closed form:
    E||s - k||^2 = E||s - s*||^2 + E||k||^2 - E||s*||^2 with s* the true score."""

    def integrand(t):
        alpha, sigma = (float(v) for v in sde.marginal(jnp.asarray(t)))
        m, v = alpha * DATA_MU, (alpha * DATA_STD) ** 2 + sigma**2
        m2, v2 = alpha * MODEL_MU, (alpha * MODEL_STD) ** 2 + sigma**2
        a, b = 1 / v - 1 / v2, m2 / v2 - m / v  # s - s* = a x + b
        per_dim = (a * m + b) ** 2 + a**2 * v + 1 / sigma**2 - 1 / v
        lam = (
            float(sde.diffusion_squared(jnp.asarray(t))) if weighting == "likelihood" else sigma**2
        )
        return 0.5 * lam * D * per_dim

    pts = sorted({p for p in [eps, 1e-4, 1e-3, 1e-2, 0.1, 1.0] if p >= eps})
    return sum(
        scipy.integrate.quad(integrand, lo, hi, epsrel=1e-10, limit=200)[0]
        for lo, hi in zip(pts[:-1], pts[1:])
    )


def _losses(flow, n, seed, **kwargs):
    keys = jr.split(jr.key(seed), n)
    data = _gaussian(DATA_MU, DATA_STD)

    @jax.jit
    @jax.vmap
    def one(key):
        dkey, lkey = jr.split(key)
        return flow.loss(data.sample(key=dkey), key=lkey, **kwargs)

    return np.asarray(one(keys))


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("weighting", ["likelihood", "score_sde"])
@pytest.mark.parametrize("importance_sampling", [True, False])
def test_loss_expectation_matches_closed_form(name, weighting, importance_sampling):
    sde, eps = SDES[name], 1e-3 if name != "subvp" else 1e-2
    flow = _flow(sde, eps)
    losses = _losses(flow, 100_000, 0, weighting=weighting, importance_sampling=importance_sampling)
    expected = _expected(sde, eps, weighting)
    se = losses.std() / math.sqrt(losses.size)
    assert abs(losses.mean() - expected) < 4 * se, (losses.mean(), expected, se)


@pytest.mark.parametrize("name, factor", [("vp", 10), ("subvp", 3)])
def test_importance_sampling_reduces_variance(name, factor):
    # At the default eps (1e-5 for VP, where g^2 / sigma^2 ~ 1/t makes uniform sampling
    # very noisy; 1e-2 for sub-VP, where the gain is smaller).
    sde = SDES[name]
    flow = _flow(sde, None)
    uniform = _losses(flow, 50_000, 1, importance_sampling=False)
    importance = _losses(flow, 50_000, 1, importance_sampling=True)
    assert importance.var() * factor < uniform.var()
    # ... and both estimate the same thing.
    se = math.sqrt(uniform.var() / uniform.size + importance.var() / importance.size)
    assert abs(uniform.mean() - importance.mean()) < 4 * se


def test_loss_with_exact_score_is_the_entropy_gap():
    # With the exact score, the likelihood-weighted objective is
    # 1/2 int g^2 D (1/sigma^2 - 1/v) dt; a check independent of the mismatch algebra.
    sde = SDES["vp"]
    data = _gaussian(DATA_MU, DATA_STD)
    flow = sf.ScoreFlow(sde, sf.nets.GaussianMixtureScore(data, sde), parameterization="score")

    def integrand(t):
        alpha, sigma = (float(v) for v in sde.marginal(jnp.asarray(t)))
        v = (alpha * DATA_STD) ** 2 + sigma**2
        return 0.5 * float(sde.diffusion_squared(jnp.asarray(t))) * D * (1 / sigma**2 - 1 / v)

    pts = [1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0]
    expected = sum(
        scipy.integrate.quad(integrand, a, b, epsrel=1e-10)[0] for a, b in zip(pts, pts[1:])
    )
    keys = jr.split(jr.key(3), 50_000)
    losses = jax.jit(jax.vmap(lambda k: flow.loss(data.sample(key=jr.fold_in(k, 1)), key=k)))(keys)
    se = losses.std() / math.sqrt(losses.size)
    assert abs(losses.mean() - expected) < 4 * se


def test_fixed_time():
    flow = _flow(SDES["vp"], None)
    x0 = jnp.array([0.3, -0.2])
    a = flow.loss(x0, key=jr.key(0), t=0.5)
    b = flow.loss(x0, key=jr.key(0), t=0.5, importance_sampling=False)
    # Same t and noise: the weights differ by Z vs (T - eps) g^2 / sigma^2.
    sampler = sf.ImportanceSampler(flow.sde, flow.eps)
    _, sigma = flow.sde.marginal(0.5)
    ratio = sampler.Z / ((1 - flow.eps) * flow.sde.diffusion_squared(0.5) / sigma**2)
    assert np.isclose(a / b, ratio, rtol=1e-10)


def test_unknown_weighting():
    flow = _flow(SDES["vp"], None)
    with pytest.raises(ValueError, match="likelihood"):
        flow.loss(jnp.zeros(D), key=jr.key(0), weighting="uniform")
