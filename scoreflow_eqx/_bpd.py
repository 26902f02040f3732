"""Dataset-level likelihood evaluation in bits per dimension, with confidence intervals
and with the dequantization done here, where its offset cannot be forgotten."""

import math
import warnings
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.special as jsp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray
from tqdm.auto import tqdm

from ._bound import nll_bound
from ._flow import ScoreFlow
from ._likelihood import ode_nll, ode_nll_batched
from .data._discretization import Discretization


METHODS: tuple[str, ...] = ("ode", "bound")
SOLVE_MODES: tuple[str, ...] = ("per_example", "batched")

#: `dequantizer(k, *, key) -> (x_model, log_q)`: model-space values of the integer
#: levels `k` of one example and `log q(u | k)`, the log-density of the offsets
#: `u in [0, 1)^D` (0 for uniform dequantization).
Dequantizer = Callable[..., tuple[Float[Array, "*data"], Float[Array, ""]]]


class BPDResult(eqx.Module):
    """The result of [`scoreflow_eqx.evaluate_bpd`][].

    **Fields:**

    - `bpd`: the mean bits per dimension over the examples (failed solves excluded).
    - `ci95`: the half-width of the 95% confidence interval of `bpd` (Student t over
        examples).
    - `per_example`: bits/dim of every example, averaged over the repeats (NaN where a
        solve failed), shape `(num_examples,)`.
    - `nll`: the same in nats of the model-space density (including `log q` of a
        variational dequantizer), shape `(num_examples,)`.
    - `nfe_mean`, `nfe_max`: score-network evaluations per example and solve. For the
        bound this is `num_t` (+ the eps-correction samples).
    - `num_failed`: the number of failed solves (examples x repeats).
    - `method`: `"ode"` or `"bound"`.
    - `num_examples`, `num_repeats`.
    """

    bpd: float
    ci95: float
    per_example: np.ndarray
    nll: np.ndarray
    nfe_mean: float
    nfe_max: int
    num_failed: int
    method: str
    num_examples: int
    num_repeats: int


@jax.jit
def _t_upper_tail(t, dof):
    return 0.5 * jsp.betainc(0.5 * dof, 0.5, dof / (dof + t * t))


def student_t_quantile(p: float, dof: int) -> float:
    """The `p`-quantile (`0 < p < 1`) of Student's t distribution with `dof` degrees of
    freedom, by bisection on its CDF (a regularised incomplete beta function)."""
    if not 0 < p < 1:
        raise ValueError(f"`p` must lie in (0, 1), got {p!r}.")
    if dof < 1:
        raise ValueError(f"`dof` must be a positive integer, got {dof!r}.")
    if p < 0.5:
        return -student_t_quantile(1 - p, dof)

    def upper_tail(t):  # P(T > t) for t >= 0
        return float(_t_upper_tail(t, float(dof)))

    lo, hi = 0.0, 1.0
    while upper_tail(hi) > 1 - p:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if upper_tail(mid) > 1 - p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _check_data(data, discretization: Discretization) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim < 2 or data.shape[0] < 1:
        raise ValueError(
            "`data` must have shape (num_examples, *data_shape) with at least one "
            f"example, got shape {data.shape}."
        )
    if discretization.is_discrete:
        k = discretization.num_levels
        if not np.issubdtype(data.dtype, np.integer):
            raise ValueError(
                f"`discretization` has num_levels={k}, so `data` must hold the integer "
                f"levels 0..{k - 1} (e.g. uint8 pixels), got dtype {data.dtype}. "
                "evaluate_bpd dequantizes and rescales them itself, so that the "
                "bits/dim offset cannot be forgotten. For continuous data pass "
                "`Discretization(num_levels=None)`."
            )
        lo, hi = int(data.min()), int(data.max())
        if lo < 0 or hi > k - 1:
            raise ValueError(
                f"`data` levels must lie in 0..{k - 1} for num_levels={k}, "
                f"got values in {lo}..{hi}."
            )
    elif not np.issubdtype(data.dtype, np.floating):
        raise ValueError(
            "`discretization` has num_levels=None (continuous data), so `data` must be "
            f"floating point in model space, got dtype {data.dtype}. For discrete "
            "levels pass `Discretization(num_levels=K, data_range=...)`."
        )
    return data


