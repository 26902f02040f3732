"""A run is never silently wrong: each class of fault injected (non-finite updates, a
resume with something changed, tampered checkpoints and records, a second writer, bad
settings, non-finite inputs), and a table of bad inputs x public functions."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import gaussian_mixture_2d, tree_allclose
from test_train import CFG, KW

import scoreflow_eqx as sf
from scoreflow_eqx._checkpoint import _record_checksum, CheckpointMismatchError
from scoreflow_eqx._training.workdir import RunRecordError


ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    mix = gaussian_mixture_2d()
    draw = lambda key, n: np.asarray(
        jax.jit(jax.vmap(lambda k: mix.sample(key=k)))(jr.split(key, n))
    )
    return sf.data.from_arrays(draw(jr.key(1), 1024), draw(jr.key(2), 64), num_levels=None)


@pytest.fixture(scope="module")
def flow():
    return sf.make_flow(CFG, key=jr.key(0))


def _params(flow):
    return eqx.filter(flow, eqx.is_inexact_array)


# ---- 1. non-finite training ----------------------------------------------------------


# Finite gradients, but an update that overflows every parameter to +-inf: optax's
# `apply_if_finite` (which looks at the gradients only) would let it through.
EXPLODING = optax.chain(optax.scale(1e300), optax.scale(1e300))


def test_exploding_update_is_skipped_and_never_saved(flow, data, tmp_path):
    seen = []
    with pytest.raises(FloatingPointError, match=r"last 3 consecutive updates.*skipped"):
        sf.train(
            flow,
            data,
            key=jr.key(0),
            steps=50,
            optimizer=EXPLODING,
            max_consecutive_nonfinite=3,
            checkpoint_every=1,
            workdir=tmp_path,
            flow_config=CFG,
            callback=lambda step, state: seen.append(jax.tree.map(jnp.copy, _params(state.flow))),
            **(KW | {"log_every": 1}),
        )
    # Every update was skipped, as the message says: the parameters never moved.
    assert len(seen) == 3 and all(tree_allclose(p, _params(flow), rtol=0, atol=0) for p in seen)
    # The checkpoints written meanwhile hold the last good (finite) state; none is
    # written once the run is found diverged (after step 3).
    loaded, info = sf.load_flow(tmp_path, ema=False)
    assert info["step"] == 2
    assert tree_allclose(_params(loaded), _params(flow), rtol=0, atol=0)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_total"] for r in lines] == [1, 2, 3]


def test_short_diverged_run_is_not_reported_as_finished(flow, data):
    # Two steps, both skipped: fewer than `max_consecutive_nonfinite`, yet every update
    # of the run failed.
    with pytest.raises(FloatingPointError, match="diverged"):
        sf.train(flow, data, key=jr.key(0), steps=2, optimizer=EXPLODING, **KW)


def test_occasional_nonfinite_step_is_skipped_and_counted(data):
    # A net that returns NaN at the smallest times only: with importance sampling an
    # example draws t < 1.034e-5 with probability ~0.0014, a batch of 256 with ~0.3. The
    # run finishes, the skipped updates are counted, and the parameters stay finite.
    class Spiky(eqx.Module):
        inner: sf.nets.MLP

        def __call__(self, t, x):
            out = self.inner(t, x)
            return jnp.where(t < 1.034e-5, jnp.nan, out)

    flow = sf.ScoreFlow(sf.VPSDE(), Spiky(sf.nets.MLP((2,), 16, 1, key=jr.key(0))))
    res = sf.train(flow, data, key=jr.key(0), steps=6, **(KW | {"batch_size": 256}))
    assert res.step == 6 and 0 < res.nonfinite_total < 6
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(_params(res.flow)))


# ---- 2. resume and load integrity ----------------------------------------------------


def _train(flow, data, workdir, **kw):
    run = dict(key=jr.key(7), steps=4, checkpoint_every=2, flow_config=CFG, **KW)
    return sf.train(flow, data, workdir=workdir, **(run | kw))


def test_resume_refuses_every_kind_of_change(flow, data, tmp_path):
    _train(flow, data, tmp_path)
    shuffled = sf.data.from_arrays(data.train[::-1], data.test, num_levels=None)
    cases = {
        "data": dict(data=shuffled),
        "train.lr": dict(lr=1e-3),
        "train.batch_size": dict(batch_size=32),
        "train.weighting": dict(weighting="score_sde"),
        "train.ema_decay": dict(ema_decay=0.9),
        "seed": dict(key=jr.key(8)),
    }
    for what, change in cases.items():
        kw = dict(change)
        d = kw.pop("data", data)
        with pytest.raises(ValueError, match=f"(?s)what differs:.*{what}"):
            _train(flow, d, tmp_path, steps=6, **kw)
    # Another SDE with no flow_config: the recorded model description catches it.
    other = sf.ScoreFlow(sf.SubVPSDE(), flow.net)
    with pytest.raises(ValueError, match="(?s)what differs:.*SubVPSDE"):
        _train(other, data, tmp_path, flow_config=None)
    # The refused runs left the record of the run untouched.
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["train"]["lr"] == KW["lr"] and record["train"]["steps"] == 4
    # The schedule may change (more steps), and a named setting may change on purpose.
    more = _train(flow, data, tmp_path, steps=6)
    assert more.step == 6
    changed = _train(flow, data, tmp_path, steps=8, lr=1e-3, allow_changes=("lr",))
    assert changed.step == 8
    with pytest.raises(ValueError, match="allow_changes"):
        _train(flow, data, tmp_path, steps=10, allow_changes=("sde",))


def test_flow_config_must_describe_the_flow(flow, data):
    other = sf.flow_config((2,), sde="vp", net_kwargs={"width_size": 16, "depth": 2})
    with pytest.raises(ValueError, match="does not describe the flow"):
        sf.train(flow, data, key=jr.key(0), steps=1, flow_config=other, **KW)
    ve = sf.flow_config((2,), sde="ve", net_kwargs={"width_size": 32, "depth": 2})
    with pytest.raises(ValueError, match="VESDE"):
        sf.train(flow, data, key=jr.key(0), steps=1, flow_config=ve, **KW)


def test_load_flow_uses_the_checkpointed_record(flow, data, tmp_path):
    res = _train(flow, data, tmp_path)
    # An edited (or deleted) config.json does not matter: the record in the checkpoint
    # is what rebuilds the model.
    config = json.loads((tmp_path / "config.json").read_text())
    config["flow_config"]["sde"] = "ve"
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, info = sf.load_flow(tmp_path)
    assert isinstance(loaded.sde, sf.VPSDE) and info["config"]["flow_config"]["sde"] == "vp"
    assert tree_allclose(_params(loaded), _params(res.ema_flow), rtol=0, atol=0)
    os.remove(tmp_path / "config.json")
    assert sf.load_flow(tmp_path)[1]["step"] == 4
    # A `like` that is not the recorded model is refused.
    with pytest.raises(ValueError, match="not the model"):
        sf.load_flow(tmp_path, like=sf.ScoreFlow(sf.VESDE(), flow.net))


def _edit_record(step_dir: pathlib.Path, edit, *, checksum: bool = False) -> None:
    path = step_dir / "record" / "metadata"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    if checksum:  # write the matching checksum too
        sums_path = step_dir / "checksums" / "metadata"
        sums = json.loads(sums_path.read_text())
        sums["record"] = _record_checksum(record)
        sums_path.write_text(json.dumps(sums))


def test_tampered_or_incomplete_record_is_caught(flow, data, tmp_path):
    _train(flow, data, tmp_path)
    ckpts = tmp_path / "checkpoints"
    # An edited record fails its checksum: the previous checkpoint is used, with a warning.
    _edit_record(ckpts / "4", lambda r: r["flow_config"].update(sde="ve"))
    with pytest.warns(RuntimeWarning, match="step 4.*checksum.*falling back to step 2"):
        loaded, info = sf.load_flow(tmp_path)
    assert info["step"] == 2 and isinstance(loaded.sde, sf.VPSDE)
    # A record with a key missing but a matching checksum (as a buggy writer would leave
    # it): `make_flow` would fill the default (a time-conditioned net), so it is refused.
    _edit_record(ckpts / "2", lambda r: r["flow_config"].pop("conditioning"), checksum=True)
    # (Step 4 still fails its checksum: a warning, then step 2 is refused.)
    with pytest.raises(RunRecordError, match="does not rebuild the recorded model.*conditioning"):
        with pytest.warns(RuntimeWarning, match="step 4"):
            sf.load_flow(tmp_path)
    # A record without one of its parts is refused too.
    _edit_record(ckpts / "2", lambda r: r.pop("data"), checksum=True)
    with pytest.raises(RunRecordError, match=r"incomplete run record \(missing \['data'\]\)"):
        with pytest.warns(RuntimeWarning, match="step 4"):
            sf.load_flow(tmp_path)


# ---- 3. checkpoint integrity ---------------------------------------------------------


def _flip_byte(step_dir: pathlib.Path, item: str) -> None:
    files = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
    target = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    target.write_bytes(bytes(raw))


def test_bit_flip_in_array_data_falls_back_with_a_warning(flow, data, tmp_path):
    full = _train(flow, data, tmp_path)
    _flip_byte(tmp_path / "checkpoints" / "4", "ema_params")
    with pytest.warns(RuntimeWarning, match="step 4.*falling back to step 2"):
        _, info = sf.load_flow(tmp_path)
    assert info["step"] == 2
    # Resuming falls back too, and recomputes the lost steps exactly.
    with pytest.warns(RuntimeWarning, match="falling back to step 2"):
        again = _train(flow, data, tmp_path)
    assert again.step == 4
    assert tree_allclose(_params(again.ema_flow), _params(full.ema_flow), rtol=0, atol=0)


def test_wrong_checksum_is_detected(flow, data, tmp_path):
    _train(flow, data, tmp_path)
    path = tmp_path / "checkpoints" / "4" / "checksums" / "metadata"
    sums = json.loads(path.read_text())
    first = next(iter(sums["params"]))
    sums["params"][first] = "0" * 64
    path.write_text(json.dumps(sums))
    with pytest.warns(RuntimeWarning, match="fails its checksums"):
        _, info = sf.load_flow(tmp_path, ema=False)
    assert info["step"] == 2


# ---- 4. one writer per work directory ------------------------------------------------


_HOLDER = """
import sys, time
from scoreflow_eqx._training.workdir import WorkDir
workdir = WorkDir(sys.argv[1])
workdir.lock()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_writer_fails_at_once_and_a_dead_holder_frees_the_lock(flow, data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(sf.WorkDirLocked, match=f"in use by pid {holder.pid}"):
            _train(flow, data, tmp_path)
        assert time.perf_counter() - t0 < 30  # at once, not after training
        assert not (tmp_path / "checkpoints").exists() or not any(
            p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir()
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # The holder died without cleaning up: its lock is gone with it.
    assert _train(flow, data, tmp_path).step == 4


# ---- 5. validate before working ------------------------------------------------------


class _WrongShapeNet(eqx.Module):
    def __call__(self, t, x):
        return jnp.concatenate([x, x])


BAD_INPUTS = [
    # (name, call, exception, message fragment)
    ("grad_clip <= 0", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1, grad_clip=0.0),
     ValueError, "grad_clip"),
    ("lr < 0", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1, lr=-1e-3), ValueError, "lr"),
    ("lr nan", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1, lr=float("nan")),
     ValueError, "lr"),
    ("ema_decay 1", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1, ema_decay=1.0),
     ValueError, "ema_decay"),
    ("warmup < 0", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1, warmup_steps=-1),
     ValueError, "warmup_steps"),
    ("log_every 0", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1, log_every=0),
     ValueError, "log_every"),
    ("max_to_keep 0", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1, max_to_keep=0),
     ValueError, "max_to_keep"),
    ("optimizer lr", lambda f, d: sf.default_optimizer(lr=0.0), ValueError, "lr"),
    ("optimizer clip", lambda f, d: sf.default_optimizer(grad_clip=-1.0), ValueError, "grad_clip"),
    ("levels 1", lambda f, d: sf.data.Discretization(num_levels=1), ValueError, "num_levels"),
    ("range", lambda f, d: sf.data.Discretization(data_range=(1.0, -1.0)), ValueError,
     "data_range"),
    ("ode rtol", lambda f, d: sf.ode_nll(f, jnp.zeros(2), key=jr.key(0), rtol=-1.0),
     ValueError, "rtol"),
    ("ode max_steps", lambda f, d: sf.ode_nll(f, jnp.zeros(2), key=jr.key(0), max_steps=-3),
     ValueError, "max_steps"),
    ("method tol", lambda f, d: sf.ODELikelihood(stepsize_controller=dfx.PIDController(
        rtol=-1.0, atol=1e-5)), ValueError, "rtol"),
    ("bound num_t", lambda f, d: sf.nll_bound(f, jnp.zeros(2), key=jr.key(0), num_t=0),
     ValueError, "num_t"),
    ("bound method", lambda f, d: sf.BoundLikelihood(num_t=0), ValueError, "num_t"),
    ("sampler steps", lambda f, d: sf.PredictorCorrector(num_steps=0), ValueError, "num_steps"),
    ("decode atol", lambda f, d: sf.decode(f, jnp.zeros(2), atol=float("inf")), ValueError,
     "atol"),
    ("wrong net shape", lambda f, d: sf.ode_nll(
        sf.ScoreFlow(sf.VPSDE(), _WrongShapeNet()), jnp.zeros(2), key=jr.key(0)),
     ValueError, r"shape \(2,\) to an output of shape \(4,\)"),
    ("bpd repeats", lambda f, d: sf.evaluate_bpd(f, d.test, discretization=d.discretization,
     key=jr.key(0), num_repeats=0), ValueError, "num_repeats"),
    ("train steps 0", lambda f, d: sf.train(f, d, key=jr.key(0), steps=0), ValueError, "steps"),
    ("train batch 0", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1, batch_size=0),
     ValueError, "batch_size"),
    ("train steps_per_jit 0", lambda f, d: sf.train(f, d, key=jr.key(0), steps=1,
     steps_per_jit=0), ValueError, "steps_per_jit"),
    ("optimizer clip inf", lambda f, d: sf.default_optimizer(grad_clip=float("inf")),
     ValueError, "grad_clip"),
    ("optimizer warmup", lambda f, d: sf.default_optimizer(warmup_steps=-1), ValueError,
     "warmup_steps"),
    ("hutchinson probes", lambda f, d: sf.Hutchinson(num_probes=0), ValueError, "num_probes"),
    ("hutchinson probe", lambda f, d: sf.Hutchinson(probe="uniform"), ValueError,
     "valid probes"),
    ("exact mode", lambda f, d: sf.ExactTrace(mode="sideways"), ValueError, "valid modes"),
    ("exact chunk", lambda f, d: sf.ExactTrace(chunk_size=0), ValueError, "chunk_size"),
    ("divergence name", lambda f, d: sf.ode_nll(f, jnp.zeros(2), key=jr.key(0),
     divergence="bogus"), ValueError, "divergence estimator"),
    ("ode rtol nan", lambda f, d: sf.ode_nll(f, jnp.zeros(2), key=jr.key(0),
     rtol=float("nan")), ValueError, "rtol"),
    ("vp beta_min", lambda f, d: sf.VPSDE(beta_min=-1.0), ValueError, "beta_min"),
    ("vp beta order", lambda f, d: sf.VPSDE(beta_min=5.0, beta_max=1.0), ValueError,
     "beta_max > beta_min"),
    ("ve sigma_min", lambda f, d: sf.VESDE(sigma_min=0.0), ValueError, "sigma_min"),
    ("flow eps", lambda f, d: sf.ScoreFlow(f.sde, f.net, eps=1.0), ValueError, "eps"),
    ("flow parameterization", lambda f, d: sf.ScoreFlow(f.sde, f.net, parameterization="x"),
     ValueError, "parameterization"),
    ("importance eps", lambda f, d: sf.ImportanceSampler(sf.VPSDE(), eps=2.0), ValueError,
     "eps"),
    ("loss weighting", lambda f, d: f.loss(jnp.zeros(2), key=jr.key(0), weighting="bogus"),
     ValueError, "weighting"),
    ("sample method", lambda f, d: sf.sample(f, (2,), key=jr.key(0), method="bogus"),
     ValueError, "valid ones"),
    ("sampler max_steps", lambda f, d: sf.ProbabilityFlow(max_steps=0), ValueError,
     "max_steps"),
    ("sampler tolerance", lambda f, d: sf.ProbabilityFlow(stepsize_controller=dfx.PIDController(
        rtol=-1.0, atol=1e-5)), ValueError, "rtol"),
    ("langevin snr", lambda f, d: sf.LangevinCorrector(snr=-1.0), ValueError, "snr"),
    ("reverse sde steps", lambda f, d: sf.ReverseSDE(num_steps=0), ValueError, "num_steps"),
    ("bits_per_dim dim", lambda f, d: sf.bits_per_dim(jnp.ones(()), dim=0, num_levels=256,
     data_range=(-1.0, 1.0)), ValueError, "dim"),
    ("bits_per_dim levels", lambda f, d: sf.bits_per_dim(jnp.ones(()), dim=2, num_levels=1,
     data_range=(-1.0, 1.0)), ValueError, "num_levels"),
    ("arrays nan", lambda f, d: sf.data.from_arrays(np.full((4, 2), np.nan), np.zeros((2, 2)),
     num_levels=None), ValueError, "non-finite"),
    ("input shape", lambda f, d: sf.nll_bound(f, jnp.zeros(3), key=jr.key(0), num_t=4),
     ValueError, r"shape \(2,\).*shape \(3,\)"),
]  # fmt: skip


