"""Dequantizers against closed forms.

First the densities themselves: the truncated normal against scipy, the variational flow
against quadrature (normalisation) and its own samples (inverse, KS test, moments), and
the offsets' range in float32. Then the dequantization bounds with the exact-score flow
of a Gaussian mixture, whose discrete model has exact cell probabilities
(`discrete_truth.py`): every estimate of `-log P(k)` is an upper bound within Monte Carlo
error, equal to its quadrature value, and tight where theory says so (uniform for a
smooth density on small cells; i-DODE's truncated normal for a density concentrated at
the cell centres, the setting of a model trained on undequantized data). Last, a briefly
trained variational dequantizer beats uniform dequantization on the bound, and bad input
is refused clearly.
"""

import math

import diffrax as dfx
import discrete_truth as dt
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from scipy import stats

import scoreflow_eqx as sf
from scoreflow_eqx.data._dequantizers import check_levels, clip_offsets, max_offset


# Cells of width 0.25 in [-1, 1].
DISC8 = sf.data.Discretization(num_levels=8, data_range=(-1.0, 1.0))


def offsets(x, k, disc):
    """The offsets `u` of model-space points `x` in the cells of levels `k`."""
    y = (np.asarray(x, np.float64) - disc.data_range[0]) / disc.scale
    return y * disc.num_levels - np.asarray(k, np.float64)


def sample(deq, k, n, seed):
    """`n` draws `(x, log_q)` of `deq` for one example of levels `k`."""
    k = jnp.asarray(k, jnp.int32)
    return jax.jit(jax.vmap(lambda key: deq(k, key=key)))(jr.split(jr.key(seed), n))


def perturbed(module, scale, seed):
    """`module` with Gaussian noise of std `scale` added to all its parameters (the
    variational flow starts as the identity; this makes it a generic flow)."""
    params, static = eqx.partition(module, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(jr.key(seed), len(leaves))
    leaves = [p + scale * jr.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def small_variational(shape, disc=DISC8, *, seed=0, noise=0.0, **kwargs):
    """A small variational dequantizer, its parameters perturbed by `noise`."""
    options = dict(num_layers=4, width_size=16, depth=1, context_size=4, num_bins=6)
    deq = sf.VariationalDequantizer(disc, shape, **{**options, **kwargs}, key=jr.key(seed))
    return perturbed(deq, noise, seed + 1) if noise else deq


@eqx.filter_jit
def log_probs(deq, u, k):
    """`deq.log_prob` at the rows of `u` for one example of levels `k`."""
    return jax.vmap(lambda uu: deq.log_prob(uu.reshape(k.shape), k))(u)


# ---------------------------------------------------------------- truncated normal


@pytest.mark.parametrize("std", [0.004, 0.05, 0.25, 2.0])
def test_truncated_normal_matches_scipy(std):
    deq = sf.data.TruncatedNormalDequantizer(DISC8, std=std)
    scale = std * 8 / 2
    assert deq.scale == pytest.approx(scale) and deq.truncation == pytest.approx(0.5 / scale)
    reference = dict(a=-0.5 / scale, b=0.5 / scale, loc=0.5, scale=scale)
    k = jnp.array([3])
    # The density against scipy's on a grid, and normalised by quadrature.
    u = dt.offset_grid(1, 20000)
    log_q = np.asarray(jax.vmap(lambda uu: deq.log_prob(uu, k))(jnp.asarray(u)))
    np.testing.assert_allclose(
        log_q, stats.truncnorm.logpdf(u[:, 0], **reference), rtol=1e-9, atol=1e-9
    )
    assert abs(np.mean(np.exp(log_q)) - 1) < 1e-6
    # Samples: in the cell, with the density at the sample, distributed as scipy's.
    x, log_q = sample(deq, k, 4000, seed=1)
    assert np.all(np.asarray(DISC8.quantize(x)) == 3)
    u = offsets(x, k, DISC8)[:, 0]
    assert np.all((u >= 0) & (u < 1))
    np.testing.assert_allclose(log_q, stats.truncnorm.logpdf(u, **reference), rtol=1e-9, atol=1e-9)
    assert stats.kstest(u, lambda v: stats.truncnorm.cdf(v, **reference)).pvalue > 1e-3


def test_truncated_normal_two_dimensional_normalisation():
    deq = sf.data.TruncatedNormalDequantizer(DISC8, std=0.03)
    k = jnp.array([2, 6])
    _, mass = dt.quadrature_bound(
        lambda x: jnp.zeros(()), lambda u: deq.log_prob(u, k), k, DISC8, n=400
    )
    assert abs(mass - 1) < 1e-5


@pytest.mark.parametrize("std", [1e-12, 1e-6, 1e3, 1e9])
def test_truncated_normal_extreme_parameters_in_float32(std):
    disc = sf.data.Discretization(num_levels=256, data_range=(-1.0, 1.0))
    deq = sf.data.TruncatedNormalDequantizer(disc, std=std)
    with jax.enable_x64(False):
        k = jnp.arange(256)
        xs, log_q = sample(deq, k, 64, seed=0)
        assert xs.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(log_q)))
        assert np.all(np.asarray(jax.jit(disc.quantize)(xs)) == np.asarray(k))
    u = offsets(xs, k, disc)
    assert np.all((u > -1e-3) & (u < 1 + 1e-3))  # float32 rounding of x only
    if std > 1:  # nearly uniform: log q ~ 0
        np.testing.assert_allclose(log_q, 0, atol=1e-3)


