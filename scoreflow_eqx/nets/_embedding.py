"""Embeddings of the scalar a score network is conditioned on (the log-SNR or the time,
see `scoreflow_eqx.AbstractConditioning`)."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import RealScalarLike


class SinusoidalEmbedding(eqx.Module):
    """Transformer-style sinusoidal embedding of a scalar `c`, of even dimension `dim`:
    `sin(scale c w_i)` and `cos(scale c w_i)` with `dim / 2` frequencies `w_i` spaced
    geometrically from 1 down to `1 / 10000`.

    With the default `scale = 1` the fastest feature has a period of `2 pi` in `c`: suited
    to the log-SNR conditioning of the nets (`c = log(sigma_t / alpha_t)`, about -7 to 5),
    and a smooth function of the time. (Song et al.'s DDPM++ embeds `1000 t`, whose
    fastest feature has a period of `2 pi / 1000` in `t`; see
    [`scoreflow_eqx.TimeConditioning`][].)

    **Arguments:**

    - `dim`: even, >= 2.
    - `scale`: multiplies `c` (default 1).
    """

    dim: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(self, dim: int, scale: float = 1.0):
        if dim < 2 or dim % 2:
            raise ValueError(f"`dim` must be an even integer >= 2, got {dim!r}.")
        self.dim = dim
        self.scale = float(scale)

    def __call__(self, t: RealScalarLike) -> Float[Array, " dim"]:
        half = self.dim // 2
        t = jnp.asarray(t)
        dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.zeros(()).dtype
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=dtype) / max(half - 1, 1))
        arg = self.scale * t.astype(dtype) * freqs
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


class FourierEmbedding(eqx.Module):
    """Gaussian random Fourier features of `log t`-like inputs (NCSN++ style):
    `[sin(2 pi W t), cos(2 pi W t)]` with fixed (non-trainable) `W ~ N(0, scale^2)`."""

    weights: Float[Array, " half"]
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, scale: float = 16.0, *, key: PRNGKeyArray):
        if dim < 2 or dim % 2:
            raise ValueError(f"`dim` must be an even integer >= 2, got {dim!r}.")
        self.dim = dim
        self.weights = scale * jr.normal(key, (dim // 2,))

    def __call__(self, t: RealScalarLike) -> Float[Array, " dim"]:
        w = jax.lax.stop_gradient(self.weights)  # fixed features, never trained
        arg = 2 * math.pi * jnp.asarray(t) * w
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


EMBEDDINGS: tuple[str, ...] = ("sinusoidal", "fourier")

#: An embedding: a callable (usually an `eqx.Module`) mapping a scalar to a vector.
Embedding = Callable[[RealScalarLike], Float[Array, " dim"]]


def make_embedding(embedding: "str | Embedding", dim: int, *, key: PRNGKeyArray) -> Embedding:
    """The embedding module of a net: `"sinusoidal"` (`SinusoidalEmbedding(dim)`),
    `"fourier"` (`FourierEmbedding(dim)`), or a module `c -> (dim,)` as it is."""
    if callable(embedding):
        out = jax.eval_shape(embedding, jnp.zeros(()))
        if getattr(out, "shape", None) != (dim,):
            raise ValueError(
                f"The embedding {type(embedding).__name__} maps a scalar to shape "
                f"{getattr(out, 'shape', out)}; this net needs shape ({dim},)."
            )
        return embedding
    if embedding == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if embedding == "fourier":
        return FourierEmbedding(dim, key=key)
    raise ValueError(
        f"Unknown embedding {embedding!r}; valid ones are {list(EMBEDDINGS)} or an "
        "embedding module."
    )
