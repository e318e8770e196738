"""Plots of CKA results: heatmaps, layer trends, comparison grids and checkpoint drift.

Every function takes tensors (any dtype, any device), numpy arrays or nested lists, draws with
matplotlib's object-oriented API and returns the figure with its axes; nothing is ever shown.
Pass ``ax=`` to draw into an existing figure. Values are never clipped: the colour map saturates
outside ``[vmin, vmax]`` (the colour bar then gets an arrow), annotations show the real value and
undefined (NaN) cells are drawn in grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
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

__all__ = ["plot_cka_comparison", "plot_cka_heatmap", "plot_cka_trend", "plot_drift"]

NAN_COLOR = "#b4b4b4"
"""Colour of undefined (NaN) cells, e.g. CKA against a constant layer."""

_MAX_LABEL_CHARS = 22


def _as_array(data: Any, name: str) -> np.ndarray:
    """Convert a tensor, array or (nested) list of them to a float64 numpy array."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().double().numpy()
    if isinstance(data, (list, tuple)):
        data = [_as_array(item, name) for item in data]
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(
            f"{name} must be numeric (a tensor, a numpy array or a rectangular nested list); "
            f"got {type(data).__name__} that numpy cannot read as float64 ({err})."
        ) from err


def _as_matrix(data: Any, name: str) -> np.ndarray:
    """Convert ``data`` to a non-empty 2-D float64 array."""
    matrix = _as_array(data, name)
    if matrix.ndim != 2 or matrix.size == 0:
        raise InvalidInputError(
            f"{name} must be a non-empty 2-D matrix (layers x layers); got shape {matrix.shape}."
        )
    return matrix


def _short_labels(names: Sequence[Any], sep: str = ".", keep: int = 2) -> list[str]:
    """Shorten names to their shortest unique suffix of at least ``keep`` ``sep``-components.

    ``'encoder.layer.11'`` becomes ``'layer.11'`` unless that would make two labels equal; labels
    still longer than 22 characters keep their end behind an ellipsis.
    """
    names = [_readable(name) for name in names]
    parts = [str(name).split(sep) for name in names]
    longest = max((len(p) for p in parts), default=0)
    for k in range(keep, longest + 1):
        labels = [sep.join(p[-k:]) for p in parts]
        if len(set(labels)) == len(set(map(str, names))):
            break
    else:
        labels = [str(name) for name in names]
    return [
        "…" + label[-(_MAX_LABEL_CHARS - 1) :] if len(label) > _MAX_LABEL_CHARS else label
        for label in labels
    ]


def _readable(name: Any) -> Any:
    """Layer specs read as :func:`hf_cka.layers.display_name` says; other labels stay as given."""
    return display_name(name) if isinstance(name, str) else name


def _tick_positions(n: int, max_ticks: int) -> list[int]:
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


def _layer_labels(
    layers: Sequence[Any] | None, n: int, what: str, sep: str = ".", keep: int = 2
) -> list[str]:
    """Tick labels for ``n`` entries: shortened names, or indices when ``layers`` is None."""
    if layers is None:
        return [str(i) for i in range(n)]
    layers = list(layers)
    if len(layers) != n:
        raise InvalidInputError(f"{what} has {len(layers)} names but the data has {n} entries.")
    return _short_labels(layers, sep, keep)


def _set_ticks(ax: Axes, axis: str, labels: Sequence[str], max_ticks: int) -> None:
    """Put thinned tick labels on the x or y axis; x labels are slanted when they are long."""
    ticks = _tick_positions(len(labels), max_ticks)
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


def _extend(data: np.ndarray, vmin: float, vmax: float) -> str:
    """Colour-bar ``extend`` value telling whether finite data leave ``[vmin, vmax]``."""
    finite = data[np.isfinite(data)]
    slack = 1e-9 * (vmax - vmin)  # a self-comparison's 1.0000000000000002 is not "over"
    low = finite.size > 0 and finite.min() < vmin - slack
    high = finite.size > 0 and finite.max() > vmax + slack
    if low and high:
        return "both"
    return "min" if low else "max" if high else "neither"


def _colormap(cmap: str | Colormap) -> Colormap:
    """A copy of ``cmap`` whose NaN ("bad") colour is :data:`NAN_COLOR`."""
    base = cmap if isinstance(cmap, Colormap) else colormaps[cmap]
    return base.with_extremes(bad=NAN_COLOR)


