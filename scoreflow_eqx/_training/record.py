"""The run record: the whole description of a training run (model, SDE, data identity,
training settings, seeds), saved with every checkpoint, compared when a run resumes, and
used by `load_flow` to rebuild the model."""

import hashlib
import json
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from .._factory import make_flow
from .._flow import ScoreFlow
from ..data._sources import Dataset, fingerprint
from .config import ADDED_LATER, SCHEDULE_FIELDS, TrainConfig


#: The version of the record's layout.
RECORD_FORMAT = 2


def _is_param(x) -> bool:
    # Inexact arrays, also as the `ShapeDtypeStruct`s of `eqx.filter_eval_shape`.
    if isinstance(x, jax.ShapeDtypeStruct):
        return bool(jnp.issubdtype(x.dtype, jnp.inexact))
    return eqx.is_inexact_array(x)


def describe_flow(flow: ScoreFlow) -> dict[str, Any]:
    """What identifies a flow apart from its parameter values: the SDE (its repr holds
    every parameter), the parameterization, `eps`, the conditioning, the net's class,
    and the shapes of every parameter array by tree path."""
    params = eqx.filter(flow, _is_param)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    shapes = {jax.tree_util.keystr(p): list(x.shape) for p, x in flat}
    return {
        "sde": repr(flow.sde),
        "parameterization": flow.parameterization,
        "eps": flow.eps,
        "conditioning": repr(flow.conditioning),
        "net": type(flow.net).__qualname__,
        "num_params": int(sum(math.prod(s) for s in shapes.values())),
        "param_shapes_sha1": fingerprint_json(shapes),
    }


def fingerprint_json(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def describe_data(dataset: Dataset) -> dict[str, Any]:
    """The identity of the training data: name, shape, discretization, size and a hash
    of the training split's contents."""
    disc = dataset.discretization
    return {
        "name": dataset.name,
        "data_shape": list(dataset.data_shape),
        "num_levels": disc.num_levels,
        "data_range": list(disc.data_range),
        "num_train": int(len(dataset.train)),
        "train_sha1": fingerprint(dataset.train),
    }


def check_flow_config(flow: ScoreFlow, flow_config: dict[str, Any]) -> None:
    """Raise unless `flow_config` builds a flow of the same description as `flow`."""
    try:
        built = eqx.filter_eval_shape(make_flow, flow_config)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"`flow_config` does not build a flow: {e}") from e
    ours, theirs = describe_flow(flow), describe_flow(built)
    diff = [k for k in ours if ours[k] != theirs[k]]
    if diff:
        raise ValueError(
            "`flow_config` does not describe the flow being trained: they differ in "
            + ", ".join(f"{k} ({theirs[k]!r} in the config, {ours[k]!r} in the flow)" for k in diff)
            + ". Pass the config that built the flow (sf.flow_config + sf.make_flow)."
        )


def key_fingerprint(key) -> str:
    return fingerprint(jax.device_get(jr.key_data(key)))


def run_record(
    flow: ScoreFlow,
    flow_config: dict[str, Any] | None,
    dataset: Dataset,
    config: TrainConfig,
    *,
    key,
    data_seed: int,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The JSON-able record of a run."""
    return {
        "format": RECORD_FORMAT,
        "flow_config": flow_config,
        "model": describe_flow(flow),
        "data": describe_data(dataset),
        "train": config.to_json(),
        "seed": {"key": key_fingerprint(key), "data_seed": data_seed},
        "extra": extra or {},
    }


#: What `allow_changes` may name: the trajectory-defining training settings, the data,
#: and the seeds.
CHANGEABLE: tuple[str, ...] = tuple(
    sorted(set(TrainConfig.__dataclass_fields__) - set(SCHEDULE_FIELDS))
) + ("data", "seed")


def record_differences(saved: dict, current: dict, allow: frozenset[str]) -> list[str]:
    """The differences between a saved record and the current run's that matter: every
    section but `extra`, the schedule fields of `train` and what `allow` names."""
    diffs = []
    for section in ("flow_config", "model", "data", "seed", "train"):
        old, new = saved.get(section), current.get(section)
        if section in ("data", "seed") and section in allow:
            continue
        if section != "train" or not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                diffs.append(f"{section}: {old!r} -> {new!r}")
            continue
        for name in sorted(set(old) | set(new)):
            if name in SCHEDULE_FIELDS or name in allow:
                continue
            # A field added later has, in an older record, the value older runs had.
            if old.get(name, ADDED_LATER.get(name)) != new.get(name, ADDED_LATER.get(name)):
                diffs.append(f"train.{name}: {old.get(name)!r} -> {new.get(name)!r}")
    return diffs
