"""Samplers against an exact ground truth: Gaussian mixtures have exact scores and
marginals under every linear SDE, so samples must match the mixture within Monte Carlo
error."""

import dataclasses

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import registry
from helpers import gaussian_mixture_2d
from registry import NUM_STEPS, SAMPLER_SHORTHANDS, SAMPLERS

import scoreflow_eqx as sf


N = 1000  # samples per check
SDES = {k: registry.SDES[k] for k in ("vp", "ve")}  # subVP: covered by test_sde


def _flow(sde, mixture):
    net = sf.nets.GaussianMixtureScore(mixture, sde)
    return sf.ScoreFlow(sde, net, parameterization="score")


def _mean_cov_z(x, mean, cov):
    """z-scores of the sample mean and of the sample covariance entries against their
    true values, with standard errors estimated from the samples."""
    n = x.shape[0]
    mean_z = (x.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
    c = x - mean  # centred at the true mean: products are unbiased for cov
    prods = c[:, :, None] * c[:, None, :]
    cov_z = (prods.mean(0) - cov) / (prods.std(0) / np.sqrt(n))
    return mean_z, cov_z


def _energy_distance_test(x, y, *, seed, num_permutations=199):
    """Energy distance between two samples, its permutation null distribution and the
    permutation p-value (all permutations at once: one matrix product)."""
    z = np.concatenate([x, y])
    d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    n, m = len(x), len(y)
    labels = np.concatenate([np.ones(n), np.zeros(m)])
    rng = np.random.default_rng(seed)
    u = np.stack([labels] + [rng.permutation(labels) for _ in range(num_permutations)], 1)
    du = d @ u
    dv = d.sum(1, keepdims=True) - du
    v = 1.0 - u
    stats = 2 * (u * dv).sum(0) / (n * m) - (u * du).sum(0) / n**2 - (v * dv).sum(0) / m**2
    observed, null = stats[0], stats[1:]
    p_value = (1 + np.sum(null >= observed)) / (1 + num_permutations)
    return observed, null, p_value


@pytest.fixture(scope="module")
def mixture():
    return gaussian_mixture_2d()


@pytest.fixture(scope="module")
def truth(mixture):
    """Per SDE: the exact mean, covariance and N exact samples (numpy, fixed seed) of
    the law of the sampled state at `eps`, i.e. the mixture diffused to `eps`."""
    out = {}
    for name, sde in SDES.items():
        target = mixture.diffuse(sde, sde.default_eps)
        w = np.exp(np.asarray(target.log_weights))
        means, stds = np.asarray(target.means), np.asarray(target.stds)
        rng = np.random.default_rng(1)
        k = rng.choice(len(w), size=N, p=w / w.sum())
        y = means[k] + stds[k] * rng.standard_normal((N, 2))
        out[name] = np.asarray(target.mean()), np.asarray(target.covariance()), y
    return out


# ---- samples match the mixture ------------------------------------------------------


@pytest.mark.parametrize(
    "sde_name,method",
    [(s, m) for s in SDES for m in ("ode", "sde", "pc")] + [("ve", "sde_heun"), ("vp", "pc_em")],
)
def test_samples_match_mixture(mixture, truth, sde_name, method):
    sde = SDES[sde_name]
    flow = _flow(sde, mixture)
    sampler = SAMPLERS[method]
    draw = jax.jit(jax.vmap(lambda k: sf.sample(flow, (2,), key=k, sampler=sampler)))
    res = draw(jr.split(jr.key(0), N))
    ok = np.asarray(res.result == dfx.RESULTS.successful)
    res = jax.tree.map(np.asarray, res)
    x = res.x
    assert x.shape == (N, 2) and np.all(ok)

    # Moments of the exact law of the sampled state (the mixture diffused to eps).
    mean, cov, y = truth[sde_name]
    mean_z, cov_z = _mean_cov_z(x, mean, cov)
    assert np.all(np.abs(mean_z) < 4), mean_z
    assert np.all(np.abs(cov_z) < 4), cov_z

    # Two-sample test against exact samples of the same size.
    ed, null, p_value = _energy_distance_test(x, y, seed=2)
    assert p_value > 0.01, (ed, np.median(null), p_value)
    assert ed < 3 * np.median(null)

    # Cost accounting.
    nfe, steps = res.nfe, res.num_steps
    if method == "ode":
        # Dopri5 is FSAL: 6 new stages a step, 1 initial evaluation, 2 for the first step.
        assert np.array_equal(nfe, 6 * steps + 3)
        assert 5 < steps.mean() < 200
    elif method == "sde":
        assert np.all(steps == NUM_STEPS) and np.all(nfe == NUM_STEPS)
    elif method == "sde_heun":
        assert np.all(steps == NUM_STEPS // 2) and np.all(nfe == NUM_STEPS)
    else:
        assert np.all(nfe == 2 * NUM_STEPS)  # one predictor + one corrector evaluation
    assert np.array_equal(res.stats["num_steps"], steps)


@pytest.mark.parametrize("method", list(SAMPLER_SHORTHANDS))
def test_method_shorthands_give_the_objects_samples(mixture, method):
    flow = _flow(SDES["vp"], mixture)
    sampler = SAMPLER_SHORTHANDS[method]
    if not isinstance(sampler, sf.ProbabilityFlow):
        sampler = dataclasses.replace(sampler, num_steps=20)
        legacy = dict(num_steps=20)
    else:
        legacy = dict(rtol=1e-5)
    by_object = sf.sample(flow, (2,), key=jr.key(3), sampler=sampler)
    with pytest.warns(DeprecationWarning, match="sampler object"):
        by_keywords = sf.sample(flow, (2,), key=jr.key(3), method=method, **legacy)
    assert eqx.tree_equal(by_object, by_keywords)
    if method == "ode":
        assert eqx.tree_equal(sf.sample(flow, (2,), key=jr.key(3), method="ode"), by_object)
    with pytest.raises(ValueError, match="not both"):
        sf.sample(flow, (2,), key=jr.key(3), sampler=sampler, method=method)


def test_user_stepsize_controller_in_probability_flow(mixture):
    flow = _flow(SDES["vp"], mixture)
    loose = sf.ProbabilityFlow(stepsize_controller=dfx.PIDController(rtol=1e-2, atol=1e-2))
    a = sf.sample(flow, (2,), key=jr.key(0), sampler=loose)
    b = sf.sample(flow, (2,), key=jr.key(0))
    assert int(a.num_steps) < int(b.num_steps)
    np.testing.assert_allclose(a.x, b.x, atol=0.05)
    z = sf.encode(flow, b.x, stepsize_controller=dfx.PIDController(rtol=1e-2, atol=1e-2))
    z_tol = sf.encode(flow, b.x, rtol=1e-2, atol=1e-2)
    assert eqx.tree_equal(z, z_tol)


# ---- encode / decode ---------------------------------------------------------------


@pytest.mark.parametrize("sde_name", list(SDES))
def test_decode_inverts_encode(mixture, sde_name):
    sde = SDES[sde_name]
    flow = _flow(sde, mixture)
    x = jax.vmap(lambda k: mixture.sample(key=k))(jr.split(jr.key(4), 16))
    tol = dict(stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8))

    @jax.jit
    def roundtrip(x):
        enc = sf.encode(flow, x, **tol)
        dec = sf.decode(flow, enc.x, **tol)
        return enc, dec

    enc, dec = jax.vmap(roundtrip)(x)
    assert np.all(np.asarray(dfx.is_successful(enc.result)))
    assert np.all(np.asarray(dfx.is_successful(dec.result)))
    np.testing.assert_allclose(dec.x, x, atol=1e-5)
    # The latent is on the prior's scale, far from the data.
    assert float(jnp.max(jnp.abs(enc.x - x))) > 0.1
    assert float(jnp.std(enc.x)) > 0.3 * sde.prior_std()


# ---- Tweedie denoising -------------------------------------------------------------


@pytest.mark.parametrize("sde_name", list(SDES))
def test_tweedie_denoise_is_posterior_mean(sde_name):
    # One Gaussian component N(m, s^2): E[x0 | x_t] = m + s^2 alpha (x_t - alpha m) / v
    # with v = alpha^2 s^2 + sigma^2.
    sde = SDES[sde_name]
    m, s = jnp.array([0.4, -1.2, 2.0]), jnp.array([0.5, 1.5, 0.2])
    flow = _flow(sde, sf.GaussianMixture(jnp.ones(1), m[None], s[None]))
    x_t = jnp.array([1.0, -0.5, 3.0])

    @jax.jit
    def both(t):
        alpha, sigma = sde.marginal(t)
        expected = m + s**2 * alpha * (x_t - alpha * m) / (alpha**2 * s**2 + sigma**2)
        return sf.tweedie_denoise(flow, t, x_t), expected

    got, expected = both(0.3)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


# ---- inpainting --------------------------------------------------------------------


def _mixture_3d():
    # The first coordinate is observed; the components are far apart in it, so an
    # observation near a mode pins the component, while the unknown coordinates of the
    # two components differ (so ignoring the observation would be detected).
    return sf.GaussianMixture(
        jnp.array([0.4, 0.6]),
        jnp.array([[-8.0, 1.0, -0.5], [8.0, -0.5, 0.8]]),
        jnp.array([[0.6, 0.3, 0.4], [0.8, 0.4, 0.3]]),
    )


def _mixture_conditional(mix, x_known, mask):
    """Exact mean and variance of the unknown coordinates given the known ones: the
    posterior component weights times the (diagonal) component conditionals."""
    means, stds = np.asarray(mix.means), np.asarray(mix.stds)
    z = (np.asarray(x_known)[mask][None] - means[:, mask]) / stds[:, mask]
    comp = -0.5 * z**2 - np.log(stds[:, mask] * np.sqrt(2 * np.pi))
    logw = np.asarray(mix.log_weights) + comp.sum(-1)
    w = np.exp(logw - logw.max())
    w = w / w.sum()
    m, s = means[:, ~mask], stds[:, ~mask]
    mean = w @ m
    var = w @ (s**2 + m**2) - mean**2
    return w, mean, var


INPAINT_SAMPLERS = {
    "sde": sf.PredictorCorrector(
        predictor=sf.EulerMaruyamaPredictor(), corrector=None, num_steps=NUM_STEPS
    ),
    "pc": sf.PredictorCorrector(num_steps=NUM_STEPS),
}


@pytest.mark.parametrize("sde_name,method", [("vp", "sde"), ("ve", "pc")])
def test_inpaint_draws_conditional(sde_name, method):
    sde = SDES[sde_name]
    mix = _mixture_3d()
    flow = _flow(sde, mix)
    mask = np.array([True, False, False])
    x_known = jnp.array([6.5, 123.0, -77.0])  # unknown entries hold junk on purpose
    w, mean, var = _mixture_conditional(mix, x_known, mask)
    assert w[1] > 0.999  # the observation selects the second component

    draw = jax.jit(
        jax.vmap(lambda k: sf.inpaint(flow, x_known, mask, key=k, sampler=INPAINT_SAMPLERS[method]))
    )
    res = draw(jr.split(jr.key(5), N))
    x = np.asarray(res.x)
    assert np.all(x[:, 0] == 6.5)  # known entries are kept exactly
    y = x[:, 1:]
    mean_z = (y.mean(0) - mean) / np.sqrt(var / N)
    assert np.all(np.abs(mean_z) < 4), mean_z
    # Var of the sample variance of a Gaussian: 2 var^2 / (N - 1).
    var_z = (y.var(0, ddof=1) - var) / (var * np.sqrt(2 / (N - 1)))
    assert np.all(np.abs(var_z) < 4), var_z
    # Discriminating: the unconditional marginal of the unknowns is far away.
    marginal_mean = np.asarray(mix.mean())[1:]
    assert np.all(np.abs(y.mean(0) - marginal_mean) > 10 * np.sqrt(var / N))


def test_inpaint_everything_known_is_identity(mixture):
    flow = _flow(SDES["vp"], mixture)
    x_known = jnp.array([0.3, -0.7])
    sampler = sf.PredictorCorrector(num_steps=5)
    res = sf.inpaint(flow, x_known, jnp.ones(2, bool), key=jr.key(0), sampler=sampler)
    np.testing.assert_array_equal(res.x, x_known)
    with pytest.warns(DeprecationWarning):
        old = sf.inpaint(flow, x_known, jnp.ones(2, bool), key=jr.key(0), num_steps=5)
    assert eqx.tree_equal(res, old)
    with pytest.raises(TypeError, match="PredictorCorrector"):
        sf.inpaint(flow, x_known, jnp.ones(2, bool), key=jr.key(0), sampler=sf.ReverseSDE())


# ---- compilation, vmap and NFE accounting ------------------------------------------


class _Counter:
    # Hashable by identity, so it can be a static field.
    def __init__(self):
        self.traces = 0
        self.calls = 0


class _CountingNet(eqx.Module):
    # Exact score, plus two counters: Python-side traces and run-time calls.
    inner: sf.nets.GaussianMixtureScore
    counter: _Counter = eqx.field(static=True)

    def __call__(self, t, x):
        self.counter.traces += 1

        def bump(_):
            self.counter.calls += 1

        jax.debug.callback(bump, t)
        return self.inner(t, x)


def test_compiles_once_and_counts_nfe(mixture):
    counts = _Counter()
    sde = SDES["vp"]
    net = _CountingNet(sf.nets.GaussianMixtureScore(mixture, sde), counts)
    flow = sf.ScoreFlow(sde, net, parameterization="score")

    sampler = sf.ProbabilityFlow(stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-4))
    res = sf.sample(flow, (2,), key=jr.key(0), sampler=sampler)
    jax.block_until_ready(res)
    traces = counts.traces
    assert traces > 0
    # The NFE reported from the solver's step count equals the number of calls.
    assert counts.calls == int(res.nfe) == 6 * int(res.num_steps) + 3

    # New keys and new mixture parameters of the same shapes: no new trace.
    flow2 = eqx.tree_at(lambda f: f.net.inner.mixture.means, flow, mixture.means + 0.1)
    for k in range(2):
        jax.block_until_ready(sf.sample(flow2, (2,), key=jr.key(k + 1), sampler=sampler))
    assert counts.traces == traces

    # Under vmap, also compiled once per shape.
    batched = jax.vmap(lambda k: sf.sample(flow, (2,), key=k, sampler=sampler, throw=False))
    out = batched(jr.split(jr.key(7), 3))
    traces = counts.traces
    out = batched(jr.split(jr.key(8), 3))
    assert counts.traces == traces
    assert out.x.shape == (3, 2) and out.nfe.shape == (3,)


