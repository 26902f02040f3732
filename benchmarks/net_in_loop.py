"""Forward+VJP time of the U-Net score network, plain and inside `lax.fori_loop` /
`lax.scan`, for the channel-last layout the library uses and for the same network built
from equinox's channel-first `eqx.nn.Conv2d` / `eqx.nn.GroupNorm`.

Why: every diffrax solve is a while loop, and XLA:CPU runs channel-first convolutions
much slower inside loops (jax-ml/jax#12868). Also times one training step (likelihood-
weighted DSM loss, gradient, Adam) of the channel-last net.

    python benchmarks/net_in_loop.py            # digits preset, batch 64, writes README
    python benchmarks/net_in_loop.py --quick    # tiny smoke test, prints only
"""

import argparse
import math
import os
import pathlib
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import scoreflow_eqx as sf
import scoreflow_eqx.nets._layers as layers
from scoreflow_eqx.nets._layers import Conv2dNHWC, GroupNormLast
from scoreflow_eqx.nets._unet import UNET_PRESETS


HEADING = "## Score network inside solver loops"
README = pathlib.Path(__file__).parent / "README.md"


def host_params(abstract, seed=0):
    """Fill an abstract module with numpy-random parameters of the initialiser's scale.
    (Timings do not depend on the values; this skips compiling the random init.)"""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        u = rng.uniform(-1.0, 1.0, leaf.shape)
        if leaf.ndim == 1:
            value = (1.0 if jax.tree_util.keystr(path[-1:]) == ".weight" else 0.0) + u / 10
        else:
            fan_in = leaf.shape[1] if leaf.ndim == 2 else math.prod(leaf.shape[:-1])
            value = u / math.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def to_channels_first(net_cl, abstract_cf):
    """The channel-first network computing the same function as `net_cl`."""
    layer = (Conv2dNHWC, GroupNormLast, eqx.nn.Conv2d, eqx.nn.GroupNorm)
    is_layer = lambda x: isinstance(x, layer)  # noqa: E731
    cl_leaves = jax.tree.leaves(net_cl, is_leaf=is_layer)
    cf_leaves, treedef = jax.tree.flatten(abstract_cf, is_leaf=is_layer)
    new = []
    for a, b in zip(cl_leaves, cf_leaves, strict=True):
        if isinstance(a, Conv2dNHWC):
            w, bias = jnp.transpose(a.weight, (3, 2, 0, 1)), a.bias[:, None, None]
            b = eqx.tree_at(lambda c: (c.weight, c.bias), b, (w, bias))
        elif isinstance(a, GroupNormLast):
            b = eqx.tree_at(lambda n: (n.weight, n.bias), b, (a.weight, a.bias))
        else:
            b = a
        new.append(b)
    return jax.tree.unflatten(treedef, new)


def build(config, layout, net_cl=None):
    abstract = eqx.filter_eval_shape(
        lambda k: sf.nets.UNet(**config, layout=layout, key=k), jr.key(0)
    )
    if layout == "channels_last":
        return host_params(abstract)
    return to_channels_first(net_cl, abstract)