@pytest.mark.parametrize("name,call,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_fail_clearly(flow, data, name, call, error, match):
    with pytest.raises(error, match=match):
        call(flow, data)


def test_nonfinite_inputs_fail_at_once(flow):
    x = jnp.array([jnp.nan, 0.0])
    for fn in (
        lambda: sf.ode_nll(flow, x, key=jr.key(0)).nll,
        lambda: sf.decode(flow, x).x,
        lambda: sf.encode(flow, x).x,
        lambda: sf.inpaint(flow, x, jnp.array([True, False]), key=jr.key(0)).x,
    ):
        with pytest.raises(Exception, match="NaN or inf"):
            jax.block_until_ready(fn())
    res = sf.ode_nll(flow, x, key=jr.key(0), throw=False)
    assert res.result == dfx.RESULTS.nonfinite_input and bool(jnp.isnan(res.nll))
    bound = sf.nll_bound(flow, x, key=jr.key(0), num_t=4)
    assert bound.result == dfx.RESULTS.nonfinite_input and bool(jnp.isnan(bound.nll))


def test_data_files_errors_name_the_file_and_refuse_ambiguity(tmp_path):
    good = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    cases = {
        "both.npz": dict(train=good, x_train=good),
        "only_test.npz": dict(test=good),
        "two.npz": dict(a=good, b=good),
        "extra.npz": dict(train=good, test=good, labels=good),
    }
    for name, arrays in cases.items():
        path = tmp_path / name
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=str(path)):
            sf.data.load_dataset(str(path))
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not an array")
    with pytest.raises(ValueError, match=str(garbage)):
        sf.data.load_dataset(str(garbage))
    bad = good.copy()
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"nan\.npy.*non-finite"):
        sf.data.load_dataset(str(tmp_path / "nan.npy"))


