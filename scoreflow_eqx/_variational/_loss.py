"""The training objective of a dequantizer with the score model frozen."""

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Float, Integer, PRNGKeyArray

from .._bound import nll_bound
from .._flow import ScoreFlow
from ..data._dequantizers import AbstractDequantizer


def dequantization_loss(
    flow: ScoreFlow,
    dequantizer: AbstractDequantizer,
    k: Integer[Array, "*data"],
    *,
    key: PRNGKeyArray,
    num_t: int = 4,
    eps_correction: bool = True,
    num_eps_samples: int = 1,
) -> Float[Array, ""]:
    """One-example, reparameterised, unbiased estimate of the variational-dequantization
    objective `E_q[L(x) + log q(u | k)]` in nats, with `x = a (k + u) / K + b`,
    `u ~ q(. | k)` drawn by `dequantizer(k, key=...)`, and `L` the Theorem 3 upper bound
    on `-log p_SDE(x)` ([`scoreflow_eqx.nll_bound`][], `num_t` importance-sampled
    times, the eps correction with `num_eps_samples` draws).

    Its expectation minus `D log(a / K)` upper-bounds the discrete NLL of the SDE model,
    `-log P(k)` with `P(k)` the mass of the cell of `k` under `p_SDE` (Jensen over `q`
    and Theorem 3); its bits/dim are
    `dequantizer.discretization.bits_per_dim(objective, dim=D)`. The score
    model is frozen (`jax.lax.stop_gradient` on the flow's arrays), so the gradient with
    respect to the dequantizer is that of the objective; minimise its mean over a batch
    (`jax.vmap` over examples and keys).

    **Arguments:**

    - `flow`: the trained [`scoreflow_eqx.ScoreFlow`][] (not differentiated).
    - `dequantizer`: any [`scoreflow_eqx.data.AbstractDequantizer`][], usually a
        [`scoreflow_eqx.VariationalDequantizer`][].
    - `k`: the integer levels of one example.
    - `key`: PRNG key (keyword-only) for the offsets, the times and the noise.
    - `num_t`, `eps_correction`, `num_eps_samples`: passed to `nll_bound`.

    **Returns:** a scalar.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{song2021maximum,
            title={Maximum Likelihood Training of Score-Based Diffusion Models},
            author={Song, Yang and Durkan, Conor and Murray, Iain and Ermon, Stefano},
            booktitle={NeurIPS},
            year={2021}
        }
        @inproceedings{ho2019flow++,
            title={Flow++: Improving Flow-Based Generative Models with Variational
                   Dequantization and Architecture Design},
            author={Ho, Jonathan and Chen, Xi and Srinivas, Aravind and Duan, Yan and
                    Abbeel, Pieter},
            booktitle={ICML},
            year={2019}
        }
        ```
    """
    if not isinstance(dequantizer, AbstractDequantizer):
        raise TypeError(
            "`dequantizer` must be a scoreflow_eqx.data.AbstractDequantizer (e.g. "
            f"sf.VariationalDequantizer), got {type(dequantizer).__name__}."
        )
    arrays, static = eqx.partition(flow, eqx.is_array)
    flow = eqx.combine(jax.lax.stop_gradient(arrays), static)
    dkey, bkey = jr.split(key)
    x, log_q = dequantizer(k, key=dkey)
    bound = nll_bound(
        flow,
        x,
        key=bkey,
        num_t=num_t,
        eps_correction=eps_correction,
        num_eps_samples=num_eps_samples,
    )
    return bound.nll + log_q.astype(bound.nll.dtype)