def test_truncated_normal_for_flow_is_idode_choice():
    sde = sf.VPSDE()
    flow = sf.ScoreFlow(
        sde, sf.nets.GaussianMixtureScore(dt_mixture(), sde), parameterization="score"
    )
    alpha, sigma = (float(v) for v in sde.marginal(flow.eps))
    cifar = sf.data.Discretization(num_levels=256, data_range=(-1.0, 1.0))
    deq = sf.data.TruncatedNormalDequantizer.for_flow(cifar, flow)
    assert deq.std == pytest.approx(sigma / alpha, rel=1e-12)
    # i-DODE truncates z ~ N(0, 1) at tau = alpha_0 / sigma_0 / 256 for 8-bit data in [-1, 1].
    assert deq.truncation == pytest.approx(alpha / sigma / 256, rel=1e-12)
    # The default std is this choice for the default VP SDE and eps.
    assert sf.data.TruncatedNormalDequantizer(cifar).std == pytest.approx(sigma / alpha, rel=1e-3)


def dt_mixture():
    return sf.GaussianMixture(
        jnp.array([0.4, 0.6]),
        jnp.array([[-0.6, 0.3], [0.5, -0.2]]),
        jnp.array([[0.25, 0.35], [0.3, 0.2]]),
    )


# ---------------------------------------------------------------- offsets in float32


@pytest.mark.parametrize("num_levels", [2, 8, 17, 256, 4096, 65536])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_offset_keeps_every_level_in_its_cell(num_levels, dtype):
    k = jnp.arange(num_levels).astype(dtype)
    u = jnp.full((num_levels,), max_offset(num_levels, dtype), dtype)
    assert u.dtype == dtype and bool(jnp.all(u < 1))
    assert bool(jnp.all(jnp.floor(k + u) == k))
    # sigmoid of a large logit rounds to 1 (the next cell) and is clipped.
    one = jax.nn.sigmoid(jnp.full((3,), 40.0, dtype))
    assert bool(jnp.all(one == 1)) and bool(jnp.all(clip_offsets(one, num_levels) < 1))


def test_max_offset_needs_more_than_nextafter_in_float32():
    # The largest float32 below 1 is not enough: k + u rounds to k + 1 for large k.
    k = jnp.arange(256).astype(jnp.float32)
    below_one = jnp.nextafter(jnp.float32(1), jnp.float32(0))
    assert not bool(jnp.all(jnp.floor(k + below_one) == k))
    for num_levels in (8, 17, 256):
        disc = sf.data.Discretization(num_levels, (-1.0, 1.0))
        levels = jnp.arange(num_levels, dtype=jnp.int32)
        u = jnp.full(levels.shape, max_offset(num_levels, np.float32), jnp.float32)
        assert bool(jnp.all(disc.quantize(disc.dequantize(levels, u)) == levels))


# ---------------------------------------------------------------- variational flow


