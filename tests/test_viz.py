"""gptcourse.viz: the figures draw exactly the data they are given, and bad
shapes are refused with a message that names them."""
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from gptcourse import viz  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------- plot_curves


def test_plot_curves_draws_one_line_per_series_with_its_data():
    x = [1, 2, 4, 8]
    series = {"exact": [1.0, 0.9, 0.5, 0.1], "token": torch.tensor([1.0, 0.95, 0.8, 0.4])}
    ax = viz.plot_curves(x, series, styles={"token": {"fmt": "s--", "color": "tab:red"}},
                         xlabel="digits", ylabel="accuracy", title="t", xscale="log")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["exact", "token"]
    for line, ys in zip(lines, series.values()):
        np.testing.assert_allclose(line.get_xdata(), x)
        np.testing.assert_allclose(line.get_ydata(), np.asarray(ys, dtype=np.float32))
    assert lines[0].get_marker() == "o" and lines[1].get_marker() == "s"
    assert lines[1].get_linestyle() == "--"
    assert matplotlib.colors.same_color(lines[1].get_color(), "tab:red")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("digits", "accuracy", "t")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["exact", "token"]


def test_plot_curves_draws_on_a_given_axes_without_a_legend():
    fig, (left, right) = plt.subplots(1, 2)
    ax = viz.plot_curves(range(3), {"a": [3, 2, 1]}, ax=right, legend=False, styles={"a": ":"})
    assert ax is right and not left.get_lines()
    assert ax.get_legend() is None
    assert ax.get_lines()[0].get_linestyle() == ":"


def test_plot_curves_bad_inputs():
    with pytest.raises(ValueError, match="series 'b' has 2 values, x has 3"):
        viz.plot_curves([1, 2, 3], {"a": [1, 2, 3], "b": [1, 2]})
    with pytest.raises(ValueError, match=re.escape("series 'a' must be 1-D, got shape (3, 1)")):
        viz.plot_curves([1, 2, 3], {"a": torch.ones(3, 1)})
    with pytest.raises(ValueError, match=re.escape("x must be 1-D, got shape (2, 2)")):
        viz.plot_curves(torch.ones(2, 2), {"a": [1, 2]})
    with pytest.raises(ValueError, match="series is empty"):
        viz.plot_curves([1], {})
    with pytest.raises(ValueError, match=re.escape("not in series: ['c']")):
        viz.plot_curves([1], {"a": [1]}, styles={"c": "o-"})
    with pytest.raises(ValueError, match="format string or a dict"):
        viz.plot_curves([1], {"a": [1]}, styles={"a": 3})


# ---------------------------------------------------------------- grouped_bars


def test_grouped_bars_places_each_series_side_by_side():
    series = {"with": [1.0, 1.0, 0.98], "without": [0.17, 0.03, 0.0]}
    ax = viz.grouped_bars([1, 2, 3], series, width=0.8, colors={"without": "tab:red"},
                          xlabel="digits", ylabel="exactly right", title="200 questions",
                          value_format="{:.0%}")
    bars = ax.patches
    assert len(bars) == 6
    heights = [b.get_height() for b in bars]
    np.testing.assert_allclose(heights, [1.0, 1.0, 0.98, 0.17, 0.03, 0.0], rtol=1e-6)
    centers = [b.get_x() + b.get_width() / 2 for b in bars]
    np.testing.assert_allclose(centers, [-0.2, 0.8, 1.8, 0.2, 1.2, 2.2], atol=1e-6)
    assert all(abs(b.get_width() - 0.4) < 1e-6 for b in bars)
    assert matplotlib.colors.same_color(bars[3].get_facecolor(), "tab:red")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert [t.get_text() for t in ax.texts] == ["100%", "100%", "98%", "17%", "3%", "0%"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "digits", "exactly right", "200 questions")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["with", "without"]