def _heatmap_figsize(
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


def _annotate(
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
    fig = ax.get_figure()
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
        r, g, b = to_rgb(NAN_COLOR if np.isnan(value) else image.cmap(image.norm(value)))
        color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)


def _draw_heatmap(
    ax: Axes,
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cmap: str | Colormap,
    vmin: float,
    vmax: float,
    mask_upper: bool = False,
    annot: bool = False,
    stderr: np.ndarray | None = None,
    annot_fmt: str = ".2f",
    max_ticks: int = 24,
) -> AxesImage:
    """Draw ``matrix`` on ``ax`` with row 0 at the bottom; return the image artist.

    Masked cells (``mask_upper``) are transparent, NaN cells grey. The image's array is a masked
    array whose mask is the strict upper triangle (plus NaN cells).
    """
    if not vmin < vmax:
        raise InvalidInputError(f"vmin must be smaller than vmax; got vmin={vmin}, vmax={vmax}.")
    nrows, ncols = matrix.shape
    hidden = np.zeros(matrix.shape, dtype=bool)
    if mask_upper:
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
        cmap=_colormap(cmap),
        vmin=vmin,
        vmax=vmax,
        origin="lower",
        interpolation="nearest",
        aspect="equal" if nrows == ncols else "auto",
        alpha=np.where(hidden, 0.0, 1.0) if mask_upper else None,
    )
    _set_ticks(ax, "y", row_labels, max_ticks)
    _set_ticks(ax, "x", col_labels, max_ticks)
    if annot:
        _annotate(ax, image, matrix, ~hidden, stderr, annot_fmt)
    return image


def _add_colorbar(
    fig: Figure, image: AxesImage, ax: Axes | Sequence[Axes], data: np.ndarray
) -> Colorbar:
    """Add a colour bar about 0.2 inch thick labelled "CKA", as tall as the axes it serves.

    A single Axes gets an inset bar that follows the drawn (aspect-adjusted) heatmap; several get
    one bar beside all of them. The bar has arrows when ``data`` leave the colour range.
    """
    extend = _extend(data, image.norm.vmin, image.norm.vmax)
    parents = [ax] if isinstance(ax, Axes) else list(ax)
    box = Bbox.union([a.get_position() for a in parents])
    width_in, height_in = box.width * fig.get_figwidth(), box.height * fig.get_figheight()
    if isinstance(ax, Axes):
        cax = ax.inset_axes([1.0 + 0.15 / width_in, 0.0, 0.2 / width_in, 1.0])
        colorbar = fig.colorbar(image, cax=cax, extend=extend)
    else:
        colorbar = fig.colorbar(image, ax=parents, extend=extend, aspect=max(height_in / 0.2, 10))
    colorbar.set_label("CKA")
    return colorbar


