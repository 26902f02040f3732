"""A time-conditioned MLP score network for vector (or small) data."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import PRNGKeyArray

from .._conditioning import AbstractConditioning, LogSNRConditioning
from .._custom_types import Data, RealScalarLike
from ._embedding import Embedding, make_embedding
from ._shapes import check_shape


class MLP(eqx.Module):
    """An MLP `net(t, x)` for data of any (small) shape: the data are flattened and
    concatenated with a time embedding; each hidden layer also receives the embedding.

    **Arguments:**

    - `data_shape`: the shape of one example, e.g. `(2,)`.
    - `width_size`: hidden width.
    - `depth`: number of hidden layers.
    - `embedding`: the embedding of the conditioning variable `c`: `"sinusoidal"`
        (default), `"fourier"` (Gaussian random features), or a module mapping a scalar
        to `(embedding_dim,)`.
    - `conditioning`: what the net is conditioned on, `c = conditioning(sde, t)`,
        applied by [`scoreflow_eqx.ScoreFlow`][] (default
        [`scoreflow_eqx.LogSNRConditioning`][]`()`: `c = log(sigma_t / alpha_t)`).
    - `embedding_dim`: size of the time embedding.
    - `activation`: the nonlinearity (default SiLU).
    - `key`: PRNG key (keyword-only).

    The output has the shape of the input. The last layer is zero-initialised scaled down,
    so a fresh model predicts almost zero noise.
    """

    embedding: Embedding
    layers: tuple[eqx.nn.Linear, ...]
    time_layers: tuple[eqx.nn.Linear, ...]
    out: eqx.nn.Linear
    conditioning: AbstractConditioning
    data_shape: tuple[int, ...] = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        data_shape: tuple[int, ...],
        width_size: int = 128,
        depth: int = 3,
        *,
        embedding: "str | Embedding" = "sinusoidal",
        embedding_dim: int = 32,
        conditioning: AbstractConditioning = LogSNRConditioning(),
        activation: Callable = jax.nn.silu,
        key: PRNGKeyArray,
    ):
        if depth < 1:
            raise ValueError(f"`depth` must be >= 1, got {depth!r}.")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.activation = activation
        self.conditioning = conditioning
        d = math.prod(self.data_shape)
        ekey, okey, *lkeys = jr.split(key, 2 + 2 * depth)
        self.embedding = make_embedding(embedding, embedding_dim, key=ekey)
        sizes = [d] + [width_size] * depth
        self.layers = tuple(
            eqx.nn.Linear(sizes[i], sizes[i + 1], key=lkeys[i]) for i in range(depth)
        )
        self.time_layers = tuple(
            eqx.nn.Linear(embedding_dim, width_size, key=lkeys[depth + i]) for i in range(depth)
        )
        out = eqx.nn.Linear(width_size, d, key=okey)
        self.out = eqx.tree_at(lambda l: l.weight, out, out.weight * 0.1)

    def __call__(self, t: RealScalarLike, x: Data) -> Data:
        check_shape(x, self.data_shape, type(self).__name__)
        emb = self.embedding(t)
        h = x.reshape(-1)
        for layer, tlayer in zip(self.layers, self.time_layers):
            h = self.activation(layer(h) + tlayer(emb))
        return self.out(h).reshape(self.data_shape).astype(x.dtype)