def test_grouped_bars_bad_inputs():
    with pytest.raises(ValueError, match="series 'b' has 1 values, there are 2 categories"):
        viz.grouped_bars(["x", "y"], {"a": [1, 2], "b": [1]})
    with pytest.raises(ValueError, match=re.escape("must be 1-D, got shape (2, 2)")):
        viz.grouped_bars(["x", "y"], {"a": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="categories is empty"):
        viz.grouped_bars([], {"a": []})
    with pytest.raises(ValueError, match="series is empty"):
        viz.grouped_bars(["x"], {})
    with pytest.raises(ValueError, match=re.escape("width must be in (0, 1], got 1.5")):
        viz.grouped_bars(["x"], {"a": [1]}, width=1.5)


# ---------------------------------------------------------------- probability_bars


def test_probability_bars_labels_and_heights():
    p = torch.tensor([0.6, 0.25, 0.1, 0.05])
    ax = viz.probability_bars(["e", " ", "\n", "a"], p, title="after 'valu'", highlight=0)
    np.testing.assert_allclose([b.get_height() for b in ax.patches], p.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["e", "␣", "\\n", "a"]
    assert ax.get_title() == "after 'valu'"
    assert ax.get_ylim() == (0.0, 1.0)
    assert matplotlib.colors.same_color(ax.patches[0].get_facecolor(), "tab:blue")
    assert matplotlib.colors.same_color(ax.patches[1].get_facecolor(), "0.7")


def test_probability_bars_bad_inputs():
    with pytest.raises(ValueError, match="2 labels for 3 probabilities"):
        viz.probability_bars(["a", "b"], [0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got min -0.1"):
        viz.probability_bars(["a", "b"], [1.1, -0.1])
    with pytest.raises(ValueError, match=re.escape("probs must be 1-D, got shape (1, 2)")):
        viz.probability_bars(["a", "b"], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="highlight=2 is not the index of one of 2 bars"):
        viz.probability_bars(["a", "b"], [0.5, 0.5], highlight=2)


# ---------------------------------------------------------------- heatmap_grid


def test_heatmap_grid_one_panel_per_matrix():
    w = torch.softmax(torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0)), -1)
    keys, queries = list("abcde"), ["q1", "q2", "q3"]
    fig, axes = viz.heatmap_grid(w, [f"head {i + 1}" for i in range(4)], queries, keys,
                                 ncols=2, suptitle="four heads")
    assert len(axes) == 4 and len(fig.axes) == 4
    for k, ax in enumerate(axes):
        assert ax.get_title() == f"head {k + 1}"
        np.testing.assert_allclose(ax.get_images()[0].get_array().data, w[k].numpy())
    # tick labels and names on the outer panels only: y on the left column,
    # x (on top) in the first row
    assert [[t.get_text() for t in ax.get_xticklabels()] for ax in axes] == [keys, keys, [], []]
    assert [[t.get_text() for t in ax.get_yticklabels()] for ax in axes] == [queries, [], queries, []]
    assert [ax.get_ylabel() for ax in axes] == ["query", "", "query", ""]
    assert [ax.get_xlabel() for ax in axes] == ["key (attended to)"] * 2 + ["", ""]
    assert fig._suptitle.get_text() == "four heads"
    assert not axes[0].texts  # annotate=False by default


def test_heatmap_grid_list_of_matrices_and_a_spare_panel():
    fig, axes = viz.heatmap_grid([torch.eye(2), torch.ones(2, 2) / 2, torch.eye(2)], ncols=2,
                                 annotate=True)
    assert len(axes) == 3
    assert len(fig.axes) == 4 and not fig.axes[3].axison  # the unused fourth panel
    assert len(axes[0].texts) == 4


def test_heatmap_grid_bad_inputs():
    with pytest.raises(ValueError, match=re.escape("(n, T_q, T_k) with n >= 1, got shape (3, 3)")):
        viz.heatmap_grid(torch.eye(3))
    with pytest.raises(ValueError, match=re.escape("one shape, got [(2, 2), (3, 3)]")):
        viz.heatmap_grid([torch.eye(2), torch.eye(3)])
    with pytest.raises(ValueError, match="1 titles for 2 matrices"):
        viz.heatmap_grid(torch.ones(2, 3, 3), titles=["a"])
    with pytest.raises(ValueError, match="ncols must be between 1 and 2, got 3"):
        viz.heatmap_grid(torch.ones(2, 3, 3), ncols=3)
    with pytest.raises(ValueError, match="key_labels has 2 entries, the matrix has 3"):
        viz.heatmap_grid(torch.ones(2, 3, 3), key_labels=["a", "b"])
