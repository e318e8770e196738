"""Tests of hf_cka.plotting: every plot renders a non-trivial PNG and shows the right things."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hf_cka.errors import InvalidInputError, ShapeMismatchError  # noqa: E402
from hf_cka.plot_style import NAN_COLOR, short_labels, tick_positions  # noqa: E402
from hf_cka.plotting import (  # noqa: E402
    plot_cka_comparison,
    plot_cka_heatmap,
    plot_cka_trend,
    plot_drift,
)

BERT = ["embeddings"] + [f"encoder.layer.{i}" for i in range(12)]
GPT2 = ["transformer.wte"] + [f"transformer.h.{i}" for i in range(6)]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _self_cka(n: int, scale: float = 4.0, seed: int = 0) -> np.ndarray:
    """A plausible symmetric CKA matrix: 1 on the diagonal, decaying with layer distance."""
    i = np.arange(n)
    noise = 0.02 * np.random.default_rng(seed).standard_normal((n, n))
    m = 0.2 + 0.8 * np.exp(-np.abs(i[:, None] - i[None]) / scale) + (noise + noise.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def _assert_png(fig: Figure, path) -> None:
    """Save ``fig`` and check the image exists and is not blank or a single colour."""
    fig.savefig(path, dpi=40)
    assert path.exists()
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.std() > 0.05
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def _texts(ax: Axes) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_heatmap_renders_with_names_and_orientation(tmp_path):
    matrix = _self_cka(13)[:, :7]
    fig, ax = plot_cka_heatmap(matrix, BERT, GPT2, "bert-base", "gpt2", annot=True)
    assert isinstance(fig, Figure) and isinstance(ax, Axes)
    _assert_png(fig, tmp_path / "cross.png")
    assert "bert-base" in ax.get_ylabel() and "gpt2" in ax.get_xlabel()
    assert ax.get_title() == "bert-base vs gpt2"
    image = ax.get_images()[0]
    np.testing.assert_allclose(image.get_array(), matrix)
    assert image.origin == "lower"  # first layer at the bottom
    assert ax.get_ylim()[0] < ax.get_ylim()[1]
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["embeddings", "layer.0"]
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "h.5"
    assert len(ax.texts) == 13 * 7
    assert image.colorbar is not None and image.colorbar.ax.get_ylabel() == "CKA"


def test_heatmap_default_labels_without_names():
    fig, ax = plot_cka_heatmap(np.eye(3))
    assert ax.get_ylabel() == "Model 1 layers" and ax.get_xlabel() == "Model 2 layers"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]


@pytest.mark.parametrize("max_ticks", [24, 10])
def test_heatmap_thins_ticks_for_40_layers(tmp_path, max_ticks):
    names = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(39)]
    fig, ax = plot_cka_heatmap(_self_cka(40, 8.0), names, names, "A", "B", max_ticks=max_ticks)
    _assert_png(fig, tmp_path / "big.png")
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        texts = [t.get_text() for t in labels]
        assert 2 <= len(texts) <= max_ticks
        assert texts[0] == "model.embed_tokens" and texts[-1] == "layers.38"
    assert ax.get_xticks()[-1] == 39 and ax.get_yticks()[0] == 0


def test_heatmap_mask_upper_masks_exactly_the_strict_upper_triangle(tmp_path):
    n = 13
    fig, ax = plot_cka_heatmap(_self_cka(n), BERT, BERT, mask_upper=True, annot=True)
    _assert_png(fig, tmp_path / "masked.png")
    mask = np.ma.getmaskarray(ax.get_images()[0].get_array())
    np.testing.assert_array_equal(mask, np.triu(np.ones((n, n), dtype=bool), k=1))
    assert len(ax.texts) == n * (n + 1) // 2


def test_heatmap_mask_upper_needs_a_square_matrix():
    with pytest.raises(InvalidInputError, match="square"):
        plot_cka_heatmap(np.zeros((3, 4)), mask_upper=True)


@pytest.mark.parametrize("plot", [plot_cka_heatmap, plot_cka_comparison])
def test_an_empty_colour_range_is_refused_before_any_figure_is_made(plot):
    before = plt.get_fignums()
    with pytest.raises(InvalidInputError, match="vmin must be smaller than vmax"):
        plot(
            [[0.5, 0.2], [0.2, 0.5]] if plot is plot_cka_heatmap else [np.eye(2)],
            vmin=1.0,
            vmax=1.0,
        )
    assert plt.get_fignums() == before


def test_heatmap_nan_cells_are_grey_and_annotated(tmp_path):
    matrix = _self_cka(5)
    matrix[2, :] = np.nan  # a constant layer: CKA undefined
    fig, ax = plot_cka_heatmap(matrix, annot=True)
    _assert_png(fig, tmp_path / "nan.png")
    assert _texts(ax).count("nan") == 5
    image = ax.get_images()[0]
    assert image.cmap.get_bad() == pytest.approx(to_rgba(NAN_COLOR))
    assert image.colorbar.extend == "neither"


def test_heatmap_shows_real_values_outside_the_colour_range():
    matrix = np.array([[1.0, -0.012], [1.03, 0.5]])
    fig, ax = plot_cka_heatmap(matrix, annot=True)
    assert "-0.01" in _texts(ax) and "1.03" in _texts(ax)
    image = ax.get_images()[0]
    assert image.colorbar.extend == "both"
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)


def test_heatmap_annotates_stderr():
    matrix = np.array([[0.931, 0.5], [0.25, 1.0]])
    stderr = np.array([[0.021, 0.01], [0.0, 0.003]])
    fig, ax = plot_cka_heatmap(matrix, annot=True, stderr=stderr)
    assert "0.93±0.02" in _texts(ax)
    with pytest.raises(ShapeMismatchError):
        plot_cka_heatmap(matrix, annot=True, stderr=np.zeros((3, 2)))


def test_heatmap_annotation_colour_contrasts_with_the_cell():
    fig, ax = plot_cka_heatmap(np.array([[0.0, 1.0]]), annot=True, cmap="magma")
    dark, light = ax.texts  # magma is black at 0 and pale yellow at 1
    assert dark.get_color() == "white" and light.get_color() == "black"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_heatmap_accepts_low_precision_tensors(dtype):
    matrix = torch.tensor(_self_cka(4), dtype=dtype, requires_grad=dtype != torch.bfloat16)
    fig, ax = plot_cka_heatmap(matrix)
    drawn = ax.get_images()[0].get_array()
    np.testing.assert_allclose(drawn, matrix.detach().double().numpy())


def test_heatmap_accepts_nested_lists_and_rejects_ragged_ones():
    fig, ax = plot_cka_heatmap([[1.0, 0.5], [0.5, 1.0]], ax=plt.subplots()[1], colorbar=False)
    assert ax.get_images()[0].get_array().shape == (2, 2)
    assert ax.get_images()[0].colorbar is None
    with pytest.raises(InvalidInputError):
        plot_cka_heatmap([[1.0, 0.5], [0.5]])
    with pytest.raises(InvalidInputError, match="2-D"):
        plot_cka_heatmap([1.0, 0.5])


def test_heatmap_rejects_wrong_number_of_layer_names():
    with pytest.raises(InvalidInputError, match="layers1 has 2 names"):
        plot_cka_heatmap(np.eye(3), layers1=["a", "b"])


def test_short_labels_keep_the_end_and_stay_unique():
    assert short_labels(["embeddings", "encoder.layer.11"]) == ["embeddings", "layer.11"]
    # the embedding output as default_layers records it reads as layers.display_name says
    assert short_labels(["encoder.layer.0:input", "encoder.layer.0"]) == ["embeddings", "layer.0"]
    clash = ["encoder.layer.0.output", "decoder.layer.0.output"]
    assert short_labels(clash) == ["encoder.layer.0.output", "decoder.layer.0.output"]
    assert short_labels(["a.b.c.d", "a.x.c.d"]) == ["b.c.d", "x.c.d"]
    long = short_labels(["x." + "y" * 40])[0]
    assert long.startswith("…") and len(long) == 22 and long.endswith("y")


@pytest.mark.parametrize("max_ticks", [2, 5, 24])
def test_tick_positions_are_thinned_and_keep_both_ends(max_ticks):
    for n in range(1, 120):
        ticks = tick_positions(n, max_ticks)
        assert len(ticks) <= max_ticks and ticks == sorted(set(ticks))
        assert ticks[0] == 0 and ticks[-1] == n - 1
        if n <= max_ticks:
            assert ticks == list(range(n))


def test_trend_single_curve(tmp_path):
    diagonal = torch.linspace(1.0, 0.5, 13, dtype=torch.bfloat16)
    fig, ax = plot_cka_trend(diagonal, labels=["Self-similarity"], xticklabels=BERT)
    assert isinstance(fig, Figure) and isinstance(ax, Axes)
    _assert_png(fig, tmp_path / "trend.png")
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), diagonal.double().numpy())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Self-similarity"]
    assert ax.get_ylim() == (0.0, 1.05)
    assert ax.get_xlabel() == "Layer" and ax.get_ylabel() == "CKA Score"
    assert ax.get_xticklabels()[-1].get_text() == "layer.11"


def test_trend_multiple_curves_with_stderr_band(tmp_path):
    values = np.stack([np.linspace(1.0, end, 13) for end in (0.8, 0.5, 0.05)])
    stderr = np.full_like(values, 0.05)
    fig, ax = plot_cka_trend(values, labels=["a", "b", "c"], stderr=stderr, title="drift")
    _assert_png(fig, tmp_path / "trend_multi.png")
    assert len(ax.get_lines()) == 3 and len(ax.collections) == 3
    band = ax.collections[2].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.05 - 1.96 * 0.05)
    assert ax.get_ylim()[0] < 0.0  # widened to show the band below 0
    assert ax.get_title() == "drift"


def test_trend_accepts_ragged_lists_without_legend():
    fig, ax = plot_cka_trend([[1.0, 0.9, 0.8], [1.0, 0.7]])
    assert [len(line.get_ydata()) for line in ax.get_lines()] == [3, 2]
    assert ax.get_legend() is None


def test_trend_extends_ylim_below_zero():
    fig, ax = plot_cka_trend([0.5, -0.2, 0.1])
    assert ax.get_ylim()[0] < -0.2


def test_trend_rejects_mismatched_labels_and_stderr():
    with pytest.raises(InvalidInputError, match="2 labels for 1 curves"):
        plot_cka_trend([1.0, 0.5], labels=["a", "b"])
    with pytest.raises(ShapeMismatchError):
        plot_cka_trend([1.0, 0.5], stderr=[0.1, 0.1, 0.1])


@pytest.mark.parametrize("share", [True, False])
def test_comparison_grid_colorbars(tmp_path, share):
    matrices = [_self_cka(13, scale) for scale in (8.0, 4.0, 1.5)]
    fig, axes = plot_cka_comparison(
        matrices, titles=["Epoch 1", "Epoch 10", "Epoch 100"], layers=BERT, share_colorbar=share
    )
    assert isinstance(fig, Figure) and isinstance(axes, np.ndarray) and axes.shape == (3,)
    _assert_png(fig, tmp_path / "grid.png")
    colorbars = [im.colorbar for ax in axes for im in ax.get_images() if im.colorbar]
    assert len(colorbars) == (1 if share else 3)
    assert [ax.get_title() for ax in axes] == ["Epoch 1", "Epoch 10", "Epoch 100"]
    assert all(ax.get_images()[0].norm.vmax == 1.0 for ax in axes)


def test_comparison_grid_hides_unused_cells():
    stacked = torch.stack([torch.eye(4)] * 5)
    fig, axes = plot_cka_comparison(stacked, ncols=3)
    assert len(axes) == 5
    hidden = [ax for ax in fig.axes if not ax.get_visible()]
    assert len(hidden) == 1 and hidden[0] not in list(axes)
    assert axes[0].get_ylabel() == "Layers" and axes[1].get_ylabel() == ""
    assert axes[2].get_xlabel() == "Layers"  # nothing below it
    assert axes[0].get_xlabel() == ""


def test_comparison_rejects_bad_input():
    with pytest.raises(InvalidInputError, match="empty"):
        plot_cka_comparison([])
    with pytest.raises(InvalidInputError, match="titles"):
        plot_cka_comparison([np.eye(2)], titles=["a", "b"])


def test_drift_plot(tmp_path):
    checkpoints = ["me/bert@step-100", "me/bert@step-1000", "me/bert@main"]
    similarity = np.stack([1 - (np.arange(13) / 12) ** 2 * a for a in (0.1, 0.4, 0.8)], axis=1)
    fig, axes = plot_drift(
        torch.tensor(similarity),
        BERT,
        checkpoints,
        base_name="bert-base-uncased",
        stderr=np.full_like(similarity, 0.01),
    )
    assert isinstance(fig, Figure) and isinstance(axes, np.ndarray) and len(axes) == 2
    _assert_png(fig, tmp_path / "drift.png")
    assert "bert-base-uncased" in fig.get_suptitle()
    lines, heat = axes
    assert len(lines.get_lines()) == 3
    np.testing.assert_allclose(lines.get_lines()[2].get_ydata(), similarity[:, 2])
    legend = [t.get_text() for t in lines.get_legend().get_texts()]
    assert legend == ["bert@step-100", "bert@step-1000", "bert@main"]
    assert heat.get_images()[0].get_array().shape == (13, 3)
    assert [t.get_text() for t in heat.get_xticklabels()] == legend


def test_drift_rejects_wrong_checkpoint_count():
    with pytest.raises(InvalidInputError, match="checkpoints has 1 names"):
        plot_drift(np.ones((2, 2)), ["a", "b"], ["c1"])
