"""A small DDPM++-style U-Net score network for `(C, H, W)` images, computed
channel-last."""

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray

from .._conditioning import AbstractConditioning, LogSNRConditioning
from .._custom_types import Data, RealScalarLike
from ._embedding import Embedding, make_embedding
from ._layers import Conv2dNHWC, GroupNormLast
from ._shapes import check_shape


LAYOUTS: tuple[str, ...] = ("channels_last", "channels_first")

# Configurations used by the experiments; see `unet_preset`.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # 8x8 scikit-learn digits: 0.90M parameters (widths 32 @ 8x8, 64 @ 4x4). Measured on
    # digits (VP, likelihood weighting): test bound 1.91 bits/dim after 2000 steps at
    # batch 128, where a narrower, deeper variant (16/32/64 channels down to 2x2, with
    # attention) reached only 2.21 after 2500 steps.
    "digits": dict(
        data_shape=(1, 8, 8),
        base_channels=32,
        channel_mults=(1, 2),
        num_res_blocks=2,
        attention_resolutions=(),
    ),
    # 28x28 MNIST-like images: 28 -> 14 -> 7, attention at 7x7.
    "mnist": dict(
        data_shape=(1, 28, 28),
        base_channels=32,
        channel_mults=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(7,),
    ),
}


# Layout-dependent building blocks. `channels_last=True` is the library's layout;
# `False` builds the same network from equinox's channel-first layers, which exists only
# so that `benchmarks/net_in_loop.py` can measure what the channel-last layout buys.


def _conv(cin, cout, kernel_size, *, stride=1, channels_last, key):
    if channels_last:
        return Conv2dNHWC(cin, cout, kernel_size, stride=stride, key=key)
    pad = kernel_size // 2
    return eqx.nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=pad, key=key)


def _norm(groups, channels, *, channels_last):
    if channels_last:
        return GroupNormLast(groups, channels)
    return eqx.nn.GroupNorm(groups, channels)


_Conv = Conv2dNHWC | eqx.nn.Conv2d
_Norm = GroupNormLast | eqx.nn.GroupNorm


def _per_channel(v, channels_last):
    """Broadcast a `(C,)` vector against one image in the given layout."""
    return v[None, None, :] if channels_last else v[:, None, None]


def _default_groups(channels: int) -> int:
    # DDPM++ uses min(C // 4, 32) groups; take the largest divisor of C below that.
    upper = max(1, min(32, channels // 4))
    return max(g for g in range(1, upper + 1) if channels % g == 0)


class _ResBlock(eqx.Module):
    """DDPM++ residual block: GN-SiLU-conv, add a projection of the time embedding,
    GN-SiLU-conv, skip (1x1 conv if the width changes), sum scaled by `1/sqrt(2)`."""

    norm0: _Norm
    conv0: _Conv
    temb_proj: eqx.nn.Linear
    norm1: _Norm
    conv1: _Conv
    skip: _Conv | None
    channels_last: bool = eqx.field(static=True)

    def __init__(self, cin, cout, temb_dim, groups, *, channels_last, key):
        k0, k1, k2, k3 = jr.split(key, 4)
        self.channels_last = channels_last
        self.norm0 = _norm(groups(cin), cin, channels_last=channels_last)
        self.conv0 = _conv(cin, cout, 3, channels_last=channels_last, key=k0)
        self.temb_proj = eqx.nn.Linear(temb_dim, cout, key=k1)
        self.norm1 = _norm(groups(cout), cout, channels_last=channels_last)
        self.conv1 = _conv(cout, cout, 3, channels_last=channels_last, key=k2)
        if cin != cout:
            self.skip = _conv(cin, cout, 1, channels_last=channels_last, key=k3)
        else:
            self.skip = None

    def __call__(self, x, temb):
        h = self.conv0(jax.nn.silu(self.norm0(x)))
        h = h + _per_channel(self.temb_proj(jax.nn.silu(temb)), self.channels_last)
        h = self.conv1(jax.nn.silu(self.norm1(h)))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2.0)


class _AttnBlock(eqx.Module):
    """Multi-head self-attention over the `H * W` positions, with a residual
    connection."""

    norm: _Norm
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True)

    def __init__(self, channels, groups, num_heads, *, channels_last, key):
        if channels % num_heads:
            raise ValueError(
                f"`attention_heads`={num_heads} must divide every attention width; "
                f"got width {channels}."
            )
        k0, k1 = jr.split(key)
        self.channels_last = channels_last
        self.num_heads = num_heads
        self.norm = _norm(groups(channels), channels, channels_last=channels_last)
        self.qkv = eqx.nn.Linear(channels, 3 * channels, key=k0)
        self.out = eqx.nn.Linear(channels, channels, key=k1)

    def __call__(self, x):
        h = self.norm(x)
        if self.channels_last:
            hh, ww, c = h.shape
            tokens = h.reshape(hh * ww, c)
        else:
            c, hh, ww = h.shape
            tokens = h.reshape(c, hh * ww).T
        n, d = hh * ww, c // self.num_heads
        qkv = jax.vmap(self.qkv)(tokens).reshape(n, 3, self.num_heads, d)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        logits = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        weights = jax.nn.softmax(logits, axis=-1)
        attn = jnp.einsum("hqk,khd->qhd", weights, v).reshape(n, c)
        attn = jax.vmap(self.out)(attn)
        if self.channels_last:
            attn = attn.reshape(hh, ww, c)
        else:
            attn = attn.T.reshape(c, hh, ww)
        return (x + attn) / math.sqrt(2.0)