# ---- checkpoints of the first layout (leaf lists) ------------------------------------


def _write_first_layout(workdir: pathlib.Path, flow, flow_config, step: int = 5) -> list:
    """A checkpoint as the package's first layout wrote it: every pytree a list of
    leaves, the run config as the JSON item `config`."""
    import orbax.checkpoint as ocp

    params = jax.tree.leaves(eqx.filter(flow, eqx.is_inexact_array))
    config = {
        "flow": flow_config,
        "dataset": {"name": "mixture", "data_shape": [2], "num_levels": None,
                    "data_range": [-1.0, 1.0]},
    }  # fmt: skip
    items = {
        "params": ocp.args.StandardSave(params),
        "ema_params": ocp.args.StandardSave([2 * p for p in params]),
        "opt_state": ocp.args.StandardSave([jnp.zeros((), jnp.float32)]),
        "meta": ocp.args.StandardSave({"step": jnp.asarray(step, jnp.int32)}),
        "config": ocp.args.JsonSave(config),
    }
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=options)
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    manager.close()
    return params


def test_first_layout_checkpoints_load_or_fail_clearly(flow, data, tmp_path):
    params = _write_first_layout(tmp_path, flow, CFG)
    loaded, info = sf.load_flow(tmp_path)
    assert info["step"] == 5 and info["data_shape"] == (2,) and info["dataset"] == "mixture"
    assert tree_allclose(jax.tree.leaves(_params(loaded)), [2 * p for p in params], rtol=0, atol=0)
    raw, _ = sf.load_flow(tmp_path, ema=False)
    assert bool(eqx.tree_equal(_params(raw), _params(flow), typematch=True))
    # Leaves written for another model (here a wider MLP) are refused, not loaded.
    wide_cfg = sf.flow_config((2,), sde="vp", net_kwargs={"width_size": 48, "depth": 2})
    other = tmp_path / "other"
    _write_first_layout(other, sf.make_flow(wide_cfg, key=jr.key(0)), CFG)
    with pytest.raises(CheckpointMismatchError, match="older-layout checkpoint at step 5"):
        sf.load_flow(other)
    # Training does not resume from it (its optimizer state has no paths), and says why.
    with pytest.raises(CheckpointMismatchError, match="older version.*cannot be resumed"):
        _train(flow, data, tmp_path)
