"""The on-disk format of a training run's work directory: `config.json` (the run record,
for humans), `metrics.jsonl`, `checkpoints/` (orbax; each holds the state keyed by tree
path, checksums and the run record) and a lock held by the one process that writes it;
restoring a run's state, and `load_flow`."""

import fcntl
import json
import os
import socket
import warnings
from typing import Any

import equinox as eqx
import jax
import numpy as np

from .._checkpoint import abstract_like, Checkpointer, CheckpointMismatchError
from .._factory import make_flow
from .._flow import ScoreFlow
from ..data._discretization import Discretization
from .record import describe_flow, record_differences
from .state import TrainState


CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"


class WorkDirLocked(RuntimeError):
    """Another live process is writing to the work directory."""


class RunRecordError(ValueError):
    """A run record is incomplete, or does not describe the model it is loaded into."""


class WorkDir:
    """A training run's work directory.

    **Arguments:** `path`, created if needed (it must be writable).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        try:
            os.makedirs(self.path, exist_ok=True)
            probe = os.path.join(self.path, f".write_test_{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"The work directory {self.path!r} is not writable: {e}") from e
        self._lock_file = None

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.path, CHECKPOINT_DIR)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.path, METRICS_FILE)

    def lock(self) -> None:
        """Take the work directory's lock for this process's lifetime (an OS file lock:
        released when the process ends, however it ends). A second writer fails at once
        with `WorkDirLocked`."""
        f = open(os.path.join(self.path, LOCK_FILE), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkDirLocked(
                f"The work directory {self.path} is in use by {holder}: one training "
                "process per work directory. Wait for it to finish, or use another "
                "--workdir."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def write_config(self, record: dict[str, Any]) -> None:
        path = os.path.join(self.path, CONFIG_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def state_items(state: TrainState) -> dict[str, Any]:
    """The checkpoint items of a training state (pytrees of arrays)."""
    return {
        "params": eqx.filter(state.flow, eqx.is_inexact_array),
        "ema_params": state.ema_params,
        "opt_state": state.opt_state,
        "meta": {
            "step": state.step,
            "key": state.key,
            "nonfinite_count": state.nonfinite_count,
            "nonfinite_total": state.nonfinite_total,
        },
    }


def _state_from_items(template: TrainState, items: dict[str, Any]) -> TrainState:
    static = eqx.filter(template.flow, eqx.is_inexact_array, inverse=True)
    meta = items["meta"]
    return TrainState(
        flow=eqx.combine(items["params"], static),
        ema_params=items["ema_params"],
        opt_state=items["opt_state"],
        step=meta["step"],
        key=meta["key"],
        nonfinite_count=meta["nonfinite_count"],
        nonfinite_total=meta["nonfinite_total"],
    )


def _check_same_run(saved: dict | None, record: dict, allow: frozenset[str], where: str):
    diffs = record_differences(saved or {}, record, allow)
    if diffs:
        raise ValueError(
            f"{where} holds another run (a different model, data or training settings) "
            "than this one; what differs:\n  "
            + "\n  ".join(diffs)
            + "\nUse another work directory; to continue it on purpose with changed "
            "training settings, data or seed, name them in `allow_changes=` "
            "(`--allow-change NAME` on the command line)."
        )


def restore_state(
    checkpointer: Checkpointer,
    state: TrainState,
    record: dict[str, Any],
    *,
    data_iterator,
    sharding,
    allow: frozenset[str],
) -> TrainState:
    """The state of the latest readable checkpoint (and the data iterator positioned
    after it), after checking that its run record matches `record` (else a ValueError
    that names every difference)."""
    latest = checkpointer.latest_step()
    if latest is None:
        return state
    try:  # compare early, for a message naming the differences (not just the shapes)
        saved = checkpointer.read_record(latest) if checkpointer.layout(latest) == "paths" else None
    except Exception:  # noqa: BLE001 - unreadable: `restore` falls back and we compare then
        saved = None
    if saved is not None:
        _check_same_run(saved, record, allow, checkpointer.directory)
    abstract = abstract_like(state_items(state), sharding)
    restored = checkpointer.restore(abstract, data_iterator=data_iterator, quarantine=True)
    if restored is None:
        return state
    _check_same_run(restored.record, record, allow, checkpointer.directory)
    return _state_from_items(state, restored.items)


def _discretization(data: dict[str, Any]) -> Discretization:
    return Discretization(num_levels=data["num_levels"], data_range=tuple(data["data_range"]))


def _model_differences(record: dict[str, Any], flow: ScoreFlow, *, classes_only=()) -> str:
    saved, ours = record["model"], describe_flow(flow)

    def same(k):
        if k in classes_only:  # compare the class names of these reprs only
            return str(saved[k]).split("(")[0] == str(ours.get(k)).split("(")[0]
        return saved[k] == ours.get(k)

    diff = [k for k in saved if not same(k)]
    return ", ".join(f"{k} ({ours.get(k)!r} vs {saved[k]!r} saved)" for k in diff)


def _template(record: dict[str, Any], like: ScoreFlow | None, where: str) -> ScoreFlow:
    if like is None:
        if record.get("flow_config") is None:
            raise RunRecordError(
                f"The run in {where} was trained without `flow_config`; pass `like=` (a "
                "flow of the same structure)."
            )
        # `make_flow` fills keys missing from a config with defaults: the flow it builds
        # must still be the recorded model. (The SDE and conditioning by class: equinox's
        # repr of a float field read back from JSON shows it even at its default value.)
        flow = make_flow(record["flow_config"])
        diff = _model_differences(record, flow, classes_only=("sde", "conditioning"))
        if diff:
            raise RunRecordError(
                f"The flow_config recorded in {where} does not rebuild the recorded model "
                f"(missing or changed keys?): it differs in {diff}"
            )
        return flow
    diff = _model_differences(record, like)
    if diff:
        raise RunRecordError(f"`like` is not the model of {where}: it differs in {diff}")
    return like


_RECORD_KEYS = ("flow_config", "model", "data", "train")


def _load_old_layout(checkpointer: Checkpointer, step: int, like, ema: bool, where: str):
    # The first layout: leaf lists, and the run config as the `config` item.
    config = checkpointer.read_record(step) or {}
    if like is None:
        if config.get("flow") is None:
            raise ValueError(f"The run in {where} was trained without `flow_config`; pass `like=`.")
        like = make_flow(config["flow"])
    params, static = eqx.partition(like, eqx.is_inexact_array)
    name = "ema_params" if ema else "params"
    params = checkpointer.restore_leaf_list(step, name, abstract_like(params))
    ds = config["dataset"]
    data = {
        "name": ds["name"],
        "data_shape": ds["data_shape"],
        "num_levels": ds["num_levels"],
        "data_range": ds["data_range"],
    }
    return eqx.combine(params, static), config, data


def load_flow(
    workdir: str | os.PathLike, *, ema: bool = True, like: ScoreFlow | None = None
) -> tuple[ScoreFlow, dict[str, Any]]:
    """Load a trained flow from a work directory written by [`scoreflow_eqx.train`][].

    The model is rebuilt from the run record stored inside the checkpoint (not from
    `config.json`, which is a copy for humans), and the checkpoint's checksums are
    verified; a corrupted latest checkpoint falls back to the previous one with a
    warning. Checkpoints of the package's first layout (leaf lists) still load.

    **Arguments:**

    - `workdir`: the work directory.
    - `ema`: load the EMA parameters (default) or the raw ones.
    - `like`: a flow with the right structure, needed only when the run was trained
        without a `flow_config` (it must match the recorded model).

    **Returns:** `(flow, info)` where `info` has `"data_shape"`, `"discretization"` (a
    [`scoreflow_eqx.data.Discretization`][]), `"config"` (the run record), `"step"` and
    `"dataset"` (its name).
    """
    where = os.path.abspath(os.fspath(workdir))
    ckpt_dir = os.path.join(where, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"{where} has no {CHECKPOINT_DIR}/: not a training work directory.")
    with Checkpointer(ckpt_dir) as checkpointer:
        steps = checkpointer.all_steps()
        if not steps:
            raise ValueError(f"{where} has no checkpoints.")
        for i, step in enumerate(reversed(steps)):
            try:
                flow, record, data = _load_step(checkpointer, step, like, ema, where)
            except (CheckpointMismatchError, RunRecordError):
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                older = len(steps) - i - 1
                next_ = f"falling back to step {steps[older - 1]}" if older else "none is left"
                warnings.warn(
                    f"Checkpoint at step {step} in {where} could not be loaded "
                    f"({type(e).__name__}: {str(e)[:300]}); {next_}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            info = {
                "data_shape": tuple(data["data_shape"]),
                "discretization": _discretization(data),
                "config": record,
                "step": step,
                "dataset": data["name"],
            }
            return flow, info
    raise ValueError(f"No checkpoint in {where} could be loaded (see the warnings).")


def _load_step(checkpointer: Checkpointer, step: int, like, ema: bool, where: str):
    if checkpointer.layout(step) == "leaf-lists":
        return _load_old_layout(checkpointer, step, like, ema, where)
    record = checkpointer.read_record(step) or {}
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        raise RunRecordError(
            f"The checkpoint at step {step} in {where} has an incomplete run record "
            f"(missing {missing}); it cannot be loaded safely."
        )
    params, static = eqx.partition(_template(record, like, where), eqx.is_inexact_array)
    name = "ema_params" if ema else "params"
    abstract = checkpointer.as_stored(step, name, abstract_like(params))
    restored = checkpointer.restore_step(step, {name: abstract})
    return eqx.combine(restored.items[name], static), record, record["data"]


def all_finite(tree) -> bool:
    """Whether every inexact array of `tree` is finite (on the host)."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves)