@pytest.mark.parametrize("shape", [(3,), (1, 8, 8)])
def test_variational_starts_exactly_uniform(shape):
    disc = sf.data.Discretization(num_levels=17, data_range=(-1.0, 1.0))
    deq = small_variational(shape, disc)
    k = jr.randint(jr.key(1), shape, 0, 17)
    x, log_q = sample(deq, k, 200, seed=2)
    assert x.shape == (200, *shape) and log_q.shape == (200,)
    np.testing.assert_allclose(log_q, 0, atol=1e-12)
    assert np.all(np.asarray(jax.vmap(disc.quantize)(x)) == np.asarray(k))
    u = offsets(x, k, disc).reshape(-1)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    np.testing.assert_allclose(log_probs(deq, jnp.full((1, k.size), 0.3), k), 0, atol=1e-12)


def logit_grid(dim, n, limit=20.0):
    """Quadrature nodes `u = sigmoid(y)` and weights `sigmoid'(y) dy` of the midpoint
    rule on an `n^dim` grid of logits `y in [-limit, limit]^dim`: the flow acts on
    logits, where its density is resolved evenly, also near the cell's edges."""
    y = -limit + 2 * limit * (np.arange(n) + 0.5) / n
    u1 = 1 / (1 + np.exp(-y))
    w1 = u1 * (1 - u1) * 2 * limit / n
    u = np.stack(np.meshgrid(*([u1] * dim), indexing="ij"), -1).reshape(-1, dim)
    w = np.prod(np.stack(np.meshgrid(*([w1] * dim), indexing="ij"), -1).reshape(-1, dim), -1)
    return u, w


@pytest.mark.parametrize("shape", [(1,), (2,)])
def test_variational_is_normalised_and_consistent_with_its_samples(shape):
    deq = small_variational(shape, noise=0.15, seed=3)
    k = jnp.array([5, 1][: shape[0]])
    grid, weights = logit_grid(shape[0], 20000 if shape == (1,) else 600)
    q = np.exp(np.asarray(log_probs(deq, jnp.asarray(grid), k)))
    assert abs(np.sum(q * weights) - 1) < (1e-6 if shape == (1,) else 1e-4)
    x, log_q = sample(deq, k, 4000, seed=4)
    u = offsets(x, k, DISC8)
    assert np.all((u >= 0) & (u < 1))
    assert np.all(np.asarray(jax.vmap(DISC8.quantize)(x)) == np.asarray(k))
    # The density at each sample, through the inverse flow, is the sampler's log_q.
    np.testing.assert_allclose(log_probs(deq, jnp.asarray(u), k), log_q, atol=1e-8)
    assert float(jnp.std(log_q)) > 0.05  # a non-uniform density
    if shape == (1,):
        # KS test of the samples against the CDF of log_prob (cumulative quadrature).
        cdf = np.concatenate([[0.0], np.cumsum(q * weights)])
        edges = np.concatenate([[0.0], grid[:, 0] + 0.0])  # node i closes bin i
        assert stats.kstest(u[:, 0], lambda v: np.interp(v, edges, cdf)).pvalue > 1e-3
    else:
        # First and mixed moments of the samples against quadrature.
        for f in (lambda v: v[:, 0], lambda v: v[:, 1], lambda v: v[:, 0] * v[:, 1]):
            expected = np.sum(q * weights * f(grid))
            values = f(u)
            assert abs(values.mean() - expected) < 4 * values.std() / math.sqrt(len(values))


def test_variational_sample_is_reparameterised():
    deq = small_variational((2,), noise=0.15, seed=5)
    params, static = eqx.partition(deq, eqx.is_inexact_array)
    k = jnp.array([4, 2])

    @jax.jit
    def f(params):
        x, log_q = eqx.combine(params, static)(k, key=jr.key(6))
        return jnp.sum(x * jnp.array([1.0, -2.0])) + log_q

    grad = jax.jit(jax.grad(f))(params)
    direction = jax.tree.map(lambda p: jr.normal(jr.key(7), p.shape, p.dtype), params)
    h = 1e-5
    shifted = [jax.tree.map(lambda p, d: p + s * h * d, params, direction) for s in (1, -1)]
    finite_difference = (f(shifted[0]) - f(shifted[1])) / (2 * h)
    directional = sum(
        jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )
    assert abs(float(directional)) > 1e-2
    np.testing.assert_allclose(directional, finite_difference, rtol=1e-6)


