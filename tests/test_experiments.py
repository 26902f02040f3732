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
    "experiments/exact_nll_demo.py",
    "experiments/density.py",
    "benchmarks/nfe_per_nll.py",
    "benchmarks/net_in_loop.py",
    "benchmarks/train_step.py",
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
