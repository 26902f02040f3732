import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import gaussian_mixture_2d
from registry import SDES

import scoreflow_eqx as sf


@pytest.mark.parametrize("sde", SDES.values(), ids=list(SDES))
def test_noise_parameterization(sde):
    net = sf.nets.MLP((2,), width_size=16, depth=2, key=jr.key(0))
    flow = sf.ScoreFlow(sde, net)
    x = jnp.array([0.3, -1.2])

    def raw(t):  # the net's output, given what the flow conditions it on
        return net(net.conditioning(sde, t), x)

    for t in [1e-4, 0.3, 1.0]:
        _, sigma = sde.marginal(t)
        assert np.allclose(flow.score(t, x), -raw(t) / sigma, rtol=1e-12)
        assert np.allclose(flow.scaled_score(t, x), -raw(t), rtol=1e-12)
    score_flow = sf.ScoreFlow(sde, net, parameterization="score")
    _, sigma = sde.marginal(0.3)
    assert np.allclose(score_flow.score(0.3, x), raw(0.3))
    assert np.allclose(score_flow.scaled_score(0.3, x), sigma * raw(0.3))


def test_exact_mixture_score_matches_autodiff_of_diffused_density():
    mixture = gaussian_mixture_2d()
    sde = sf.VPSDE()
    flow = sf.ScoreFlow(sde, sf.nets.GaussianMixtureScore(mixture, sde), parameterization="score")
    x, t = jnp.array([0.1, 0.4]), 0.37
    # Independent reference: marginal density by numerical convolution is overkill; the
    # diffused mixture must integrate the kernel exactly, which we check via its moments.
    pt = mixture.diffuse(sde, t)
    alpha, sigma = sde.marginal(t)
    assert np.allclose(pt.mean(), alpha * mixture.mean())
    assert np.allclose(
        pt.covariance(), alpha**2 * mixture.covariance() + sigma**2 * jnp.eye(2), rtol=1e-12
    )
    assert np.allclose(flow.score(t, x), jax.grad(pt.log_prob)(x))


def test_flow_is_a_pytree_that_jits_vmaps_and_grads():
    net = sf.nets.MLP((2,), width_size=16, depth=2, key=jr.key(0))
    flow = sf.ScoreFlow(sf.VPSDE(), net)
    xs = jr.normal(jr.key(1), (8, 2))
    keys = jr.split(jr.key(2), 8)

    @eqx.filter_jit
    def batch_loss(flow, xs, keys):
        return jnp.mean(jax.vmap(lambda x, k: flow.loss(x, key=k))(xs, keys))

    loss, grads = eqx.filter_value_and_grad(batch_loss)(flow, xs, keys)
    assert jnp.isfinite(loss)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    # The SDE's parameters are static configuration, never trained.
    assert not jax.tree.leaves(eqx.filter(flow.sde, eqx.is_inexact_array))


def test_bad_construction():
    net = sf.nets.MLP((2,), key=jr.key(0))
    with pytest.raises(ValueError, match="noise"):
        sf.ScoreFlow(sf.VPSDE(), net, parameterization="epsilon")
    with pytest.raises(ValueError, match="eps"):
        sf.ScoreFlow(sf.VPSDE(), net, eps=0.0)
    with pytest.raises(TypeError, match="AbstractSDE"):
        sf.ScoreFlow("vp", net)
    with pytest.raises(TypeError, match="callable|net"):  # or the jaxtyping hook
        sf.ScoreFlow(sf.VPSDE(), 3.0)
    assert sf.ScoreFlow(sf.SubVPSDE(), net).eps == 1e-2
    assert sf.ScoreFlow(sf.VPSDE(), net).eps == 1e-5


def test_wrong_shape_is_a_clear_error():
    net = sf.nets.MLP((2,), key=jr.key(0))
    flow = sf.ScoreFlow(sf.VPSDE(), net)
    with pytest.raises(ValueError, match=r"shape \(2,\).*\(3,\)"):
        flow.score(0.5, jnp.zeros(3))
    with pytest.raises(ValueError, match="vmap"):
        flow.score(0.5, jnp.zeros((4, 2)))
