"""Line plots of CKA: a trend across layers (:func:`plot_cka_trend`) and the drift of a base
model's layers across checkpoints (:func:`plot_drift`, lines beside a heatmap).

Re-exported by :mod:`hf_cka.plotting`, which documents the conventions of every plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hf_cka.errors import InvalidInputError, ShapeMismatchError
from hf_cka.plot_style import (
    HeatmapStyle,
    add_colorbar,
    as_array,
    as_matrix,
    draw_heatmap,
    layer_labels,
    root_figure,
    set_ticks,
)


def _as_curves(values: Any, name: str) -> list[np.ndarray]:
    """Split one 1-D sequence, a list of 1-D sequences or a 2-D array (rows) into 1-D curves."""
    if isinstance(values, (list, tuple)) and values and np.ndim(as_array(values[0], name)) == 1:
        curves = [as_array(v, name) for v in values]
    else:
        array = as_array(values, name)
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
        fig = root_figure(ax)
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
        set_ticks(ax, "x", layer_labels(xticklabels, length, "xticklabels"), max_ticks)
    else:
        locator = ax.xaxis.get_major_locator()
        if isinstance(locator, MaxNLocator):  # the default AutoLocator: whole layer indices
            locator.set_params(integer=True)
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
    measure_label: str = "CKA",
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
        measure_label: What ``similarity`` measures, for the axis and colour bar labels
            (``"mutual k-NN"`` ...; an ``"RSA ..."`` correlation gets the range -1 to 1).

    Returns:
        The figure and an array of two Axes: the per-checkpoint lines across layers (left) and
        the layers x checkpoints heatmap (right).
    """
    table = as_matrix(similarity, "similarity")
    num_layers, num_checkpoints = table.shape
    names = layer_labels(checkpoints, num_checkpoints, "checkpoints", sep="/", keep=1)
    errors = None if stderr is None else as_matrix(stderr, "stderr")
    if errors is not None and errors.shape != table.shape:
        raise ShapeMismatchError(
            f"stderr must have the shape of similarity {table.shape}; got {errors.shape}."
        )
    layer_names = layer_labels(layers, num_layers, "layers")
    heat_width = max(3.5, min(num_checkpoints * 0.35, 6.0) + 2.0)
    size = figsize or (6.5 + heat_width, max(4.0, min(num_layers * 0.3, 9.0) + 1.8))
    fig, axes = plt.subplots(
        1, 2, figsize=size, layout="constrained", width_ratios=[6.5, heat_width]
    )
    plot_cka_trend(
        table.T,
        labels=names,
        xlabel="Layer",
        ylabel=f"{measure_label} with base (same layer)",
        ax=axes[0],
        xticklabels=layers,
        stderr=None if errors is None else errors.T,
        colors=list(colormaps["viridis"](np.linspace(0.0, 0.9, num_checkpoints))),
        max_ticks=max_ticks,
    )
    low = -1.0 if measure_label.startswith("RSA") else 0.0
    style = HeatmapStyle(cmap, vmin=low, max_ticks=max_ticks)
    image = draw_heatmap(axes[1], table, layer_names, names, style)
    axes[1].set_xlabel("Checkpoint")
    axes[1].set_ylabel("Layer")
    add_colorbar(fig, image, axes[1], table, label=measure_label)
    fig.suptitle(f"Layer drift from {base_name or 'the base model'}")
    return fig, axes
