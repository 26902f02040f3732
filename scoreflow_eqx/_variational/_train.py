"""`sf.train_dequantizer`: fit a dequantizer `q(u | k)` to a frozen score model, with
checkpoints in a work directory (resumed exactly), and `sf.load_dequantizer`."""

import dataclasses
import functools
import hashlib
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Int, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from .._checkpoint import abstract_like, Checkpointer
from .._flow import ScoreFlow
from .._training.config import _finite, _nonnegative_int, _positive_int
from .._training.metrics import MetricsLogger
from .._training.record import describe_flow, key_fingerprint
from .._training.state import default_optimizer
from .._training.step import _all_finite, _learning_rate, _select
from .._training.workdir import CHECKPOINT_DIR, WorkDir
from ..data._dequantizers import AbstractDequantizer
from ..data._discretization import Discretization
from ..data._sources import Dataset, fingerprint
from ._dequantizer import VariationalDequantizer
from ._loss import dequantization_loss


#: The record's layout version.
RECORD_FORMAT = 1
#: The sub-directory of a training run's work directory that `experiments/dequantize.py`
#: uses (and where `load_dequantizer` also looks).
DEQUANTIZER_DIR = "dequantizer"
#: Record sections that may differ when a run resumes (they do not change the trajectory).
_SCHEDULE = ("steps", "checkpoint_every", "max_to_keep", "log_every", "max_consecutive_nonfinite")


class _State(eqx.Module):
    params: PyTree
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray
    nonfinite_count: Int[Array, ""]
    nonfinite_total: Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class DequantizerTrainResult:
    """What [`scoreflow_eqx.train_dequantizer`][] returns.

    **Fields:** `dequantizer` (the trained dequantizer), `losses` (the objective of every
    step of this call, nats per example, numpy), `metrics` (the logged records), `step`
    (the final step) and `nonfinite_total` (updates skipped as non-finite).
    """

    dequantizer: AbstractDequantizer
    losses: np.ndarray
    metrics: list[dict[str, Any]]
    step: int
    nonfinite_total: int


def describe_dequantizer(dequantizer: AbstractDequantizer) -> dict[str, Any]:
    """The hyperparameters that rebuild a [`scoreflow_eqx.VariationalDequantizer`][] (its
    parameters aside)."""
    if not isinstance(dequantizer, VariationalDequantizer):
        raise TypeError(
            "Only a scoreflow_eqx.VariationalDequantizer can be saved and loaded, got "
            f"{type(dequantizer).__name__}."
        )
    first = dequantizer.couplings[0]
    disc = dequantizer.discretization
    return {
        "class": "VariationalDequantizer",
        "num_levels": disc.num_levels,
        "data_range": list(disc.data_range),
        "data_shape": list(dequantizer.data_shape),
        "num_layers": len(dequantizer.couplings),
        "width_size": dequantizer.context.width_size,
        "depth": first.conditioner.depth,
        "context_size": dequantizer.context.out_size,
        "num_bins": first.num_bins,
        "bound": first.bound,
        "dtype": jnp.dtype(dequantizer.dtype).name,
    }


def make_dequantizer(config: dict[str, Any], *, key: PRNGKeyArray) -> VariationalDequantizer:
    """The [`scoreflow_eqx.VariationalDequantizer`][] described by `config` (from
    `describe_dequantizer`), freshly initialised with `key`."""
    disc = Discretization(num_levels=config["num_levels"], data_range=tuple(config["data_range"]))
    options = ("num_layers", "width_size", "depth", "context_size", "num_bins", "bound")
    return VariationalDequantizer(
        disc,
        tuple(config["data_shape"]),
        **{k: config[k] for k in options},
        dtype=config["dtype"],
        key=key,
    )


def _flow_fingerprint(flow: ScoreFlow) -> str:
    h = hashlib.sha1()
    for x in jax.tree.leaves(eqx.filter(flow, eqx.is_inexact_array)):
        h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
    return h.hexdigest()[:16]


