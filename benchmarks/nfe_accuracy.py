"""NFE against accuracy of the probability-flow likelihood of a trained model.

For a trained run (a work directory of `experiments/train.py`, e.g. the digits job) and a
fixed set of test points and Rademacher probes, this measures, per solve option and
tolerance, the number of score-network evaluations (NFE) of `sf.ode_nll` and its error
against a tight float64 reference solve with the SAME probe (so the error is the
solver's alone, not Hutchinson's), with the wall time per batch beside the NFE.

- Test points: the first `--num-examples` test examples, dequantized once (uniform,
  fixed key); one fixed Rademacher probe per example.
- Reference: the same flow with its parameters cast to float64, Dopri8 at rtol = atol =
  `--reference-tol`, in a subprocess with `jax_enable_x64` (cached in the work
  directory).
- Candidates: float32 (what users run), per-example solves under `jax.vmap` (each
  example its own steps and NFE), plus the batched solve that `sf.evaluate_bpd` uses
  by default (one step size for the batch) for the default option.

Writes `<out>.md` (the table), `<out>.json` and `<out>.png` (|error| against NFE).
`--train-steps N` trains a short digits run into `--workdir` first if it holds none.

    python benchmarks/nfe_accuracy.py --workdir runs/digits
    python benchmarks/nfe_accuracy.py --workdir runs/short --train-steps 600 --quick
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time


OPTIONS = (
    "dopri5",
    "tsit5",
    "bosh3",
    "dopri8",
    "dopri5-xnorm",
    "dopri5-nllnorm",
    "dopri5-logsnrtime",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True, help="work directory of a trained run")
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="if --workdir has no checkpoint, train the digits job for this many steps first",
    )
    p.add_argument("--num-examples", type=int, default=6, help="test points (default 6)")
    p.add_argument(
        "--tols",
        type=float,
        nargs="+",
        default=[1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6],
        help="rtol = atol of each candidate solve",
    )
    p.add_argument(
        "--options",
        nargs="+",
        default=list(OPTIONS),
        choices=OPTIONS,
        help="solver / error-norm options (default: all)",
    )
    p.add_argument("--reference-tol", type=float, default=1e-10, help="default 1e-10")
    p.add_argument("--seed", type=int, default=0, help="dequantization and probe seed")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument(
        "--out",
        default=None,
        help="output path prefix (default: <workdir>/nfe_accuracy)",
    )
    p.add_argument("--quick", action="store_true", help="two tolerances, two options")
    p.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.num_examples < 1:
        p.error(f"--num-examples must be >= 1, got {args.num_examples}")
    bad = [t for t in args.tols if not (math.isfinite(t) and t > 0)]
    if bad or not (math.isfinite(args.reference_tol) and args.reference_tol > 0):
        p.error(f"tolerances must be finite and > 0, got {bad or args.reference_tol}")
    if args.train_steps is not None and args.train_steps < 1:
        p.error(f"--train-steps must be >= 1, got {args.train_steps}")
    if args.quick:
        args.tols, args.options = [1e-3, 1e-5], ["dopri5", "tsit5"]
    args.out = args.out or os.path.join(args.workdir, "nfe_accuracy")
    return args


def ensure_trained(args) -> None:
    if os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        return
    if args.train_steps is None:
        sys.exit(f"{args.workdir} holds no trained run; pass --train-steps N to train one.")
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "train.py")
    cmd = [sys.executable, script, "--workdir", args.workdir, "--steps", str(args.train_steps)]
    subprocess.run(cmd + ["--no-eval", "--no-progress"], check=True)


# ---- shared by both processes ---------------------------------------------------------


def test_points(sf, args):
    """`(flow, xs, keys, dim)`: the EMA flow, dequantized test points and the probe keys
    (Rademacher probes are the same for a key in float32 and float64)."""
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    flow, info = sf.load_flow(args.workdir)
    data = sf.data.load_dataset(info["dataset"])
    levels = jnp.asarray(data.test[: args.num_examples])
    deq = sf.data.UniformDequantizer(info["discretization"])
    dkey, pkey = jr.split(jr.key(args.seed))
    keys = jr.split(dkey, levels.shape[0])
    xs = jax.vmap(lambda k, key: deq(k, key=key)[0])(levels, keys)
    probe_keys = jr.split(pkey, levels.shape[0])
    return flow, xs.astype(jnp.float32), probe_keys, math.prod(levels.shape[1:])


def reference_path(args) -> str:
    import scoreflow_eqx as sf

    step = sf.load_flow(args.workdir)[1]["step"]
    name = f"nfe_reference_step{step}_n{args.num_examples}_seed{args.seed}.json"
    return os.path.join(args.workdir, name)


# ---- the float64 reference (subprocess) -----------------------------------------------


def compute_reference(args) -> None:
    import jax

    import scoreflow_eqx as sf

    flow, xs, probes, _ = test_points(sf, args)  # as trained (float32), then cast
    path = reference_path(args)
    jax.config.update("jax_enable_x64", True)
    import diffrax as dfx
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np

    flow64 = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, flow)
    tol = args.reference_tol
    ctrl = dfx.PIDController(rtol=tol, atol=tol)

    @eqx.filter_jit
    def one(flow, x, probe):
        res = sf.ode_nll(
            flow, x, key=probe, solver=dfx.Dopri8(), stepsize_controller=ctrl,
            max_steps=100_000, throw=False,
        )  # fmt: skip
        return res.nll, res.nfe

    out = [one(flow64, x.astype(jnp.float64), p) for x, p in zip(xs, probes)]
    nll = [float(n) for n, _ in out]
    if not np.all(np.isfinite(nll)):
        sys.exit(f"the reference solve failed: {nll}")
    record = {"nll": nll, "nfe": [int(f) for _, f in out], "tol": tol}
    with open(path, "w") as f:
        json.dump(record, f)


def load_reference(args) -> dict:
    path = reference_path(args)
    if not os.path.exists(path):
        cmd = [sys.executable, __file__, "--reference-only", "--workdir", args.workdir]
        cmd += ["--num-examples", str(args.num_examples), "--seed", str(args.seed)]
        cmd += ["--reference-tol", str(args.reference_tol)]
        print("computing the float64 reference ...", flush=True)
        subprocess.run(cmd, check=True)
    with open(path) as f:
        return json.load(f)


# ---- candidates ------------------------------------------------------------------------


def _x_norm(tree):
    # Only the state x: delta is integrated on x's steps.
    import jax.numpy as jnp

    x, _ = tree
    return jnp.sqrt(jnp.mean(x**2))


def _nll_norm(tree):
    # x (RMS) and delta weighted equally: delta alone counts as much as all of x.
    import jax.numpy as jnp

    x, delta = tree
    return jnp.sqrt(0.5 * (jnp.mean(x**2) + delta**2))


def option(name: str, tol: float):
    """`(solver, stepsize_controller)` of a named option at tolerance `tol`."""
    import diffrax as dfx
    import jax.numpy as jnp

    solver_name, _, norm = name.partition("-")
    solver = {"dopri5": dfx.Dopri5, "tsit5": dfx.Tsit5, "bosh3": dfx.Bosh3, "dopri8": dfx.Dopri8}
    norms = {"xnorm": _x_norm, "nllnorm": _nll_norm}
    tol_array = jnp.asarray(tol, jnp.float32)  # an array: one compilation for every tolerance
    controller = dfx.PIDController(rtol=tol_array, atol=tol_array)
    if norm in norms:
        controller = dfx.PIDController(rtol=tol_array, atol=tol_array, norm=norms[norm])
    return solver[solver_name](), controller


def ode_nll_in_log_snr_time(sf, flow, x, key, solver, ctrl):
    """`sf.ode_nll` solved in the time `lambda = log(sigma_t / alpha_t)` instead of `t`:
    `d(x, delta)/d lambda = (h, div h) dt/d lambda`, `dt/d lambda = 2 sigma_t^2 / g(t)^2`
    (the same ODE, so the same NLL; only the steps differ)."""
    import diffrax as dfx
    import jax
    import jax.numpy as jnp

    from scoreflow_eqx._likelihood import augmented_vector_field
    from scoreflow_eqx._solver import solve_options

    sde, divergence = flow.sde, sf.Hutchinson()
    vf = augmented_vector_field(flow, divergence)

    def vf_lambda(lam, y, state):
        t = sde.inverse_neg_log_snr(2 * lam)
        _, sigma = sde.marginal(t)
        dt = 2 * sigma**2 / sde.diffusion_squared(t)
        return jax.tree.map(lambda v: v * dt.astype(v.dtype), vf(t, y, state))

    options = solve_options(
        solver=solver, stepsize_controller=ctrl, rtol=None, atol=None, dt0=None,
        max_steps=4096, adjoint=dfx.RecursiveCheckpointAdjoint(), throw=False,
        progress_meter=dfx.NoProgressMeter(),
    )  # fmt: skip
    lam0, lam1 = (0.5 * sde.neg_log_snr(jnp.asarray(t, x.dtype)) for t in (flow.eps, sde.T))
    y0 = (x, jnp.zeros((), x.dtype))
    sol, nfe = options.solve(vf_lambda, lam0, lam1, y0, divergence.init(x, key=key))
    assert sol.ys is not None
    (z,), (delta,) = sol.ys
    return -(sde.prior_logp(z) + delta), nfe


def timed(fn, repeats: int):
    import jax

    out = jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2]


def run_candidates(sf, args, flow, xs, probes, reference, dim) -> list[dict]:
    import equinox as eqx
    import jax
    import numpy as np

    @eqx.filter_jit
    def per_example(flow, xs, probes, solver, ctrl):
        def one(x, p):
            return sf.ode_nll(
                flow, x, key=p, solver=solver, stepsize_controller=ctrl,
                throw=False,
            )  # fmt: skip

        res = jax.vmap(one)(xs, probes)
        return res.nll, res.nfe

    @eqx.filter_jit
    def per_example_log_snr_time(flow, xs, probes, solver, ctrl):
        def one(x, p):
            return ode_nll_in_log_snr_time(sf, flow, x, p, solver, ctrl)

        return jax.vmap(one)(xs, probes)

    @eqx.filter_jit
    def batched(flow, xs, probes, solver, ctrl):
        res = sf.ode_nll_batched(
            flow, xs, key=probes, solver=solver, stepsize_controller=ctrl,
            throw=False,
        )  # fmt: skip
        return res.nll, res.nfe

    ref = np.asarray(reference["nll"])
    rows = []
    for name in args.options:
        modes = {"per-example": per_example}
        if name.endswith("logsnrtime"):
            modes = {"per-example": per_example_log_snr_time}
        if name == "dopri5":
            modes["batched"] = batched
        for mode, fn in modes.items():
            for tol in args.tols:
                solver, ctrl = option(name, tol)
                (nll, nfe), seconds = timed(
                    lambda: fn(flow, xs, probes, solver, ctrl), args.repeats
                )  # noqa: B023
                rows.append(summarise(name, mode, tol, np.asarray(nll), np.asarray(nfe), ref, dim))
                rows[-1]["seconds"] = seconds
                print(format_row(rows[-1]), flush=True)
    return rows


def summarise(name, mode, tol, nll, nfe, ref, dim) -> dict:
    import numpy as np

    err = nll - ref
    to_bpd = 1 / (dim * math.log(2))
    return {
        "option": name,
        "mode": mode,
        "tol": tol,
        "nfe_mean": float(nfe.mean()),
        "nfe_max": int(nfe.max()),
        "abs_err_mean": float(np.abs(err).mean()),
        "abs_err_max": float(np.abs(err).max()),
        "bias_bpd": float(err.mean() * to_bpd),
        "failed": int((~np.isfinite(nll)).sum()),
    }


def format_row(r: dict) -> str:
    return (
        f"| {r['option']} | {r['mode']} | {r['tol']:.0e} | {r['nfe_mean']:.0f} | "
        f"{r['nfe_max']} | {r['abs_err_mean']:.2e} | {r['abs_err_max']:.2e} | "
        f"{r['bias_bpd']:+.1e} | {r.get('seconds', float('nan')):.2f} | {r['failed']} |"
    )


HEADER = [
    "| option | solve | tol | NFE mean | NFE max | mean abs error (nats) | max abs error "
    "(nats) | bias (bits/dim) | time per batch (s) | failed |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def write_outputs(args, rows, reference, meta) -> None:
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "reference": reference, **meta}, f, indent=2)
    lines = [f"Run: `{args.workdir}` (step {meta['step']}), {args.num_examples} test points.", ""]
    lines += HEADER + [format_row(r) for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(args, rows)


def plot(args, rows) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    curves = sorted({(r["option"], r["mode"]) for r in rows})
    for name, mode in curves:
        mine = [r for r in rows if (r["option"], r["mode"]) == (name, mode)]
        pts = sorted((r["nfe_mean"], r["abs_err_mean"]) for r in mine)
        ax.plot(*zip(*pts), "o-", label=f"{name} ({mode})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE per likelihood")
    ax.set_ylabel("mean |NLL error| (nats)")
    ax.legend(fontsize=7)
    fig.savefig(args.out + ".png", dpi=120, bbox_inches="tight")


def main(argv=None):
    args = parse_args(argv)
    if args.reference_only:
        return compute_reference(args)
    ensure_trained(args)
    reference = load_reference(args)
    import scoreflow_eqx as sf

    flow, xs, probes, dim = test_points(sf, args)
    print(HEADER[0] + "\n" + HEADER[1], flush=True)
    rows = run_candidates(sf, args, flow, xs, probes, reference, dim)
    _, info = sf.load_flow(args.workdir)
    write_outputs(args, rows, reference, {"step": info["step"]})


if __name__ == "__main__":
    main()
