"""`ScoreFlow`: an SDE paired with a score network."""

from collections.abc import Callable

import equinox as eqx
from jaxtyping import PRNGKeyArray

from ._conditioning import AbstractConditioning, TimeConditioning
from ._custom_types import Data, RealScalarLike, Scalar
from ._losses import dsm_loss
from ._sde import AbstractSDE


PARAMETERIZATIONS: tuple[str, ...] = ("noise", "score")


class ScoreFlow(eqx.Module):
    """A score-based diffusion model: an SDE and a network `net(t, x)` that models its score.

    The same object is a continuous normalizing flow (through its probability-flow ODE) and
    an SDE model; it is an `eqx.Module`, so it can be jitted, differentiated, vmapped and
    sharded like any pytree.

    **Arguments:**

    - `sde`: an [`scoreflow_eqx.AbstractSDE`][] (`VPSDE`, `SubVPSDE`, `VESDE`).
    - `net`: any callable `net(t, x) -> array shaped like x` on one example; usually one of
        `scoreflow_eqx.nets`.
    - `parameterization`: `"noise"` (default): the net predicts the noise `z` and the score
        is `-net(t, x) / sigma_t`; `"score"`: the net output is the score itself.
    - `eps`: the smallest time used in training, likelihoods and sampling; defaults to
        `sde.default_eps`.
    - `conditioning`: what the net receives in place of the time, `net(c, x)` with `c =
        conditioning(sde, t)`: an [`scoreflow_eqx.AbstractConditioning`][]. Default: the
        net's own `conditioning` attribute if it has one (the nets of
        `scoreflow_eqx.nets` are conditioned on the log-SNR by default:
        [`scoreflow_eqx.LogSNRConditioning`][]), else `t` itself
        ([`scoreflow_eqx.TimeConditioning`][]`()`), so that any callable `net(t, x)`, such
        as an exact score, receives the time.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{song2021maximum,
            title={Maximum Likelihood Training of Score-Based Diffusion Models},
            author={Song, Yang and Durkan, Conor and Murray, Iain and Ermon, Stefano},
            booktitle={NeurIPS},
            year={2021}
        }
        ```
    """

    sde: AbstractSDE
    net: Callable[[RealScalarLike, Data], Data]
    parameterization: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    conditioning: AbstractConditioning

    def __init__(
        self,
        sde: AbstractSDE,
        net: Callable[[RealScalarLike, Data], Data],
        *,
        parameterization: str = "noise",
        eps: float | None = None,
        conditioning: AbstractConditioning | None = None,
    ):
        if not isinstance(sde, AbstractSDE):
            raise TypeError(f"`sde` must be an AbstractSDE, got {type(sde).__name__}.")
        if not callable(net):
            raise TypeError("`net` must be callable as `net(t, x)`.")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"Unknown parameterization {parameterization!r}; "
                f"valid ones are {list(PARAMETERIZATIONS)}."
            )
        eps = float(sde.default_eps if eps is None else eps)
        if not 0 < eps < sde.T:
            raise ValueError(f"`eps` must lie in (0, {sde.T}), got {eps!r}.")
        self.sde = sde
        self.net = net
        self.parameterization = parameterization
        self.eps = eps
        self.conditioning = _resolve_conditioning(net, conditioning)

    def _net(self, t: RealScalarLike, x: Data) -> Data:
        out = self.net(self.conditioning(self.sde, t), x)
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(
                f"The net {type(self.net).__name__} maps an example of shape {x.shape} to "
                f"an output of shape {getattr(out, 'shape', type(out).__name__)}; a score "
                "network must return an array shaped like its input."
            )
        return out

    def score(self, t: RealScalarLike, x: Data) -> Data:
        """The model score `s(t, x) ~ grad_x log p_t(x)` for one example."""
        out = self._net(t, x)
        if self.parameterization == "noise":
            _, sigma = self.sde.marginal(t)
            return -out / sigma
        return out

    def scaled_score(self, t: RealScalarLike, x: Data) -> Data:
        """`sigma_t s(t, x)`, computed without dividing by `sigma_t` when the net predicts
        noise (then it is `-net(t, x)`)."""
        out = self._net(t, x)
        if self.parameterization == "noise":
            return -out
        _, sigma = self.sde.marginal(t)
        return sigma * out

    def loss(
        self,
        x0: Data,
        *,
        key: PRNGKeyArray,
        weighting: str = "likelihood",
        importance_sampling: bool = True,
        t: RealScalarLike | None = None,
    ) -> Scalar:
        """One-sample denoising score-matching loss for one example `x0`: an unbiased
        estimate of `1/2 int_eps^T lambda(t) E ||s(t, x_t) - grad log p_0t(x_t | x0)||^2 dt`.

        **Arguments:**

        - `x0`: one data point (no batch axis).
        - `key`: PRNG key for the time and the noise.
        - `weighting`: `"likelihood"` (`lambda = g^2`, Theorem 1 of Song et al. 2021) or
            `"score_sde"` (`lambda = sigma_t^2`).
        - `importance_sampling`: draw `t` from `p(t) ~ g^2 / sigma^2` (see
            [`scoreflow_eqx.ImportanceSampler`][]) instead of uniformly.
        - `t`: optionally, a fixed time (e.g. stratified over a batch).

        **Returns:** a scalar; `jax.vmap` over examples and average for a batch loss.
        """
        return dsm_loss(
            self.sde,
            self.scaled_score,
            x0,
            key=key,
            eps=self.eps,
            weighting=weighting,
            importance_sampling=importance_sampling,
            t=t,
        )


def _resolve_conditioning(net, conditioning) -> AbstractConditioning:
    own = getattr(net, "conditioning", None)
    if conditioning is None:
        conditioning = TimeConditioning() if own is None else own
    elif own is not None and own != conditioning:
        raise ValueError(
            f"`conditioning`={conditioning!r} differs from the one the net "
            f"{type(net).__name__} was built for ({own!r}); build the net with "
            "`conditioning=` instead, or leave it out here."
        )
    if not isinstance(conditioning, AbstractConditioning):
        raise TypeError(
            "`conditioning` must be an sf.AbstractConditioning (e.g. "
            f"sf.LogSNRConditioning() or sf.TimeConditioning()), got {conditioning!r}."
        )
    return conditioning
