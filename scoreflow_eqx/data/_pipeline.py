"""grain input pipelines: shuffle, repeat, batch; per-process slices. Batches of discrete
data are integer levels: they are dequantized on device, inside the training step, by the
same dequantizer objects that evaluation uses (`scoreflow_eqx.data.UniformDequantizer`)."""

import grain
import jax
import jax.numpy as jnp
import numpy as np

from ._discretization import Discretization
from ._sources import Dataset, fingerprint


class ArraySource:
    """A grain random-access source over a numpy array, with a stable, content-aware
    `repr` (grain checks `repr(source)` when restoring an iterator state, so a
    checkpoint cannot silently resume on different data)."""

    def __init__(self, array: np.ndarray, name: str = "array"):
        self._array = np.asarray(array)
        self._name = name
        self._fingerprint = fingerprint(self._array)

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, index):
        return self._array[index]

    def __repr__(self) -> str:
        return (
            f"ArraySource(name={self._name!r}, shape={self._array.shape}, "
            f"dtype={self._array.dtype.str}, sha1={self._fingerprint})"
        )


def make_pipeline(
    data: Dataset | np.ndarray,
    *,
    batch_size: int,
    seed: int,
    discretization: Discretization | None = None,
    split: str = "train",
    shuffle: bool = True,
    repeat: bool = True,
    dtype=None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """A deterministic, checkpointable grain pipeline of batches.

    `MapDataset.source(...)[process_index::process_count].seed(seed).shuffle().repeat()
    .batch(drop_remainder=True).to_iter_dataset()`.

    Iterate with `it = iter(pipeline)`; `it.get_state()` / `it.set_state(state)` (or
    `grain.checkpoint.CheckpointSave(it)` with orbax) resume at the identical next
    batch. Discrete data come out as their integer levels (dequantize them on device
    with a [`scoreflow_eqx.data.AbstractDequantizer`][], as `sf.train` does), continuous
    data as floats of `dtype`.

    **Arguments:**

    - `data`: a [`scoreflow_eqx.data.Dataset`][] (then `split` picks `"train"` or
        `"test"`) or an array shaped `(N, *data_shape)` (then pass `discretization`).
    - `batch_size`: examples per batch *on this process* (the global batch divided by
        `process_count`); the last incomplete batch is dropped.
    - `seed`: shuffling and dequantization seed.
    - `discretization`: required for arrays; taken from the dataset otherwise.
    - `shuffle`, `repeat`: shuffle every epoch; repeat forever.
    - `dtype`: the dtype of continuous data (default: JAX's default float dtype, so
        float64 when x64 is enabled); levels keep their integer dtype.
    - `process_index`, `process_count`: this process's slice of the data (default
        `jax.process_index()` / `jax.process_count()`).

    **Returns:** a `grain.IterDataset` of arrays shaped `(batch_size, *data_shape)`.
    """
    if isinstance(data, Dataset):
        if split not in ("train", "test"):
            raise ValueError(f"Unknown split {split!r}; valid splits are ['train', 'test'].")
        array = getattr(data, split)
        discretization = data.discretization if discretization is None else discretization
        name = f"{data.name}/{split}"
    else:
        array = np.asarray(data)
        name = "array"
        if discretization is None:
            raise ValueError("Pass `discretization=` when `data` is an array.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size!r}.")
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(ArraySource(array, name))
    if pc > 1:
        ds = ds[pi::pc]
    if len(ds) < batch_size:
        raise ValueError(
            f"{name}: {len(ds)} examples on this process, fewer than one batch of {batch_size}."
        )
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    if not discretization.is_discrete:
        ds = ds.map(_Cast(jnp.zeros(()).dtype if dtype is None else dtype))
    return ds.to_iter_dataset()


class _Cast(grain.transforms.Map):
    # A named transform with a stable repr (grain checks reprs when restoring state).
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def map(self, element):  # pyright: ignore[reportIncompatibleMethodOverride]
        return np.asarray(element, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"Cast({self.dtype.str})"
