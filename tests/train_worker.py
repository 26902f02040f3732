"""A training run in its own process, for `tests/test_checkpoint.py`.

    python tests/train_worker.py kill WORKDIR            # train; SIGKILL itself at step 7
    python tests/train_worker.py run WORKDIR OUT.npz     # train (resuming); save the result
    python tests/train_worker.py many-steps              # 300 quick steps on 4 CPU devices
    python tests/train_worker.py distributed ID PORT OUT.npz   # process ID of 2 (jax.distributed)

`kill` and `run` run the same 10-step job (checkpoints every 4 steps) on a 2-D Gaussian
mixture; `run` saves the final parameters, EMA, optimizer state, the losses of the steps
it ran and the next three batches of its data iterator. `distributed` is one of the two
processes of a 6-step data-parallel job; it saves its parameters and losses.
"""

import os
import signal
import sys
import time

import jax


jax.config.update("jax_enable_x64", True)
if sys.argv[1:2] == ["many-steps"]:
    jax.config.update("jax_num_cpu_devices", 4)
if sys.argv[1:2] == ["distributed"]:
    # Two processes on this machine, one CPU device each, all-reduces through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{sys.argv[3]}",
        num_processes=2,
        process_id=int(sys.argv[2]),
        initialization_timeout=120,
    )

import equinox as eqx  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import scoreflow_eqx as sf  # noqa: E402


KILL_AT = 7
STEPS = 10
CFG = sf.flow_config((2,), sde="vp", net_kwargs={"width_size": 32, "depth": 2})


def mixture_data(num_examples: int, num_test: int | None = None) -> sf.data.Dataset:
    """Samples of a fixed 2-D Gaussian mixture (the test split: its first `num_test`)."""
    mix = sf.GaussianMixture(
        weights=[0.3, 0.7], means=[[-1.0, 0.5], [0.8, -0.4]], stds=[[0.3, 0.5], [0.4, 0.2]]
    )
    draw = jax.jit(jax.vmap(lambda k: mix.sample(key=k)))
    train = np.asarray(draw(jr.split(jr.key(1), num_examples)))
    test = None if num_test is None else train[:num_test]
    return sf.data.from_arrays(train, test, num_levels=None, name="mix")


def many_steps() -> None:
    """300 steps dispatched back to back, data parallel over 4 CPU devices."""
    from scoreflow_eqx._sharding import batch_sharding, replicate
    from scoreflow_eqx._training import init_state

    mesh = sf.data_parallel_mesh()
    assert mesh.devices.size == 4
    optimizer = sf.default_optimizer(lr=1e-4, warmup_steps=10)
    step = sf.make_train_step(optimizer, mesh=mesh)
    state = replicate(init_state(sf.make_flow(CFG, key=jr.key(0)), optimizer, key=jr.key(1)), mesh)
    batch = jax.device_put(np.ones((32, 2)), batch_sharding(mesh))
    for _ in range(300):
        state, metrics = step(batch, state)
    print("done", int(jax.block_until_ready(state.step)))


DISTRIBUTED_RUN = dict(key=7, steps=6, batch_size=32)


def distributed_data() -> sf.data.Dataset:
    return mixture_data(512, num_test=64)


def distributed(process_id: str, port: str, out: str) -> None:
    """One of two processes of a data-parallel run: each reads its own slice of the data."""
    assert jax.process_count() == 2 and len(jax.devices()) == 2
    res = sf.train(
        sf.make_flow(CFG, key=jr.key(0)),
        distributed_data(),
        key=jr.key(DISTRIBUTED_RUN["key"]),
        steps=DISTRIBUTED_RUN["steps"],
        batch_size=DISTRIBUTED_RUN["batch_size"],
        warmup_steps=2,
        lr=5e-3,
        log_every=1,
        show_progress=False,
    )
    # Parameters are replicated: this process's copy of each.
    leaves = jax.tree.leaves(eqx.filter(res.flow, eqx.is_inexact_array))
    np.savez(
        out,
        losses=res.losses,
        **{f"params_{i}": np.asarray(x.addressable_data(0)) for i, x in enumerate(leaves)},
    )
    jax.distributed.shutdown()


def resume_job(mode: str, workdir: str, out: str | None = None) -> None:
    """The 10-step job of the `kill` and `run` modes."""
    data = mixture_data(1024)

    def kill(step, state):
        if mode == "kill" and step == KILL_AT:
            time.sleep(1.0)  # let the asynchronous save of step 4 finish first
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush, no atexit

    res = sf.train(
        sf.make_flow(CFG, key=jr.key(0)),
        data,
        key=jr.key(7),
        steps=STEPS,
        batch_size=32,
        warmup_steps=2,
        lr=5e-3,
        ema_decay=0.9,
        log_every=1,
        checkpoint_every=4,
        workdir=workdir,
        flow_config=CFG,
        show_progress=False,
        callback=kill,
    )
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
    arrays = {
        "losses": res.losses,
        "step": np.asarray(res.step),
        "next_batches": np.stack([next(res.data_iterator) for _ in range(3)]),
    }
    for name, tree in (
        ("params", eqx.filter(res.flow, eqx.is_inexact_array)),
        ("ema", eqx.filter(res.ema_flow, eqx.is_inexact_array)),
        ("opt_state", res.state.opt_state),
    ):
        for i, x in enumerate(leaves(tree)):
            arrays[f"{name}_{i}"] = x
    np.savez(out, **arrays)


if __name__ == "__main__":
    mode, *arguments = sys.argv[1:]
    if mode == "many-steps":
        many_steps()
    elif mode == "distributed":
        distributed(*arguments)
    else:
        resume_job(mode, *arguments)
