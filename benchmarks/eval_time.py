"""Test bits/dim, NFE and wall time of trained runs, side by side in one process.

For each work directory of `experiments/train.py` (e.g. the digits job trained with the
default log-SNR conditioning and the same job with `--conditioning time`), this evaluates
the EMA model on the test set by the probability-flow ODE with the library defaults
(`sf.ODELikelihood()`: Hutchinson, Dopri5, rtol = atol = 1e-5, batched solve) and draws
samples with `sf.ProbabilityFlow()`. Every evaluation runs once to compile and is then timed
`--repeats` times (median, `block_until_ready` through the returned numbers); the runs are
interleaved so that a change in machine load affects them alike.

    python benchmarks/eval_time.py --workdirs runs/digits runs/digits_time
    python benchmarks/eval_time.py --workdirs runs/digits --num-examples 64 --repeats 1

Prints a Markdown table (and writes it with `--out`).
"""

import argparse
import os
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdirs", nargs="+", required=True, help="trained work directories")
    p.add_argument(
        "--num-examples", type=int, default=None, help="first N test examples (default: all)"
    )
    p.add_argument("--num-samples", type=int, default=64, help="ODE samples per run (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after compiling (default 2)")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    for w in args.workdirs:
        if not os.path.isdir(w):
            p.error(f"--workdirs: {w!r} is not a directory (train it with experiments/train.py)")
    for name in ("repeats", "num_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_examples is not None and args.num_examples < 1:
        p.error(f"--num-examples must be >= 1, got {args.num_examples}")
    return args


def _timed(fn, repeats: int):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import equinox as eqx
    import jax
    import jax.random as jr
    import numpy as np

    import scoreflow_eqx as sf

    runs = {}
    for w in args.workdirs:
        flow, info = sf.load_flow(w)
        runs[w] = (flow, info)
    dataset = sf.data.load_dataset("digits")
    data = dataset.test if args.num_examples is None else dataset.test[: args.num_examples]

    def evaluate(flow):
        return sf.evaluate_bpd(
            flow,
            data,
            discretization=dataset.discretization,
            key=jr.key(0),
            method=sf.ODELikelihood(),
            show_progress=False,
        )

    @eqx.filter_jit
    def draw(flow, keys):
        return jax.vmap(lambda k: sf.sample(flow, key=k, throw=False))(keys)

    keys = jr.split(jr.key(1), args.num_samples)
    rows = {w: {"workdir": w} for w in args.workdirs}
    for w, (flow, _) in runs.items():
        rows[w]["conditioning"] = type(flow.conditioning).__name__
    for phase in ("eval", "sample"):
        for w, (flow, _) in runs.items():
            if phase == "eval":
                res, first, med = _timed(lambda: evaluate(flow), args.repeats)
                rows[w] |= {
                    "bpd": res.bpd,
                    "ci95": res.ci95,
                    "nfe_mean": res.nfe_mean,
                    "nfe_max": res.nfe_max,
                    "eval_s": med,
                    "eval_first_s": first,
                }
            else:
                res, first, med = _timed(
                    lambda: jax.block_until_ready(draw(flow, keys)), args.repeats
                )
                rows[w] |= {"sample_nfe_mean": float(np.mean(res.nfe)), "sample_s": med}
    lines = [
        f"| run | conditioning | test bits/dim (ODE) | NFE mean / max | eval (s, {len(data)} "
        f"examples) | sampling NFE mean | sampling (s, {args.num_samples} samples) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['workdir']} | {r['conditioning']} | {r['bpd']:.3f} ± {r['ci95']:.3f} | "
            f"{r['nfe_mean']:.0f} / {r['nfe_max']} | {r['eval_s']:.1f} | "
            f"{r['sample_nfe_mean']:.0f} | {r['sample_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return list(rows.values())


if __name__ == "__main__":
    main()
