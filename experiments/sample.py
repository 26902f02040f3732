"""Draw samples from a trained score-based model (or a demo with an exact score) and
save them as a PNG.

Examples:

    # A trained run (written by experiments/train.py / sf.train), EMA parameters:
    python experiments/sample.py --workdir runs/digits --method pc --num 64 --out s.png

    # No workdir needed: a 2-D Gaussian mixture with its exact score, scatter plot:
    python experiments/sample.py --demo --method ode --num 2000 --out demo.png
    python experiments/sample.py --demo --quick       # smoke test, a few seconds
"""

import argparse
import json
import math
import os
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from tqdm import tqdm

import scoreflow_eqx as sf
from scoreflow_eqx.plotting import save_image_grid, scatter_2d


METHODS = ("ode", "sde", "pc")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="work directory of a training run")
    src.add_argument(
        "--demo",
        action="store_true",
        help="sample a 2-D Gaussian mixture with its exact score (no workdir needed)",
    )
    p.add_argument("--method", choices=METHODS, default="ode")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--out", default=None, help="PNG path (default: next to workdir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="samples per jit call")
    p.add_argument(
        "--raw", action="store_true", help="--workdir only: raw parameters instead of EMA"
    )
    p.add_argument("--num-steps", type=int, help="sde / pc only: time steps (default 1000)")
    p.add_argument("--snr", type=float, help="pc only: corrector SNR (default 0.16)")
    p.add_argument(
        "--corrector-steps", type=int, help="pc only: Langevin steps per step (default 1; 0: none)"
    )
    p.add_argument(
        "--predictor",
        choices=("reverse_diffusion", "euler_maruyama"),
        help="pc only (default reverse_diffusion)",
    )
    p.add_argument("--rtol", type=float, help="ode only: tolerance (default 1e-5)")
    p.add_argument("--atol", type=float, help="ode only: tolerance (default 1e-5)")
    p.add_argument("--denoise", action="store_true", help="final Tweedie step")
    p.add_argument("--sde", choices=("vp", "subvp", "ve"), help="--demo only: the SDE (default vp)")
    p.add_argument("--quick", action="store_true", help="smoke test: few samples and steps")
    args = p.parse_args(argv)
    applies = {
        "num_steps": ("sde", "pc"),
        "snr": ("pc",),
        "corrector_steps": ("pc",),
        "predictor": ("pc",),
        "rtol": ("ode",),
        "atol": ("ode",),
    }
    for name, methods in applies.items():
        if getattr(args, name) is not None and args.method not in methods:
            p.error(f"--{name.replace('_', '-')} does not apply to --method {args.method}")
    if args.demo and args.raw:
        p.error("--raw does not apply to --demo (the demo has no trained parameters)")
    if not args.demo and args.sde is not None:
        p.error("--sde applies to --demo only (a work directory records its own SDE)")
    if args.snr is not None and args.corrector_steps == 0:
        p.error("--snr does not apply with --corrector-steps 0 (no corrector)")
    args.sde = args.sde or "vp"
    if args.quick:
        args.num = min(args.num, 16)
        args.num_steps = min(args.num_steps or 20, 20)
        args.rtol = max(args.rtol or 1e-3, 1e-3)
        args.atol = max(args.atol or 1e-3, 1e-3)
    for name in ("num", "batch_size", "num_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.corrector_steps is not None and args.corrector_steps < 0:
        p.error("--corrector-steps must be >= 0")
    for name in ("snr", "rtol", "atol"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name} must be a finite number > 0")
    return args


def make_sampler(args) -> sf.AbstractSampler:
    """The sampler object the flags describe."""
    if args.method == "ode":
        pid = dfx.PIDController(rtol=args.rtol or 1e-5, atol=args.atol or 1e-5)
        return sf.ProbabilityFlow(stepsize_controller=pid)
    num_steps = args.num_steps or 1000
    if args.method == "sde":
        return sf.ReverseSDE(num_steps=num_steps)
    predictor = {
        "reverse_diffusion": sf.ReverseDiffusionPredictor(),
        "euler_maruyama": sf.EulerMaruyamaPredictor(),
    }[args.predictor or "reverse_diffusion"]
    n = 1 if args.corrector_steps is None else args.corrector_steps
    corrector = None if n == 0 else sf.LangevinCorrector(snr=args.snr or 0.16, num_steps=n)
    return sf.PredictorCorrector(predictor=predictor, corrector=corrector, num_steps=num_steps)


def demo_flow(sde_name: str):
    """Eight Gaussians on a circle, with the exact score under the chosen SDE."""
    sde = {"vp": sf.VPSDE(), "subvp": sf.SubVPSDE(), "ve": sf.VESDE()}[sde_name]
    angles = jnp.arange(8) * (2 * math.pi / 8)
    means = 2.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)
    mixture = sf.GaussianMixture(jnp.ones(8), means, jnp.full((8,), 0.2))
    net = sf.nets.GaussianMixtureScore(mixture, sde)
    return sf.ScoreFlow(sde, net, parameterization="score"), mixture


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    def mean_dist(a, b):
        return float(np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).mean())

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def draw(flow, shape, args):
    sampler = make_sampler(args)

    # The flow is an argument of the compiled function (not constants baked into it).
    @eqx.filter_jit
    def batch(flow, keys):
        def one(k):
            return sf.sample(flow, shape, key=k, sampler=sampler, denoise=args.denoise, throw=False)

        return jax.vmap(one)(keys)

    keys = jr.split(jr.key(args.seed), args.num)
    xs, nfes, oks = [], [], []
    t0 = time.perf_counter()
    with tqdm(total=args.num, desc=f"sampling ({args.method})", unit="sample") as bar:
        for i in range(0, args.num, args.batch_size):
            chunk = keys[i : i + args.batch_size]
            if len(chunk) < args.batch_size and i > 0:  # reuse the compiled shape
                pad = jnp.concatenate([chunk, keys[: args.batch_size - len(chunk)]])
                res = jax.tree.map(lambda a: a[: len(chunk)], batch(flow, pad))
            else:
                res = batch(flow, chunk)
            res = jax.block_until_ready(res)
            xs.append(np.asarray(res.x))
            nfes.append(np.asarray(res.nfe))
            oks.append(np.asarray(dfx.is_successful(res.result)))
            bar.update(len(chunk))
            bar.set_postfix(nfe=int(nfes[-1].max()))
    seconds = time.perf_counter() - t0
    return np.concatenate(xs), np.concatenate(nfes), np.concatenate(oks), seconds


