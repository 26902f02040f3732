"""Maximum-likelihood training of a `ScoreFlow`: one jit-compiled, data-parallel step
(optax optimiser, parameter EMA, NaN/inf skipping), grain input, orbax checkpoints with
automatic resume, JSONL metrics and periodic test bits/dim."""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, Int, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from ._checkpoint import abstract_like, Checkpointer
from ._dispatch import StateStepJit
from ._factory import make_flow
from ._flow import ScoreFlow
from ._losses import check_weighting
from ._sharding import BATCH_AXIS, data_parallel_mesh, replicate, replicated_sharding
from .data._discretization import Discretization
from .data._pipeline import make_pipeline
from .data._sources import check_values, Dataset


CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# `optax.apply_if_finite` lets an update through after this many consecutive failures;
# we never want that (the host stops the run much earlier), so make it unreachable.
_NEVER = 2**30


class TrainState(eqx.Module):
    """Everything a training step reads and writes.

    **Fields:** `flow` (the model), `ema_params` (EMA of its inexact arrays, `None`
    elsewhere), `opt_state`, `step` (a 0-d int array) and `key` (the base training key;
    step `n` uses `jr.fold_in(key, n)`).
    """

    flow: ScoreFlow
    ema_params: PyTree
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray

    @property
    def ema_flow(self) -> ScoreFlow:
        return eqx.combine(self.ema_params, self.flow)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What [`scoreflow_eqx.train`][] returns.

    **Fields:** `flow` (final parameters), `ema_flow` (EMA parameters: use these for
    evaluation and sampling), `losses` (per-step training losses of this call, numpy),
    `metrics` (the logged records), `evaluations` (test bits/dim records), `step` (the
    final step), `state` (the final `TrainState`) and `data_iterator` (the grain
    iterator, positioned at the next batch).
    """

    flow: ScoreFlow
    ema_flow: ScoreFlow
    losses: np.ndarray
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    step: int
    state: TrainState
    data_iterator: Any


@functools.lru_cache(maxsize=32)
def default_optimizer(
    *, lr: float = 2e-4, warmup_steps: int = 500, grad_clip: float | None = 1.0
) -> optax.GradientTransformation:
    """Adam with a linear learning-rate warm-up from 0 to `lr` over `warmup_steps` and
    global-norm gradient clipping at `grad_clip` (the setting of Song et al. 2021). The
    learning rate is injected as a hyperparameter so it can be logged. (Cached: equal
    arguments give the same object, so compiled training steps are reused.)"""
    if not lr > 0:
        raise ValueError(f"`lr` must be positive, got {lr!r}.")
    schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
    if grad_clip is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam)


def _learning_rate(opt_state) -> Array | None:
    found = [
        v
        for path, v in optax.tree.get_all_with_path(opt_state, "learning_rate")
        if isinstance(v, jax.Array) and v.ndim == 0
    ]
    return found[0] if len(found) == 1 else None


def init_state(
    flow: ScoreFlow, optimizer: optax.GradientTransformation, *, key: PRNGKeyArray
) -> TrainState:
    """The initial `TrainState` (EMA = current parameters, step 0)."""
    params = eqx.filter(flow, eqx.is_inexact_array)
    return TrainState(
        flow=flow,
        ema_params=jax.tree.map(jnp.copy, params),  # own buffers (both are donated)
        opt_state=optimizer.init(params),
        step=jnp.asarray(0, dtype=jnp.int32),
        key=key,
    )


@functools.lru_cache(maxsize=32)
def _skip_nonfinite(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
    return optax.apply_if_finite(optimizer, _NEVER)


@functools.lru_cache(maxsize=32)
def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    weighting: str = "likelihood",
    importance_sampling: bool = True,
    ema_decay: float = 0.999,
    steps_per_jit: int = 1,
) -> Callable[[Array, TrainState], tuple[TrainState, dict[str, Array]]]:
    """The jit-compiled training step `step(batches, state) -> (state, metrics)`.

    The batch is sharded over `mesh` (data parallel), the state replicated; the state is
    donated. It is compiled with `jax.jit` on the state's array leaves, which dispatches
    about 0.3 ms faster per call than `eqx.filter_jit` (it matters for small networks;
    see `benchmarks/train_step.py`). With `steps_per_jit = k > 1`, `batches` is shaped
    `(k, batch, *data)` and `k` steps run in one `lax.scan`; metrics then have a leading
    axis of length `k`. With `k = 1` it is shaped `(batch, *data)`.

    One step: the per-example likelihood-weighted DSM losses (`flow.loss`, importance
    sampled by default; Song et al. 2021) averaged over the batch, their gradient,
    `optimizer.update` (which must be wrapped in `optax.apply_if_finite`, as
    [`scoreflow_eqx.train`][] does), and the parameter EMA
    `optax.incremental_update(params, ema, 1 - ema_decay)`.

    Cached on its (hashable) arguments, so that runs with the same settings share one
    compiled step.
    """
    check_weighting(weighting)
    if not 0 <= ema_decay < 1:
        raise ValueError(f"`ema_decay` must lie in [0, 1), got {ema_decay!r}.")
    repl = replicated_sharding(mesh)
    spec = PartitionSpec(BATCH_AXIS) if steps_per_jit == 1 else PartitionSpec(None, BATCH_AXIS)
    data_sharding = NamedSharding(mesh, spec)

    def loss_fn(flow, batch, key):
        keys = jr.split(key, batch.shape[0])
        per_example = jax.vmap(
            lambda x, k: flow.loss(
                x, key=k, weighting=weighting, importance_sampling=importance_sampling
            )
        )(batch, keys)
        return jnp.mean(per_example)

    def one_step(state: TrainState, batch):
        key = jr.fold_in(state.key, state.step)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(state.flow, batch, key)
        params = eqx.filter(state.flow, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        flow = eqx.apply_updates(state.flow, updates)
        ema = optax.incremental_update(
            eqx.filter(flow, eqx.is_inexact_array), state.ema_params, 1.0 - ema_decay
        )
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if isinstance(opt_state, optax.ApplyIfFiniteState):
            metrics["nonfinite_count"] = opt_state.notfinite_count
            metrics["nonfinite_total"] = opt_state.total_notfinite
        lr = _learning_rate(opt_state)  # the rate this update used
        if lr is not None:
            metrics["lr"] = lr
        new = TrainState(flow, ema, opt_state, state.step + 1, state.key)
        return new, metrics

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


# ----------------------------------------------------------------------- checkpoints


def _state_items(state: TrainState) -> dict[str, Any]:
    # Leaves as lists: robust to the `None`s of filtered equinox trees.
    return {
        "params": jax.tree.leaves(eqx.filter(state.flow, eqx.is_inexact_array)),
        "ema_params": jax.tree.leaves(state.ema_params),
        "opt_state": jax.tree.leaves(state.opt_state),
        "meta": {"step": state.step, "key": state.key},
    }


def _state_from_items(template: TrainState, items: dict[str, Any]) -> TrainState:
    params, static = eqx.partition(template.flow, eqx.is_inexact_array)
    params = jax.tree.unflatten(jax.tree.structure(params), items["params"])
    ema = jax.tree.unflatten(jax.tree.structure(template.ema_params), items["ema_params"])
    opt = jax.tree.unflatten(jax.tree.structure(template.opt_state), items["opt_state"])
    return TrainState(
        flow=eqx.combine(params, static),
        ema_params=ema,
        opt_state=opt,
        step=items["meta"]["step"],
        key=items["meta"]["key"],
    )


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"The work directory {workdir!r} is not writable: {e}") from e


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------- evaluation
# Test bits/dim through `sf.evaluate_bpd` (scoreflow_eqx/_bpd.py), whose contract is
# `evaluate_bpd(flow, data, *, discretization, key, method="ode"|"bound", batch_size,
# show_progress, ...) -> BPDResult(bpd, ci95, nfe_mean, nfe_max, num_failed, ...)`.


def _evaluate_bpd_function() -> Callable:
    try:
        from ._bpd import evaluate_bpd
    except ImportError as e:
        raise ValueError(
            "Periodic evaluation (eval_every > 0) needs `scoreflow_eqx.evaluate_bpd`, "
            "which is not available here; pass eval_every=0."
        ) from e
    return evaluate_bpd


def evaluate_test(
    flow: ScoreFlow,
    dataset: Dataset,
    *,
    method: str,
    key: PRNGKeyArray,
    num_examples: int | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Test bits/dim of `flow` on (the first `num_examples` of) `dataset.test` with
    `method="bound"` or `"ode"`, as a flat record for logging."""
    evaluate_bpd = _evaluate_bpd_function()
    data = dataset.test if num_examples is None else dataset.test[:num_examples]
    res = evaluate_bpd(
        flow,
        data,
        discretization=dataset.discretization,
        key=key,
        method=method,
        batch_size=batch_size,
        show_progress=False,
    )
    return {
        f"test_bpd_{method}": float(res.bpd),
        f"test_bpd_{method}_ci95": float(res.ci95),
        f"nfe_mean_{method}": float(res.nfe_mean),
        f"num_failed_{method}": int(res.num_failed),
    }