def test_shape_from_net_and_errors(mixture):
    sde = SDES["vp"]
    mlp_flow = sf.ScoreFlow(sde, sf.nets.MLP((2,), 8, 1, key=jr.key(0)))
    pc = sf.PredictorCorrector(num_steps=3, corrector=sf.LangevinCorrector(step_size="norms"))
    res = sf.sample(mlp_flow, key=jr.key(1), sampler=pc)
    assert res.x.shape == (2,) and bool(jnp.all(jnp.isfinite(res.x)))

    flow = _flow(sde, mixture)
    with pytest.raises(ValueError, match="data_shape"):
        sf.sample(flow, key=jr.key(0))
    with pytest.raises(ValueError, match="'ode', 'sde', 'pc'"):
        sf.sample(flow, (2,), key=jr.key(0), method="langevin")
    with pytest.raises(ValueError, match="predictor"), pytest.warns(DeprecationWarning):
        sf.sample(flow, (2,), key=jr.key(0), method="pc", predictor="ddim")
    with pytest.raises(TypeError, match="do not apply to method='sde'"):
        sf.sample(flow, (2,), key=jr.key(0), method="sde", snr=0.1)
    with pytest.raises(ValueError, match="'pc', 'sde'"):
        sf.inpaint(flow, jnp.zeros(2), jnp.ones(2), key=jr.key(0), method="ode")
    with pytest.raises(ValueError, match="num_steps"):
        sf.ReverseSDE(num_steps=0)
    with pytest.raises(ValueError, match="snr"):
        sf.LangevinCorrector(snr=-1.0)
    with pytest.raises(ValueError, match="step_size"):
        sf.LangevinCorrector(step_size="huge")
    with pytest.raises(TypeError, match="predictor"):
        sf.PredictorCorrector(predictor="reverse_diffusion")
    with pytest.raises(ValueError, match="rtol"):
        sf.ProbabilityFlow(stepsize_controller=dfx.PIDController(rtol=-1.0, atol=1e-5))
    with pytest.raises(Exception, match="NaN or inf"):
        jax.block_until_ready(sf.encode(flow, jnp.array([jnp.nan, 0.0])).x)
    res = sf.encode(flow, jnp.array([jnp.inf, 0.0]), throw=False)
    assert res.result == dfx.RESULTS.nonfinite_input and bool(jnp.all(jnp.isnan(res.x)))


# ---- plotting ----------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid_png_size(tmp_path, channels):
    import matplotlib.image as mpimg

    from scoreflow_eqx.plotting import save_image_grid, scatter_2d

    samples = np.random.default_rng(0).normal(size=(10, channels, 8, 6)) * 3
    path = tmp_path / "grid.png"
    save_image_grid(samples, path, nrow=4, padding=2, scale=2)
    img = mpimg.imread(path)
    rows = 3  # ceil(10 / 4)
    assert img.shape[:2] == (2 * (rows * (8 + 2) + 2), 2 * (4 * (6 + 2) + 2))
    # Clipping to data_range: every pixel is a valid intensity.
    assert img.min() >= 0 and img.max() <= 1
    with pytest.raises(ValueError, match="C in"):
        save_image_grid(np.zeros((2, 2, 4, 4)), path)

    scatter_2d(samples[:, 0, 0, :2], tmp_path / "scatter.png", reference=samples[:, 0, 1, :2])
    assert (tmp_path / "scatter.png").stat().st_size > 0
