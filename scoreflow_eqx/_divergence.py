"""Divergences `div F(x) = tr(dF/dx)` of a function on one example of any shape: the
exact trace from vector-Jacobian or Jacobian-vector products with basis vectors, and
Hutchinson's unbiased estimate `E_v[v^T (dF/dx) v]` (Hutchinson 1989; Grathwohl et al.
2019, FFJORD)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._custom_types import Data, Scalar


JACOBIAN_MODES: tuple[str, ...] = ("reverse", "forward")
PROBES: tuple[str, ...] = ("rademacher", "gaussian")


def check_jacobian_mode(mode: str) -> None:
    if mode not in JACOBIAN_MODES:
        raise ValueError(
            f"Unknown jacobian_mode {mode!r}; valid modes are {list(JACOBIAN_MODES)} "
            "(vector-Jacobian or Jacobian-vector products)."
        )


def check_probe(probe: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"Unknown probe {probe!r}; valid probes are {list(PROBES)}.")


def _linear_map(fn: Callable[[Data], Data], x: Data, mode: str):
    # One evaluation of `fn` at `x`, and the linear map v -> v^T J (reverse mode) or
    # v -> J v (forward mode). Both keep the evaluation's residuals, so further products
    # cost no further evaluation of `fn`.
    if mode == "reverse":
        fx, pullback = jax.vjp(fn, x)
        return fx, lambda v: pullback(v)[0]
    fx, pushforward = jax.linearize(fn, x)
    return fx, pushforward


def value_and_exact_divergence(
    fn: Callable[[Data], Data],
    x: Data,
    *,
    mode: str = "reverse",
    chunk_size: int | None = None,
) -> tuple[Data, Scalar]:
    """`fn(x)` and the exact divergence `tr(d fn / dx)` at `x`, for `x` of any shape.

    `fn` is evaluated once; the trace takes `D = x.size` vector-Jacobian (or
    Jacobian-vector) products with the basis vectors, vmapped, or in chunks of
    `chunk_size` (with `jax.lax.map`) to bound the memory for large `D`.

    **Arguments:**

    - `fn`: a function from arrays shaped like `x` to arrays shaped like `x`.
    - `x`: one example.
    - `mode`: `"reverse"` (VJPs) or `"forward"` (JVPs).
    - `chunk_size`: the number of basis vectors per vmapped chunk; `None` for all at
        once.

    **Returns:** `(fn(x), divergence)`.
    """
    check_jacobian_mode(mode)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(
            f"`chunk_size` must be a positive integer or None, got {chunk_size!r}."
        )
    fx, linear = _linear_map(fn, x, mode)
    d = x.size

    def diagonal_entry(i):
        basis = jnp.zeros(d, x.dtype).at[i].set(1).reshape(x.shape)
        return linear(basis).reshape(-1)[i]

    indices = jnp.arange(d)
    if chunk_size is None or chunk_size >= d:
        diagonal = jax.vmap(diagonal_entry)(indices)
    else:
        diagonal = jax.lax.map(diagonal_entry, indices, batch_size=chunk_size)
    return fx, jnp.sum(diagonal)


def value_and_hutchinson_divergence(
    fn: Callable[[Data], Data],
    x: Data,
    probes: Float[Array, " num_probes *data"],
    *,
    mode: str = "reverse",
) -> tuple[Data, Scalar]:
    """`fn(x)` and Hutchinson's estimate `mean_k v_k^T (d fn/dx) v_k` of its divergence.

    The estimate is unbiased when the probes have zero mean and identity covariance
    (Rademacher or standard Gaussian; see
    [`scoreflow_eqx._divergence.sample_probes`][]). `fn` is evaluated once; each probe
    costs one vector-Jacobian product (`"reverse"`) or one Jacobian-vector product
    (`"forward"`).

    **Arguments:**

    - `fn`: a function from arrays shaped like `x` to arrays shaped like `x`.
    - `x`: one example.
    - `probes`: shape `(num_probes, *x.shape)`.
    - `mode`: `"reverse"` (VJPs) or `"forward"` (JVPs).

    **Returns:** `(fn(x), divergence estimate)`.
    """
    check_jacobian_mode(mode)
    if probes.shape[1:] != x.shape:
        raise ValueError(
            f"`probes` must have shape (num_probes, *{x.shape}), got {probes.shape}."
        )
    if probes.shape[0] == 1:
        v = probes[0]
        if mode == "forward":
            fx, jv = jax.jvp(fn, (x,), (v,))
        else:
            fx, pullback = jax.vjp(fn, x)
            (jv,) = pullback(v)
        return fx, jnp.sum(jv * v)
    fx, linear = _linear_map(fn, x, mode)
    products = jax.vmap(linear)(probes)
    estimates = jnp.sum((products * probes).reshape(probes.shape[0], -1), axis=1)
    return fx, jnp.mean(estimates)


def sample_probes(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    dtype,
    *,
    probe: str = "rademacher",
    num_probes: int = 1,
) -> Float[Array, " num_probes *data"]:
    """Probes for Hutchinson's estimator, shape `(num_probes, *shape)`: Rademacher
    (`+-1`, the lower-variance choice) or standard Gaussian."""
    check_probe(probe)
    if num_probes < 1:
        raise ValueError(
            f"`num_probes` must be a positive integer, got {num_probes!r}."
        )
    full_shape = (num_probes, *shape)
    if probe == "rademacher":
        return jr.rademacher(key, full_shape, dtype)
    return jr.normal(key, full_shape, dtype)
