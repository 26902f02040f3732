"""Dequantizers: the map from the integer levels of one discrete example to a model-space
point and the log-density of the offsets that produced it.

The protocol (Song et al. 2021, Section 4; Ho et al. 2019, Flow++): for levels
`k in {0..K-1}^D` a dequantizer draws offsets `u in [0, 1)^D` from `q(u | k)` and returns
`x = a (k + u) / K + b` (see [`scoreflow_eqx.data.Discretization`][]) and
`log q(u | k)`, so that

`-log P(k) <= E_q[NLL(x) + log q(u | k)] - D log(a / K)`.

Uniform dequantization has `log q = 0`; the bits/dim offset of
[`scoreflow_eqx.bits_per_dim`][] then holds unchanged.
"""

import abc

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Integer, PRNGKeyArray

from ._discretization import Discretization


class AbstractDequantizer(eqx.Module):
    """A dequantizer `dequantizer(k, *, key) -> (x, log_q)` for ONE example of integer
    levels `k` (use `jax.vmap` for batches).

    Subclasses hold the [`scoreflow_eqx.data.Discretization`][] they dequantize for;
    training and evaluation use the same object, so the bits/dim offset and the offsets'
    density cannot disagree.
    """

    discretization: eqx.AbstractVar[Discretization]

    @abc.abstractmethod
    def __call__(
        self, k: Integer[Array, "*data"], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, "*data"], Float[Array, ""]]:
        """**Arguments:** `k` the integer levels of one example, `key` a PRNG key.

        **Returns:** `(x, log_q)`: the model-space point `a (k + u) / K + b` and
        `log q(u | k)` (a scalar, summed over the dimensions).
        """


def check_discrete(discretization: Discretization, name: str) -> None:
    if not isinstance(discretization, Discretization):
        raise TypeError(
            f"{name} needs a scoreflow_eqx.data.Discretization, got "
            f"{type(discretization).__name__}."
        )
    if not discretization.is_discrete:
        raise ValueError(
            f"{name} dequantizes discrete data, but the discretization has "
            "num_levels=None (continuous data, which are used as they are)."
        )


def default_float_dtype():
    return jnp.zeros(()).dtype


class UniformDequantizer(AbstractDequantizer):
    """Uniform dequantization: `u ~ U[0, 1)^D`, `log q(u | k) = 0`.

    **Arguments:**

    - `discretization`: the [`scoreflow_eqx.data.Discretization`][] of the data (must be
        discrete).
    """

    discretization: Discretization

    def __check_init__(self):
        check_discrete(self.discretization, "UniformDequantizer")

    def __call__(
        self, k: Integer[Array, "*data"], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, "*data"], Float[Array, ""]]:
        dtype = default_float_dtype()
        u = jr.uniform(key, k.shape, dtype)
        x = self.discretization.dequantize(k, u).astype(dtype)
        return x, jnp.zeros((), dtype)
