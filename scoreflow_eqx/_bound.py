"""The Theorem 3 upper bound on the negative log-likelihood of the SDE model, in its
denoising score-matching form, with the small-time correction of Appendix B."""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._custom_types import Data
from ._flow import ScoreFlow
from ._likelihood import check_example
from ._time_sampling import ImportanceSampler


class NLLBoundResult(eqx.Module):
    """The result of [`scoreflow_eqx.nll_bound`][] for one example (batched under
    `jax.vmap`).

    **Fields:**

    - `nll`: the upper bound on `-log p(x)` in nats: `prior_term + diffusion_term +
        eps_correction`.
    - `prior_term`: `E[-log prior(x_T)]` under `x_T ~ p_0T(. | x)`, in closed form.
    - `diffusion_term`: the Monte Carlo estimate of the time integral over `[eps, T]`.
    - `eps_correction`: the small-time correction (0 when disabled).
    - `stderr`: the Monte Carlo standard error of `nll`.
    - `nfe`: the number of score-network evaluations.
    - `result`: `diffrax.RESULTS.successful`, or `RESULTS.nonfinite_input` when `x` has
        NaN or inf entries (then every value is NaN).
    - `stats`: `{"num_t": ..., "num_eps_samples": ...}`, the sample sizes used.
    """

    nll: Float[Array, "*batch"]
    prior_term: Float[Array, "*batch"]
    diffusion_term: Float[Array, "*batch"]
    eps_correction: Float[Array, "*batch"]
    stderr: Float[Array, "*batch"]
    nfe: Int[Array, "*batch"]
    result: dfx.RESULTS
    stats: dict


def check_bound_options(num_t: int, eps_correction: bool, num_eps_samples: int) -> None:
    for name, value in (("num_t", num_t), ("num_eps_samples", num_eps_samples)):
        if name == "num_eps_samples" and not eps_correction:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _mean_and_variance_of_mean(values):
    n = values.shape[0]
    mean = jnp.mean(values)
    if n < 2:
        return mean, jnp.zeros_like(mean)
    return mean, jnp.var(values, ddof=1) / n


