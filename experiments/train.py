"""Train a score-based diffusion model by maximum likelihood and report test bits/dim.

Trains with likelihood weighting and importance sampling (Song et al. 2021) on the
chosen dataset, checkpointing to --workdir (rerunning the same command resumes), then
evaluates the EMA model on the test set with the probability-flow ODE and with the
variational bound (mean, 95% CI, NFE), and saves a PNG grid of probability-flow ODE
samples for image data.

Examples:

    python experiments/train.py --workdir runs/digits        # the default digits job
    python experiments/train.py --dataset two_moons --net mlp --workdir runs/moons
    python experiments/train.py --dataset my.npz --num-levels 256 --data-range -1 1 ...
    python experiments/train.py --quick --workdir /tmp/smoke       # a smoke test
"""

import argparse
import json
import math
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        default="digits",
        help="digits | checkerboard | eight_gaussians | swiss_roll | two_moons | a "
        "path to a .npy/.npz file",
    )
    d.add_argument(
        "--num-levels",
        type=int,
        default=None,
        help="levels of a user file's integer data (omit for continuous data)",
    )
    d.add_argument(
        "--data-range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="model-space range of a user file's levels (default -1 1)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--sde", default="vp", choices=["vp", "subvp", "ve"])
    m.add_argument("--beta-min", type=float, default=0.1, help="VP/subVP")
    m.add_argument("--beta-max", type=float, default=20.0, help="VP/subVP")
    m.add_argument("--sigma-min", type=float, default=0.01, help="VE")
    m.add_argument("--sigma-max", type=float, default=50.0, help="VE")
    m.add_argument(
        "--net",
        default=None,
        choices=["mlp", "unet"],
        help="default: unet for images (the 'digits' preset on 8x8), mlp otherwise",
    )
    m.add_argument("--width", type=int, default=256, help="MLP hidden width")
    m.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    m.add_argument(
        "--net-kwargs",
        type=json.loads,
        default={},
        help="extra JSON keyword arguments of the net, e.g. '{\"hidden_size\": 64}'",
    )
    t = p.add_argument_group("training")
    t.add_argument("--weighting", default="likelihood", choices=["likelihood", "score_sde"])
    t.add_argument(
        "--importance-sampling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw t from the importance-sampling proposal",
    )
    t.add_argument("--steps", type=int, default=None, help="default: 2600 images, 6000 else")
    t.add_argument("--batch-size", type=int, default=None, help="default: 64 images, 128 else")
    t.add_argument("--lr", type=float, default=None, help="default: 1.5e-3 images, 2e-3 else")
    t.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument(
        "--ema-decay", type=float, default=None, help="default: 0.998 images, 0.999 else"
    )
    t.add_argument(
        "--steps-per-jit",
        type=int,
        default=None,
        help="training steps per compiled call (a lax.scan); default: 5 images, 1 else "
        "(the U-Net runs 1.5x faster per step inside a scan on CPU, the MLP slower: "
        "benchmarks/train_step.py)",
    )
    t.add_argument("--checkpoint-every", type=int, default=1000)
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=0, help="test bits/dim (bound) every N steps")
    t.add_argument(
        "--eval-ode-every",
        type=int,
        default=0,
        help="test bits/dim (ODE) every N steps",
    )
    t.add_argument("--workdir", required=True, help="checkpoints, logs and results")
    t.add_argument("--seed", type=int, default=0)
    e = p.add_argument_group("final evaluation")
    e.add_argument("--eval-examples", type=int, default=None, help="test examples (default all)")
    e.add_argument("--eval-batch-size", type=int, default=64)
    e.add_argument(
        "--bound-num-t",
        type=int,
        default=100,
        help="importance-sampled times per example for the bound (the paper uses 1000)",
    )
    e.add_argument("--rtol", type=float, default=1e-5, help="ODE tolerance (rtol = atol)")
    e.add_argument("--num-samples", type=int, default=64, help="samples in the PNG grid")
    e.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--quick", action="store_true", help="a tiny smoke-test run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# Defaults by kind of data; the image defaults are the README's digits job, chosen to train
# and evaluate within 15 minutes on 2 CPU cores (measured: 6.1 min on an idle machine).
IMAGE_DEFAULTS = dict(
    net="unet", steps=2600, batch_size=64, lr=1.5e-3, ema_decay=0.998, steps_per_jit=5
)
VECTOR_DEFAULTS = dict(
    net="mlp", steps=6000, batch_size=128, lr=2e-3, ema_decay=0.999, steps_per_jit=1
)


def resolve_defaults(args, data_shape) -> argparse.Namespace:
    defaults = IMAGE_DEFAULTS if len(data_shape) == 3 else VECTOR_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.steps = min(args.steps, 30)
        args.batch_size = min(args.batch_size, 32)
        args.warmup = min(args.warmup, 5)
        args.checkpoint_every = min(args.checkpoint_every, 15)
        args.log_every = min(args.log_every, 10)
        args.width = min(args.width, 64)
        args.eval_examples = min(args.eval_examples or 16, 16)
        args.num_samples = min(args.num_samples, 16)
        args.bound_num_t = min(args.bound_num_t, 10)
        if args.net == "unet" and not args.net_kwargs:
            args.net_kwargs = {"base_channels": 8, "channel_mults": [1], "num_res_blocks": 1}
    return args


