"""Variational dequantization for a finished training run, and a table of test bits/dim
under every dequantizer.

Loads the EMA flow of an `experiments/train.py` work directory, trains a variational
dequantizer q(u | k) with the flow frozen (Song et al. 2021, Section 5.2; Flow++)
into WORKDIR/dequantizer (rerunning resumes), and with --table evaluates the test set
with uniform, truncated-normal (i-DODE) and variational dequantization, each plain and
importance-weighted, for the probability-flow ODE and the Theorem 3 bound: bits/dim
with 95% CI, NFE per example and wall time, printed as Markdown and written to
WORKDIR/dequantize_results.{json,md}.

Importance-weighted rows (K > 1) use the ODE with Hutchinson's estimator or the
Monte Carlo bound unless --ode-divergence exact: they are biased LOW (see
`sf.evaluate_bpd`) and marked so in the table.

Examples:

    python experiments/train.py --workdir runs/digits              # the model
    python experiments/dequantize.py --workdir runs/digits --table  # ~10 min + table
    python experiments/dequantize.py --workdir runs/digits --steps 0 --table --ks 1 4
    python experiments/dequantize.py --workdir /tmp/smoke --quick --table
"""

import argparse
import json
import math
import os
import time


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--workdir", required=True, help="work directory of a finished train.py run")
    p.add_argument(
        "--dataset",
        help="the run's data, if not a built-in dataset (.npy/.npz path; checked against "
        "the run's fingerprint)",
    )
    t = p.add_argument_group("training the variational dequantizer")
    t.add_argument("--steps", type=int, default=1200, help="training steps (0: none)")
    t.add_argument("--batch-size", type=int, default=32, help="examples per step")
    t.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    t.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    t.add_argument("--num-t", type=int, default=2, help="times of the bound per example")
    t.add_argument("--layers", type=int, default=4, help="coupling layers")
    t.add_argument("--width", type=int, default=64, help="width of the conditioner MLPs")
    t.add_argument("--checkpoint-every", type=int, default=200, help="checkpoint period")
    t.add_argument("--seed", type=int, default=0, help="seed of q's initialisation and noise")
    e = p.add_argument_group("evaluation")
    e.add_argument("--table", action="store_true", help="evaluate every dequantizer")
    e.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="K of the IW rows")
    e.add_argument("--eval-examples", type=int, help="test examples (default all)")
    e.add_argument("--eval-batch-size", type=int, default=64, help="examples per batch")
    e.add_argument("--bound-num-t", type=int, default=100, help="times per example (bound)")
    e.add_argument("--rtol", type=float, default=1e-5, help="ODE tolerance (rtol = atol)")
    e.add_argument(
        "--ode-divergence",
        default="hutchinson",
        choices=["hutchinson", "exact"],
        help="divergence of the ODE rows (exact: valid IW bounds, D times the cost)",
    )
    e.add_argument(
        "--methods", nargs="+", default=["ode", "bound"], choices=["ode", "bound"], help="rows"
    )
    p.add_argument("--quick", action="store_true", help="a tiny smoke test")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("batch_size", "num_t", "layers", "width", "checkpoint_every", "eval_batch_size",
                 "bound_num_t", "eval_examples"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("steps", "warmup", "seed"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if any(k < 1 for k in args.ks):
        p.error(f"--ks must be integers >= 1, got {args.ks}")
    for name in ("lr", "rtol"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            p.error(f"--{name} must be a finite number > 0, got {getattr(args, name)}")
    if args.quick:
        args.steps = min(args.steps, 6)
        args.batch_size = min(args.batch_size, 8)
        args.warmup = min(args.warmup, 2)
        args.checkpoint_every = min(args.checkpoint_every, 3)
        args.layers, args.width = min(args.layers, 2), min(args.width, 16)
        args.ks = sorted({min(k, 2) for k in args.ks})
        args.eval_examples = min(args.eval_examples or 4, 4)
        args.bound_num_t = min(args.bound_num_t, 4)
        args.rtol = max(args.rtol, 1e-3)
    return args


def load_run(sf, args):
    """The run's EMA flow, its dataset (checked against the run's fingerprint) and info."""
    from scoreflow_eqx.data._sources import fingerprint

    flow, info = sf.load_flow(args.workdir)
    record = info["config"]
    argv = record.get("extra", {}).get("argv", [])
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
    disc = info["discretization"]
    if args.dataset is not None:
        dataset = sf.data.load_dataset(args.dataset, num_levels=disc.num_levels,
                                       data_range=disc.data_range, seed=seed)  # fmt: skip
    elif info["dataset"] in sf.data.DATASETS:
        dataset = sf.data.load_dataset(info["dataset"], seed=seed)
    else:
        raise ValueError(f"The run was trained on {info['dataset']!r}; pass --dataset PATH.")
    if fingerprint(dataset.train) != record["data"]["train_sha1"]:
        raise ValueError("The dataset is not the run's training data (fingerprints differ).")
    if not dataset.discretization.is_discrete:
        raise ValueError(
            f"The run's data ({dataset.name}) are continuous (num_levels=None): there is "
            "nothing to dequantize."
        )
    return flow, dataset, info


def train_variational(sf, flow, dataset, args):
    import jax.random as jr

    deq = sf.VariationalDequantizer(
        dataset.discretization,
        dataset.data_shape,
        num_layers=args.layers,
        width_size=args.width,
        depth=2,
        context_size=32,
        key=jr.key(args.seed),
    )
    t0 = time.perf_counter()
    result = sf.train_dequantizer(
        flow,
        deq,
        dataset,
        key=jr.key(args.seed + 1),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        num_t=args.num_t,
        workdir=os.path.join(args.workdir, "dequantizer"),
        checkpoint_every=args.checkpoint_every,
        log_every=max(1, min(50, args.steps)),
        show_progress=not args.no_progress,
    )
    seconds = time.perf_counter() - t0
    if result.metrics:
        dim = math.prod(dataset.data_shape)
        bits = float(dataset.discretization.bits_per_dim(result.metrics[-1]["loss"], dim=dim))
        print(
            f"dequantizer: step {result.step}, training objective of the last logged "
            f"steps {bits:.4f} bits/dim, {seconds:.0f} s"
        )
    return result.dequantizer, seconds


def rows(sf, flow, dataset, variational, args):
    """`(name, dequantizer, K)` of the table."""
    disc = dataset.discretization
    out = [
        ("uniform", sf.data.UniformDequantizer(disc), 1),
        (
            "truncated normal (i-DODE std)",
            sf.data.TruncatedNormalDequantizer.for_flow(disc, flow),
            1,
        ),
    ]
    out += [("uniform, IW", sf.data.UniformDequantizer(disc), k) for k in args.ks if k > 1]
    if variational is not None:
        out += [("variational", variational, k) for k in sorted({1, max(args.ks)})]
    return out


def methods(sf, args):
    import diffrax as dfx

    divergence = sf.ExactTrace() if args.ode_divergence == "exact" else sf.Hutchinson()
    ode = sf.ODELikelihood(
        divergence=divergence,
        stepsize_controller=dfx.PIDController(rtol=args.rtol, atol=args.rtol),
    )
    table = {"ode": ode, "bound": sf.BoundLikelihood(num_t=args.bound_num_t)}
    return {name: table[name] for name in args.methods}


def evaluate(sf, flow, dataset, variational, args):
    import jax.random as jr

    test = dataset.test if args.eval_examples is None else dataset.test[: args.eval_examples]
    results = []
    for m, (method_name, method) in enumerate(methods(sf, args).items()):
        for name, deq, k in rows(sf, flow, dataset, variational, args):
            exact = method_name == "ode" and args.ode_divergence == "exact"
            kwargs = dict(
                discretization=dataset.discretization,
                key=jr.fold_in(jr.key(args.seed + 2), m),  # the same noise for every row
                method=method,
                dequantizer=deq,
                num_importance_samples=k,
                allow_biased=True,
                batch_size=max(1, args.eval_batch_size // k),
            )
            # Compile first (one padded batch of the same shapes): the wall time below
            # is that of the evaluation alone.
            t0 = time.perf_counter()
            sf.evaluate_bpd(flow, test[:1], show_progress=False, **kwargs)
            compile_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = sf.evaluate_bpd(flow, test, show_progress=not args.no_progress, **kwargs)
            seconds = time.perf_counter() - t0
            row = {
                "dequantizer": name, "K": k, "method": method_name, "bpd": res.bpd,
                "ci95": res.ci95, "nfe_per_example": res.nfe_mean, "seconds": seconds,
                "compile_and_first_batch_seconds": compile_seconds,
                "num_examples": res.num_examples, "num_failed": res.num_failed,
                "biased_low": k > 1 and not exact,
            }  # fmt: skip
            results.append(row)
            print(markdown_row(row), flush=True)
    return results


HEADER = (
    "| likelihood | dequantizer | K | test bits/dim (95% CI) | NFE / example | wall time |\n"
    "|---|---|---:|---|---:|---:|"
)


def markdown_row(row) -> str:
    note = " (biased low)" if row["biased_low"] else ""
    failed = f", {row['num_failed']} failed" if row["num_failed"] else ""
    return (
        f"| {row['method']} | {row['dequantizer']} | {row['K']} | "
        f"{row['bpd']:.4f} +- {row['ci95']:.4f}{note}{failed} | "
        f"{row['nfe_per_example']:.0f} | {row['seconds']:.0f} s |"
    )


def write_table(results, info, args, train_seconds):
    md = "\n".join([HEADER, *(markdown_row(r) for r in results)])
    n = results[0]["num_examples"] if results else 0
    md += (
        f"\n\n{n} test examples of {info['dataset']}, flow of step {info['step']}; ODE: "
        f"{args.ode_divergence} divergence, rtol = atol = {args.rtol}; bound: "
        f"num_t = {args.bound_num_t}. K > 1: importance-weighted over K dequantizations "
        "(K solves per example); wall time without compilation; '(biased low)': with "
        "a noisy NLL estimate the "
        "importance-weighted value is biased low and not a bound (sf.evaluate_bpd)."
    )
    if train_seconds:
        md += f" Variational dequantizer: trained in {train_seconds:.0f} s this call."
    with open(os.path.join(args.workdir, "dequantize_results.md"), "w") as f:
        f.write(md + "\n")
    summary = {"rows": results, "dequantizer_train_seconds": train_seconds,
               "args": {k: v for k, v in vars(args).items()}}  # fmt: skip
    with open(os.path.join(args.workdir, "dequantize_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(md)


def main(argv=None):
    args = parse_args(argv)
    import scoreflow_eqx as sf

    try:
        flow, dataset, info = load_run(sf, args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(dataset)
    variational, train_seconds = None, 0.0
    if args.steps > 0:
        variational, train_seconds = train_variational(sf, flow, dataset, args)
    elif os.path.isdir(os.path.join(args.workdir, "dequantizer")):
        variational, deq_info = sf.load_dequantizer(args.workdir)
        print(f"loaded the dequantizer of step {deq_info['step']}")
    if args.table:
        if not args.no_progress:
            print(HEADER)
        results = evaluate(sf, flow, dataset, variational, args)
        write_table(results, info, args, train_seconds)


if __name__ == "__main__":
    main()
