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
import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.special as jsp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Integer, PRNGKeyArray

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


def num_levels_of(discretization: Discretization) -> int:
    """`K` of a discrete discretization (an error for continuous data)."""
    if discretization.num_levels is None:
        raise ValueError("Continuous data (num_levels=None) are not dequantized.")
    return discretization.num_levels


def default_float_dtype():
    return jnp.zeros(()).dtype


def check_levels(
    k: ArrayLike, discretization: Discretization, name: str, shape: tuple[int, ...] | None = None
) -> Array:
    """`k` as an integer array; clear errors for floats and (when `shape` is given) a
    wrong shape at trace time, and for levels outside `0..K-1` at run time."""
    num_levels = num_levels_of(discretization)
    k = jnp.asarray(k)
    if not jnp.issubdtype(k.dtype, jnp.integer):
        raise ValueError(
            f"{name} dequantizes integer levels 0..{num_levels - 1}, got "
            f"dtype {k.dtype}. Pass the data's levels (e.g. uint8 pixels), not model-space "
            "values; `Discretization.quantize` maps model-space values to levels."
        )
    if shape is not None and k.shape != shape:
        raise ValueError(
            f"{name} was built for examples of shape {shape}, got levels of shape "
            f"{k.shape}. It takes ONE example; use `jax.vmap` for a batch."
        )
    return eqx.error_if(
        k,
        (k < 0) | (k > num_levels - 1),
        f"{name}: levels must lie in 0..{num_levels - 1} (num_levels={num_levels}).",
    )


def max_offset(num_levels: int, dtype) -> float:
    """The largest offset `u` kept by the dequantizers: `1 - spacing(K)` in `dtype`.

    For every level `k < K` the sum `k + u` (the first operation of
    [`scoreflow_eqx.data.Discretization.dequantize`][]) is then below `k + 1` after
    rounding, so a sample cannot land on the next cell's lower edge; in float32 that is
    `1 - 3.1e-5` for `K = 256` and `1 - 1.9e-6` for `K = 17` (in float64 `1 - 5.7e-14`
    and `1 - 3.6e-15`). Offsets above it are clipped to it: under a density bounded by
    `M` the clipped mass is at most `M spacing(K)` per dimension.
    """
    return float(1 - np.spacing(np.asarray(num_levels, dtype=np.dtype(dtype))))


def clip_offsets(u: Float[Array, "*d"], num_levels: int) -> Float[Array, "*d"]:
    """`u` clipped to `[0, max_offset(K)]` (see `max_offset`)."""
    return jnp.clip(u, 0, max_offset(num_levels, u.dtype)).astype(u.dtype)


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
        k = check_levels(k, self.discretization, "UniformDequantizer")
        dtype = default_float_dtype()
        u = jr.uniform(key, k.shape, dtype)
        x = self.discretization.dequantize(k, u).astype(dtype)
        return x, jnp.zeros((), dtype)


#: i-DODE's default: `sigma_eps / alpha_eps` of `VPSDE(beta_min=0.1, beta_max=20)` at
#: `eps = 1e-5` (1.0005e-3), the library's default SDE and smallest time.
DEFAULT_TRUNCATED_NORMAL_STD = 1e-3


