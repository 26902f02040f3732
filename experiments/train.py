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
import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default only when it has one (no "(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
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
        help="levels of a user file's integer data (omit for continuous data)",
    )
    d.add_argument(
        "--data-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="model-space range of a user file's levels (default -1 1)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--sde", default="vp", choices=["vp", "subvp", "ve"], help="the SDE")
    m.add_argument("--beta-min", type=float, help="VP/subVP only (default 0.1)")
    m.add_argument("--beta-max", type=float, help="VP/subVP only (default 20)")
    m.add_argument("--sigma-min", type=float, help="VE only (default 0.01)")
    m.add_argument("--sigma-max", type=float, help="VE only (default 50)")
    m.add_argument(
        "--net",
        choices=["mlp", "unet"],
        help="default: unet for images (the 'digits' preset on 8x8), mlp otherwise",
    )
    m.add_argument("--width", type=int, help="MLP only: hidden width (default 256)")
    m.add_argument("--depth", type=int, help="MLP only: hidden layers (default 3)")
    m.add_argument(
        "--net-kwargs",
        type=json.loads,
        default={},
        help="extra JSON keyword arguments of the net, e.g. "
        "'{\"base_channels\": 16}' for the U-Net or '{\"embedding_dim\": 64}' for the MLP",
    )
    m.add_argument(
        "--conditioning",
        default="log-snr",
        choices=["log-snr", "time"],
        help="what the net is conditioned on: log(sigma_t / alpha_t), smooth in t, or the "
        "time (1000 t for the sinusoidal embedding, as DDPM++; about twice the NFE per "
        "likelihood: benchmarks/nfe_accuracy.py)",
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--weighting",
        default="likelihood",
        choices=["likelihood", "score_sde"],
        help="lambda(t) = g^2 (likelihood) or sigma^2 (score_sde)",
    )
    t.add_argument(
        "--importance-sampling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw t from the importance-sampling proposal",
    )
    t.add_argument("--steps", type=int, help="default: 2600 images, 6000 else")
    t.add_argument("--batch-size", type=int, help="default: 64 images, 128 else")
    t.add_argument("--lr", type=float, help="default: 1.5e-3 images, 2e-3 else")
    t.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    t.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clipping (> 0)")
    t.add_argument("--ema-decay", type=float, help="default: 0.998 images, 0.999 else")
    t.add_argument(
        "--steps-per-jit",
        type=int,
        help="training steps per compiled call (a lax.scan); default: 5 images, 1 else "
        "(the U-Net runs 1.5x faster per step inside a scan on CPU, the MLP slower: "
        "benchmarks/train_step.py)",
    )
    t.add_argument("--checkpoint-every", type=int, default=1000, help="checkpoint period")
    t.add_argument("--log-every", type=int, default=100, help="metrics period")
    t.add_argument("--eval-every", type=int, default=0, help="test bits/dim (bound) every N steps")
    t.add_argument(
        "--eval-ode-every", type=int, default=0, help="test bits/dim (ODE) every N steps"
    )
    t.add_argument("--workdir", required=True, help="checkpoints, logs and results")
    t.add_argument("--seed", type=int, default=0, help="seed of the model, data order and noise")
    t.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="NAME",
        help="resume a run although this training setting differs from the checkpointed "
        "one (e.g. lr; repeatable)",
    )
    e = p.add_argument_group("final evaluation")
    e.add_argument("--eval-examples", type=int, help="test examples (default all)")
    e.add_argument("--eval-batch-size", type=int, default=64, help="examples per compiled batch")
    e.add_argument(
        "--bound-num-t",
        type=int,
        default=100,
        help="importance-sampled times per example for the bound (the paper uses 1000)",
    )
    e.add_argument("--rtol", type=float, default=1e-5, help="ODE tolerance (rtol = atol)")
    e.add_argument(
        "--dequantizer",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="also evaluate with a variational dequantizer trained by "
        "experiments/dequantize.py: the one in WORKDIR/dequantizer (no PATH) or in PATH",
    )
    e.add_argument("--num-samples", type=int, default=64, help="samples in the PNG grid")
    e.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--quick", action="store_true", help="a tiny smoke-test run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.no_eval:
        evaluation = {a.dest for a in e._group_actions} - {"no_eval"}
        given = sorted(explicit_flags(p, argv) & evaluation)
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            p.error(f"{flags} do(es) not apply with --no-eval")
    return args