def test_variational_offsets_stay_in_cells_in_float32():
    # Large parameters make a far-from-uniform flow; its logits keep logistic tails, so
    # in 40000 x 4 draws about 5 exceed logit(1 - spacing(256)) = 10.4 and are clipped.
    disc = sf.data.Discretization(num_levels=256, data_range=(-1.0, 1.0))
    deq = small_variational((4,), disc, noise=3.0, seed=8, dtype=jnp.float32)
    k = jnp.array([0, 17, 254, 255])
    x, log_q = sample(deq, k, 40000, seed=9)
    assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(log_q)))
    assert np.all(np.asarray(jax.vmap(disc.quantize)(x)) == np.asarray(k))
    u = offsets(x, k, disc)
    assert np.all((u > -1e-3) & (u < 1 + 1e-3))
    # The guard was exercised: some samples sit at the largest offset kept.
    upper = disc.dequantize(k, jnp.full(k.shape, max_offset(256, np.float32), jnp.float32))
    assert bool(jnp.any(x == upper[None]))


# ---------------------------------------------------------------- closed-form bounds


@eqx.filter_jit
def exact_ode_nll(flow, xs):
    solve = lambda x: sf.ode_nll(flow, x, divergence="exact", rtol=1e-6, atol=1e-6).nll
    return jax.vmap(solve)(xs)


@eqx.filter_jit
def draw(deq, levels, keys):
    return jax.vmap(lambda k, ks: jax.vmap(lambda key: deq(k, key=key))(ks))(levels, keys)


def estimates(flow, deq, levels, disc, *, n, seed):
    """ODE (exact trace) estimates of `-log P(k)` with `deq`: per level, the mean and
    standard error over `n` dequantizations of `NLL(x) + log q - D log(a / K)`."""
    levels = jnp.asarray(levels, jnp.int32)
    keys = jr.split(jr.key(seed), levels.shape[0] * n).reshape(levels.shape[0], n)
    xs, log_q = draw(deq, levels, keys)
    d = levels.shape[1]
    nll = exact_ode_nll(flow, xs.reshape(-1, d))
    values = np.asarray(nll).reshape(log_q.shape) + np.asarray(log_q)
    values = values - d * math.log(dt.cell_width(disc))
    return values.mean(axis=1), values.std(axis=1, ddof=1) / math.sqrt(n)


def exact_flow(mixture, sde, **kwargs):
    net = sf.nets.GaussianMixtureScore(mixture, sde)
    return sf.ScoreFlow(sde, net, parameterization="score", **kwargs)


def log_q_function(deq, level):
    k = jnp.asarray(level, jnp.int32)
    if isinstance(deq, sf.data.UniformDequantizer):
        return lambda u: jnp.zeros(())
    return lambda u: deq.log_prob(u, k)


def check_bounds(flow, deq, levels, disc, truth, *, n, seed):
    """Assert the estimates are upper bounds within Monte Carlo error and equal their
    quadrature value; return (estimates, quadrature values)."""
    mean, stderr = estimates(flow, deq, levels, disc, n=n, seed=seed)
    p_eps = flow.net.mixture.diffuse(flow.sde, flow.eps)
    quad = np.array(
        [
            dt.quadrature_bound(p_eps.log_prob, log_q_function(deq, k), k, disc, n=300)[0]
            for k in levels
        ]
    )
    # 2e-3 nats: the prior mismatch of VP at T (< 1e-3 here) and the solver tolerance.
    assert np.all(mean >= truth - 3 * stderr - 2e-3), (mean, stderr, truth)
    assert np.all(np.abs(mean - quad) <= 4 * stderr + 2e-3), (mean, stderr, quad)
    assert np.all(quad >= truth - 1e-6)
    return mean, quad


def test_smooth_mixture_uniform_is_tight_on_small_cells():
    mixture = dt_mixture()
    flow = exact_flow(mixture, sf.VPSDE())
    disc = sf.data.Discretization(num_levels=64, data_range=(-2.0, 2.0))  # width 1/16
    levels = np.asarray(disc.quantize(jnp.array([[-0.6, 0.3], [0.5, -0.2], [0.0, 0.5]])))
    truth = -dt.log_cell_probability(mixture.diffuse(flow.sde, flow.eps), levels, disc)
    width = dt.cell_width(disc)
    wide = sf.data.TruncatedNormalDequantizer(disc, std=width)
    for deq in (sf.data.UniformDequantizer(disc), wide):
        _, quad = check_bounds(flow, deq, levels, disc, truth, n=32, seed=1)
        assert np.all(quad - truth < 0.02)  # cells small relative to the mixture
    # i-DODE's truncated normal (std = sigma_eps / alpha_eps = 1e-3, 1/60 of a cell) is
    # valid but loose for a density that is nearly flat within a cell.
    narrow = sf.data.TruncatedNormalDequantizer.for_flow(disc, flow)
    _, quad = check_bounds(flow, narrow, levels, disc, truth, n=32, seed=2)
    assert np.all(quad - truth > 3)


