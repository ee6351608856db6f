"""Data: a text corpus, a train/validation split, and random training batches.

The whole corpus is one long 1-D tensor of token ids. A training example is
a window of `block_size` ids (x) and the same window shifted by one (y): at
every position t the model sees x[:t+1] and must predict y[t] = x[t+1].

    >>> text = load_corpus("pydoc")
    >>> len(text), len(set(text))   # on Python 3.11
    (464970, 103)
"""

import os
import urllib.request
import warnings
from pathlib import Path

import torch

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CACHE_DIR = Path.home() / ".cache" / "gptcourse"
CORPORA = ("pydoc", "tinyshakespeare")


def _pydoc_corpus():
    # The help texts of Python's `help()` topics: ships with every CPython,
    # so it works offline. Kept exactly as is (no cleaning, no reordering).
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics.values())


def _download_tinyshakespeare(timeout=10):
    path = CACHE_DIR / "tinyshakespeare.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=timeout) as response:
        text = response.read().decode("utf-8")
    if not text:
        raise ValueError("downloaded file is empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # atomic: never leave a half-written cache file
    return text


def load_corpus(name="pydoc"):
    """Return a training text as one str.

    name="pydoc": the Python help topics (464,970 characters, 103 distinct
        characters on Python 3.11), always available offline.
    name="tinyshakespeare": Karpathy's 1 MB of Shakespeare, downloaded once
        into ~/.cache/gptcourse/. If that fails for any reason (or the
        environment variable GPTCOURSE_OFFLINE=1 is set) it warns and
        returns the pydoc corpus instead.
    """
    if name == "pydoc":
        return _pydoc_corpus()
    if name == "tinyshakespeare":
        if os.environ.get("GPTCOURSE_OFFLINE") == "1":
            reason = "GPTCOURSE_OFFLINE=1 is set"
        else:
            try:
                return _download_tinyshakespeare()
            except Exception as e:  # offline, timeout, HTTP error, bad file...
                reason = f"{type(e).__name__}: {e}"
        warnings.warn(f"could not load 'tinyshakespeare' ({reason}); falling back to the 'pydoc' corpus", stacklevel=2)
        return _pydoc_corpus()
    raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")


def train_val_split(data, val_fraction=0.1):
    """Split a sequence (1-D tensor, list or str) into (train, val).

    The first (1 - val_fraction) of the data is train, the rest val, as in
    nanoGPT: with a contiguous split the validation text is genuinely unseen.

    >>> train_val_split(list(range(10)), val_fraction=0.2)
    ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n = int((1 - val_fraction) * len(data))
    if n == 0 or n == len(data):
        raise ValueError(
            f"val_fraction={val_fraction} on data of length {len(data)} "
            f"gives an empty {'train' if n == 0 else 'val'} split"
        )
    return data[:n], data[n:]


def get_batch(data, block_size, batch_size, generator=None, device="cpu"):
    """Sample a random batch of training windows.

    data: (N,) LongTensor of token ids, N > block_size.
    Returns x, y: (B, T) LongTensors with B = batch_size, T = block_size,
    and y[b, t] = x[b, t + 1] = data[offset_b + t + 1].
    Pass a seeded torch.Generator to get the same batches every run.
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"data must be a 1-D tensor of token ids, got {shape}")
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
    if len(data) <= block_size:
        raise ValueError(
            f"data of length {len(data)} is too short for block_size {block_size}: "
            f"need more than {block_size} tokens (x and its shifted target y)"
        )
    offsets = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    x = torch.stack([data[i : i + block_size] for i in offsets]).long()  # (B, T)
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in offsets]).long()  # (B, T)
    if torch.device(device).type == "cuda":
        # pinned (page-locked) memory lets the copy to the GPU run asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

