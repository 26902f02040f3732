"""Training objectives for [`scoreflow_eqx.train`][]: the (likelihood-weighted) denoising
score-matching loss, and the probability-flow ODE's negative log-likelihood itself,
differentiated through the solve (maximum-likelihood training of the continuous
normalizing flow)."""

import abc
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._custom_types import Scalar
from ._divergence import AbstractDivergence, as_divergence, Hutchinson
from ._flow import ScoreFlow
from ._likelihood import ode_nll_batched_with, ode_nll_with
from ._losses import check_weighting
from ._solver import resolve_controller, solve_options, SolveOptions


class AbstractObjective(eqx.Module):
    """What a training step minimises: `objective(flow, batch, *, key)`, a scalar (the
    mean over the batch of a per-example loss), differentiable in `flow`."""

    #: A short name for logs and run records.
    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def __call__(
        self, flow: ScoreFlow, batch: Float[Array, " batch *data"], *, key: PRNGKeyArray
    ) -> Scalar:
        """The mean loss of a batch of model-space examples."""


class DSMObjective(AbstractObjective):
    """Denoising score matching, `flow.loss` averaged over the batch (the default of
    [`scoreflow_eqx.train`][]): with likelihood weighting and importance sampling, an
    unbiased estimate of the Theorem 1 bound of Song et al. (2021), up to a constant.

    **Arguments:** `weighting` (`"likelihood"` or `"score_sde"`) and
    `importance_sampling`, as for [`scoreflow_eqx.ScoreFlow.loss`][].
    """

    weighting: str = eqx.field(default="likelihood", static=True)
    importance_sampling: bool = eqx.field(default=True, static=True)
    name: ClassVar[str] = "dsm"

    def __check_init__(self):
        check_weighting(self.weighting)

    def __call__(self, flow, batch, *, key):
        keys = jr.split(key, batch.shape[0])
        losses = jax.vmap(
            lambda x, k: flow.loss(
                x, key=k, weighting=self.weighting, importance_sampling=self.importance_sampling
            )
        )(batch, keys)
        return jnp.mean(losses)


class ODEObjective(AbstractObjective):
    """The negative log-likelihood of the probability-flow ODE, `-log p_ODE(x)`
    ([`scoreflow_eqx.ode_nll`][]), averaged over the batch and differentiated through
    the trace-augmented solve: maximum-likelihood training of the continuous normalizing
    flow itself, e.g. to fine-tune a flow trained by likelihood-weighted DSM (which
    bounds the SDE model's likelihood, not the ODE's; Song et al. 2021, Section 6).

    With [`scoreflow_eqx.Hutchinson`][] (the default) the loss and its gradient are
    unbiased estimates, one probe draw per example and step. Each step costs a solve and
    its adjoint: far more than a DSM step (see `benchmarks/`).

    **Arguments:**

    - `divergence`: the divergence estimator (default `Hutchinson()`).
    - `solver`, `stepsize_controller` (or `rtol`, `atol`), `dt0`, `max_steps`:
        the solve, as for `ode_nll` (default Dopri5, `rtol = atol = 1e-5`).
    - `adjoint`: how to differentiate the solve (default
        `diffrax.RecursiveCheckpointAdjoint()`; `diffrax.BacksolveAdjoint()` for memory).
    - `batched`: one solve of the whole batch with a shared step size (default; as
        [`scoreflow_eqx.ode_nll_batched`][]), or vmapped per-example solves.

    A failed solve (e.g. `max_steps` reached) gives a NaN loss, and `train` skips that
    update.

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

    divergence: AbstractDivergence
    solver: dfx.AbstractSolver
    stepsize_controller: dfx.AbstractStepSizeController
    dt0: float | None = eqx.field(static=True)
    max_steps: int | None = eqx.field(static=True)
    adjoint: dfx.AbstractAdjoint
    batched: bool = eqx.field(static=True)
    name: ClassVar[str] = "ode"

    def __init__(
        self,
        divergence: AbstractDivergence | str = Hutchinson(),
        *,
        solver: dfx.AbstractSolver = dfx.Dopri5(),
        stepsize_controller: dfx.AbstractStepSizeController | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        dt0: float | None = None,
        max_steps: int | None = 4096,
        adjoint: dfx.AbstractAdjoint = dfx.RecursiveCheckpointAdjoint(),
        batched: bool = True,
    ):
        self.divergence = as_divergence(divergence)
        self.solver = solver
        self.stepsize_controller = resolve_controller(stepsize_controller, rtol, atol)
        self.dt0 = dt0
        self.max_steps = max_steps
        self.adjoint = adjoint
        self.batched = batched

    def __check_init__(self):
        self.options()  # validates the solve options, the adjoint included

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

    def __call__(self, flow, batch, *, key):
        options, divergence = self.options(), self.divergence
        if self.batched:
            res = ode_nll_batched_with(flow, batch, divergence, options, key=key)
        else:
            keys = jr.split(key, batch.shape[0])
            res = jax.vmap(lambda x, k: ode_nll_with(flow, x, divergence, options, key=k))(
                batch, keys
            )
        return jnp.mean(res.nll)


OBJECTIVES: tuple[str, ...] = ("dsm", "ode")


def as_objective(
    objective: AbstractObjective | str | None, *, weighting: str, importance_sampling: bool
) -> AbstractObjective:
    """The objective for `objective`: an object as it is, `None` or `"dsm"` for
    `DSMObjective(weighting, importance_sampling)`, `"ode"` for `ODEObjective()`."""
    if objective is None or objective == "dsm":
        return DSMObjective(weighting=weighting, importance_sampling=importance_sampling)
    if objective == "ode":
        return ODEObjective()
    if isinstance(objective, AbstractObjective):
        return objective
    raise ValueError(
        "`objective` must be a training objective such as `sf.DSMObjective()` or "
        f"`sf.ODEObjective()`, or one of the shorthands {list(OBJECTIVES)}; got {objective!r}."
    )
