"""`sf.train`: the training loop, assembled from the config record, the work directory,
the compiled step, the metrics logger and the evaluation helper."""

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import ArrayLike, PRNGKeyArray
from tqdm.auto import tqdm

from .._checkpoint import Checkpointer
from .._flow import ScoreFlow
from .._objectives import AbstractObjective, as_objective, DSMObjective
from .._sharding import BATCH_AXIS, data_parallel_mesh, replicate, replicated_sharding
from ..data._dequantizers import UniformDequantizer
from ..data._discretization import Discretization
from ..data._pipeline import make_pipeline
from ..data._sources import check_values, Dataset
from .config import TrainConfig
from .evaluation import evaluate_test
from .metrics import MetricsLogger
from .record import CHANGEABLE, check_flow_config, run_record
from .state import default_optimizer, init_state, TrainState
from .step import make_train_step
from .workdir import all_finite, restore_state, state_items, WorkDir


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What [`scoreflow_eqx.train`][] returns.

    **Fields:** `flow` (final parameters), `ema_flow` (EMA parameters: use these for
    evaluation and sampling), `losses` (per-step training losses of this call, numpy),
    `metrics` (the logged records), `evaluations` (test bits/dim records), `step` (the
    final step), `nonfinite_total` (updates skipped because they were not finite),
    `state` (the final `TrainState`) and `data_iterator` (the grain iterator, positioned
    at the next batch).
    """

    flow: ScoreFlow
    ema_flow: ScoreFlow
    losses: np.ndarray
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    step: int
    nonfinite_total: int
    state: TrainState
    data_iterator: Any


def as_dataset(data, discretization: Discretization | None) -> Dataset:
    """`data` as a `Dataset` (an array of continuous data, or of levels with
    `discretization`)."""
    if isinstance(data, Dataset):
        if discretization is not None and discretization != data.discretization:
            raise ValueError("`discretization` conflicts with the dataset's own.")
        return data
    array = np.asarray(data)
    disc = Discretization(num_levels=None) if discretization is None else discretization
    if array.ndim < 2:
        raise ValueError(
            f"Training data must be shaped (num_examples, *data_shape), got {array.shape}."
        )
    check_values(array, disc, what="training data")
    return Dataset(
        name="array",
        train=array,
        test=array[:0],
        discretization=disc,
        data_shape=tuple(array.shape[1:]),
    )


def _check_flow(flow: ScoreFlow, dataset: Dataset, flow_config) -> None:
    if not isinstance(flow, ScoreFlow):
        raise TypeError(f"`flow` must be a ScoreFlow, got {type(flow).__name__}.")
    x = jax.ShapeDtypeStruct(dataset.data_shape, jnp.zeros(()).dtype)
    try:
        eqx.filter_eval_shape(flow.score, jnp.asarray(0.5, x.dtype), x)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"The flow's net cannot take examples of the data's shape {dataset.data_shape}: {e}"
        ) from e
    if not all_finite(flow):
        raise ValueError("The flow's initial parameters are not all finite.")
    if flow_config is not None:
        check_flow_config(flow, flow_config)


def _check_config(cfg: TrainConfig, dataset: Dataset, num_devices: int, allow) -> None:
    if cfg.batch_size % num_devices or cfg.batch_size % jax.process_count():
        raise ValueError(
            f"`batch_size` ({cfg.batch_size}) must be divisible by the number of devices "
            f"({num_devices}) and of processes ({jax.process_count()})."
        )
    if (cfg.eval_every or cfg.eval_ode_every) and len(dataset.test) == 0:
        raise ValueError("Evaluation needs a test split; pass a Dataset with test data.")
    unknown = set(allow) - set(CHANGEABLE)
    if unknown:
        raise ValueError(
            f"`allow_changes` names {sorted(unknown)}; what may be allowed to change is "
            f"{list(CHANGEABLE)} (the schedule settings may always change)."
        )


def _crossed(every: int, before: int, after: int) -> bool:
    return every > 0 and after // every > before // every


class _Run:
    """One call of `train`: the pieces, and the loop over compiled steps."""

    def __init__(
        self, flow, dataset, cfg, optimizer, objective, *, key, mesh, workdir, record_args
    ):
        self.cfg, self.dataset, self.mesh = cfg, dataset, mesh
        train_key, data_key, self.eval_key = jr.split(key, 3)
        data_seed = int(jr.randint(data_key, (), 0, 2**31 - 1))
        self.record = run_record(
            flow,
            record_args["flow_config"],
            dataset,
            cfg,
            key=train_key,
            data_seed=data_seed,
            extra=record_args["extra"],
        )
        self.is_main = jax.process_index() == 0
        self.state = replicate(init_state(flow, optimizer, key=train_key), mesh)
        local_batch = cfg.batch_size // jax.process_count()
        dtype = jnp.zeros(()).dtype  # the default float dtype, for continuous data
        pipeline = make_pipeline(dataset, batch_size=local_batch, seed=data_seed, dtype=dtype)
        self.data_iter = iter(pipeline)
        disc = dataset.discretization
        self.step_fn = make_train_step(
            optimizer,
            mesh=mesh,
            weighting=cfg.weighting,
            importance_sampling=cfg.importance_sampling,
            ema_decay=cfg.ema_decay,
            steps_per_jit=cfg.steps_per_jit,
            dequantizer=UniformDequantizer(disc) if disc.is_discrete else None,
            objective=objective,
        )
        spec = (
            PartitionSpec(BATCH_AXIS) if cfg.steps_per_jit == 1 else PartitionSpec(None, BATCH_AXIS)
        )
        self.batch_sharding = NamedSharding(mesh, spec)
        self.workdir = None if workdir is None else WorkDir(workdir)
        self.checkpointer = None

    def open(self, allow: frozenset[str]) -> None:
        """Lock the work directory, resume from its latest checkpoint (after checking
        that it holds this run), and record the run."""
        if self.workdir is None:
            return
        if self.is_main:
            self.workdir.lock()
        self.checkpointer = Checkpointer(
            self.workdir.checkpoint_dir, max_to_keep=self.cfg.max_to_keep
        )
        self.state = restore_state(
            self.checkpointer,
            self.state,
            self.record,
            data_iterator=self.data_iter,
            sharding=replicated_sharding(self.mesh),
            allow=allow,
        )
        if self.is_main:
            self.workdir.write_config(self.record)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.workdir is not None:
            self.workdir.unlock()

    def _next_batches(self, k: int):
        if self.cfg.steps_per_jit == 1:
            local = next(self.data_iter)
        else:
            local = np.stack([next(self.data_iter) for _ in range(k)])
        return jax.make_array_from_process_local_data(self.batch_sharding, local)

    def loop(self, logger: MetricsLogger, bar, callback) -> None:
        cfg, start = self.cfg, int(self.state.step)
        step = start
        while step < cfg.steps:
            k = min(cfg.steps_per_jit, cfg.steps - step)
            self.state, metrics = self.step_fn(self._next_batches(k), self.state)
            before, step = step, step + k
            logger.add(metrics)
            bar.update(k)
            if callback is not None:
                callback(step, self.state)
            if _crossed(cfg.log_every, before, step) or step == cfg.steps:
                logger.flush(step)
                self._check_nonfinite(logger, step, step - start, final=step == cfg.steps)
            if self.checkpointer is not None and (
                _crossed(cfg.checkpoint_every, before, step) or step == cfg.steps
            ):
                items = jax.tree.map(jnp.copy, state_items(self.state))  # donated next
                self.checkpointer.save(
                    step, items, data_iterator=self.data_iter, record=self.record
                )
            self._evaluate(logger, before, step)

    def _check_nonfinite(self, logger: MetricsLogger, step: int, steps_run: int, final: bool):
        streak, limit = logger.nonfinite_count, self.cfg.max_consecutive_nonfinite
        if streak >= limit or (final and streak >= min(limit, steps_run)):
            raise FloatingPointError(
                f"Training diverged: the last {streak} consecutive updates (steps "
                f"{step - streak + 1} to {step}) had a non-finite loss, gradient or parameters "
                f"and were skipped, so the state is that of step {step - streak} "
                f"({logger.nonfinite_total} updates skipped in all). Lower the learning rate, "
                "check the data, or raise `max_consecutive_nonfinite`."
            )

    def _evaluate(self, logger: MetricsLogger, before: int, step: int) -> None:
        cfg = self.cfg
        todo = [
            m
            for m, every in (("bound", cfg.eval_every), ("ode", cfg.eval_ode_every))
            if _crossed(every, before, step)
        ]
        if not todo:
            return
        record: dict[str, Any] = {"step": step}
        for method in todo:
            record |= evaluate_test(
                self.state.ema_flow,
                self.dataset,
                method=method,
                key=jr.fold_in(self.eval_key, step),
                num_examples=cfg.eval_num_examples,
                batch_size=cfg.eval_batch_size,
            )
        logger.log_evaluation(record)


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
    objective: AbstractObjective | str | None = None,
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
    devices: Sequence[Any] | None = None,
    flow_config: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    allow_changes: Sequence[str] = (),
    show_progress: bool = True,
    callback: Callable[[int, TrainState], None] | None = None,
) -> TrainResult:
    """Train `flow` by (likelihood-weighted) denoising score matching, or by another
    objective (e.g. the probability-flow ODE's NLL).

    Data-parallel over all devices (batch sharded, parameters replicated), one
    jit-compiled step (dequantization on device, loss, gradient, optimizer, EMA), any
    update whose loss, gradients or new parameters are not finite skipped, and, with a
    `workdir`, orbax checkpoints (resumed automatically, including the data iterator),
    `config.json` and `metrics.jsonl`.

    **Arguments:**

    - `flow`: the initial [`scoreflow_eqx.ScoreFlow`][].
    - `data`: a [`scoreflow_eqx.data.Dataset`][] (its discretization drives
        dequantization and bits/dim) or an array `(N, *data_shape)` of continuous data
        (or integer levels with `discretization=`).
    - `key`: PRNG key (keyword-only); split into training, data and evaluation keys.
    - `steps`: total number of optimisation steps (a resumed run continues up to it).
    - `batch_size`: the global batch size (divisible by the number of devices).
    - `optimizer`: an `optax.GradientTransformation`; default
        [`scoreflow_eqx.default_optimizer`][]`(lr=lr, warmup_steps=warmup_steps,
        grad_clip=grad_clip)`.
    - `ema_decay`: decay of the parameter EMA, in `[0, 1)`.
    - `weighting`, `importance_sampling`: passed to `flow.loss` by the default objective.
    - `objective`: what each step minimises: `None` or `"dsm"` (default) for
        [`scoreflow_eqx.DSMObjective`][]`(weighting, importance_sampling)`, or another
        [`scoreflow_eqx.AbstractObjective`][], e.g. [`scoreflow_eqx.ODEObjective`][]`()`
        (shorthand `"ode"`): the probability-flow NLL through the solve, to fine-tune a
        DSM-trained flow by maximum likelihood. It is part of the run record (a resumed
        run must use the same one unless `allow_changes=("objective",)`).
    - `workdir`: where checkpoints, `config.json` and `metrics.jsonl` go; if it already
        holds checkpoints, training resumes from the latest readable one, after checking
        that it is the same run (model, SDE, data fingerprint, training settings, key).
        One process at a time may write to it (a lock is held for the run's lifetime).
    - `checkpoint_every`, `max_to_keep`: checkpoint period (a final checkpoint is always
        written) and how many to keep.
    - `log_every`: metrics period (loss, grad norm, learning rate, steps/s); also how
        often the host checks for skipped (non-finite) updates.
    - `eval_every`, `eval_ode_every`: periods of test bits/dim of the EMA flow with the
        bound and with the probability-flow ODE (0 disables); `eval_num_examples` and
        `eval_batch_size` bound their cost.
    - `steps_per_jit`: steps per compiled call (a `lax.scan`).
    - `max_consecutive_nonfinite`: stop with a `FloatingPointError` after this many
        consecutive skipped updates; a run whose last updates were all skipped (at
        least this many, or every update of the call) is reported as diverged too.
    - `devices`: the devices of the data-parallel mesh (default all).
    - `flow_config`: the [`scoreflow_eqx.flow_config`][] that built `flow` (checked
        against it), saved so that [`scoreflow_eqx.load_flow`][] can rebuild the model.
    - `config`: any extra JSON-able record to save with the run (may change on resume).
    - `allow_changes`: trajectory settings that may differ from the checkpointed run's
        when resuming (e.g. `("lr",)`, `("data",)`); the schedule settings (`steps`,
        logging, checkpointing, evaluation periods) may always change.
    - `show_progress`: a tqdm bar (process 0 only).
    - `callback`: called as `callback(step, state)` on the host after each compiled
        call. The state is donated to the next step: copy what you keep.

    **Returns:** a [`scoreflow_eqx.TrainResult`][].
    """
    objective = as_objective(
        objective, weighting=weighting, importance_sampling=importance_sampling
    )
    if isinstance(objective, DSMObjective):
        weighting, importance_sampling = objective.weighting, objective.importance_sampling
    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        grad_clip=grad_clip, ema_decay=ema_decay, weighting=weighting,
        importance_sampling=importance_sampling, custom_optimizer=optimizer is not None,
        objective="dsm" if isinstance(objective, DSMObjective) else repr(objective),
        checkpoint_every=checkpoint_every, max_to_keep=max_to_keep, log_every=log_every,
        eval_every=eval_every, eval_ode_every=eval_ode_every,
        eval_num_examples=eval_num_examples, eval_batch_size=eval_batch_size,
        steps_per_jit=steps_per_jit, max_consecutive_nonfinite=max_consecutive_nonfinite,
    )  # fmt: skip
    dataset = as_dataset(data, discretization)
    mesh = data_parallel_mesh(devices)
    _check_config(cfg, dataset, mesh.devices.size, allow_changes)
    _check_flow(flow, dataset, flow_config)
    if optimizer is None:
        optimizer = default_optimizer(lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip)
    run = _Run(flow, dataset, cfg, optimizer, objective, key=key, mesh=mesh, workdir=workdir,
               record_args={"flow_config": flow_config, "extra": config})  # fmt: skip
    try:
        run.open(frozenset(allow_changes))
        start = int(run.state.step)
        show = show_progress and run.is_main
        with tqdm(total=cfg.steps, initial=start, disable=not show, desc="train") as bar:
            path = run.workdir.metrics_path if (run.workdir and run.is_main) else None
            logger = MetricsLogger(path, bar, start)
            run.loop(logger, bar, callback)
    finally:
        run.close()
    state = run.state
    return TrainResult(
        flow=state.flow,
        ema_flow=state.ema_flow,
        losses=logger.losses,
        metrics=logger.records,
        evaluations=logger.evaluations,
        step=int(state.step),
        nonfinite_total=int(state.nonfinite_total),
        state=state,
        data_iterator=run.data_iter,
    )
