"""The record of a training run's settings, validated once and saved with every
checkpoint, so that a resumed run can be checked against the run it continues."""

import dataclasses
import math
from typing import Any

from .._losses import check_weighting


def _positive_int(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _nonnegative_int(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")


def _finite(name: str, value, *, low: float, high: float = math.inf, closed: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value if closed else low < value) and value < high
    if not ok:
        bound = f"{'>=' if closed else '>'} {low}" + ("" if high == math.inf else f" and < {high}")
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")


#: Settings that may differ when a run is resumed: they change when and what is logged,
#: evaluated and checkpointed, or how far the run goes, but not the trajectory of the
#: parameters up to any step.
SCHEDULE_FIELDS: tuple[str, ...] = (
    "steps",
    "checkpoint_every",
    "max_to_keep",
    "log_every",
    "eval_every",
    "eval_ode_every",
    "eval_num_examples",
    "eval_batch_size",
    "steps_per_jit",
    "max_consecutive_nonfinite",
)


#: Fields added after records were first written, with the value older runs had.
ADDED_LATER: dict[str, Any] = {"objective": "dsm"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of a [`scoreflow_eqx.train`][] run (see it for their meaning),
    validated on construction.

    `objective` describes the training objective: `"dsm"` (the denoising score-matching
    loss with `weighting` and `importance_sampling`) or the repr of another
    [`scoreflow_eqx.AbstractObjective`][].

    The fields that define the trajectory of the parameters (optimizer settings, batch
    size, weighting, objective, EMA, data order) must match when a run is resumed; the schedule
    fields (`SCHEDULE_FIELDS`: steps, logging, checkpointing, evaluation) may change.
    """

    steps: int
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 500
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    weighting: str = "likelihood"
    importance_sampling: bool = True
    custom_optimizer: bool = False
    checkpoint_every: int = 1000
    max_to_keep: int = 3
    log_every: int = 50
    eval_every: int = 0
    eval_ode_every: int = 0
    eval_num_examples: int | None = None
    eval_batch_size: int = 64
    steps_per_jit: int = 1
    max_consecutive_nonfinite: int = 20
    objective: str = "dsm"

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "max_to_keep", "log_every"):
            _positive_int(name, getattr(self, name))
        for name in ("eval_batch_size", "steps_per_jit", "max_consecutive_nonfinite"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "eval_ode_every"):
            _nonnegative_int(name, getattr(self, name))
        if self.eval_num_examples is not None:
            _positive_int("eval_num_examples", self.eval_num_examples)
        _finite("lr", self.lr, low=0.0, closed=False)
        if self.grad_clip is not None:
            _finite("grad_clip", self.grad_clip, low=0.0, closed=False)
        _finite("ema_decay", self.ema_decay, low=0.0, high=1.0, closed=True)
        check_weighting(self.weighting)
        if not (isinstance(self.objective, str) and self.objective):
            raise ValueError(
                f"`objective` must be a non-empty description string, got {self.objective!r}."
            )
        if not isinstance(self.importance_sampling, bool):
            raise ValueError(
                f"`importance_sampling` must be True or False, got {self.importance_sampling!r}."
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        record = {**ADDED_LATER, **record}
        missing, unknown = names - set(record), set(record) - names
        if missing or unknown:
            raise ValueError(
                f"Not a TrainConfig record: missing {sorted(missing)}, unknown {sorted(unknown)}."
            )
        return cls(**record)
