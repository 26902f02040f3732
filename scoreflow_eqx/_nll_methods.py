"""Likelihood methods for whole datasets: the probability-flow ODE and the Theorem 3
bound, as objects carrying their own options (passed as `method=` to
[`scoreflow_eqx.evaluate_bpd`][])."""

import abc
import warnings
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._bound import check_bound_options, nll_bound
from ._divergence import AbstractDivergence, as_divergence, Hutchinson
from ._flow import ScoreFlow
from ._likelihood import legacy_divergence, ode_nll_batched_with, ode_nll_with
from ._solver import DEFAULT_TOLERANCE, solve_options, SolveOptions


class AbstractLikelihoodMethod(eqx.Module):
    """How [`scoreflow_eqx.evaluate_bpd`][] computes the NLL of a batch of model-space
    examples: `batch_nll(flow, xs, keys) -> (nll, nfe, failed)`, each shaped `(batch,)`."""

    #: The method's short name (`"ode"`, `"bound"`), used in reports.
    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def batch_nll(
        self,
        flow: ScoreFlow,
        xs: Float[Array, " batch *data"],
        keys: PRNGKeyArray,
    ) -> tuple[Float[Array, " batch"], Int[Array, " batch"], Bool[Array, " batch"]]:
        """NLL in nats, NFE and failure flags of every example (jit-compatible)."""


class ODELikelihood(AbstractLikelihoodMethod):
    """The exact likelihood of the probability-flow ODE ([`scoreflow_eqx.ode_nll`][]).

    **Arguments:**

    - `divergence`: the divergence estimator (default [`scoreflow_eqx.Hutchinson`][]`()`;
        a shorthand string is accepted).
    - `solver`, `stepsize_controller`, `dt0`, `max_steps`, `adjoint`: as for `ode_nll`
        (default Dopri5 with `diffrax.PIDController(rtol=1e-5, atol=1e-5)`).
    - `batched`: `True` (default): one solve of the whole batch with a shared step size
        and RMS error control over the batch, as the paper's released code
        ([`scoreflow_eqx.ode_nll_batched`][]; faster on CPU in every batched case of
        `benchmarks/nfe_per_nll.py`, since vmapped solves run until their slowest example
        is done); `False`: vmapped per-example solves, each with its own steps and NFE.
    """

    divergence: AbstractDivergence = eqx.field(default=Hutchinson(), converter=as_divergence)
    solver: dfx.AbstractSolver = dfx.Dopri5()
    stepsize_controller: dfx.AbstractStepSizeController = dfx.PIDController(
        rtol=DEFAULT_TOLERANCE, atol=DEFAULT_TOLERANCE
    )
    dt0: float | None = eqx.field(default=None, static=True)
    max_steps: int | None = eqx.field(default=4096, static=True)
    adjoint: dfx.AbstractAdjoint = dfx.RecursiveCheckpointAdjoint()
    batched: bool = eqx.field(default=True, static=True)
    name: ClassVar[str] = "ode"

    def __check_init__(self):
        self.options()  # validates the solve options

    def options(self) -> SolveOptions:
        return solve_options(
            solver=self.solver,
            stepsize_controller=self.stepsize_controller,
            rtol=None,
            atol=None,
            dt0=self.dt0,
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            throw=False,
            progress_meter=dfx.NoProgressMeter(),
        )

    def batch_nll(self, flow, xs, keys):
        # A failed solve leaves NaN in `nll` (for a batched solve, in every example).
        options, divergence = self.options(), self.divergence
        if self.batched:
            res = ode_nll_batched_with(flow, xs, divergence, options, key=keys)
        else:
            res = jax.vmap(lambda x, k: ode_nll_with(flow, x, divergence, options, key=k))(xs, keys)
        return res.nll, res.nfe, ~jnp.isfinite(res.nll)


