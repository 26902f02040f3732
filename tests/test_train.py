import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import gaussian_mixture_2d, tree_allclose

import scoreflow_eqx as sf


CFG = sf.flow_config((2,), sde="vp", net_kwargs={"width_size": 32, "depth": 2})
# One set of step settings for every run, so the compiled step is shared between tests.
KW = dict(
    batch_size=64,
    warmup_steps=5,
    lr=5e-3,
    ema_decay=0.95,
    log_every=3,
    show_progress=False,
)


@pytest.fixture(scope="module")
def mixture_data():
    mix = gaussian_mixture_2d()
    draw = lambda key, n: np.asarray(
        jax.jit(jax.vmap(lambda k: mix.sample(key=k)))(jr.split(key, n))
    )
    train, test = draw(jr.key(1), 4096), draw(jr.key(2), 1024)
    return sf.data.from_arrays(train, test, num_levels=None, name="mixture")


@pytest.fixture(scope="module")
def flow():
    return sf.make_flow(CFG, key=jr.key(0))


def test_sharded_steps_equal_single_device(flow, mixture_data):
    assert len(jax.devices()) == 4
    runs = [
        sf.train(flow, mixture_data, key=jr.key(3), steps=5, devices=devices, **KW)
        for devices in (None, jax.devices()[:1])
    ]
    sharded, single = runs
    assert sharded.step == single.step == 5
    batch_leaf = jax.tree.leaves(eqx.filter(sharded.flow, eqx.is_inexact_array))[0]
    assert len(batch_leaf.sharding.device_set) == 4  # replicated on all devices
    assert tree_allclose(
        eqx.filter(sharded.flow, eqx.is_inexact_array),
        eqx.filter(single.flow, eqx.is_inexact_array),
        rtol=1e-6,
        atol=1e-9,
    )
    assert tree_allclose(
        eqx.filter(sharded.ema_flow, eqx.is_inexact_array),
        eqx.filter(single.ema_flow, eqx.is_inexact_array),
        rtol=1e-6,
        atol=1e-9,
    )
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-6)
    # The parameters moved and the EMA lags behind them.
    p0 = eqx.filter(flow, eqx.is_inexact_array)
    assert not tree_allclose(p0, eqx.filter(sharded.flow, eqx.is_inexact_array))
    assert not tree_allclose(
        eqx.filter(sharded.ema_flow, eqx.is_inexact_array),
        eqx.filter(sharded.flow, eqx.is_inexact_array),
    )


def test_steps_per_jit_scan_matches(flow, mixture_data):
    a = sf.train(flow, mixture_data, key=jr.key(4), steps=4, **KW)
    b = sf.train(flow, mixture_data, key=jr.key(4), steps=4, steps_per_jit=2, **KW)
    assert b.step == 4
    assert tree_allclose(
        eqx.filter(a.ema_flow, eqx.is_inexact_array),
        eqx.filter(b.ema_flow, eqx.is_inexact_array),
        rtol=1e-6,
        atol=1e-9,
    )
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)


@eqx.filter_jit
def _heldout_objective(flow, x, key, num_t=64):
    """Likelihood-weighted DSM objective on held-out data, averaged over many t per
    example with common random numbers: the model-dependent part of the bound."""
    keys = jr.split(key, (x.shape[0], num_t))
    per = jax.vmap(jax.vmap(lambda xi, k: flow.loss(xi, key=k), in_axes=(None, 0)))(x, keys)
    per = per.mean(axis=1)
    return per.mean(), per.std() / np.sqrt(per.shape[0])


