"""Exact score 'networks' for data with a known density."""

import equinox as eqx

from .._custom_types import Data, RealScalarLike
from .._mixture import GaussianMixture
from .._sde import AbstractSDE


class GaussianMixtureScore(eqx.Module):
    """The exact score `grad log p_t(x)` of a Gaussian mixture diffused by `sde`, as a
    `net(t, x)`. Use it with `ScoreFlow(sde, net, parameterization="score")`: the flow then
    has the exact likelihood of the mixture (up to the prior mismatch at `T`)."""

    mixture: GaussianMixture
    sde: AbstractSDE

    def __call__(self, t: RealScalarLike, x: Data) -> Data:
        return self.mixture.diffuse(self.sde, t).score(x)
