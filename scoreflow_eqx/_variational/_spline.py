"""Monotone rational-quadratic splines on `[-bound, bound]` with identity tails, applied
elementwise (Durkan et al. 2019, after Gregory and Delbourgo 1982)."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


#: Smallest bin width and height (as fractions of `2 bound`) and smallest derivative.
MIN_BIN = 1e-3
MIN_DERIVATIVE = 1e-3


def num_spline_params(num_bins: int) -> int:
    """Raw parameters per dimension: `num_bins` widths and heights, `num_bins - 1`
    interior derivatives (the two end derivatives are 1, matching the identity tails)."""
    return 3 * num_bins - 1


def _knots(raw: Float[Array, "*b n"], bound: float) -> Float[Array, "*b n+1"]:
    # Positions of the n + 1 knots from n unnormalised bin sizes: softmax with a floor,
    # cumulated; the ends are set exactly to -bound and bound.
    n = raw.shape[-1]
    sizes = MIN_BIN + (1 - MIN_BIN * n) * jax.nn.softmax(raw, axis=-1)
    inner = -bound + 2 * bound * jnp.cumsum(sizes[..., :-1], axis=-1)
    ends = jnp.ones((*raw.shape[:-1], 1), raw.dtype) * bound
    return jnp.concatenate([-ends, inner, ends], axis=-1)


def spline_knots(raw: Float[Array, "*b p"], bound: float):
    """`(xs, ys, ds)`: knot positions in and out, and the derivatives at the knots, from
    `num_spline_params(num_bins)` raw values per dimension. Zero raw values give the
    identity (equal bins, unit derivatives)."""
    p = raw.shape[-1]
    n = (p + 1) // 3
    if num_spline_params(n) != p:
        raise ValueError(f"Expected 3 * num_bins - 1 raw spline parameters, got {p}.")
    xs = _knots(raw[..., :n], bound)
    ys = _knots(raw[..., n : 2 * n], bound)
    # softplus(0) = log 2, so that zero raw values give derivative 1.
    inner = MIN_DERIVATIVE + (1 - MIN_DERIVATIVE) * jax.nn.softplus(raw[..., 2 * n :]) / math.log(2)
    ones = jnp.ones((*raw.shape[:-1], 1), raw.dtype)
    ds = jnp.concatenate([ones, inner, ones], axis=-1)
    return xs, ys, ds


def _gather(knots, index):
    return jnp.take_along_axis(knots, index[..., None], axis=-1)[..., 0]


def _bin(knots, value):
    # The bin of `value` among knots[..., 0] < ... < knots[..., n] (clamped to 0..n-1).
    n = knots.shape[-1] - 1
    index = jnp.sum(value[..., None] >= knots[..., 1:-1], axis=-1)
    return jnp.clip(index, 0, n - 1)


def _bin_geometry(xs, ys, ds, index):
    x0, x1 = _gather(xs, index), _gather(xs, index + 1)
    y0, y1 = _gather(ys, index), _gather(ys, index + 1)
    d0, d1 = _gather(ds, index), _gather(ds, index + 1)
    return x0, x1 - x0, y0, y1 - y0, d0, d1


def rq_spline(
    x: Float[Array, "*b"], raw: Float[Array, "*b p"], bound: float
) -> tuple[Float[Array, "*b"], Float[Array, "*b"]]:
    """The spline and `log dy/dx` at `x` (identity, log-derivative 0, outside the
    interval)."""
    xs, ys, ds = spline_knots(raw, bound)
    inside = jnp.abs(x) < bound
    xc = jnp.clip(x, -bound, bound)  # keeps the unused branch finite (and its gradient)
    x0, w, y0, h, d0, d1 = _bin_geometry(xs, ys, ds, _bin(xs, xc))
    s = h / w
    xi = (xc - x0) / w
    c = xi * (1 - xi)
    denominator = s + (d0 + d1 - 2 * s) * c
    y = y0 + h * (s * xi**2 + d0 * c) / denominator
    numerator = s**2 * (d1 * xi**2 + 2 * s * c + d0 * (1 - xi) ** 2)
    log_derivative = jnp.log(numerator) - 2 * jnp.log(denominator)
    return jnp.where(inside, y, x), jnp.where(inside, log_derivative, 0)


def rq_spline_inverse(
    y: Float[Array, "*b"], raw: Float[Array, "*b p"], bound: float
) -> tuple[Float[Array, "*b"], Float[Array, "*b"]]:
    """The inverse spline at `y` and `log dy/dx` of the forward spline at the result
    (the root of a quadratic in each bin)."""
    xs, ys, ds = spline_knots(raw, bound)
    inside = jnp.abs(y) < bound
    yc = jnp.clip(y, -bound, bound)
    x0, w, y0, h, d0, d1 = _bin_geometry(xs, ys, ds, _bin(ys, yc))
    s = h / w
    dy = yc - y0
    t = d0 + d1 - 2 * s
    a = h * (s - d0) + dy * t
    b = h * d0 - dy * t
    c = -s * dy
    discriminant = jnp.maximum(b**2 - 4 * a * c, 0)
    xi = jnp.clip(2 * c / (-b - jnp.sqrt(discriminant)), 0, 1)
    x = x0 + xi * w
    cc = xi * (1 - xi)
    denominator = s + t * cc
    numerator = s**2 * (d1 * xi**2 + 2 * s * cc + d0 * (1 - xi) ** 2)
    log_derivative = jnp.log(numerator) - 2 * jnp.log(denominator)
    return jnp.where(inside, x, y), jnp.where(inside, log_derivative, 0)
