"""Exact likelihoods from the probability-flow ODE, with the trace-augmented state
`(x, delta)` solved by diffrax."""

import warnings

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from ._custom_types import Data
from ._divergence import AbstractDivergence, as_divergence, ExactTrace, Hutchinson
from ._flow import ScoreFlow
from ._solver import solve_options, SolveOptions


class ODENLLResult(eqx.Module):
    """The result of [`scoreflow_eqx.ode_nll`][] for one example (or, under `jax.vmap`,
    a batch of them: every field then gains a leading batch axis).

    **Fields:**

    - `nll`: `-log p_ODE(x)` in nats (the continuous density of the model-space data);
        NaN when the solve failed.
    - `z`: the latent `x(T)`.
    - `delta_logp`: `int_eps^T div h(t, x(t)) dt`, so that `log p(x) = prior_logp +
        delta_logp`.
    - `prior_logp`: `log prior(z)`.
    - `nfe`: the number of score-network evaluations of this solve (`6 * num_steps + 1`
        for Dopri5, plus 2 for choosing the first step when `dt0=None`).
    - `result`: a `diffrax.RESULTS` (check with `diffrax.is_successful`);
        `RESULTS.nonfinite_input` when `x` has NaN or inf entries.
    - `stats`: diffrax's statistics (`num_steps`, `num_accepted_steps`,
        `num_rejected_steps`, `max_steps`).
    """

    nll: Float[Array, "*batch"]
    z: Float[Array, "*batch_and_data"]
    delta_logp: Float[Array, "*batch"]
    prior_logp: Float[Array, "*batch"]
    nfe: Int[Array, "*batch"]
    result: dfx.RESULTS
    stats: dict


class AugmentedField(eqx.Module):
    """`(t, (x, delta), state) -> (h(t, x), div h(t, x))` of the probability-flow ODE
    `h = f - 1/2 g^2 s`, with `div h = div f - 1/2 g^2 div s`: the drift's divergence is
    exact, the score's is `divergence`'s estimate with its per-solve `state` (probes).

    A Module, so that the flow's parameters are leaves of the diffrax term, as
    `diffrax.BacksolveAdjoint` needs to differentiate them."""

    flow: ScoreFlow
    divergence: AbstractDivergence

    def __call__(self, t, y, state):
        x, _ = y
        flow = self.flow
        s, div_s = self.divergence.value_and_divergence(lambda x: flow.score(t, x), x, state)
        sde = flow.sde
        velocity = sde.probability_flow(lambda t, x: s, t, x)
        div_velocity = sde.drift_divergence(t, x) - 0.5 * sde.diffusion_squared(t) * div_s
        return velocity, div_velocity.astype(x.dtype)


class BatchedField(eqx.Module):
    """An [`AugmentedField`][] vmapped over a batch (probes per example when
    `state_axis=0`)."""

    field: AugmentedField
    state_axis: int | None = eqx.field(static=True)

    def __call__(self, t, y, state):
        return jax.vmap(self.field, in_axes=(None, 0, self.state_axis))(t, y, state)


def augmented_vector_field(flow: ScoreFlow, divergence: AbstractDivergence) -> AugmentedField:
    """The trace-augmented probability-flow vector field ([`AugmentedField`][])."""
    return AugmentedField(flow, divergence)


def check_example(x, name: str = "x") -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating-point example in model space, got dtype "
            f"{x.dtype}. Integer levels must be dequantized first (see `evaluate_bpd`)."
        )
    return x


def guard_nonfinite(x: Array, throw: bool, what: str) -> tuple[Array, Array]:
    """`(x to solve from, ok)`: with `throw`, a runtime error at once if `x` has NaN/inf
    entries; otherwise such an `x` is replaced by zeros (so that its solve ends quickly)
    and `ok` is False, to be reported as `RESULTS.nonfinite_input`."""
    ok = jnp.all(jnp.isfinite(x))
    if throw:
        x = eqx.error_if(x, ~ok, f"{what}: the input has NaN or inf entries.")
        return x, ok
    return jnp.where(ok, x, jnp.zeros_like(x)), ok


