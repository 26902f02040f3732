"""Score networks `net(t, x)` acting on one example."""

from ._embedding import (
    FourierEmbedding as FourierEmbedding,
    SinusoidalEmbedding as SinusoidalEmbedding,
)
from ._exact import GaussianMixtureScore as GaussianMixtureScore
from ._mlp import MLP as MLP