def _dequantize(discretization, dequantizer, k, key, dtype):
    if not discretization.is_discrete:
        return k.astype(dtype), jnp.zeros((), dtype)
    if dequantizer is None:
        u = jr.uniform(key, k.shape, dtype)
        return discretization.dequantize(k, u).astype(dtype), jnp.zeros((), dtype)
    x, log_q = dequantizer(k, key=key)
    return x.astype(dtype), jnp.asarray(log_q, dtype)


@eqx.filter_jit
def _evaluate_batch(
    flow, batch, keys, discretization, dequantizer, method, solve_mode, kwargs
):
    # Returns per-example (nll in nats incl. log q, nfe, failed).
    dtype = jnp.zeros(()).dtype
    split = jax.vmap(jr.split)(keys)
    dkeys, mkeys = split[:, 0], split[:, 1]
    xs, log_q = jax.vmap(
        lambda k, key: _dequantize(discretization, dequantizer, k, key, dtype)
    )(batch, dkeys)
    if method == "bound":
        res = jax.vmap(lambda x, key: nll_bound(flow, x, key=key, **kwargs))(xs, mkeys)
        failed = ~jnp.isfinite(res.nll)
    elif solve_mode == "per_example":
        res = jax.vmap(lambda x, key: ode_nll(flow, x, key=key, **kwargs))(xs, mkeys)
        failed = ~dfx.is_successful(res.result)
    else:
        res = ode_nll_batched(flow, xs, key=mkeys, **kwargs)
        failed = jnp.broadcast_to(~dfx.is_successful(res.result), res.nll.shape)
    return res.nll + log_q, res.nfe, failed


