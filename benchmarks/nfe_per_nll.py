"""NFE and wall time per probability-flow NLL evaluation, against the paper's reference
approach and against the cost floor.

For each problem, batch size, divergence estimator, solver and tolerance this measures
`scoreflow_eqx.ode_nll` (jit-compiled; vmapped per-example solves, or one batched solve
with a shared step size) after compilation, with `block_until_ready`, as the median of
repeats (compile time reported apart). Beside it:

- the reference that the paper's released code implements: `scipy.integrate.solve_ivp(
  method="RK45")` on the host in float64, the whole batch flattened into one ODE,
  calling a jitted drift-and-divergence function at every step (same probes, same
  tolerances);
- the floor: the NFE that the batched network has to run (max over the batch for vmapped
  solves) times the time of one evaluation of the augmented vector field (score and its
  VJP/JVP) measured inside a jitted `fori_loop`.

Problems: a Gaussian mixture in 2-D and in 64-D with its exact score (the error against
the analytic NLL is reported), and a convolutional network on 8x8 images (by default
the U-Net preset `digits` that the digits training job trains)
whose output is added to the exact noise prediction of an 8x8 Gaussian mixture, so that
the ODE is as hard as a trained model's while the cost is the network's.

Run `python benchmarks/nfe_per_nll.py --help`. `--quick` is a smoke test (seconds).
"""

import argparse
import math
import statistics
import time
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke-test grid")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument(
        "--problems",
        nargs="+",
        default=["mix2d", "mix64d", "conv8x8"],
        choices=["mix2d", "mix64d", "conv8x8"],
    )
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--tols", nargs="+", type=float, default=[1e-3, 1e-4, 1e-5])
    p.add_argument("--float32", action="store_true", help="float32 instead of float64")
    p.add_argument("--no-scipy", action="store_true", help="skip the scipy reference")
    p.add_argument(
        "--net",
        choices=["digits", "unet", "placeholder"],
        default="digits",
        help="network of the conv8x8 problem: the U-Net preset 'digits' (the network of "
        "the digits training job), the default sf.nets.UNet, or a 4-layer conv net",
    )
    p.add_argument("--out", default=None, help="write the Markdown table to this file")
    return p.parse_args()


ARGS = parse_args()
jax.config.update("jax_enable_x64", not ARGS.float32)

import scoreflow_eqx as sf  # noqa: E402
from scoreflow_eqx._likelihood import augmented_vector_field  # noqa: E402


def estimator(divergence: str, jacobian_mode: str) -> sf.AbstractDivergence:
    if divergence == "exact":
        return sf.ExactTrace(mode=jacobian_mode)
    return sf.Hutchinson(mode=jacobian_mode)


DTYPE = jnp.float32 if ARGS.float32 else jnp.float64


# ---- problems
# ----------------------------------------------------------------------------


def random_mixture(key, shape, k=4):
    mkey, skey = jr.split(key)
    means = 0.5 * jr.normal(mkey, (k, *shape), DTYPE)
    stds = jr.uniform(skey, (k, *shape), DTYPE, 0.2, 0.6)
    return sf.GaussianMixture(jnp.ones(k, DTYPE) / k, means, stds)


class PlaceholderConvNet(eqx.Module):
    """A channel-last conv net `net(t, x)` on (C, H, W) inputs, standing in for the
    U-Net: `depth` 3x3 convolutions of `width` channels with SiLU and a time bias per
    layer."""

    weights: list
    biases: list
    time_proj: eqx.nn.Linear
    out_weight: jax.Array

    def __init__(self, channels, width=64, depth=4, *, key):
        keys = jr.split(key, depth + 2)
        sizes = [channels] + [width] * depth
        self.weights = [
            jr.normal(keys[i], (3, 3, sizes[i], sizes[i + 1]), DTYPE) / math.sqrt(9 * sizes[i])
            for i in range(depth)
        ]
        self.biases = [jnp.zeros(width, DTYPE) for _ in range(depth)]
        self.time_proj = eqx.nn.Linear(32, width * depth, key=keys[-2], dtype=DTYPE)
        self.out_weight = jr.normal(keys[-1], (3, 3, width, channels), DTYPE) / math.sqrt(9 * width)

    def __call__(self, t, x):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jnp.transpose(x, (1, 2, 0))[None]
        freqs = jnp.exp(-math.log(1e4) * jnp.arange(16) / 15)
        emb = jnp.concatenate([jnp.sin(1e3 * t * freqs), jnp.cos(1e3 * t * freqs)])
        tb = self.time_proj(emb.astype(DTYPE)).reshape(len(self.weights), -1)
        for w, b, c in zip(self.weights, self.biases, tb):
            h = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=dn)
            h = jax.nn.silu(h + b + c)
        h = jax.lax.conv_general_dilated(h, self.out_weight, (1, 1), "SAME", dimension_numbers=dn)
        return jnp.transpose(h[0], (2, 0, 1)).astype(x.dtype)


