import equinox as eqx
import jax
import jax.numpy as jnp


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Same structure and all leaves close (`eqx.tree_equal` with tolerances, on host
    copies so that arrays on different devices compare)."""
    return bool(eqx.tree_equal(jax.device_get(x), jax.device_get(y), rtol=rtol, atol=atol))


def gaussian_mixture_2d():
    """A fixed, asymmetric 2-D mixture used across tests."""
    import scoreflow_eqx as sf

    return sf.GaussianMixture(
        weights=jnp.array([0.3, 0.7]),
        means=jnp.array([[-1.0, 0.5], [0.8, -0.4]]),
        stds=jnp.array([[0.3, 0.5], [0.4, 0.2]]),
    )
