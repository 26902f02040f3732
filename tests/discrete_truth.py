"""Closed-form ground truth for discrete data: the probability of each cell of a grid
under a diagonal Gaussian mixture, and the exact value of a dequantization bound by
quadrature over the offsets.

With the exact-score flow `ScoreFlow(sde, GaussianMixtureScore(mixture, sde),
parameterization="score")` the probability-flow ODE has the density
`p_eps = mixture.diffuse(sde, flow.eps)` (up to the prior mismatch at `T`), so the
discrete model is `P(k) = int_cell(k) p_eps(x) dx`, a product of normal-CDF differences
per component: `mixture` lives in model space (`x = a (k + u) / K + b`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

import scoreflow_eqx as sf


def log_ndtr_difference(a, b):
    """`log(Phi(b) - Phi(a))` for `a < b`, accurate in both tails (the upper tail is
    reflected into the lower one)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    upper = a > 0
    lo = np.where(upper, -b, a)
    hi = np.where(upper, -a, b)
    log_hi, log_lo = special.log_ndtr(hi), special.log_ndtr(lo)
    with np.errstate(divide="ignore"):
        return log_hi + np.log1p(-np.exp(log_lo - log_hi))


def cell_width(discretization: sf.data.Discretization) -> float:
    """The model-space width `a / K` of a cell."""
    assert discretization.num_levels is not None
    return discretization.scale / discretization.num_levels


def cell_edges(levels, discretization: sf.data.Discretization):
    """Model-space lower and upper edges of the cells of `levels` (float64)."""
    k = np.asarray(levels, np.float64)
    width = cell_width(discretization)
    low = discretization.data_range[0] + width * k
    return low, low + width


def log_cell_probability(mixture: sf.GaussianMixture, levels, discretization):
    """Exact `log P(k) = log sum_m w_m prod_d [Phi((hi_d - mu_md) / s_md) - Phi((lo_d -
    mu_md) / s_md)]` for `levels` of shape `(n, *data)`; returns shape `(n,)`."""
    low, high = cell_edges(levels, discretization)
    means = np.asarray(mixture.means, np.float64)[None]
    stds = np.asarray(mixture.stds, np.float64)[None]
    per_dim = log_ndtr_difference((low[:, None] - means) / stds, (high[:, None] - means) / stds)
    per_component = per_dim.reshape(*per_dim.shape[:2], -1).sum(axis=-1)
    log_w = np.asarray(mixture.log_weights, np.float64)
    return np.asarray(special.logsumexp(log_w + per_component, axis=1))


def offset_grid(dim: int, n: int) -> np.ndarray:
    """Midpoints of an `n^dim` grid on `[0, 1)^dim`, shape `(n^dim, dim)`."""
    g = (np.arange(n) + 0.5) / n
    return np.stack(np.meshgrid(*([g] * dim), indexing="ij"), axis=-1).reshape(-1, dim)


def quadrature_bound(log_p, log_q, level, discretization, *, n: int):
    """The exact value (midpoint rule on an `n^D` grid, `D = 1, 2`) of the dequantization
    bound that the Monte Carlo estimates target, for ONE example of `level` (shape
    `(D,)`):

    `E_{u ~ q}[-log p(x(u)) + log q(u)] - D log(a / K)` with `x(u) = a (k + u) / K + b`,

    and the normalisation `int q du` (which should be 1). `log_p(x)` and `log_q(u)` take
    one point each.
    """
    level = np.asarray(level)
    d = level.shape[0]
    u = jnp.asarray(offset_grid(d, n))
    k = jnp.asarray(level, jnp.int32)

    @jax.jit
    def evaluate(u):
        xs = jax.vmap(lambda uu: discretization.dequantize(k, uu))(u)
        return jax.vmap(log_p)(xs), jax.vmap(log_q)(u)

    lp, lq = (np.asarray(v) for v in evaluate(u))
    q = np.exp(lq)
    mass = q.mean()
    terms = np.where(q > 0, q * (lq - lp), 0.0)
    expectation = np.sum(terms) / np.sum(q)
    offset = d * math.log(cell_width(discretization))
    return float(expectation - offset), float(mass)