def _levels(data, discretization: Discretization) -> np.ndarray:
    """The training levels as int32, checked against the dequantizer's discretization."""
    if isinstance(data, Dataset):
        if data.discretization != discretization:
            raise ValueError(
                f"`dequantizer` was built for {discretization}, but the dataset's "
                f"discretization is {data.discretization}; build it for the data's."
            )
        data = data.train
    array = np.asarray(data)
    if array.ndim < 2 or array.shape[0] < 1:
        raise ValueError(
            f"`data` must have shape (num_examples, *data_shape), got shape {array.shape}."
        )
    k = discretization.num_levels
    assert k is not None
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"`data` must hold the integer levels 0..{k - 1} of the dequantizer's "
            f"discretization (num_levels={k}), got dtype {array.dtype}."
        )
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > k - 1:
        raise ValueError(f"`data` levels must lie in 0..{k - 1}, got values in {lo}..{hi}.")
    return array.astype(np.int32)


@functools.lru_cache(maxsize=16)
def _make_step(optimizer, batch_size: int, num_t: int, num_eps_samples: int):
    """The compiled step `step(flow, state, static, data) -> (state, metrics)`; the flow
    and the data are arguments (not constants baked into the compiled step)."""

    def loss_fn(params, static, flow, batch, key):
        deq = eqx.combine(params, static)
        keys = jr.split(key, batch.shape[0])
        per_example = jax.vmap(
            lambda k, kk: dequantization_loss(
                flow, deq, k, key=kk, num_t=num_t, num_eps_samples=num_eps_samples
            )
        )(batch, keys)
        return jnp.mean(per_example)

    @eqx.filter_jit
    def step(flow, state: _State, static, data):
        # Batches: epoch e is a permutation of the data from `fold_in(key, e)`, so the
        # data order depends on the step and the key only (a resumed run continues it).
        n = data.shape[0]
        per_epoch = n // batch_size
        data_key, noise_key = jr.split(state.key)
        perm = jr.permutation(jr.fold_in(data_key, state.step // per_epoch), n)
        start = (state.step % per_epoch) * batch_size
        batch = data[jax.lax.dynamic_slice_in_dim(perm, start, batch_size)]
        key = jr.fold_in(noise_key, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, static, flow, batch, key)
        with jax.numpy_dtype_promotion("standard"):  # optax's int32 count with floats
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
        params, opt_state = _select(ok, (params, opt_state), (state.params, state.opt_state))
        count = jnp.where(ok, 0, state.nonfinite_count + 1)
        total = state.nonfinite_total + jnp.where(ok, 0, 1)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "nonfinite_count": count,
            "nonfinite_total": total,
        }
        lr = _learning_rate(opt_state)
        if lr is not None:
            metrics["lr"] = lr
        return _State(params, opt_state, state.step + 1, state.key, count, total), metrics

    return step


def _items(state: _State) -> dict[str, Any]:
    meta = {
        "step": state.step,
        "key": state.key,
        "nonfinite_count": state.nonfinite_count,
        "nonfinite_total": state.nonfinite_total,
    }
    return {"params": state.params, "opt_state": state.opt_state, "meta": meta}


def _restore(checkpointer: Checkpointer, state: _State, record: dict) -> _State:
    if checkpointer.latest_step() is None:
        return state
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = checkpointer.restore(abstract_like(_items(state), sharding), quarantine=True)
    if restored is None:
        return state
    saved = restored.record or {}
    diffs = [
        f"{name}: {saved.get(name)!r} -> {record.get(name)!r}"
        for name in sorted(set(saved) | set(record))
        if name != "schedule" and saved.get(name) != record.get(name)
    ]
    if diffs:
        raise ValueError(
            f"{checkpointer.directory} holds another dequantizer run (a different "
            "dequantizer, flow, data, settings or key); what differs:\n  "
            + "\n  ".join(diffs)
            + "\nUse another work directory."
        )
    items, meta = restored.items, restored.items["meta"]
    return _State(
        items["params"],
        items["opt_state"],
        meta["step"],
        meta["key"],
        meta["nonfinite_count"],
        meta["nonfinite_total"],
    )


def _check_settings(dequantizer, flow, levels, batch_size, num_t, num_eps_samples, steps, **ints):
    if not isinstance(flow, ScoreFlow):
        raise TypeError(f"`flow` must be a scoreflow_eqx.ScoreFlow, got {type(flow).__name__}.")
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("num_t", num_t),
        ("num_eps_samples", num_eps_samples),
    ):
        _positive_int(name, value)
    for name, value in ints.items():
        _positive_int(name, value)
    if batch_size > levels.shape[0]:
        raise ValueError(
            f"`batch_size` ({batch_size}) must not exceed the number of training examples "
            f"({levels.shape[0]})."
        )
    shape = getattr(dequantizer, "data_shape", None)
    if shape is not None and tuple(shape) != tuple(levels.shape[1:]):
        raise ValueError(
            f"`dequantizer` was built for examples of shape {tuple(shape)}, but `data` "
            f"has examples of shape {tuple(levels.shape[1:])}."
        )
    if not jax.tree.leaves(eqx.filter(dequantizer, eqx.is_inexact_array)):
        raise ValueError(
            f"`dequantizer` ({type(dequantizer).__name__}) has no parameters to train; "
            "use a scoreflow_eqx.VariationalDequantizer."
        )


