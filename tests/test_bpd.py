"""Bits per dimension: the identities, and the dataset evaluator end to end against the
exact discrete likelihood of finely quantized Gaussian-mixture data."""

import math

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import gaussian_mixture_2d

import scoreflow_eqx as sf
from scoreflow_eqx._bpd import confidence_interval


def test_bits_per_dim_identities():
    nll = jnp.array([100.0, 3000.0])
    d = 3 * 32 * 32
    # 8-bit data in [-1, 1]: NLL / (D ln 2) + 7.
    np.testing.assert_allclose(sf.bits_per_dim(nll, dim=d), nll / (d * math.log(2)) + 7, rtol=1e-12)
    # 17 levels in [0, 1] (scikit-learn's digits): (NLL / D + log 17) / ln 2.
    np.testing.assert_allclose(
        sf.bits_per_dim(nll, dim=64, num_levels=17, data_range=(0.0, 1.0)),
        (nll / 64 + math.log(17)) / math.log(2),
        rtol=1e-12,
    )
    # Any affine scaling: x = a y + b shifts by -log2(a).
    np.testing.assert_allclose(
        sf.bits_per_dim(nll, dim=64, num_levels=17, data_range=(-3.0, 5.0)),
        (nll / 64 - math.log(8) + math.log(17)) / math.log(2),
        rtol=1e-12,
    )
    # Continuous data: the density in bits per dimension.
    np.testing.assert_allclose(
        sf.bits_per_dim(nll, dim=64, num_levels=None), nll / (64 * math.log(2))
    )
    # A uniform density on the K^D cells of [0, 1)^D is exactly log2(K) bits/dim.
    disc = sf.data.Discretization(num_levels=17, data_range=(0.0, 1.0))
    np.testing.assert_allclose(disc.bits_per_dim(0.0, dim=5), math.log2(17), rtol=1e-12)


def test_confidence_interval():
    import scipy.stats

    values = np.array([1.0, 2.0, 4.0, np.nan, 3.5])  # NaN (a failed solve) is excluded
    mean, half = confidence_interval(values)
    finite = values[np.isfinite(values)]
    lo, hi = scipy.stats.t.interval(0.95, 3, loc=finite.mean(), scale=scipy.stats.sem(finite))
    np.testing.assert_allclose([mean - half, mean + half], [lo, hi], rtol=1e-12)
    assert np.isnan(confidence_interval(np.array([1.0]))[1])


# Fine cells (any number of levels works), so that the dequantization noise within a
# cell is far below the tolerance of the per-example check.
DISC = sf.data.Discretization(num_levels=4096, data_range=(-3.0, 3.0))
EXACT_ODE = sf.ODELikelihood(divergence=sf.ExactTrace())


@pytest.fixture(scope="module")
def setting():
    mixture = gaussian_mixture_2d()
    sde = sf.VESDE()
    net = sf.nets.GaussianMixtureScore(mixture, sde)
    flow = sf.ScoreFlow(sde, net, parameterization="score")
    xs = jax.vmap(lambda k: mixture.sample(key=k))(jr.split(jr.key(0), 10))
    levels = np.asarray(DISC.quantize(xs)).astype(np.uint16)
    return mixture, flow, levels


def discrete_bpd(mixture, flow, levels):
    """The exact bits/dim of the quantized data under the exact model: the cells are
    small (width 6/4096), so P(k) = p(cell centre) * width^D to high accuracy."""
    centres = DISC.dequantize(jnp.asarray(levels, jnp.int32), 0.5)
    width = DISC.scale / DISC.num_levels
    p_eps = mixture.diffuse(flow.sde, flow.eps)
    log_p = jax.vmap(p_eps.log_prob)(centres) + levels.shape[1] * math.log(width)
    return -log_p / (levels.shape[1] * math.log(2))


def test_evaluate_bpd_ode_matches_exact_discrete_likelihood(setting):
    mixture, flow, levels = setting
    res = sf.evaluate_bpd(
        flow,
        levels,
        discretization=DISC,
        key=jr.key(1),
        batch_size=4,  # 10 examples: the last batch is padded
        num_repeats=2,
        show_progress=False,
        method=EXACT_ODE,
    )
    expected = discrete_bpd(mixture, flow, levels)
    # The prior mismatch of VE(sigma_max=50) and the in-cell variation are < 0.01 bits;
    # a wrong offset or scale would be off by bits.
    np.testing.assert_allclose(res.per_example, expected, atol=0.01)
    assert res.num_examples == 10 and res.num_repeats == 2 and res.method == "ode"
    assert res.num_failed == 0
    np.testing.assert_allclose(res.bpd, np.mean(res.per_example))
    import scipy.stats

    half = scipy.stats.t.ppf(0.975, 9) * np.std(res.per_example, ddof=1) / math.sqrt(10)
    np.testing.assert_allclose(res.ci95, half)
    assert 20 < res.nfe_mean <= res.nfe_max
    np.testing.assert_allclose(res.per_example, DISC.bits_per_dim(res.nll, dim=2), rtol=1e-12)

    # The randomness of an example depends on its index, not on the batch size.
    again = sf.evaluate_bpd(
        flow,
        levels[:4],
        discretization=DISC,
        key=jr.key(1),
        batch_size=4,
        num_repeats=2,
        show_progress=False,
        method=EXACT_ODE,
    )
    np.testing.assert_allclose(again.per_example, res.per_example[:4], rtol=1e-12)

    # The bound: an upper bound on the same quantity, equal to it within its error.
    bound = sf.evaluate_bpd(
        flow,
        levels,
        discretization=DISC,
        key=jr.key(2),
        method=sf.BoundLikelihood(num_t=4000),
        batch_size=4,
        show_progress=False,
    )
    assert bound.method == "bound" and bound.nfe_mean == 4000 + 16
    assert abs(bound.bpd - res.bpd) < 0.2

    # Vmapped per-example solves, each with its own steps.
    per_example = sf.evaluate_bpd(
        flow,
        levels,
        discretization=DISC,
        key=jr.key(1),
        batch_size=4,
        method=sf.ODELikelihood(divergence=sf.ExactTrace(), batched=False),
        show_progress=False,
    )
    np.testing.assert_allclose(per_example.per_example, expected, atol=0.01)


