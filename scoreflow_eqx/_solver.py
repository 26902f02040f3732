"""Counting the function evaluations of a diffrax solve."""

import diffrax as dfx
from jaxtyping import Array, Int


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
