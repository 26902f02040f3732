"""Data-parallel sharding: a 1-D mesh over all devices, batch sharded, parameters
replicated (the `eqx.filter_shard` idiom, which needs `AxisType.Auto` axes)."""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


BATCH_AXIS = "batch"


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `"batch"` over `devices` (default: all devices, of every
    process), with `AxisType.Auto` so that `eqx.filter_shard` /
    `with_sharding_constraint` work."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assemble the global batch from this process's slice (multi-host safe): the global
    batch has `process_count * len(local_batch)` examples, sharded over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


def replicate(tree, mesh: Mesh):
    """Copies of every array leaf of `tree` on all devices of `mesh` (never aliasing the
    inputs, so the copies can be donated without deleting the caller's arrays)."""
    sharding = replicated_sharding(mesh)

    def put(x):
        if isinstance(x, jax.Array | np.ndarray):
            # `device_put` may alias the input on one device; `.copy()` never does.
            return jax.device_put(x, sharding).copy()
        return x

    return jax.tree.map(put, tree)