class TruncatedNormalDequantizer(AbstractDequantizer):
    r"""Truncated-normal dequantization (Zheng et al. 2023, i-DODE): in every dimension
    the offset `u` is a normal centred on the cell, `N(1/2, scale^2)`, truncated to
    `[0, 1)`; in model space `x` is `N(centre, std^2)` truncated to the cell, with
    `scale = std K / a` (`a` the width of `data_range`). No training.

    **Choice of `std`.** i-DODE evaluates the probability-flow ODE from the smallest time
    `eps` and dequantizes with the forward process itself, restricted to the cell:
    `x_eps = alpha_eps centre + sigma_eps z`, `z ~ N(0, 1)` truncated to
    `|z| <= alpha_eps a / (2 K sigma_eps)` (`tau = alpha_0 / sigma_0 / 256` for 8-bit data
    in `[-1, 1]` in their code), so the truncated normal has the model-space standard
    deviation `std = sigma_eps / alpha_eps`. Their models are trained on the cell centres
    (no dequantization in training), so that the model's density at `eps` is close to
    the data convolved with `N(0, sigma_eps^2)`, whose restriction to a cell is this
    truncated normal: the dequantization distribution then matches the model's
    posterior within the cell, and the bound is tight. Use
    [`scoreflow_eqx.data.TruncatedNormalDequantizer.for_flow`][] for that choice. Here
    the ODE starts at `x` itself (the protocol keeps `x` inside the cell), so `x` is
    `centre + std z` without the factor `alpha_eps` of i-DODE's `x_eps`, a change of
    the density by `alpha_eps^D` (`D log alpha_eps = -5e-7 D` nats for the default VP
    SDE). For a model trained on uniformly dequantized data (as `sf.train` does) the
    density is nearly flat within each cell, and a narrow truncated normal gives a
    looser bound than uniform dequantization; a large `std` tends to it.

    **Sampling** is by the inverse CDF of `|u - 1/2| / scale` on `[0, tau]`,
    `tau = 1 / (2 scale)`, with a random sign: through `erfinv` when `tau < 1` (nearly
    uniform; no cancellation) and through `ndtri` of the lower tail otherwise (accurate
    far into the tails); `u` is then clipped to `[0, 1 - spacing(K)]` (see
    `max_offset`), which keeps `u` in `[0, 1)` and `k + u < k + 1` in the dtype for
    any `std`. `log_q` is the exact log-density, with the normaliser
    `log erf(tau / sqrt(2))` (as `log1p(-erfc)` for large `tau`).

    **Arguments:**

    - `discretization`: the [`scoreflow_eqx.data.Discretization`][] of the data (must be
        discrete).
    - `std`: the model-space standard deviation of the normal before truncation,
        positive (default `1e-3`, i-DODE's choice for this library's default
        `VPSDE` and `eps = 1e-5`).

    ??? cite "Reference"

        ```bibtex
        @inproceedings{zheng2023improved,
            title={Improved Techniques for Maximum Likelihood Estimation for Diffusion
                   {ODE}s},
            author={Zheng, Kaiwen and Lu, Cheng and Chen, Jianfei and Zhu, Jun},
            booktitle={ICML},
            year={2023}
        }
        ```
    """

    discretization: Discretization
    std: float = eqx.field(static=True, default=DEFAULT_TRUNCATED_NORMAL_STD)

    def __check_init__(self):
        check_discrete(self.discretization, "TruncatedNormalDequantizer")
        if not (isinstance(self.std, (int, float)) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(
                f"`std` must be a positive finite float (model-space units), got {self.std!r}."
            )

    @classmethod
    def for_flow(cls, discretization: Discretization, flow) -> "TruncatedNormalDequantizer":
        """i-DODE's choice for a [`scoreflow_eqx.ScoreFlow`][]:
        `std = sigma_eps / alpha_eps` of `flow.sde` at `flow.eps`.

        **Arguments:** `discretization` as above; `flow` the `ScoreFlow` whose
        likelihood will be evaluated (call outside `jax.jit`: `std` is static).
        """
        alpha, sigma = flow.sde.marginal(flow.eps)
        return cls(discretization, std=float(sigma) / float(alpha))

    @property
    def scale(self) -> float:
        """The standard deviation of the untruncated normal in units of the cell width
        (of `u`): `std K / a`."""
        return self.std * num_levels_of(self.discretization) / self.discretization.scale

    @property
    def truncation(self) -> float:
        """`tau = 1 / (2 scale)`: the half-width of the cell in standard deviations."""
        return 0.5 / self.scale

    def _log_normalizer(self, dtype) -> Float[Array, ""]:
        # log(scale sqrt(2 pi) erf(tau / sqrt 2)): the log-mass of the cell under the
        # untruncated normal, minus the log-density at its centre.
        tau = jnp.asarray(self.truncation / math.sqrt(2), dtype)
        if self.truncation < 1:
            log_mass = jnp.log(jsp.erf(tau))
        else:
            log_mass = jnp.log1p(-jsp.erfc(tau))
        return log_mass + math.log(self.scale * math.sqrt(2 * math.pi))

    def log_prob(
        self, u: Float[ArrayLike, "..."], k: Integer[ArrayLike, "..."]
    ) -> Float[Array, ""]:
        """`log q(u | k)` summed over the dimensions, `-inf` outside `[0, 1)^D` (`k` is
        only checked: the density is the same in every cell)."""
        u = jnp.asarray(u)
        k = check_levels(k, self.discretization, "TruncatedNormalDequantizer")
        if u.shape != k.shape:
            raise ValueError(f"`u` and `k` must have the same shape, got {u.shape} and {k.shape}.")
        if not jnp.issubdtype(u.dtype, jnp.floating):
            u = u.astype(default_float_dtype())
        return self._log_density(u)

    def _log_density(self, u):
        z = (u - 0.5) / self.scale
        per_dim = -0.5 * z**2 - self._log_normalizer(u.dtype)
        inside = (u >= 0) & (u < 1)
        return jnp.sum(jnp.where(inside, per_dim, -jnp.inf))

    def _sample_offsets(self, shape, dtype, key):
        mkey, skey = jr.split(key)
        v = jr.uniform(mkey, shape, dtype)
        tau = self.truncation
        if tau < 1:
            # |z| = sqrt 2 erfinv(v erf(tau / sqrt 2)): erf is linear near 0.
            mass = jsp.erf(jnp.asarray(tau / math.sqrt(2), dtype))
            r = math.sqrt(2) * jsp.erfinv(v * mass)
        else:
            # Phi(-|z|) uniform on [Phi(-tau), 1/2]: only the lower tail is evaluated,
            # where ndtr and ndtri keep their relative accuracy.
            low = jsp.ndtr(jnp.asarray(-tau, dtype))
            r = -jsp.ndtri(low + v * (0.5 - low))
        r = jnp.minimum(r, jnp.asarray(tau, dtype))  # ndtri(0) = -inf if low underflows
        sign = jnp.where(jr.bernoulli(skey, 0.5, shape), 1, -1).astype(dtype)
        u = 0.5 + sign * jnp.asarray(self.scale, dtype) * r
        return clip_offsets(u, num_levels_of(self.discretization))

    def __call__(
        self, k: Integer[Array, "*data"], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, "*data"], Float[Array, ""]]:
        k = check_levels(k, self.discretization, "TruncatedNormalDequantizer")
        dtype = default_float_dtype()
        u = self._sample_offsets(k.shape, dtype, key)
        x = self.discretization.dequantize(k, u).astype(dtype)
        return x, self._log_density(u)