def test_training_lowers_heldout_bound(flow, mixture_data, tmp_path):
    res = sf.train(
        flow,
        mixture_data,
        key=jr.key(5),
        steps=400,
        workdir=tmp_path,
        flow_config=CFG,
        **(KW | {"log_every": 100}),
    )
    x = jnp.asarray(mixture_data.test[:256], jnp.zeros(()).dtype)
    exact = sf.ScoreFlow(
        flow.sde,
        sf.nets.GaussianMixtureScore(gaussian_mixture_2d(), flow.sde),
        parameterization="score",
    )
    key = jr.key(6)
    best, _ = _heldout_objective(exact, x, key)
    before, se_before = _heldout_objective(flow, x, key)
    after, se_after = _heldout_objective(res.ema_flow, x, key)
    assert after < before - 5 * (se_before + se_after)
    # Most of the gap to the exact score is closed.
    assert after - best < 0.5 * (before - best)
    # Logged metrics, config and a loadable flow.
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [100, 200, 300, 400]
    assert {"loss", "grad_norm", "lr", "steps_per_sec"} <= set(lines[0])
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert json.loads((tmp_path / "config.json").read_text())["flow_config"] == CFG
    loaded, info = sf.load_flow(tmp_path)
    assert info["step"] == 400 and info["data_shape"] == (2,)
    assert info["discretization"].num_levels is None and info["config"]["flow_config"] == CFG
    assert tree_allclose(
        eqx.filter(loaded, eqx.is_inexact_array),
        eqx.filter(res.ema_flow, eqx.is_inexact_array),
    )
    raw, _ = sf.load_flow(tmp_path, ema=False)
    assert tree_allclose(
        eqx.filter(raw, eqx.is_inexact_array),
        eqx.filter(res.flow, eqx.is_inexact_array),
    )


class _NaNNet(eqx.Module):
    w: jax.Array

    def __call__(self, t, x):
        return self.w * x * jnp.nan


def test_nonfinite_steps_skipped_then_stop(mixture_data):
    flow = sf.ScoreFlow(sf.VPSDE(beta_min=0.1, beta_max=20.0), _NaNNet(jnp.ones(())))
    with pytest.raises(FloatingPointError, match="last 3 consecutive updates"):
        sf.train(
            flow,
            mixture_data,
            key=jr.key(0),
            steps=50,
            max_consecutive_nonfinite=3,
            **KW,
        )
    # Each bad update was skipped: the parameters are unchanged.
    calls = []
    with pytest.raises(FloatingPointError):
        sf.train(
            flow,
            mixture_data,
            key=jr.key(0),
            steps=50,
            max_consecutive_nonfinite=3,
            callback=lambda step, state: calls.append(float(state.flow.net.w)),
            **KW,
        )
    assert all(w == 1.0 for w in calls) and len(calls) == 3


def test_bad_input_fails_early(flow, mixture_data, tmp_path):
    bad = np.asarray(mixture_data.train[:64]).copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        sf.train(flow, bad, key=jr.key(0), steps=1, **KW)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        sf.train(flow, bad, key=jr.key(0), steps=1, **KW)
    digits = sf.data.load_dataset("digits")
    with pytest.raises(ValueError, match=r"expects one example of shape \(2,\).*\(1, 8, 8\)"):
        sf.train(flow, digits, key=jr.key(0), steps=1, **KW)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        sf.train(flow, mixture_data, key=jr.key(0), steps=1, workdir=blocker / "run", **KW)
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            sf.train(flow, mixture_data, key=jr.key(0), steps=1, workdir=ro, **KW)
    with pytest.raises(ValueError, match=r"valid SDEs are \['subvp', 've', 'vp'\]"):
        sf.flow_config((2,), sde="vpp")
    with pytest.raises(ValueError, match=r"valid SDEs are"):
        sf.make_sde("cld")
    with pytest.raises(ValueError, match=r"valid nets are \['mlp', 'unet'\]"):
        sf.flow_config((2,), net="resnet")
    with pytest.raises(ValueError, match="valid weightings"):
        sf.train(
            flow,
            mixture_data,
            key=jr.key(0),
            steps=1,
            weighting="ml",
            **{k: v for k, v in KW.items()},
        )
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        sf.train(flow, mixture_data, key=jr.key(0), steps=1, **(KW | {"batch_size": 30}))
    with pytest.raises(ValueError, match="needs a test split"):
        sf.train(flow, mixture_data.train, key=jr.key(0), steps=1, eval_every=1, **KW)
    with pytest.raises(ValueError, match="`steps` must be a positive integer"):
        sf.train(flow, mixture_data, key=jr.key(0), steps=0, **KW)


