"""Gaussian mixtures: data with an exact score and density under every linear SDE."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._custom_types import Data, RealScalarLike, Scalar
from ._sde import AbstractSDE


class GaussianMixture(eqx.Module):
    """A mixture of Gaussians with diagonal covariances, `sum_k w_k N(m_k, diag(s_k^2))`.

    Under a linear SDE the marginal at time `t` is again such a mixture, with means
    `alpha_t m_k` and variances `alpha_t^2 s_k^2 + sigma_t^2`, so scores and densities are
    exact at every `t`: the ground truth for likelihoods, bounds and samplers.

    **Arguments:**

    - `weights`: shape `(K,)`, positive (normalised here).
    - `means`: shape `(K, *data)`.
    - `stds`: shape `(K, *data)` or `(K,)` (isotropic components); positive.
    """

    log_weights: Float[Array, " K"]
    means: Float[Array, " K *data"]
    stds: Float[Array, " K *data"]

    def __init__(self, weights, means, stds):
        weights = jnp.asarray(weights)
        means = jnp.asarray(means)
        stds = jnp.asarray(stds, dtype=means.dtype)
        if weights.ndim != 1 or means.shape[0] != weights.shape[0]:
            raise ValueError(
                "Need `weights` of shape (K,) and `means` of shape (K, *data); got "
                f"{weights.shape} and {means.shape}."
            )
        if stds.ndim == 1:
            stds = jnp.broadcast_to(stds.reshape((-1,) + (1,) * (means.ndim - 1)), means.shape)
        if stds.shape != means.shape:
            raise ValueError(
                f"`stds` must have shape {means.shape} or ({means.shape[0]},), got {stds.shape}."
            )
        self.log_weights = jnp.log(weights) - jnp.log(jnp.sum(weights))
        self.means = means
        self.stds = stds

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.means.shape[1:]

    def log_prob(self, x: Data) -> Scalar:
        """Exact log-density at one point `x`."""
        z = (x[None] - self.means) / self.stds
        axes = tuple(range(1, self.means.ndim))
        d = math.prod(self.data_shape)
        comp = -0.5 * jnp.sum(z**2, axis=axes) - jnp.sum(jnp.log(self.stds), axis=axes)
        comp = comp - 0.5 * d * math.log(2 * math.pi)
        return jax.nn.logsumexp(self.log_weights + comp)

    def score(self, x: Data) -> Data:
        """Exact score `grad_x log p(x)`."""
        return jax.grad(self.log_prob)(x)

    def sample(self, *, key: PRNGKeyArray) -> Data:
        """One exact sample."""
        ckey, nkey = jr.split(key)
        k = jr.categorical(ckey, self.log_weights)
        noise = jr.normal(nkey, self.data_shape, self.means.dtype)
        return self.means[k] + self.stds[k] * noise

    def mean(self) -> Data:
        """The mixture mean."""
        w = jnp.exp(self.log_weights).reshape((-1,) + (1,) * len(self.data_shape))
        return jnp.sum(w * self.means, axis=0)

    def covariance(self) -> Float[Array, "D D"]:
        """The covariance of the flattened data, shape `(D, D)`."""
        w = jnp.exp(self.log_weights)
        m = self.means.reshape(self.means.shape[0], -1)
        v = self.stds.reshape(self.stds.shape[0], -1) ** 2
        mu = w @ m
        second = jnp.einsum("k,ki,kj->ij", w, m, m) + jnp.diag(w @ v)
        return second - jnp.outer(mu, mu)

    def diffuse(self, sde: AbstractSDE, t: RealScalarLike) -> "GaussianMixture":
        """The exact marginal `p_t` of this mixture under `sde` at time `t`."""
        alpha, sigma = sde.marginal(t)
        return GaussianMixture(
            jnp.exp(self.log_weights),
            alpha * self.means,
            jnp.sqrt((alpha * self.stds) ** 2 + sigma**2),
        )
