import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import tree_allclose

import scoreflow_eqx as sf
import scoreflow_eqx.nets._layers as layers
from scoreflow_eqx.nets._layers import Conv2dNHWC, GroupNormLast


# Tiny configurations: enough structure (two or three levels, attention, a width change)
# to exercise every code path, small enough to compile in a few seconds.
TINY_8 = dict(
    data_shape=(1, 8, 8),
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    groups=2,
)
TINY_28 = dict(
    data_shape=(2, 28, 28),
    base_channels=4,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(7,),
    groups=2,
)


def _num_params(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def _make(*, seed=0, **kwargs):
    """A UNet with numpy-random parameters. The real initialiser is traced (so its
    shapes are checked) but not run: XLA needs ~1 min of CPU to compile a U-Net's random
    initialisation, jitted or op by op, while its forward pass compiles in seconds."""
    abstract = eqx.filter_eval_shape(lambda k: sf.nets.UNet(**kwargs, key=k), jr.key(seed))
    return _host_params(abstract, seed)


def _host_params(abstract, seed=0):
    """Fill an abstract module with parameters drawn on the host at the initialiser's
    scales (uniform +-1/sqrt(fan_in); norm scales near 1, biases near 0)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        name = jax.tree_util.keystr(path[-1:])
        u = rng.uniform(-1.0, 1.0, leaf.shape)
        if leaf.ndim == 1 and name == ".weight":  # norm scales
            value = 1.0 + 0.1 * u
        elif leaf.ndim == 1:  # biases
            value = 0.1 * u
        else:  # Linear (out, in) or HWIO kernels
            fan_in = leaf.shape[1] if leaf.ndim == 2 else math.prod(leaf.shape[:-1])
            value = u / math.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def unet8():
    return _make(**TINY_8)


@pytest.fixture(scope="module")
def apply():
    return eqx.filter_jit(lambda net, t, x: net(t, x))


@pytest.fixture(scope="module")
def batched_apply():
    return eqx.filter_jit(lambda net, t, x: jax.vmap(lambda t, x: net(t, x))(t, x))


# ---------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "hw, kernel, stride",
    [
        ((7, 5), 3, 1),
        ((7, 5), 3, 2),  # odd sizes, strided: 7 -> 4, 5 -> 3
        ((2, 2), 3, 1),  # tiny output
        ((4, 3), 3, 2),  # strided onto 2x2
        ((6, 6), 1, 1),  # 1x1 (skip connections)
    ],
)
@pytest.mark.parametrize("max_pixels", [0, layers._MATMUL_MAX_PIXELS])
def test_conv_nhwc_matches_equinox_nchw(hw, kernel, stride, max_pixels, monkeypatch):
    # Both implementations: the default patch matmul and lax's NHWC convolution.
    monkeypatch.setattr(layers, "_MATMUL_MAX_PIXELS", max_pixels)
    cin, cout = 3, 4
    conv = _host_params(
        eqx.filter_eval_shape(
            lambda k: Conv2dNHWC(cin, cout, kernel, stride=stride, key=k), jr.key(0)
        )
    )
    ref = eqx.filter_eval_shape(
        lambda k: eqx.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, key=k),
        jr.key(0),
    )
    ref = eqx.tree_at(
        lambda c: (c.weight, c.bias),
        ref,
        (jnp.transpose(conv.weight, (3, 2, 0, 1)), conv.bias[:, None, None]),
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(cin, *hw)))

    @eqx.filter_jit
    def run(conv, ref, x):
        return conv(jnp.transpose(x, (1, 2, 0))), jnp.transpose(ref(x), (1, 2, 0))

    out, expected = run(conv, ref, x)
    assert out.shape == expected.shape
    assert tree_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_conv_nhwc_init_like_equinox():
    conv = eqx.filter_jit(lambda k: Conv2dNHWC(16, 32, 3, key=k))(jr.key(0))
    lim = 1 / math.sqrt(16 * 9)
    assert conv.weight.shape == (3, 3, 16, 32)
    assert float(jnp.max(jnp.abs(conv.weight))) <= lim
    # Uniform(-lim, lim) has standard deviation lim / sqrt(3).
    assert abs(float(jnp.std(conv.weight)) - lim / math.sqrt(3)) < 0.05 * lim


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_groupnorm_last_matches_equinox(groups):
    @eqx.filter_jit
    def run(x):
        norm = GroupNormLast(groups, 6)
        norm = eqx.tree_at(
            lambda n: (n.weight, n.bias),
            norm,
            (jnp.linspace(0.5, 2.0, 6), jnp.linspace(-1.0, 1.0, 6)),
        )
        ref = eqx.nn.GroupNorm(groups, 6)
        ref = eqx.tree_at(lambda n: (n.weight, n.bias), ref, (norm.weight, norm.bias))
        return norm(jnp.transpose(x, (1, 2, 0))), jnp.transpose(ref(x), (1, 2, 0))

    out, expected = run(3.0 + 2.0 * jr.normal(jr.key(0), (6, 5, 3)))
    assert tree_allclose(out, expected, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="must divide"):
        GroupNormLast(4, 6)


# ------------------------------------------------------------------------------- MLP


def test_mlp_jit_vmap_grad():
    net = sf.nets.MLP((2,), 16, 2, key=jr.key(0))
    x = jr.normal(jr.key(1), (5, 2))
    t = jnp.linspace(0.1, 0.9, 5)

    @eqx.filter_jit
    def run(net, t, x):
        def f(net):
            out = jax.vmap(lambda t, x: net(t, x))(t, x)
            return jnp.sum(out**2), out

        (_, out), grads = eqx.filter_value_and_grad(f, has_aux=True)(net)
        return out, net(t[2], x[2]), grads

    out, single, grads = run(net, t, x)
    assert out.shape == (5, 2)
    assert tree_allclose(out[2], single, rtol=1e-6, atol=1e-8)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        net(0.5, jnp.zeros(3))
    with pytest.raises(ValueError, match="vmap"):
        net(0.5, jnp.zeros((4, 2)))


# ------------------------------------------------------------------------------ UNet


def test_unet_jit_vmap(unet8, apply, batched_apply):
    # Gradients: see test_scoreflow_unet_loss_jit_grad_vmap (one compilation for both).
    x = jr.normal(jr.key(1), (3, 1, 8, 8))
    t = jnp.array([0.01, 0.5, 1.0])
    out = batched_apply(unet8, t, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert tree_allclose(out[1], apply(unet8, t[1], x[1]), rtol=1e-6, atol=1e-9)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_unet_28x28_float32(apply):
    # 28 -> 14 -> 7 and back; float32 input gives float32 output (params float64 here).
    net = _make(**TINY_28)
    x = jr.normal(jr.key(1), (2, 28, 28), dtype=jnp.float32)
    out = apply(net, jnp.float32(0.3), x)
    assert out.shape == (2, 28, 28) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0


@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
def test_unet_time_conditioning(embedding, batched_apply):
    net = _make(**{**TINY_8, "embedding": embedding}, seed=3)
    x = jnp.broadcast_to(jr.normal(jr.key(4), (1, 8, 8)), (3, 1, 8, 8))
    out = batched_apply(net, jnp.array([0.05, 0.5, 0.95]), x)
    scale = float(jnp.std(out))
    assert scale > 0
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert float(jnp.max(jnp.abs(out[i] - out[j]))) > 1e-3 * scale


def test_unet_bad_shapes(unet8):
    with pytest.raises(ValueError, match=r"\(1, 8, 8\).*\(1, 8, 7\)"):
        unet8(0.5, jnp.zeros((1, 8, 7)))
    with pytest.raises(ValueError, match=r"\(1, 8, 8\).*\(64,\)"):
        unet8(0.5, jnp.zeros(64))
    with pytest.raises(ValueError, match="vmap"):
        unet8(0.5, jnp.zeros((4, 1, 8, 8)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data_shape=(8, 8)), r"\(C, H, W\)"),
        (dict(attention_resolutions=(3,)), r"valid ones .*\[8, 4\]"),
        (dict(groups=3), "divisor"),
        (dict(embedding="gaussian"), "sinusoidal"),
        (dict(layout="NCHW"), "channels_last"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(base_channels=7), "even"),
    ],
)
def test_unet_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eqx.filter_eval_shape(lambda k: sf.nets.UNet(**{**TINY_8, **kwargs}, key=k), jr.key(0))


def _to_channels_first(net_cl, net_cf):
    """Copy the parameters of a channel-last UNet into a channel-first one."""
    layer = (Conv2dNHWC, GroupNormLast, eqx.nn.Conv2d, eqx.nn.GroupNorm)
    is_layer = lambda x: isinstance(x, layer)  # noqa: E731
    cl_leaves = jax.tree.leaves(net_cl, is_leaf=is_layer)
    cf_leaves, treedef = jax.tree.flatten(net_cf, is_leaf=is_layer)
    assert len(cl_leaves) == len(cf_leaves)
    new = []
    for a, b in zip(cl_leaves, cf_leaves):
        if isinstance(a, Conv2dNHWC):
            assert isinstance(b, eqx.nn.Conv2d)
            w = jnp.transpose(a.weight, (3, 2, 0, 1))
            b = eqx.tree_at(lambda c: (c.weight, c.bias), b, (w, a.bias[:, None, None]))
        elif isinstance(a, GroupNormLast):
            assert isinstance(b, eqx.nn.GroupNorm) and b.groups == a.groups
            b = eqx.tree_at(lambda n: (n.weight, n.bias), b, (a.weight, a.bias))
        else:
            assert a.shape == b.shape
            b = a
        new.append(b)
    return jax.tree.unflatten(treedef, new)


def test_unet_layouts_agree(unet8, apply):
    # The channel-first variant used by benchmarks/net_in_loop.py is the same function.
    cf = eqx.filter_eval_shape(
        lambda k: sf.nets.UNet(**TINY_8, layout="channels_first", key=k), jr.key(0)
    )
    assert _num_params(cf) == _num_params(unet8)
    cf = _to_channels_first(unet8, cf)
    x = jr.normal(jr.key(6), (1, 8, 8))
    assert tree_allclose(apply(cf, 0.4, x), apply(unet8, 0.4, x), rtol=1e-8, atol=1e-10)


def test_presets():
    digits = eqx.filter_eval_shape(sf.nets.unet_preset, "digits", key=jr.key(0))
    assert 0.7e6 <= _num_params(digits) <= 1.2e6
    assert digits.data_shape == (1, 8, 8)
    mnist = eqx.filter_eval_shape(sf.nets.unet_preset, "mnist", key=jr.key(0))
    assert 1e6 <= _num_params(mnist) <= 3e6
    out = eqx.filter_eval_shape(lambda n, x: n(0.5, x), mnist, jnp.zeros((1, 28, 28)))
    assert out.shape == (1, 28, 28)
    fourier = eqx.filter_eval_shape(
        lambda k: sf.nets.unet_preset("digits", embedding="fourier", key=k), jr.key(0)
    )
    assert isinstance(fourier.embedding, sf.nets.FourierEmbedding)
    with pytest.raises(ValueError, match="digits"):
        sf.nets.unet_preset("cifar", key=jr.key(0))


# ------------------------------------------------------------------------- ScoreFlow


def test_scoreflow_unet_noise_parameterization(unet8, batched_apply):
    sde = sf.VPSDE(beta_min=0.1, beta_max=20.0)
    flow = sf.ScoreFlow(sde, unet8)
    x = jnp.broadcast_to(jr.normal(jr.key(7), (1, 8, 8)), (3, 1, 8, 8))
    t = jnp.array([1e-3, 0.3, 1.0])

    @eqx.filter_jit
    def scores(flow, t, x):
        sigma = jax.vmap(lambda t: flow.sde.marginal(t)[1])(t)
        return jax.vmap(flow.score)(t, x), jax.vmap(flow.scaled_score)(t, x), sigma

    score, scaled, sigma = scores(flow, t, x)
    c = jax.vmap(lambda t: unet8.conditioning(sde, t))(t)  # what the flow gives the net
    out = batched_apply(unet8, c, x)
    assert tree_allclose(score, -out / sigma[:, None, None, None], rtol=1e-10)
    assert tree_allclose(scaled, -out, rtol=1e-12)


def test_scoreflow_unet_loss_jit_grad_vmap(unet8):
    flow = sf.ScoreFlow(sf.VPSDE(beta_min=0.1, beta_max=20.0), unet8)
    x0 = jr.uniform(jr.key(8), (4, 1, 8, 8), minval=-1.0, maxval=1.0)

    @eqx.filter_jit
    def loss_and_grads(flow, x0, key):
        def batch_loss(flow):
            keys = jr.split(key, x0.shape[0])
            return jnp.mean(jax.vmap(lambda x, k: flow.loss(x, key=k))(x0, keys))

        def score_norm(x):
            t = jnp.full(x.shape[0], 0.5)
            return jnp.sum(jax.vmap(flow.score)(t, x) ** 2)

        loss, grads = eqx.filter_value_and_grad(batch_loss)(flow)
        return loss, grads, jax.grad(score_norm)(x0)

    loss, grads, gx = loss_and_grads(flow, x0, jr.key(9))
    assert loss.shape == () and np.isfinite(float(loss)) and float(loss) > 0
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # Every parameter of the net gets a gradient: nothing is disconnected.
    net_leaves = jax.tree.leaves(eqx.filter(grads.net, eqx.is_inexact_array))
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in net_leaves)
    # Input gradients too (likelihoods differentiate the score in x), per example.
    assert gx.shape == x0.shape
    assert float(jnp.min(jnp.max(jnp.abs(gx), axis=(1, 2, 3)))) > 0