def explicit_flags(p: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations of the flags given on the command line (not left at their
    defaults): `argv` parsed again with every default suppressed."""
    q = copy.deepcopy(p)
    for action in q._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(q.parse_known_args(argv)[0]))


def check_net_flags(args) -> None:
    if args.width is not None or args.depth is not None:
        raise SystemExit(
            "error: --width/--depth are MLP options (the net is the U-Net); for the U-Net "
            "use --net-kwargs, e.g. '{\"base_channels\": 16}'"
        )


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse flags that do not apply, and bad values, before any work."""
    if args.sde == "ve":
        wrong = [f for f in ("beta_min", "beta_max") if getattr(args, f) is not None]
    else:
        wrong = [f for f in ("sigma_min", "sigma_max") if getattr(args, f) is not None]
    if wrong:
        flags = ", ".join("--" + f.replace("_", "-") for f in wrong)
        p.error(f"{flags} do(es) not apply to --sde {args.sde}")
    if args.net == "unet":
        check_net_flags(args)
    if not isinstance(args.net_kwargs, dict):
        p.error("--net-kwargs must be a JSON object, e.g. '{\"base_channels\": 16}'")
    positive = ("steps", "batch_size", "warmup", "checkpoint_every", "log_every", "seed",
                "eval_examples", "eval_batch_size", "bound_num_t", "num_samples",
                "steps_per_jit", "width", "depth", "num_levels")  # fmt: skip
    for name in positive:
        value = getattr(args, name)
        low = 0 if name in ("warmup", "seed") else 1
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for name in ("eval_every", "eval_ode_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("lr", "grad_clip", "rtol", "beta_min", "beta_max", "sigma_min", "sigma_max"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")


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
    if args.net == "unet":
        check_net_flags(args)
    if args.quick:
        args.steps = min(args.steps, 30)
        args.batch_size = min(args.batch_size, 32)
        args.warmup = min(args.warmup, 5)
        args.checkpoint_every = min(args.checkpoint_every, 15)
        args.log_every = min(args.log_every, 10)
        args.eval_examples = min(args.eval_examples or 16, 16)
        args.num_samples = min(args.num_samples, 16)
        args.bound_num_t = min(args.bound_num_t, 10)
        if args.net == "unet" and not args.net_kwargs:
            args.net_kwargs = {"base_channels": 8, "channel_mults": [1], "num_res_blocks": 1}
    return args


def sde_kwargs(args) -> dict:
    if args.sde == "ve":
        names, defaults = ("sigma_min", "sigma_max"), (0.01, 50.0)
    else:
        names, defaults = ("beta_min", "beta_max"), (0.1, 20.0)
    return {n: d if getattr(args, n) is None else getattr(args, n) for n, d in zip(names, defaults)}


def conditioning(args) -> dict:
    if args.conditioning == "log-snr":
        return {"name": "log_snr"}
    sinusoidal = args.net_kwargs.get("embedding", "sinusoidal") == "sinusoidal"
    return {"name": "time", "scale": 1000.0 if sinusoidal else 1.0}


def net_kwargs(args, data_shape) -> dict:
    if args.net == "mlp":
        width = 256 if args.width is None else args.width
        depth = 3 if args.depth is None else args.depth
        if args.quick:
            width = min(width, 64)
        return {"width_size": width, "depth": depth, **args.net_kwargs}
    if not args.net_kwargs and tuple(data_shape) == (1, 8, 8):
        from scoreflow_eqx.nets import UNET_PRESETS

        preset = {k: v for k, v in UNET_PRESETS["digits"].items() if k != "data_shape"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()}
    return dict(args.net_kwargs)


# --------------------------------------------------------------------------------------
# Final evaluation and sampling.


def final_evaluation(sf, flow, dataset, args, key, variational=None) -> dict:
    import jax.random as jr

    test = dataset.test if args.eval_examples is None else dataset.test[: args.eval_examples]
    import diffrax as dfx

    results = {}
    dequantizers = {"": None}
    if variational is not None:
        dequantizers["_variational"] = variational
    methods = {
        "bound": sf.BoundLikelihood(num_t=args.bound_num_t),
        "ode": sf.ODELikelihood(
            stepsize_controller=dfx.PIDController(rtol=args.rtol, atol=args.rtol)
        ),
    }
    for i, (method_name, method) in enumerate(methods.items()):
        for suffix, dequantizer in dequantizers.items():
            name = method_name + suffix
            t0 = time.perf_counter()
            res = sf.evaluate_bpd(
                flow,
                test,
                discretization=dataset.discretization,
                key=jr.fold_in(key, i),
                method=method,
                dequantizer=dequantizer,
                batch_size=args.eval_batch_size,
                show_progress=not args.no_progress,
            )
            seconds = time.perf_counter() - t0
            results[name] = {
                "bpd": float(res.bpd),
                "ci95": float(res.ci95),
                "nfe_mean": float(res.nfe_mean),
                "nfe_max": float(res.nfe_max),
                "num_failed": int(res.num_failed),
                "num_examples": int(res.num_examples),
                "seconds": seconds,
            }
            print(
                f"test bits/dim ({name}): {res.bpd:.4f} +- {res.ci95:.4f} (95% CI), "
                f"NFE mean {res.nfe_mean:.0f} max {res.nfe_max:.0f}, "
                f"{res.num_failed} failed, {res.num_examples} examples, {seconds:.0f} s"
            )
    return results


def save_samples(sf, flow, dataset, args, key) -> dict | None:
    """Samples by the three samplers side by side in `samples.png` (one grid each in
    `samples_<sampler>.png`), and for digits their classifier scores."""
    import equinox as eqx
    import jax
    import jax.random as jr
    import numpy as np

    if len(dataset.data_shape) != 3:
        return None  # a grid of images only makes sense for image data
    from scoreflow_eqx.plotting import save_image_grid, save_image_grids

    samplers = {
        "ode": sf.ProbabilityFlow(),
        "sde": sf.ReverseSDE(num_steps=250),
        "pc": sf.PredictorCorrector(num_steps=250),
    }
    if args.quick:
        samplers = {k: v if k == "ode" else dataclasses.replace(v, num_steps=10)
                    for k, v in samplers.items()}  # fmt: skip

    # The flow is an argument of the compiled function, not a constant baked into it.
    @eqx.filter_jit
    def draw(flow, sampler, keys):
        return jax.vmap(lambda k: sf.sample(flow, key=k, sampler=sampler, throw=False))(keys)

    keys = jr.split(key, args.num_samples)
    samples = {name: np.asarray(draw(flow, s, keys).x) for name, s in samplers.items()}
    data_range = dataset.discretization.data_range
    scale = max(1, 64 // max(dataset.data_shape[1:]))  # small images are upscaled
    for name, x in samples.items():
        path = os.path.join(args.workdir, f"samples_{name}.png")
        save_image_grid(x, path, data_range=data_range, scale=scale)
    out: dict[str, Any] = {"png": os.path.join(args.workdir, "samples.png")}
    titles = {
        "ode": "probability-flow ODE",
        "sde": f"reverse SDE, {samplers['sde'].num_steps} steps",
        "pc": f"predictor-corrector, {samplers['pc'].num_steps} steps",
    }
    if dataset.name == "digits":
        from sample_quality import DigitsScorer

        scorer = DigitsScorer(dataset)
        out["scores"] = {name: scorer.score(x) for name, x in samples.items()}
        out["scores"]["real_test_digits"] = scorer.score_real(args.num_samples)
        for name, score in out["scores"].items():
            confident, num, balance = score["num_confident"], score["num"], score["class_balance"]
            print(f"samples ({name}): {confident} of {num} read as a digit with probability "
                  f"> 0.8, class balance {abs(balance):.2f}")  # fmt: skip
            if name in titles:
                titles[name] += f"\n{confident} of {num} confident"
    save_image_grids({titles[k]: x for k, x in samples.items()}, out["png"], data_range=data_range)
    print(f"samples: {out['png']}")
    return out


# --------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax.random as jr

    import scoreflow_eqx as sf

    try:  # bad data or model settings: a message, not a traceback, before any work
        dataset = sf.data.load_dataset(
            args.dataset,
            seed=args.seed,
            num_levels=args.num_levels,
            data_range=None if args.data_range is None else tuple(args.data_range),
        )
        args = resolve_defaults(args, dataset.data_shape)
        cfg = sf.flow_config(
            dataset.data_shape,
            sde=args.sde,
            sde_kwargs=sde_kwargs(args),
            net=args.net,
            net_kwargs=net_kwargs(args, dataset.data_shape),
            conditioning=conditioning(args),
        )
        init_key, train_key, eval_key, sample_key = jr.split(jr.key(args.seed), 4)
        flow = sf.make_flow(cfg, key=init_key)
        variational = None
        if args.dequantizer is not None:
            path = args.workdir if args.dequantizer == "auto" else args.dequantizer
            variational, _ = sf.load_dequantizer(path)
            if variational.discretization != dataset.discretization:
                raise ValueError(
                    f"--dequantizer {path} was trained for {variational.discretization}, "
                    f"not the data's {dataset.discretization}."
                )
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(dataset)
    print(
        f"net {args.net} {cfg['net_kwargs']}, conditioning {args.conditioning}, "
        f"{args.steps} steps at batch {args.batch_size}, "
        f"lr {args.lr}, EMA {args.ema_decay}, {args.weighting} weighting, "
        f"importance sampling {args.importance_sampling}"
    )
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
        allow_changes=tuple(args.allow_change),
        config={"argv": sys.argv[1:] if argv is None else list(argv)},
        show_progress=not args.no_progress,
    )
    train_seconds = time.perf_counter() - t0
    print(f"trained to step {result.step} in {train_seconds:.0f} s")
    summary = {"step": result.step, "train_seconds": train_seconds}
    if result.metrics:
        summary["final_loss"] = result.metrics[-1]["loss"]
    if not args.no_eval:
        summary["test_bpd"] = final_evaluation(
            sf, result.ema_flow, dataset, args, eval_key, variational
        )
        summary["samples"] = save_samples(sf, result.ema_flow, dataset, args, sample_key)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