def plot_cka_heatmap(
    matrix: Any,
    layers1: Sequence[Any] | None = None,
    layers2: Sequence[Any] | None = None,
    model1_name: str | None = None,
    model2_name: str | None = None,
    annot: bool = False,
    cmap: str | Colormap = "magma",
    mask_upper: bool = False,
    *,
    title: str | None = None,
    ax: Axes | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    stderr: Any = None,
    annot_fmt: str = ".2f",
    max_ticks: int = 24,
    figsize: tuple[float, float] | None = None,
    colorbar: bool = True,
) -> tuple[Figure, Axes]:
    """Heatmap of a CKA matrix: model 1's layers on y (first at the bottom), model 2's on x.

    Args:
        matrix: ``(L1, L2)`` CKA values; ``matrix[i, j] = CKA(layer i of model 1, layer j of
            model 2)``. NaN cells (undefined CKA) are drawn grey.
        layers1: Names of the rows, shortened to their last dotted components; indices if None.
        layers2: Names of the columns; indices if None.
        model1_name: Name for the y label ``"<name> layers"`` (default "Model 1").
        model2_name: Name for the x label (default "Model 2").
        annot: Write each value in its cell (``"nan"`` for NaN; the font shrinks with the cells).
        cmap: Matplotlib colour map (name or instance).
        mask_upper: Hide the strict upper triangle ``matrix[i, j]`` with ``j > i`` (square
            matrices only). With the first layer at the bottom these cells lie below-right of
            the drawn diagonal.
        title: Axes title; by default ``"<model1_name> vs <model2_name>"`` when a name is given,
            ``""`` for none.
        ax: Axes to draw into; a new figure is made if None.
        vmin: Lower end of the colour range; smaller values saturate (never clipped in text).
        vmax: Upper end of the colour range.
        stderr: Standard errors of ``matrix`` (same shape); with ``annot`` cells read
            ``"0.93±0.02"``.
        annot_fmt: Format spec of annotated numbers.
        max_ticks: Most tick labels per axis; first and last layers are always labelled.
        figsize: Size of a new figure; scaled with the number of layers by default.
        colorbar: Add a colour bar labelled "CKA".

    Returns:
        The figure and the axes holding the heatmap.
    """
    data = _as_matrix(matrix, "matrix")
    errors = None if stderr is None else _as_array(stderr, "stderr")
    ylabel, xlabel = f"{model1_name or 'Model 1'} layers", f"{model2_name or 'Model 2'} layers"
    if title is None and (model1_name or model2_name):
        title = f"{model1_name or 'Model 1'} vs {model2_name or 'Model 2'}"
    if ax is None:
        shape = data.shape
        size = figsize or _heatmap_figsize(
            shape, annot, errors is not None, xlabel, ylabel, title or ""
        )
        fig, ax = plt.subplots(figsize=size, layout="compressed")
    else:
        fig = ax.get_figure()
    image = _draw_heatmap(
        ax,
        data,
        _layer_labels(layers1, data.shape[0], "layers1"),
        _layer_labels(layers2, data.shape[1], "layers2"),
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        mask_upper=mask_upper,
        annot=annot,
        stderr=errors,
        annot_fmt=annot_fmt,
        max_ticks=max_ticks,
    )
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    if colorbar:
        _add_colorbar(fig, image, ax, data)
    return fig, ax


def _as_curves(values: Any, name: str) -> list[np.ndarray]:
    """Split one 1-D sequence, a list of 1-D sequences or a 2-D array (rows) into 1-D curves."""
    if isinstance(values, (list, tuple)) and values and np.ndim(_as_array(values[0], name)) == 1:
        curves = [_as_array(v, name) for v in values]
    else:
        array = _as_array(values, name)
        if array.ndim not in (1, 2):
            raise InvalidInputError(
                f"{name} must be one 1-D sequence or several (a list of 1-D sequences or a 2-D "
                f"array with one curve per row); got shape {array.shape}."
            )
        curves = [array] if array.ndim == 1 else list(array)
    if not curves or any(c.ndim != 1 or c.size == 0 for c in curves):
        raise InvalidInputError(f"{name} must hold non-empty 1-D curves.")
    return curves


