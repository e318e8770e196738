"""Shared pieces of the plots: input checks, layer labels and ticks, colours, and the heatmap
drawing primitives (:func:`draw_heatmap`, :func:`add_colorbar`) that both the heatmaps
(:mod:`hf_cka.plotting`) and the drift plot (:mod:`hf_cka.plot_trends`) use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colorbar import Colorbar
from matplotlib.colors import Colormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.transforms import Bbox

from hf_cka.errors import InvalidInputError, ShapeMismatchError
from hf_cka.layers import display_name

NAN_COLOR = "#b4b4b4"
"""Colour of undefined (NaN) cells, e.g. CKA against a constant layer."""

MAX_LABEL_CHARS = 22


def as_array(data: Any, name: str) -> np.ndarray:
    """Convert a tensor, array or (nested) list of them to a float64 numpy array."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().double().numpy()
    if isinstance(data, (list, tuple)):
        data = [as_array(item, name) for item in data]
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(
            f"{name} must be numeric (a tensor, a numpy array or a rectangular nested list); "
            f"got {type(data).__name__} that numpy cannot read as float64 ({err})."
        ) from err


def as_matrix(data: Any, name: str) -> np.ndarray:
    """Convert ``data`` to a non-empty 2-D float64 array."""
    matrix = as_array(data, name)
    if matrix.ndim != 2 or matrix.size == 0:
        raise InvalidInputError(
            f"{name} must be a non-empty 2-D matrix (layers x layers); got shape {matrix.shape}."
        )
    return matrix


def short_labels(names: Sequence[Any], sep: str = ".", keep: int = 2) -> list[str]:
    """Shorten names to their shortest unique suffix of at least ``keep`` ``sep``-components.

    ``'encoder.layer.11'`` becomes ``'layer.11'`` unless that would make two labels equal; labels
    still longer than 22 characters keep their end behind an ellipsis.
    """
    names = [readable(name) for name in names]
    parts = [str(name).split(sep) for name in names]
    longest = max((len(p) for p in parts), default=0)
    for k in range(keep, longest + 1):
        labels = [sep.join(p[-k:]) for p in parts]
        if len(set(labels)) == len(set(map(str, names))):
            break
    else:
        labels = [str(name) for name in names]
    return [
        "…" + label[-(MAX_LABEL_CHARS - 1) :] if len(label) > MAX_LABEL_CHARS else label
        for label in labels
    ]


def readable(name: Any) -> Any:
    """Layer specs read as :func:`hf_cka.layers.display_name` says; other labels stay as given."""
    return display_name(name) if isinstance(name, str) else name


def tick_positions(n: int, max_ticks: int) -> list[int]:
    """Evenly spaced tick indices over ``range(n)``: at most ``max_ticks``, first and last kept."""
    if max_ticks < 2:
        raise InvalidInputError(f"max_ticks must be at least 2 (first and last); got {max_ticks}.")
    if n <= max_ticks:
        return list(range(n))
    step = math.ceil((n - 1) / (max_ticks - 1))
    ticks = list(range(0, n, step))
    gap = n - 1 - ticks[-1]
    if 0 < gap <= step / 2:  # too close to the last regular tick: move that one to the end
        ticks[-1] = n - 1
    elif gap:
        ticks.append(n - 1)
    return ticks


def layer_labels(
    layers: Sequence[Any] | None, n: int, what: str, sep: str = ".", keep: int = 2
) -> list[str]:
    """Tick labels for ``n`` entries: shortened names, or indices when ``layers`` is None."""
    if layers is None:
        return [str(i) for i in range(n)]
    layers = list(layers)
    if len(layers) != n:
        raise InvalidInputError(f"{what} has {len(layers)} names but the data has {n} entries.")
    return short_labels(layers, sep, keep)


def root_figure(ax: Axes) -> Figure:
    """The top-level figure ``ax`` is drawn in (also for axes inside a subfigure)."""
    fig = ax.get_figure(root=True)
    if not isinstance(fig, Figure):
        raise InvalidInputError("expected axes that belong to a figure, got axes without one")
    return fig