def train_dequantizer(
    flow: ScoreFlow,
    dequantizer: AbstractDequantizer,
    data: Dataset | ArrayLike,
    *,
    key: PRNGKeyArray,
    steps: int,
    batch_size: int = 64,
    optimizer: optax.GradientTransformation | None = None,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    grad_clip: float | None = 1.0,
    num_t: int = 4,
    num_eps_samples: int = 1,
    workdir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    max_to_keep: int = 2,
    log_every: int = 50,
    max_consecutive_nonfinite: int = 20,
    show_progress: bool = True,
) -> DequantizerTrainResult:
    """Train a dequantizer `q(u | k)` for a frozen score model by variational
    dequantization (Ho et al. 2019, Flow++; Song et al. 2021, Section 5.2): minimise

    `E_k E_{u ~ q(. | k)}[L(x) + log q(u | k)]`, `x = a (k + u) / K + b`,

    with `L` the Theorem 3 upper bound on `-log p_SDE(x)` estimated with `num_t`
    importance-sampled times per example ([`scoreflow_eqx.dequantization_loss`][]);
    the objective minus `D log(a / K)` upper-bounds the discrete NLL `-log P(k)`.

    One jit-compiled step (the flow and the data are its arguments): a minibatch (epoch
    `e` is a permutation of the data drawn from the key and `e`), the reparameterised
    objective and its gradient in the dequantizer's parameters (the flow gets none),
    `optimizer.update`; an update whose loss, gradients or new parameters are not finite
    is skipped. With a `workdir`, orbax checkpoints (parameters, optimizer state, step,
    key; checksummed) are written there and an existing run is resumed from its latest
    one, exactly: the data order and the noise depend only on the key and the step.

    **Arguments:**

    - `flow`: the trained [`scoreflow_eqx.ScoreFlow`][] (frozen).
    - `dequantizer`: the initial dequantizer, e.g. a
        [`scoreflow_eqx.VariationalDequantizer`][] (which starts exactly uniform).
    - `data`: a [`scoreflow_eqx.data.Dataset`][] (its training split) or an integer array
        of levels `(num_examples, *data_shape)`, for the dequantizer's discretization.
    - `key`: PRNG key (keyword-only) for the data order and the noise.
    - `steps`: total optimisation steps (a resumed run continues up to it).
    - `batch_size`: examples per step (at most the number of examples).
    - `optimizer`: an `optax.GradientTransformation`; default
        [`scoreflow_eqx.default_optimizer`][]`(lr=lr, warmup_steps=warmup_steps,
        grad_clip=grad_clip)` (Adam, linear warm-up, global-norm clipping).
    - `lr`, `warmup_steps`, `grad_clip`: of the default optimizer (unused with
        `optimizer=`).
    - `num_t`, `num_eps_samples`: times and eps-correction draws of the bound per
        example and step.
    - `workdir`: a directory for checkpoints, `config.json` and `metrics.jsonl` (one
        writer at a time); `None` for none.
    - `checkpoint_every`, `max_to_keep`, `log_every`: checkpoint and metrics periods.
    - `max_consecutive_nonfinite`: stop with a `FloatingPointError` after this many
        consecutive skipped updates.
    - `show_progress`: a tqdm bar with the loss.

    **Returns:** a [`scoreflow_eqx.DequantizerTrainResult`][]; load a saved run with
    [`scoreflow_eqx.load_dequantizer`][].

    ??? cite "Reference"

        ```bibtex
        @inproceedings{ho2019flow++,
            title={Flow++: Improving Flow-Based Generative Models with Variational
                   Dequantization and Architecture Design},
            author={Ho, Jonathan and Chen, Xi and Srinivas, Aravind and Duan, Yan and
                    Abbeel, Pieter},
            booktitle={ICML},
            year={2019}
        }
        @inproceedings{song2021maximum,
            title={Maximum Likelihood Training of Score-Based Diffusion Models},
            author={Song, Yang and Durkan, Conor and Murray, Iain and Ermon, Stefano},
            booktitle={NeurIPS},
            year={2021}
        }
        ```
    """
    if not isinstance(dequantizer, AbstractDequantizer):
        raise TypeError(
            "`dequantizer` must be a scoreflow_eqx.data.AbstractDequantizer (e.g. "
            f"sf.VariationalDequantizer), got {type(dequantizer).__name__}."
        )
    levels = _levels(data, dequantizer.discretization)
    _check_settings(
        dequantizer,
        flow,
        levels,
        batch_size,
        num_t,
        num_eps_samples,
        steps,
        checkpoint_every=checkpoint_every,
        max_to_keep=max_to_keep,
        log_every=log_every,
        max_consecutive_nonfinite=max_consecutive_nonfinite,
    )
    custom = optimizer is not None
    if optimizer is None:
        _nonnegative_int("warmup_steps", warmup_steps)
        _finite("lr", lr, low=0.0, closed=False)
        optimizer = default_optimizer(lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip)
    params, static = eqx.partition(dequantizer, eqx.is_inexact_array)
    zero = jnp.asarray(0, jnp.int32)
    state = _State(params, optimizer.init(params), zero, key, zero, zero)
    # Committed to one device, as a restored state is: the compiled step is then reused
    # after a resume (jit specialises on the arrays' placement).
    state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    record = _record(
        dequantizer,
        flow,
        levels,
        key,
        optimizer_is_custom=custom,
        settings=dict(
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup_steps,
            grad_clip=grad_clip,
            num_t=num_t,
            num_eps_samples=num_eps_samples,
        ),
        schedule=dict(steps=steps, checkpoint_every=checkpoint_every, log_every=log_every),
    )
    step_fn = _make_step(optimizer, batch_size, num_t, num_eps_samples)
    loop = _Loop(workdir, max_to_keep, record)
    try:
        state = loop.open(state)
        start = int(state.step)
        with tqdm(total=steps, initial=start, disable=not show_progress, desc="dequantizer") as bar:
            logger = MetricsLogger(loop.metrics_path, bar, start)
            state = loop.run(
                step_fn,
                flow,
                state,
                static,
                jnp.asarray(levels),
                logger,
                bar,
                steps=steps,
                checkpoint_every=checkpoint_every,
                log_every=log_every,
                max_nonfinite=max_consecutive_nonfinite,
            )
    finally:
        loop.close()
    return DequantizerTrainResult(
        dequantizer=eqx.combine(state.params, static),
        losses=logger.losses,
        metrics=logger.records,
        step=int(state.step),
        nonfinite_total=int(state.nonfinite_total),
    )