class ExactPlusNet(eqx.Module):
    """Noise prediction = exact noise of a Gaussian mixture + 0.01 sigma_t * net(t, x):
    the ODE has the difficulty of a well-trained model, the cost of `net`."""

    exact: sf.nets.GaussianMixtureScore
    net: Callable
    sde: sf.AbstractSDE

    def __call__(self, t, x):
        _, sigma = self.sde.marginal(t)
        return -sigma * self.exact(t, x) + 0.01 * sigma * self.net(t, x)


def make_problem(name, key):
    sde = sf.VPSDE()
    mkey, nkey = jr.split(key)
    if name in ("mix2d", "mix64d"):
        shape = (2,) if name == "mix2d" else (64,)
        mixture = random_mixture(mkey, shape)
        net = sf.nets.GaussianMixtureScore(mixture, sde)
        flow = sf.ScoreFlow(sde, net, parameterization="score")
        return flow, mixture, True, "exact score"
    shape = (1, 8, 8)
    mixture = random_mixture(mkey, shape)
    if ARGS.net == "digits":
        inner = sf.nets.unet_preset("digits", key=nkey)
        label = "sf.nets.unet_preset('digits')"
    elif ARGS.net == "unet":
        inner = sf.nets.UNet(data_shape=shape, key=nkey)
        label = "sf.nets.UNet (default configuration)"
    else:
        inner = PlaceholderConvNet(1, key=nkey)
        label = "placeholder conv net (4x 3x3, 64 ch, NHWC)"
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(inner, eqx.is_array)))
    net = ExactPlusNet(sf.nets.GaussianMixtureScore(mixture, sde), inner, sde)
    flow = sf.ScoreFlow(sde, net, parameterization="noise")
    return flow, mixture, False, f"{label}, {n_params / 1e3:.0f}k params"


def analytic_nll(flow, mixture, x, z):
    """-log p_ODE(x) of the exact flow: -log p_eps(x) + log p_T(z) - log prior(z)."""
    p_eps = mixture.diffuse(flow.sde, flow.eps)
    p_T = mixture.diffuse(flow.sde, flow.sde.T)
    return -p_eps.log_prob(x) + p_T.log_prob(z) - flow.sde.prior_logp(z)


# ---- our solves
# --------------------------------------------------------------------------


def probes_for(key, xs, divergence):
    # The probes that ode_nll draws for example i from key i.
    if divergence == "exact":
        return None
    keys = jr.split(key, xs.shape[0])
    return jax.vmap(lambda x, k: sf.Hutchinson().init(x, key=k))(xs, keys)


def make_solve(divergence, jacobian_mode, solver, mode):
    div = estimator(divergence, jacobian_mode)

    @eqx.filter_jit
    def solve(flow, xs, key, tol):
        if mode == "vmap":
            keys = jr.split(key, xs.shape[0])
            res = jax.vmap(
                lambda x, k: sf.ode_nll(
                    flow, x, key=k, divergence=div, solver=solver, rtol=tol, atol=tol
                )
            )(xs, keys)
        else:
            res = sf.ode_nll_batched(
                flow, xs, key=key, divergence=div, solver=solver, rtol=tol, atol=tol
            )
        return res.nll, res.nfe, res.z

    return solve


