"""Importance-weighted dequantization and `train_dequantizer` against closed forms.

The data are grid cells of a 2-D Gaussian mixture with bumps at four cell centres; with
the exact-score flow the discrete model's cell probabilities are exact (normal CDFs,
`discrete_truth.py`). The importance-weighted bound with the exact trace is an upper
bound that decreases with K towards the exact discrete NLL; with Hutchinson's estimator
or the Monte Carlo bound its bias is measured (the reason evaluate_bpd refuses them
unless `allow_biased=True`). Then a variational dequantizer trained by
`train_dequantizer` beats uniform dequantization, resumes exactly, and bad input is
refused before any solve.
"""

import math

import diffrax as dfx
import discrete_truth as dt
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import scoreflow_eqx as sf


DISC8 = sf.data.Discretization(num_levels=8, data_range=(-1.0, 1.0))  # cells of width 1/4
CELLS = np.array([[2, 5], [4, 4], [5, 2], [3, 3]])
WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])
REPEATS = 32  # evaluations of every cell


def bumps(std):
    centres = DISC8.dequantize(jnp.asarray(CELLS), 0.5)
    return sf.GaussianMixture(jnp.asarray(WEIGHTS), centres, jnp.full((4,), std))


def exact_flow(mixture):
    sde = sf.VPSDE()
    return sf.ScoreFlow(sde, sf.nets.GaussianMixtureScore(mixture, sde), parameterization="score")


FLOW = exact_flow(bumps(0.05))
TRUTH = -dt.log_cell_probability(FLOW.net.mixture.diffuse(FLOW.sde, FLOW.eps), CELLS, DISC8)
LEVELS = np.repeat(CELLS, REPEATS, axis=0).astype(np.uint8)
CONTROLLER = dfx.PIDController(rtol=1e-6, atol=1e-6)
EXACT = sf.ODELikelihood(divergence=sf.ExactTrace(), stepsize_controller=CONTROLLER)
BOUND = sf.BoundLikelihood(num_t=20, num_eps_samples=4)


def gaps(method, k, *, key=0, dequantizer=None, allow_biased=False):
    """`estimate - (-log P(k))` in nats, shape (cells, repeats), and the result."""
    res = sf.evaluate_bpd(
        FLOW,
        LEVELS,
        discretization=DISC8,
        key=jr.key(key),
        method=method,
        dequantizer=dequantizer,
        num_importance_samples=k,
        allow_biased=allow_biased,
        batch_size=32 // k,  # 32 solves per compiled call for every k: one compilation
        show_progress=False,
    )
    values = np.asarray(res.nll) - 2 * math.log(dt.cell_width(DISC8))
    return values.reshape(len(CELLS), REPEATS) - TRUTH[:, None], res


def mean_and_stderr(values, axis=None):
    n = values.size if axis is None else values.shape[axis]
    return values.mean(axis=axis), values.std(axis=axis, ddof=1) / math.sqrt(n)


def test_importance_weighted_bound_decreases_with_k_to_the_exact_nll():
    results = {k: gaps(EXACT, k) for k in (1, 4, 16)}
    means = {}
    for k, (gap, res) in results.items():
        per_cell, per_cell_se = mean_and_stderr(gap, axis=1)
        # Upper bounds within Monte Carlo error (2e-3: prior mismatch and tolerance).
        assert np.all(per_cell >= -3.5 * per_cell_se - 2e-3), (k, per_cell, per_cell_se)
        means[k] = mean_and_stderr(gap)
        assert res.num_importance_samples == k and res.num_failed == 0
    print({k: (round(float(m), 4), round(float(s), 4)) for k, (m, s) in means.items()})
    (g1, s1), (g4, s4), (g16, s16) = means[1], means[4], means[16]
    # Uniform dequantization of these bumps (std 1/5 of a cell) is loose; K = 16 closes
    # almost all of the gap.
    assert g1 > 0.4 and g1 - g4 > 3 * math.hypot(s1, s4)
    assert g16 < g4 + 2 * math.hypot(s4, s16) and g16 < 0.1 * g1
    assert abs(g16) < 3 * s16 + 0.02
    # NFE: K solves per example.
    assert results[16][1].nfe_mean > 10 * results[1][1].nfe_mean