def test_sharp_mixture_truncated_normal_is_tight():
    # i-DODE's setting: the data are the cell centres (std 1e-4), so the model's
    # density at eps is N(centre, sigma_eps^2) within each cell, and the truncated
    # normal with std = sigma_eps / alpha_eps is the posterior within the cell.
    cells = np.array([[2, 5], [4, 4], [5, 2], [3, 3]])
    centres = DISC8.dequantize(jnp.asarray(cells), 0.5)
    mixture = sf.GaussianMixture(jnp.array([0.1, 0.2, 0.3, 0.4]), centres, jnp.full((4,), 1e-4))
    flow = exact_flow(mixture, sf.VPSDE(), eps=1e-3)  # sigma_eps = 0.0105: 1/24 of a cell
    truth = -dt.log_cell_probability(mixture.diffuse(flow.sde, flow.eps), cells[:3], DISC8)
    tn = sf.data.TruncatedNormalDequantizer.for_flow(DISC8, flow)
    mean, quad = check_bounds(flow, tn, cells[:3], DISC8, truth, n=16, seed=3)
    assert np.all(np.abs(mean - truth) < 3e-3) and np.all(quad - truth < 1e-4)
    mean, _ = check_bounds(
        flow, sf.data.UniformDequantizer(DISC8), cells[:3], DISC8, truth, n=16, seed=4
    )
    assert np.all(mean - truth > 20)
    # Through evaluate_bpd, which adds log q per example.
    res = sf.evaluate_bpd(
        flow,
        cells[:3].astype(np.uint8),
        discretization=DISC8,
        key=jr.key(5),
        dequantizer=tn,
        method=sf.ODELikelihood(
            divergence=sf.ExactTrace(),
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
        ),
        show_progress=False,
    )
    # One dequantization per example and a batched solve: 5e-3 bits (a wrong log q or
    # offset would be off by bits).
    np.testing.assert_allclose(res.per_example, truth / (2 * math.log(2)), atol=5e-3)


# ---------------------------------------------------------------- variational training


def test_trained_variational_dequantizer_beats_uniform_on_the_bound():
    # Bumps of std 0.05 (a fifth of a cell) at four cell centres: uniform
    # dequantization loses ~0.3 nats per dimension, which q can learn back.
    cells = jnp.array([[2, 5], [4, 4], [5, 2], [3, 3]])
    log_w = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4]))
    mixture = sf.GaussianMixture(jnp.exp(log_w), DISC8.dequantize(cells, 0.5), jnp.full((4,), 0.05))
    flow = exact_flow(mixture, sf.VPSDE())
    deq = sf.VariationalDequantizer(
        DISC8, (2,), num_layers=2, width_size=32, depth=1, context_size=8, key=jr.key(0)
    )
    params, static = eqx.partition(deq, eqx.is_inexact_array)
    optimizer = optax.adam(1e-2)

    def batch_loss(params, key):
        ikey, lkey = jr.split(key)
        levels = cells[jr.categorical(ikey, log_w, shape=(64,))]
        loss = lambda k, key: sf.dequantization_loss(flow, eqx.combine(params, static), k, key=key)
        return jnp.mean(jax.vmap(loss)(levels, jr.split(lkey, 64)))

    @jax.jit
    def step(params, state, key):
        grads = jax.grad(batch_loss)(params, key)
        # optax's bias correction raises a float to an int32 count.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    for i in range(400):
        params, state = step(params, state, jr.fold_in(jr.key(1), i))
    trained = eqx.combine(params, static)

    # The objective on the same keys (common random numbers for the bound's times and
    # noise), per cell and sample.
    def objective(deq):
        keys = jr.split(jr.key(2), 4 * 64).reshape(4, 64)
        loss = lambda k, key: sf.dequantization_loss(flow, deq, k, key=key, num_t=16)
        return jax.jit(jax.vmap(lambda k, ks: jax.vmap(lambda key: loss(k, key))(ks)))(cells, keys)

    difference = np.asarray(objective(sf.data.UniformDequantizer(DISC8)) - objective(trained))
    stderr = difference.std(ddof=1) / math.sqrt(difference.size)
    assert difference.mean() > max(3 * stderr, 0.2), (difference.mean(), stderr)
    # Still a normalised density.
    grid, weights = logit_grid(2, 600)
    q = np.exp(np.asarray(log_probs(trained, jnp.asarray(grid), cells[1])))
    assert abs(np.sum(q * weights) - 1) < 1e-4


