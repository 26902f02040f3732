"""Denoising score matching with score-SDE or likelihood weighting."""

from collections.abc import Callable

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._custom_types import Data, RealScalarLike, Scalar
from ._sde import AbstractSDE
from ._time_sampling import ImportanceSampler


WEIGHTINGS: tuple[str, ...] = ("likelihood", "score_sde")


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"Unknown weighting {weighting!r}; valid weightings are {list(WEIGHTINGS)}."
        )


def dsm_loss(
    sde: AbstractSDE,
    scaled_score: Callable[[RealScalarLike, Data], Data],
    x0: Data,
    *,
    key: PRNGKeyArray,
    eps: float,
    weighting: str = "likelihood",
    importance_sampling: bool = True,
    t: RealScalarLike | None = None,
) -> Scalar:
    """One-sample estimate of the weighted denoising score-matching objective
    `1/2 int_eps^T lambda(t) E_z ||s(t, x_t) + z / sigma_t||^2 dt` for one example `x0`.

    `scaled_score(t, x)` must return `sigma_t s(t, x)` (for the noise parameterisation that
    is minus the network output, so no division by a small `sigma_t` ever happens). With
    `lambda = g^2` the objective plus constants is the bound of Theorem 1 of
    Song et al. (2021) on `KL(p || p_SDE)`.

    The time is drawn uniformly on `[eps, T]` (weight `(T - eps) lambda / sigma^2`) or from
    the importance-sampling proposal `p(t) = g^2 / (sigma^2 Z)` (weight `lambda / (sigma^2 p)`,
    which is exactly `Z` for likelihood weighting). Pass `t` to fix the time (e.g. for
    stratified sampling over a batch); it is then regarded as drawn from the same proposal.
    """
    check_weighting(weighting)
    tkey, zkey = jr.split(key)
    sampler = ImportanceSampler(sde, eps)
    if t is None:
        if importance_sampling:
            t = sampler.sample(tkey)
        else:
            t = jr.uniform(tkey, minval=eps, maxval=sde.T)
    t = jnp.asarray(t)
    alpha, sigma = sde.marginal(t)
    z = jr.normal(zkey, x0.shape, x0.dtype)
    x_t = alpha * x0 + sigma * z
    residual = scaled_score(t, x_t) + z
    if importance_sampling:
        if weighting == "likelihood":
            weight = sampler.Z
        else:  # lambda = sigma^2: weight = sigma^2 / (sigma^2 p) = Z sigma^2 / g^2
            weight = sampler.Z * sigma**2 / sde.diffusion_squared(t)
    else:
        if weighting == "likelihood":
            weight = (sde.T - eps) * sde.diffusion_squared(t) / sigma**2
        else:
            weight = jnp.asarray(sde.T - eps)
    return 0.5 * weight * jnp.sum(residual**2)
