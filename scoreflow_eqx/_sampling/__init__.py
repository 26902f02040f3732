"""Sampling and controllable generation: the probability-flow ODE, the reverse-time SDE,
predictor-corrector sampling and inpainting (Song et al., ICLR 2021 and NeurIPS 2021),
one sampler per module."""

from ._api import decode as decode, encode as encode, inpaint as inpaint, sample as sample
from ._base import AbstractSampler as AbstractSampler
from ._result import SampleResult as SampleResult
from ._tweedie import tweedie_denoise as tweedie_denoise
from .predictor_corrector import (
    AbstractPredictor as AbstractPredictor,
    EulerMaruyamaPredictor as EulerMaruyamaPredictor,
    LangevinCorrector as LangevinCorrector,
    PredictorCorrector as PredictorCorrector,
    ReverseDiffusionPredictor as ReverseDiffusionPredictor,
)
from .probability_flow import ProbabilityFlow as ProbabilityFlow
from .reverse_sde import ReverseSDE as ReverseSDE