def test_one_importance_sample_is_the_plain_estimate_exactly():
    kwargs = dict(discretization=DISC8, key=jr.key(3), method=BOUND, show_progress=False)
    plain = sf.evaluate_bpd(FLOW, LEVELS, batch_size=32, **kwargs)
    one = sf.evaluate_bpd(FLOW, LEVELS, batch_size=32, num_importance_samples=1, **kwargs)
    np.testing.assert_array_equal(plain.per_example, one.per_example)


def test_bias_of_importance_weighting_noisy_estimates():
    # The same keys draw the same offsets u for every method, so `hutchinson - exact` is
    # the effect of the probes alone.
    hutchinson = sf.ODELikelihood(divergence=sf.Hutchinson(), stepsize_controller=CONTROLLER)
    with pytest.raises(ValueError, match="biased low"):
        gaps(hutchinson, 16)
    diffs = {}
    for k in (1, 16):
        exact, _ = gaps(EXACT, k, key=5)
        noisy, _ = gaps(hutchinson, k, key=5, allow_biased=True)
        diffs[k] = noisy - exact
    bias1, se1 = mean_and_stderr(diffs[1])
    bias16, se16 = mean_and_stderr(diffs[16])
    s2 = float(np.var(diffs[1], ddof=1))  # the variance of the probes' error
    print(
        f"Hutchinson: s^2 {s2:.3f}, bias K=1 {bias1:.3f}+-{se1:.3f}, K=16 {bias16:.3f}+-{se16:.3f}"
    )
    assert abs(bias1) < 3 * se1  # unbiased for K = 1
    assert bias16 < -3 * se16  # biased low for K > 1, by at most about s^2 / 2
    assert -0.75 * s2 < bias16 < 0
    # The Theorem 3 bound with 20 times: its Monte Carlo error is large and the
    # importance-weighted value falls far below the exact discrete NLL.
    gap1, _ = gaps(BOUND, 1, key=6)
    gap16, _ = gaps(BOUND, 16, key=6, allow_biased=True)
    (m1, e1), (m16, e16) = mean_and_stderr(gap1), mean_and_stderr(gap16)
    print(f"bound num_t=20: gap K=1 {m1:.3f}+-{e1:.3f}, K=16 {m16:.3f}+-{e16:.3f}")
    assert m1 > -3 * e1 and m16 < -1.0


# ---------------------------------------------------------------- train_dequantizer


def toy_levels(n=256, seed=3):
    index = jr.categorical(jr.key(seed), jnp.log(jnp.asarray(WEIGHTS)), shape=(n,))
    return CELLS[np.asarray(index)].astype(np.uint8)


def small_dequantizer(seed=0):
    return sf.VariationalDequantizer(
        DISC8, (2,), num_layers=2, width_size=32, depth=1, context_size=8, key=jr.key(seed)
    )


# One compiled step shared by the tests (same optimizer, batch and data shapes).
TRAIN = dict(batch_size=64, lr=1e-2, warmup_steps=0, show_progress=False)


def test_trained_dequantizer_lowers_the_bound_below_uniform():
    data = toy_levels()
    result = sf.train_dequantizer(
        FLOW, small_dequantizer(), data, key=jr.key(1), steps=200, **TRAIN
    )
    assert result.step == 200 and result.losses.shape == (200,) and result.nonfinite_total == 0
    kwargs = dict(discretization=DISC8, key=jr.key(2), method=BOUND, show_progress=False)
    uniform = sf.evaluate_bpd(FLOW, data[:128], batch_size=32, **kwargs)
    trained = sf.evaluate_bpd(
        FLOW, data[:128], batch_size=32, dequantizer=result.dequantizer, **kwargs
    )
    difference = uniform.per_example - trained.per_example  # same times and noise
    gain, stderr = mean_and_stderr(difference)
    print(f"uniform {uniform.bpd:.3f}, trained {trained.bpd:.3f} bits/dim, gain {gain:.3f}")
    assert gain > max(4 * stderr, 0.1)
    # Still an upper bound on the exact discrete NLL, within Monte Carlo error.
    index = [int(np.flatnonzero((CELLS == k).all(axis=1))[0]) for k in data[:128]]
    excess, excess_se = mean_and_stderr(trained.per_example - TRUTH[index] / (2 * math.log(2)))
    print(f"trained - exact: {excess:.3f} +- {excess_se:.3f} bits/dim")
    assert excess > -3 * excess_se


