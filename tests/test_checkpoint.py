import os
import pathlib
import signal
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import gaussian_mixture_2d, tree_allclose
from test_train import CFG, KW

import scoreflow_eqx as sf
from scoreflow_eqx._checkpoint import abstract_like


def _corrupt(step_dir: pathlib.Path) -> None:
    """Overwrite every file of a checkpoint's parameter item with garbage."""
    for root, _, files in os.walk(step_dir / "params"):
        for name in files:
            (pathlib.Path(root) / name).write_bytes(b"\x00garbage\xff" * 7)


def _state(x):
    return {
        "params": [jnp.full((3,), x), jnp.arange(4.0) * x],
        "ema_params": [jnp.full((3,), -x)],
        "opt_state": [jnp.asarray(int(x), jnp.int32)],
        "meta": {"step": jnp.asarray(int(x), jnp.int32), "key": jr.key(int(x))},
    }


def test_checkpointer_roundtrip_keep_n_and_fallback(tmp_path):
    data = np.arange(100, dtype=np.float32)[:, None]
    disc = sf.data.Discretization(num_levels=None)
    pipeline = sf.data.make_pipeline(data, discretization=disc, batch_size=8, seed=0)
    it = iter(pipeline)
    with sf.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            next(it)
            ckpt.save(step, _state(float(step)), data_iterator=it, record={"step": step})
            ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3]  # keeps the last 2
    expected_next = next(it)
    abstract = abstract_like(_state(0.0))
    with sf.Checkpointer(tmp_path) as ckpt:
        fresh = iter(pipeline)
        restored = ckpt.restore(abstract, data_iterator=fresh)
        state, step = restored.items, restored.step
        assert step == 3 and ckpt.read_record(3) == restored.record == {"step": 3}
        assert tree_allclose(
            jax.tree.leaves(state["params"]), jax.tree.leaves(_state(3.0)["params"])
        )
        assert int(state["meta"]["step"]) == 3
        assert jnp.array_equal(jr.key_data(state["meta"]["key"]), jr.key_data(jr.key(3)))
        np.testing.assert_array_equal(next(fresh), expected_next)
    _corrupt(tmp_path / "3")
    with sf.Checkpointer(tmp_path) as ckpt:
        with pytest.warns(RuntimeWarning, match="step 3.*falling back to step 2"):
            restored = ckpt.restore(abstract)
        state, step = restored.items, restored.step
        assert step == 2
        assert tree_allclose(state["ema_params"], _state(2.0)["ema_params"])
    _corrupt(tmp_path / "2")
    with sf.Checkpointer(tmp_path) as ckpt:
        with (
            pytest.warns(RuntimeWarning),
            pytest.raises(RuntimeError, match="No checkpoint"),
        ):
            ckpt.restore(abstract)
    with sf.Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.restore(abstract) is None


@pytest.fixture(scope="module")
def data():
    mix = gaussian_mixture_2d()
    draw = lambda key, n: np.asarray(
        jax.jit(jax.vmap(lambda k: mix.sample(key=k)))(jr.split(key, n))
    )
    return sf.data.from_arrays(draw(jr.key(1), 2048), draw(jr.key(2), 256), num_levels=None)


class _Interrupt(Exception):
    pass


def _params(flow):
    return eqx.filter(flow, eqx.is_inexact_array)


def test_interrupt_and_resume_equals_uninterrupted(data, tmp_path):
    flow = sf.make_flow(CFG, key=jr.key(0))
    run = dict(key=jr.key(7), steps=8, checkpoint_every=4, flow_config=CFG, **KW)
    full = sf.train(flow, data, workdir=tmp_path / "a", **run)

    def interrupt(step, state):
        if step == 6:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        sf.train(flow, data, workdir=tmp_path / "b", callback=interrupt, **run)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["4"]
    resumed = sf.train(flow, data, workdir=tmp_path / "b", **run)
    assert resumed.step == full.step == 8
    assert len(resumed.losses) == 4  # only steps 5..8 ran again
    np.testing.assert_allclose(resumed.losses, full.losses[4:], rtol=1e-12)
    assert tree_allclose(_params(resumed.flow), _params(full.flow), rtol=1e-12, atol=0)
    assert tree_allclose(_params(resumed.ema_flow), _params(full.ema_flow), rtol=1e-12, atol=0)
    assert tree_allclose(
        jax.tree.leaves(resumed.state.opt_state), jax.tree.leaves(full.state.opt_state)
    )
    for _ in range(3):  # the data streams continue identically
        np.testing.assert_array_equal(next(resumed.data_iterator), next(full.data_iterator))
    # Nothing left to do: a third call returns at once from the final checkpoint.
    again = sf.train(flow, data, workdir=tmp_path / "b", **run)
    assert again.step == 8 and len(again.losses) == 0
    # A different model in the same work directory is refused.
    other = sf.flow_config((2,), sde="subvp", net_kwargs={"width_size": 32, "depth": 2})
    with pytest.raises(ValueError, match="different model"):
        sf.train(
            sf.make_flow(other, key=jr.key(0)),
            data,
            workdir=tmp_path / "b",
            **(run | {"flow_config": other}),
        )

    # A corrupted latest checkpoint: load_flow and training fall back to the previous
    # one.
    _corrupt(tmp_path / "a" / "checkpoints" / "8")
    with pytest.warns(RuntimeWarning, match="falling back to step 4"):
        loaded, info = sf.load_flow(tmp_path / "a", ema=False)
    assert info["step"] == 4
    with pytest.warns(RuntimeWarning, match="falling back to step 4"):
        rerun = sf.train(flow, data, workdir=tmp_path / "a", **run)
    assert rerun.step == 8
    assert "corrupted-step-8" in os.listdir(tmp_path / "a" / "checkpoints")
    assert tree_allclose(_params(rerun.ema_flow), _params(full.ema_flow), rtol=1e-12, atol=0)


