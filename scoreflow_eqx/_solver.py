"""Diffrax solve helpers: counting the function evaluations of a solve, and choosing the
first step of an adaptive one."""

from collections.abc import Callable

import diffrax as dfx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Int, PyTree

from ._custom_types import RealScalarLike, Scalar


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
        error_order = solver.error_order(dfx.ODETerm(vector_field))
    if error_order is None:
        raise ValueError(
            f"{type(solver).__name__} has no error estimate to choose a first step from: "
            "use an adaptive solver (e.g. `diffrax.Dopri5()`), or pass `dt0`."
        )
    scale = jax.tree.map(lambda y: controller.atol + jnp.abs(y) * controller.rtol, y0)

    def scaled_norm(tree):
        return controller.norm(jax.tree.map(lambda x, s: x / s, tree, scale))

    f0 = vector_field(t0, y0, args)
    d0, d1 = scaled_norm(y0), scaled_norm(f0)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    h0 = jnp.minimum(h0, length)
    y1 = jax.tree.map(lambda y, f: y + (direction * h0).astype(y.dtype) * f, y0, f0)
    f1 = vector_field(t0 + direction * h0, y1, args)
    d2 = scaled_norm(jax.tree.map(jnp.subtract, f1, f0)) / h0
    max_d = jnp.maximum(d1, d2)
    h1 = jnp.where(
        max_d <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / max_d) ** (1 / error_order)
    )
    return direction * jnp.minimum(jnp.minimum(100 * h0, h1), length)