def test_train_dequantizer_resumes_exactly(tmp_path):
    flow, data = FLOW, toy_levels()
    kwargs = dict(key=jr.key(1), checkpoint_every=2, **TRAIN)
    full = sf.train_dequantizer(flow, small_dequantizer(), data, steps=4, **kwargs,
                                workdir=tmp_path / "full")  # fmt: skip
    first = sf.train_dequantizer(flow, small_dequantizer(), data, steps=2, **kwargs,
                                 workdir=tmp_path / "part")  # fmt: skip
    rest = sf.train_dequantizer(flow, small_dequantizer(), data, steps=4, **kwargs,
                                workdir=tmp_path / "part")  # fmt: skip
    assert rest.step == 4 and rest.losses.shape == (2,)
    np.testing.assert_array_equal(np.concatenate([first.losses, rest.losses]), full.losses)
    assert bool(eqx.tree_equal(full.dequantizer, rest.dequantizer))
    loaded, info = sf.load_dequantizer(tmp_path / "part")
    assert info["step"] == 4 and bool(eqx.tree_equal(loaded, rest.dequantizer))
    # Another run in the same directory is refused, naming what differs.
    with pytest.raises(ValueError, match="another dequantizer run"):
        sf.train_dequantizer(flow, small_dequantizer(), data, steps=6,
                             **{**kwargs, "lr": 1e-3}, workdir=tmp_path / "part")  # fmt: skip


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_any_solve():
    levels = CELLS.astype(np.uint8)
    continuous = sf.data.Discretization(num_levels=None)
    uniform = sf.data.UniformDequantizer(DISC8)
    kwargs = dict(key=jr.key(0), show_progress=False)
    with pytest.raises(ValueError, match=r"`dequantizer` \(UniformDequantizer\) needs discrete"):
        sf.evaluate_bpd(FLOW, levels.astype(float), discretization=continuous,
                        dequantizer=uniform, **kwargs)  # fmt: skip
    for k in (0, -1, True):
        with pytest.raises(
            ValueError, match=rf"`num_importance_samples` must be a positive .* {k}"
        ):
            sf.evaluate_bpd(FLOW, levels, discretization=DISC8, num_importance_samples=k, **kwargs)
    with pytest.raises(ValueError, match="`num_importance_samples`=4 weights dequantizations"):
        sf.evaluate_bpd(FLOW, levels.astype(float), discretization=continuous,
                        num_importance_samples=4, **kwargs)  # fmt: skip
    other = sf.data.Discretization(num_levels=16, data_range=(-1.0, 1.0))
    with pytest.raises(ValueError, match="`dequantizer` was built for .*num_levels=16"):
        sf.evaluate_bpd(FLOW, levels, discretization=DISC8,
                        dequantizer=sf.data.UniformDequantizer(other), **kwargs)  # fmt: skip
    with pytest.raises(ValueError, match="must hold the integer levels 0..7"):
        sf.evaluate_bpd(FLOW, levels + 0.5, discretization=DISC8, **kwargs)
    with pytest.raises(ValueError, match=r"levels must lie in 0..7"):
        sf.evaluate_bpd(FLOW, levels + 5, discretization=DISC8, **kwargs)
    with pytest.raises(ValueError, match="`num_importance_samples`=4 with BoundLikelihood"):
        sf.evaluate_bpd(FLOW, levels, discretization=DISC8, method=sf.BoundLikelihood(),
                        num_importance_samples=4, **kwargs)  # fmt: skip

    deq, steps = small_dequantizer(), dict(key=jr.key(0), steps=2, show_progress=False)
    with pytest.raises(ValueError, match="integer levels 0..7"):
        sf.train_dequantizer(FLOW, deq, levels.astype(np.float32), **steps)
    with pytest.raises(ValueError, match="`dequantizer` was built for"):
        dataset = sf.data.from_arrays(levels, levels, num_levels=16, data_range=(-1.0, 1.0))
        sf.train_dequantizer(FLOW, deq, dataset, **steps)
    with pytest.raises(ValueError, match=r"built for examples of shape \(2,\)"):
        sf.train_dequantizer(FLOW, deq, np.zeros((64, 3), np.uint8), **steps)
    with pytest.raises(ValueError, match=r"`batch_size` \(64\) must not exceed"):
        sf.train_dequantizer(FLOW, deq, levels, **steps)
    with pytest.raises(ValueError, match="no parameters to train"):
        sf.train_dequantizer(FLOW, uniform, levels, batch_size=2, **steps)
    with pytest.raises(TypeError, match="AbstractDequantizer"):
        sf.train_dequantizer(FLOW, "uniform", levels, **steps)  # pyright: ignore