def test_dequantization_loss_is_bound_plus_log_q_with_the_flow_frozen():
    # The mixture's arrays are the flow's parameters here.
    flow = exact_flow(dt_mixture(), sf.VPSDE())
    deq = small_variational((2,), noise=0.15, seed=1, num_layers=2)
    k, key = jnp.array([3, 6]), jr.key(2)
    dkey, bkey = jr.split(key)

    def bound(flow, deq):
        x, log_q = deq(k, key=dkey)
        return sf.nll_bound(flow, x, key=bkey, num_t=3, num_eps_samples=2).nll + log_q

    def loss(flow, deq):
        return sf.dequantization_loss(flow, deq, k, key=key, num_t=3, num_eps_samples=2)

    @eqx.filter_jit
    def values_and_grads(fd):
        (l, g), (b, u) = (eqx.filter_value_and_grad(lambda fd: f(*fd))(fd) for f in (loss, bound))
        return l, b, g, u

    value, expected, grads, unfrozen = values_and_grads((flow, deq))
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads[0]))
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(unfrozen[0]))
    np.testing.assert_allclose(
        jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads[1])]),
        jnp.concatenate([g.ravel() for g in jax.tree.leaves(unfrozen[1])]),
        rtol=1e-10,
        atol=1e-12,
    )


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused_clearly():
    continuous = sf.data.Discretization(num_levels=None)
    for make in (
        lambda: sf.data.UniformDequantizer(continuous),
        lambda: sf.data.TruncatedNormalDequantizer(continuous),
        lambda: sf.VariationalDequantizer(continuous, (2,), key=jr.key(0)),
    ):
        with pytest.raises(ValueError, match="num_levels=None"):
            make()
    with pytest.raises(TypeError, match="Discretization"):
        sf.data.TruncatedNormalDequantizer((8, (-1.0, 1.0)))  # pyright: ignore
    for std in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="`std` must be a positive"):
            sf.data.TruncatedNormalDequantizer(DISC8, std=std)
    with pytest.raises(ValueError, match="`num_bins` must be an integer >= 2"):
        sf.VariationalDequantizer(DISC8, (2,), num_bins=1, key=jr.key(0))
    with pytest.raises(ValueError, match="`data_shape`"):
        sf.VariationalDequantizer(DISC8, (0, 3), key=jr.key(0))

    deq = small_variational((2,))
    tn = sf.data.TruncatedNormalDequantizer(DISC8)
    with pytest.raises(ValueError, match=r"shape \(2,\), got levels of shape \(3,\)"):
        deq(jnp.array([1, 2, 3]), key=jr.key(0))
    with pytest.raises(ValueError, match=r"`u` must have shape \(2,\)"):
        deq.log_prob(jnp.full((3,), 0.5), jnp.array([1, 2]))
    with pytest.raises(ValueError, match="same shape"):
        tn.log_prob(jnp.full((3,), 0.5), jnp.array([1, 2]))
    # Float levels: the package's error (under this test suite's jaxtyping hook the
    # annotation `Integer[Array, ...]` refuses them first, with a TypeError).
    with pytest.raises(ValueError, match="integer levels 0..7"):
        check_levels(jnp.array([1.0, 2.0]), DISC8, "TruncatedNormalDequantizer")
    for d in (deq, tn, sf.data.UniformDequantizer(DISC8)):
        with pytest.raises((ValueError, TypeError), match=r"integer levels 0..7|Integer\["):
            d(jnp.array([1.0, 2.0]), key=jr.key(0))
        with pytest.raises(Exception, match=r"levels must lie in 0..7"):
            jax.jit(lambda k: d(k, key=jr.key(0)))(jnp.array([1, 8]))
    with pytest.raises(TypeError, match="AbstractDequantizer"):
        sf.dequantization_loss(
            exact_flow(dt_mixture(), sf.VPSDE()),
            lambda k, key: (k, 0.0),  # pyright: ignore
            jnp.array([1, 2]),
            key=jr.key(0),
        )
