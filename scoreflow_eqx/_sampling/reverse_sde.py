"""Sampling with the reverse-time SDE, solved by diffrax."""

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .._custom_types import Data
from .._flow import ScoreFlow
from .._solver import check_adjoint, evaluations_per_step, num_function_evaluations
from ._base import AbstractSampler
from ._result import SampleResult


def check_num_steps(num_steps, name: str = "num_steps") -> None:
    if not (isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 1):
        raise ValueError(f"`{name}` must be a positive integer, got {num_steps!r}.")


def _backward_grid(adjoint: dfx.AbstractAdjoint, ts) -> dfx.AbstractAdjoint:
    # `BacksolveAdjoint` solves the adjoint SDE from `eps` back up to `T`, by default
    # with the forward solve's `StepTo` controller, whose grid then runs the wrong way.
    # Give it the same grid for the backward solve (unless the user chose a backward
    # controller). Diffrax solves a solve with t0 > t1 in negated time, in which the
    # backward solve runs from -eps down to -T.
    if isinstance(adjoint, dfx.BacksolveAdjoint) and "stepsize_controller" not in adjoint.kwargs:
        backward = dfx.StepTo(ts=-ts[::-1])
        return dfx.BacksolveAdjoint(**adjoint.kwargs, stepsize_controller=backward)
    return adjoint


class ReverseSDE(AbstractSampler):
    """Sampling by the reverse-time SDE `dx = [f - g^2 s] dt + g dw_bar`
    (Anderson 1982) from `T` to `eps`, built by `flow.sde.reverse_terms` (a diffrax
    `MultiTerm` of an `ODETerm` and a `ControlTerm` with a diagonal lineax operator,
    driven by a `VirtualBrownianTree`), with `num_steps` equal steps of `solver`.

    **Arguments:**

    - `solver`: default `diffrax.Euler()` (Euler-Maruyama); `diffrax.Heun()` is a
        second-order alternative, valid because the noise is additive (Ito and
        Stratonovich agree).
    - `num_steps`: the number of equal time steps.
    - `adjoint`: how to differentiate through the solve (any `diffrax.AbstractAdjoint`;
        `diffrax.BacksolveAdjoint()` needs a Stratonovich solver such as `diffrax.Heun()`,
        and steps backwards on the same grid).
    - `progress_meter`: a diffrax progress meter for long solves.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{song2021scorebased,
            title={Score-Based Generative Modeling through Stochastic
                   Differential Equations},
            author={Song, Yang and Sohl-Dickstein, Jascha and Kingma, Diederik P
                    and Kumar, Abhishek and Ermon, Stefano and Poole, Ben},
            booktitle={ICLR},
            year={2021}
        }
        ```
    """

    solver: dfx.AbstractSolver = dfx.Euler()
    num_steps: int = eqx.field(default=1000, static=True)
    adjoint: dfx.AbstractAdjoint = dfx.RecursiveCheckpointAdjoint()
    progress_meter: dfx.AbstractProgressMeter = dfx.NoProgressMeter()

    def __check_init__(self):
        check_num_steps(self.num_steps)
        check_adjoint(self.adjoint, solver=self.solver, sde=True)
        evaluations_per_step(self.solver)

    def sample(self, flow: ScoreFlow, x_T: Data, *, key: PRNGKeyArray, throw: bool) -> SampleResult:
        sde, eps = flow.sde, flow.eps
        ts = jnp.linspace(sde.T, eps, self.num_steps + 1)
        dt = (sde.T - eps) / self.num_steps
        terms = sde.reverse_terms(flow.score, x_T, key=key, t0=eps, tol=dt / 2)
        sol = dfx.diffeqsolve(
            terms,
            self.solver,
            sde.T,
            eps,
            None,
            x_T,
            stepsize_controller=dfx.StepTo(ts=ts),
            max_steps=self.num_steps,
            adjoint=_backward_grid(self.adjoint, ts),
            throw=throw,
            progress_meter=self.progress_meter,
        )
        assert sol.ys is not None
        steps = sol.stats["num_steps"]
        return SampleResult(
            x=sol.ys[0],
            nfe=num_function_evaluations(self.solver, steps),
            num_steps=steps,
            result=sol.result,
            stats=sol.stats,
        )
