"""What the score network is conditioned on: the time or the log-SNR."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import tree_allclose
from registry import SDES

import scoreflow_eqx as sf


def _closed_form_log_sigma_over_alpha(name, t):
    """`log(sigma_t / alpha_t)` from DESIGN.md's table, in numpy float64."""
    t = np.asarray(t, np.float64)
    if name == "ve":
        return np.log(0.01 * (50.0 / 0.01) ** t)
    b = 0.1 * t + (20.0 - 0.1) * t**2 / 2
    alpha = np.exp(-b / 2)
    sigma = np.sqrt(1 - np.exp(-b)) if name == "vp" else 1 - np.exp(-b)
    return np.log(sigma / alpha)


@pytest.mark.parametrize("name", sorted(SDES))
def test_log_snr_conditioning_is_log_sigma_over_alpha(name):
    sde = SDES[name]
    t = jnp.array([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0])
    c = jax.vmap(lambda s: sf.LogSNRConditioning()(sde, s))(t)
    np.testing.assert_allclose(c, _closed_form_log_sigma_over_alpha(name, t), rtol=1e-10)
    # `scale` multiplies log SNR = -2 log(sigma / alpha).
    c2 = jax.vmap(lambda s: sf.LogSNRConditioning(scale=1.0)(sde, s))(t)
    np.testing.assert_allclose(c2, -2 * c, rtol=1e-12)
    assert float(sf.TimeConditioning(scale=3.0)(sde, 0.25)) == 0.75


def test_log_snr_conditioning_float32_small_t():
    # expm1 keeps log(sigma/alpha) accurate at the default eps in float32.
    c = sf.LogSNRConditioning()(sf.VPSDE(), jnp.float32(1e-5))
    assert c.dtype == jnp.float32
    np.testing.assert_allclose(c, _closed_form_log_sigma_over_alpha("vp", 1e-5), rtol=1e-5)


def test_flow_applies_the_nets_conditioning():
    sde = sf.VPSDE()
    seen = []

    def spy(c, x):
        seen.append(c)
        return x

    # A plain callable receives the time itself.
    flow = sf.ScoreFlow(sde, spy)
    assert flow.conditioning == sf.TimeConditioning()
    flow.score(0.5, jnp.ones(2))
    assert float(seen[-1]) == 0.5
    # ... or what the flow is told to give it.
    flow = sf.ScoreFlow(sde, spy, conditioning=sf.LogSNRConditioning())
    flow.score(0.5, jnp.ones(2))
    np.testing.assert_allclose(seen[-1], _closed_form_log_sigma_over_alpha("vp", 0.5))
    # The library's nets declare theirs: the log-SNR by default.
    net = sf.nets.MLP((2,), width_size=8, depth=1, key=jr.key(0))
    assert sf.ScoreFlow(sde, net).conditioning == sf.LogSNRConditioning()


def test_conflicting_conditioning_is_refused():
    net = sf.nets.MLP((2,), width_size=8, depth=1, key=jr.key(0))
    with pytest.raises(ValueError, match="differs from the one the net"):
        sf.ScoreFlow(sf.VPSDE(), net, conditioning=sf.TimeConditioning())
    with pytest.raises(TypeError, match="AbstractConditioning"):
        sf.ScoreFlow(sf.VPSDE(), lambda t, x: x, conditioning="log_snr")  # pyright: ignore
    with pytest.raises(ValueError, match="scale"):
        sf.LogSNRConditioning(scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        sf.TimeConditioning(scale=-1.0)
    with pytest.raises(ValueError, match="Unknown conditioning"):
        sf.flow_config((2,), conditioning="sigma")


def test_embedding_module_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"needs shape \(32,\)"):
        sf.nets.MLP((2,), embedding=sf.nets.SinusoidalEmbedding(16), key=jr.key(0))


def _legacy_config():
    # A config written before the "conditioning" key existed.
    config = sf.flow_config(
        (1, 8, 8),
        net="unet",
        net_kwargs={"base_channels": 8, "channel_mults": [1], "num_res_blocks": 1},
    )
    del config["conditioning"]
    return config


def test_configs_without_conditioning_build_the_time_conditioned_nets():
    # The nets of that time embedded `1000 t`; the legacy config rebuilds exactly them.
    legacy = sf.make_flow(_legacy_config(), key=jr.key(0))
    assert legacy.conditioning == sf.TimeConditioning(scale=1000.0)
    old_net = sf.nets.UNet(
        (1, 8, 8),
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        embedding=sf.nets.SinusoidalEmbedding(8, scale=1000.0),
        conditioning=sf.TimeConditioning(),
        key=jr.key(0),
    )
    old = sf.ScoreFlow(sf.VPSDE(), old_net)
    x = jr.normal(jr.key(1), (1, 8, 8))
    for t in (1e-5, 0.2, 0.9):
        np.testing.assert_allclose(legacy.score(t, x), old.score(t, x), rtol=1e-12, atol=0)


def test_a_run_saved_without_conditioning_loads_and_evaluates(tmp_path):
    config = _legacy_config()
    flow = sf.make_flow(config, key=jr.key(0))
    levels = jr.randint(jr.key(1), (16, 1, 8, 8), 0, 17)
    data = sf.data.from_arrays(np.asarray(levels), num_levels=17, name="old")
    sf.train(
        flow, data, key=jr.key(2), steps=2, batch_size=4, warmup_steps=1,
        workdir=str(tmp_path), flow_config=config, show_progress=False,
    )  # fmt: skip
    loaded, _ = sf.load_flow(tmp_path)
    assert loaded.conditioning == sf.TimeConditioning(scale=1000.0)
    res = sf.ode_nll(
        loaded, jnp.zeros((1, 8, 8)), key=jr.key(3),
        stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3),
    )  # fmt: skip
    assert jnp.isfinite(res.nll)


def test_load_flow_keeps_the_saved_float_dtype(tmp_path):
    # The suite runs with jax_enable_x64, whose templates are float64: a run trained in
    # float32 still loads, as float32 (it was refused as "written for another model").
    config = sf.flow_config((2,), net="mlp", net_kwargs={"width_size": 8, "depth": 1})
    with jax.enable_x64(False):
        flow = sf.make_flow(config, key=jr.key(0))
        data = sf.data.from_arrays(
            np.asarray(jr.normal(jr.key(1), (32, 2))), num_levels=None, name="f32"
        )
        res = sf.train(
            flow, data, key=jr.key(2), steps=2, batch_size=8, warmup_steps=1,
            workdir=str(tmp_path), flow_config=config, show_progress=False,
        )  # fmt: skip
    loaded, _ = sf.load_flow(tmp_path)
    assert loaded.net.out.weight.dtype == jnp.float32
    assert tree_allclose(loaded, res.ema_flow, rtol=0, atol=0)
