"""Training: the config record, the training state, the compiled step, the work
directory (checkpoints, run record, lock, `load_flow`), metrics, evaluation and the
loop."""

from .config import TrainConfig as TrainConfig
from .loop import train as train, TrainResult as TrainResult
from .state import (
    default_optimizer as default_optimizer,
    init_state as init_state,
    TrainState as TrainState,
)
from .step import make_train_step as make_train_step
from .workdir import load_flow as load_flow, WorkDirLocked as WorkDirLocked
