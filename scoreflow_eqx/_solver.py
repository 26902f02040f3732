"""Diffrax solve helpers shared by every solve of the package: one vocabulary
(`solver=`, `stepsize_controller=`, `dt0=`, `max_steps=`, `adjoint=`, `throw=`), the count of
function evaluations of a solve, and the choice of the first step of an adaptive one."""

import math
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Int, PyTree

from ._custom_types import RealScalarLike, Scalar


#: The tolerance of adaptive solves when neither `stepsize_controller` nor `rtol`/`atol`
#: are given (the paper's RK45 setting).
DEFAULT_TOLERANCE = 1e-5

# Vector-field evaluations of `initial_step_size` (at t0 and at one trial point).
INITIAL_STEP_EVALUATIONS = 2


def evaluations_per_step(solver: dfx.AbstractSolver) -> tuple[int, int]:
    """`(per_step, initial)` such that a solve of `num_steps` steps (accepted and rejected)
    evaluates the vector field `per_step * num_steps + initial` times.

    Explicit Runge-Kutta methods with `s` stages take `s` evaluations per step, or `s - 1`
    plus one initial evaluation when they are first-same-as-last (FSAL): Dopri5 and Tsit5
    give `6 * num_steps + 1`. Euler takes one per step. Other solvers (implicit ones, whose
    cost depends on their root finder) are refused.
    """
    if isinstance(solver, dfx.AbstractERK):
        tableau = solver.tableau
        if isinstance(tableau, dfx.MultiButcherTableau):
            tableau = tableau.tableaus[0]
        if tableau.fsal:
            return tableau.num_stages - 1, 1
        return tableau.num_stages, 0
    if isinstance(solver, dfx.Euler):
        return 1, 0
    raise ValueError(
        f"Cannot count the function evaluations of {type(solver).__name__}; use an explicit "
        "Runge-Kutta solver (e.g. `diffrax.Dopri5()`, `diffrax.Tsit5()`, `diffrax.Heun()`) "
        "or `diffrax.Euler()`."
    )


def num_function_evaluations(
    solver: dfx.AbstractSolver, num_steps: Int[Array, "*batch"]
) -> Int[Array, "*batch"]:
    """The number of vector-field evaluations of a solve that took `num_steps` steps."""
    per_step, initial = evaluations_per_step(solver)
    return per_step * num_steps + initial


def initial_step_size(
    vector_field: Callable[[Scalar, PyTree, PyTree], PyTree],
    solver: dfx.AbstractAdaptiveSolver,
    controller: dfx.PIDController,
    t0: RealScalarLike,
    t1: RealScalarLike,
    y0: PyTree[ArrayLike],
    args: PyTree = None,
) -> Scalar:
    """The first step of an adaptive solve of `dy/dt = vector_field(t, y, args)` from
    `t0` towards `t1`, signed like `t1 - t0`: the rule of Hairer, Norsett and Wanner
    (*Solving Ordinary Differential Equations I*, Sec. II.4), as scipy's RK45 (and so the
    paper's released code) applies it, with the controller's `rtol`, `atol` and norm
    and the solver's error order. Costs `INITIAL_STEP_EVALUATIONS` evaluations of the
    vector field.

    Pass the result as `dt0` to `diffrax.diffeqsolve`. Diffrax has the same rule, but
    with `dt0=None` it does not reach it: `diffeqsolve` wraps the terms before the
    controller sees them, and the rule, which only recognises a bare `ODETerm`, falls
    back to a first step of 0.01 whatever the problem (diffrax 0.7; on the
    probability-flow ODE that step was too long: three rejected steps, 12 steps
    instead of 9 at tolerance 1e-4, `benchmarks/nfe_per_nll.py`). Unlike diffrax's
    rule, the trial step is kept inside `[t0, t1]`, where the vector field is defined
    (the score of a VP SDE is not, below `t = 0`).
    """
    direction = jnp.where(jnp.asarray(t1) >= jnp.asarray(t0), 1.0, -1.0)
    length = jnp.abs(jnp.asarray(t1) - jnp.asarray(t0))
    error_order = controller.error_order
    if error_order is None:
        error_order = solver.error_order(dfx.ODETerm(vector_field))  # pyright: ignore
    if error_order is None:
        raise ValueError(
            f"{type(solver).__name__} has no error estimate to choose a first step from: "
            "use an adaptive solver (e.g. `diffrax.Dopri5()`), or pass `dt0`."
        )
    scale = jax.tree.map(lambda y: controller.atol + jnp.abs(y) * controller.rtol, y0)

    def scaled_norm(tree):
        return controller.norm(jax.tree.map(lambda x, s: x / s, tree, scale))

    f0 = vector_field(t0, y0, args)  # pyright: ignore[reportArgumentType]
    d0, d1 = scaled_norm(y0), scaled_norm(f0)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    h0 = jnp.minimum(h0, length)
    y1 = jax.tree.map(lambda y, f: y + (direction * h0).astype(y.dtype) * f, y0, f0)
    f1 = vector_field(t0 + direction * h0, y1, args)  # pyright: ignore[reportArgumentType]
    d2 = scaled_norm(jax.tree.map(jnp.subtract, f1, f0)) / h0
    max_d = jnp.maximum(d1, d2)
    h1 = jnp.where(
        max_d <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / max_d) ** (1 / error_order)
    )
    return direction * jnp.minimum(jnp.minimum(100 * h0, h1), length)


