"""The sampler interface."""

import abc

import equinox as eqx
from jaxtyping import PRNGKeyArray

from .._custom_types import Data
from .._flow import ScoreFlow
from ._result import SampleResult


class AbstractSampler(eqx.Module):
    """A way to draw one sample from a [`scoreflow_eqx.ScoreFlow`][]: carry a prior sample
    `x_T` at time `T` to the smallest time `flow.eps` (passed as `sampler=` to
    [`scoreflow_eqx.sample`][])."""

    @abc.abstractmethod
    def sample(self, flow: ScoreFlow, x_T: Data, *, key: PRNGKeyArray, throw: bool) -> SampleResult:
        """**Arguments:** the flow, one prior sample `x_T`, a PRNG key for the sampler's
        noise, and whether a failed solve raises.

        **Returns:** a [`scoreflow_eqx.SampleResult`][] at time `flow.eps`.
        """