def set_ticks(ax: Axes, axis: Literal["x", "y"], labels: Sequence[str], max_ticks: int) -> None:
    """Put thinned tick labels on the x or y axis; x labels are slanted when they are long."""
    ticks = tick_positions(len(labels), max_ticks)
    shown = [labels[i] for i in ticks]
    fontsize = 9 if len(ticks) > 12 else 10
    if axis == "x":
        slanted = max(len(label) for label in shown) > 3
        ax.set_xticks(ticks, shown, fontsize=fontsize)
        if slanted:
            ax.tick_params(axis="x", labelrotation=45)
            for text in ax.get_xticklabels():
                text.set_horizontalalignment("right")
                text.set_rotation_mode("anchor")
    else:
        ax.set_yticks(ticks, shown, fontsize=fontsize)
    ax.tick_params(axis=axis, which="minor", length=0)


def colorbar_extend(data: np.ndarray, vmin: float, vmax: float) -> str:
    """Colour-bar ``extend`` value telling whether finite data leave ``[vmin, vmax]``."""
    finite = data[np.isfinite(data)]
    slack = 1e-9 * (vmax - vmin)  # a self-comparison's 1.0000000000000002 is not "over"
    low = finite.size > 0 and finite.min() < vmin - slack
    high = finite.size > 0 and finite.max() > vmax + slack
    if low and high:
        return "both"
    return "min" if low else "max" if high else "neither"


def colormap(cmap: str | Colormap) -> Colormap:
    """A copy of ``cmap`` whose NaN ("bad") colour is :data:`NAN_COLOR`."""
    base = cmap if isinstance(cmap, Colormap) else colormaps[cmap]
    return base.with_extremes(bad=NAN_COLOR)


def heatmap_figsize(
    shape: tuple[int, int], annot: bool, with_stderr: bool, xlabel: str, ylabel: str, title: str
) -> tuple[float, float]:
    """Default figure size in inches.

    Cells are wide enough for their annotation with at most ~10 inches of cells, the axes are long
    enough for their labels (about 0.085 inch per character) and square matrices get square axes;
    2.6 x 1.8 inches are left for tick labels, colour bar and title.
    """
    nrows, ncols = shape
    cell = 0.85 if (annot and with_stderr) else 0.5 if annot else 0.35
    cell = min(cell, 10.0 / max(nrows, ncols))
    width = max(ncols * cell, 0.085 * len(xlabel), 0.1 * len(title) - 2.0, 1.9)
    height = max(nrows * cell, 0.085 * len(ylabel), 1.7)
    if nrows == ncols:
        width = height = max(width, height)
    return width + 2.6, height + 1.8


def annotate(
    ax: Axes,
    image: AxesImage,
    matrix: np.ndarray,
    visible: np.ndarray,
    stderr: np.ndarray | None,
    fmt: str,
) -> None:
    """Write each visible cell's value (``"0.93±0.02"`` with ``stderr``) in a contrasting colour.

    The font shrinks with the cell size so that the longest text fits its cell.
    """

    def text_of(i: int, j: int) -> str:
        if np.isnan(matrix[i, j]):
            return "nan"
        value = f"{matrix[i, j]:{fmt}}"
        if stderr is None or not np.isfinite(stderr[i, j]):
            return value
        return f"{value}±{stderr[i, j]:{fmt}}"

    texts = {(i, j): text_of(i, j) for i, j in np.argwhere(visible)}
    fig = root_figure(ax)
    box = ax.get_position()
    width_pt, height_pt = box.width * fig.get_figwidth() * 72, box.height * fig.get_figheight() * 72
    nrows, ncols = matrix.shape
    cell_w, cell_h = width_pt / ncols, height_pt / nrows
    if ax.get_aspect() == 1.0:
        cell_w = cell_h = min(cell_w, cell_h)
    longest = max((len(t) for t in texts.values()), default=1)
    fontsize = float(np.clip(min(0.85 * cell_w / (0.6 * longest), 0.55 * cell_h), 3.0, 10.0))
    for (i, j), text in texts.items():
        value = matrix[i, j]
        r, g, b = to_rgb(NAN_COLOR) if np.isnan(value) else image.cmap(image.norm(value))[:3]
        color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)