# ----------------------------------------------------------------------- the loop


def _as_dataset(data, discretization) -> Dataset:
    if isinstance(data, Dataset):
        if discretization is not None and discretization != data.discretization:
            raise ValueError("`discretization` conflicts with the dataset's own.")
        return data
    array = np.asarray(data)
    disc = Discretization(num_levels=None) if discretization is None else discretization
    check_values(array, disc, what="training data")
    if array.ndim < 2:
        raise ValueError(
            f"Training data must be shaped (num_examples, *data_shape), got {array.shape}."
        )
    return Dataset(
        name="array",
        train=array,
        test=array[:0],
        discretization=disc,
        data_shape=tuple(array.shape[1:]),
    )


def _check_flow_accepts(flow: ScoreFlow, data_shape: tuple[int, ...], dtype) -> None:
    x = jax.ShapeDtypeStruct(data_shape, dtype)
    try:
        out = eqx.filter_eval_shape(flow.net, jnp.asarray(0.5, dtype), x)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"The flow's net cannot take examples of the data's shape {data_shape}: {e}"
        ) from e
    if tuple(out.shape) != tuple(data_shape):
        raise ValueError(
            f"The flow's net maps examples of shape {data_shape} to shape "
            f"{tuple(out.shape)}; it must return the shape of its input."
        )


