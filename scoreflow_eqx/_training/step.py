"""The jit-compiled, data-parallel training step: dequantization on device, the
likelihood-weighted DSM loss, the optimizer update, the parameter EMA, and a guard that
skips any update whose loss, gradients or new parameters are not finite."""

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PyTree

from .._dispatch import StateStepJit
from .._losses import check_weighting
from .._objectives import AbstractObjective, as_objective
from .._sharding import BATCH_AXIS, replicated_sharding
from ..data._dequantizers import AbstractDequantizer
from .state import TrainState


def _all_finite(tree: PyTree) -> Array:
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(ok: Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b) if eqx.is_array(a) else a, new, old)


def _learning_rate(opt_state) -> Array | None:
    found = [
        v
        for _, v in optax.tree.get_all_with_path(opt_state, "learning_rate")
        if isinstance(v, jax.Array) and v.ndim == 0
    ]
    return found[0] if len(found) == 1 else None


def _make_one_step(optimizer, objective: AbstractObjective, ema_decay, dequantizer):
    def loss_fn(flow, batch, key):
        dkey, lkey = jr.split(key)
        if dequantizer is not None:
            dkeys = jr.split(dkey, batch.shape[0])
            batch, _ = jax.vmap(lambda k, key: dequantizer(k, key=key))(batch, dkeys)
        return objective(flow, batch, key=lkey)

    def one_step(state: TrainState, batch):
        key = jr.fold_in(state.key, state.step)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(state.flow, batch, key)
        params = eqx.filter(state.flow, eqx.is_inexact_array)
        # optax mixes its int32 step count with float hyperparameters (Adam's bias
        # correction), which strict dtype promotion refuses.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
        flow = eqx.apply_updates(state.flow, updates)
        ema = optax.incremental_update(
            eqx.filter(flow, eqx.is_inexact_array), state.ema_params, 1.0 - ema_decay
        )
        # optax.apply_if_finite looks at the gradients only; an update can still make the
        # parameters non-finite, so the whole candidate is checked.
        ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(flow)
        flow, ema, opt_state = _select(
            ok, (flow, ema, opt_state), (state.flow, state.ema_params, state.opt_state)
        )
        count = jnp.where(ok, 0, state.nonfinite_count + 1)
        total = state.nonfinite_total + jnp.where(ok, 0, 1)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "nonfinite_count": count,
            "nonfinite_total": total,
        }
        lr = _learning_rate(opt_state)  # the rate this update used
        if lr is not None:
            metrics["lr"] = lr
        new = TrainState(flow, ema, opt_state, state.step + 1, state.key, count, total)
        return new, metrics

    return one_step


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    weighting: str = "likelihood",
    importance_sampling: bool = True,
    ema_decay: float = 0.999,
    steps_per_jit: int = 1,
    dequantizer: AbstractDequantizer | None = None,
    objective: AbstractObjective | str | None = None,
) -> Callable[[Array, TrainState], tuple[TrainState, dict[str, Array]]]:
    """The jit-compiled training step `step(batches, state) -> (state, metrics)`.

    The batch is sharded over `mesh` (data parallel), the state replicated; the state is
    donated. It is compiled with `jax.jit` on the state's array leaves (see
    `scoreflow_eqx._dispatch` and `benchmarks/train_step.py`). With `steps_per_jit =
    k > 1`, `batches` is shaped `(k, batch, *data)` and `k` steps run in one `lax.scan`;
    metrics then have a leading axis of length `k`. With `k = 1` it is shaped
    `(batch, *data)`.

    One step: the batch of integer levels is dequantized on device by `dequantizer` (the
    same object evaluation uses; `None` for continuous data), then the per-example
    likelihood-weighted DSM losses (`flow.loss`, importance sampled by default; Song et
    al. 2021) averaged over the batch, their gradient, `optimizer.update` and the
    parameter EMA `optax.incremental_update(params, ema, 1 - ema_decay)`. If the loss,
    the gradients or the new parameters are not finite, the update is skipped (the
    state is kept, and `nonfinite_count` counts the consecutive skips).

    `objective` replaces the DSM loss: an [`scoreflow_eqx.AbstractObjective`][] such as
    [`scoreflow_eqx.ODEObjective`][]`()` (the probability-flow NLL through the solve), or
    the shorthands `"dsm"` (default: `DSMObjective(weighting, importance_sampling)`) and
    `"ode"`.

    Cached on its arguments when they are hashable, so that runs with the same settings
    share one compiled step.
    """
    check_weighting(weighting)
    objective = as_objective(
        objective, weighting=weighting, importance_sampling=importance_sampling
    )
    args = (optimizer, mesh, objective, ema_decay, steps_per_jit, dequantizer)
    try:
        hash(args)
    except TypeError:  # e.g. an adjoint holding a dict: build it afresh
        return _build_train_step(*args)
    return _cached_train_step(*args)


def _build_train_step(optimizer, mesh, objective, ema_decay, steps_per_jit, dequantizer):
    if not 0 <= ema_decay < 1:
        raise ValueError(f"`ema_decay` must lie in [0, 1), got {ema_decay!r}.")
    one_step = _make_one_step(optimizer, objective, ema_decay, dequantizer)
    repl = replicated_sharding(mesh)
    spec = PartitionSpec(BATCH_AXIS) if steps_per_jit == 1 else PartitionSpec(None, BATCH_AXIS)
    data_sharding = NamedSharding(mesh, spec)

    def step(batches, state: TrainState):
        state = eqx.filter_shard(state, repl)
        batches = eqx.filter_shard(batches, data_sharding)
        if steps_per_jit == 1:
            state, metrics = one_step(state, batches)
        else:
            dynamic, static = eqx.partition(state, eqx.is_array)

            def body(carry, batch):
                new, metrics = one_step(eqx.combine(carry, static), batch)
                return eqx.filter(new, eqx.is_array), metrics

            dynamic, metrics = jax.lax.scan(body, dynamic, batches)
            state = eqx.combine(dynamic, static)
        return eqx.filter_shard(state, repl), metrics

    # XLA:CPU collectives deadlock with many steps queued on several CPU devices (see
    # StateStepJit); accelerators keep the fully asynchronous dispatch.
    several_cpus = mesh.devices.size > 1 and all(d.platform == "cpu" for d in mesh.devices.flat)
    return StateStepJit(step, max_in_flight=2 if several_cpus else None)


_cached_train_step = functools.lru_cache(maxsize=32)(_build_train_step)
