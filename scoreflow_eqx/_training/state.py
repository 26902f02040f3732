"""The training state and the default optimizer."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from .._flow import ScoreFlow
from .config import _finite, _nonnegative_int


class TrainState(eqx.Module):
    """Everything a training step reads and writes.

    **Fields:** `flow` (the model), `ema_params` (EMA of its inexact arrays, `None`
    elsewhere), `opt_state`, `step` (a 0-d int array), `key` (the base training key;
    step `n` uses `jr.fold_in(key, n)`), `nonfinite_count` (consecutive updates skipped
    because the loss, the gradients or the new parameters were not finite) and
    `nonfinite_total` (all such updates).
    """

    flow: ScoreFlow
    ema_params: PyTree
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray
    nonfinite_count: Int[Array, ""]
    nonfinite_total: Int[Array, ""]

    @property
    def ema_flow(self) -> ScoreFlow:
        return eqx.combine(self.ema_params, self.flow)


@functools.lru_cache(maxsize=32)
def default_optimizer(
    *, lr: float = 2e-4, warmup_steps: int = 500, grad_clip: float | None = 1.0
) -> optax.GradientTransformation:
    """Adam with a linear learning-rate warm-up from 0 to `lr` over `warmup_steps` and
    global-norm gradient clipping at `grad_clip` (the setting of Song et al. 2021;
    `None` disables clipping). The learning rate is injected as a hyperparameter so it
    can be logged. (Cached: equal arguments give the same object, so compiled training
    steps are reused.)"""
    _finite("lr", lr, low=0.0, closed=False)
    _nonnegative_int("warmup_steps", warmup_steps)
    schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
    if grad_clip is None:
        return adam
    _finite("grad_clip", grad_clip, low=0.0, closed=False)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam)


def init_state(
    flow: ScoreFlow, optimizer: optax.GradientTransformation, *, key: PRNGKeyArray
) -> TrainState:
    """The initial `TrainState` (EMA = current parameters, step 0)."""
    params = eqx.filter(flow, eqx.is_inexact_array)
    zero = jnp.asarray(0, dtype=jnp.int32)
    return TrainState(
        flow=flow,
        ema_params=jax.tree.map(jnp.copy, params),  # own buffers (both are donated)
        opt_state=optimizer.init(params),
        step=zero,
        key=key,
        nonfinite_count=zero,
        nonfinite_total=zero,
    )
