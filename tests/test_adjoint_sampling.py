"""Gradients of samples (probability-flow ODE and reverse SDE, with both adjoints) with
respect to the parameters of an exact-score Gaussian, against finite differences."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import scoreflow_eqx as sf
from scoreflow_eqx.nets._exact import GaussianMixtureScore


SDE = sf.VPSDE()


def _flow(mixture, sde=SDE):
    return sf.ScoreFlow(sde, GaussianMixtureScore(mixture, sde), parameterization="score")


def _finite_difference(f, m, h=1e-4):
    return jnp.stack(
        [(f(m.at[i].add(h)) - f(m.at[i].add(-h))) / (2 * h) for i in range(m.shape[0])]
    )


SAMPLERS = {
    "ode": sf.ProbabilityFlow(
        solver=dfx.Tsit5(), stepsize_controller=dfx.ConstantStepSize(), dt0=0.02
    ),
    "ode_backsolve": sf.ProbabilityFlow(
        solver=dfx.Tsit5(),
        stepsize_controller=dfx.ConstantStepSize(),
        dt0=0.02,
        adjoint=dfx.BacksolveAdjoint(),
    ),
    "sde": sf.ReverseSDE(num_steps=50),
    "sde_heun_backsolve": sf.ReverseSDE(
        solver=dfx.Heun(), num_steps=50, adjoint=dfx.BacksolveAdjoint()
    ),
}


@pytest.mark.parametrize("sampler", list(SAMPLERS.values()), ids=list(SAMPLERS))
def test_sample_gradient_matches_finite_differences(sampler):
    # Fixed steps and a fixed key: the sample is a smooth function of the mean.
    m0 = jnp.array([0.5, -0.3])
    key = jr.key(0)

    def sample_sum(m):
        mixture = sf.GaussianMixture(jnp.ones(1), m[None], jnp.array([0.5]))
        return jnp.sum(sf.sample(_flow(mixture), (2,), key=key, sampler=sampler).x)

    grad = jax.jit(jax.grad(sample_sum))(m0)
    fd = _finite_difference(jax.jit(sample_sum), m0)
    assert jnp.allclose(grad, fd, rtol=1e-3, atol=1e-5)
