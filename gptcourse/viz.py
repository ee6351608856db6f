"""Pictures the chapters share: attention heatmaps and loss curves."""
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