class _Downsample(eqx.Module):
    """3x3 convolution with stride 2: `H -> ceil(H / 2)` (so 28 -> 14 -> 7 -> 4)."""

    conv: _Conv

    def __init__(self, channels, *, channels_last, key):
        self.conv = _conv(channels, channels, 3, stride=2, channels_last=channels_last, key=key)

    def __call__(self, x):
        return self.conv(x)


class _Upsample(eqx.Module):
    """Nearest-neighbour x2 upsampling cropped to the skip connection's size (so odd
    sizes such as 7 -> 4 -> 7 round-trip), then a 3x3 convolution."""

    conv: _Conv
    channels_last: bool = eqx.field(static=True)

    def __init__(self, channels, *, channels_last, key):
        self.channels_last = channels_last
        self.conv = _conv(channels, channels, 3, channels_last=channels_last, key=key)

    def __call__(self, x, size):
        hh, ww = size
        if self.channels_last:
            x = jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1)[:hh, :ww]
        else:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, :hh, :ww]
        return self.conv(x)


def _check_config(
    data_shape, base_channels, channel_mults, num_res_blocks, attention_resolutions, groups, layout
):
    """Validate a U-Net configuration; returns the normalised `data_shape`,
    `channel_mults`, the height of every level, the `attention_resolutions` and the
    function `width -> GroupNorm groups`."""
    data_shape = tuple(int(s) for s in data_shape)
    if len(data_shape) != 3 or min(data_shape) < 1:
        raise ValueError(
            f"UNet expects `data_shape=(C, H, W)` with positive entries, got {data_shape!r}."
        )
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; valid ones are {list(LAYOUTS)}.")
    channel_mults = tuple(int(m) for m in channel_mults)
    if not channel_mults or min(channel_mults) < 1:
        raise ValueError(
            f"`channel_mults` must be a non-empty sequence of positive integers, "
            f"got {channel_mults!r}."
        )
    if base_channels < 2 or base_channels % 2:
        raise ValueError(f"`base_channels` must be an even integer >= 2, got {base_channels!r}.")
    if num_res_blocks < 1:
        raise ValueError(f"`num_res_blocks` must be >= 1, got {num_res_blocks!r}.")
    heights = [data_shape[1]]
    for _ in channel_mults[1:]:
        heights.append(-(-heights[-1] // 2))
    attention_resolutions = tuple(int(r) for r in attention_resolutions)
    bad = [r for r in attention_resolutions if r not in heights]
    if bad:
        raise ValueError(
            f"`attention_resolutions` {bad} are not level heights of this U-Net; "
            f"the valid ones for data_shape={data_shape} and "
            f"channel_mults={channel_mults} are {heights}."
        )
    widths = {base_channels * m for m in channel_mults} | {base_channels}
    if groups is None:
        group_fn = _default_groups
    else:
        bad_w = sorted(w for w in widths if w % groups)
        if groups < 1 or bad_w:
            raise ValueError(
                f"`groups`={groups!r} must be a positive divisor of every width; "
                f"it does not divide {bad_w}."
            )
        group_fn = lambda c: groups  # noqa: E731
    return data_shape, channel_mults, heights, attention_resolutions, group_fn


class UNet(eqx.Module):
    """A small DDPM++-style U-Net `net(t, x)` for one image `x` of shape `(C, H, W)`.

    ResNet blocks conditioned on a time embedding (sinusoidal or Gaussian Fourier ->
    MLP -> added per block), GroupNorm, self-attention at chosen resolutions,
    strided-conv downsampling and nearest-neighbour upsampling with skip connections
    (DDPM++ of Song et al. 2021, "Score-Based Generative Modeling through Stochastic
    Differential Equations", used for likelihood training in Song et al. 2021, "Maximum
    Likelihood Training of Score-Based Diffusion Models"). Any `H, W` work, odd ones
    included (28 -> 14 -> 7).

    The public layout is channel-first, but everything inside is computed channel-last
    (`(H, W, C)`, kernels `HWIO`, convolutions as patch matmuls; see
    `scoreflow_eqx.nets._layers`): XLA:CPU runs channel-first convolutions 16-20x slower
    inside the while loops of diffrax solves (jax-ml/jax#12868; see
    `benchmarks/net_in_loop.py`). The input is transposed once on entry and once on
    exit.

    **Arguments:**

    - `data_shape`: `(C, H, W)` of one example.
    - `base_channels`: width of the first level (also the time-embedding size; even).
    - `channel_mults`: width multiplier per level; one level per entry, each but the
        last followed by a downsampling by 2.
    - `num_res_blocks`: residual blocks per level on the way down (one more on the way
        up).
    - `attention_resolutions`: level heights (e.g. `(4,)` for 8x8 inputs, `(7,)` for
        28x28) at which self-attention follows each residual block; the middle block
        always has one attention layer unless this is empty.
    - `attention_heads`: heads of every attention layer.
    - `embedding`: the embedding of the conditioning variable `c`: `"sinusoidal"`
        (default), `"fourier"`, or a module mapping a scalar to `(base_channels,)`.
    - `conditioning`: what the net is conditioned on, `c = conditioning(sde, t)`,
        applied by [`scoreflow_eqx.ScoreFlow`][] (default
        [`scoreflow_eqx.LogSNRConditioning`][]`()`: `c = log(sigma_t / alpha_t)`).
    - `groups`: GroupNorm groups for every layer; default `None` picks per layer the
        largest divisor of the width up to `min(width // 4, 32)` (as DDPM++).
    - `layout`: `"channels_last"` (default). `"channels_first"` builds the same network
        from `eqx.nn.Conv2d` / `eqx.nn.GroupNorm`; it exists only for benchmarking.
    - `key`: PRNG key (keyword-only).

    The output has the shape and dtype of the input. The output convolution is scaled by
    0.1 at initialisation, so a fresh network predicts almost zero.

    Presets: [`scoreflow_eqx.nets.unet_preset`][] (`"digits"`: 8x8, 0.90M parameters;
    `"mnist"`: 28x28).
    """

    embedding: Embedding
    temb0: eqx.nn.Linear
    temb1: eqx.nn.Linear
    conv_in: _Conv
    down_blocks: tuple[tuple[_ResBlock, ...], ...]
    down_attn: tuple[tuple[_AttnBlock | None, ...], ...]
    downsamples: tuple[_Downsample, ...]
    mid_block0: _ResBlock
    mid_attn: _AttnBlock | None
    mid_block1: _ResBlock
    up_blocks: tuple[tuple[_ResBlock, ...], ...]
    up_attn: tuple[tuple[_AttnBlock | None, ...], ...]
    upsamples: tuple[_Upsample, ...]
    norm_out: _Norm
    conv_out: _Conv
    conditioning: AbstractConditioning
    data_shape: tuple[int, int, int] = eqx.field(static=True)
    layout: str = eqx.field(static=True)

    def __init__(
        self,
        data_shape: tuple[int, ...],
        *,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        attention_heads: int = 1,
        embedding: "str | Embedding" = "sinusoidal",
        conditioning: AbstractConditioning = LogSNRConditioning(),
        groups: int | None = None,
        layout: str = "channels_last",
        key: PRNGKeyArray,
    ):
        data_shape, channel_mults, heights, attention_resolutions, group_fn = _check_config(
            data_shape,
            base_channels,
            channel_mults,
            num_res_blocks,
            attention_resolutions,
            groups,
            layout,
        )
        self.data_shape = data_shape
        self.layout = layout
        self.conditioning = conditioning
        cl = layout == "channels_last"
        keys = iter(jr.split(key, 64 + 8 * len(channel_mults) * (num_res_blocks + 2)))
        c_in = data_shape[0]
        temb_dim = 4 * base_channels
        attn_levels = [h in attention_resolutions for h in heights]

        def res_block(cin, cout):
            return _ResBlock(cin, cout, temb_dim, group_fn, channels_last=cl, key=next(keys))

        def attn_block(width):
            return _AttnBlock(width, group_fn, attention_heads, channels_last=cl, key=next(keys))

        self.embedding = make_embedding(embedding, base_channels, key=next(keys))
        self.temb0 = eqx.nn.Linear(base_channels, temb_dim, key=next(keys))
        self.temb1 = eqx.nn.Linear(temb_dim, temb_dim, key=next(keys))
        self.conv_in = _conv(c_in, base_channels, 3, channels_last=cl, key=next(keys))

        # Down: each level's blocks, then (but at the last level) a downsampling; every
        # block's and downsampling's output is a skip connection.
        skip_widths = [base_channels]
        width = base_channels
        down_blocks, down_attn, downsamples = [], [], []
        for level, mult in enumerate(channel_mults):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(res_block(width, base_channels * mult))
                width = base_channels * mult
                attns.append(attn_block(width) if attn_levels[level] else None)
                skip_widths.append(width)
            down_blocks.append(tuple(blocks))
            down_attn.append(tuple(attns))
            if level != len(channel_mults) - 1:
                downsamples.append(_Downsample(width, channels_last=cl, key=next(keys)))
                skip_widths.append(width)
        self.down_blocks = tuple(down_blocks)
        self.down_attn = tuple(down_attn)
        self.downsamples = tuple(downsamples)

        self.mid_block0 = res_block(width, width)
        self.mid_attn = attn_block(width) if attention_resolutions else None
        self.mid_block1 = res_block(width, width)

        # Up: one block more per level, each taking a skip connection.
        up_blocks, up_attn, upsamples = [], [], []
        for level in reversed(range(len(channel_mults))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(
                    res_block(width + skip_widths.pop(), base_channels * channel_mults[level])
                )
                width = base_channels * channel_mults[level]
                attns.append(attn_block(width) if attn_levels[level] else None)
            up_blocks.append(tuple(blocks))
            up_attn.append(tuple(attns))
            if level != 0:
                upsamples.append(_Upsample(width, channels_last=cl, key=next(keys)))
        self.up_blocks = tuple(up_blocks)
        self.up_attn = tuple(up_attn)
        self.upsamples = tuple(upsamples)

        self.norm_out = _norm(group_fn(width), width, channels_last=cl)
        conv_out = _conv(width, c_in, 3, channels_last=cl, key=next(keys))
        self.conv_out = jax.tree.map(lambda w: 0.1 * w, conv_out)  # weight and bias

    def __call__(self, t: RealScalarLike, x: Data) -> Data:
        """**Arguments:** `t` the scalar the net is conditioned on (`conditioning(sde,
        t)`, which [`scoreflow_eqx.ScoreFlow`][] computes), `x` one image `(C, H, W)`.

        **Returns:** an array shaped like `x` (the predicted noise, or score, depending
        on the `ScoreFlow` parameterization).
        """
        check_shape(x, self.data_shape, type(self).__name__)
        cl = self.layout == "channels_last"
        dtype = self.temb0.weight.dtype
        h = jnp.transpose(x, (1, 2, 0)) if cl else x
        h = h.astype(dtype)
        spatial = (lambda a: a.shape[:2]) if cl else (lambda a: a.shape[1:])
        cat_axis = -1 if cl else 0

        temb = self.embedding(jnp.asarray(t, dtype))
        temb = self.temb1(jax.nn.silu(self.temb0(temb.astype(dtype))))

        h = self.conv_in(h)
        skips = [h]
        for level, (blocks, attns) in enumerate(zip(self.down_blocks, self.down_attn)):
            for block, attn in zip(blocks, attns):
                h = block(h, temb)
                if attn is not None:
                    h = attn(h)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)

        h = self.mid_block0(h, temb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid_block1(h, temb)

        for i, (blocks, attns) in enumerate(zip(self.up_blocks, self.up_attn)):
            for block, attn in zip(blocks, attns):
                h = block(jnp.concatenate([h, skips.pop()], axis=cat_axis), temb)
                if attn is not None:
                    h = attn(h)
            if i < len(self.upsamples):
                h = self.upsamples[i](h, spatial(skips[-1]))

        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        out = jnp.transpose(h, (2, 0, 1)) if cl else h
        return out.astype(x.dtype)


def unet_preset(name: str, *, key: PRNGKeyArray, **overrides: Any) -> UNet:
    """Build a [`scoreflow_eqx.nets.UNet`][] from a named configuration.

    **Arguments:**

    - `name`: `"digits"` (8x8x1 scikit-learn digits; base 32, mults (1, 2), 2 blocks,
        no attention, 0.90M parameters) or `"mnist"` (28x28x1; base 32, mults (1, 2, 2),
        2 blocks, attention at 7x7).
    - `key`: PRNG key (keyword-only).
    - `**overrides`: any `UNet` keyword to change, e.g. `embedding="fourier"`.

    **Returns:** the `UNet`.
    """
    if name not in UNET_PRESETS:
        raise ValueError(f"Unknown U-Net preset {name!r}; valid ones are {sorted(UNET_PRESETS)}.")
    config = {**UNET_PRESETS[name], **overrides}
    return UNet(**config, key=key)
