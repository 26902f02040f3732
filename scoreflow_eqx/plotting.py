"""Saving samples as images with matplotlib (no torchvision). Figures are drawn on their
own Agg canvas, without pyplot, so the user's matplotlib backend is never switched."""

import math
import os

import numpy as np
from jaxtyping import ArrayLike


def make_image_grid(
    samples: ArrayLike,
    *,
    nrow: int | None = None,
    padding: int = 2,
    data_range: tuple[float, float] = (-1.0, 1.0),
    pad_value: float = 1.0,
) -> np.ndarray:
    """Tile a batch of images into one image with values in `[0, 1]`.

    **Arguments:**

    - `samples`: shape `(N, C, H, W)` with `C` in `{1, 3}` (channel first, as the nets).
    - `nrow`: images per row; defaults to `ceil(sqrt(N))`.
    - `padding`: pixels between (and around) the images.
    - `data_range`: `(low, high)`: values are clipped to it and mapped to `[0, 1]`.
    - `pad_value`: the colour of the padding, in `[0, 1]`.

    **Returns:** a float array of shape `(rows (H + p) + p, nrow (W + p) + p)` for `C =
    1` or with a trailing axis of size 3 for `C = 3` (`p = padding`).
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"`samples` must have shape (N, C, H, W) with C in {{1, 3}}, got {x.shape}."
        )
    low, high = (float(v) for v in data_range)
    if not high > low:
        raise ValueError(f"Need `data_range=(low, high)` with high > low, got {data_range}.")
    n, c, h, w = x.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    if nrow < 1:
        raise ValueError(f"`nrow` must be >= 1, got {nrow}.")
    ncol_rows = math.ceil(n / nrow)
    x = (np.clip(x, low, high) - low) / (high - low)
    x = np.nan_to_num(x, nan=0.0)
    p = int(padding)
    # Each tile carries its padding on the top and left; one more strip closes the grid.
    tiles = np.full((ncol_rows * nrow, c, h + p, w + p), pad_value, dtype=np.float64)
    tiles[:n, :, p:, p:] = x
    grid = tiles.reshape(ncol_rows, nrow, c, h + p, w + p).transpose(2, 0, 3, 1, 4)
    grid = grid.reshape(c, ncol_rows * (h + p), nrow * (w + p))
    grid = np.pad(grid, ((0, 0), (0, p), (0, p)), constant_values=pad_value)
    return grid[0] if c == 1 else np.moveaxis(grid, 0, -1)


def save_image_grid(
    samples: ArrayLike,
    path: str | os.PathLike,
    *,
    nrow: int | None = None,
    padding: int = 2,
    data_range: tuple[float, float] = (-1.0, 1.0),
    pad_value: float = 1.0,
    scale: int = 1,
) -> None:
    """Save a batch of images `(N, C, H, W)` as one PNG grid, pixel for pixel.

    The PNG is `scale` times the size of [`scoreflow_eqx.plotting.make_image_grid`][]'s
    output (nearest-neighbour upscaling); grey-scale images use the `gray` colour map.

    **Arguments:**

    - `samples`, `nrow`, `padding`, `data_range`, `pad_value`: as for `make_image_grid`.
    - `path`: where to write the PNG (parent directories are created).
    - `scale`: integer upscaling factor (small images such as 8x8 digits benefit).
    """
    grid = make_image_grid(
        samples, nrow=nrow, padding=padding, data_range=data_range, pad_value=pad_value
    )
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"`scale` must be >= 1, got {scale}.")
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    import matplotlib.image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if grid.ndim == 2:
        matplotlib.image.imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    else:
        matplotlib.image.imsave(path, grid, format="png")


def scatter_2d(
    samples: ArrayLike,
    path: str | os.PathLike,
    *,
    reference: ArrayLike | None = None,
    title: str | None = None,
    lim: float | None = None,
    size: float = 4.0,
) -> None:
    """Scatter plot of 2-D samples `(N, 2)`, optionally over reference samples (e.g. the
    true distribution), saved as a PNG.

    **Arguments:**

    - `samples`: shape `(N, 2)`.
    - `path`: the PNG file to write.
    - `reference`: optional `(M, 2)` samples drawn in grey underneath.
    - `title`: optional plot title.
    - `lim`: optional half-width of the square axes.
    - `size`: figure size in inches.
    """
    x = np.asarray(samples)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"`samples` must have shape (N, 2), got {x.shape}.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if reference is not None:
        ref = np.asarray(reference)
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", label="reference")
    ax.scatter(x[:, 0], x[:, 1], s=2, c="C0", label="samples")
    if reference is not None:
        ax.legend(loc="upper right", markerscale=4)
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def save_image_grids(
    panels: dict[str, ArrayLike],
    path: str | os.PathLike,
    *,
    data_range: tuple[float, float] = (-1.0, 1.0),
    nrow: int | None = None,
    panel_size: float = 3.0,
) -> None:
    """Save several batches of images `(N, C, H, W)` side by side, one titled grid per
    entry of `panels` (e.g. the samples of several samplers), as one PNG.

    **Arguments:**

    - `panels`: title -> images.
    - `path`: the PNG file to write.
    - `data_range`, `nrow`: as for [`scoreflow_eqx.plotting.make_image_grid`][].
    - `panel_size`: the size of each panel in inches.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("`panels` is empty.")
    fig = Figure(figsize=(panel_size * len(panels), panel_size + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, images) in zip(axes, panels.items()):
        grid = make_image_grid(images, nrow=nrow, data_range=data_range)
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0,
                  interpolation="nearest")  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
