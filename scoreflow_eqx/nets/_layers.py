"""Channel-last layers for image score networks.

Why these exist instead of `eqx.nn.Conv2d` / `eqx.nn.GroupNorm`: those are
channel-first (`(C, H, W)` per example, i.e. NCHW once batched). XLA:CPU runs
channel-first convolutions 16-20x slower when they sit inside a `while_loop` or `scan`
(jax-ml/jax#12868), and every diffrax solve -- probability-flow likelihoods, sampling --
is a while loop. The layers here act on one example of shape `(H, W, C)` and store
convolution kernels as `HWIO`, so `jax.vmap` batches them along a leading axis and the
whole network stays channel-last.

Measured on the 2-core CPU machines of this project (`benchmarks/net_in_loop.py`), even
channel-last `lax.conv_general_dilated` (`("NHWC", "HWIO", "NHWC")`) convolutions run
3-20x slower inside loops at the small image sizes used here (4x4 to 28x28), and
pathologically slowly on 2x2 outputs even outside loops. So `Conv2dNHWC` computes a
convolution as one matmul of the gathered `kh * kw` shifted patches (an
`(H * W, kh * kw * C_in)` matrix) with the reshaped kernel: as fast as the convolution
outside loops and unaffected by them. Initialisation follows equinox (uniform in
`+-1/sqrt(fan_in)`), so the layers are interchangeable with equinox's up to a transpose
of the weights (tested).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray


# Outputs with at most this many pixels are computed as patches @ kernel; larger ones
# with `lax.conv_general_dilated` in NHWC. Default: all of them as a matmul (see the
# module docstring). Read at trace time; `benchmarks/net_in_loop.py` lowers it to 0 to
# time the NHWC convolution.
_MATMUL_MAX_PIXELS = 1 << 62


def default_float_dtype():
    """float64 when x64 is enabled, else float32 (as equinox does)."""
    return jnp.zeros(()).dtype


class Conv2dNHWC(eqx.Module):
    """A 2-D convolution on one channel-last example `(H, W, C_in) -> (H', W', C_out)`.

    **Arguments:**

    - `in_channels`, `out_channels`: channel counts.
    - `kernel_size`: odd kernel size (square).
    - `stride`: spatial stride.
    - `padding`: zero padding on every side; default `kernel_size // 2` ("same" size at
        stride 1, `ceil(H / 2)` at stride 2, also for odd `H`).
    - `key`: PRNG key (keyword-only).

    The kernel is stored as `(kh, kw, C_in, C_out)` (`HWIO`); the convolution is
    computed as one matmul of the gathered patches with the kernel (see the module
    docstring for why).
    """

    weight: Float[Array, "kh kw cin cout"]
    bias: Float[Array, " cout"]
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        dtype=None,
        key: PRNGKeyArray,
    ):
        dtype = default_float_dtype() if dtype is None else dtype
        wkey, bkey = jr.split(key)
        lim = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = jr.uniform(wkey, shape, dtype, -lim, lim)
        self.bias = jr.uniform(bkey, (out_channels,), dtype, -lim, lim)
        self.stride = int(stride)
        self.padding = kernel_size // 2 if padding is None else int(padding)

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        p, s = self.padding, self.stride
        kh, kw, cin, cout = self.weight.shape
        weight = self.weight.astype(x.dtype)
        out_h = (x.shape[0] + 2 * p - kh) // s + 1
        out_w = (x.shape[1] + 2 * p - kw) // s + 1
        if out_h * out_w <= _MATMUL_MAX_PIXELS:
            # Gather the kh * kw shifted (strided) views and use one matmul.
            xp = jnp.pad(x, ((p, p), (p, p), (0, 0)))
            patches = [
                xp[i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s]
                for i in range(kh)
                for j in range(kw)
            ]
            out = jnp.concatenate(patches, axis=-1) @ weight.reshape(kh * kw * cin, cout)
        else:
            out = jax.lax.conv_general_dilated(
                x[None],
                weight,
                window_strides=(s, s),
                padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )[0]
        return out + self.bias.astype(x.dtype)[None, None, :]


class GroupNormLast(eqx.Module):
    """Group normalisation over the last (channel) axis of one example `(..., C)`:
    the same maths as `eqx.nn.GroupNorm` on the channel-first transpose.

    **Arguments:**

    - `groups`: number of groups; must divide `channels`.
    - `channels`: number of channels.
    - `eps`: added to the variance.
    """

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, groups: int, channels: int, eps: float = 1e-5, *, dtype=None):
        if channels % groups:
            raise ValueError(
                f"GroupNorm: `groups`={groups} must divide the channel count {channels}."
            )
        dtype = default_float_dtype() if dtype is None else dtype
        self.weight = jnp.ones((channels,), dtype)
        self.bias = jnp.zeros((channels,), dtype)
        self.groups = int(groups)
        self.eps = float(eps)

    def __call__(self, x: Float[Array, "*spatial channels"]) -> Float[Array, "*spatial channels"]:
        orig_dtype = x.dtype
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(x.dtype, jnp.float32)
        x = x.astype(dtype)
        c = x.shape[-1]
        y = x.reshape(-1, self.groups, c // self.groups)
        mean = jnp.mean(y, axis=(0, 2), keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(y - mean), axis=(0, 2), keepdims=True), 0.0)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        out = y.reshape(x.shape)
        lead = (None,) * (x.ndim - 1)
        out = out * self.weight.astype(dtype)[lead] + self.bias.astype(dtype)[lead]
        return out.astype(orig_dtype)
