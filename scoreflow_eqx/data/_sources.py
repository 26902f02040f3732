"""Datasets: scikit-learn's digits, 2-D toy densities and users' own arrays.

Every dataset carries its [`scoreflow_eqx.data.Discretization`][], so that training
(dequantization) and evaluation (bits/dim) see the same description of the values.
Discrete data are stored as integer levels `k in {0..K-1}`; continuous data as float32
arrays already in model space.
"""

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable

import numpy as np

from ._discretization import Discretization


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset record.

    **Fields:**

    - `name`: a short name (`"digits"`, `"two_moons"`, a file name, ...).
    - `train`, `test`: numpy arrays shaped `(N, *data_shape)`: integer levels for
        discrete data (`discretization.num_levels` is not `None`), float32 model-space
        values for continuous data.
    - `discretization`: how levels map to model space (and hence the bits/dim offset).
    - `data_shape`: the shape of one example.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    discretization: Discretization
    data_shape: tuple[int, ...]

    def __post_init__(self):
        for split in ("train", "test"):
            arr = getattr(self, split)
            if tuple(arr.shape[1:]) != tuple(self.data_shape):
                raise ValueError(
                    f"{self.name}: {split} examples have shape {arr.shape[1:]}, "
                    f"expected {self.data_shape}."
                )
        check_values(self.train, self.discretization, what=f"{self.name} (train)")
        if len(self.test):
            check_values(self.test, self.discretization, what=f"{self.name} (test)")

    @property
    def dim(self) -> int:
        """Number of dimensions `D` of one example."""
        return math.prod(self.data_shape)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.train.shape}, "
            f"test={self.test.shape}, discretization={self.discretization!r})"
        )


def check_values(array: np.ndarray, discretization: Discretization, *, what: str) -> None:
    """Raise a ValueError unless `array` holds valid values for `discretization`: finite
    everywhere, and integer levels in `[0, num_levels)` for discrete data."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{what}: expected a numeric array, got dtype {array.dtype}.")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            idx = np.argwhere(bad)[0]
            raise ValueError(
                f"{what}: {int(bad.sum())} non-finite value(s) (NaN or inf), the first "
                f"at index {tuple(int(i) for i in idx)}."
            )
    if discretization.num_levels is not None:
        k = discretization.num_levels
        if array.dtype.kind == "f" and not np.all(array == np.round(array)):
            raise ValueError(
                f"{what}: discrete data (num_levels={k}) must hold integer levels; "
                "found non-integer values. Pass num_levels=None for continuous data."
            )
        if array.size and (array.min() < 0 or array.max() > k - 1):
            raise ValueError(
                f"{what}: levels must lie in [0, {k - 1}] for num_levels={k}; "
                f"found values "
                f"in [{array.min()}, {array.max()}]."
            )


def _levels(array: np.ndarray, num_levels: int) -> np.ndarray:
    dtype = np.uint8 if num_levels <= 256 else np.int32
    return np.asarray(np.round(array)).astype(dtype)


# ----------------------------------------------------------------------------- digits


DIGITS_NUM_TEST = 297


def digits() -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 17 grey levels `0..16`),
    shaped `(1, 8, 8)` and mapped to `[-1, 1]`. The split is fixed: the last 297 images
    are the test set, the first 1500 the training set. The data ship with scikit-learn
    (no download)."""
    from sklearn.datasets import load_digits

    images = np.asarray(getattr(load_digits(), "images")).reshape(-1, 1, 8, 8)
    images = _levels(images, 17)
    return Dataset(
        name="digits",
        train=images[:-DIGITS_NUM_TEST],
        test=images[-DIGITS_NUM_TEST:],
        discretization=Discretization(num_levels=17, data_range=(-1.0, 1.0)),
        data_shape=(1, 8, 8),
    )


# ----------------------------------------------------------------------------- 2-D toys


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - rng.integers(0, 2, n) * 2.0
    x2 = x2 + (np.floor(x1) % 2)
    return np.stack([x1, x2], axis=1) * 2.0


