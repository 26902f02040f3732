"""Time and memory of one gradient of the probability-flow NLL under each diffrax adjoint.

For a batch of digits (8x8, levels dequantized uniformly to [-1, 1]) and an untrained
network (its ODE is smooth, so the step counts are those of the given tolerance, not of a
trained model), this jit-compiles `jax.grad` of the batch-mean `sf.ode_nll_batched`
(Hutchinson, Dopri5) with respect to the network's parameters, once per adjoint
(`RecursiveCheckpointAdjoint`, `BacksolveAdjoint`), and reports:

- the compile time, and the median wall time of `--repeats` calls after a warm-up call
  (each with `block_until_ready`);
- the NFE of the forward solve (`6 * num_steps + 3`);
- memory: XLA's compiled memory analysis (the temporary buffers of the gradient, i.e. the
  peak working set beyond arguments and outputs) and the growth of the process's maximum
  resident set size over the run of that adjoint (each adjoint runs in its own
  subprocess, so the RSS numbers do not mix);
- the relative difference of the gradient from `RecursiveCheckpointAdjoint`'s.

    python benchmarks/adjoint.py                    # MLP, batch 64
    python benchmarks/adjoint.py --net unet         # the digits U-Net preset (slow on CPU)
    python benchmarks/adjoint.py --quick            # a smoke test
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


ADJOINTS = ("recursive_checkpoint", "backsolve")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(args):
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import scoreflow_eqx as sf

    data = sf.data.load_dataset("digits")
    levels = np.asarray(data.test[: args.batch_size]).astype(np.int32)
    dequantizer = sf.data.UniformDequantizer(data.discretization)
    keys = jr.split(jr.key(0), levels.shape[0])
    xs = jnp.stack([dequantizer(k, key=key)[0] for k, key in zip(levels, keys)])
    if args.net == "unet":
        net_kwargs = dict(sf.nets.UNET_PRESETS["digits"])
        net_kwargs.pop("data_shape", None)
    else:
        net_kwargs = {"width_size": args.width, "depth": 3}
    cfg = sf.flow_config(data.data_shape, net=args.net, net_kwargs=net_kwargs)
    return sf.make_flow(cfg, key=jr.key(1)), xs.astype(jnp.float32)


def worker(args) -> dict:
    import diffrax as dfx
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import scoreflow_eqx as sf

    rss0 = _max_rss_mb()
    flow, xs = _setup(args)
    adjoint = {
        "recursive_checkpoint": dfx.RecursiveCheckpointAdjoint(),
        "backsolve": dfx.BacksolveAdjoint(),
    }[args.adjoint]
    params, static = eqx.partition(flow, eqx.is_inexact_array)

    def loss(params, xs):
        res = sf.ode_nll_batched(
            eqx.combine(params, static), xs, key=jr.key(2), rtol=args.tol, atol=args.tol,
            adjoint=adjoint,
        )  # fmt: skip
        return jnp.mean(res.nll), res.nfe[0]

    grad = jax.jit(jax.grad(loss, has_aux=True))
    start = time.perf_counter()
    compiled = grad.lower(params, xs).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp_mb = None if memory is None else memory.temp_size_in_bytes / 2**20
    rss_setup = _max_rss_mb()
    g, nfe = jax.block_until_ready(compiled(params, xs))  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, xs))
        times.append(time.perf_counter() - start)
    flat = jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(g)])
    return {
        "adjoint": args.adjoint,
        "compile_s": compile_s,
        "time_s": sorted(times)[len(times) // 2],
        "nfe": int(nfe),
        "xla_temp_mb": temp_mb,
        "rss_growth_mb": _max_rss_mb() - rss_setup,
        "rss_before_mb": rss0,
        "grad": [float(v) for v in flat],
        "num_params": int(flat.size),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--net", choices=["mlp", "unet"], default="mlp")
    parser.add_argument("--width", type=int, default=128, help="MLP width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of the solve")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--out", help="also write the Markdown table here")
    parser.add_argument("--adjoint", choices=ADJOINTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.width, args.tol, args.repeats = 4, 16, 1e-3, 1
    if args.adjoint:  # a worker subprocess
        print(json.dumps(worker(args)))
        return
    rows = []
    for adjoint in ADJOINTS:
        cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]
        out = subprocess.run(cmd + ["--adjoint", adjoint], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"The {adjoint} worker failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(table(rows, args))
    if args.out:
        with open(args.out, "w") as f:
            f.write(table(rows, args) + "\n")


def table(rows, args) -> str:
    import numpy as np

    reference = np.asarray(rows[0]["grad"])
    lines = [
        f"net {args.net}, {rows[0]['num_params']} parameters, digits batch {args.batch_size}, "
        f"Hutchinson, Dopri5, rtol = atol = {args.tol:g}, float32",
        "",
        "| adjoint | time (s) | compile (s) | NFE (forward) | XLA temp memory (MiB) "
        "| max RSS growth (MiB) | grad rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = np.linalg.norm(np.asarray(r["grad"]) - reference) / np.linalg.norm(reference)
        temp = "n/a" if r["xla_temp_mb"] is None else f"{r['xla_temp_mb']:.1f}"
        lines.append(
            f"| {r['adjoint']} | {r['time_s']:.3f} | {r['compile_s']:.1f} | {r['nfe']} | {temp} "
            f"| {r['rss_growth_mb']:.0f} | {diff:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
