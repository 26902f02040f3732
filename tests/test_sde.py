import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from registry import SDES  # VP/subVP beta in [0.1, 20], VE sigma in [0.01, 50]

import scoreflow_eqx as sf


TIMES = [1e-5, 1e-3, 0.1, 0.5, 1.0]


@pytest.fixture(params=list(SDES), ids=list(SDES))
def sde(request):
    return SDES[request.param]


def _closed_form(sde, t):
    # Written independently of the library, in numpy float64.
    if isinstance(sde, sf.VESDE):
        sigma = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
        return 1.0, sigma
    b = sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t**2
    alpha = np.exp(-b / 2)
    if isinstance(sde, sf.VPSDE):
        return alpha, np.sqrt(-np.expm1(-b))
    return alpha, -np.expm1(-b)


@pytest.mark.parametrize("t", TIMES)
def test_marginal_closed_form(sde, t):
    alpha, sigma = sde.marginal(jnp.asarray(t))
    a_ref, s_ref = _closed_form(sde, t)
    assert np.allclose(alpha, a_ref, rtol=1e-12)
    assert np.allclose(sigma, s_ref, rtol=1e-12)


@pytest.mark.parametrize("t", [0.01, 0.3, 1.0])
def test_marginal_consistent_with_drift_and_diffusion(sde, t):
    # For dx = -c(t) x dt + g(t) dw: alpha_t = exp(-int c) and
    # sigma_t^2 = alpha_t^2 (sigma_0^2 + int_0^t g(s)^2 / alpha_s^2 ds).
    x = jnp.ones(3)

    def coeff(s):  # drift = coeff(s) * x
        return float(sde.drift(jnp.asarray(s), x)[0])

    log_alpha = scipy.integrate.quad(coeff, 0.0, t, epsabs=1e-13, epsrel=1e-12)[0]

    def integrand(s):
        alpha_s = math.exp(scipy.integrate.quad(coeff, 0.0, s, epsrel=1e-12)[0])
        return float(sde.diffusion_squared(jnp.asarray(s))) / alpha_s**2

    sigma0 = float(sde.marginal(jnp.asarray(0.0))[1])
    integral = scipy.integrate.quad(integrand, 0.0, t, epsrel=1e-10, limit=200)[0]
    alpha, sigma = sde.marginal(jnp.asarray(t))
    assert np.allclose(alpha, math.exp(log_alpha), rtol=1e-9)
    assert np.allclose(sigma**2, math.exp(2 * log_alpha) * (sigma0**2 + integral), rtol=1e-7)
    # g and g^2 agree, and the drift divergence is exact.
    assert np.allclose(sde.diffusion(jnp.asarray(t)) ** 2, sde.diffusion_squared(jnp.asarray(t)))
    jac = jax.jacfwd(lambda y: sde.drift(jnp.asarray(t), y))(jnp.ones(4))
    assert np.allclose(jnp.trace(jac), sde.drift_divergence(jnp.asarray(t), jnp.ones(4)))


def test_marginal_float32_small_t(sde):
    t32 = jnp.asarray(1e-5, dtype=jnp.float32)
    alpha, sigma = sde.marginal(t32)
    assert alpha.dtype == jnp.float32 and sigma.dtype == jnp.float32
    a_ref, s_ref = _closed_form(sde, 1e-5)
    assert abs(float(alpha) - a_ref) / a_ref < 1e-6
    assert abs(float(sigma) - s_ref) / s_ref < 1e-5
    g2 = sde.diffusion_squared(t32)
    assert g2.dtype == jnp.float32 and bool(jnp.isfinite(g2))


def _gaussian_moments(sde, t, mu, s0):
    alpha, sigma = sde.marginal(jnp.asarray(t))
    return alpha * mu, jnp.sqrt((alpha * s0) ** 2 + sigma**2)


@pytest.mark.parametrize("name", list(SDES))
def test_forward_sde_reproduces_marginal(name):
    # Each coordinate of a (N,)-shaped state is an independent path (diagonal noise).
    sde = SDES[name]
    mu, s0, n, s, t = 0.7, 0.4, 10_000, 0.2, 1.0
    m_s, std_s = _gaussian_moments(sde, s, mu, s0)
    x_s = m_s + std_s * jr.normal(jr.key(0), (n,))
    dt = (t - s) / 250
    terms = sde.forward_terms(x_s, key=jr.key(1), t0=s, t1=t, tol=dt / 2)
    sol = dfx.diffeqsolve(terms, dfx.Euler(), s, t, dt, x_s, max_steps=300)
    x_t = sol.ys[0]
    m_t, std_t = _gaussian_moments(sde, t, mu, s0)
    se_mean = std_t / math.sqrt(n)
    se_var = std_t**2 * math.sqrt(2 / (n - 1))
    assert abs(jnp.mean(x_t) - m_t) < 4 * se_mean
    # Euler-Maruyama has an O(dt) bias on top of the sampling error.
    assert abs(jnp.var(x_t) - std_t**2) < 4 * se_var + 0.01 * std_t**2