def train(
    flow: ScoreFlow,
    data: Dataset | ArrayLike,
    *,
    key: PRNGKeyArray,
    steps: int,
    batch_size: int = 128,
    optimizer: optax.GradientTransformation | None = None,
    lr: float = 2e-4,
    warmup_steps: int = 500,
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    weighting: str = "likelihood",
    importance_sampling: bool = True,
    discretization: Discretization | None = None,
    workdir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    max_to_keep: int = 3,
    log_every: int = 50,
    eval_every: int = 0,
    eval_ode_every: int = 0,
    eval_num_examples: int | None = None,
    eval_batch_size: int = 64,
    steps_per_jit: int = 1,
    max_consecutive_nonfinite: int = 20,
    devices: list[jax.Device] | None = None,
    flow_config: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    show_progress: bool = True,
    callback: Callable[[int, TrainState], None] | None = None,
) -> TrainResult:
    """Train `flow` by (likelihood-weighted) denoising score matching.

    Data-parallel over all devices (batch sharded, parameters replicated), one
    jit-compiled step, an EMA of the parameters, NaN/inf updates skipped
    (`optax.apply_if_finite`), and, with a `workdir`, orbax checkpoints (resumed
    automatically, including the data iterator), `config.json` and `metrics.jsonl`.

    **Arguments:**

    - `flow`: the initial [`scoreflow_eqx.ScoreFlow`][].
    - `data`: a [`scoreflow_eqx.data.Dataset`][] (its discretization drives
        dequantization and bits/dim) or an array `(N, *data_shape)` of continuous data
        (or integer levels with `discretization=`).
    - `key`: PRNG key (keyword-only); split into training and data keys.
    - `steps`: total number of optimisation steps (a resumed run continues up to it).
    - `batch_size`: the global batch size (divisible by the number of devices).
    - `optimizer`: an `optax.GradientTransformation`; default
        [`scoreflow_eqx.default_optimizer`][]`(lr=lr, warmup_steps=warmup_steps,
        grad_clip=grad_clip)`. It is wrapped in `optax.apply_if_finite`.
    - `ema_decay`: decay of the parameter EMA.
    - `weighting`, `importance_sampling`: passed to `flow.loss`.
    - `workdir`: where checkpoints, `config.json` and `metrics.jsonl` go; if it already
        holds checkpoints, training resumes from the latest readable one.
    - `checkpoint_every`, `max_to_keep`: checkpoint period (a final checkpoint is always
        written) and how many to keep.
    - `log_every`: metrics period (loss, grad norm, learning rate, steps/s); also how
        often the host checks for non-finite steps.
    - `eval_every`, `eval_ode_every`: periods of test bits/dim of the EMA flow with the
        bound and with the probability-flow ODE (0 disables); `eval_num_examples` and
        `eval_batch_size` bound their cost.
    - `steps_per_jit`: steps per compiled call (a `lax.scan`).
    - `max_consecutive_nonfinite`: stop with a `FloatingPointError` after this many
        consecutive non-finite updates (each one skipped).
    - `devices`: the devices of the data-parallel mesh (default all).
    - `flow_config`: the [`scoreflow_eqx.flow_config`][] that built `flow`, saved so
        that [`scoreflow_eqx.load_flow`][] can rebuild the model.
    - `config`: any extra JSON-able record to save with the run.
    - `show_progress`: a tqdm bar (process 0 only).
    - `callback`: called as `callback(step, state)` on the host after each compiled
        call. The state is donated to the next step: copy what you keep.

    **Returns:** a [`scoreflow_eqx.TrainResult`][].
    """
    # ---- validate everything before any expensive work
    if not isinstance(flow, ScoreFlow):
        raise TypeError(f"`flow` must be a ScoreFlow, got {type(flow).__name__}.")
    check_weighting(weighting)
    dataset = _as_dataset(data, discretization)
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("log_every", log_every),
        ("checkpoint_every", checkpoint_every),
        ("steps_per_jit", steps_per_jit),
        ("max_consecutive_nonfinite", max_consecutive_nonfinite),
    ):
        if not (isinstance(value, int | np.integer) and value >= 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    for name, value in (("eval_every", eval_every), ("eval_ode_every", eval_ode_every)):
        if not (isinstance(value, int | np.integer) and value >= 0):
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    mesh = data_parallel_mesh(devices)
    num_devices = mesh.devices.size
    if batch_size % num_devices or batch_size % jax.process_count():
        raise ValueError(
            f"`batch_size` ({batch_size}) must be divisible by the number of devices "
            f"({num_devices}) and of processes ({jax.process_count()})."
        )
    dtype = jnp.zeros(()).dtype  # the default float dtype
    _check_flow_accepts(flow, dataset.data_shape, dtype)
    if flow_config is not None and tuple(flow_config["data_shape"]) != dataset.data_shape:
        raise ValueError(
            f"flow_config data_shape {tuple(flow_config['data_shape'])} differs "
            "from the "
            f"data's {dataset.data_shape}."
        )
    if (eval_every or eval_ode_every) and len(dataset.test) == 0:
        raise ValueError("Evaluation needs a test split; pass a Dataset with test data.")
    if eval_every or eval_ode_every:
        _evaluate_bpd_function()
    is_main = jax.process_index() == 0
    if workdir is not None:
        workdir = os.path.abspath(os.fspath(workdir))
        _check_workdir(workdir)

    train_key, data_key, eval_key = jr.split(key, 3)
    data_seed = int(jr.randint(data_key, (), 0, 2**31 - 1))
    run_config = {
        "flow": flow_config,
        "dataset": {
            "name": dataset.name,
            "data_shape": list(dataset.data_shape),
            "num_levels": dataset.discretization.num_levels,
            "data_range": list(dataset.discretization.data_range),
        },
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "grad_clip": grad_clip,
            "ema_decay": ema_decay,
            "weighting": weighting,
            "importance_sampling": importance_sampling,
            "custom_optimizer": optimizer is not None,
            "checkpoint_every": checkpoint_every,
            "log_every": log_every,
            "eval_every": eval_every,
            "eval_ode_every": eval_ode_every,
            "steps_per_jit": steps_per_jit,
            "data_seed": data_seed,
        },
        "extra": config or {},
    }

    if optimizer is None:
        optimizer = default_optimizer(lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip)
    optimizer = _skip_nonfinite(optimizer)
    state = replicate(init_state(flow, optimizer, key=train_key), mesh)

    local_batch = batch_size // jax.process_count()
    pipeline = make_pipeline(dataset, batch_size=local_batch, seed=data_seed, dtype=dtype)
    data_iter = iter(pipeline)

    checkpointer = None
    if workdir is not None:
        checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=max_to_keep)
        if checkpointer.latest_step() is not None:
            saved = _read_config(workdir)
            if saved is not None and saved.get("flow") != run_config["flow"]:
                checkpointer.close()
                raise ValueError(
                    f"{workdir} holds a run of a different model "
                    f"({saved.get('flow')}); "
                    "use another work directory."
                )
            abstract = abstract_like(_state_items(state), replicated_sharding(mesh))
            restored = checkpointer.restore(abstract, data_iterator=data_iter, quarantine=True)
            if restored is not None:
                state = _state_from_items(state, restored[0])
        if is_main:
            _write_json(os.path.join(workdir, CONFIG_FILE), run_config)

    step_fn = make_train_step(
        optimizer,
        mesh=mesh,
        weighting=weighting,
        importance_sampling=importance_sampling,
        ema_decay=ema_decay,
        steps_per_jit=steps_per_jit,
    )
    batch_spec = (
        PartitionSpec(BATCH_AXIS) if steps_per_jit == 1 else PartitionSpec(None, BATCH_AXIS)
    )
    batch_sharding = NamedSharding(mesh, batch_spec)

    start = int(state.step)
    losses: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    pending: list[dict[str, Array]] = []
    metrics_path = os.path.join(workdir, METRICS_FILE) if (workdir and is_main) else None
    bar = tqdm(
        total=steps,
        initial=start,
        disable=not (show_progress and is_main),
        desc="train",
        dynamic_ncols=True,
    )
    last_time, last_step = time.perf_counter(), start

    def flush(step):
        nonlocal last_time, last_step, pending
        if not pending:
            return
        fetched = jax.device_get(pending)
        pending = []
        now = time.perf_counter()
        arrays = {k: np.concatenate([np.reshape(m[k], -1) for m in fetched]) for k in fetched[0]}
        losses.append(arrays["loss"])
        record = {
            "step": step,
            "loss": float(np.mean(arrays["loss"])),
            "grad_norm": float(np.mean(arrays["grad_norm"])),
            "steps_per_sec": (step - last_step) / max(now - last_time, 1e-9),
        }
        if "lr" in arrays:
            record["lr"] = float(arrays["lr"][-1])
        consecutive = 0
        if "nonfinite_count" in arrays:
            record["nonfinite_total"] = int(arrays["nonfinite_total"][-1])
            consecutive = int(arrays["nonfinite_count"][-1])
        last_time, last_step = now, step
        records.append(record)
        if metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        if consecutive >= max_consecutive_nonfinite:
            raise FloatingPointError(
                f"Training stopped at step {step}: {consecutive} consecutive steps had "
                "non-finite gradients or loss (each update was skipped). Lower the "
                "learning rate, check the data, or raise `max_consecutive_nonfinite`."
            )

    def crossed(every, before, after):
        return every > 0 and after // every > before // every

    try:
        step = start
        while step < steps:
            k = min(steps_per_jit, steps - step)
            if steps_per_jit == 1:
                local = next(data_iter)
            else:
                local = np.stack([next(data_iter) for _ in range(k)])
            batches = jax.make_array_from_process_local_data(batch_sharding, local)
            state, metrics = step_fn(batches, state)
            before, step = step, step + k
            pending.append(metrics)
            bar.update(k)
            if callback is not None:
                callback(step, state)
            if crossed(log_every, before, step) or step == steps:
                flush(step)
            if checkpointer is not None and (
                crossed(checkpoint_every, before, step) or step == steps
            ):
                saved_state = jax.tree.map(
                    jnp.copy, _state_items(state)
                )  # the state is donated next
                checkpointer.save(step, saved_state, data_iterator=data_iter, config=run_config)
            do_bound = crossed(eval_every, before, step)
            do_ode = crossed(eval_ode_every, before, step)
            if do_bound or do_ode:
                record = {"step": step}
                ekey = jr.fold_in(eval_key, step)
                for method, do in (("bound", do_bound), ("ode", do_ode)):
                    if do:
                        record |= evaluate_test(
                            state.ema_flow,
                            dataset,
                            method=method,
                            key=ekey,
                            num_examples=eval_num_examples,
                            batch_size=eval_batch_size,
                        )
                evaluations.append(record)
                if metrics_path:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"eval": record}) + "\n")
                bar.write(
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in record.items()
                    )
                )
        flush(step)
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.close()

    return TrainResult(
        flow=state.flow,
        ema_flow=state.ema_flow,
        losses=np.concatenate(losses) if losses else np.zeros((0,)),
        metrics=records,
        evaluations=evaluations,
        step=int(state.step),
        state=state,
        data_iterator=data_iter,
    )


