"""How discrete data map to model space, and the bits/dim that follow from it."""

import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Integer


def bits_per_dim(
    nll: ArrayLike,
    *,
    dim: int,
    num_levels: int | None = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Array:
    """Bits per dimension of discrete data from a continuous NLL in model space.

    Data with `K = num_levels` levels `k in {0..K-1}` are dequantized to `y = (k + u) / K` in
    `[0, 1)^D` and mapped to model space by `x = a y + b` with
    `(b, a + b) = data_range`. The discrete NLL (in bits per dimension) is then
    `(NLL_x / D - log a + log K) / log 2`. For 8-bit data in `[-1, 1]` that is
    `NLL_x / (D log 2) + 7`. With `num_levels=None` (continuous data) it is
    `NLL_x / (D log 2)`, the continuous density in bits per dimension.

    **Arguments:**

    - `nll`: negative log-likelihood in nats of the model-space data (any shape).
    - `dim`: the number of dimensions `D` of one example.
    - `num_levels`: `K`, or `None` for continuous data.
    - `data_range`: `(low, high)`, the model-space images of `y = 0` and `y = 1`.
    """
    if dim < 1:
        raise ValueError(f"`dim` must be a positive integer, got {dim!r}.")
    nll = jnp.asarray(nll)
    if num_levels is None:
        return nll / (dim * math.log(2))
    if num_levels < 2:
        raise ValueError(f"`num_levels` must be >= 2 or None, got {num_levels!r}.")
    low, high = data_range
    a = high - low
    if not a > 0:
        raise ValueError(f"`data_range` must be (low, high) with low < high, got {data_range!r}.")
    return (nll / dim - math.log(a) + math.log(num_levels)) / math.log(2)


def _as_levels(k):
    if isinstance(k, np.integer):
        return int(k)
    return k


def _as_range(r) -> Any:
    if isinstance(r, list | tuple | np.ndarray) and len(r) == 2:
        try:
            return tuple(float(v) for v in r)
        except (TypeError, ValueError):
            pass
    return r


class Discretization(eqx.Module):
    """The description of a dataset's values that likelihood evaluation needs.

    **Arguments:**

    - `num_levels`: the number of discrete levels `K` (256 for 8-bit images, 17 for
        scikit-learn's digits), or `None` for continuous data (no dequantization).
    - `data_range`: `(low, high)`: model-space values of `y = 0` and `y = 1`, where
        `y = (k + u) / K`.
    """

    num_levels: int | None = eqx.field(static=True, default=256, converter=_as_levels)
    data_range: tuple[float, float] = eqx.field(
        static=True, default=(-1.0, 1.0), converter=_as_range
    )

    def __check_init__(self):
        k = self.num_levels
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 2):
            raise ValueError(f"`num_levels` must be an integer >= 2 or None, got {k!r}.")
        ok = isinstance(self.data_range, tuple) and len(self.data_range) == 2
        ok = ok and all(isinstance(v, float) and math.isfinite(v) for v in self.data_range)
        if not ok or not self.data_range[1] > self.data_range[0]:
            raise ValueError(
                "`data_range` must be a tuple (low, high) of finite numbers with low < high, "
                f"got {self.data_range!r}."
            )

    @property
    def is_discrete(self) -> bool:
        return self.num_levels is not None

    @property
    def scale(self) -> float:
        low, high = self.data_range
        return high - low

    def dequantize(
        self, k: Integer[ArrayLike, "*d"], u: Float[ArrayLike, "*d"]
    ) -> Float[Array, "*d"]:
        """Model-space value `x = a (k + u) / K + b` of levels `k` and offsets `u in [0, 1)`."""
        if self.num_levels is None:
            raise ValueError("Continuous data (num_levels=None) are not dequantized.")
        u = jnp.asarray(u)
        if not jnp.issubdtype(u.dtype, jnp.floating):
            u = u.astype(jnp.zeros(()).dtype)
        y = (jnp.asarray(k).astype(u.dtype) + u) / self.num_levels
        return self.scale * y + self.data_range[0]

    def quantize(self, x: Float[ArrayLike, "*d"]) -> Int[Array, "*d"]:
        """The levels `k` of model-space values `x` (inverse of `dequantize`)."""
        if self.num_levels is None:
            raise ValueError("Continuous data (num_levels=None) have no levels.")
        y = (jnp.asarray(x) - self.data_range[0]) / self.scale
        return jnp.clip(jnp.floor(y * self.num_levels), 0, self.num_levels - 1).astype(jnp.int32)

    def bits_per_dim(self, nll: ArrayLike, *, dim: int) -> Array:
        """[`scoreflow_eqx.bits_per_dim`][] with this discretization."""
        return bits_per_dim(nll, dim=dim, num_levels=self.num_levels, data_range=self.data_range)