def sde_kwargs(args) -> dict:
    if args.sde == "ve":
        return {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max}
    return {"beta_min": args.beta_min, "beta_max": args.beta_max}


def net_kwargs(args, data_shape) -> dict:
    if args.net == "mlp":
        return {"width_size": args.width, "depth": args.depth, **args.net_kwargs}
    if not args.net_kwargs and tuple(data_shape) == (1, 8, 8):
        from scoreflow_eqx.nets import UNET_PRESETS

        preset = {k: v for k, v in UNET_PRESETS["digits"].items() if k != "data_shape"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()}
    return dict(args.net_kwargs)


# --------------------------------------------------------------------------------------
# Final evaluation and sampling.


def final_evaluation(sf, flow, dataset, args, key) -> dict:
    import jax.random as jr

    test = dataset.test if args.eval_examples is None else dataset.test[: args.eval_examples]
    results = {}
    options = {
        "bound": {"num_t": args.bound_num_t},
        "ode": {"rtol": args.rtol, "atol": args.rtol},
    }
    for i, method in enumerate(("bound", "ode")):
        t0 = time.perf_counter()
        res = sf.evaluate_bpd(
            flow,
            test,
            discretization=dataset.discretization,
            key=jr.fold_in(key, i),
            method=method,
            batch_size=args.eval_batch_size,
            show_progress=not args.no_progress,
            **options[method],
        )
        seconds = time.perf_counter() - t0
        results[method] = {
            "bpd": float(res.bpd),
            "ci95": float(res.ci95),
            "nfe_mean": float(res.nfe_mean),
            "nfe_max": float(res.nfe_max),
            "num_failed": int(res.num_failed),
            "num_examples": int(res.num_examples),
            "seconds": seconds,
        }
        print(
            f"test bits/dim ({method}): {res.bpd:.4f} +- {res.ci95:.4f} (95% CI), "
            f"NFE mean {res.nfe_mean:.0f} max {res.nfe_max:.0f}, "
            f"{res.num_failed} failed, {res.num_examples} examples, {seconds:.0f} s"
        )
    return results


def save_samples(sf, flow, dataset, args, key) -> str | None:
    import jax
    import jax.random as jr

    if len(dataset.data_shape) != 3:
        return None  # a grid of images only makes sense for image data
    from scoreflow_eqx.plotting import save_image_grid

    keys = jr.split(key, args.num_samples)
    draw = jax.jit(jax.vmap(lambda k: sf.sample(flow, dataset.data_shape, key=k, method="ode")))
    samples = draw(keys).x
    path = os.path.join(args.workdir, "samples.png")
    save_image_grid(
        samples,
        path,
        nrow=int(math.ceil(math.sqrt(args.num_samples))),
        data_range=dataset.discretization.data_range,  # clipped and mapped to [0, 1]
        scale=max(1, 64 // max(dataset.data_shape[1:])),  # small images are upscaled
    )
    print(f"samples: {path}")
    return path


# --------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax.random as jr

    import scoreflow_eqx as sf

    dataset = sf.data.load_dataset(
        args.dataset,
        seed=args.seed,
        num_levels=args.num_levels,
        data_range=None if args.data_range is None else tuple(args.data_range),
    )
    print(dataset)
    args = resolve_defaults(args, dataset.data_shape)
    cfg = sf.flow_config(
        dataset.data_shape,
        sde=args.sde,
        sde_kwargs=sde_kwargs(args),
        net=args.net,
        net_kwargs=net_kwargs(args, dataset.data_shape),
    )
    print(
        f"net {args.net} {cfg['net_kwargs']}, {args.steps} steps at batch {args.batch_size}, "
        f"lr {args.lr}, EMA {args.ema_decay}, {args.weighting} weighting, "
        f"importance sampling {args.importance_sampling}"
    )
    init_key, train_key, eval_key, sample_key = jr.split(jr.key(args.seed), 4)
    flow = sf.make_flow(cfg, key=init_key)
    t0 = time.perf_counter()
    result = sf.train(
        flow,
        dataset,
        key=train_key,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        weighting=args.weighting,
        importance_sampling=args.importance_sampling,
        workdir=args.workdir,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        eval_every=args.eval_every,
        eval_ode_every=args.eval_ode_every,
        eval_num_examples=args.eval_examples,
        eval_batch_size=args.eval_batch_size,
        steps_per_jit=args.steps_per_jit,
        flow_config=cfg,
        config={"argv": sys.argv[1:] if argv is None else list(argv)},
        show_progress=not args.no_progress,
    )
    train_seconds = time.perf_counter() - t0
    print(f"trained to step {result.step} in {train_seconds:.0f} s")
    summary = {"step": result.step, "train_seconds": train_seconds}
    if result.metrics:
        summary["final_loss"] = result.metrics[-1]["loss"]
    if not args.no_eval:
        summary["test_bpd"] = final_evaluation(sf, result.ema_flow, dataset, args, eval_key)
        summary["samples"] = save_samples(sf, result.ema_flow, dataset, args, sample_key)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
