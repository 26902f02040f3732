"""The paper's ablations (Song et al. 2021, Table 2) at CPU scale, on scikit-learn's digits
and on the 2-D checkerboard.

Digits: VP and sub-VP SDEs x {score_sde weighting (lambda = sigma^2, uniform t), likelihood
weighting (lambda = g^2, uniform t), likelihood weighting + importance sampling}, the same
U-Net, steps and seed: test bits/dim by the probability-flow ODE and by the Theorem 3 bound
with uniform dequantization, and with a trained variational dequantizer for the
likelihood-weighted rows; 95% CIs, NFE, training and evaluation time; the variance of the
loss with and without importance sampling over training; samples of every configuration by
three samplers (ODE, reverse SDE, predictor-corrector), scored by a digits classifier.
Checkerboard: the same three weighting rows (VP), test NLL by the ODE, and the entropy
estimate (Theorem 4) against the true entropy.

Every configuration is trained in its own sub-directory of --workdir and its results are
cached there: rerunning skips finished configurations (and resumes unfinished training).
Writes results.json, results.md, loss_variance.png and one sample grid per configuration.

    python experiments/paper_table.py --workdir runs/paper            # the full table
    python experiments/paper_table.py --workdir /tmp/paper --quick    # a smoke test
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time


@dataclasses.dataclass(frozen=True)
class Config:
    """One row of the table."""

    name: str
    dataset: str  # "digits" | "checkerboard"
    sde: str
    weighting: str
    importance_sampling: bool

    @property
    def label(self) -> str:
        if self.weighting == "score_sde":
            return "score_sde (sigma^2, uniform t)"
        return "likelihood + IS" if self.importance_sampling else "likelihood (uniform t)"

    @property
    def likelihood_weighted(self) -> bool:
        return self.weighting == "likelihood"


WEIGHTINGS = (("score_sde", False), ("likelihood", False), ("likelihood", True))


def _short(weighting: str, importance_sampling: bool) -> str:
    return weighting + ("_is" if importance_sampling else "")


CONFIGS = [
    Config(f"digits_{sde}_{_short(w, s)}", "digits", sde, w, s)
    for sde in ("vp", "subvp")
    for w, s in WEIGHTINGS
] + [Config(f"checkerboard_vp_{_short(w, s)}", "checkerboard", "vp", w, s) for w, s in WEIGHTINGS]


@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps, sizes and sample counts (full run or --quick)."""

    digits_steps: int = 1500
    toy_steps: int = 6000
    digits_batch: int = 64
    toy_batch: int = 128
    eval_examples: int | None = None  # all test digits
    toy_eval_examples: int = 2000
    bound_num_t: int = 100
    num_samples: int = 64
    sampler_steps: int = 250
    deq_steps: int = 300
    variance_every: int = 200
    unet: dict | None = None  # None: the "digits" preset


FULL = Budget()
QUICK = Budget(
    digits_steps=20,
    toy_steps=40,
    digits_batch=16,
    toy_batch=64,
    eval_examples=8,
    toy_eval_examples=64,
    bound_num_t=8,
    num_samples=8,
    sampler_steps=10,
    deq_steps=4,
    variance_every=10,
    unet={"base_channels": 8, "channel_mults": [1], "num_res_blocks": 1},
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True, help="where every configuration and the table go")
    p.add_argument("--quick", action="store_true", help="tiny steps and sizes (a smoke test)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these configurations (repeatable); names: "
        + ", ".join(c.name for c in CONFIGS),
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("samples", "variational", "entropy"),
        help="leave out a stage (repeatable); a later run without it adds the stage to the "
        "finished configurations without retraining them",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every configuration (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only) - {c.name for c in CONFIGS})
    if unknown:
        p.error(f"unknown --only {unknown}; valid names: {[c.name for c in CONFIGS]}")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    return args


# ---- one configuration ----------------------------------------------------------------

#: The checkerboard of `sf.data.toy("checkerboard")` is uniform on 8 squares of side 2 in
#: [-4, 4]^2 (half the unit squares of [-2, 2]^2, scaled by 2): area 32, entropy log 32.
CHECKERBOARD_ENTROPY = math.log(32.0)


def flow_config(sf, cfg: Config, budget: Budget, data_shape):
    if cfg.dataset == "digits":
        if budget.unet is None:
            preset = dict(sf.nets.UNET_PRESETS["digits"])
            preset.pop("data_shape")
            kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()}
        else:
            kwargs = dict(budget.unet)
        return sf.flow_config(data_shape, sde=cfg.sde, net="unet", net_kwargs=kwargs)
    width = 256 if budget is FULL else 32
    return sf.flow_config(data_shape, sde=cfg.sde, net="mlp", net_kwargs={"width_size": width})


