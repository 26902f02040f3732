"""scoreflow_eqx: maximum-likelihood training and exact likelihoods of score-based
diffusion models (Song, Durkan, Murray, Ermon 2021) in JAX, Equinox and Diffrax."""

from . import nets as nets
from ._flow import ScoreFlow as ScoreFlow
from ._mixture import GaussianMixture as GaussianMixture
from ._sde import (
    AbstractSDE as AbstractSDE,
    brownian_motion as brownian_motion,
    SubVPSDE as SubVPSDE,
    VESDE as VESDE,
    VPSDE as VPSDE,
)
from ._time_sampling import ImportanceSampler as ImportanceSampler


__version__ = "0.1.0"
