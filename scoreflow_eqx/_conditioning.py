"""The variable a score network is conditioned on in place of the time: `t` itself, or
the log signal-to-noise ratio of the SDE's marginal, a smooth measure of the noise level
(as in VDM and EDM)."""

import abc

import equinox as eqx
import jax.numpy as jnp

from ._custom_types import RealScalarLike, Scalar
from ._sde import AbstractSDE


class AbstractConditioning(eqx.Module):
    """Maps the time `t` of an SDE to the scalar `c` that a score network receives as its
    first argument, `net(c, x)`.

    A network may declare the variable it expects as its `conditioning` attribute (the
    nets of `scoreflow_eqx.nets` do); [`scoreflow_eqx.ScoreFlow`][] then applies it. A
    network without one receives `t` itself ([`scoreflow_eqx.TimeConditioning`][]).
    """

    @abc.abstractmethod
    def __call__(self, sde: AbstractSDE, t: RealScalarLike) -> Scalar:
        """**Arguments:** the SDE and a time `t`. **Returns:** the scalar `c`."""


class TimeConditioning(AbstractConditioning):
    """`c = scale * t`: the network sees the SDE's time (scaled).

    `scale=1000` with a sinusoidal embedding reproduces the DDPM++ networks of Song et
    al. (2021), whose fastest feature has a period of `2 pi / 1000` in `t`: an adaptive
    solver of the probability-flow ODE must resolve it, which costs about twice the
    function evaluations of [`scoreflow_eqx.LogSNRConditioning`][] per likelihood
    (`benchmarks/nfe_accuracy.py`).

    **Arguments:**

    - `scale`: a positive float (default 1).
    """

    scale: float = eqx.field(default=1.0, static=True)

    def __check_init__(self):
        if not (isinstance(self.scale, int | float) and 0 < self.scale < float("inf")):
            raise ValueError(f"`scale` must be a positive finite float, got {self.scale!r}.")

    def __call__(self, sde: AbstractSDE, t: RealScalarLike) -> Scalar:
        return self.scale * jnp.asarray(t)


class LogSNRConditioning(AbstractConditioning):
    """`c = scale * log SNR(t)` with `SNR(t) = alpha_t^2 / sigma_t^2`; the default
    `scale = -1/2` gives `c = log(sigma_t / alpha_t)`, the log noise level of `x / alpha_t`
    (`log sigma_t` for the VE SDE: EDM's `c_noise` up to a factor).

    `c` is smooth and monotone in `t` and spreads the noise levels evenly: for the
    default VP SDE it runs from -6.9 at `t = 1e-5` to 5.0 at `t = 1`. A network with a
    bounded-frequency embedding of `c` (the default of `scoreflow_eqx.nets`) varies
    slowly in `t`, so adaptive solves of the probability-flow ODE take far fewer steps
    than with a high-frequency embedding of `t` (`benchmarks/nfe_accuracy.py`).

    **Arguments:**

    - `scale`: a non-zero finite float (default -1/2).

    ??? cite "Reference"

        ```bibtex
        @inproceedings{kingma2021variational,
            title={Variational Diffusion Models},
            author={Kingma, Diederik P and Salimans, Tim and Poole, Ben and Ho, Jonathan},
            booktitle={NeurIPS},
            year={2021}
        }
        @inproceedings{karras2022elucidating,
            title={Elucidating the Design Space of Diffusion-Based Generative Models},
            author={Karras, Tero and Aittala, Miika and Aila, Timo and Laine, Samuli},
            booktitle={NeurIPS},
            year={2022}
        }
        ```
    """

    scale: float = eqx.field(default=-0.5, static=True)

    def __check_init__(self):
        ok = isinstance(self.scale, int | float) and self.scale != 0
        if not (ok and abs(self.scale) < float("inf")):
            raise ValueError(f"`scale` must be a non-zero finite float, got {self.scale!r}.")

    def __call__(self, sde: AbstractSDE, t: RealScalarLike) -> Scalar:
        # neg_log_snr = log(sigma^2 / alpha^2) = -log SNR.
        return -self.scale * sde.neg_log_snr(jnp.asarray(t))


#: Names of the conditionings in JSON configs (`sf.flow_config`).
CONDITIONINGS: dict[str, type[AbstractConditioning]] = {
    "log_snr": LogSNRConditioning,
    "time": TimeConditioning,
}


def conditioning_to_config(conditioning: AbstractConditioning) -> dict:
    """A JSON-able description, `{"name": ..., "scale": ...}`."""
    for name, cls in CONDITIONINGS.items():
        if type(conditioning) is cls:
            return {"name": name, "scale": conditioning.scale}  # pyright: ignore
    raise ValueError(
        f"{type(conditioning).__name__} has no config name; valid ones are "
        f"{[c.__name__ for c in CONDITIONINGS.values()]}."
    )


def conditioning_from_config(config: "dict | str") -> AbstractConditioning:
    """The conditioning of a config made by `conditioning_to_config` (or a bare name)."""
    if isinstance(config, str):
        config = {"name": config}
    name = config.get("name")
    if name not in CONDITIONINGS:
        raise ValueError(f"Unknown conditioning {name!r}; valid names are {list(CONDITIONINGS)}.")
    kwargs = {k: v for k, v in config.items() if k != "name"}
    return CONDITIONINGS[name](**kwargs)
