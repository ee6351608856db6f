"""Data: a text corpus, a train/validation split, and random training batches.

The whole corpus is one long 1-D tensor of token ids. A training example is
a window of `block_size` ids (x) and the same window shifted by one (y): at
every position t the model sees x[:t+1] and must predict y[t] = x[t+1].

    >>> text = load_corpus("pydoc")
    >>> len(text), len(set(text))   # on Python 3.11
    (464970, 103)
"""

import datetime
import os
import random
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



# ----------------------------------------------------------------------------
# Toy translation tasks for the seq2seq chapters: generated, seeded, offline.
# ----------------------------------------------------------------------------

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
FIRST_DATE, LAST_DATE = datetime.date(1950, 1, 1), datetime.date(2049, 12, 31)

# How people write a date, each with the strptime pattern that reads it back
# (the tests parse every generated source with it). Two-digit years are
# 1950-2049: 50-99 -> 19xx, 00-49 -> 20xx.
DATE_FORMATS = {
    "weekday, d month yyyy": (lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",
                              "%A, %d %B %Y"),
    "d month yyyy":          (lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}", "%d %B %Y"),
    "d mon yyyy":            (lambda d: f"{d.day} {MONTHS[d.month - 1][:3].lower()} {d.year}", "%d %b %Y"),
    "month d, yyyy":         (lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}", "%B %d, %Y"),
    "mon d yyyy":            (lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}", "%b %d %Y"),
    "mm/dd/yy":              (lambda d: f"{d.month:02d}/{d.day:02d}/{d.year % 100:02d}", "%m/%d/%y"),
    "dd.mm.yyyy":            (lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}", "%d.%m.%Y"),
    "weekday mon d yyyy":    (lambda d: f"{WEEKDAYS[d.weekday()][:3].lower()} "
                                        f"{MONTHS[d.month - 1][:3].lower()} {d.day} {d.year}",
                              "%a %b %d %Y"),
}


def random_date(rng):
    """A uniformly random date between FIRST_DATE and LAST_DATE (random.Random rng)."""
    span = (LAST_DATE - FIRST_DATE).days
    return FIRST_DATE + datetime.timedelta(days=rng.randint(0, span))


def date_pairs(n, seed=0, formats=None):
    """n (source, target) pairs: a date as people write it, and its ISO form.

    >>> date_pairs(2, seed=0)
    [('15.02.2019', '2019-02-15'), ('Apr 7 1957', '1957-04-07')]

    formats: names from DATE_FORMATS (default: all), chosen uniformly.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    names = list(DATE_FORMATS) if formats is None else list(formats)
    unknown = [f for f in names if f not in DATE_FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown date formats {unknown}; known: {list(DATE_FORMATS)}")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        date = random_date(rng)
        write, _ = DATE_FORMATS[rng.choice(names)]
        pairs.append((write(date), date.isoformat()))
    return pairs


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def number_pairs(n, min_digits, max_digits, seed=0):
    """n (source, target) pairs with a length you can dial: a digit string
    read aloud, and the digits.

    >>> number_pairs(2, 2, 4, seed=0)
    [('six zero four', '604'), ('seven six four seven', '7647')]

    The number of digits is uniform in min_digits..max_digits. Each output
    digit comes from one input word, in order: a monotonic alignment.
    """
    if not (isinstance(min_digits, int) and isinstance(max_digits, int)) or not 1 <= min_digits <= max_digits:
        raise ValueError(f"need integers 1 <= min_digits <= max_digits, got {min_digits!r}, {max_digits!r}")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(rng.randint(min_digits, max_digits))]
        pairs.append((" ".join(DIGIT_WORDS[d] for d in digits), "".join(map(str, digits))))
    return pairs


class Vocab:
    """Symbols <-> ids for a seq2seq task, with three special ids:
    PAD = 0 (filler in a batch), BOS = 1 (start of output), EOS = 2 (end).

    split="char" reads a text as characters, split="word" as words.

    >>> v = Vocab.from_texts(["ab", "ba"])
    >>> v.encode("ab"), v.decode([3, 4, 2, 3])
    ([3, 4, 2], 'ab')
    """
    PAD, BOS, EOS = 0, 1, 2
    SPECIALS = ["<pad>", "<s>", "</s>"]

    def __init__(self, symbols, split="char"):
        if split not in ("char", "word"):
            raise ValueError(f"split must be 'char' or 'word', got {split!r}")
        self.split = split
        self.itos = self.SPECIALS + sorted(set(symbols) - set(self.SPECIALS))
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @classmethod
    def from_texts(cls, texts, split="char"):
        vocab = cls([], split)
        return cls({s for t in texts for s in vocab.tokenize(t)}, split)

    def __len__(self):
        return len(self.itos)

    def tokenize(self, text):
        return list(text) if self.split == "char" else text.split()

    def encode(self, text):
        """text -> ids, ending with EOS."""
        ids = []
        for pos, s in enumerate(self.tokenize(text)):
            if s not in self.stoi:
                raise ValueError(f"symbol {s!r} at position {pos} of {text!r} is not in the vocabulary")
            ids.append(self.stoi[s])
        return ids + [self.EOS]

    def decode(self, ids):
        """ids -> text, stopping at the first EOS, skipping PAD and BOS."""
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                out.append(self.itos[i])
        return ("" if self.split == "char" else " ").join(out)


def seq2seq_batch(pairs, src_vocab, tgt_vocab, device="cpu"):
    """Pad a list of (source, target) pairs into tensors.

    Returns src (B, S) ids padded with PAD, src_lengths (B,), tgt_in (B, T)
    = BOS y_1 .. y_{T-1} (the decoder's inputs under teacher forcing) and
    tgt_out (B, T) = y_1 .. y_T ending in EOS (what it must predict).
    """
    src = [src_vocab.encode(s) for s, _ in pairs]
    tgt = [tgt_vocab.encode(t) for _, t in pairs]
    S, T = max(map(len, src)), max(map(len, tgt))
    src_ids = torch.full((len(pairs), S), Vocab.PAD, dtype=torch.long)
    tgt_in = torch.full((len(pairs), T), Vocab.PAD, dtype=torch.long)
    tgt_out = torch.full((len(pairs), T), Vocab.PAD, dtype=torch.long)
    for b, (s, t) in enumerate(zip(src, tgt)):
        src_ids[b, :len(s)] = torch.tensor(s)
        tgt_in[b, :len(t)] = torch.tensor([Vocab.BOS] + t[:-1])
        tgt_out[b, :len(t)] = torch.tensor(t)
    lengths = torch.tensor([len(s) for s in src])
    return src_ids.to(device), lengths.to(device), tgt_in.to(device), tgt_out.to(device)


def seq2seq_loss(logits, tgt_out):
    """Cross-entropy of (B, T, V) logits against (B, T) targets, padding ignored."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(),
                                             ignore_index=Vocab.PAD)


def seq2seq_batches(train_pairs, val_pairs, src_vocab, tgt_vocab, batch_size, seed=0):
    """A `batches(split)` function for gptcourse.train: random batches of pairs."""
    data = {"train": train_pairs, "val": val_pairs}
    rngs = {split: random.Random(seed + i) for i, split in enumerate(data)}

    def batches(split):
        return seq2seq_batch(rngs[split].sample(data[split], batch_size), src_vocab, tgt_vocab)
    return batches
