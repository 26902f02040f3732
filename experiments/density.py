"""The model as a density on 2-D toys: ODE maximum-likelihood fine-tuning and the
Theorem 4 entropy estimate.

For each toy: train a small MLP flow (VP SDE) by likelihood-weighted DSM, then fine-tune it
with `sf.ODEObjective` (the probability-flow NLL through the solve, Hutchinson, gradients
by the chosen adjoint), and, as a control, continue the DSM training for as many steps with the
same optimizer settings; report the test ODE NLL (exact trace) before and after, the
cost of one step of each objective, and the entropy estimated by `sf.entropy` from test
samples with each flow. For the checkerboard, uniform on 8 squares of side 2 (area 32),
the true entropy is log 32 = 3.466 nats; the test NLL is a cross-entropy, >= the entropy.

    python experiments/density.py                          # checkerboard and eight_gaussians
    python experiments/density.py --toys checkerboard --dsm-steps 4000 --ode-steps 200
    python experiments/density.py --quick                  # a smoke test
"""

import argparse
import math
import time


# Uniform on 8 squares of side 2; eight Gaussians of std 0.2 on a circle of radius 2 (their
# overlap, 7.7 std apart, is negligible): log 8 + log(2 pi e 0.2^2).
KNOWN_ENTROPY = {
    "checkerboard": math.log(32.0),
    "eight_gaussians": math.log(8.0) + math.log(2 * math.pi * math.e * 0.04),
}


def _step_time(flow, data, objective, batch_size: int, repeats: int = 5) -> float:
    """Median wall time (s) of one compiled training step, after a warm-up."""
    import jax
    import jax.random as jr
    import numpy as np

    import scoreflow_eqx as sf
    from scoreflow_eqx._sharding import batch_sharding, replicate
    from scoreflow_eqx._training import init_state

    mesh = sf.data_parallel_mesh()
    optimizer = sf.default_optimizer(lr=1e-4, warmup_steps=0)
    step = sf.make_train_step(optimizer, mesh=mesh, objective=objective)
    state = replicate(init_state(flow, optimizer, key=jr.key(0)), mesh)
    batch = jax.device_put(np.asarray(data.train[:batch_size]), batch_sharding(mesh))
    state, metrics = step(batch, state)  # warm-up (compiles)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(batch, state)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _test_nll(flow, xs, tol: float) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    import scoreflow_eqx as sf

    nll = jax.jit(
        jax.vmap(lambda x: sf.ode_nll(flow, x, divergence="exact", rtol=tol, atol=tol).nll)
    )(xs)
    return float(jnp.mean(nll)), float(jnp.std(nll) / math.sqrt(xs.shape[0]))