@pytest.mark.parametrize("name", list(SDES))
def test_reverse_sde_with_exact_score_reproduces_marginal(name):
    sde = SDES[name]
    mu, s0, n, s, t = 0.7, 0.4, 10_000, 0.1, 1.0
    data = sf.GaussianMixture(jnp.ones(1), jnp.full((1, n), mu), jnp.full((1,), s0))
    score = sf.nets.GaussianMixtureScore(data, sde)
    m_t, std_t = _gaussian_moments(sde, t, mu, s0)
    x_t = m_t + std_t * jr.normal(jr.key(2), (n,))
    dt = (t - s) / 250
    terms = sde.reverse_terms(score, x_t, key=jr.key(3), t0=s, t1=t, tol=dt / 2)
    sol = dfx.diffeqsolve(terms, dfx.Euler(), t, s, -dt, x_t, max_steps=300)
    x_s = sol.ys[0]
    m_s, std_s = _gaussian_moments(sde, s, mu, s0)
    assert abs(jnp.mean(x_s) - m_s) < 4 * std_s / math.sqrt(n)
    # Euler-Maruyama has an O(dt) bias on top of the sampling error.
    assert abs(jnp.var(x_s) - std_s**2) < 4 * std_s**2 * math.sqrt(2 / n) + 5e-3


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_probability_flow_carries_gaussian_to_marginal(sde, t):
    # For Gaussian data the flow map preserves the standardised coordinate
    # (x - m_t) / std_t, with m_t = alpha_t mu and std_t^2 = alpha_t^2 s0^2 + sigma_t^2.
    mu = jnp.array([0.5, -1.0, 2.0])
    s0 = jnp.array([0.3, 1.0, 0.6])
    data = sf.GaussianMixture(jnp.ones(1), mu[None], s0[None])
    score = sf.nets.GaussianMixtureScore(data, sde)
    eps = sde.default_eps
    m_eps, std_eps = _gaussian_moments(sde, eps, mu, s0)
    m_t, std_t = _gaussian_moments(sde, t, mu, s0)
    x_eps = m_eps + std_eps * jnp.array([1.3, -0.4, 2.1])
    term = sde.probability_flow_term(score)
    sol = dfx.diffeqsolve(
        term,
        dfx.Dopri5(),
        eps,
        t,
        None,
        x_eps,
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
        max_steps=100_000,
    )
    expected = m_t + (x_eps - m_eps) * std_t / std_eps
    assert np.allclose(sol.ys[0], expected, rtol=1e-6, atol=1e-6)


def test_prior(sde):
    x = jnp.linspace(-2.0, 3.0, 6).reshape(2, 3)
    std = sde.prior_std()
    expected = scipy.stats.norm(0.0, std).logpdf(np.asarray(x)).sum()
    assert np.allclose(sde.prior_logp(x), expected, rtol=1e-12)
    samples = jax.vmap(lambda k: sde.prior_sample(k, (3,)))(jr.split(jr.key(0), 20_000))
    assert samples.shape == (20_000, 3)
    assert np.allclose(jnp.std(samples), std, rtol=0.02)
    assert np.allclose(jnp.mean(samples), 0.0, atol=0.03 * std)


def test_sdes_work_under_jit_vmap_grad(sde):
    ts = jnp.linspace(0.01, 1.0, 5)
    alpha, sigma = jax.jit(jax.vmap(sde.marginal))(ts)
    assert alpha.shape == sigma.shape == (5,)
    dsigma = jax.grad(lambda t: sde.marginal(t)[1])(0.5)
    assert bool(jnp.isfinite(dsigma)) and dsigma > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: sf.VPSDE(beta_min=0.0, beta_max=20.0),
        lambda: sf.VPSDE(beta_min=1.0, beta_max=0.5),
        lambda: sf.VPSDE(beta_min=-1.0, beta_max=20.0),
        lambda: sf.SubVPSDE(beta_min=5.0, beta_max=5.0),
        lambda: sf.SubVPSDE(beta_min=float("nan"), beta_max=5.0),
        lambda: sf.VESDE(sigma_min=1.0, sigma_max=1.0),
        lambda: sf.VESDE(sigma_min=0.0, sigma_max=50.0),
        lambda: sf.VESDE(sigma_min=0.01, sigma_max=float("inf")),
    ],
)
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError, match="beta|sigma"):
        make()


def test_deprecated_log_snr_names_warn_and_agree(sde):
    t = jnp.asarray(0.3)
    with pytest.warns(DeprecationWarning, match="neg_log_snr"):
        a = sde.log_snr_antiderivative(t)
    assert bool(eqx.tree_equal(a, sde.neg_log_snr(t)))
    with pytest.warns(DeprecationWarning, match="inverse_neg_log_snr"):
        back = sde.inverse_log_snr_antiderivative(a)
    assert bool(eqx.tree_equal(back, sde.inverse_neg_log_snr(a)))
