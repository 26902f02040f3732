"""Differentiating through the solves (`adjoint=`): gradients of the exact-trace NLL with
respect to the data and to the parameters of an exact-score Gaussian mixture against
closed forms, gradients of samples against finite differences, and refused adjoints."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from helpers import gaussian_mixture_2d

import scoreflow_eqx as sf
from scoreflow_eqx.nets._exact import GaussianMixtureScore


ADJOINTS = {
    "recursive_checkpoint": dfx.RecursiveCheckpointAdjoint(),
    "backsolve": dfx.BacksolveAdjoint(),
}

# beta_max = 40: alpha_T = exp(-10), so p_T is the prior up to ~1e-5 and the ODE's
# log-density is the mixture's own at eps.
SDE = sf.VPSDE(beta_min=0.1, beta_max=40.0)


def _flow(mixture, sde=SDE):
    return sf.ScoreFlow(sde, GaussianMixtureScore(mixture, sde), parameterization="score")


@pytest.mark.parametrize("adjoint", list(ADJOINTS.values()), ids=list(ADJOINTS))
def test_nll_gradients_match_the_mixture(adjoint):
    # d NLL / dx = -grad log p_eps(x), and d NLL / d means = the derivative of the
    # closed-form -log p_eps(x) with respect to the component means.
    mixture = gaussian_mixture_2d()
    flow = _flow(mixture)
    x = jnp.array([0.3, -0.2])

    @jax.jit
    def grads(flow, x):
        def nll(flow_and_x):
            flow, x = flow_and_x
            res = sf.ode_nll(
                flow, x, divergence=sf.ExactTrace(), rtol=1e-7, atol=1e-7, adjoint=adjoint
            )
            return res.nll

        return eqx.filter_grad(nll)((flow, x))

    grad_flow, grad_x = grads(flow, x)

    def closed_form(means, x):
        mix = eqx.tree_at(lambda m: m.means, mixture, means)
        return -mix.diffuse(SDE, flow.eps).log_prob(x)

    expected_means, expected_x = jax.grad(closed_form, argnums=(0, 1))(mixture.means, x)
    assert jnp.allclose(grad_x, expected_x, atol=1e-4)
    assert jnp.allclose(grad_flow.net.mixture.means, expected_means, atol=1e-4)


@pytest.mark.parametrize("adjoint", list(ADJOINTS.values()), ids=list(ADJOINTS))
def test_gaussian_mean_gradient_is_analytic(adjoint):
    # Data N(m, 1) under VP keep unit variance, so the exact probability flow is the
    # shift x_t = x + (alpha_t - alpha_eps) m: NLL(x) = -log N(z; 0, 1) with
    # z = x + (alpha_T - alpha_eps) m (the prior mismatch included), hence
    # d NLL / dm = (alpha_T - alpha_eps) z, exactly.
    sde = sf.VPSDE()
    m = jnp.array([0.7, -1.2])
    mixture = sf.GaussianMixture(jnp.ones(1), m[None], jnp.ones(1))
    flow = _flow(mixture, sde)
    x = jnp.array([0.4, 0.9])

    @jax.jit
    def grad_mean(flow):
        res = eqx.filter_grad(
            lambda f: (
                sf.ode_nll(
                    f, x, divergence=sf.ExactTrace(), rtol=1e-9, atol=1e-9, adjoint=adjoint
                ).nll
            )
        )(flow)
        return res.net.mixture.means[0]

    (alpha_eps, _), (alpha_T, _) = sde.marginal(flow.eps), sde.marginal(sde.T)
    z = x + (alpha_T - alpha_eps) * m
    assert jnp.allclose(grad_mean(flow), (alpha_T - alpha_eps) * z, atol=1e-6)


def test_batched_nll_backsolve_gradient():
    flow = _flow(gaussian_mixture_2d())
    xs = jnp.array([[0.3, -0.2], [-0.8, 0.4]])

    def nll(xs):
        res = sf.ode_nll_batched(
            flow,
            xs,
            divergence=sf.ExactTrace(),
            rtol=1e-5,
            atol=1e-5,
            adjoint=dfx.BacksolveAdjoint(),
        )
        return jnp.sum(res.nll)

    expected = jax.vmap(lambda x: -gaussian_mixture_2d().diffuse(SDE, flow.eps).score(x))(xs)
    assert jnp.allclose(jax.jit(jax.grad(nll))(xs), expected, atol=1e-3)


@pytest.mark.parametrize(
    "build",
    [
        lambda a: sf.ode_nll(_flow(gaussian_mixture_2d()), jnp.zeros(2), key=jr.key(0), adjoint=a),
        lambda a: sf.decode(_flow(gaussian_mixture_2d()), jnp.zeros(2), adjoint=a),
        lambda a: sf.encode(_flow(gaussian_mixture_2d()), jnp.zeros(2), adjoint=a),
        lambda a: sf.ProbabilityFlow(adjoint=a),
        lambda a: sf.ReverseSDE(adjoint=a),
        lambda a: sf.ODELikelihood(adjoint=a),
    ],
    ids=["ode_nll", "decode", "encode", "ProbabilityFlow", "ReverseSDE", "ODELikelihood"],
)
def test_not_an_adjoint_is_refused(build):
    with pytest.raises(TypeError, match="adjoint"):
        build("backsolve")
    with pytest.raises(ValueError, match="ImplicitAdjoint"):
        build(dfx.ImplicitAdjoint())


def test_backsolve_needs_a_stratonovich_sde_solver():
    with pytest.raises(ValueError, match="Stratonovich solver, and Euler is not one"):
        sf.ReverseSDE(adjoint=dfx.BacksolveAdjoint())
    sf.ReverseSDE(solver=dfx.Heun(), adjoint=dfx.BacksolveAdjoint())  # accepted
