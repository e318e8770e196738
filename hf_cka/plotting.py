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
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from hf_cka.errors import InvalidInputError
from hf_cka.plot_style import (
    HeatmapStyle,
    add_colorbar,
    as_array,
    as_matrix,
    draw_heatmap,
    heatmap_figsize,
    layer_labels,
    root_figure,
)
from hf_cka.plot_trends import plot_cka_trend, plot_drift

__all__ = ["plot_cka_comparison", "plot_cka_heatmap", "plot_cka_trend", "plot_drift"]


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
    colorbar_label: str = "CKA",
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
        colorbar: Add a colour bar labelled ``colorbar_label``.
        colorbar_label: The colour bar's label: the measure drawn (``"mutual k-NN"``...).

    Returns:
        The figure and the axes holding the heatmap.
    """
    data = as_matrix(matrix, "matrix")
    errors = None if stderr is None else as_array(stderr, "stderr")
    style = HeatmapStyle(cmap, vmin, vmax, mask_upper, annot, annot_fmt, max_ticks)
    ylabel, xlabel = f"{model1_name or 'Model 1'} layers", f"{model2_name or 'Model 2'} layers"
    if title is None and (model1_name or model2_name):
        title = f"{model1_name or 'Model 1'} vs {model2_name or 'Model 2'}"
    if ax is None:
        shape = data.shape
        size = figsize or heatmap_figsize(
            shape, annot, errors is not None, xlabel, ylabel, title or ""
        )
        fig, ax = plt.subplots(figsize=size, layout="compressed")
    else:
        fig = root_figure(ax)
    rows = layer_labels(layers1, data.shape[0], "layers1")
    columns = layer_labels(layers2, data.shape[1], "layers2")
    image = draw_heatmap(ax, data, rows, columns, style, errors)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    if colorbar:
        add_colorbar(fig, image, ax, data, colorbar_label)
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
        panels = [as_matrix(m, f"matrices[{i}]") for i, m in enumerate(matrices)]
    else:
        stacked = as_array(matrices, "matrices")
        if stacked.ndim != 3:
            raise InvalidInputError(
                "matrices must be a list of 2-D matrices or a 3-D array; "
                f"got shape {stacked.shape}."
            )
        panels = [as_matrix(m, f"matrices[{i}]") for i, m in enumerate(stacked)]
    if not panels:
        raise InvalidInputError("matrices is empty: nothing to plot.")
    if titles is not None and len(titles) != len(panels):
        raise InvalidInputError(f"Got {len(titles)} titles for {len(panels)} matrices.")
    style = HeatmapStyle(cmap, vmin, vmax, mask_upper, annot, max_ticks=max_ticks)
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
            draw_heatmap(
                ax,
                data,
                layer_labels(layers, data.shape[0], "layers"),
                layer_labels(layers2 if layers2 is not None else layers, data.shape[1], "layers2"),
                style,
            )
        )
        if titles is not None:
            ax.set_title(titles[k])
        if k % ncols == 0:
            ax.set_ylabel(ylabel or "Layers")
        if k + ncols >= len(panels):
            ax.set_xlabel(xlabel or "Layers")
        if not share_colorbar:
            add_colorbar(fig, images[-1], ax, data)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    used = axes[: len(panels)]
    if share_colorbar:
        add_colorbar(fig, images[0], list(used), np.concatenate([p.ravel() for p in panels]))
    return fig, used