def evaluate_bpd(
    flow: ScoreFlow,
    data: ArrayLike,
    *,
    discretization: Discretization,
    key: PRNGKeyArray,
    method: str = "ode",
    batch_size: int = 64,
    dequantizer: Dequantizer | None = None,
    num_repeats: int = 1,
    solve_mode: str = "batched",
    show_progress: bool = True,
    **method_kwargs,
) -> BPDResult:
    """Bits per dimension of a dataset under a score-based model, with a 95% confidence
    interval.

    Discrete data are given as their integer levels and dequantized here:
    `x = a (k + u) / K + b` with `u ~ U[0, 1)^D` (or a variational `q(u | k)`), and the
    discrete NLL is `(E[NLL_x + log q(u | k)] / D - log a + log K) / log 2` bits per
    dimension (see [`scoreflow_eqx.bits_per_dim`][]). Examples are evaluated in
    jit-compiled, vmapped batches (the last one padded), with a tqdm bar.

    **Arguments:**

    - `flow`: the [`scoreflow_eqx.ScoreFlow`][].
    - `data`: shape `(num_examples, *data_shape)`: integer levels `0..K-1` when
        `discretization.num_levels = K`, or model-space floats when it is `None`.
        Floats with a discrete discretization are refused.
    - `discretization`: the [`scoreflow_eqx.data.Discretization`][] of the data.
    - `key`: PRNG key (keyword-only) for dequantization, probes and times; each
        example's randomness depends only on its index and the repeat, not on
        `batch_size`.
    - `method`: `"ode"` ([`scoreflow_eqx.ode_nll`][]) or `"bound"`
        ([`scoreflow_eqx.nll_bound`][]).
    - `batch_size`: examples per compiled batch.
    - `dequantizer`: optional `dequantizer(k, *, key) -> (x_model, log_q)` replacing
        uniform dequantization.
    - `num_repeats`: evaluations per example (fresh dequantization noise and probes),
        averaged per example.
    - `solve_mode`: for `"ode"`: `"batched"` (default; one solve of the whole batch
        with a shared step size and RMS error control over the batch, as the paper's
        released code) or `"per_example"` (vmapped solves, each with its own steps and
        NFE). Batched was faster in every batched case of `benchmarks/nfe_per_nll.py`
        on CPU: vmapped solves run until the slowest example is done. Its NFE is the
        batch's.
    - `show_progress`: show a tqdm bar.
    - `**method_kwargs`: passed on to `ode_nll` (e.g. `divergence`, `rtol`, `atol`,
        `solver`) or to `nll_bound` (e.g. `num_t`, `eps_correction`).

    **Returns:** a [`scoreflow_eqx.BPDResult`][].
    """
    if method not in METHODS:
        raise ValueError(
            f"Unknown method {method!r}; valid methods are {list(METHODS)}."
        )
    if solve_mode not in SOLVE_MODES:
        raise ValueError(
            f"Unknown solve_mode {solve_mode!r}; valid modes are {list(SOLVE_MODES)}."
        )
    if not isinstance(discretization, Discretization):
        raise TypeError(
            "`discretization` must be a scoreflow_eqx.data.Discretization, got "
            f"{type(discretization).__name__}."
        )
    if batch_size < 1 or num_repeats < 1:
        raise ValueError(
            f"`batch_size` and `num_repeats` must be positive, got {batch_size!r} and "
            f"{num_repeats!r}."
        )
    if "key" in method_kwargs:
        raise ValueError("Pass `key` once, to evaluate_bpd itself.")
    if dequantizer is not None and not discretization.is_discrete:
        raise ValueError("A dequantizer needs discrete data (`num_levels` is None).")
    data = _check_data(data, discretization)
    n = data.shape[0]
    dim = math.prod(data.shape[1:])
    num_batches = -(-n // batch_size)
    padded = np.concatenate(
        [data, np.repeat(data[:1], num_batches * batch_size - n, axis=0)], axis=0
    )
    if discretization.is_discrete:
        padded = padded.astype(np.int32)
    nll = np.empty((num_repeats, n))
    nfe = np.empty((num_repeats, n))
    failed = np.empty((num_repeats, n), dtype=bool)
    with tqdm(
        total=num_repeats * num_batches,
        disable=not show_progress,
        desc=f"bits/dim ({method})",
    ) as bar:
        for r in range(num_repeats):
            repeat_key = jr.fold_in(key, r)
            for b in range(num_batches):
                start = b * batch_size
                stop = min(start + batch_size, n)
                indices = jnp.arange(start, start + batch_size)
                keys = jax.vmap(lambda i: jr.fold_in(repeat_key, i))(indices)
                out = _evaluate_batch(
                    flow,
                    jnp.asarray(padded[start : start + batch_size]),
                    keys,
                    discretization,
                    dequantizer,
                    method,
                    solve_mode,
                    method_kwargs,
                )
                batch_nll, batch_nfe, batch_failed = (np.asarray(o) for o in out)
                m = stop - start
                nll[r, start:stop] = batch_nll[:m]
                nfe[r, start:stop] = batch_nfe[:m]
                failed[r, start:stop] = batch_failed[:m]
                done = nll[: r + 1].reshape(-1)[: r * n + stop]
                done = done[np.isfinite(done)]
                running = (
                    float(np.mean(discretization.bits_per_dim(done, dim=dim)))
                    if done.size
                    else float("nan")
                )
                bar.set_postfix(
                    bpd=f"{running:.4f}", nfe=f"{float(np.mean(batch_nfe[:m])):.0f}"
                )
                bar.update()
    nll = np.where(failed, np.nan, nll)
    per_example_nll = nll.mean(axis=0)
    per_example = np.asarray(discretization.bits_per_dim(per_example_nll, dim=dim))
    num_failed = int(failed.sum())
    finite = per_example[np.isfinite(per_example)]
    if num_failed:
        warnings.warn(
            f"{num_failed} of {failed.size} likelihood evaluations failed (e.g. "
            "max_steps reached); they are NaN in `per_example` and excluded from "
            "`bpd`.",
            RuntimeWarning,
            stacklevel=2,
        )
    if finite.size >= 2:
        bpd = float(finite.mean())
        half = student_t_quantile(0.975, finite.size - 1)
        ci95 = float(half * finite.std(ddof=1) / math.sqrt(finite.size))
    else:
        bpd = float(finite.mean()) if finite.size else float("nan")
        ci95 = float("nan")
    return BPDResult(
        bpd=bpd,
        ci95=ci95,
        per_example=per_example,
        nll=per_example_nll,
        nfe_mean=float(nfe.mean()),
        nfe_max=int(nfe.max()),
        num_failed=num_failed,
        method=method,
        num_examples=n,
        num_repeats=num_repeats,
    )
