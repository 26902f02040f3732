"""Test bits/dim during and after training."""

from typing import Any

from jaxtyping import PRNGKeyArray

from .._bpd import evaluate_bpd
from .._flow import ScoreFlow
from .._nll_methods import AbstractLikelihoodMethod
from ..data._sources import Dataset


def evaluate_test(
    flow: ScoreFlow,
    dataset: Dataset,
    *,
    method: AbstractLikelihoodMethod | str,
    key: PRNGKeyArray,
    num_examples: int | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Test bits/dim of `flow` on (the first `num_examples` of) `dataset.test` with a
    likelihood method (`"bound"`, `"ode"` or an object), as a flat record for logging."""
    data = dataset.test if num_examples is None else dataset.test[:num_examples]
    res = evaluate_bpd(
        flow,
        data,
        discretization=dataset.discretization,
        key=key,
        method=method,
        batch_size=batch_size,
        show_progress=False,
    )
    name = res.method
    return {
        f"test_bpd_{name}": float(res.bpd),
        f"test_bpd_{name}_ci95": float(res.ci95),
        f"nfe_mean_{name}": float(res.nfe_mean),
        f"num_failed_{name}": int(res.num_failed),
    }