def _record(dequantizer, flow, levels, key, *, optimizer_is_custom, settings, schedule) -> dict:
    try:
        deq = describe_dequantizer(dequantizer)
    except TypeError:
        deq = {"class": type(dequantizer).__name__}
    return {
        "format": RECORD_FORMAT,
        "dequantizer": deq,
        "flow": {**describe_flow(flow), "params_sha1": _flow_fingerprint(flow)},
        "data": {"shape": list(levels.shape), "sha1": fingerprint(levels)},
        "train": {**settings, "custom_optimizer": optimizer_is_custom},
        "seed": key_fingerprint(key),
        "schedule": schedule,
    }


class _Loop:
    """The work directory (lock, checkpoints, metrics) and the loop over steps."""

    def __init__(self, workdir, max_to_keep: int, record: dict):
        self.record = record
        self.workdir = None if workdir is None else WorkDir(workdir)
        self.checkpointer = None
        self.max_to_keep = max_to_keep

    @property
    def metrics_path(self) -> str | None:
        return None if self.workdir is None else self.workdir.metrics_path

    def open(self, state: _State) -> _State:
        if self.workdir is None:
            return state
        self.workdir.lock()
        self.checkpointer = Checkpointer(self.workdir.checkpoint_dir, max_to_keep=self.max_to_keep)
        state = _restore(self.checkpointer, state, self.record)
        self.workdir.write_config(self.record)
        return state

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.workdir is not None:
            self.workdir.unlock()

    def run(
        self,
        step_fn,
        flow,
        state,
        static,
        data,
        logger,
        bar,
        *,
        steps,
        checkpoint_every,
        log_every,
        max_nonfinite,
    ) -> _State:
        step = int(state.step)
        while step < steps:
            state, metrics = step_fn(flow, state, static, data)
            step += 1
            logger.add(metrics)
            bar.update(1)
            if step % log_every == 0 or step == steps:
                logger.flush(step)
                streak = logger.nonfinite_count
                if streak >= max_nonfinite:
                    raise FloatingPointError(
                        f"Dequantizer training diverged: the last {streak} updates (to step "
                        f"{step}) had a non-finite loss, gradient or parameters and were "
                        "skipped. Lower the learning rate or raise `max_consecutive_nonfinite`."
                    )
            if self.checkpointer is not None and (step % checkpoint_every == 0 or step == steps):
                self.checkpointer.save(step, _items(state), record=self.record)
        return state


