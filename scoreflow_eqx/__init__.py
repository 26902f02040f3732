"""scoreflow_eqx: maximum-likelihood training and exact likelihoods of score-based
diffusion models (Song, Durkan, Murray, Ermon 2021) in JAX, Equinox and Diffrax."""

from . import data as data, nets as nets, plotting as plotting
from ._bound import nll_bound as nll_bound, NLLBoundResult as NLLBoundResult
from ._bpd import BPDResult as BPDResult, evaluate_bpd as evaluate_bpd
from ._checkpoint import Checkpointer as Checkpointer
from ._conditioning import (
    AbstractConditioning as AbstractConditioning,
    LogSNRConditioning as LogSNRConditioning,
    TimeConditioning as TimeConditioning,
)
from ._diagnostics import (
    loss_variance as loss_variance,
    LossVarianceResult as LossVarianceResult,
)
from ._divergence import (
    AbstractDivergence as AbstractDivergence,
    ExactTrace as ExactTrace,
    Hutchinson as Hutchinson,
)
from ._entropy import entropy as entropy, EntropyResult as EntropyResult
from ._factory import (
    flow_config as flow_config,
    make_flow as make_flow,
    make_net as make_net,
    make_sde as make_sde,
)
from ._flow import ScoreFlow as ScoreFlow
from ._likelihood import (
    ode_nll as ode_nll,
    ode_nll_batched as ode_nll_batched,
    ODENLLResult as ODENLLResult,
)
from ._mixture import GaussianMixture as GaussianMixture
from ._nll_methods import (
    AbstractLikelihoodMethod as AbstractLikelihoodMethod,
    BoundLikelihood as BoundLikelihood,
    ODELikelihood as ODELikelihood,
)
from ._objectives import (
    AbstractObjective as AbstractObjective,
    DSMObjective as DSMObjective,
    ODEObjective as ODEObjective,
)
from ._sample_and_log_prob import (
    sample_and_log_prob as sample_and_log_prob,
    SampleAndLogProbResult as SampleAndLogProbResult,
)
from ._sampling import (
    AbstractPredictor as AbstractPredictor,
    AbstractSampler as AbstractSampler,
    decode as decode,
    encode as encode,
    EulerMaruyamaPredictor as EulerMaruyamaPredictor,
    inpaint as inpaint,
    LangevinCorrector as LangevinCorrector,
    PredictorCorrector as PredictorCorrector,
    ProbabilityFlow as ProbabilityFlow,
    ReverseDiffusionPredictor as ReverseDiffusionPredictor,
    ReverseSDE as ReverseSDE,
    sample as sample,
    SampleResult as SampleResult,
    tweedie_denoise as tweedie_denoise,
)
from ._sde import (
    AbstractSDE as AbstractSDE,
    brownian_motion as brownian_motion,
    SubVPSDE as SubVPSDE,
    VESDE as VESDE,
    VPSDE as VPSDE,
)
from ._sharding import data_parallel_mesh as data_parallel_mesh
from ._time_sampling import ImportanceSampler as ImportanceSampler
from ._training import (
    default_optimizer as default_optimizer,
    load_flow as load_flow,
    make_train_step as make_train_step,
    train as train,
    TrainConfig as TrainConfig,
    TrainResult as TrainResult,
    TrainState as TrainState,
    WorkDirLocked as WorkDirLocked,
)
from ._variational import (
    dequantization_loss as dequantization_loss,
    DequantizerTrainResult as DequantizerTrainResult,
    load_dequantizer as load_dequantizer,
    train_dequantizer as train_dequantizer,
    VariationalDequantizer as VariationalDequantizer,
)
from .data._discretization import bits_per_dim as bits_per_dim


__version__ = "0.1.0"