def median_ms(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def fwd_vjp(net, t, x):
    """One forward pass and one VJP (w.r.t. the input) of the batched network."""
    out, vjp_fn = jax.vjp(lambda x: jax.vmap(lambda t, x: net(t, x))(t, x), x)
    (gx,) = vjp_fn(out)
    return gx


def time_layout(net, batch, iters, repeats):
    shape = net.data_shape
    x = jr.normal(jr.key(1), (batch, *shape), dtype=jnp.float32)
    t = jnp.linspace(0.01, 1.0, batch, dtype=jnp.float32)

    plain = eqx.filter_jit(lambda net, t, x: fwd_vjp(net, t, x))  # fresh trace

    @eqx.filter_jit
    def in_fori(net, t, x):
        body = lambda i, x: x + 1e-3 * fwd_vjp(net, t, x)  # noqa: E731
        return jax.lax.fori_loop(0, iters, body, x)

    @eqx.filter_jit
    def in_scan(net, t, x):
        def body(x, _):
            return x + 1e-3 * fwd_vjp(net, t, x), None

        return jax.lax.scan(body, x, length=iters)[0]

    return (
        median_ms(plain, net, t, x, repeats=repeats),
        median_ms(in_fori, net, t, x, repeats=repeats) / iters,
        median_ms(in_scan, net, t, x, repeats=repeats) / iters,
    )


def time_train_step(net, batch, repeats):
    flow = sf.ScoreFlow(sf.VPSDE(beta_min=0.1, beta_max=20.0), net)
    optim = optax.adam(2e-4)
    opt_state = optim.init(eqx.filter(flow, eqx.is_inexact_array))
    x = jr.uniform(jr.key(2), (batch, *net.data_shape), minval=-1.0, maxval=1.0)

    @eqx.filter_jit
    def step(flow, opt_state, x, key):
        def loss_fn(flow):
            keys = jr.split(key, x.shape[0])
            return jnp.mean(jax.vmap(lambda x, k: flow.loss(x, key=k))(x, keys))

        loss, grads = eqx.filter_value_and_grad(loss_fn)(flow)
        params = eqx.filter(flow, eqx.is_inexact_array)
        updates, opt_state = optim.update(grads, opt_state, params)
        return eqx.apply_updates(flow, updates), opt_state, loss

    return median_ms(step, flow, opt_state, x, jr.key(3), repeats=repeats)


def write_readme(section):
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if HEADING in text:
        start = text.index(HEADING)
        nxt = text.find("\n## ", start + len(HEADING))
        end = len(text) if nxt == -1 else nxt + 1
        text = text[:start] + section + ("\n" + text[end:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--preset", default="digits", choices=sorted(UNET_PRESETS))
    parser.add_argument("--batch", type=int, default=64, help="forward+VJP batch")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10, help="loop iterations")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats")
    parser.add_argument("--quick", action="store_true", help="tiny net and batch; smoke test only")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {README.name}")
    args = parser.parse_args()

    config = dict(UNET_PRESETS[args.preset])
    if args.quick:
        config.update(base_channels=8, channel_mults=(1, 2), num_res_blocks=1)
        config.update(attention_resolutions=(config["data_shape"][1] // 2,))
        args.batch, args.train_batch, args.iters, args.repeats = 4, 8, 2, 2

    net_cl = build(config, "channels_last")
    net_cf = build(config, "channels_first", net_cl)
    num_params = sum(a.size for a in jax.tree.leaves(eqx.filter(net_cl, eqx.is_array)))
    rows = {}
    default = layers._MATMUL_MAX_PIXELS
    variants = [
        ("channel-last, patch matmul (ours)", net_cl, default),
        ("channel-last, `lax.conv` NHWC", net_cl, 0),
        ("channel-first, `eqx.nn.Conv2d`", net_cf, default),
    ]
    for name, net, max_pixels in variants:
        layers._MATMUL_MAX_PIXELS = max_pixels  # read when tracing
        rows[name] = time_layout(net, args.batch, args.iters, args.repeats)
        print(name, [f"{v:.1f} ms" for v in rows[name]], flush=True)
    layers._MATMUL_MAX_PIXELS = default
    train_ms = time_train_step(net_cl, args.train_batch, args.repeats)
    print(f"train step: {train_ms:.0f} ms", flush=True)

    c, h, w = config["data_shape"]
    lines = [
        HEADING,
        "",
        f"`python benchmarks/net_in_loop.py{' --quick' if args.quick else ''}`: "
        f"U-Net preset `{args.preset}` ({num_params / 1e6:.2f}M parameters, "
        f"{c}x{h}x{w}), float32, forward + VJP at batch {args.batch}, median of "
        f"{args.repeats} runs after a warm-up; loop columns are per iteration of a "
        f"{args.iters}-step loop. {platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| layout | plain jit (ms) | in `fori_loop` (ms) | in `scan` (ms) | loop / plain |",
        "|---|---|---|---|---|",
    ]
    for name, (plain, fori, scan) in rows.items():
        lines.append(f"| {name} | {plain:.1f} | {fori:.1f} | {scan:.1f} | {fori / plain:.1f}x |")
    ours = rows[variants[0][0]][1]
    lines += [
        "",
        "All three compute the same function. Inside `fori_loop`, the NHWC "
        f"convolution is {rows[variants[1][0]][1] / ours:.1f}x and the channel-first "
        f"one {rows[variants[2][0]][1] / ours:.1f}x slower than the patch matmul "
        "the library uses. One training step "
        f"(DSM loss with likelihood weighting and importance sampling, gradient, Adam) "
        f"at batch {args.train_batch}: {train_ms:.0f} ms "
        f"({1e3 / train_ms:.1f} steps/s).",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not (args.quick or args.no_write):
        write_readme(section)
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