def _collect(flow, sol, nfe, ok, batched: bool) -> ODENLLResult:
    # `ok` is per example: a non-finite input fails its own NLL; `result` (shared by a
    # batched solve) reports it.
    (z,), (delta,) = sol.ys
    prior_logp = (jax.vmap(flow.sde.prior_logp) if batched else flow.sde.prior_logp)(z)
    result = dfx.RESULTS.where(jnp.all(ok), sol.result, dfx.RESULTS.nonfinite_input)  # pyright: ignore[reportArgumentType]
    good = dfx.is_successful(sol.result) & ok
    nll = jnp.where(good, -(prior_logp + delta), jnp.nan)
    return ODENLLResult(
        nll=nll,
        z=z,
        delta_logp=delta,
        prior_logp=prior_logp,
        nfe=jnp.broadcast_to(nfe, nll.shape),
        result=result,
        stats=sol.stats,
    )


_LEGACY = ("probe", "num_probes", "jacobian_mode", "chunk_size")


def legacy_divergence(divergence, legacy: dict) -> AbstractDivergence:
    """The estimator for `divergence`, with the deprecated keyword options of the
    previous API (`probe`, `num_probes`, `jacobian_mode`, `chunk_size`) folded in."""
    unknown = set(legacy) - set(_LEGACY)
    if unknown:
        raise TypeError(f"Unexpected keyword argument(s) {sorted(unknown)}.")
    divergence = as_divergence(divergence)
    if not legacy:
        return divergence
    warnings.warn(
        f"The keyword arguments {sorted(legacy)} are deprecated: they are options of the "
        "divergence estimator, e.g. `divergence=sf.Hutchinson(probe='gaussian', "
        "num_probes=2, mode='reverse')` or `divergence=sf.ExactTrace(chunk_size=8)`.",
        DeprecationWarning,
        stacklevel=3,
    )
    mode = legacy.get("jacobian_mode", divergence.mode)  # pyright: ignore
    if isinstance(divergence, ExactTrace):
        return ExactTrace(mode=mode, chunk_size=legacy.get("chunk_size", divergence.chunk_size))
    if isinstance(divergence, Hutchinson):
        return Hutchinson(
            probe=legacy.get("probe", divergence.probe),
            num_probes=legacy.get("num_probes", divergence.num_probes),
            mode=mode,
        )
    raise TypeError(f"{sorted(legacy)} do not apply to {type(divergence).__name__}.")


