"""Wall time per network evaluation of `evaluate_bpd` with the digits U-Net.

Runs on this checkout or on an older one (it uses only `flow_config`, `make_flow` and
`evaluate_bpd`, which every version has), so the cost of one likelihood evaluation can be
compared across versions on the same machine, one after the other:

    git worktree add /tmp/old f66c8b7
    PYTHONPATH=/tmp/old python benchmarks/per_nfe_cost.py --label f66c8b7
    python benchmarks/per_nfe_cost.py --label main

The network is the digits preset with its initial (random) parameters; the number that
compares versions is the time per batch-NFE (`seconds / (batches x NFE)`), because the NFE
itself depends on the parameters and on the conditioning (exact when `--num-examples` is a
multiple of `--batch-size`; otherwise the padded last batch makes it approximate).
Each call is compiled once and then timed (best of `--repeats`, through the returned host numbers).
"""

import argparse
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--label", default="this checkout", help="name printed in the row")
    p.add_argument(
        "--num-examples", type=int, default=128, help="test digits evaluated (default 128)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls after compiling (default 1)")
    args = p.parse_args(argv)
    for name in ("num_examples", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax.random as jr

    import scoreflow_eqx as sf

    preset = {k: v for k, v in sf.nets.UNET_PRESETS["digits"].items() if k != "data_shape"}
    flow = sf.make_flow(sf.flow_config((1, 8, 8), net="unet", net_kwargs=preset), key=jr.key(0))
    dataset = sf.data.load_dataset("digits")
    data = dataset.test[: args.num_examples]

    def run():
        return sf.evaluate_bpd(
            flow,
            data,
            discretization=dataset.discretization,
            key=jr.key(0),
            batch_size=args.batch_size,
        )

    t0 = time.perf_counter()
    result = run()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - t0)
    batches = -(-len(data) // args.batch_size)
    row = {
        "label": args.label,
        "nfe": float(result.nfe_mean),
        "first_s": first,
        "seconds": best,
        "ms_per_batch_nfe": 1e3 * best / (batches * float(result.nfe_mean)),
    }
    print("| version | NFE | first call (s) | timed call (s) | ms per batch-NFE |")
    print("|---|---|---|---|---|")
    print(
        f"| {row['label']} | {row['nfe']:.0f} | {row['first_s']:.1f} | {row['seconds']:.1f} | "
        f"{row['ms_per_batch_nfe']:.1f} |"
    )
    return row


if __name__ == "__main__":
    main()