def _two_moons(rng: np.random.Generator, n: int) -> np.ndarray:
    upper = rng.integers(0, 2, n).astype(bool)
    angle = rng.uniform(0, np.pi, n)
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    pts = np.stack([x - 0.5, y - 0.25], axis=1) * 2.0
    return pts + 0.1 * rng.standard_normal((n, 2))


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    angles = 2 * np.pi * rng.integers(0, 8, n) / 8
    centres = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centres + 0.2 * rng.standard_normal((n, 2))


def _swiss_roll(rng: np.random.Generator, n: int) -> np.ndarray:
    s = 1.5 * np.pi * (1 + 2 * rng.uniform(0, 1, n))
    pts = np.stack([s * np.cos(s), s * np.sin(s)], axis=1) / 5.0
    return pts + 0.1 * rng.standard_normal((n, 2))


TOYS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "checkerboard": _checkerboard,
    "eight_gaussians": _eight_gaussians,
    "swiss_roll": _swiss_roll,
    "two_moons": _two_moons,
}


def toy(name: str, *, seed: int = 0, num_train: int = 50_000, num_test: int = 10_000) -> Dataset:
    """A continuous 2-D toy density (`"checkerboard"`, `"eight_gaussians"`,
    `"swiss_roll"`, `"two_moons"`), drawn deterministically from `seed` (the test set
    from an independent stream). The values are roughly in `[-4, 4]^2` and are used as
    they are (no discretization: bits/dim are those of the continuous density)."""
    if name not in TOYS:
        raise ValueError(f"Unknown toy dataset {name!r}; valid toys are {sorted(TOYS)}.")
    train_rng, test_rng = (np.random.default_rng([seed, i]) for i in range(2))
    make = TOYS[name]
    return Dataset(
        name=name,
        train=make(train_rng, num_train).astype(np.float32),
        test=make(test_rng, num_test).astype(np.float32),
        discretization=Discretization(num_levels=None),
        data_shape=(2,),
    )


# ----------------------------------------------------------------------------- arrays


def from_arrays(
    train: np.ndarray,
    test: np.ndarray | None = None,
    *,
    num_levels: int | None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    name: str = "arrays",
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """A dataset from in-memory arrays shaped `(N, *data_shape)`.

    **Arguments:**

    - `train`: training examples. Integer levels in `[0, num_levels)` for discrete data;
        model-space floats for continuous data (`num_levels=None`).
    - `test`: test examples; if `None`, a seeded random `test_fraction` of `train` is
        held out.
    - `num_levels`: the number of discrete levels, or `None` for continuous data.
    - `data_range`: model-space `(low, high)` of the levels (see `Discretization`).
    - `name`, `test_fraction`, `seed`: as described above.

    **Returns:** a [`scoreflow_eqx.data.Dataset`][]. NaN/inf values or levels out of
    range raise a ValueError.
    """
    low, high = data_range
    discretization = Discretization(num_levels=num_levels, data_range=(low, high))
    train = np.asarray(train)
    if train.ndim < 2:
        raise ValueError(
            f"{name}: expected an array shaped (num_examples, *data_shape), got shape "
            f"{train.shape}."
        )
    check_values(train, discretization, what=name)
    if test is None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"`test_fraction` must lie in (0, 1), got {test_fraction!r}.")
        perm = np.random.default_rng(seed).permutation(len(train))
        num_test = max(1, int(round(test_fraction * len(train))))
        train, test = train[perm[num_test:]], train[perm[:num_test]]
    test = np.asarray(test)
    check_values(test, discretization, what=f"{name} (test)")

    def convert(a):
        if num_levels is None:
            return a.astype(np.float32)
        return _levels(a, num_levels)

    return Dataset(
        name=name,
        train=convert(train),
        test=convert(test),
        discretization=discretization,
        data_shape=tuple(int(s) for s in train.shape[1:]),
    )


NPZ_KEYS = (("train", "test"), ("x_train", "x_test"))