def test_loss_variance_diagnostic(mixture_data):
    # With the exact score the objective is the mixture's own; importance sampling
    # must keep the mean and cut the variance by orders of magnitude (VP).
    sde = sf.VPSDE(beta_min=0.1, beta_max=20.0)
    exact = sf.ScoreFlow(
        sde,
        sf.nets.GaussianMixtureScore(gaussian_mixture_2d(), sde),
        parameterization="score",
    )
    stream = iter(sf.data.make_pipeline(mixture_data, batch_size=512, seed=0))
    res = sf.loss_variance(exact, stream, key=jr.key(0), num_batches=8)
    assert res.num_samples == 4096
    assert res.variance_ratio > 20
    se = np.sqrt(res.var_uniform / res.num_samples + res.var_importance / res.num_samples)
    assert abs(res.mean_uniform - res.mean_importance) < 4 * se
    with pytest.raises(ValueError, match="empty"):
        sf.loss_variance(exact, [], key=jr.key(0))


def test_periodic_evaluation(flow, mixture_data, tmp_path):
    small = sf.data.from_arrays(
        mixture_data.train, mixture_data.test[:16], num_levels=None, name="small"
    )
    key = jr.key(8)
    res = sf.train(
        flow,
        small,
        key=key,
        steps=6,
        eval_every=3,
        eval_ode_every=6,
        eval_batch_size=16,
        workdir=tmp_path,
        **KW,
    )
    assert [e["step"] for e in res.evaluations] == [3, 6]
    assert "test_bpd_ode" in res.evaluations[1] and "test_bpd_ode" not in res.evaluations[0]
    for e in res.evaluations:
        assert np.isfinite(e["test_bpd_bound"]) and e["num_failed_bound"] == 0
    assert np.isfinite(res.evaluations[1]["test_bpd_ode"])
    # The logged numbers are those of `sf.evaluate_bpd` on the EMA flow.
    eval_key = jr.fold_in(jr.split(key, 3)[2], 6)
    direct = sf.evaluate_bpd(
        res.ema_flow,
        small.test,
        discretization=small.discretization,
        key=eval_key,
        method="bound",
        batch_size=16,
        show_progress=False,
    )
    np.testing.assert_allclose(direct.bpd, res.evaluations[1]["test_bpd_bound"], rtol=1e-6)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum('"eval"' in line for line in lines) == 2


def test_state_step_jit_static_leaves_cache_and_donation():
    from scoreflow_eqx._dispatch import StateStepJit

    traces = []

    def fn(batch, state):
        traces.append(1)
        x, scale, f = state
        return (f(x) * scale + batch, scale, f), jnp.sum(x)

    step = StateStepJit(fn, max_in_flight=1)
    x = jnp.arange(3.0)
    (y, scale, f), total = step(jnp.ones(3), (x, 2.0, jnp.cos))  # float, function: static
    np.testing.assert_allclose(y, 2 * np.cos(np.arange(3.0)) + 1)
    assert scale == 2.0 and f is jnp.cos and float(total) == 3.0
    assert x.is_deleted()  # the state's arrays are donated
    (y, _, _), _ = step(jnp.ones(3), (y, 2.0, jnp.cos))
    assert len(traces) == 1  # same structure and static leaves: compiled once
    step(jnp.ones(3), (y, 3.0, jnp.cos))
    assert len(traces) == 2  # a new static value compiles anew
    with pytest.raises(ValueError, match="structure"):
        StateStepJit(lambda b, s: ((s, s), None))(None, jnp.ones(2))
