"""Pictures the chapters share: attention heatmaps (one or a grid), loss curves,
several curves over one x, grouped bars, and the probabilities of a few tokens."""
import matplotlib.pyplot as plt
import torch


def _as_matrix(weights):
    w = torch.as_tensor(weights).detach().float().cpu()
    if w.dim() != 2:
        raise ValueError(f"weights must be a (T_q, T_k) matrix, got shape {tuple(w.shape)}")
    return w


def attention_heatmap(weights, query_labels=None, key_labels=None, ax=None, title=None,
                      annotate=None, cmap="Blues", colorbar=True):
    """Heatmap of a (T_q, T_k) attention matrix: one row per query, one column per key.

    Labels name the tokens; annotate prints each weight in its cell (default:
    when the matrix is at most 12 x 12). Returns the matplotlib Axes.
    """
    w = _as_matrix(weights)
    T_q, T_k = w.shape
    for name, labels, n in (("query_labels", query_labels, T_q), ("key_labels", key_labels, T_k)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries, the matrix has {n}")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.6 * T_k), max(3.0, 1.0 + 0.5 * T_q)))
    im = ax.imshow(w.numpy(), cmap=cmap, vmin=0.0, vmax=max(1e-9, float(w.max())), aspect="auto")
    ax.set_xticks(range(T_k), key_labels if key_labels is not None else range(T_k))
    ax.set_yticks(range(T_q), query_labels if query_labels is not None else range(T_q))
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    ax.xaxis.set_label_position("top")
    if annotate is None:
        annotate = T_q <= 12 and T_k <= 12
    if annotate:
        for i in range(T_q):
            for j in range(T_k):
                value = float(w[i, j])
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.6 * float(w.max()) else "black")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_losses(history, ax=None, title="loss"):
    """Training loss per step (faint) and train/val loss at each evaluation."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    if history.step_loss:
        ax.plot(range(1, len(history.step_loss) + 1), history.step_loss, color="0.8",
                lw=0.8, label="train (per step)")
    ax.plot(history.eval_steps, history.train_loss, "o-", label="train (eval)")
    ax.plot(history.eval_steps, history.val_loss, "s-", label="val (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.legend()
    return ax


def _as_vector(values, what):
    v = torch.as_tensor(values).detach().float().cpu()
    if v.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(v.shape)}")
    return v


def _line_style(style):
    """A format string ("o-") or a dict of Line2D keywords (may hold "fmt")."""
    if style is None:
        return "o-", {}
    if isinstance(style, str):
        return style, {}
    if isinstance(style, dict):
        kwargs = dict(style)
        return kwargs.pop("fmt", "o-"), kwargs
    raise ValueError(f"a style must be a format string or a dict of keywords, got {style!r}")


def _finish(ax, xlabel, ylabel, title, legend):
    """Axis labels, title and legend: the last lines of every chart here."""
    ax.set(xlabel=xlabel or "", ylabel=ylabel or "")
    if title:
        ax.set_title(title)
    if legend:
        ax.legend()
    return ax


def plot_curves(x, series, ax=None, *, styles=None, xlabel=None, ylabel=None, title=None,
                xscale=None, yscale=None, legend=True):
    """Several curves over the same x: one line per entry of `series`, in order.

    x: n numbers (list or 1-D tensor). series: dict label -> n numbers. styles:
    optional dict label -> a format string ("s--") or a dict of `ax.plot` keywords
    (with an optional "fmt"); default "o-". xscale/yscale: "log", "symlog", ...
    Returns the matplotlib Axes.

    >>> ax = plot_curves([1, 2, 3], {"a": [0.1, 0.2, 0.4], "b": [0.3, 0.3, 0.3]})
    >>> [line.get_label() for line in ax.get_lines()]
    ['a', 'b']
    >>> plt.close(ax.figure)
    """
    xs = _as_vector(x, "x")
    if not series:
        raise ValueError("series is empty: give at least one label -> values")
    styles = styles or {}
    unknown = set(styles) - set(series)
    if unknown:
        raise ValueError(f"styles name curves that are not in series: {sorted(unknown)}")
    curves = {}
    for label, values in series.items():
        ys = _as_vector(values, f"series {label!r}")
        if len(ys) != len(xs):
            raise ValueError(f"series {label!r} has {len(ys)} values, x has {len(xs)}")
        curves[label] = ys
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    for label, ys in curves.items():
        fmt, kwargs = _line_style(styles.get(label))
        ax.plot(xs.numpy(), ys.numpy(), fmt, label=label, **kwargs)
    if xscale:
        ax.set_xscale(xscale)
    if yscale:
        ax.set_yscale(yscale)
    return _finish(ax, xlabel, ylabel, title, legend)


def grouped_bars(categories, series, ax=None, *, width=0.8, colors=None, xlabel=None,
                 ylabel=None, title=None, value_format=None, legend=True):
    """Bars side by side: one group per category, one bar per series in each group.

    categories: n tick labels. series: dict label -> n bar heights (one colour
    each, left to right in the group, in order). width: the width of a whole group
    (each bar gets width / len(series)). colors: optional dict label -> colour.
    value_format: e.g. "{:.0%}" to print each height above its bar. Returns the Axes.

    >>> ax = grouped_bars(["1", "2"], {"with": [1.0, 0.9], "without": [0.2, 0.0]})
    >>> len(ax.patches), [t.get_text() for t in ax.get_xticklabels()]
    (4, ['1', '2'])
    >>> plt.close(ax.figure)
    """
    categories = [str(c) for c in categories]
    if not categories:
        raise ValueError("categories is empty")
    if not series:
        raise ValueError("series is empty: give at least one label -> heights")
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    colors = colors or {}
    heights = {}
    for label, values in series.items():
        hs = _as_vector(values, f"series {label!r}")
        if len(hs) != len(categories):
            raise ValueError(f"series {label!r} has {len(hs)} values, "
                             f"there are {len(categories)} categories")
        heights[label] = hs
    if ax is None:
        _, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.8 * len(categories) * len(series)), 3.4))
    bar = width / len(heights)
    centers = torch.arange(len(categories), dtype=torch.float32)
    for k, (label, hs) in enumerate(heights.items()):
        xs = centers - width / 2 + bar * (k + 0.5)
        bars = ax.bar(xs.numpy(), hs.numpy(), bar, label=label, color=colors.get(label))
        if value_format:
            ax.bar_label(bars, [value_format.format(float(h)) for h in hs], fontsize=8)
    ax.set_xticks(centers.numpy(), categories)
    return _finish(ax, xlabel, ylabel, title, legend)


def probability_bars(labels, probs, ax=None, *, title=None, ylim=(0, 1), highlight=None):
    """Bar chart of the probabilities of a few tokens, each bar labelled by its token.

    labels: k token strings (spaces and newlines are drawn as "␣" and "\\n").
    probs: k probabilities in [0, 1]. highlight: index of a bar to draw in colour,
    the others then grey. Returns the Axes.

    >>> ax = probability_bars(["e", "a", " "], [0.6, 0.3, 0.1])
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['e', 'a', '␣']
    >>> plt.close(ax.figure)
    """
    p = _as_vector(probs, "probs")
    labels = list(labels)
    if len(labels) != len(p):
        raise ValueError(f"{len(labels)} labels for {len(p)} probabilities")
    if len(p) and (float(p.min()) < 0 or float(p.max()) > 1 + 1e-6):
        raise ValueError(f"probabilities must lie in [0, 1], got min {float(p.min()):.3g} "
                         f"and max {float(p.max()):.3g}")
    if highlight is not None and not 0 <= highlight < len(p):
        raise ValueError(f"highlight={highlight} is not the index of one of {len(p)} bars")
    shown = [{" ": "␣", "\n": "\\n", "": " "}.get(t, t) for t in labels]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(p) + 1.0), 2.8))
    colors = None
    if highlight is not None:
        colors = ["tab:blue" if i == highlight else "0.7" for i in range(len(p))]
    ax.bar(range(len(p)), p.numpy(), color=colors)
    ax.set_xticks(range(len(p)), shown)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def heatmap_grid(weights, titles=None, query_labels=None, key_labels=None, ncols=None, *,
                 panel_size=(3.0, 3.0), suptitle=None, annotate=False, cmap="Blues"):
    """A grid of attention heatmaps, one per (T_q, T_k) matrix, with shared labels.

    weights: an (n, T_q, T_k) tensor (the heads of one layer, say) or a list of n
    matrices of one shape. titles: n panel titles. ncols: panels per row (default
    all in one row). Tick labels and axis names are drawn on the outer panels only.
    Returns (fig, axes), axes a flat list of the n Axes.

    >>> fig, axes = heatmap_grid(torch.eye(3).expand(4, 3, 3), ncols=2)
    >>> len(axes)
    4
    >>> plt.close(fig)
    """
    if isinstance(weights, (list, tuple)):
        mats = [_as_matrix(w) for w in weights]
        shapes = {tuple(m.shape) for m in mats}
        if len(shapes) > 1:
            raise ValueError(f"all matrices must have one shape, got {sorted(shapes)}")
        w = torch.stack(mats) if mats else torch.empty(0, 0, 0)
    else:
        w = torch.as_tensor(weights).detach().float().cpu()
    if w.dim() != 3 or w.shape[0] == 0:
        raise ValueError(f"weights must be (n, T_q, T_k) with n >= 1, got shape {tuple(w.shape)}")
    n = w.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} matrices")
    ncols = n if ncols is None else ncols
    if not 1 <= ncols <= n:
        raise ValueError(f"ncols must be between 1 and {n}, got {ncols}")
    nrows = -(-n // ncols)
    fig, grid = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(panel_size[0] * ncols, panel_size[1] * nrows))
    axes = list(grid.flat)
    for k, ax in enumerate(axes):
        if k >= n:
            ax.axis("off")
            continue
        attention_heatmap(w[k], query_labels, key_labels, ax=ax, annotate=annotate,
                          cmap=cmap, colorbar=False, title=titles[k] if titles else None)
        row, col = divmod(k, ncols)
        if col:
            ax.set_ylabel("")
            ax.tick_params(axis="y", labelleft=False)
        if row:
            ax.set_xlabel("")
            ax.tick_params(axis="x", labeltop=False)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig, axes[:n]