def ode_nll(
    flow: ScoreFlow,
    x: Data,
    *,
    key: PRNGKeyArray | None = None,
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
    **deprecated,
) -> ODENLLResult:
    """Negative log-likelihood of one example under the probability-flow ODE (a
    continuous normalizing flow), in nats.

    Solves `dx/dt = h(t, x) = f(x, t) - 1/2 g(t)^2 s(t, x)` from `flow.eps` to `T`
    together with `d delta/dt = div h(t, x)` (one pytree state, no flattening), then
    `log p_ODE(x) = log prior(x(T)) + delta(T)`. The drift's divergence is exact; the
    score's is estimated by `divergence` (its probes drawn once per solve). Under
    `jax.vmap` every example keeps its own adaptive steps and its own NFE. Every argument
    is differentiable through the solve (`adjoint`).

    **Arguments:**

    - `flow`: the [`scoreflow_eqx.ScoreFlow`][].
    - `x`: one example in model space (no batch axis); for discrete data it must already
        be dequantized ([`scoreflow_eqx.evaluate_bpd`][] does that for whole datasets).
    - `key`: PRNG key for the estimator's probes (keyword-only; not needed by
        `ExactTrace`).
    - `divergence`: [`scoreflow_eqx.Hutchinson`][]`()` (default: one Jacobian-vector
        product per evaluation and probe) or [`scoreflow_eqx.ExactTrace`][]`()` (`D` of
        them); the strings `"hutchinson"` and `"exact"` are shorthands for these defaults.
    - `solver`: an explicit Runge-Kutta diffrax solver; `Dopri5` by default (the RK45 of
        the paper).
    - `stepsize_controller`: any diffrax step-size controller; default
        `diffrax.PIDController(rtol, atol)`.
    - `rtol`, `atol`: the tolerances of the default controller (each `1e-5`, as in the
        paper); not together with `stepsize_controller`.
    - `dt0`: the initial step; `None` selects it by the rule of Hairer, Norsett and
        Wanner (as scipy's RK45), at the cost of two more evaluations (counted in `nfe`).
    - `max_steps`: the step budget of the solve (`None`: unbounded, which needs an
        adjoint that does not checkpoint a fixed number of steps).
    - `adjoint`: how to differentiate through the solve: any `diffrax.AbstractAdjoint`
        (default `RecursiveCheckpointAdjoint()`; `BacksolveAdjoint()` for O(1) memory, with
        approximate gradients; `ImplicitAdjoint()`, for steady states, is refused). The
        gradient with respect to `x` of the exact-trace NLL is `-grad log p_ODE(x)`.
    - `throw`: raise if the solve fails (as `diffrax.diffeqsolve`); with `throw=False` a
        failure is reported in `result` and `nll` is NaN (use it under `jax.vmap`).
    - `progress_meter`: a diffrax progress meter for long solves.

    **Returns:** an [`scoreflow_eqx.ODENLLResult`][].

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
    divergence = legacy_divergence(divergence, deprecated)
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
    return ode_nll_with(flow, check_example(x), divergence, options, key=key)


def ode_nll_with(
    flow: ScoreFlow,
    x: Data,
    divergence: AbstractDivergence,
    options: SolveOptions,
    *,
    key: PRNGKeyArray | None,
) -> ODENLLResult:
    """[`scoreflow_eqx.ode_nll`][] with validated arguments."""
    x, ok = guard_nonfinite(x, options.throw, "ode_nll")
    state = divergence.init(x, key=key)
    y0 = (x, jnp.zeros((), x.dtype))
    vector_field = augmented_vector_field(flow, divergence)
    sol, nfe = options.solve(vector_field, flow.eps, flow.sde.T, y0, state)
    return _collect(flow, sol, nfe, ok, batched=False)


def _is_key_batch(key, batch: int) -> bool:
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    return typed and key.shape == (batch,)


def ode_nll_batched(
    flow: ScoreFlow,
    xs: Float[Array, " batch *data"],
    *,
    key: PRNGKeyArray | Key[Array, " batch"] | None = None,
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
    **deprecated,
) -> ODENLLResult:
    """[`scoreflow_eqx.ode_nll`][] for a whole batch as ONE ODE with one shared step
    size, as the paper's released code does (its error norm runs over the whole batch).

    Same arguments as `ode_nll`, except that `xs` carries a leading batch axis and
    `key` may be one key or one key per example (example `i` then gets the probes that
    `ode_nll` draws from `key[i]`). The returned fields are per example, except `nfe`,
    `result` and `stats`, which the batch shares (`nfe` is broadcast to the batch
    shape; `result` reports a non-finite input of any example, whose `nll` is NaN). The
    error control runs over the whole batch (RMS), so each example's result depends
    slightly on its batch-mates. On CPU this was faster than `jax.vmap(ode_nll)` in every
    batched case of `benchmarks/nfe_per_nll.py`: the vmapped solves run until the
    slowest example is done, at a higher cost per step.
    """
    divergence = legacy_divergence(divergence, deprecated)
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
    xs = check_example(xs, "xs")
    if xs.ndim < 1 or xs.shape[0] < 1:
        raise ValueError(f"`xs` must have a leading batch axis, got shape {xs.shape}.")
    return ode_nll_batched_with(flow, xs, divergence, options, key=key)


def ode_nll_batched_with(
    flow: ScoreFlow,
    xs: Float[Array, " batch *data"],
    divergence: AbstractDivergence,
    options: SolveOptions,
    *,
    key: PRNGKeyArray | Key[Array, " batch"] | None,
) -> ODENLLResult:
    """[`scoreflow_eqx.ode_nll_batched`][] with validated arguments."""
    batch = xs.shape[0]
    xs, ok = jax.vmap(lambda x: guard_nonfinite(x, options.throw, "ode_nll_batched"))(xs)
    if divergence.needs_key:
        if key is None:
            divergence.init(xs[0], key=None)  # raises the estimator's own error
        assert key is not None
        keys = key if _is_key_batch(key, batch) else jr.split(key, batch)
        state = jax.vmap(lambda x, k: divergence.init(x, key=k))(xs, keys)
        state_axis = 0
    else:
        state, state_axis = divergence.init(xs[0], key=None), None
    vector_field = BatchedField(AugmentedField(flow, divergence), state_axis)
    y0 = (xs, jnp.zeros((batch,), xs.dtype))
    sol, nfe = options.solve(vector_field, flow.eps, flow.sde.T, y0, state)
    return _collect(flow, sol, nfe, ok, batched=True)