@dataclass(frozen=True)
class HeatmapStyle:
    """How :func:`draw_heatmap` colours, masks, annotates and labels a matrix.

    Values outside ``[vmin, vmax]`` saturate the colour map ``cmap``; ``mask_upper`` hides the
    strict upper triangle; ``annot`` writes each value with ``annot_fmt``; at most ``max_ticks``
    tick labels per axis.

    Raises:
        InvalidInputError: ``vmin`` is not smaller than ``vmax``.
    """

    cmap: str | Colormap = "magma"
    vmin: float = 0.0
    vmax: float = 1.0
    mask_upper: bool = False
    annot: bool = False
    annot_fmt: str = ".2f"
    max_ticks: int = 24

    def __post_init__(self) -> None:
        if not self.vmin < self.vmax:
            raise InvalidInputError(
                f"vmin must be smaller than vmax; got vmin={self.vmin}, vmax={self.vmax}."
            )


def draw_heatmap(
    ax: Axes,
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    style: HeatmapStyle,
    stderr: np.ndarray | None = None,
) -> AxesImage:
    """Draw ``matrix`` on ``ax`` in ``style`` with row 0 at the bottom; return the image artist.

    Masked cells (``style.mask_upper``) are transparent, NaN cells grey. The image's array is a
    masked array whose mask is the strict upper triangle (plus NaN cells).
    """
    nrows, ncols = matrix.shape
    hidden = np.zeros(matrix.shape, dtype=bool)
    if style.mask_upper:
        if nrows != ncols:
            raise InvalidInputError(
                f"mask_upper=True needs a square (self-comparison) matrix; got {nrows}x{ncols}."
            )
        hidden = np.triu(np.ones(matrix.shape, dtype=bool), k=1)
    if stderr is not None and stderr.shape != matrix.shape:
        raise ShapeMismatchError(
            f"stderr must have the matrix's shape {matrix.shape}; got {stderr.shape}."
        )
    image = ax.imshow(
        np.ma.masked_array(matrix, mask=hidden | np.isnan(matrix)),
        cmap=colormap(style.cmap),
        vmin=style.vmin,
        vmax=style.vmax,
        origin="lower",
        interpolation="nearest",
        aspect="equal" if nrows == ncols else "auto",
        alpha=np.where(hidden, 0.0, 1.0) if style.mask_upper else None,
    )
    set_ticks(ax, "y", row_labels, style.max_ticks)
    set_ticks(ax, "x", col_labels, style.max_ticks)
    if style.annot:
        annotate(ax, image, matrix, ~hidden, stderr, style.annot_fmt)
    return image


def add_colorbar(
    fig: Figure,
    image: AxesImage,
    ax: Axes | Sequence[Axes],
    data: np.ndarray,
    label: str = "CKA",
) -> Colorbar:
    """Add a colour bar about 0.2 inch thick labelled ``label``, as tall as the axes it serves.

    A single Axes gets an inset bar that follows the drawn (aspect-adjusted) heatmap; several get
    one bar beside all of them. The bar has arrows when ``data`` leave the colour range.
    """
    extend = colorbar_extend(data, *image.get_clim())
    parents = [ax] if isinstance(ax, Axes) else list(ax)
    box = Bbox.union([a.get_position() for a in parents])
    width_in, height_in = box.width * fig.get_figwidth(), box.height * fig.get_figheight()
    if isinstance(ax, Axes):
        cax = ax.inset_axes((1.0 + 0.15 / width_in, 0.0, 0.2 / width_in, 1.0))
        colorbar = fig.colorbar(image, cax=cax, extend=extend)
    else:
        colorbar = fig.colorbar(image, ax=parents, extend=extend, aspect=max(height_in / 0.2, 10))
    colorbar.set_label(label)
    return colorbar
