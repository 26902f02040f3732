"""Sampling, encoding and decoding with the probability-flow ODE."""

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .._custom_types import Data, RealScalarLike
from .._flow import ScoreFlow
from .._likelihood import guard_nonfinite
from .._solver import solve_options, SolveOptions
from ._base import AbstractSampler
from ._result import SampleResult


class ProbabilityFlow(AbstractSampler):
    """Sampling by the probability-flow ODE `dx/dt = f(x, t) - 1/2 g(t)^2 s(t, x)` from
    `T` to `eps` (Song et al. ICLR 2021, Eq. (13)), with a diffrax solver: deterministic
    given the prior sample, and the map whose likelihood [`scoreflow_eqx.ode_nll`][]
    computes.

    **Arguments:**

    - `solver`: a diffrax solver (default `Dopri5`).
    - `stepsize_controller`: default `diffrax.PIDController(rtol=1e-5, atol=1e-5)` for
        adaptive solvers and `ConstantStepSize()` (with `dt0`) for fixed-step ones.
    - `dt0`: the first (or constant) step; `None` picks the first step of an adaptive
        solve by the Hairer-Norsett-Wanner rule (two evaluations, counted in `nfe`).
    - `max_steps`: the step budget.
    - `adjoint`: how to differentiate through the solve (any `diffrax.AbstractAdjoint`).
    - `progress_meter`: a diffrax progress meter for long solves.
    """

    solver: dfx.AbstractSolver = dfx.Dopri5()
    stepsize_controller: dfx.AbstractStepSizeController | None = None
    dt0: float | None = eqx.field(default=None, static=True)
    max_steps: int | None = eqx.field(default=4096, static=True)
    adjoint: dfx.AbstractAdjoint = dfx.RecursiveCheckpointAdjoint()
    progress_meter: dfx.AbstractProgressMeter = dfx.NoProgressMeter()

    def __check_init__(self):
        self.options(throw=True)

    def options(self, *, throw: bool) -> SolveOptions:
        return solve_options(
            solver=self.solver,
            stepsize_controller=self.stepsize_controller,
            rtol=None,
            atol=None,
            dt0=self.dt0,
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            throw=throw,
            progress_meter=self.progress_meter,
        )

    def sample(
        self, flow: ScoreFlow, x_T: Data, *, key: PRNGKeyArray | None = None, throw: bool
    ) -> SampleResult:
        return solve_flow(flow, x_T, flow.sde.T, flow.eps, self.options(throw=throw))


class FlowField(eqx.Module):
    """The probability-flow velocity `(t, x, args) -> f(x, t) - 1/2 g(t)^2 s(t, x)` as a
    Module, so that the flow's parameters are leaves of the diffrax term (as
    `diffrax.BacksolveAdjoint` needs)."""

    flow: ScoreFlow

    def __call__(self, t, x, args):
        return self.flow.sde.probability_flow(self.flow.score, t, x)


def solve_flow(
    flow: ScoreFlow, y0: Data, t0: RealScalarLike, t1: RealScalarLike, options: SolveOptions
) -> SampleResult:
    """Carry `y0` from `t0` to `t1` along the probability-flow ODE."""
    y0, ok = guard_nonfinite(y0, options.throw, "probability-flow solve")
    sol, nfe = options.solve(FlowField(flow), t0, t1, y0)
    assert sol.ys is not None
    x = jnp.where(ok, sol.ys[0], jnp.nan)
    result = dfx.RESULTS.where(ok, sol.result, dfx.RESULTS.nonfinite_input)  # pyright: ignore[reportArgumentType]
    return SampleResult(
        x=x, nfe=nfe, num_steps=sol.stats["num_steps"], result=result, stats=sol.stats
    )