class BoundLikelihood(AbstractLikelihoodMethod):
    """The Theorem 3 upper bound with the small-time correction
    ([`scoreflow_eqx.nll_bound`][]); an upper bound on the SDE model's NLL, not the ODE's.

    **Arguments:** `num_t`, `importance_sampling`, `eps_correction`, `num_eps_samples`: as
    for `nll_bound`.
    """

    num_t: int = eqx.field(default=1000, static=True)
    importance_sampling: bool = eqx.field(default=True, static=True)
    eps_correction: bool = eqx.field(default=True, static=True)
    num_eps_samples: int = eqx.field(default=16, static=True)
    name: ClassVar[str] = "bound"

    def __check_init__(self):
        check_bound_options(self.num_t, self.eps_correction, self.num_eps_samples)

    def batch_nll(self, flow, xs, keys):
        def one(x, k):
            return nll_bound(
                flow,
                x,
                key=k,
                num_t=self.num_t,
                importance_sampling=self.importance_sampling,
                eps_correction=self.eps_correction,
                num_eps_samples=self.num_eps_samples,
            )

        res = jax.vmap(one)(xs, keys)
        return res.nll, res.nfe, ~jnp.isfinite(res.nll)


METHODS: dict[str, type[AbstractLikelihoodMethod]] = {
    "ode": ODELikelihood,
    "bound": BoundLikelihood,
}

_ODE_KEYWORDS = ("solver", "stepsize_controller", "dt0", "max_steps", "adjoint")


def _legacy_ode(kwargs: dict, solve_mode: str | None) -> ODELikelihood:
    kwargs = dict(kwargs)
    legacy = {
        k: kwargs.pop(k)
        for k in ("probe", "num_probes", "jacobian_mode", "chunk_size")
        if k in kwargs
    }
    divergence = legacy_divergence(kwargs.pop("divergence", Hutchinson()), legacy)
    rtol, atol = kwargs.pop("rtol", None), kwargs.pop("atol", None)
    if rtol is not None or atol is not None:
        if "stepsize_controller" in kwargs:
            raise ValueError("Pass either `stepsize_controller` or `rtol`/`atol`, not both.")
        rtol = DEFAULT_TOLERANCE if rtol is None else rtol
        atol = DEFAULT_TOLERANCE if atol is None else atol
        kwargs["stepsize_controller"] = dfx.PIDController(rtol=rtol, atol=atol)
    unknown = set(kwargs) - set(_ODE_KEYWORDS)
    if unknown:
        raise TypeError(f"Unexpected keyword argument(s) for method='ode': {sorted(unknown)}.")
    if solve_mode is not None:
        if solve_mode not in ("batched", "per_example"):
            raise ValueError(
                f"Unknown solve_mode {solve_mode!r}; valid modes are ['batched', 'per_example']."
            )
        kwargs["batched"] = solve_mode == "batched"
    return ODELikelihood(divergence=divergence, **kwargs)


def as_method(
    method: AbstractLikelihoodMethod | str, kwargs: dict, solve_mode: str | None = None
) -> AbstractLikelihoodMethod:
    """The likelihood method for `method`: an object as it is, or the shorthand `"ode"` /
    `"bound"` built from the deprecated keyword options of the previous API."""
    if isinstance(method, AbstractLikelihoodMethod):
        if kwargs or solve_mode is not None:
            raise ValueError(
                f"Options {sorted(kwargs) + (['solve_mode'] if solve_mode else [])} belong on "
                f"the method object ({type(method).__name__}(...)), not on evaluate_bpd."
            )
        return method
    if not (isinstance(method, str) and method in METHODS):
        raise ValueError(
            f"`method` must be a likelihood method such as `sf.ODELikelihood()` or "
            f"`sf.BoundLikelihood()`, or one of the shorthands {list(METHODS)}; got {method!r}."
        )
    if kwargs or solve_mode is not None:
        warnings.warn(
            "Passing method options to evaluate_bpd as keyword arguments is deprecated: "
            "pass `method=sf.ODELikelihood(divergence=..., stepsize_controller=..., "
            "batched=...)` or `method=sf.BoundLikelihood(num_t=...)`.",
            DeprecationWarning,
            stacklevel=3,
        )
    if method == "ode":
        return _legacy_ode(kwargs, solve_mode)
    if solve_mode is not None:
        raise ValueError("`solve_mode` applies to method='ode' only.")
    return BoundLikelihood(**kwargs)