def test_evaluate_bpd_continuous_and_variational_hook(setting):
    mixture, flow, levels = setting
    xs = np.asarray(DISC.dequantize(jnp.asarray(levels, jnp.int32), 0.5))
    cont = sf.evaluate_bpd(
        flow,
        xs,
        discretization=sf.data.Discretization(num_levels=None),
        key=jr.key(1),
        batch_size=4,
        show_progress=False,
        method=EXACT_ODE,
    )
    p_eps = mixture.diffuse(flow.sde, flow.eps)
    expected = -jax.vmap(p_eps.log_prob)(jnp.asarray(xs)) / (2 * math.log(2))
    np.testing.assert_allclose(cont.per_example, expected, atol=0.01)

    # A dequantizer with its own log q: the cell centre with log q = 1 adds
    # 1 / (D ln 2).
    def centre(k, *, key):
        return DISC.dequantize(k, 0.5), jnp.ones(())

    var = sf.evaluate_bpd(
        flow,
        levels,
        discretization=DISC,
        key=jr.key(1),
        batch_size=4,
        dequantizer=centre,
        show_progress=False,
        method=EXACT_ODE,
    )
    offset = math.log2(DISC.num_levels / DISC.scale)
    np.testing.assert_allclose(
        var.per_example, cont.per_example + offset + 1 / (2 * math.log(2)), rtol=1e-9
    )


def test_evaluate_bpd_reports_failures(setting):
    _, flow, levels = setting
    with pytest.warns(RuntimeWarning, match="failed"):
        res = sf.evaluate_bpd(
            flow,
            levels[:4],
            discretization=DISC,
            key=jr.key(1),
            batch_size=4,
            show_progress=False,
            method=sf.ODELikelihood(divergence=sf.ExactTrace(), max_steps=2),
        )
    assert res.num_failed == 4
    assert np.all(np.isnan(res.per_example)) and math.isnan(res.bpd)


def test_evaluate_bpd_refuses_unsafe_input(setting):
    _, flow, levels = setting
    kwargs = dict(key=jr.key(0), show_progress=False)
    with pytest.raises(ValueError, match="integer levels"):
        sf.evaluate_bpd(flow, levels / 4095.0, discretization=DISC, **kwargs)
    with pytest.raises(ValueError, match="must be floating point"):
        sf.evaluate_bpd(
            flow,
            levels,
            discretization=sf.data.Discretization(num_levels=None),
            **kwargs,
        )
    with pytest.raises(ValueError, match=r"levels must lie in 0\.\.16"):
        sf.evaluate_bpd(
            flow,
            levels,
            discretization=sf.data.Discretization(num_levels=17, data_range=(0.0, 1.0)),
            **kwargs,
        )
    with pytest.raises(ValueError, match="shorthands"):
        sf.evaluate_bpd(flow, levels, discretization=DISC, method="elbo", **kwargs)
    with pytest.raises(ValueError, match="valid modes"), pytest.warns(DeprecationWarning):
        sf.evaluate_bpd(flow, levels, discretization=DISC, solve_mode="joint", **kwargs)
    with pytest.raises(ValueError, match="belong on the method object"):
        sf.evaluate_bpd(flow, levels, discretization=DISC, method=EXACT_ODE, num_t=3, **kwargs)
    other = sf.data.UniformDequantizer(sf.data.Discretization(num_levels=256))
    with pytest.raises(ValueError, match="differs from the data's"):
        sf.evaluate_bpd(flow, levels, discretization=DISC, dequantizer=other, **kwargs)
    with pytest.raises(ValueError, match="continuous"):
        sf.evaluate_bpd(
            flow,
            levels / 1.0,
            discretization=sf.data.Discretization(num_levels=None),
            dequantizer=other,
            **kwargs,
        )
    with pytest.raises(ValueError, match="batch_size"):
        sf.evaluate_bpd(flow, levels, discretization=DISC, batch_size=0, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        sf.evaluate_bpd(flow, levels[0], discretization=DISC, **kwargs)


def test_method_objects_and_deprecated_keywords_agree(setting):
    _, flow, levels = setting
    common = dict(discretization=DISC, key=jr.key(3), batch_size=5, show_progress=False)
    new = sf.evaluate_bpd(
        flow,
        levels,
        method=sf.ODELikelihood(
            divergence=sf.ExactTrace(),
            stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-4),
            batched=False,
        ),
        **common,
    )
    with pytest.warns(DeprecationWarning, match="sf.ODELikelihood"):
        old = sf.evaluate_bpd(
            flow,
            levels,
            divergence="exact",
            rtol=1e-4,
            atol=1e-4,
            solve_mode="per_example",
            **common,
        )
    np.testing.assert_array_equal(new.per_example, old.per_example)
    assert new.nfe_mean == old.nfe_mean
    by_name = sf.evaluate_bpd(flow, levels[:3], method="bound", **common)
    by_object = sf.evaluate_bpd(flow, levels[:3], method=sf.BoundLikelihood(), **common)
    np.testing.assert_array_equal(by_name.per_example, by_object.per_example)
