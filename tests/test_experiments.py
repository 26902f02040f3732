"""Smoke tests of the command-line scripts: each one runs end to end on a tiny setting, and
`experiments/sample.py` reads the work directory that `experiments/train.py` wrote."""

import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [
    "experiments/train.py",
    "experiments/sample.py",
    "experiments/dequantize.py",
    "experiments/exact_nll_demo.py",
    "experiments/paper_table.py",
    "experiments/density.py",
    "benchmarks/nfe_per_nll.py",
    "benchmarks/net_in_loop.py",
    "benchmarks/train_step.py",
    "benchmarks/nfe_accuracy.py",
    "benchmarks/eval_time.py",
    "benchmarks/per_nfe_cost.py",
    "benchmarks/adjoint.py",
]


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = _run(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_train_then_sample(tmp_path):
    workdir = str(tmp_path / "run")
    out = _run("experiments/train.py", "--quick", "--no-progress", "--workdir", workdir)
    assert out.returncode == 0, out.stderr
    assert "test bits/dim (ode)" in out.stdout and "test bits/dim (bound)" in out.stdout
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["step"] == 30
    assert results["test_bpd"]["ode"]["num_failed"] == 0
    assert os.path.exists(os.path.join(workdir, "samples.png"))
    png = str(tmp_path / "pc.png")
    out = _run(
        "experiments/sample.py",
        "--workdir",
        workdir,
        "--method",
        "pc",
        "--num",
        "4",
        "--num-steps",
        "20",
        "--out",
        png,
    )
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(png) > 0
    # A variational dequantizer for the run, its table, and train.py evaluating with it.
    out = _run("experiments/dequantize.py", "--workdir", workdir, "--quick", "--table",
               "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    with open(os.path.join(workdir, "dequantize_results.json")) as f:
        rows = json.load(f)["rows"]
    assert {(r["method"], r["dequantizer"], r["K"]) for r in rows} >= {
        ("ode", "uniform", 1), ("bound", "variational", 2), ("ode", "uniform, IW", 2),
    }  # fmt: skip
    assert all(r["num_failed"] == 0 for r in rows)
    with open(os.path.join(workdir, "dequantize_results.md")) as f:
        assert "| likelihood | dequantizer |" in f.read()
    out = _run("experiments/train.py", "--quick", "--no-progress", "--workdir", workdir,
               "--dequantizer")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "test bits/dim (bound_variational)" in out.stdout


def test_bad_arguments_fail_clearly(tmp_path):
    out = _run("experiments/train.py", "--dataset", "cifar", "--workdir", str(tmp_path))
    assert out.returncode != 0
    assert "digits" in out.stderr  # the message lists the valid names
    out = _run("experiments/train.py", "--sde", "vpp", "--workdir", str(tmp_path))
    assert out.returncode != 0 and "invalid choice" in out.stderr
    # Flags that do not apply, and bad values, are refused before any work.
    for flags, message in (
        (["--sde", "ve", "--beta-max", "5"], "--beta-max do(es) not apply to --sde ve"),
        (["--width", "64"], "--width/--depth are MLP options"),
        (["--grad-clip", "0"], "--grad-clip must be a finite number > 0"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--net-kwargs", '{"hidden_size": 64}'], "hidden_size"),
        (["--ema-decay", "1"], "--ema-decay must lie in [0, 1)"),
    ):
        out = _run("experiments/train.py", *flags, "--workdir", str(tmp_path / "x"))
        assert out.returncode != 0 and message in out.stderr, (flags, out.stderr[-500:])
        assert "Traceback" not in out.stderr
    out = _run("experiments/sample.py", "--demo", "--method", "sde", "--snr", "0.1")
    assert out.returncode != 0 and "--snr does not apply to --method sde" in out.stderr
    out = _run("experiments/sample.py", "--workdir", str(tmp_path / "nothing"))
    assert out.returncode != 0 and "not a training work directory" in out.stderr
    out = _run("experiments/dequantize.py", "--workdir", str(tmp_path / "nothing"))
    assert out.returncode != 0 and "not a training work directory" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run("experiments/dequantize.py", "--workdir", str(tmp_path), "--ks", "0")
    assert out.returncode != 0 and "--ks must be integers >= 1" in out.stderr


def _script(name):
    import importlib

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("train", "--no-eval --rtol 1e-3", "--rtol do(es) not apply with --no-eval"),
        ("train", "--no-eval --bound-num-t 5", "--bound-num-t do(es) not apply with --no-eval"),
        ("train", "--sde subvp --sigma-max 3", "--sigma-max do(es) not apply to --sde subvp"),
        ("train", "--net unet --depth 2", "--width/--depth are MLP options"),
        ("train", "--lr nan", "--lr must be a finite number > 0"),
        ("sample", "--workdir w --sde ve", "--sde applies to --demo only"),
        ("sample", "--demo --raw", "--raw does not apply to --demo"),
        (
            "sample",
            "--demo --method ode --num-steps 5",
            "--num-steps does not apply to --method ode",
        ),
        ("sample", "--demo --method pc --snr 0.1 --corrector-steps 0", "--snr does not apply"),
        ("sample", "--demo --method sde --rtol 1e-3", "--rtol does not apply to --method sde"),
    ],
)
def test_flags_that_do_not_apply_are_refused(script, argv, message, capsys):
    # In process (no JAX work): the refusal comes from argument parsing, before any work.
    argv = argv.split() + (["--workdir", "w"] if script == "train" else [])
    with pytest.raises(SystemExit) as exit_:
        _script(script).parse_args(argv)
    assert exit_.value.code != 0
    assert message in capsys.readouterr().err + str(exit_.value.code)


def test_help_has_no_default_none():
    for script in ("train", "sample"):
        parser_help = _help_text(_script(script))
        assert "(default: None)" not in parser_help
    assert '{"base_channels": 16}' in _help_text(_script("train"))


def _help_text(module):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return out.getvalue()


def test_paper_table_quick_and_resumable(tmp_path):
    # One digits row (training, uniform and variational dequantization, three samplers
    # scored by the classifier) and one checkerboard row (entropy) at --quick sizes.
    workdir = str(tmp_path / "paper")
    only = ["--only", "digits_vp_likelihood_is", "--only", "checkerboard_vp_likelihood_is"]
    args = ["experiments/paper_table.py", "--quick", "--no-progress", "--workdir", workdir]
    out = _run(*args, *only)
    assert out.returncode == 0, out.stderr
    with open(os.path.join(workdir, "results.json")) as f:
        first = json.load(f)["configs"]
    digits, toy = first["digits_vp_likelihood_is"], first["checkerboard_vp_likelihood_is"]
    assert set(digits) >= {"uniform", "samples", "variational", "loss_variance"}
    assert digits["uniform"]["ode"]["num_failed"] == 0
    assert set(digits["samples"]) == {"ode", "sde", "pc"}
    assert toy["entropy"]["stderr"] > 0 and "nll" in toy["uniform"]["ode"]
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    assert "| vp | likelihood + IS |" in table and "true entropy" in table
    # A rerun finds every stage done and trains nothing: the same results.
    out = _run(*args, *only)
    assert out.returncode == 0, out.stderr
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["configs"] == first
