"""Tweedie's formula: the posterior mean of the clean example given a noisy one."""

from .._custom_types import Data, RealScalarLike
from .._flow import ScoreFlow


def tweedie_denoise(flow: ScoreFlow, t: RealScalarLike, x: Data) -> Data:
    """Tweedie's formula: the posterior mean `E[x_0 | x_t = x]`.

    For a linear SDE with kernel `p_0t(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)`,
    `E[alpha_t x_0 | x_t] = x_t + sigma_t^2 grad log p_t(x_t)` (Efron 2011, Eq. 2.8,
    applied to `y = alpha_t x_0`), so `E[x_0 | x_t] = (x_t + sigma_t^2 s(t, x_t)) /
    alpha_t`. This is the mean of the denoising distribution `q(x | x_eps)` of Song et
    al. (2021, Appendix B); with the model score `s` in place of the true one.

    **Arguments:**

    - `flow`: the [`scoreflow_eqx.ScoreFlow`][].
    - `t`: the time of `x`.
    - `x`: one noisy example.

    **Returns:** the denoised example (one score evaluation).

    ??? cite "Reference"

        ```bibtex
        @article{efron2011tweedie,
            title={Tweedie's Formula and Selection Bias},
            author={Efron, Bradley},
            journal={Journal of the American Statistical Association},
            volume={106}, number={496}, pages={1602--1614},
            year={2011}
        }
        @inproceedings{song2021maximum,
            title={Maximum Likelihood Training of Score-Based Diffusion Models},
            author={Song, Yang and Durkan, Conor and Murray, Iain and Ermon, Stefano},
            booktitle={NeurIPS},
            year={2021}
        }
        ```
    """
    alpha, sigma = flow.sde.marginal(t)
    # sigma^2 s = sigma * (sigma s): `scaled_score` avoids dividing by a tiny sigma.
    return (x + sigma * flow.scaled_score(t, x)) / alpha
