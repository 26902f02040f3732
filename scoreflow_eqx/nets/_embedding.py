"""Time embeddings for score networks."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import RealScalarLike


class SinusoidalEmbedding(eqx.Module):
    """Transformer-style sinusoidal embedding of a scalar time `t`, scaled by `scale`
    (so `t in [0, 1]` spans many periods), of even dimension `dim`."""

    dim: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(self, dim: int, scale: float = 1000.0):
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


def make_embedding(kind: str, dim: int, *, key: PRNGKeyArray):
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return FourierEmbedding(dim, key=key)
    raise ValueError(f"Unknown time embedding {kind!r}; valid ones are ['sinusoidal', 'fourier'].")
