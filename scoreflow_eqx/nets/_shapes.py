import jax


def check_shape(x: jax.Array, expected: tuple[int, ...], name: str) -> None:
    """Raise a clear error (at trace time) when one example has the wrong shape."""
    if tuple(x.shape) != tuple(expected):
        hint = ""
        if x.ndim == len(expected) + 1 and tuple(x.shape[1:]) == tuple(expected):
            hint = " It looks batched: nets act on one example; use `jax.vmap`."
        raise ValueError(
            f"{name} expects one example of shape {tuple(expected)}, "
            f"got an input of shape {tuple(x.shape)}.{hint}"
        )
