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

    import scoreflow_eqx as sf
    from scoreflow_eqx._sharding import batch_sharding, replicate, replicated_sharding
    from scoreflow_eqx._train import _skip_nonfinite, init_state

    shape = tuple(args.data_shape)
    net_kwargs = {"width_size": args.width, "depth": 3} if args.net == "mlp" else {}
    cfg = sf.flow_config(shape, net=args.net, net_kwargs=net_kwargs)
    flow = sf.make_flow(cfg, key=jr.key(0))
    mesh = sf.data_parallel_mesh()
    batch = jax.device_put(
        np.random.default_rng(0)
        .uniform(-1, 1, (args.batch_size, *shape))
        .astype(np.float32),
        batch_sharding(mesh),
    )
    optimizer = _skip_nonfinite(sf.default_optimizer(lr=1e-4, warmup_steps=10))
    step = sf.make_train_step(optimizer, mesh=mesh)
    state = replicate(init_state(flow, optimizer, key=jr.key(1)), mesh)

    @eqx.filter_jit
    def bare(net, x, t):
        net = eqx.filter_shard(net, replicated_sharding(mesh))
        x, t = eqx.filter_shard((x, t), batch_sharding(mesh))

        def loss(net):
            out = jax.vmap(net)(t, x)
            return jnp.mean(jnp.sum(out.reshape(out.shape[0], -1) ** 2, axis=1))

        return eqx.filter_value_and_grad(loss)(net)

    net = replicate(flow.net, mesh)
    t = jax.device_put(
        jnp.linspace(0.01, 1.0, args.batch_size, dtype=jnp.float32),
        batch_sharding(mesh),
    )

    def time_it(fn, iters):
        fn()  # warm-up (compilation)
        fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / iters

    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step(batch, holder["state"])
        return metrics["loss"]

    results = {"devices": args.devices, "batch_size": args.batch_size, "net": args.net}
    results["params"] = int(
        sum(x.size for x in jax.tree.leaves(eqx.filter(flow, eqx.is_inexact_array)))
    )
    # Interleave the two measurements to share any background load fairly.
    step_times, bare_times = [], []
    for _ in range(args.repeats):
        step_times.append(time_it(run_step, args.iters))
        bare_times.append(time_it(lambda: bare(net, batch, t)[0], args.iters))
    results["step_ms"] = 1e3 * min(step_times)
    results["bare_ms"] = 1e3 * min(bare_times)
    results["step_examples_per_s"] = args.batch_size / min(step_times)
    results["bare_examples_per_s"] = args.batch_size / min(bare_times)
    results["overhead"] = min(step_times) / min(bare_times)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    p.add_argument("--net", default="mlp", choices=["mlp", "unet"])
    p.add_argument("--width", type=int, default=256, help="MLP width")
    p.add_argument("--data-shape", type=int, nargs="+", default=[1, 8, 8])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=50, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="best of N repeats")
    p.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.repeats, args.batch_size = 3, 1, 32
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
            "--data-shape",
            *map(str, args.data_shape),
        ]
        env = dict(
            os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
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
        f"{'devices':>7} {'step ms':>8} {'bare ms':>8} {'step ex/s':>10} "
        f"{'bare ex/s':>10} {'overhead':>8}"
    )
    for r in rows:
        print(
            f"{r['devices']:>7} {r['step_ms']:>8.2f} {r['bare_ms']:>8.2f} "
            f"{r['step_examples_per_s']:>10.0f} {r['bare_examples_per_s']:>10.0f} "
            f"{r['overhead']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