def load_dequantizer(
    workdir: str | os.PathLike,
) -> tuple[VariationalDequantizer, dict[str, Any]]:
    """Load the dequantizer trained by [`scoreflow_eqx.train_dequantizer`][] with
    `workdir=...` (or, given a training run's work directory, the one in its
    `dequantizer/` sub-directory, where `experiments/dequantize.py` writes it).

    The dequantizer is rebuilt from the record stored in the checkpoint and its arrays'
    checksums are verified (an unreadable latest checkpoint falls back to the previous
    one, with a warning).

    **Returns:** `(dequantizer, info)` with `info["step"]` and `info["record"]` (the run
    record: the dequantizer's hyperparameters, the flow's fingerprint, the settings).
    """
    where = os.path.abspath(os.fspath(workdir))
    if os.path.isdir(os.path.join(where, DEQUANTIZER_DIR, CHECKPOINT_DIR)):
        where = os.path.join(where, DEQUANTIZER_DIR)  # a training run's work directory
    ckpt_dir = os.path.join(where, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"{where} holds no trained dequantizer (no {CHECKPOINT_DIR}/).")
    with Checkpointer(ckpt_dir) as checkpointer:
        latest = checkpointer.latest_step()
        if latest is None:
            raise ValueError(f"{where} has no dequantizer checkpoints.")
        record = checkpointer.read_record(latest) or {}
        config = record.get("dequantizer", {})
        if config.get("class") != "VariationalDequantizer":
            raise ValueError(f"The run in {where} did not record a loadable dequantizer.")
        like = eqx.filter_eval_shape(make_dequantizer, config, key=jr.key(0))
        params, static = eqx.partition(like, lambda x: isinstance(x, jax.ShapeDtypeStruct))
        restored = checkpointer.restore({"params": params})
    if restored is None:
        raise ValueError(f"No checkpoint in {where} could be restored.")
    deq = eqx.combine(restored.items["params"], static)
    return deq, {"step": restored.step, "record": restored.record, "workdir": where}
