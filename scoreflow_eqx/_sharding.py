"""Data-parallel sharding: a 1-D mesh over all devices, batch sharded, parameters
replicated (the `eqx.filter_shard` idiom, which needs `AxisType.Auto` axes)."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


BATCH_AXIS = "batch"


def data_parallel_mesh(devices: Sequence[Any] | None = None) -> Mesh:
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


def replicate(tree, mesh: Mesh):
    """Copies of every array leaf of `tree` on all devices of `mesh` (never aliasing the
    inputs, so the copies can be donated without deleting the caller's arrays).

    On several processes (`jax.distributed`) every process must pass the same values;
    each places them on its own devices of the mesh."""
    sharding = replicated_sharding(mesh)

    def put(x):
        if not isinstance(x, jax.Array | np.ndarray):
            return x
        if jax.process_count() == 1:
            # `device_put` may alias the input on one device; `.copy()` never does.
            return jax.device_put(x, sharding).copy()
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.wrap_key_data(put(jr.key_data(x)), impl=jr.key_impl(x))
        # `device_put` refuses devices of other processes: build the global array from
        # this process's copy.
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)
