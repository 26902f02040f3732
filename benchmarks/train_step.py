"""Throughput of the training step, and its overhead over a bare forward+backward pass.

For each device count (fake CPU devices, one subprocess each, since the count must be
set before JAX starts), this times `sf.make_train_step` (DSM loss with likelihood
weighting and importance sampling, Adam + clipping + NaN skipping, parameter EMA, batch
sharded over a mesh of all devices) and a bare `value_and_grad` of `mean ||net(t,
x)||^2` over the same batch with the same sharding, and reports examples/s and their
ratio (target < 1.2x).

    python benchmarks/train_step.py             # digits shape, MLP, 1 and 4 devices
    python benchmarks/train_step.py --net unet  # the U-Net
    python benchmarks/train_step.py --quick     # a smoke test
"""

import argparse
import json
import os
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import scoreflow_eqx as sf
    from scoreflow_eqx._sharding import batch_sharding, replicate, replicated_sharding
    from scoreflow_eqx._training import init_state

    shape = tuple(args.data_shape)
    if args.net == "mlp":
        net_kwargs = {"width_size": args.width, "depth": 3}
    elif args.net == "digits":  # the network of the digits training job
        net_kwargs = dict(sf.nets.UNET_PRESETS["digits"])
        net_kwargs.pop("data_shape", None)
    else:
        net_kwargs = {}
    cfg = sf.flow_config(shape, net="mlp" if args.net == "mlp" else "unet", net_kwargs=net_kwargs)
    flow = sf.make_flow(cfg, key=jr.key(0))
    mesh = sf.data_parallel_mesh()
    k = args.steps_per_jit
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch_size, *shape)).astype(np.float32)
    batch = jax.device_put(x, batch_sharding(mesh))
    batches = jax.device_put(np.stack([x] * k), NamedSharding(mesh, PartitionSpec(None, "batch")))
    optimizer = sf.default_optimizer(lr=1e-4, warmup_steps=10)
    step1 = sf.make_train_step(optimizer, mesh=mesh)
    stepk = sf.make_train_step(optimizer, mesh=mesh, steps_per_jit=k)
    repl = replicated_sharding(mesh)

    # The bare forward+backward, dispatched as cheaply as we can: `jax.jit` on the
    # array leaves of the network, the rest closed over.
    params, static = eqx.partition(flow.net, eqx.is_inexact_array)

    def bare_loss(params, x, t):
        out = jax.vmap(eqx.combine(params, static))(t, x)
        return jnp.mean(jnp.sum(out.reshape(out.shape[0], -1) ** 2, axis=1))

    @jax.jit
    def bare(params, x, t):
        params = jax.lax.with_sharding_constraint(params, repl)
        x, t = jax.lax.with_sharding_constraint((x, t), batch_sharding(mesh))
        return jax.value_and_grad(bare_loss)(params, x, t)

    @jax.jit
    def bare_scan(params, xs, t):
        # k forward+backward passes in one call (plain SGD so that they are not hoisted).
        params = jax.lax.with_sharding_constraint(params, repl)

        def body(p, x):
            x = jax.lax.with_sharding_constraint(x, batch_sharding(mesh))
            loss, g = jax.value_and_grad(bare_loss)(p, x, t)
            return jax.tree.map(lambda a, b: a - 1e-12 * b, p, g), loss

        return jax.lax.scan(body, params, xs)

    params = replicate(params, mesh)
    t = jax.device_put(
        jnp.linspace(0.01, 1.0, args.batch_size, dtype=jnp.float32), batch_sharding(mesh)
    )

    def time_it(fn, iters):
        fn()  # warm-up (compilation)
        jax.block_until_ready(fn())
        t0 = time.perf_counter()
        out = previous = None
        for _ in range(iters):
            out = fn()
            # At most two calls in flight, as `make_train_step` keeps on several CPU
            # devices (XLA:CPU collectives deadlock with many queued); same for all rows.
            jax.block_until_ready(previous)
            previous = out
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / iters

    holder = {"1": replicate(init_state(flow, optimizer, key=jr.key(1)), mesh)}
    holder["k"] = replicate(init_state(flow, optimizer, key=jr.key(1)), mesh)
    holder["f"] = replicate(init_state(flow, optimizer, key=jr.key(1)), mesh)
    # The same step dispatched by `eqx.filter_jit` instead of `_dispatch.StateStepJit`.
    from scoreflow_eqx._dispatch import StateStepJit

    assert isinstance(step1, StateStepJit)
    step_filter_jit = eqx.filter_jit(step1._fn, donate="all-except-first")

    def run_step():
        holder["1"], metrics = step1(batch, holder["1"])
        return metrics["loss"]

    def run_step_filter_jit():
        holder["f"], metrics = step_filter_jit(batch, holder["f"])
        return metrics["loss"]

    def run_stepk():
        holder["k"], metrics = stepk(batches, holder["k"])
        return metrics["loss"]

    results = {"devices": args.devices, "batch_size": args.batch_size, "net": args.net}
    results["params"] = int(
        sum(x.size for x in jax.tree.leaves(eqx.filter(flow, eqx.is_inexact_array)))
    )
    # Interleave the measurements to share any background load fairly; best of repeats.
    times = {"step": [], "bare": [], "stepk": [], "barek": [], "step_filter_jit": []}
    iters_k = max(1, args.iters // k)
    for _ in range(args.repeats):
        times["step"].append(time_it(run_step, args.iters))
        times["step_filter_jit"].append(time_it(run_step_filter_jit, args.iters))
        times["bare"].append(time_it(lambda: bare(params, batch, t)[0], args.iters))
        times["stepk"].append(time_it(run_stepk, iters_k) / k)
        times["barek"].append(time_it(lambda: bare_scan(params, batches, t)[1], iters_k) / k)
    best = {name: min(v) for name, v in times.items()}
    results |= {f"{name}_ms": 1e3 * v for name, v in best.items()}
    results["steps_per_jit"] = k
    results["step_examples_per_s"] = args.batch_size / best["step"]
    results["bare_examples_per_s"] = args.batch_size / best["bare"]
    results["overhead"] = best["step"] / best["bare"]
    results["overhead_k"] = best["stepk"] / best["barek"]
    return results


def main(argv=None):
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    p.add_argument(
        "--net",
        default="mlp",
        choices=["mlp", "digits", "unet"],
        help="MLP, the U-Net preset 'digits' (the digits job's network) or the default U-Net",
    )
    p.add_argument("--width", type=int, default=256, help="MLP width")
    p.add_argument("--data-shape", type=int, nargs="+", default=[1, 8, 8])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=50, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="best of N repeats")
    p.add_argument(
        "--steps-per-jit", type=int, default=10, help="steps per call in the scanned rows"
    )
    p.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.repeats, args.batch_size, args.steps_per_jit = 4, 1, 32, 2
    if args.worker:
        (args.devices,) = args.devices
        print(json.dumps(worker(args)))
        return
    rows = []
    for n in args.devices:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--devices",
            str(n),
            "--net",
            args.net,
            "--width",
            str(args.width),
            "--batch-size",
            str(args.batch_size),
            "--iters",
            str(args.iters),
            "--repeats",
            str(args.repeats),
            "--steps-per-jit",
            str(args.steps_per_jit),
            "--data-shape",
            *map(str, args.data_shape),
        ]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"worker with {n} devices failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"net={args.net} params={rows[0]['params']} batch={args.batch_size} "
        f"data_shape={tuple(args.data_shape)}"
    )
    print(
        "| devices | steps per call | step (ms) | same step by eqx.filter_jit (ms) | "
        "bare fwd+bwd (ms) | step examples/s | bare examples/s | overhead |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for k, step, bare, fj in (
            (1, r["step_ms"], r["bare_ms"], f"{r['step_filter_jit_ms']:.2f}"),
            (r["steps_per_jit"], r["stepk_ms"], r["barek_ms"], ""),
        ):
            b = args.batch_size
            print(
                f"| {r['devices']} | {k} | {step:.2f} | {fj} | {bare:.2f} | "
                f"{1e3 * b / step:.0f} | {1e3 * b / bare:.0f} | {step / bare:.2f}x |"
            )


if __name__ == "__main__":
    main()
