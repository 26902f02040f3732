"""Linear SDEs of score-based diffusion models: VP, sub-VP and VE.

Every SDE has the form `dx = f(x, t) dt + g(t) dw` on `t in [0, T]` with `T = 1`, a linear
drift and a scalar diffusion, so the perturbation kernel is Gaussian:
`p_0t(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)`.
"""

import abc
import math
import warnings
from collections.abc import Callable
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real

from ._custom_types import Data, RealScalarLike, Scalar


ScoreFn = Callable[[RealScalarLike, Data], Data]


def _check_finite_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite positive number, got {value!r}.")


def brownian_motion(
    t0: RealScalarLike,
    t1: RealScalarLike,
    y: jax.ShapeDtypeStruct | Array,
    *,
    key: PRNGKeyArray,
    tol: RealScalarLike | None = None,
) -> dfx.VirtualBrownianTree:
    """A `diffrax.VirtualBrownianTree` shaped like `y` on the interval between `t0` and `t1`
    (in either order, so that it also serves reverse-time solves).

    **Arguments:**

    - `t0`, `t1`: the ends of the time interval.
    - `y`: an array or `jax.ShapeDtypeStruct` giving the shape and dtype of the noise.
    - `key`: the PRNG key (keyword-only); the path is a deterministic function of it.
    - `tol`: the tree's resolution in time; defaults to `|t1 - t0| / 2000`. Set it to half
        the step size you solve with (a common choice, see the diffrax docs).
    """
    lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
    if tol is None:
        tol = (hi - lo) / 2000
    shape = jax.ShapeDtypeStruct(y.shape, y.dtype)
    return dfx.VirtualBrownianTree(lo, hi, tol=tol, shape=shape, key=key)  # pyright: ignore