def _pid(controller: dfx.AbstractStepSizeController) -> dfx.PIDController | None:
    # The PID controller that sets the tolerances (possibly wrapped by a
    # `ClipStepSizeController`), or None.
    while isinstance(controller, dfx.ClipStepSizeController):
        controller = controller.controller
    return controller if isinstance(controller, dfx.PIDController) else None


def _concrete(value) -> bool:
    try:
        float(value)
    except Exception:  # noqa: BLE001 - a tracer (a traced jit argument) or not a number
        return not isinstance(value, jax.Array)
    return True


def _check_tolerance(name: str, value) -> None:
    if not _concrete(value):
        return  # a traced tolerance (e.g. a jit argument) cannot be checked here
    try:
        ok = math.isfinite(float(value)) and float(value) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")


def resolve_controller(
    stepsize_controller: dfx.AbstractStepSizeController | None,
    rtol: float | None,
    atol: float | None,
) -> dfx.AbstractStepSizeController:
    """The step-size controller of an adaptive solve: the user's `stepsize_controller`,
    or `diffrax.PIDController(rtol, atol)` (each defaulting to `DEFAULT_TOLERANCE`).
    Passing both is refused; tolerances must be finite and non-negative, not both 0."""
    if stepsize_controller is not None:
        if rtol is not None or atol is not None:
            raise ValueError(
                "Pass either `stepsize_controller` or `rtol`/`atol`, not both (the "
                "controller carries its own tolerances)."
            )
        if not isinstance(stepsize_controller, dfx.AbstractStepSizeController):
            raise TypeError(
                "`stepsize_controller` must be a diffrax step-size controller (e.g. "
                f"`diffrax.PIDController(rtol=1e-5, atol=1e-5)`), got "
                f"{type(stepsize_controller).__name__}."
            )
        controller = stepsize_controller
    else:
        rtol = DEFAULT_TOLERANCE if rtol is None else rtol
        atol = DEFAULT_TOLERANCE if atol is None else atol
        _check_tolerance("rtol", rtol)
        _check_tolerance("atol", atol)
        controller = dfx.PIDController(rtol=rtol, atol=atol)
    pid = _pid(controller)
    if pid is not None:
        _check_tolerance("rtol", pid.rtol)
        _check_tolerance("atol", pid.atol)
        concrete = _concrete(pid.rtol) and _concrete(pid.atol)
        if concrete and float(pid.rtol) == 0 and float(pid.atol) == 0:
            raise ValueError("`rtol` and `atol` cannot both be 0.")
    return controller


def check_max_steps(max_steps: int | None) -> None:
    if max_steps is not None and not (
        isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 1
    ):
        raise ValueError(f"`max_steps` must be a positive integer or None, got {max_steps!r}.")


def check_adjoint(adjoint, *, solver: dfx.AbstractSolver | None = None, sde: bool = False) -> None:
    """Refuse an `adjoint` that is not a diffrax adjoint (`TypeError`), or one that cannot
    differentiate this solve (`ValueError`): `BacksolveAdjoint` with an Ito SDE solver
    (it solves Stratonovich adjoint equations only), and `ImplicitAdjoint`, which
    differentiates steady states, not solves over a fixed time interval."""
    if not isinstance(adjoint, dfx.AbstractAdjoint):
        raise TypeError(
            "`adjoint` must be a diffrax adjoint (e.g. `diffrax.RecursiveCheckpointAdjoint()` "
            f"or `diffrax.BacksolveAdjoint()`), got {type(adjoint).__name__}."
        )
    if isinstance(adjoint, dfx.ImplicitAdjoint):
        raise ValueError(
            "`adjoint=diffrax.ImplicitAdjoint()` differentiates steady states, not a solve "
            "between two times; use `diffrax.RecursiveCheckpointAdjoint()` (default) or "
            "`diffrax.BacksolveAdjoint()`."
        )
    if sde and isinstance(adjoint, dfx.BacksolveAdjoint):
        if not isinstance(solver, dfx.AbstractStratonovichSolver):
            name = type(solver).__name__
            raise ValueError(
                f"`adjoint=diffrax.BacksolveAdjoint()` solves the Stratonovich adjoint SDE, "
                f"so it needs a Stratonovich solver, and {name} is not one. The noise of "
                "these SDEs is additive (Ito = Stratonovich): use `solver=diffrax.Heun()`, "
                "or `adjoint=diffrax.RecursiveCheckpointAdjoint()` with "
                f"{name}."
            )