def run_toy(name: str, args) -> dict:
    import jax.numpy as jnp
    import jax.random as jr

    import scoreflow_eqx as sf

    data = sf.data.toy(name, num_train=50_000, num_test=max(args.eval_num, args.entropy_num))
    net = sf.nets.MLP(data_shape=(2,), width_size=args.width, depth=3, key=jr.key(0))
    flow = sf.ScoreFlow(sf.VPSDE(), net)
    start = time.perf_counter()
    dsm = sf.train(
        flow, data, key=jr.key(1), steps=args.dsm_steps, batch_size=args.batch_size, lr=2e-3,
        warmup_steps=100, ema_decay=args.ema_decay, show_progress=False,
    )  # fmt: skip
    dsm_s = time.perf_counter() - start
    objective = sf.ODEObjective(sf.Hutchinson(), rtol=args.ode_tol, atol=args.ode_tol)
    start = time.perf_counter()
    tuned = sf.train(
        dsm.ema_flow, data, key=jr.key(2), steps=args.ode_steps, batch_size=args.ode_batch_size,
        lr=args.ode_lr, warmup_steps=10, ema_decay=0.0, objective=objective,
        show_progress=False,
    )  # fmt: skip
    ode_s = time.perf_counter() - start
    # The control: as many more DSM steps, with the same optimizer settings.
    more_dsm = sf.train(
        dsm.ema_flow, data, key=jr.key(2), steps=args.ode_steps, batch_size=args.ode_batch_size,
        lr=args.ode_lr, warmup_steps=10, ema_decay=0.0, show_progress=False,
    )  # fmt: skip
    test = jnp.asarray(data.test[: args.eval_num])
    entropy_data = jnp.asarray(data.test[: args.entropy_num])
    row = {"toy": name, "dsm_train_s": dsm_s, "ode_train_s": ode_s}
    row["nll_more_dsm"] = _test_nll(more_dsm.flow, test, args.eval_tol)
    for label, f in (("dsm", dsm.ema_flow), ("ode", tuned.flow)):
        row[f"nll_{label}"] = _test_nll(f, test, args.eval_tol)
        h = sf.entropy(f, entropy_data, key=jr.key(3), num_t=args.entropy_num_t)
        row[f"entropy_{label}"] = (float(h.entropy), float(h.stderr))
    row["dsm_step_s"] = _step_time(dsm.ema_flow, data, "dsm", args.ode_batch_size)
    row["ode_step_s"] = _step_time(dsm.ema_flow, data, objective, args.ode_batch_size)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--toys", nargs="+", default=["checkerboard", "eight_gaussians"])
    parser.add_argument("--width", type=int, default=128, help="MLP width (3 hidden layers)")
    parser.add_argument("--dsm-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256, help="DSM batch size")
    parser.add_argument("--ema-decay", type=float, default=0.99, help="of the DSM run")
    parser.add_argument("--ode-steps", type=int, default=100)
    parser.add_argument("--ode-batch-size", type=int, default=64)
    parser.add_argument("--ode-lr", type=float, default=5e-4)
    parser.add_argument("--ode-tol", type=float, default=1e-3, help="rtol = atol in training")
    parser.add_argument("--eval-num", type=int, default=1000, help="test points for the NLL")
    parser.add_argument("--eval-tol", type=float, default=1e-5, help="rtol = atol of the NLL")
    parser.add_argument("--entropy-num", type=int, default=10_000)
    parser.add_argument("--entropy-num-t", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.toys, args.width, args.dsm_steps, args.ode_steps = ["checkerboard"], 16, 20, 2
        args.batch_size, args.ode_batch_size, args.eval_num, args.entropy_num = 64, 16, 16, 64
        args.eval_tol = 1e-3
    rows = [run_toy(name, args) for name in args.toys]
    print(
        f"MLP width {args.width} x 3, VP SDE; DSM {args.dsm_steps} steps (batch "
        f"{args.batch_size}, EMA {args.ema_decay:g}), then ODE fine-tuning {args.ode_steps} "
        "steps (batch "
        f"{args.ode_batch_size}, lr {args.ode_lr:g} after 10 warm-up steps, Hutchinson, "
        f"rtol = atol = {args.ode_tol:g}); "
        f"test NLL: exact trace, rtol = atol = {args.eval_tol:g}, {args.eval_num} points; "
        f"entropy: {args.entropy_num} test points x {args.entropy_num_t} times\n"
    )
    print(
        "| toy | test NLL, DSM (nats) | + ODE fine-tuning | + as many DSM steps "
        "| entropy, DSM flow | entropy, fine-tuned flow | true entropy "
        "| DSM step (ms) | ODE step (ms) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        true = KNOWN_ENTROPY.get(r["toy"])
        cells = [
            r["toy"],
            "{:.3f} ± {:.3f}".format(*r["nll_dsm"]),
            "{:.3f} ± {:.3f}".format(*r["nll_ode"]),
            "{:.3f} ± {:.3f}".format(*r["nll_more_dsm"]),
            "{:.3f} ± {:.3f}".format(*r["entropy_dsm"]),
            "{:.3f} ± {:.3f}".format(*r["entropy_ode"]),
            "n/a" if true is None else f"{true:.3f}",
            f"{1e3 * r['dsm_step_s']:.1f}",
            f"{1e3 * r['ode_step_s']:.0f}",
            f"{r['ode_step_s'] / r['dsm_step_s']:.0f}x",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