class AbstractSDE(eqx.Module):
    """A linear SDE `dx = f(x, t) dt + g(t) dw` with a Gaussian perturbation kernel.

    Subclasses implement the closed forms; this base class turns them into diffrax terms
    (forward SDE, reverse-time SDE, probability-flow ODE). All functions act on one example
    of any shape; use `jax.vmap` for batches. Time comes first, as in diffrax.

    Subclasses also provide minus the log-SNR, `log(sigma_t^2 / alpha_t^2)`, an
    antiderivative of `g(t)^2 / sigma_t^2`, and its inverse, which give the
    importance-sampling proposal of the likelihood-weighted loss (Song et al. 2021,
    Section 5): see [`scoreflow_eqx.ImportanceSampler`][].
    """

    #: Terminal time.
    T: ClassVar[float] = 1.0
    default_eps: eqx.AbstractClassVar[float]

    @abc.abstractmethod
    def drift(self, t: RealScalarLike, x: Data) -> Data:
        """The drift `f(x, t)`."""

    @abc.abstractmethod
    def diffusion(self, t: RealScalarLike) -> Scalar:
        """The scalar diffusion coefficient `g(t)`."""

    @abc.abstractmethod
    def diffusion_squared(self, t: RealScalarLike) -> Scalar:
        """`g(t)^2`, computed directly (more accurate than squaring `diffusion`)."""

    @abc.abstractmethod
    def drift_divergence(self, t: RealScalarLike, x: Data) -> Scalar:
        """The exact divergence `div_x f(x, t)` of the drift."""

    @abc.abstractmethod
    def marginal(self, t: RealScalarLike) -> tuple[Scalar, Scalar]:
        """`(alpha_t, sigma_t)` such that `p_0t(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)`."""

    @abc.abstractmethod
    def prior_std(self) -> float:
        """The standard deviation of the isotropic Gaussian prior at time `T`."""

    @abc.abstractmethod
    def neg_log_snr(self, t: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        """Minus the log signal-to-noise ratio, `log(sigma_t^2 / alpha_t^2)`: increasing in
        `t`, and an antiderivative of `g(t)^2 / sigma_t^2` (the importance-sampling
        density, unnormalised)."""

    @abc.abstractmethod
    def inverse_neg_log_snr(self, a: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        """The inverse of `neg_log_snr`: the `t` with `log(sigma_t^2 / alpha_t^2) = a`."""

    def log_snr_antiderivative(self, t: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        """Deprecated name of `neg_log_snr`."""
        warnings.warn(
            "`log_snr_antiderivative` is deprecated: it is `neg_log_snr`, log(sigma^2 / alpha^2).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.neg_log_snr(t)

    def inverse_log_snr_antiderivative(
        self, a: Real[ArrayLike, "*shape"]
    ) -> Float[Array, "*shape"]:
        """Deprecated name of `inverse_neg_log_snr`."""
        warnings.warn(
            "`inverse_log_snr_antiderivative` is deprecated: use `inverse_neg_log_snr`.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.inverse_neg_log_snr(a)

    # ---- derived quantities -------------------------------------------------------------

    def prior_sample(self, key: PRNGKeyArray, shape: tuple[int, ...], dtype=None) -> Array:
        """A sample of the prior `N(0, prior_std^2 I)` with the given shape."""
        if dtype is None:
            dtype = jnp.zeros(()).dtype  # the default float dtype
        return self.prior_std() * jr.normal(key, shape, dtype)

    def prior_logp(self, x: Data) -> Scalar:
        """Log-density of the prior `N(0, prior_std^2 I)` at `x` (summed over all dimensions)."""
        std = self.prior_std()
        d = x.size
        return -0.5 * jnp.sum((x / std) ** 2) - d * (0.5 * math.log(2 * math.pi) + math.log(std))

    # ---- diffrax terms -----------------------------------------------------------------

    def _control_term(self, bm: dfx.AbstractBrownianPath) -> dfx.ControlTerm:
        def diffusion(t, y, args):
            return lx.DiagonalLinearOperator(jnp.full_like(y, self.diffusion(t)))

        return dfx.ControlTerm(diffusion, bm)

    def forward_terms(
        self,
        y: jax.ShapeDtypeStruct | Array,
        *,
        key: PRNGKeyArray,
        t0: RealScalarLike = 0.0,
        t1: RealScalarLike | None = None,
        tol: RealScalarLike | None = None,
    ) -> dfx.MultiTerm:
        """Diffrax terms of the forward SDE `dx = f dt + g dw`: a `MultiTerm` of an `ODETerm`
        and a `ControlTerm` with a diagonal lineax operator driven by a
        `VirtualBrownianTree` on `[t0, t1]` (see [`scoreflow_eqx.brownian_motion`][])."""
        t1 = self.T if t1 is None else t1
        bm = brownian_motion(t0, t1, y, key=key, tol=tol)
        drift = dfx.ODETerm(lambda t, y, args: self.drift(t, y))
        return dfx.MultiTerm(drift, self._control_term(bm))

    def reverse_drift(self, score: ScoreFn, t: RealScalarLike, x: Data) -> Data:
        """Drift of the reverse-time SDE, `f(x, t) - g(t)^2 s(t, x)`."""
        return self.drift(t, x) - self.diffusion_squared(t) * score(t, x)

    def reverse_terms(
        self,
        score: ScoreFn,
        y: jax.ShapeDtypeStruct | Array,
        *,
        key: PRNGKeyArray,
        t0: RealScalarLike,
        t1: RealScalarLike | None = None,
        tol: RealScalarLike | None = None,
    ) -> dfx.MultiTerm:
        """Diffrax terms of the reverse-time SDE `dx = [f - g^2 s] dt + g dw_bar`
        (Anderson 1982), to be solved from `T` down to `t0` (`dt0 < 0`).

        The Brownian motion lives on `[t0, t1]`; with a negative step its increments are
        those of the reverse-time Wiener process `w_bar`.
        """
        t1 = self.T if t1 is None else t1
        bm = brownian_motion(t0, t1, y, key=key, tol=tol)
        drift = dfx.ODETerm(_ReverseDrift(self, score))
        return dfx.MultiTerm(drift, self._control_term(bm))

    def probability_flow(self, score: ScoreFn, t: RealScalarLike, x: Data) -> Data:
        """Velocity of the probability-flow ODE, `f(x, t) - 1/2 g(t)^2 s(t, x)`."""
        return self.drift(t, x) - 0.5 * self.diffusion_squared(t) * score(t, x)

    def probability_flow_term(self, score: ScoreFn) -> dfx.ODETerm:
        """The probability-flow ODE `dx/dt = f - 1/2 g^2 s` as a `diffrax.ODETerm`."""
        return dfx.ODETerm(lambda t, y, args: self.probability_flow(score, t, y))


class _ReverseDrift(eqx.Module):
    # The reverse-time drift as a Module: the score (e.g. a bound method of a ScoreFlow)
    # is a leaf of the diffrax term, so `diffrax.BacksolveAdjoint` can differentiate it.
    sde: AbstractSDE
    score: ScoreFn

    def __call__(self, t, y, args):
        return self.sde.reverse_drift(self.score, t, y)


def _quadratic_time(b, beta_min: float, beta_max: float):
    # Solve B = beta_min t + (beta_max - beta_min) t^2 / 2 for t >= 0, in the form that
    # is stable for small B and for beta_max == beta_min.
    delta = beta_max - beta_min
    return 2 * b / (beta_min + jnp.sqrt(beta_min**2 + 2 * delta * b))


class _AbstractLinearBeta(eqx.Module):
    # Shared by VP and sub-VP: the linear schedule beta(t) and its integral B(t).
    beta_min: eqx.AbstractVar[float]
    beta_max: eqx.AbstractVar[float]

    def beta(self, t: RealScalarLike) -> Scalar:
        """`beta(t) = beta_min + t (beta_max - beta_min)`."""
        return jnp.asarray(self.beta_min + t * (self.beta_max - self.beta_min))

    def integrated_beta(self, t: RealScalarLike) -> Scalar:
        """`B(t) = int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2`."""
        return jnp.asarray(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def drift(self, t: RealScalarLike, x: Data) -> Data:
        return -0.5 * self.beta(t) * x

    def drift_divergence(self, t: RealScalarLike, x: Data) -> Scalar:
        return -0.5 * self.beta(t) * x.size

    def prior_std(self) -> float:
        return 1.0

    def __check_init__(self):
        _check_finite_positive("beta_min", self.beta_min)
        _check_finite_positive("beta_max", self.beta_max)
        if not self.beta_max > self.beta_min:
            raise ValueError(
                "Need `beta_max > beta_min`, got "
                f"beta_min={self.beta_min!r}, beta_max={self.beta_max!r}."
            )


class VPSDE(_AbstractLinearBeta, AbstractSDE):
    """Variance-preserving SDE `dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`, the continuous
    limit of DDPM, with `beta(t) = beta_min + t (beta_max - beta_min)`.

    `alpha_t = exp(-B(t)/2)`, `sigma_t = sqrt(1 - exp(-B(t)))` and the prior is `N(0, I)`.

    **Arguments:**

    - `beta_min`, `beta_max`: the noise schedule, `0 < beta_min < beta_max`.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{song2021scorebased,
            title={Score-Based Generative Modeling through Stochastic Differential Equations},
            author={Song, Yang and Sohl-Dickstein, Jascha and Kingma, Diederik P and
                    Kumar, Abhishek and Ermon, Stefano and Poole, Ben},
            booktitle={ICLR},
            year={2021}
        }
        ```
    """

    beta_min: float = eqx.field(default=0.1, static=True, converter=float)
    beta_max: float = eqx.field(default=20.0, static=True, converter=float)
    default_eps: ClassVar[float] = 1e-5

    def diffusion(self, t: RealScalarLike) -> Scalar:
        return jnp.sqrt(self.beta(t))

    def diffusion_squared(self, t: RealScalarLike) -> Scalar:
        return self.beta(t)

    def marginal(self, t: RealScalarLike) -> tuple[Scalar, Scalar]:
        b = self.integrated_beta(t)
        return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

    def neg_log_snr(self, t: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        # sigma^2 / alpha^2 = (1 - e^{-B}) e^B = e^B - 1 (and its derivative over itself is
        # beta / (1 - e^{-B}) = g^2 / sigma^2).
        return jnp.log(jnp.expm1(self.integrated_beta(t)))

    def inverse_neg_log_snr(self, a: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        b = jnp.logaddexp(0.0, a)  # log(1 + e^a)
        return _quadratic_time(b, self.beta_min, self.beta_max)


class SubVPSDE(_AbstractLinearBeta, AbstractSDE):
    """Sub-variance-preserving SDE
    `dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 B(t)))) dw`.

    `alpha_t = exp(-B(t)/2)`, `sigma_t = 1 - exp(-B(t))` and the prior is `N(0, I)`.
    Its default smallest time is `eps = 1e-2` (Song et al. 2021).

    **Arguments:**

    - `beta_min`, `beta_max`: the noise schedule, `0 < beta_min < beta_max`.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{song2021scorebased,
            title={Score-Based Generative Modeling through Stochastic Differential Equations},
            author={Song, Yang and Sohl-Dickstein, Jascha and Kingma, Diederik P and
                    Kumar, Abhishek and Ermon, Stefano and Poole, Ben},
            booktitle={ICLR},
            year={2021}
        }
        ```
    """

    beta_min: float = eqx.field(default=0.1, static=True, converter=float)
    beta_max: float = eqx.field(default=20.0, static=True, converter=float)
    default_eps: ClassVar[float] = 1e-2

    def diffusion(self, t: RealScalarLike) -> Scalar:
        return jnp.sqrt(self.diffusion_squared(t))

    def diffusion_squared(self, t: RealScalarLike) -> Scalar:
        return self.beta(t) * -jnp.expm1(-2 * self.integrated_beta(t))

    def marginal(self, t: RealScalarLike) -> tuple[Scalar, Scalar]:
        b = self.integrated_beta(t)
        return jnp.exp(-0.5 * b), -jnp.expm1(-b)

    def neg_log_snr(self, t: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        # sigma^2 / alpha^2 = (1 - e^{-B})^2 e^B = (e^B - 1)^2 / e^B, whose log has the
        # derivative beta (1 + e^{-B}) / (1 - e^{-B}) = g^2 / sigma^2.
        b = self.integrated_beta(t)
        return 2 * jnp.log(jnp.expm1(b)) - b

    def inverse_neg_log_snr(self, a: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        # (y - 1)^2 / y = e^a with y = e^B: y = 1 + (e^a + sqrt(e^a (4 + e^a))) / 2.
        ea = jnp.exp(a)
        b = jnp.log1p(0.5 * (ea + jnp.sqrt(ea * (4 + ea))))
        return _quadratic_time(b, self.beta_min, self.beta_max)


class VESDE(AbstractSDE):
    """Variance-exploding SDE `dx = sqrt(d sigma(t)^2 / dt) dw` with the geometric schedule
    `sigma(t) = sigma_min (sigma_max / sigma_min)^t`.

    `alpha_t = 1`, `sigma_t = sigma(t)`, `g(t)^2 = 2 sigma(t)^2 log(sigma_max / sigma_min)`
    and the prior is `N(0, sigma_max^2 I)`. As in Song et al. (2021) the kernel is taken as
    `N(x_0, sigma(t)^2 I)`, i.e. the data are regarded as already perturbed by `sigma_min`.

    **Arguments:**

    - `sigma_min`, `sigma_max`: the noise schedule, `0 < sigma_min < sigma_max`.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{song2021scorebased,
            title={Score-Based Generative Modeling through Stochastic Differential Equations},
            author={Song, Yang and Sohl-Dickstein, Jascha and Kingma, Diederik P and
                    Kumar, Abhishek and Ermon, Stefano and Poole, Ben},
            booktitle={ICLR},
            year={2021}
        }
        ```
    """

    sigma_min: float = eqx.field(default=0.01, static=True, converter=float)
    sigma_max: float = eqx.field(default=50.0, static=True, converter=float)
    default_eps: ClassVar[float] = 1e-5

    def __check_init__(self):
        _check_finite_positive("sigma_min", self.sigma_min)
        _check_finite_positive("sigma_max", self.sigma_max)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(
                "Need `sigma_max > sigma_min`, got "
                f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}."
            )

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: RealScalarLike) -> Scalar:
        """`sigma(t) = sigma_min (sigma_max / sigma_min)^t`."""
        return self.sigma_min * jnp.exp(t * self._log_ratio)

    def drift(self, t: RealScalarLike, x: Data) -> Data:
        return jnp.zeros_like(x)

    def drift_divergence(self, t: RealScalarLike, x: Data) -> Scalar:
        return jnp.zeros((), x.dtype)

    def diffusion(self, t: RealScalarLike) -> Scalar:
        return self.sigma(t) * math.sqrt(2 * self._log_ratio)

    def diffusion_squared(self, t: RealScalarLike) -> Scalar:
        return 2 * self._log_ratio * self.sigma(t) ** 2

    def marginal(self, t: RealScalarLike) -> tuple[Scalar, Scalar]:
        sigma = self.sigma(t)
        return jnp.ones_like(sigma), sigma

    def prior_std(self) -> float:
        return self.sigma_max

    def neg_log_snr(self, t: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        # log sigma(t)^2 = 2 log sigma_min + 2 t log(sigma_max / sigma_min); its derivative
        # g^2 / sigma^2 = 2 log(sigma_max / sigma_min) is constant.
        return jnp.asarray(2 * (math.log(self.sigma_min) + self._log_ratio * t))

    def inverse_neg_log_snr(self, a: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        return jnp.asarray((0.5 * a - math.log(self.sigma_min)) / self._log_ratio)
