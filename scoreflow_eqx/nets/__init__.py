"""Score networks `net(t, x)` acting on one example."""

from ._embedding import (
    FourierEmbedding as FourierEmbedding,
    SinusoidalEmbedding as SinusoidalEmbedding,
)
from ._exact import GaussianMixtureScore as GaussianMixtureScore
from ._mlp import MLP as MLP
from ._unet import (
    UNet as UNet,
    unet_preset as unet_preset,
    UNET_PRESETS as UNET_PRESETS,
)