def variance_batches(sf, dataset, num: int = 4, size: int = 256):
    """Fixed model-space batches for the loss variance (dequantized once)."""
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    train = np.asarray(dataset.train[: num * size])
    if dataset.discretization.is_discrete:
        deq = sf.data.UniformDequantizer(dataset.discretization)
        keys = jr.split(jr.key(123), len(train))
        train = jax.vmap(lambda k, key: deq(k, key=key)[0])(jnp.asarray(train), keys)
    train = np.asarray(train)
    return [train[i * size : (i + 1) * size] for i in range(len(train) // size)]


def train_flow(sf, cfg: Config, dataset, budget: Budget, run_dir: str, args):
    """Train (or resume) one configuration; the loss variance with and without importance
    sampling is recorded over training for the likelihood-weighted rows."""
    import jax.random as jr

    digits = cfg.dataset == "digits"
    fcfg = flow_config(sf, cfg, budget, dataset.data_shape)
    init_key, train_key = jr.split(jr.key(args.seed))
    flow = sf.make_flow(fcfg, key=init_key)
    series_path = os.path.join(run_dir, "loss_variance.jsonl")
    batches = variance_batches(sf, dataset) if cfg.likelihood_weighted else None

    def record_variance(step, state):
        if batches is None or step % budget.variance_every:
            return
        res = sf.loss_variance(state.flow, batches, key=jr.fold_in(jr.key(7), step))
        with open(series_path, "a") as f:
            f.write(json.dumps({"step": step, **dataclasses.asdict(res)}) + "\n")

    t0 = time.perf_counter()
    res = sf.train(
        flow,
        dataset,
        key=train_key,
        steps=budget.digits_steps if digits else budget.toy_steps,
        batch_size=budget.digits_batch if digits else budget.toy_batch,
        lr=1.5e-3 if digits else 2e-3,
        warmup_steps=200 if budget is FULL else 2,
        ema_decay=0.998 if digits else 0.999,
        weighting=cfg.weighting,
        importance_sampling=cfg.importance_sampling,
        workdir=run_dir,
        checkpoint_every=500,
        log_every=100 if budget is FULL else 5,
        steps_per_jit=5 if digits else 1,
        flow_config=fcfg,
        show_progress=not args.no_progress,
        callback=record_variance,
    )
    return res, time.perf_counter() - t0


def evaluate(sf, flow, dataset, budget: Budget, args, *, dequantizer=None, salt: int = 0):
    """Test bits/dim (digits) or NLL (checkerboard) by the ODE and by the bound."""
    import jax.random as jr

    digits = dataset.discretization.is_discrete
    num = budget.eval_examples if digits else budget.toy_eval_examples
    data = dataset.test if num is None else dataset.test[:num]
    out = {}
    methods = {"ode": sf.ODELikelihood(), "bound": sf.BoundLikelihood(num_t=budget.bound_num_t)}
    if not digits:
        methods["ode"] = sf.ODELikelihood(divergence=sf.ExactTrace())  # D = 2: exact is cheap
    for i, (name, method) in enumerate(methods.items()):
        t0 = time.perf_counter()
        res = sf.evaluate_bpd(
            flow,
            data,
            discretization=dataset.discretization,
            key=jr.fold_in(jr.key(args.seed + 1000), 10 * salt + i),
            method=method,
            dequantizer=dequantizer,
            batch_size=64 if digits else 500,
            show_progress=not args.no_progress,
        )
        seconds = time.perf_counter() - t0
        row = {
            "bpd": res.bpd,
            "ci95": res.ci95,
            "nfe_mean": res.nfe_mean,
            "num_failed": res.num_failed,
            "num_examples": res.num_examples,
            "seconds": seconds,
        }
        if not digits:  # the continuous density: report nats per example
            scale = dataset.dim * math.log(2)
            row |= {"nll": res.bpd * scale, "nll_ci95": res.ci95 * scale}
        out[name] = row
    return out


def draw_samples(sf, flow, dataset, budget: Budget, args, run_dir: str, scorer):
    """Samples by the three samplers, their grids and their classifier scores."""
    import equinox as eqx
    import jax
    import jax.random as jr
    import numpy as np

    from scoreflow_eqx.plotting import save_image_grid

    samplers = {
        "ode": sf.ProbabilityFlow(),
        "sde": sf.ReverseSDE(num_steps=budget.sampler_steps),
        "pc": sf.PredictorCorrector(num_steps=budget.sampler_steps),
    }

    @eqx.filter_jit
    def draw(flow, sampler, keys):
        return jax.vmap(lambda k: sf.sample(flow, key=k, sampler=sampler, throw=False))(keys)

    keys = jr.split(jr.key(args.seed + 2000), budget.num_samples)
    out = {}
    for name, sampler in samplers.items():
        t0 = time.perf_counter()
        res = jax.block_until_ready(draw(flow, sampler, keys))
        x = np.asarray(res.x)
        path = os.path.join(run_dir, f"samples_{name}.png")
        save_image_grid(x, path, data_range=dataset.discretization.data_range, scale=4)
        out[name] = {
            **scorer.score(x),
            "nfe_mean": float(np.mean(res.nfe)),
            "seconds": time.perf_counter() - t0,
            "png": os.path.relpath(path, args.workdir),
        }
    return out


def variational(sf, flow, dataset, budget: Budget, args, run_dir: str) -> dict:
    """Train a variational dequantizer for the frozen flow (resumable, in
    `<run_dir>/dequantizer`), then evaluate with it."""
    import jax.random as jr

    deq = sf.VariationalDequantizer(
        dataset.discretization, dataset.data_shape, key=jr.key(args.seed + 3000)
    )
    t0 = time.perf_counter()
    res = sf.train_dequantizer(
        flow,
        deq,
        dataset,
        key=jr.key(args.seed + 3001),
        steps=budget.deq_steps,
        workdir=os.path.join(run_dir, "dequantizer"),  # beside the flow's checkpoints
        show_progress=not args.no_progress,
    )
    return {
        "train_seconds": time.perf_counter() - t0,
        # The objective (nats per example) averaged over the last steps of this call.
        "train_objective_nats": float(res.losses[-50:].mean()) if len(res.losses) else None,
        "eval": evaluate(sf, flow, dataset, budget, args, dequantizer=res.dequantizer, salt=1),
    }


def entropy(sf, flow, dataset, budget: Budget, args) -> dict:
    """The Theorem 4 entropy estimate from the test points, against the true value."""
    import jax.random as jr

    t0 = time.perf_counter()
    data = dataset.test[: budget.toy_eval_examples]
    res = sf.entropy(flow, data, key=jr.key(args.seed + 4000))
    return {
        "entropy": float(res.entropy),
        "stderr": float(res.stderr),
        "true": CHECKERBOARD_ENTROPY,
        "seconds": time.perf_counter() - t0,
    }


def read_variance(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "loss_variance.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            by_step[r["step"]] = r  # a resumed run may repeat steps: keep the last
    return [by_step[s] for s in sorted(by_step)]


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _save(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def run_config(sf, cfg: Config, datasets, budget: Budget, args, scorer) -> dict:
    """Train, evaluate and sample one configuration. Each stage's result is saved in
    `<run_dir>/result.json` as soon as it is done, and a rerun skips the stages found there
    (and resumes unfinished training from its checkpoint)."""
    run_dir = os.path.join(args.workdir, cfg.name)
    path = os.path.join(run_dir, "result.json")
    result = _load(path)
    os.makedirs(run_dir, exist_ok=True)
    dataset = datasets[cfg.dataset]
    stages = ["uniform"]
    if cfg.dataset == "digits":
        stages.append("samples")
        if cfg.likelihood_weighted:
            stages.append("variational")
    else:
        stages.append("entropy")
    todo = [s for s in stages if s not in result and s not in args.skip]
    if not todo and "train_seconds" in result:
        return result
    res, train_seconds = train_flow(sf, cfg, dataset, budget, run_dir, args)
    flow = res.ema_flow
    if "train_seconds" not in result:
        result |= {
            "config": dataclasses.asdict(cfg),
            "train_seconds": train_seconds,
            "final_loss": res.metrics[-1]["loss"] if res.metrics else None,
            "loss_variance": read_variance(run_dir),
        }
        _save(path, result)
    for stage in todo:
        if stage == "uniform":
            result[stage] = evaluate(sf, flow, dataset, budget, args)
        elif stage == "samples":
            result[stage] = draw_samples(sf, flow, dataset, budget, args, run_dir, scorer)
        elif stage == "variational":
            result[stage] = variational(sf, flow, dataset, budget, args, run_dir)
        else:
            result[stage] = entropy(sf, flow, dataset, budget, args)
        _save(path, result)
    return result


# ---- outputs --------------------------------------------------------------------------


def _pm(row: dict | None, key: str = "bpd", ci: str = "ci95", digits: int = 3) -> str:
    if not row:
        return ""
    return f"{row[key]:.{digits}f} ± {row[ci]:.{digits}f}"


def digits_table(results: dict) -> list[str]:
    lines = [
        "| SDE | weighting | ODE bits/dim | NFE | bound bits/dim | ODE, variational deq. | "
        "bound, variational deq. | samples confident ODE / SDE / PC | train (s) | eval (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in CONFIGS:
        r = results.get(cfg.name)
        if r is None or cfg.dataset != "digits":
            continue
        u, v = r["uniform"], r.get("variational", {})
        if "samples" in r:
            conf = " / ".join(f"{r['samples'][s]['num_confident']}" for s in ("ode", "sde", "pc"))
            conf += f" (of {r['samples']['ode']['num']})"
        else:
            conf = "not run"
        evals = sum(x["seconds"] for x in u.values()) + sum(
            x["seconds"] for x in v.get("eval", {}).values()
        )
        lines.append(
            f"| {cfg.sde} | {cfg.label} | {_pm(u['ode'])} | {u['ode']['nfe_mean']:.0f} | "
            f"{_pm(u['bound'])} | {_pm(v.get('eval', {}).get('ode'))} | "
            f"{_pm(v.get('eval', {}).get('bound'))} | {conf} | "
            f"{r['train_seconds']:.0f} | {evals:.0f} |"
        )
    return lines


def toy_table(results: dict) -> list[str]:
    lines = [
        "| weighting | test NLL, ODE (nats) | bound (nats) | entropy estimate (nats) | "
        "true entropy (nats) | train (s) |",
        "|---|---|---|---|---|---|",
    ]
    for cfg in CONFIGS:
        r = results.get(cfg.name)
        if r is None or cfg.dataset != "checkerboard":
            continue
        u, e = r["uniform"], r.get("entropy", {})
        est = f"{e['entropy']:.3f} ± {e['stderr']:.3f}" if e else ""
        lines.append(
            f"| {cfg.label} | {_pm(u['ode'], 'nll', 'nll_ci95')} | "
            f"{_pm(u['bound'], 'nll', 'nll_ci95')} | {est} | {CHECKERBOARD_ENTROPY:.3f} | "
            f"{r['train_seconds']:.0f} |"
        )
    return lines


def variance_lines(results: dict) -> list[str]:
    lines = ["| configuration | step | var, uniform t | var, importance sampling | ratio |"]
    lines.append("|---|---|---|---|---|")
    for name, r in results.items():
        series = r.get("loss_variance") or []
        if series:
            last = series[-1]
            lines.append(
                f"| {name} | {last['step']} | {last['var_uniform']:.4g} | "
                f"{last['var_importance']:.4g} | {last['variance_ratio']:.3g} |"
            )
    return lines


def plot_variance(results: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, r) in enumerate(results.items()):
        series = r.get("loss_variance") or []
        if not series:
            continue
        steps = [s["step"] for s in series]
        ax.plot(steps, [s["var_uniform"] for s in series], f"C{i}-", label=f"{name}, uniform t")
        ax.plot(steps, [s["var_importance"] for s in series], f"C{i}--", label=f"{name}, IS")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("variance of the per-example loss")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def write_outputs(results: dict, args, real: dict, seconds: float) -> None:
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"configs": results, "real_test_digits": real, "seconds": seconds}, f, indent=2)
    lines = ["# Paper table at CPU scale", ""]
    lines += digits_table(results)
    lines += ["", f"Real test digits confident: {real['num_confident']} of {real['num']}.", ""]
    lines += toy_table(results) + [""] + variance_lines(results)
    lines += ["", f"Wall time of this call: {seconds / 60:.1f} min."]
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_variance(results, os.path.join(args.workdir, "loss_variance.png"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    import scoreflow_eqx as sf

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sample_quality import DigitsScorer

    budget = QUICK if args.quick else FULL
    os.makedirs(args.workdir, exist_ok=True)
    datasets = {
        "digits": sf.data.load_dataset("digits"),
        "checkerboard": sf.data.toy("checkerboard"),
    }
    scorer = DigitsScorer(datasets["digits"])
    real = scorer.score_real(budget.num_samples)
    t0 = time.perf_counter()
    results = {}
    for cfg in CONFIGS:
        if args.only and cfg.name not in args.only:
            cached = _load(os.path.join(args.workdir, cfg.name, "result.json"))
            if "train_seconds" in cached:  # finished earlier: keep it in the table
                results[cfg.name] = cached
            continue
        print(f"== {cfg.name}", flush=True)
        results[cfg.name] = run_config(sf, cfg, datasets, budget, args, scorer)
    write_outputs(results, args, real, time.perf_counter() - t0)
    with open(os.path.join(args.workdir, "results.md")) as f:
        print(f.read())
    return results


if __name__ == "__main__":
    main()