def _npz_arrays(path: str, arrays: dict) -> tuple[np.ndarray, np.ndarray | None]:
    # (train, test) from the arrays of a .npz file; anything ambiguous is refused.
    known = [k for pair in NPZ_KEYS for k in pair]
    pairs = [(tr, te) for tr, te in NPZ_KEYS if tr in arrays or te in arrays]
    if len(pairs) > 1:
        raise ValueError(
            f"{path}: ambiguous contents: it holds both {NPZ_KEYS[0]} and {NPZ_KEYS[1]} "
            f"keys ({sorted(arrays)}); keep one pair."
        )
    if pairs:
        tr, te = pairs[0]
        if tr not in arrays:
            raise ValueError(f"{path}: has {te!r} but no {tr!r} array.")
        extra = sorted(set(arrays) - {tr, te})
        if extra:
            raise ValueError(f"{path}: unexpected arrays {extra} beside {tr!r}/{te!r}.")
        return arrays[tr], arrays.get(te)
    if len(arrays) != 1:
        raise ValueError(
            f"{path}: expected the keys {known} or a single array, found {sorted(arrays)}."
        )
    return next(iter(arrays.values())), None


def from_file(
    path: str | os.PathLike,
    *,
    num_levels: int | None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """A dataset from a `.npy` file (one array, split with a seeded `test_fraction`) or
    a `.npz` file (keys `train`/`test` or `x_train`/`x_test`, or a single array). See
    [`scoreflow_eqx.data.from_arrays`][] for `num_levels` and `data_range`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"No such data file: {path!r}.")
    name = path
    try:
        if path.endswith(".npy"):
            train, test = np.load(path, allow_pickle=False), None
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                train, test = _npz_arrays(path, {k: f[k] for k in f.keys()})
        else:
            raise ValueError(f"Data files must end in .npy or .npz, got {path!r}.")
    except (OSError, EOFError, ValueError) as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: cannot be read as a numeric array file: {e}") from e
    return from_arrays(
        train,
        test,
        num_levels=num_levels,
        data_range=data_range,
        name=name,
        test_fraction=test_fraction,
        seed=seed,
    )


# ----------------------------------------------------------------------------- registry


DATASETS: tuple[str, ...] = ("digits", *sorted(TOYS))


def load_dataset(
    name: str | os.PathLike,
    *,
    seed: int = 0,
    num_levels: int | None = None,
    data_range: tuple[float, float] | None = None,
) -> Dataset:
    """Load a dataset by name, or from a `.npy`/`.npz` path.

    **Arguments:**

    - `name`: one of `"digits"`, `"checkerboard"`, `"eight_gaussians"`, `"swiss_roll"`,
        `"two_moons"`, or a path ending in `.npy`/`.npz`.
    - `seed`: seed of the toy generators (and of the split of a single user array).
    - `num_levels`, `data_range`: the discretization of a user's file (`num_levels=None`
        means continuous data); not allowed for the built-in datasets, which know
        theirs.

    **Returns:** a [`scoreflow_eqx.data.Dataset`][].
    """
    name_str = os.fspath(name)
    if name_str.endswith((".npy", ".npz")):
        return from_file(
            name_str,
            num_levels=num_levels,
            data_range=(-1.0, 1.0) if data_range is None else data_range,
            seed=seed,
        )
    if name_str not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name_str!r}; valid datasets are {list(DATASETS)} "
            "or a path "
            "to a .npy/.npz file."
        )
    if num_levels is not None or data_range is not None:
        raise ValueError(
            "`num_levels`/`data_range` are only for user files; "
            f"{name_str!r} carries its "
            "own discretization."
        )
    if name_str == "digits":
        return digits()
    return toy(name_str, seed=seed)


def fingerprint(array: np.ndarray) -> str:
    """A short content hash of an array (used for stable, content-aware `repr`s)."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha1(str((array.shape, array.dtype.str)).encode())
    h.update(array.tobytes())
    return h.hexdigest()[:16]
