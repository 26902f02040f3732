"""The model as a density: `sample_and_log_prob` against the analytic density of an
exact-score mixture and against `ode_nll`, and the Theorem 4 entropy estimator against a
Gaussian's closed form."""

import math

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from helpers import gaussian_mixture_2d
from registry import SDES

import scoreflow_eqx as sf
from scoreflow_eqx.nets._exact import GaussianMixtureScore


# beta_max = 40: p_T is the prior up to ~1e-5, so the ODE density is the mixture's own.
SDE = sf.VPSDE(beta_min=0.1, beta_max=40.0)


def _flow(mixture, sde=SDE):
    return sf.ScoreFlow(sde, GaussianMixtureScore(mixture, sde), parameterization="score")


def test_log_prob_is_the_mixture_density():
    mixture = gaussian_mixture_2d()
    flow = _flow(mixture)
    keys = jr.split(jr.key(0), 8)
    res = jax.vmap(
        lambda k: sf.sample_and_log_prob(
            flow, (2,), key=k, divergence=sf.ExactTrace(), rtol=1e-7, atol=1e-7, throw=False
        )
    )(keys)
    assert res.x.shape == (8, 2) and res.log_prob.shape == (8,) and res.nfe.shape == (8,)
    assert jnp.all(dfx.is_successful(res.result))
    truth = jax.vmap(mixture.diffuse(SDE, flow.eps).log_prob)(res.x)
    assert jnp.allclose(res.log_prob, truth, atol=1e-4)
    assert jnp.allclose(res.log_prob, res.prior_logp + res.delta_logp)


def test_hutchinson_log_prob_is_unbiased():
    mixture = gaussian_mixture_2d()
    flow = _flow(mixture)
    keys = jr.split(jr.key(1), 64)
    res = jax.vmap(lambda k: sf.sample_and_log_prob(flow, (2,), key=k, throw=False))(keys)
    error = res.log_prob - jax.vmap(mixture.diffuse(SDE, flow.eps).log_prob)(res.x)
    assert abs(float(jnp.mean(error))) < 4 * float(jnp.std(error)) / 8 + 1e-3
    assert float(jnp.std(error)) > 1e-3  # the probes do matter


def test_log_prob_agrees_with_ode_nll_of_the_sample():
    # A network with no closed form: the density of the sample from one solve is the
    # NLL that `ode_nll` computes from the sample, in the other direction.
    sde = sf.VPSDE()
    net = sf.nets.MLP(data_shape=(2,), width_size=16, depth=2, key=jr.key(0))
    flow = sf.ScoreFlow(sde, net)
    opts = dict(divergence=sf.ExactTrace(), rtol=1e-6, atol=1e-6)
    res = sf.sample_and_log_prob(flow, key=jr.key(3), **opts)
    nll = sf.ode_nll(flow, res.x, **opts)
    assert jnp.allclose(res.log_prob, -nll.nll, atol=1e-4)
    assert jnp.allclose(nll.z, res.z, atol=1e-4)


def test_sample_and_log_prob_refuses_bad_options():
    flow = _flow(gaussian_mixture_2d())
    with pytest.raises(TypeError, match="adjoint"):
        sf.sample_and_log_prob(flow, (2,), key=jr.key(0), adjoint="backsolve")  # pyright: ignore
    with pytest.raises(ValueError, match="divergence"):
        sf.sample_and_log_prob(flow, (2,), key=jr.key(0), divergence="trace")


@pytest.mark.parametrize("sde", [SDES["vp"], SDES["ve"]], ids=["vp", "ve"])
def test_entropy_of_a_gaussian(sde):
    # H(N(m, s^2 I_D)) = D/2 log(2 pi e s^2), with the exact score.
    d, s = 3, 0.5
    gaussian = sf.GaussianMixture(jnp.ones(1), jnp.array([[0.7, -1.2, 0.3]]), jnp.array([s]))
    flow = _flow(gaussian, sde)
    data = jax.vmap(lambda k: gaussian.sample(key=k))(jr.split(jr.key(5), 4000))
    res = sf.entropy(flow, data, key=jr.key(6))
    truth = 0.5 * d * math.log(2 * math.pi * math.e * s**2)
    assert float(res.stderr) < 0.2
    assert abs(float(res.entropy) - truth) < 4 * float(res.stderr)
    assert res.per_example.shape == (4000,)


def test_entropy_control_variate_is_unbiased_and_helps():
    gaussian = sf.GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), jnp.array([1.0]))
    flow = _flow(gaussian, sf.VPSDE())
    data = jax.vmap(lambda k: gaussian.sample(key=k))(jr.split(jr.key(7), 1000))
    plain = sf.entropy(flow, data, key=jr.key(8), control_variate=False)
    cv = sf.entropy(flow, data, key=jr.key(8), control_variate=True)
    assert float(cv.stderr) < 0.6 * float(plain.stderr)
    both = math.hypot(float(cv.stderr), float(plain.stderr))
    assert abs(float(cv.entropy) - float(plain.entropy)) < 4 * both


def test_entropy_refuses_bad_data():
    flow = _flow(gaussian_mixture_2d())
    with pytest.raises(ValueError, match="at least two"):
        sf.entropy(flow, jnp.zeros((1, 2)), key=jr.key(0))
    with pytest.raises(ValueError, match="num_t"):
        sf.entropy(flow, jnp.zeros((4, 2)), key=jr.key(0), num_t=0)
