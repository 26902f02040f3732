import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Same structure and all leaves close."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    return all(
        np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def gaussian_mixture_2d():
    """A fixed, asymmetric 2-D mixture used across tests."""
    import scoreflow_eqx as sf

    return sf.GaussianMixture(
        weights=jnp.array([0.3, 0.7]),
        means=jnp.array([[-1.0, 0.5], [0.8, -0.4]]),
        stds=jnp.array([[0.3, 0.5], [0.4, 0.2]]),
    )
