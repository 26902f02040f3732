"""Exact likelihoods from the probability-flow ODE, with the trace-augmented state
`(x, delta)` solved by diffrax."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from ._custom_types import Data
from ._divergence import (
    check_jacobian_mode,
    check_probe,
    sample_probes,
    value_and_exact_divergence,
    value_and_hutchinson_divergence,
)
from ._flow import ScoreFlow
from ._solver import (
    evaluations_per_step,
    INITIAL_STEP_EVALUATIONS,
    initial_step_size,
    num_function_evaluations,
)


DIVERGENCES: tuple[str, ...] = ("exact", "hutchinson")


def check_divergence(divergence: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {divergence!r}; valid ones are {list(DIVERGENCES)}.")


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
    - `result`: a `diffrax.RESULTS` (check with `diffrax.is_successful`).
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


def _augmented_vector_field(flow: ScoreFlow, divergence: str, jacobian_mode: str, chunk_size):
    # d(x, delta)/dt = (h(t, x), div h(t, x)) with h = f - 1/2 g^2 s, and
    # div h = div f - 1/2 g^2 div s: the drift's divergence is exact, the score's is
    # exact or Hutchinson's estimate with the probes carried in `args`.
    def vector_field(t, y, probes):
        x, _ = y

        def score(x):
            return flow.score(t, x)

        if divergence == "exact":
            s, div_s = value_and_exact_divergence(
                score, x, mode=jacobian_mode, chunk_size=chunk_size
            )
        else:
            s, div_s = value_and_hutchinson_divergence(score, x, probes, mode=jacobian_mode)
        sde = flow.sde
        velocity = sde.probability_flow(lambda t, x: s, t, x)
        div_velocity = sde.drift_divergence(t, x) - 0.5 * sde.diffusion_squared(t) * div_s
        return velocity, div_velocity.astype(x.dtype)

    return vector_field


def _is_raw_key(key) -> bool:
    # A legacy uint32 key has shape (2,); typed keys have a key dtype.
    return not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _check_options(divergence, probe, num_probes, jacobian_mode, key):
    check_divergence(divergence)
    check_probe(probe)
    check_jacobian_mode(jacobian_mode)
    if num_probes < 1:
        raise ValueError(f"`num_probes` must be a positive integer, got {num_probes!r}.")
    if divergence == "hutchinson" and key is None:
        raise ValueError(
            "`divergence='hutchinson'` draws random probes: pass `key=`, or use "
            "`divergence='exact'`."
        )


def _solve(
    flow, y0, probes, vector_field, solver, *, batched: bool, **solve_options
) -> "ODENLLResult":
    # One diffrax solve of the augmented state from eps to T, and its bookkeeping.
    rtol, atol = solve_options.pop("rtol"), solve_options.pop("atol")
    controller = dfx.PIDController(rtol=rtol, atol=atol)
    dt0 = solve_options.pop("dt0")
    extra_evaluations = 0
    if dt0 is None:
        dt0 = initial_step_size(vector_field, solver, controller, flow.eps, flow.sde.T, y0, probes)
        extra_evaluations = INITIAL_STEP_EVALUATIONS
    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        solver,
        t0=flow.eps,
        t1=flow.sde.T,
        dt0=dt0,
        y0=y0,
        args=probes,
        stepsize_controller=controller,
        **solve_options,
    )
    (z,), (delta,) = sol.ys
    prior_logp = (jax.vmap(flow.sde.prior_logp) if batched else flow.sde.prior_logp)(z)
    ok = dfx.is_successful(sol.result)
    nll = jnp.where(ok, -(prior_logp + delta), jnp.nan)
    nfe = num_function_evaluations(solver, sol.stats["num_steps"]) + extra_evaluations
    nfe = jnp.broadcast_to(nfe, nll.shape)
    return ODENLLResult(
        nll=nll,
        z=z,
        delta_logp=delta,
        prior_logp=prior_logp,
        nfe=nfe,
        result=sol.result,
        stats=sol.stats,
    )


def ode_nll(
    flow: ScoreFlow,
    x: Data,
    *,
    key: PRNGKeyArray | None = None,
    divergence: str = "hutchinson",
    probe: str = "rademacher",
    num_probes: int = 1,
    jacobian_mode: str = "forward",
    chunk_size: int | None = None,
    solver: dfx.AbstractSolver = dfx.Dopri5(),
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dt0: float | None = None,
    max_steps: int | None = 4096,
    throw: bool = False,
    progress_meter: dfx.AbstractProgressMeter = dfx.NoProgressMeter(),
) -> ODENLLResult:
    """Negative log-likelihood of one example under the probability-flow ODE (a
    continuous normalizing flow), in nats.

    Solves `dx/dt = h(t, x) = f(x, t) - 1/2 g(t)^2 s(t, x)` from `flow.eps` to `T`
    together with `d delta/dt = div h(t, x)` (one pytree state, no flattening), then
    `log p_ODE(x) = log prior(x(T)) + delta(T)`. The drift's divergence is exact; the
    score's is the exact trace or Hutchinson's estimate with probes drawn once per
    solve. Under `jax.vmap` every example keeps its own adaptive steps and its own NFE.

    **Arguments:**

    - `flow`: the [`scoreflow_eqx.ScoreFlow`][].
    - `x`: one example in model space (no batch axis); for discrete data it must already
        be dequantized ([`scoreflow_eqx.evaluate_bpd`][] does that for whole datasets).
    - `key`: PRNG key for the Hutchinson probes (keyword-only; unused by `"exact"`).
    - `divergence`: `"hutchinson"` (default; one extra VJP/JVP per evaluation and probe)
        or `"exact"` (`D` of them, chunked by `chunk_size`).
    - `probe`: `"rademacher"` or `"gaussian"` Hutchinson probes.
    - `num_probes`: the number of probes averaged at each evaluation.
    - `jacobian_mode`: `"forward"` (default: Jacobian-vector products) or `"reverse"`
        (vector-Jacobian products, as the paper's released code). Forward mode was
        never slower in `benchmarks/nfe_per_nll.py` and several times faster for
        convolutional nets on CPU, whose reverse-mode convolutions are slow inside
        XLA loops; it also stores no activations.
    - `chunk_size`: for `"exact"`, how many basis vectors are vmapped at once.
    - `solver`: an explicit diffrax solver; `Dopri5` by default (the RK45 of the paper).
    - `rtol`, `atol`: tolerances of the `diffrax.PIDController` (1e-5, as in the paper).
    - `dt0`: the initial step; `None` selects it by the rule of Hairer, Norsett and
        Wanner (as scipy's RK45), at the cost of two more evaluations (counted in `nfe`).
    - `max_steps`: the step budget of the solve.
    - `throw`: raise if the solve fails; otherwise a failure is reported in `result` and
        `nll` is NaN.
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
    _check_options(divergence, probe, num_probes, jacobian_mode, key)
    evaluations_per_step(solver)  # refuse solvers whose NFE we cannot count, early
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            "`x` must be a floating-point example in model space, got dtype "
            f"{x.dtype}. Integer levels must be dequantized first (see `evaluate_bpd`)."
        )
    if divergence == "hutchinson":
        probes = sample_probes(key, x.shape, x.dtype, probe=probe, num_probes=num_probes)
    else:
        probes = None
    vector_field = _augmented_vector_field(flow, divergence, jacobian_mode, chunk_size)
    y0 = (x, jnp.zeros((), x.dtype))
    return _solve(
        flow,
        y0,
        probes,
        vector_field,
        solver,
        batched=False,
        rtol=rtol,
        atol=atol,
        dt0=dt0,
        max_steps=max_steps,
        throw=throw,
        progress_meter=progress_meter,
    )


def ode_nll_batched(
    flow: ScoreFlow,
    xs: Float[Array, " batch *data"],
    *,
    key: PRNGKeyArray | Key[Array, " batch"] | None = None,
    divergence: str = "hutchinson",
    probe: str = "rademacher",
    num_probes: int = 1,
    jacobian_mode: str = "forward",
    chunk_size: int | None = None,
    solver: dfx.AbstractSolver = dfx.Dopri5(),
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dt0: float | None = None,
    max_steps: int | None = 4096,
    throw: bool = False,
    progress_meter: dfx.AbstractProgressMeter = dfx.NoProgressMeter(),
) -> ODENLLResult:
    """[`scoreflow_eqx.ode_nll`][] for a whole batch as ONE ODE with one shared step
    size, as the paper's released code does (its error norm runs over the whole batch).

    Same arguments as `ode_nll`, except that `xs` carries a leading batch axis and
    `key` may be one key or one key per example (example `i` then gets the probes that
    `ode_nll` draws from `key[i]`). The returned fields are per example, except `nfe`,
    `result` and `stats`, which the batch shares (`nfe` is broadcast to the batch
    shape). The error control runs over the whole batch (RMS), so each example's result
    depends slightly on its batch-mates. On CPU this was faster than
    `jax.vmap(ode_nll)` in every batched case of `benchmarks/nfe_per_nll.py`: the
    vmapped solves run until the slowest example is done, at a higher cost per step.
    """
    _check_options(divergence, probe, num_probes, jacobian_mode, key)
    evaluations_per_step(solver)  # refuse solvers whose NFE we cannot count, early
    xs = jnp.asarray(xs)
    batch = xs.shape[0]
    if divergence == "hutchinson":
        probes = jax.vmap(
            lambda k: sample_probes(k, xs.shape[1:], xs.dtype, probe=probe, num_probes=num_probes)
        )(key if jnp.ndim(key) == 1 and not _is_raw_key(key) else jr.split(key, batch))
    else:
        probes = None
    single = _augmented_vector_field(flow, divergence, jacobian_mode, chunk_size)

    def vector_field(t, y, probes):
        return jax.vmap(single, in_axes=(None, 0, 0 if probes is not None else None))(t, y, probes)

    y0 = (xs, jnp.zeros((batch,), xs.dtype))
    return _solve(
        flow,
        y0,
        probes,
        vector_field,
        solver,
        batched=True,
        rtol=rtol,
        atol=atol,
        dt0=dt0,
        max_steps=max_steps,
        throw=throw,
        progress_meter=progress_meter,
    )
