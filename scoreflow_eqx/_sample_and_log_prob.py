"""Samples together with their log-density: one trace-augmented probability-flow solve
from the prior, as a continuous normalizing flow samples (flowjax's
`sample_and_log_prob`)."""

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._custom_types import Data
from ._divergence import AbstractDivergence, as_divergence, Hutchinson
from ._flow import ScoreFlow
from ._likelihood import AugmentedField
from ._sampling._api import resolve_shape
from ._solver import solve_options


class SampleAndLogProbResult(eqx.Module):
    """The result of [`scoreflow_eqx.sample_and_log_prob`][] for one sample (under
    `jax.vmap` every field gains a leading batch axis).

    **Fields:**

    - `x`: the sample at time `eps`.
    - `log_prob`: `log p_ODE(x)`, the log-density of the probability-flow model at `x`
        (nats; NaN if the solve failed): the same quantity as `-ode_nll(flow, x).nll`.
    - `z`: the prior sample at time `T` the solve started from.
    - `prior_logp`: `log prior(z)`.
    - `delta_logp`: `int_eps^T div h(t, x(t)) dt`, so that `log_prob = prior_logp +
        delta_logp`.
    - `nfe`: score-network evaluations (`6 * num_steps + 1` for Dopri5, plus 2 when
        `dt0=None`).
    - `result`: a `diffrax.RESULTS`.
    - `stats`: diffrax's statistics of the solve.
    """

    x: Data
    log_prob: Float[Array, ""]
    z: Data
    prior_logp: Float[Array, ""]
    delta_logp: Float[Array, ""]
    nfe: Int[Array, ""]
    result: dfx.RESULTS
    stats: dict


@eqx.filter_jit
def sample_and_log_prob(
    flow: ScoreFlow,
    shape: tuple[int, ...] | None = None,
    *,
    key: PRNGKeyArray,
    divergence: AbstractDivergence | str = Hutchinson(),
    solver: dfx.AbstractSolver = dfx.Dopri5(),
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    dt0: float | None = None,
    max_steps: int | None = 4096,
    adjoint: dfx.AbstractAdjoint = dfx.RecursiveCheckpointAdjoint(),
    throw: bool = True,
    progress_meter: dfx.AbstractProgressMeter = dfx.NoProgressMeter(),
) -> SampleAndLogProbResult:
    """Draw ONE sample of the probability-flow model and its log-density in one solve
    (`jax.vmap` over keys for many).

    Draws `z` from the prior and solves the probability-flow ODE `dx/dt = h(t, x)`
    from `T` down to `eps` together with `d delta/dt = div h(t, x)`; then `log
    p_ODE(x(eps)) = log prior(z) - delta`, with `delta` accumulated from `T` to `eps`
    (the instantaneous change of variables of a continuous normalizing flow, run in the
    sampling direction). This costs one solve, where `sample` followed by `ode_nll`
    costs two; both give the same density up to the solver tolerance.

    **Arguments:**

    - `flow`: the [`scoreflow_eqx.ScoreFlow`][].
    - `shape`: the shape of one example; `None` uses `flow.net.data_shape`.
    - `key`: PRNG key (keyword-only) for the prior sample and the divergence probes.
    - `divergence`: [`scoreflow_eqx.Hutchinson`][]`()` (default; an unbiased estimate of
        `log_prob`) or [`scoreflow_eqx.ExactTrace`][]`()` (exact, `D` products per
        evaluation); shorthand strings `"hutchinson"`, `"exact"`.
    - `solver`, `stepsize_controller`, `rtol`, `atol`, `dt0`, `max_steps`, `adjoint`,
        `throw`, `progress_meter`: the solve, as for [`scoreflow_eqx.ode_nll`][]
        (Dopri5, `rtol = atol = 1e-5`, `RecursiveCheckpointAdjoint()`). Under `jax.vmap`
        pass `throw=False`.

    **Returns:** a [`scoreflow_eqx.SampleAndLogProbResult`][] (`x`, `log_prob`, `nfe`,
    `result`, `stats`, ...). Differentiable with respect to the flow's parameters by
    `adjoint`.

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
    divergence = as_divergence(divergence)
    options = solve_options(
        solver=solver,
        stepsize_controller=stepsize_controller,
        rtol=rtol,
        atol=atol,
        dt0=dt0,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=throw,
        progress_meter=progress_meter,
    )
    shape = resolve_shape(flow, shape)
    pkey, dkey = jr.split(key)
    z = flow.sde.prior_sample(pkey, shape)
    state = divergence.init(z, key=dkey)
    y0 = (z, jnp.zeros((), z.dtype))
    sol, nfe = options.solve(AugmentedField(flow, divergence), flow.sde.T, flow.eps, y0, state)
    assert sol.ys is not None
    (x,), (delta,) = sol.ys
    prior_logp = flow.sde.prior_logp(z)
    ok = dfx.is_successful(sol.result)
    return SampleAndLogProbResult(
        x=x,
        log_prob=jnp.where(ok, prior_logp - delta, jnp.nan),
        z=z,
        prior_logp=prior_logp,
        delta_logp=-delta,
        nfe=nfe,
        result=sol.result,
        stats=sol.stats,
    )
