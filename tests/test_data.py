import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow_eqx as sf
from scoreflow_eqx.data import Discretization


def test_digits_fixed_split_and_levels():
    ds = sf.data.load_dataset("digits")
    assert ds.data_shape == (1, 8, 8) and ds.dim == 64
    assert ds.train.shape == (1500, 1, 8, 8) and ds.test.shape == (297, 1, 8, 8)
    assert ds.train.dtype.kind == "u" and ds.discretization.num_levels == 17
    assert ds.train.min() == 0 and max(ds.train.max(), ds.test.max()) == 16
    again = sf.data.digits()
    np.testing.assert_array_equal(ds.test, again.test)
    # The split is disjoint: no test image is also a training image.
    train_rows = {r.tobytes() for r in ds.train.reshape(1500, -1)}
    overlap = sum(r.tobytes() in train_rows for r in ds.test.reshape(297, -1))
    assert overlap < 5  # digits has a handful of exact duplicate images


@pytest.mark.parametrize("name", ["checkerboard", "eight_gaussians", "swiss_roll", "two_moons"])
def test_toys_deterministic_continuous(name):
    a = sf.data.load_dataset(name, seed=3)
    b = sf.data.load_dataset(name, seed=3)
    c = sf.data.load_dataset(name, seed=4)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.train, c.train)
    assert not np.array_equal(a.train[:100], a.test[:100])
    assert a.discretization.num_levels is None and a.data_shape == (2,)
    assert np.all(np.isfinite(a.train)) and np.abs(a.train).max() < 10
    assert a.train.std() > 0.5


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid datasets are.*digits.*two_moons"):
        sf.data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="only for user files"):
        sf.data.load_dataset("digits", num_levels=256)


def test_user_files(tmp_path):
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 4, size=(50, 3, 2))
    np.save(tmp_path / "x.npy", levels)
    ds = sf.data.load_dataset(tmp_path / "x.npy", num_levels=4, data_range=(0.0, 1.0))
    assert ds.data_shape == (3, 2) and len(ds.train) == 45 and len(ds.test) == 5
    assert ds.discretization == Discretization(4, (0.0, 1.0))
    np.testing.assert_array_equal(
        np.sort(np.concatenate([ds.train, ds.test]).reshape(50, -1), axis=0),
        np.sort(levels.reshape(50, -1), axis=0),
    )
    np.savez(tmp_path / "y.npz", train=levels[:40], test=levels[40:])
    ds = sf.data.load_dataset(str(tmp_path / "y.npz"), num_levels=4)
    np.testing.assert_array_equal(ds.test, levels[40:])
    # Continuous user data.
    np.save(tmp_path / "c.npy", rng.normal(size=(20, 2)))
    ds = sf.data.load_dataset(tmp_path / "c.npy")
    assert ds.discretization.num_levels is None and ds.train.dtype == np.float32


@pytest.mark.parametrize(
    "bad, num_levels, match",
    [
        (np.array([[0.0, np.nan]] * 4), None, "non-finite"),
        (np.array([[0.0, np.inf]] * 4), None, "non-finite"),
        (np.array([[0, 4]] * 4), 4, r"levels must lie in \[0, 3\]"),
        (np.array([[0, -1]] * 4), 4, r"levels must lie in \[0, 3\]"),
        (np.array([[0.5, 1.0]] * 4), 4, "integer levels"),
    ],
)
def test_bad_values_rejected(tmp_path, bad, num_levels, match):
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=match):
        sf.data.load_dataset(tmp_path / "bad.npy", num_levels=num_levels)
    with pytest.raises(ValueError, match=match):
        sf.data.from_arrays(bad, bad, num_levels=num_levels)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="No such data file"):
        sf.data.load_dataset(tmp_path / "missing.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 2)), b=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="expected the keys"):
        sf.data.load_dataset(tmp_path / "two.npz")


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def digits():
    return sf.data.load_dataset("digits")


def test_pipeline_gives_levels_that_the_dequantizer_maps_into_their_cells(digits):
    it = iter(sf.data.make_pipeline(digits, batch_size=32, seed=0, shuffle=False))
    levels = next(it)
    assert levels.shape == (32, 1, 8, 8) and np.issubdtype(levels.dtype, np.integer)
    np.testing.assert_array_equal(levels, digits.train[:32])
    # Dequantization on device, as in the training step and in evaluate_bpd.
    dequantizer = sf.data.UniformDequantizer(digits.discretization)
    keys = jax.random.split(jax.random.key(0), 32)
    batch, log_q = jax.vmap(lambda k, key: dequantizer(k, key=key))(jnp.asarray(levels), keys)
    batch = np.asarray(batch)
    assert np.all(np.asarray(log_q) == 0)
    assert batch.min() >= -1 and batch.max() < 1
    # Dequantized values fall in their level's cell: quantize recovers the levels
    # exactly.
    np.testing.assert_array_equal(
        np.asarray(digits.discretization.quantize(batch)), digits.train[:32]
    )
    # ... with non-trivial uniform noise inside the cell.
    offsets = (batch + 1) / 2 * 17 - digits.train[:32]
    assert 0.45 < offsets.mean() < 0.55 and offsets.std() > 0.25


def test_pipeline_deterministic_and_epochs(digits):
    a = _take(iter(sf.data.make_pipeline(digits, batch_size=100, seed=1)), 30)
    b = _take(iter(sf.data.make_pipeline(digits, batch_size=100, seed=1)), 30)
    c = _take(iter(sf.data.make_pipeline(digits, batch_size=100, seed=2)), 1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # Each epoch (15 batches of 100 = 1500) is a permutation; epochs are reshuffled.
    q = lambda batches: np.concatenate(batches)
    epoch1, epoch2 = q(a[:15]), q(a[15:])
    key = lambda arr: sorted(r.tobytes() for r in arr.astype(np.int32).reshape(len(arr), -1))
    assert key(epoch1) == key(digits.train) == key(epoch2)
    assert not np.array_equal(epoch1, epoch2)


def test_pipeline_checkpointable(digits):
    it = iter(sf.data.make_pipeline(digits, batch_size=64, seed=0))
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 5)
    fresh = iter(sf.data.make_pipeline(digits, batch_size=64, seed=0))
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 5)):
        np.testing.assert_array_equal(x, y)
    # The source's repr is stable and content-aware (grain validates it on restore).
    src = sf.data.ArraySource(digits.train, "digits/train")
    assert repr(src) == repr(sf.data.ArraySource(digits.train.copy(), "digits/train"))
    assert repr(src) != repr(sf.data.ArraySource(digits.test, "digits/train"))


def test_pipeline_process_slices(digits):
    arr = np.arange(40, dtype=np.float32)[:, None]
    disc = Discretization(num_levels=None)
    seen = []
    for pi in range(2):
        p = sf.data.make_pipeline(
            arr,
            discretization=disc,
            batch_size=20,
            seed=0,
            repeat=False,
            process_index=pi,
            process_count=2,
        )
        (batch,) = list(p)
        seen.append(set(batch[:, 0].tolist()))
    assert not (seen[0] & seen[1]) and (seen[0] | seen[1]) == set(range(40))
    with pytest.raises(ValueError, match="fewer than one batch"):
        sf.data.make_pipeline(arr, discretization=disc, batch_size=41, seed=0)
    with pytest.raises(ValueError, match="discretization"):
        sf.data.make_pipeline(arr, batch_size=4, seed=0)
    assert isinstance(
        sf.data.make_pipeline(digits, batch_size=4, seed=0, split="test"),
        grain.IterDataset,
    )
