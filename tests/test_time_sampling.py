import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from registry import SDES  # VP/subVP beta in [0.1, 20], VE sigma in [0.01, 50]

import scoreflow_eqx as sf


@pytest.fixture(params=list(SDES), ids=list(SDES))
def sampler(request):
    return sf.ImportanceSampler(SDES[request.param])


def test_check_values():
    # DESIGN.md, section 3: beta in [0.1, 20].
    assert np.isclose(sf.ImportanceSampler(SDES["vp"], 1e-5).Z, 23.864472, atol=2e-6)
    assert np.isclose(sf.ImportanceSampler(SDES["subvp"], 1e-2).Z, 22.484136, atol=2e-6)


def test_Z_against_quadrature(sampler):
    sde = sampler.sde

    def density(t):
        _, sigma = sde.marginal(jnp.asarray(t))
        return float(sde.diffusion_squared(jnp.asarray(t)) / sigma**2)

    # g^2 / sigma^2 ~ 1/t near t = 0 for VP: split the range at small t.
    pts = [sampler.eps, 1e-3, 1e-2, 0.1, 1.0]
    pts = sorted({p for p in pts if p >= sampler.eps})
    z = sum(
        scipy.integrate.quad(density, a, b, epsrel=1e-11, limit=200)[0]
        for a, b in zip(pts[:-1], pts[1:])
    )
    assert np.isclose(sampler.Z, z, rtol=1e-8)


def test_pdf_is_derivative_of_cdf(sampler):
    ts = jnp.linspace(sampler.eps * 2, 0.99, 25)  # inside the support
    dcdf = jax.vmap(jax.grad(sampler.cdf))(ts)
    assert np.allclose(dcdf, jax.vmap(sampler.pdf)(ts), rtol=1e-8)
    assert np.isclose(sampler.cdf(sampler.eps), 0.0, atol=1e-12)
    assert np.isclose(sampler.cdf(1.0), 1.0, atol=1e-12)
    assert sampler.pdf(sampler.eps / 2) == 0.0


def test_icdf_inverts_cdf(sampler):
    u = jnp.linspace(0.0, 1.0, 101)
    t = jax.vmap(sampler.icdf)(u)
    assert jnp.all(t >= sampler.eps) and jnp.all(t <= 1.0)
    assert np.allclose(jax.vmap(sampler.cdf)(t), u, atol=1e-10)
    ts = jnp.geomspace(sampler.eps, 1.0, 50)
    assert np.allclose(jax.vmap(sampler.icdf)(jax.vmap(sampler.cdf)(ts)), ts, rtol=1e-8)


def test_samples_follow_pdf(sampler):
    samples = np.asarray(sampler.sample(jr.key(0), (20_000,)))
    cdf = jax.jit(jax.vmap(sampler.cdf))
    result = scipy.stats.kstest(samples, lambda t: np.asarray(cdf(jnp.asarray(t))))
    assert result.pvalue > 1e-3
    # A deliberately wrong proposal (uniform) must be rejected for VP and sub-VP.
    if not isinstance(sampler.sde, sf.VESDE):
        uniform = np.asarray(jr.uniform(jr.key(1), (20_000,), minval=sampler.eps))
        assert scipy.stats.kstest(uniform, lambda t: np.asarray(cdf(jnp.asarray(t)))).pvalue < 1e-6


def test_float32(sampler):
    t = sampler.sample(jr.key(0), (1000,)).astype(jnp.float32)
    u = jr.uniform(jr.key(0), (1000,), dtype=jnp.float32)
    t = jax.vmap(sampler.icdf)(u)
    assert t.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(t)) and jnp.all(t >= sampler.eps) and jnp.all(t <= 1.0)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        sf.ImportanceSampler(SDES["vp"], eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        sf.ImportanceSampler(SDES["vp"], eps=1.5)