def nll_bound(
    flow: ScoreFlow,
    x: Data,
    *,
    key: PRNGKeyArray,
    num_t: int = 1000,
    importance_sampling: bool = True,
    eps_correction: bool = True,
    num_eps_samples: int = 16,
) -> NLLBoundResult:
    """Unbiased Monte Carlo estimate of the Theorem 3 upper bound on `-log p(x)` of the
    SDE model, for one example, in nats (Song et al. 2021, Theorem 3, DSM form):

    `-log p_SDE(x) <= E[-log prior(x_T)]
        + 1/2 int_eps^T E[g^2 ||s(t, x_t) - grad log p_0t(x_t|x)||^2
                          - g^2 ||grad log p_0t(x_t|x)||^2 - 2 div f(x_t, t)] dt`

    with `x_t = alpha_t x + sigma_t z` and `grad log p_0t(x_t | x) = -z / sigma_t`. The
    prior term is computed in closed form; the time integral with `num_t` pairs
    `(t, z)`, `t` drawn from the importance-sampling proposal `g^2 / (sigma_t^2 Z)`
    (each weighted by `Z sigma_t^2 / g^2`) or uniformly; the integral of `div f` (a
    function of `t` only for these linear SDEs) is exact: `D log(alpha_T / alpha_eps)`.

    The eps correction (Appendix B) accounts for starting at `eps > 0`: the model
    decodes `x_eps` with `q(x | x_eps) = N(mu, (sigma_eps / alpha_eps)^2 I)`, where
    `mu = (x_eps + sigma_eps^2 s(eps, x_eps)) / alpha_eps` (Tweedie's formula), which
    adds `E[-log q(x | x_eps)] - H(p_0eps(. | x))` with `x_eps ~ p_0eps(. | x)`.

    **Arguments:**

    - `flow`: the [`scoreflow_eqx.ScoreFlow`][].
    - `x`: one example in model space (dequantized if the data are discrete).
    - `key`: PRNG key (keyword-only).
    - `num_t`: the number of `(t, z)` samples of the time integral.
    - `importance_sampling`: draw `t` from the proposal (default) or uniformly on
        `[eps, T]`.
    - `eps_correction`: add the small-time correction.
    - `num_eps_samples`: the number of `x_eps` samples for the correction.

    **Returns:** an [`scoreflow_eqx.NLLBoundResult`][] (`.nll` is the bound).

    ??? cite "Reference"

        ```bibtex
        @inproceedings{song2021maximum,
            title={Maximum Likelihood Training of Score-Based Diffusion Models},
            author={Song, Yang and Durkan, Conor and Murray, Iain and Ermon, Stefano},
            booktitle={NeurIPS},
            year={2021}
        }
        ```
    """
    check_bound_options(num_t, eps_correction, num_eps_samples)
    x = check_example(x)
    ok = jnp.all(jnp.isfinite(x))
    sde, eps, d = flow.sde, flow.eps, x.size
    tkey, zkey, ekey = jr.split(key, 3)

    # E[-log prior(x_T)] with x_T ~ N(alpha_T x, sigma_T^2 I) and prior N(0, std^2 I).
    alpha_T, sigma_T = sde.marginal(sde.T)
    std = sde.prior_std()
    prior_term = 0.5 * d * math.log(2 * math.pi * std**2) + (
        alpha_T**2 * jnp.sum(x**2) + d * sigma_T**2
    ) / (2 * std**2)

    sampler = ImportanceSampler(sde, eps)
    if importance_sampling:
        # One scalar draw per key (`ImportanceSampler.icdf` is typed for scalars).
        ts = jax.vmap(sampler.sample)(jr.split(tkey, num_t))
    else:
        ts = jr.uniform(tkey, (num_t,), minval=eps, maxval=sde.T)
    ts = ts.astype(x.dtype)
    zs = jr.normal(zkey, (num_t, *x.shape), x.dtype)

    def integrand(t, z):
        # 1/2 w(t) [g^2 ||s + z / sigma||^2 - g^2 ||z / sigma||^2]
        #   = 1/2 w(t) g^2 / sigma^2 [||sigma s + z||^2 - ||z||^2]
        alpha, sigma = sde.marginal(t)
        residual = flow.scaled_score(t, alpha * x + sigma * z) + z
        difference = jnp.sum(residual**2) - jnp.sum(z**2)
        if importance_sampling:
            weight = sampler.Z
        else:
            weight = (sde.T - eps) * sde.diffusion_squared(t) / sigma**2
        return 0.5 * weight * difference

    values = jax.vmap(integrand)(ts, zs)
    score_part, variance = _mean_and_variance_of_mean(values)
    alpha_eps, sigma_eps = sde.marginal(eps)
    # -int_eps^T div f dt for a linear drift f = c(t) x, whose alpha_t = exp(int_0^t c).
    drift_part = -d * (jnp.log(alpha_T) - jnp.log(alpha_eps))
    diffusion_term = score_part + drift_part
    nfe = num_t

    if eps_correction:
        # -log q(x | x_eps) - H with x_eps = alpha x + sigma z: since
        # x - mu = -(sigma / alpha)(z + sigma s), this is
        # -D log alpha + 1/2 ||z + sigma s(eps, x_eps)||^2 - D / 2, and D = E||z||^2
        # (used per sample as a control variate).
        es = jr.normal(ekey, (num_eps_samples, *x.shape), x.dtype)

        def decoder_term(z):
            residual = flow.scaled_score(eps, alpha_eps * x + sigma_eps * z) + z
            return 0.5 * (jnp.sum(residual**2) - jnp.sum(z**2))

        decoder, decoder_variance = _mean_and_variance_of_mean(jax.vmap(decoder_term)(es))
        correction = decoder - d * jnp.log(alpha_eps)
        variance = variance + decoder_variance
        nfe = nfe + num_eps_samples
    else:
        correction = jnp.zeros((), x.dtype)

    total = jnp.where(ok, prior_term + diffusion_term + correction, jnp.nan)
    return NLLBoundResult(
        nll=total,
        prior_term=jnp.asarray(prior_term, x.dtype),
        diffusion_term=diffusion_term,
        eps_correction=correction,
        stderr=jnp.sqrt(variance),
        nfe=jnp.asarray(nfe),
        result=dfx.RESULTS.where(ok, dfx.RESULTS.successful, dfx.RESULTS.nonfinite_input),  # pyright: ignore[reportArgumentType]
        stats={"num_t": num_t, "num_eps_samples": num_eps_samples if eps_correction else 0},
    )