def plot_cka_trend(
    values: Any,
    labels: str | Sequence[str] | None = None,
    xlabel: str = "Layer",
    ylabel: str = "CKA Score",
    *,
    title: str | None = None,
    ax: Axes | None = None,
    xticklabels: Sequence[Any] | None = None,
    stderr: Any = None,
    marker: str = "o",
    ylim: tuple[float, float] | None = (0, 1.05),
    figsize: tuple[float, float] | None = None,
    colors: Sequence[Any] | None = None,
    max_ticks: int = 24,
) -> tuple[Figure, Axes]:
    """Line plot of CKA values across layers, one line per curve.

    Args:
        values: One 1-D sequence, a list of them, or a 2-D array with one curve per row.
        labels: Legend entry per curve (a single string for a single curve); no legend if None.
        xlabel: X axis label.
        ylabel: Y axis label.
        title: Axes title.
        ax: Axes to draw into; a new figure is made if None.
        xticklabels: Name per x position (e.g. layer names), shortened and thinned to at most
            ``max_ticks`` labels; integer positions if None.
        stderr: Standard errors shaped like ``values``; draws a shaded band
            ``value ± 1.96 * stderr`` (a 95% normal interval) around each line.
        marker: Matplotlib marker of the points.
        ylim: Y range, widened when the data (or bands) leave it; None lets matplotlib choose.
        figsize: Size of a new figure.
        colors: Colour per curve; matplotlib's colour cycle if None.
        max_ticks: Most x tick labels.

    Returns:
        The figure and the axes.
    """
    curves = _as_curves(values, "values")
    errors = None if stderr is None else _as_curves(stderr, "stderr")
    if errors is not None and [e.shape for e in errors] != [c.shape for c in curves]:
        raise ShapeMismatchError(
            f"stderr must be shaped like values: curves of lengths {[c.size for c in curves]}; "
            f"got {[e.size for e in errors]}."
        )
    names = [labels] if isinstance(labels, str) else labels
    if names is not None and len(names) != len(curves):
        raise InvalidInputError(f"Got {len(names)} labels for {len(curves)} curves.")
    if colors is not None and len(colors) != len(curves):
        raise InvalidInputError(f"Got {len(colors)} colors for {len(curves)} curves.")
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize or (7.0, 4.0), layout="constrained")
    else:
        fig = ax.get_figure()
    low, high = np.inf, -np.inf
    for k, curve in enumerate(curves):
        x = np.arange(curve.size)
        (line,) = ax.plot(
            x,
            curve,
            marker=marker,
            markersize=4,
            label=None if names is None else names[k],
            color=None if colors is None else colors[k],
        )
        shown = [curve]
        if errors is not None:
            band = 1.96 * errors[k]
            shown = [curve - band, curve + band]
            ax.fill_between(x, shown[0], shown[1], color=line.get_color(), alpha=0.2, lw=0)
        finite = np.concatenate(shown)[np.isfinite(np.concatenate(shown))]
        if finite.size:
            low, high = min(low, finite.min()), max(high, finite.max())
    length = max(c.size for c in curves)
    if xticklabels is not None:
        _set_ticks(ax, "x", _layer_labels(xticklabels, length, "xticklabels"), max_ticks)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    if ylim is not None:
        margin = 0.05 * (ylim[1] - ylim[0])
        ax.set_ylim(
            ylim[0] if low >= ylim[0] else low - margin,
            ylim[1] if high <= ylim[1] else high + margin,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if names is not None:
        ax.legend(fontsize="small", ncols=1 + (len(curves) - 1) // 8)
    return fig, ax


def _grid_shape(n: int, ncols: int | None) -> tuple[int, int]:
    """Rows and columns of a grid of ``n`` panels (up to 3 in a row, then a near-square grid)."""
    if ncols is None:
        ncols = n if n <= 3 else math.ceil(math.sqrt(n))
    if ncols < 1:
        raise InvalidInputError(f"ncols must be a positive integer; got {ncols}.")
    ncols = min(ncols, n)
    return math.ceil(n / ncols), ncols


def plot_cka_comparison(
    matrices: Any,
    titles: Sequence[str] | None = None,
    layers: Sequence[Any] | None = None,
    share_colorbar: bool = True,
    *,
    cmap: str | Colormap = "magma",
    ncols: int | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    figsize: tuple[float, float] | None = None,
    layers2: Sequence[Any] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    annot: bool = False,
    mask_upper: bool = False,
    max_ticks: int = 24,
) -> tuple[Figure, np.ndarray]:
    """Grid of CKA heatmaps (e.g. one per epoch) drawn on the same colour scale.

    Args:
        matrices: Sequence of 2-D CKA matrices, or a 3-D array/tensor (one matrix per entry).
        titles: Title per panel.
        layers: Row layer names of every panel (also the columns' unless ``layers2`` is given).
        share_colorbar: One colour bar on the right for all panels; else one per panel.
        cmap: Matplotlib colour map.
        ncols: Panels per row; up to 3 in one row by default, then a near-square grid.
        vmin: Lower end of the colour range.
        vmax: Upper end of the colour range.
        figsize: Figure size; by default each panel gets 2.6 to 5 inches of cells (more with
            more layers) plus room for its labels.
        layers2: Column layer names of every panel.
        xlabel: X label of the bottom panel of each column (default "Layers").
        ylabel: Y label of the panels of the first column (default "Layers").
        annot: Write the values in the cells.
        mask_upper: Hide each panel's strict upper triangle.
        max_ticks: Most tick labels per axis.

    Returns:
        The figure and a 1-D array with the Axes of each panel, in the order of ``matrices``
        (unused grid cells are hidden and not returned).
    """
    if isinstance(matrices, (list, tuple)):
        panels = [_as_matrix(m, f"matrices[{i}]") for i, m in enumerate(matrices)]
    else:
        stacked = _as_array(matrices, "matrices")
        if stacked.ndim != 3:
            raise InvalidInputError(
                "matrices must be a list of 2-D matrices or a 3-D array; "
                f"got shape {stacked.shape}."
            )
        panels = [_as_matrix(m, f"matrices[{i}]") for i, m in enumerate(stacked)]
    if not panels:
        raise InvalidInputError("matrices is empty: nothing to plot.")
    if titles is not None and len(titles) != len(panels):
        raise InvalidInputError(f"Got {len(titles)} titles for {len(panels)} matrices.")
    nrows, ncols = _grid_shape(len(panels), ncols)
    cells = float(np.clip(0.26 * max(max(p.shape) for p in panels), 2.6, 5.0))
    default_size = (
        (cells + 1.7) * ncols + (1.0 if share_colorbar else 0.6 * ncols),
        (cells + 1.5) * nrows,
    )
    fig, grid = plt.subplots(
        nrows, ncols, figsize=figsize or default_size, layout="compressed", squeeze=False
    )
    axes = grid.ravel()
    images = []
    for k, (ax, data) in enumerate(zip(axes, panels, strict=False)):
        images.append(
            _draw_heatmap(
                ax,
                data,
                _layer_labels(layers, data.shape[0], "layers"),
                _layer_labels(layers2 if layers2 is not None else layers, data.shape[1], "layers2"),
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                mask_upper=mask_upper,
                annot=annot,
                max_ticks=max_ticks,
            )
        )
        if titles is not None:
            ax.set_title(titles[k])
        if k % ncols == 0:
            ax.set_ylabel(ylabel or "Layers")
        if k + ncols >= len(panels):
            ax.set_xlabel(xlabel or "Layers")
        if not share_colorbar:
            _add_colorbar(fig, images[-1], ax, data)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    used = axes[: len(panels)]
    if share_colorbar:
        _add_colorbar(fig, images[0], list(used), np.concatenate([p.ravel() for p in panels]))
    return fig, used


def plot_drift(
    similarity: Any,
    layers: Sequence[Any],
    checkpoints: Sequence[Any],
    *,
    base_name: str | None = None,
    stderr: Any = None,
    cmap: str | Colormap = "magma",
    figsize: tuple[float, float] | None = None,
    max_ticks: int = 24,
) -> tuple[Figure, np.ndarray]:
    """How far each layer of a base model drifts in each of several checkpoints.

    Args:
        similarity: ``(num_layers, num_checkpoints)`` same-layer CKA:
            ``similarity[l, c] = CKA(layer l of the base, layer l of checkpoint c)``.
        layers: Layer names (rows).
        checkpoints: Checkpoint names (columns), in training order.
        base_name: Name of the base model, used in the title.
        stderr: Standard errors shaped like ``similarity``; shaded ±1.96 stderr bands.
        cmap: Colour map of the heatmap; the lines use evenly spaced colours of viridis so that
            later checkpoints read as later.
        figsize: Figure size.
        max_ticks: Most layer tick labels.

    Returns:
        The figure and an array of two Axes: the per-checkpoint lines across layers (left) and
        the layers x checkpoints heatmap (right).
    """
    table = _as_matrix(similarity, "similarity")
    num_layers, num_checkpoints = table.shape
    names = _layer_labels(checkpoints, num_checkpoints, "checkpoints", sep="/", keep=1)
    errors = None if stderr is None else _as_matrix(stderr, "stderr")
    if errors is not None and errors.shape != table.shape:
        raise ShapeMismatchError(
            f"stderr must have the shape of similarity {table.shape}; got {errors.shape}."
        )
    layer_names = _layer_labels(layers, num_layers, "layers")
    heat_width = max(3.5, min(num_checkpoints * 0.35, 6.0) + 2.0)
    size = figsize or (6.5 + heat_width, max(4.0, min(num_layers * 0.3, 9.0) + 1.8))
    fig, axes = plt.subplots(
        1, 2, figsize=size, layout="constrained", width_ratios=[6.5, heat_width]
    )
    plot_cka_trend(
        table.T,
        labels=names,
        xlabel="Layer",
        ylabel="CKA with base (same layer)",
        ax=axes[0],
        xticklabels=layers,
        stderr=None if errors is None else errors.T,
        colors=list(colormaps["viridis"](np.linspace(0.0, 0.9, num_checkpoints))),
        max_ticks=max_ticks,
    )
    image = _draw_heatmap(
        axes[1],
        table,
        layer_names,
        names,
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        max_ticks=max_ticks,
    )
    axes[1].set_xlabel("Checkpoint")
    axes[1].set_ylabel("Layer")
    _add_colorbar(fig, image, axes[1], table)
    fig.suptitle(f"Layer drift from {base_name or 'the base model'}")
    return fig, axes