# ----------------------------------------------------------------------- loading


def _read_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_flow(
    workdir: str | os.PathLike, *, ema: bool = True, like: ScoreFlow | None = None
) -> tuple[ScoreFlow, dict[str, Any]]:
    """Load a trained flow from a work directory written by [`scoreflow_eqx.train`][].

    **Arguments:**

    - `workdir`: the work directory.
    - `ema`: load the EMA parameters (default) or the raw ones.
    - `like`: a flow with the right structure, needed only when the run was trained
        without a `flow_config`.

    **Returns:** `(flow, info)` where `info` has `"data_shape"`, `"discretization"` (a
    [`scoreflow_eqx.data.Discretization`][]), `"config"` (the saved run config),
    `"step"` and `"dataset"` (its name). A corrupted latest checkpoint falls back to the
    previous one with a warning.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    config = _read_config(workdir)
    if config is None:
        raise ValueError(f"{workdir} has no {CONFIG_FILE}: not a training work directory.")
    if like is None:
        if config.get("flow") is None:
            raise ValueError(
                f"The run in {workdir} was trained without `flow_config`; pass `like=` "
                "(a flow of the same structure)."
            )
        like = make_flow(config["flow"])
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"{workdir} has no checkpoints.")
    params, static = eqx.partition(like, eqx.is_inexact_array)
    item = "ema_params" if ema else "params"
    with Checkpointer(ckpt_dir) as checkpointer:
        restored = checkpointer.restore({item: abstract_like(jax.tree.leaves(params))})
    if restored is None:
        raise ValueError(f"{workdir} has no checkpoints.")
    items, step = restored
    params = jax.tree.unflatten(jax.tree.structure(params), items[item])
    ds = config["dataset"]
    info = {
        "data_shape": tuple(ds["data_shape"]),
        "discretization": Discretization(
            num_levels=ds["num_levels"], data_range=tuple(ds["data_range"])
        ),
        "config": config,
        "step": step,
        "dataset": ds["name"],
    }
    return eqx.combine(params, static), info