def first_step(
    vector_field: Callable,
    solver: dfx.AbstractSolver,
    controller: dfx.AbstractStepSizeController,
    t0: RealScalarLike,
    t1: RealScalarLike,
    y0: PyTree[ArrayLike],
    args: PyTree,
    dt0: float | None,
) -> tuple[RealScalarLike | None, int]:
    """`(dt0, extra evaluations)` of a solve: the user's `dt0` signed towards `t1`, or
    for `dt0=None` the Hairer-Norsett-Wanner first step (two evaluations) when the
    controller is adaptive with tolerances. A constant step size needs `dt0`."""
    if dt0 is not None:
        if not (math.isfinite(float(dt0)) and float(dt0) != 0):
            raise ValueError(f"`dt0` must be a finite non-zero number or None, got {dt0!r}.")
        return jnp.where(jnp.asarray(t1) >= jnp.asarray(t0), 1.0, -1.0) * abs(dt0), 0
    if isinstance(controller, dfx.ConstantStepSize):
        raise ValueError(f"A fixed-step solve ({type(solver).__name__}) needs `dt0`.")
    pid = _pid(controller)
    if pid is None or not isinstance(solver, dfx.AbstractAdaptiveSolver):
        # Another adaptive controller: let diffrax choose (`dt0=None`).
        return None, 0
    dt = initial_step_size(vector_field, solver, pid, t0, t1, y0, args)
    # The first step is a choice of discretisation, not a function of the parameters to
    # differentiate (and `BacksolveAdjoint` cannot differentiate `dt0`).
    return jax.lax.stop_gradient(dt), INITIAL_STEP_EVALUATIONS


class SolveOptions(eqx.Module):
    """The options every solve of the package takes, checked once (see
    [`scoreflow_eqx.ode_nll`][] for their meaning)."""

    solver: dfx.AbstractSolver
    stepsize_controller: dfx.AbstractStepSizeController
    dt0: float | None = eqx.field(static=True)
    max_steps: int | None = eqx.field(static=True)
    adjoint: dfx.AbstractAdjoint
    throw: bool = eqx.field(static=True)
    progress_meter: dfx.AbstractProgressMeter

    def __check_init__(self):
        if not isinstance(self.solver, dfx.AbstractSolver):
            raise TypeError(f"`solver` must be a diffrax solver, got {type(self.solver).__name__}.")
        evaluations_per_step(self.solver)  # refuse solvers whose NFE we cannot count
        check_max_steps(self.max_steps)
        check_adjoint(self.adjoint, solver=self.solver)

    def solve(
        self,
        vector_field: Callable,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: PyTree[Array],
        args: PyTree = None,
    ) -> tuple[dfx.Solution, Int[Array, ""]]:
        """`diffrax.diffeqsolve` of `dy/dt = vector_field(t, y, args)` from `t0` to `t1`
        (either direction), and the number of evaluations of `vector_field`."""
        dt0, extra = first_step(
            vector_field, self.solver, self.stepsize_controller, t0, t1, y0, args, self.dt0
        )
        sol = dfx.diffeqsolve(  # pyright: ignore[reportArgumentType] (jaxtyping vs diffrax aliases)
            dfx.ODETerm(vector_field),
            self.solver,
            t0,  # pyright: ignore[reportArgumentType]
            t1,  # pyright: ignore[reportArgumentType]
            dt0,  # pyright: ignore[reportArgumentType]
            y0,
            args,
            stepsize_controller=self.stepsize_controller,
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            throw=self.throw,
            progress_meter=self.progress_meter,
        )
        return sol, num_function_evaluations(self.solver, sol.stats["num_steps"]) + extra


def solve_options(
    *,
    solver: dfx.AbstractSolver,
    stepsize_controller: dfx.AbstractStepSizeController | None,
    rtol: float | None,
    atol: float | None,
    dt0: float | None,
    max_steps: int | None,
    adjoint: dfx.AbstractAdjoint,
    throw: bool,
    progress_meter: dfx.AbstractProgressMeter,
) -> SolveOptions:
    """Validate the solve arguments of a public function and bundle them."""
    if isinstance(solver, dfx.AbstractAdaptiveSolver) or stepsize_controller is not None:
        controller = resolve_controller(stepsize_controller, rtol, atol)
    else:
        if rtol is not None or atol is not None:
            raise ValueError(
                f"`rtol`/`atol` need an adaptive solver; {type(solver).__name__} takes fixed "
                "steps of `dt0`."
            )
        controller = dfx.ConstantStepSize()
    return SolveOptions(
        solver=solver,
        stepsize_controller=controller,
        dt0=dt0,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=throw,
        progress_meter=progress_meter,
    )