def main(argv=None):
    args = parse_args(argv)
    mixture = None
    if args.demo:
        flow, mixture = demo_flow(args.sde)
        shape = (2,)
        data_range = None
        out = args.out or f"demo_{args.sde}_{args.method}.png"
    else:
        try:
            flow, info = sf.load_flow(args.workdir, ema=not args.raw)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        shape = tuple(info["data_shape"])
        data_range = tuple(info["discretization"].data_range)
        step = info["step"]
        default = os.path.join(args.workdir, "samples", f"{args.method}_{step:06d}.png")
        out = args.out or default

    x, nfe, ok, seconds = draw(flow, shape, args)
    summary = {
        "method": args.method,
        "num": int(x.shape[0]),
        "shape": list(shape),
        "nfe_mean": float(nfe.mean()),
        "nfe_max": int(nfe.max()),
        "failures": int((~ok).sum()),
        "seconds": round(seconds, 3),
        "finite": bool(np.isfinite(x).all()),
    }
    if mixture is not None:
        ref = np.asarray(
            jax.vmap(lambda k: mixture.sample(key=k))(jr.split(jr.key(args.seed + 1), x.shape[0]))
        )
        ref2 = np.asarray(
            jax.vmap(lambda k: mixture.sample(key=k))(jr.split(jr.key(args.seed + 2), x.shape[0]))
        )
        summary["energy_distance"] = energy_distance(x, ref)
        summary["energy_distance_true_vs_true"] = energy_distance(ref2, ref)
        summary["mean_error"] = np.abs(x.mean(0) - np.asarray(mixture.mean())).tolist()
        scatter_2d(
            x,
            out,
            reference=ref,
            lim=3.5,
            title=f"{args.sde.upper()} {args.method}, NFE {nfe.mean():.0f}",
        )
    elif len(shape) == 3 and shape[0] in (1, 3) and data_range is not None:
        scale = 4 if shape[1] <= 16 else 1
        save_image_grid(x, out, data_range=data_range, scale=scale)
    elif shape == (2,):
        scatter_2d(x, out)
    else:
        out = os.path.splitext(out)[0] + ".npy"
    np.save(os.path.splitext(out)[0] + ".npy", x)
    summary["out"] = out
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
