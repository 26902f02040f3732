"""The result of every sampler, encoder and decoder."""

import diffrax as dfx
import equinox as eqx
from jaxtyping import Array, Int

from .._custom_types import Data


class SampleResult(eqx.Module):
    """The outcome of [`scoreflow_eqx.sample`][], [`scoreflow_eqx.decode`][],
    [`scoreflow_eqx.encode`][] and [`scoreflow_eqx.inpaint`][] for one example (under
    `jax.vmap` every field gains a leading batch axis).

    **Fields:**

    - `x`: the end state: a sample (for `sample`, `decode`, `inpaint`) or a latent at
        time `T` (for `encode`).
    - `nfe`: the number of evaluations of the score network spent on this example. For
        Dopri5 that is `6 * num_steps + 1` (rejected steps included), plus 2 when the
        first step is chosen automatically (`dt0=None`); under `jax.vmap` the batched
        network runs `max(nfe)` times.
    - `num_steps`: the number of solver steps (accepted and rejected) or time steps.
    - `result`: a `diffrax.RESULTS`; `diffrax.is_successful(result)` tells whether the
        solve succeeded (always successful for the fixed-step samplers, unless the input
        was non-finite).
    - `stats`: the solve's statistics (diffrax's `stats` for solves; `num_steps` for the
        fixed-step samplers).
    """

    x: Data
    nfe: Int[Array, ""]
    num_steps: Int[Array, ""]
    result: dfx.RESULTS
    stats: dict
