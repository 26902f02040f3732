"""Build SDEs, nets and flows from names and JSON-able configs (used by `sf.train` to
save, and by `sf.load_flow` to rebuild, a model)."""

from typing import Any

import jax.random as jr
from jaxtyping import PRNGKeyArray

from . import nets
from ._conditioning import (
    AbstractConditioning,
    conditioning_from_config,
    conditioning_to_config,
    TimeConditioning,
)
from ._flow import ScoreFlow
from ._sde import AbstractSDE, SubVPSDE, VESDE, VPSDE


SDES: dict[str, type[AbstractSDE]] = {"subvp": SubVPSDE, "ve": VESDE, "vp": VPSDE}
NETS: tuple[str, ...] = ("mlp", "unet")


def make_sde(name: str, **kwargs) -> AbstractSDE:
    """`make_sde("vp" | "subvp" | "ve", **kwargs)`, e.g. `make_sde("ve",
    sigma_max=20.0)`."""
    try:
        cls = SDES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"Unknown SDE {name!r}; valid SDEs are {sorted(SDES)}.") from None
    return cls(**kwargs)


def make_net(name: str, data_shape: tuple[int, ...], *, key: PRNGKeyArray, **kwargs):
    """`make_net("mlp" | "unet", data_shape, key=..., **kwargs)`."""
    if name == "mlp":
        return nets.MLP(tuple(data_shape), key=key, **kwargs)
    if name == "unet":
        return nets.UNet(data_shape=tuple(data_shape), key=key, **kwargs)
    raise ValueError(f"Unknown net {name!r}; valid nets are {list(NETS)}.")


def flow_config(
    data_shape: tuple[int, ...],
    *,
    sde: str = "vp",
    sde_kwargs: dict[str, Any] | None = None,
    net: str = "mlp",
    net_kwargs: dict[str, Any] | None = None,
    parameterization: str = "noise",
    eps: float | None = None,
    conditioning: "AbstractConditioning | str | dict[str, Any]" = "log_snr",
) -> dict[str, Any]:
    """A JSON-able description of a [`scoreflow_eqx.ScoreFlow`][] (see
    [`scoreflow_eqx.make_flow`][]). Names are validated here, so typos fail early.

    `conditioning` is what the net is conditioned on: `"log_snr"` (default,
    [`scoreflow_eqx.LogSNRConditioning`][]`()`), `"time"`
    ([`scoreflow_eqx.TimeConditioning`][]`()`), such an object, or its config (a dict
    such as `{"name": "time", "scale": 1000.0}`)."""
    make_sde(sde, **(sde_kwargs or {}))  # validates
    if net not in NETS:
        raise ValueError(f"Unknown net {net!r}; valid nets are {list(NETS)}.")
    if not isinstance(conditioning, AbstractConditioning):
        conditioning = conditioning_from_config(conditioning)
    return {
        "data_shape": [int(s) for s in data_shape],
        "sde": sde.lower(),
        "sde_kwargs": dict(sde_kwargs or {}),
        "net": net,
        "net_kwargs": dict(net_kwargs or {}),
        "parameterization": parameterization,
        "eps": eps,
        "conditioning": conditioning_to_config(conditioning),
    }


def _legacy_conditioning(config: dict[str, Any]) -> AbstractConditioning:
    # Configs written before the "conditioning" key: the nets embedded the time itself,
    # the sinusoidal embedding as `1000 t` (now `TimeConditioning(scale=1000)` and an
    # embedding of unit scale: the same numbers).
    embedding = config.get("net_kwargs", {}).get("embedding", "sinusoidal")
    return TimeConditioning(scale=1000.0 if embedding == "sinusoidal" else 1.0)


def make_flow(config: dict[str, Any], *, key: PRNGKeyArray | None = None) -> ScoreFlow:
    """Build a [`scoreflow_eqx.ScoreFlow`][] from a config made by
    [`scoreflow_eqx.flow_config`][] (e.g. read back from a work directory).

    **Arguments:**

    - `config`: the dict. A config without `"conditioning"` (written before it existed)
        builds the nets of that time: conditioned on the time, `1000 t` for the
        sinusoidal embedding.
    - `key`: initialisation key of the net (irrelevant when parameters are loaded next).
    """
    key = jr.key(0) if key is None else key
    sde = make_sde(config["sde"], **config.get("sde_kwargs", {}))
    if "conditioning" in config:
        conditioning = conditioning_from_config(config["conditioning"])
    else:
        conditioning = _legacy_conditioning(config)
    net = make_net(
        config["net"],
        tuple(config["data_shape"]),
        key=key,
        conditioning=conditioning,
        **config.get("net_kwargs", {}),
    )
    return ScoreFlow(
        sde,
        net,
        parameterization=config.get("parameterization", "noise"),
        eps=config.get("eps"),
    )
