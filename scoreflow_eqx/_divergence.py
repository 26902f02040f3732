"""Divergence estimators `div F(x) = tr(dF/dx)` of a function on one example of any shape,
as equinox Modules passed to likelihood solves (`divergence=`): the exact trace from
Jacobian-vector or vector-Jacobian products with the basis vectors, and Hutchinson's
unbiased estimate `E_v[v^T (dF/dx) v]` (Hutchinson 1989; Grathwohl et al. 2019, FFJORD)."""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._custom_types import Data, Scalar


JACOBIAN_MODES: tuple[str, ...] = ("forward", "reverse")
PROBES: tuple[str, ...] = ("rademacher", "gaussian")


def _check_mode(mode: str) -> None:
    if mode not in JACOBIAN_MODES:
        raise ValueError(
            f"Unknown mode {mode!r}; valid modes are {list(JACOBIAN_MODES)} "
            "(Jacobian-vector or vector-Jacobian products)."
        )


def _linear_map(fn: Callable[[Data], Data], x: Data, mode: str):
    # One evaluation of `fn` at `x`, and the linear map v -> J v (forward mode) or
    # v -> v^T J (reverse mode). Both keep the evaluation's residuals, so further products
    # cost no further evaluation of `fn`.
    if mode == "reverse":
        fx, pullback = jax.vjp(fn, x)
        return fx, lambda v: pullback(v)[0]
    return jax.linearize(fn, x)


class AbstractDivergence(eqx.Module):
    """An estimator of the divergence `tr(d fn / dx)` of a function `fn` from arrays shaped
    like `x` to arrays shaped like `x`, for use inside an ODE solve.

    `init(x, key=...)` draws whatever stays fixed for one solve (Hutchinson's probes:
    the same probes at every evaluation, so the solve integrates one smooth ODE), and
    `value_and_divergence(fn, x, state)` evaluates `fn` once and returns `(fn(x),
    divergence)`.
    """

    #: Whether `init` needs a PRNG key.
    needs_key: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def init(self, x: Data, *, key: PRNGKeyArray | None) -> PyTree[Array]:
        """The state fixed for one solve at an example shaped like `x`."""

    @abc.abstractmethod
    def value_and_divergence(
        self, fn: Callable[[Data], Data], x: Data, state: PyTree[Array]
    ) -> tuple[Data, Scalar]:
        """`(fn(x), estimate of tr(d fn / dx) at x)`, evaluating `fn` once."""


class ExactTrace(AbstractDivergence):
    """The exact divergence: the trace of the Jacobian from `D = x.size` Jacobian-vector
    (`mode="forward"`) or vector-Jacobian (`"reverse"`) products with the basis vectors,
    vmapped, or in chunks of `chunk_size` (`jax.lax.map`) to bound the memory for large
    `D`. Costs `D` products per evaluation: cheap for small `D`.

    **Arguments:**

    - `mode`: `"forward"` (default: several times faster than reverse mode for
        convolutional nets inside XLA:CPU loops, and no stored activations) or
        `"reverse"`.
    - `chunk_size`: basis vectors per vmapped chunk; `None` for all at once.
    """

    mode: str = eqx.field(default="forward", static=True)
    chunk_size: int | None = eqx.field(default=None, static=True)
    needs_key: ClassVar[bool] = False

    def __check_init__(self):
        _check_mode(self.mode)
        if self.chunk_size is not None and not (
            isinstance(self.chunk_size, int) and self.chunk_size >= 1
        ):
            raise ValueError(
                f"`chunk_size` must be a positive integer or None, got {self.chunk_size!r}."
            )

    def init(self, x: Data, *, key: PRNGKeyArray | None = None) -> None:
        return None

    def value_and_divergence(
        self, fn: Callable[[Data], Data], x: Data, state: None = None
    ) -> tuple[Data, Scalar]:
        fx, linear = _linear_map(fn, x, self.mode)
        d = x.size

        def diagonal_entry(i):
            basis = jnp.zeros(d, x.dtype).at[i].set(1).reshape(x.shape)
            return linear(basis).reshape(-1)[i]

        indices = jnp.arange(d)
        if self.chunk_size is None or self.chunk_size >= d:
            diagonal = jax.vmap(diagonal_entry)(indices)
        else:
            diagonal = jax.lax.map(diagonal_entry, indices, batch_size=self.chunk_size)
        return fx, jnp.sum(diagonal)