_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _worker_command(*args):
    """Command and environment that run `tests/train_worker.py` with `args`."""
    command = [sys.executable, str(_ROOT / "tests" / "train_worker.py"), *map(str, args)]
    return command, {**os.environ, "PYTHONPATH": str(_ROOT)}


def _worker(*args):
    command, env = _worker_command(*args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_killed_process_resumes_exactly(tmp_path):
    """A training process killed with SIGKILL (no cleanup) after its step-4 checkpoint
    resumes from it in a new process and ends where an uninterrupted run ends."""
    killed = _worker("kill", tmp_path / "b")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    steps = [p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == ["4"]
    for workdir, out in (("b", "resumed.npz"), ("a", "full.npz")):
        done = _worker("run", tmp_path / workdir, tmp_path / out)
        assert done.returncode == 0, done.stderr
    resumed, full = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "full.npz")
    assert int(resumed["step"]) == int(full["step"]) == 10
    assert len(resumed["losses"]) == 6  # steps 5..10 ran again, in the new process
    np.testing.assert_array_equal(resumed["losses"], full["losses"][4:])
    assert set(resumed.files) == set(full.files)
    for name in full.files:  # parameters, EMA, optimizer state and the next batches
        if name != "losses":
            np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


def test_many_queued_sharded_steps_do_not_deadlock():
    # XLA:CPU's in-process all-reduces deadlocked (the process aborts after 40 s) when
    # hundreds of quick sharded steps were queued at once on 4 CPU devices; the train
    # step keeps at most two in flight there. In a subprocess, so an abort fails only this.
    done = _worker("many-steps")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["done", "300"]


def test_two_process_training_equals_one_process_on_the_global_batches(tmp_path):
    """`jax.distributed` with two processes on this machine (one CPU device each, gloo
    all-reduces), each reading its own slice of the data, gives the parameters of one
    process training on the global batches that the two slices make up."""
    import socket

    from train_worker import CFG, distributed_data, DISTRIBUTED_RUN

    from scoreflow_eqx._sharding import batch_sharding, replicate
    from scoreflow_eqx._training import init_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    commands = [_worker_command("distributed", i, port, tmp_path / f"p{i}.npz") for i in range(2)]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command, env in commands
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    outs = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]

    # The same run in this process, on the global batches [slice of process 0; of 1].
    data = distributed_data()
    train_key, data_key, _ = jr.split(jr.key(DISTRIBUTED_RUN["key"]), 3)
    seed = int(jr.randint(data_key, (), 0, 2**31 - 1))
    local = DISTRIBUTED_RUN["batch_size"] // 2
    iterators = [
        iter(
            sf.data.make_pipeline(
                data,
                batch_size=local,
                seed=seed,
                process_index=i,
                process_count=2,
                dtype=np.float64,
            )
        )
        for i in range(2)
    ]
    mesh = sf.data_parallel_mesh(jax.devices()[:2])
    optimizer = sf.default_optimizer(lr=5e-3, warmup_steps=2)
    step = sf.make_train_step(optimizer, mesh=mesh)
    state = replicate(init_state(sf.make_flow(CFG, key=jr.key(0)), optimizer, key=train_key), mesh)
    losses = []
    for _ in range(DISTRIBUTED_RUN["steps"]):
        batch = np.concatenate([next(it) for it in iterators])
        state, metrics = step(jax.device_put(batch, batch_sharding(mesh)), state)
        losses.append(float(metrics["loss"]))
    expected = jax.tree.leaves(eqx.filter(state.flow, eqx.is_inexact_array))
    for out in outs:
        np.testing.assert_allclose(out["losses"], losses, rtol=1e-10)
        for i, leaf in enumerate(expected):
            np.testing.assert_allclose(out[f"params_{i}"], leaf, rtol=1e-9, atol=1e-12)