def timed(fn, *args, repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return out, median, max(first - median, 0.0)


def make_floor(divergence, jacobian_mode):
    @eqx.filter_jit
    def loop(flow, xs, probes, n):
        vf = augmented_vector_field(flow, estimator(divergence, jacobian_mode))
        bvf = jax.vmap(vf, in_axes=(None, 0, None if probes is None else 0))
        zeros = jnp.zeros(xs.shape[0], xs.dtype)

        def body(i, carry):
            x, acc = carry
            t = flow.eps + (i + 1) / n * (flow.sde.T - flow.eps)
            dx, dd = bvf(t, (x, zeros), probes)
            return x + 1e-6 * dx, acc + dd

        return jax.lax.fori_loop(0, n, body, (xs, zeros))

    return loop


def floor_per_eval(loop, flow, xs, probes, repeats):
    """Seconds per augmented-vector-field evaluation inside a jitted loop, from the time
    of n and of 2n iterations (n calibrated to take >= 50 ms), so that dispatch and
    launch overheads cancel."""

    def run(n):
        _, t, _ = timed(lambda: loop(flow, xs, probes, jnp.asarray(n)), repeats=repeats)
        return t

    n = 16
    while run(n) < 0.05 and n < 2**16:
        n *= 2
    t1, t2 = run(n), run(2 * n)
    return max(t2 - t1, 1e-9) / n


# ---- the scipy reference (the released code's approach)
# ----------------------------------


def scipy_reference(flow, xs, probes, divergence, jacobian_mode, tol):
    from scipy.integrate import solve_ivp

    shape = xs.shape
    batch, d = shape[0], math.prod(shape[1:])
    vf = augmented_vector_field(flow, estimator(divergence, jacobian_mode))
    bvf = jax.vmap(vf, in_axes=(None, 0, None if probes is None else 0))

    @jax.jit
    def drift_and_divergence(t, y):
        x = y[: batch * d].reshape(shape).astype(xs.dtype)
        dx, dd = bvf(t, (x, jnp.zeros(batch, xs.dtype)), probes)
        return jnp.concatenate([dx.reshape(-1), dd])  # to float64 on the host

    def fun(t, y):
        # The host round trip of every evaluation: numpy -> device -> numpy.
        out = drift_and_divergence(jnp.asarray(t, xs.dtype), jnp.asarray(y, xs.dtype))
        return np.asarray(out, dtype=np.float64)

    y0 = np.concatenate([np.asarray(xs, np.float64).reshape(-1), np.zeros(batch)])
    fun(np.float64(flow.eps), y0)  # compile
    t0 = time.perf_counter()
    sol = solve_ivp(fun, (flow.eps, flow.sde.T), y0, rtol=tol, atol=tol, method="RK45")
    elapsed = time.perf_counter() - t0
    z = sol.y[: batch * d, -1].reshape(shape)
    delta = sol.y[batch * d :, -1]
    prior = np.asarray(jax.vmap(flow.sde.prior_logp)(jnp.asarray(z, xs.dtype)))
    return -(prior + delta), int(sol.nfev), elapsed, z


# ---- the grid
# ----------------------------------------------------------------------------


def configurations(problem, batch, tols):
    """(divergence, jacobian mode, solver, solve mode, tol, with scipy reference)."""
    exact_ok = problem != "conv8x8"
    tight, loose = min(tols), max(tols)
    rows = []
    for tol in tols:
        rows.append(("hutchinson", "forward", "Dopri5", "vmap", tol, True))
        if exact_ok:
            rows.append(("exact", "forward", "Dopri5", "vmap", tol, tol == tight))
    # Reverse mode (VJP, as the released code) for comparison.
    rows.append(("hutchinson", "reverse", "Dopri5", "vmap", loose, True))
    rows.append(("hutchinson", "forward", "Tsit5", "vmap", tight, False))
    if batch > 1:
        for tol in tols:
            rows.append(("hutchinson", "forward", "Dopri5", "batched", tol, True))
        if exact_ok:
            rows.append(("exact", "forward", "Dopri5", "batched", tight, True))
    return rows


SOLVERS = {"Dopri5": dfx.Dopri5(), "Tsit5": dfx.Tsit5()}


def run():
    quick = ARGS.quick
    repeats = 1 if quick else ARGS.repeats
    problems = ["mix2d"] if quick else ARGS.problems
    batches = [4] if quick else ARGS.batches
    tols = [1e-3] if quick else ARGS.tols
    rows = []
    notes = {}
    for problem in problems:
        flow, mixture, exact_score, label = make_problem(problem, jr.key(0))
        notes[problem] = label
        for batch in batches:
            xs = jax.vmap(lambda k: mixture.sample(key=k))(jr.split(jr.key(1), batch))
            xs = xs.astype(DTYPE)
            key = jr.key(2)
            solves, floors, references = {}, {}, {}
            grid = configurations(problem, batch, tols)
            if quick:  # Hutchinson and exact, vmapped and batched
                grid = grid[:2] + [c for c in grid if c[3] == "batched"]
            for divergence, jmode, sname, mode, tol, ref in grid:
                cfg = (divergence, jmode, sname, mode)
                if cfg not in solves:
                    solves[cfg] = make_solve(divergence, jmode, SOLVERS[sname], mode)
                    compile_new = True
                else:
                    compile_new = False
                tol_arr = jnp.asarray(tol, DTYPE)
                (nll, nfe, z), wall, compile_time = timed(
                    solves[cfg], flow, xs, key, tol_arr, repeats=repeats
                )
                nfe = np.asarray(nfe)
                cost_nfe = int(nfe.max())  # the batched network runs max(nfe) times
                if (divergence, jmode) not in floors:
                    loop = make_floor(divergence, jmode)
                    probes = probes_for(key, xs, divergence)
                    floors[divergence, jmode] = floor_per_eval(
                        loop, flow, xs, probes, max(repeats, 5)
                    )
                per_eval = floors[divergence, jmode]
                floor = cost_nfe * per_eval
                err = None
                if exact_score:
                    ana = jax.vmap(lambda x, z: analytic_nll(flow, mixture, x, z))(xs, z)
                    err = float(jnp.mean(jnp.abs(nll - ana)))
                row = dict(
                    problem=problem,
                    batch=batch,
                    divergence=divergence + ("" if divergence == "exact" else f" ({jmode[:3]})"),
                    solver=sname,
                    mode=mode,
                    tol=tol,
                    nfe_mean=float(nfe.mean()),
                    nfe_cost=cost_nfe,
                    wall_ms=1e3 * wall,
                    compile_s=compile_time if compile_new else None,
                    floor_ms=1e3 * floor,
                    ratio_floor=wall / floor,
                    err=err,
                )
                if ref and not ARGS.no_scipy:
                    # One reference run per (estimator, tolerance), shared by the vmapped
                    # and the batched rows: it does not depend on how we solve.
                    if (divergence, jmode, tol) not in references:
                        probes = probes_for(key, xs, divergence)
                        references[divergence, jmode, tol] = scipy_reference(
                            flow, xs, probes, divergence, jmode, tol
                        )
                    s_nll, s_nfe, s_wall, s_z = references[divergence, jmode, tol]
                    row.update(scipy_ms=1e3 * s_wall, scipy_nfe=s_nfe)
                    row["speedup"] = s_wall / wall
                    if exact_score:
                        ana = jax.vmap(lambda x, z: analytic_nll(flow, mixture, x, z))(
                            xs, jnp.asarray(s_z, xs.dtype)
                        )
                        row["scipy_err"] = float(np.mean(np.abs(s_nll - np.asarray(ana))))
                    row["nll_diff"] = float(np.max(np.abs(s_nll - np.asarray(nll))))
                rows.append(row)
                print(format_row(row), flush=True)
    return rows, notes


HEADER = (
    "| problem | batch | divergence | solver | solve | tol | NFE mean / cost | "
    "time (ms) | compile (s) | floor (ms) | time / floor | err (nats) | "
    "scipy RK45 (ms) | scipy NFE | speed-up vs scipy | scipy err (nats) |"
)


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def format_row(r):
    return (
        f"| {r['problem']} | {r['batch']} | {r['divergence']} | {r['solver']} | "
        f"{r['mode']} | {r['tol']:.0e} | {r['nfe_mean']:.0f} / {r['nfe_cost']} | "
        f"{r['wall_ms']:.3g} | {_fmt(r['compile_s'], '.1f')} | {r['floor_ms']:.3g} | "
        f"{r['ratio_floor']:.2f} | {_fmt(r['err'], '.1e')} | "
        f"{_fmt(r.get('scipy_ms'), '.1f')} | {_fmt(r.get('scipy_nfe'), 'd')} | "
        f"{_fmt(r.get('speedup'), '.1f')} | {_fmt(r.get('scipy_err'), '.1e')} |"
    )


def main():
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, dtype {DTYPE.__name__}")
    print(HEADER)
    rows, notes = run()
    table = "\n".join(
        [HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [format_row(r) for r in rows]
    )
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            f.write(table + "\n\n")
            for problem, label in notes.items():
                f.write(f"- `{problem}`: {label}\n")
        print(f"wrote {ARGS.out}")


if __name__ == "__main__":
    main()