class Hutchinson(AbstractDivergence):
    """Hutchinson's unbiased estimate `mean_k v_k^T (d fn / dx) v_k` with probes `v_k` of
    zero mean and identity covariance, drawn once per solve by `init`. Each probe costs
    one Jacobian-vector (`mode="forward"`) or vector-Jacobian (`"reverse"`) product.

    **Arguments:**

    - `probe`: `"rademacher"` (`+-1`, the lower-variance choice; default) or
        `"gaussian"`.
    - `num_probes`: probes averaged at each evaluation.
    - `mode`: `"forward"` (default) or `"reverse"` (as the paper's released code).

    The probes of a key are the same whatever the dtype of `x` and whether
    `jax_enable_x64` is on (Gaussian probes are drawn in float32), so a float32
    likelihood can be checked against a float64 solve with the same probes.

    ??? cite "Reference"

        ```bibtex
        @article{hutchinson1989stochastic,
            title={A stochastic estimator of the trace of the influence matrix for
                   Laplacian smoothing splines},
            author={Hutchinson, Michael F},
            journal={Communications in Statistics-Simulation and Computation},
            volume={18}, number={3}, pages={1059--1076},
            year={1989}
        }
        @inproceedings{grathwohl2019ffjord,
            title={FFJORD: Free-form Continuous Dynamics for Scalable Reversible
                   Generative Models},
            author={Grathwohl, Will and Chen, Ricky T. Q. and Bettencourt, Jesse and
                    Sutskever, Ilya and Duvenaud, David},
            booktitle={ICLR},
            year={2019}
        }
        ```
    """

    probe: str = eqx.field(default="rademacher", static=True)
    num_probes: int = eqx.field(default=1, static=True)
    mode: str = eqx.field(default="forward", static=True)
    needs_key: ClassVar[bool] = True

    def __check_init__(self):
        _check_mode(self.mode)
        if self.probe not in PROBES:
            raise ValueError(f"Unknown probe {self.probe!r}; valid probes are {list(PROBES)}.")
        if not (isinstance(self.num_probes, int) and self.num_probes >= 1):
            raise ValueError(f"`num_probes` must be a positive integer, got {self.num_probes!r}.")

    def init(self, x: Data, *, key: PRNGKeyArray | None) -> Float[Array, " num_probes *data"]:
        if key is None:
            raise ValueError(
                "Hutchinson's estimator draws random probes: pass `key=`, or use "
                "`divergence=sf.ExactTrace()`."
            )
        shape = (self.num_probes, *x.shape)
        if self.probe == "rademacher":
            # From 32 random bits, not `jr.rademacher`, whose draws change with
            # `jax_enable_x64`: the same key gives the same probes in float32 and float64.
            bits = jr.bits(key, shape, jnp.uint32)
            return (2 * (bits & 1).astype(jnp.int32) - 1).astype(x.dtype)
        return jr.normal(key, shape, jnp.float32).astype(x.dtype)

    def value_and_divergence(
        self,
        fn: Callable[[Data], Data],
        x: Data,
        state: Float[Array, " num_probes *data"],
    ) -> tuple[Data, Scalar]:
        probes = state
        if probes.shape[1:] != x.shape:
            raise ValueError(
                f"The probes have shape {probes.shape}, expected (num_probes, *{x.shape})."
            )
        if probes.shape[0] == 1:
            v = probes[0]
            if self.mode == "forward":
                fx, jv = jax.jvp(fn, (x,), (v,))
            else:
                fx, pullback = jax.vjp(fn, x)
                (jv,) = pullback(v)
            return fx, jnp.sum(jv * v)
        fx, linear = _linear_map(fn, x, self.mode)
        products = jax.vmap(linear)(probes)
        estimates = jnp.sum((products * probes).reshape(probes.shape[0], -1), axis=1)
        return fx, jnp.mean(estimates)


DIVERGENCES: dict[str, Callable[[], AbstractDivergence]] = {
    "exact": ExactTrace,
    "hutchinson": Hutchinson,
}


def as_divergence(divergence: "AbstractDivergence | str") -> AbstractDivergence:
    """The estimator for `divergence`: an [`scoreflow_eqx.AbstractDivergence`][] as it is,
    or a shorthand string, `"exact"` (`ExactTrace()`) or `"hutchinson"` (`Hutchinson()`)."""
    if isinstance(divergence, AbstractDivergence):
        return divergence
    if isinstance(divergence, str) and divergence in DIVERGENCES:
        return DIVERGENCES[divergence]()
    raise ValueError(
        f"`divergence` must be a divergence estimator such as `sf.Hutchinson()` or "
        f"`sf.ExactTrace()`, or one of the shorthands {list(DIVERGENCES)}; got {divergence!r}."
    )
