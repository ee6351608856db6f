"""Tokenizers: turning text into a list of integers and back.

A language model only sees integers ("token ids"). There are three classic
ways to cut text into tokens:

* **Characters.** Vocabulary = the distinct characters of the training text
  (about 100 for English prose or Python docs). Simple and exact, but the
  sequences are long and any character not seen in training cannot be encoded.
* **Bytes.** Encode the text as UTF-8 and use the 256 possible byte values as
  the vocabulary. Every string, in every language, with emoji, can now be
  encoded; but a CJK character or an emoji takes 3-4 tokens.
* **Byte-pair encoding (BPE).** Start from the 256 bytes and repeatedly
  *merge* the most frequent adjacent pair of tokens into a new token
  (Sennrich et al. 2016; GPT-2 uses it on bytes, Radford et al. 2019).
  Frequent words become single tokens, rare ones fall back to pieces or
  bytes, so any text still round-trips exactly while sequences get shorter.

    >>> tok = CharTokenizer("hello")
    >>> tok.encode("hell")
    [1, 0, 2, 2]
    >>> bpe = BPETokenizer.train("aaabdaaabac", vocab_size=259)
    >>> [bpe.token_bytes(new_id) for _, new_id in bpe.merges]
    [b'aa', b'ab', b'aaab']
"""

import json
import re


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def _as_id_list(ids, vocab_size):
    """Accept a list of ints or a 1-D tensor; check every id is in range."""
    if hasattr(ids, "tolist"):  # torch.Tensor or numpy array
        ids = ids.tolist()
    ids = list(ids)
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is out of range for vocab_size {vocab_size}")
    return ids


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters.

    >>> tok = CharTokenizer("hello")
    >>> tok.chars, tok.vocab_size
    (['e', 'h', 'l', 'o'], 4)
    >>> tok.decode(tok.encode("hole"))
    'hole'
    """

    def __init__(self, text):
        _check_text(text)
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.itos = {i: ch for i, ch in enumerate(self.chars)}

    def encode(self, text):
        """str of length L -> list of L ints."""
        _check_text(text)
        ids = []
        for pos, ch in enumerate(text):
            if ch not in self.stoi:
                raise ValueError(
                    f"character {ch!r} at position {pos} is not in the vocabulary "
                    f"of {self.vocab_size} characters"
                )
            ids.append(self.stoi[ch])
        return ids

    def decode(self, ids):
        """list of ints (or 1-D tensor) -> str."""
        return "".join(self.itos[i] for i in _as_id_list(ids, self.vocab_size))


# How GPT-2 cuts text into chunks before BPE: contractions, words with an
# optional leading space, numbers, runs of punctuation, whitespace. Merges
# never cross a chunk boundary, so "dog." and "dog!" share the token " dog".
# GPT-2 writes \p{L} (letters) and \p{N} (numbers), which the stdlib `re`
# lacks; [^\W\d_] means "a word character that is not a digit or underscore",
# i.e. a letter. Every character is matched by some alternative, so
# "".join(SPLIT_PATTERN.findall(text)) == text for every text.
SPLIT_PATTERN = re.compile(
    r"""'(?:[sdmt]|ll|ve|re)"""  # contractions: 's 't 're 've 'm 'll 'd
    r"""| ?[^\W\d_]+"""  # letters, optional leading space
    r"""| ?\d+"""  # digits, optional leading space
    r"""| ?(?:[^\s\w]|_)+"""  # other symbols, optional leading space
    r"""|\s+(?!\S)"""  # whitespace, but leave the last space for the next word
    r"""|\s+"""  # any other whitespace
)


def _merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids` (left to right) by `new_id`.

    >>> _merge([97, 97, 97, 98], (97, 97), 256)
    [256, 97, 98]
    """
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level byte-pair encoding, as in GPT-2.

    Ids 0..255 are the raw bytes; id 256 + k is the k-th learned merge.

    >>> bpe = BPETokenizer.train("low lower lowest " * 10, vocab_size=259)
    >>> bpe.tokens(" lowest")
    [' low', 'e', 's', 't']
    >>> bpe.decode(bpe.encode("naïve ☃"))
    'naïve ☃'
    """

    def __init__(self, merges=()):
        self.merges = []  # [((id_a, id_b), new_id), ...] in the order learned
        self.vocab = {i: bytes([i]) for i in range(256)}  # id -> bytes
        self._ranks = {}  # (id_a, id_b) -> new_id; a smaller new_id was learned earlier
        self._cache = {}  # chunk (str) -> list of ids, filled by encode()
        for (a, b), new_id in merges:
            self._add_merge((a, b), new_id)

    def _add_merge(self, pair, new_id):
        if new_id != len(self.vocab):
            raise ValueError(f"merge {pair} -> {new_id}: expected new id {len(self.vocab)}")
        self.merges.append((pair, new_id))
        self.vocab[new_id] = self.vocab[pair[0]] + self.vocab[pair[1]]
        self._ranks[pair] = new_id
        self._cache = {}

    @property
    def vocab_size(self):
        return len(self.vocab)

    @classmethod
    def train(cls, text, vocab_size, verbose=False):
        """Learn `vocab_size - 256` merges from `text`.

        At each step, merge the adjacent pair with the highest count
        (overlapping occurrences counted, so "aaa" has two "aa").
        Ties are broken by the smallest pair (a, b), so training is
        deterministic. Training stops early if no pairs are left; then
        `vocab_size` is smaller than asked for.
        """
        _check_text(text)
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the byte values), got {vocab_size!r}")

        # 1. Split into chunks; train on the unique chunks, weighted by count.
        chunk_counts = {}
        for chunk in SPLIT_PATTERN.findall(text):
            chunk_counts[chunk] = chunk_counts.get(chunk, 0) + 1
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        counts = list(chunk_counts.values())

        # 2. Count every adjacent pair once, and remember which words hold it.
        pair_counts = {}  # (a, b) -> weighted count
        where = {}  # (a, b) -> set of word indices that (may) contain it
        for w, (ids, c) in enumerate(zip(words, counts)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + c
                where.setdefault(pair, set()).add(w)

        # 3. Repeatedly merge the best pair, updating only the affected words.
        tok = cls()
        n_merges = vocab_size - 256
        for k in range(n_merges):
            if not pair_counts:
                break  # every chunk is a single token already
            best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
            count = pair_counts[best]
            new_id = 256 + k
            tok._add_merge(best, new_id)
            if verbose:
                a, b = (tok.vocab[i].decode("utf-8", errors="replace") for i in best)
                ab = tok.vocab[new_id].decode("utf-8", errors="replace")
                print(f"merge {k + 1}/{n_merges}: {a!r} + {b!r} -> {ab!r} (id {new_id}, count {count})")

            for w in where.pop(best):
                old = words[w]
                new = _merge(old, best, new_id)
                if len(new) == len(old):
                    continue  # stale entry: this word no longer holds `best`
                c = counts[w]
                for pair in zip(old, old[1:]):  # remove the word's old pairs...
                    pair_counts[pair] -= c
                    if pair_counts[pair] == 0:
                        del pair_counts[pair]
                for pair in zip(new, new[1:]):  # ...and add its new ones
                    pair_counts[pair] = pair_counts.get(pair, 0) + c
                    where.setdefault(pair, set()).add(w)
                words[w] = new
        return tok

    def _encode_chunk(self, chunk):
        """Apply the merges to one chunk, lowest rank (earliest learned) first."""
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pairs = set(zip(ids, ids[1:]))
            pair = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
            if pair not in self._ranks:
                break  # no learned merge applies any more
            ids = _merge(ids, pair, self._ranks[pair])
        return ids

    def encode(self, text):
        """str -> list of token ids."""
        _check_text(text)
        ids = []
        for chunk in SPLIT_PATTERN.findall(text):
            if chunk not in self._cache:
                self._cache[chunk] = self._encode_chunk(chunk)
            ids.extend(self._cache[chunk])
        return ids

    def decode(self, ids):
        """list of ints (or 1-D tensor) -> str. Invalid UTF-8 becomes '\ufffd'."""
        ids = _as_id_list(ids, self.vocab_size)
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id):
        """The bytes that one token stands for."""
        (token_id,) = _as_id_list([token_id], self.vocab_size)
        return self.vocab[token_id]

    def tokens(self, text):
        """The pieces of `text` as strings, for display: "hello world" -> ['hello', ' world']."""
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in self.encode(text)]

    def compression_ratio(self, text):
        """UTF-8 bytes per token (1.0 for a tokenizer with no merges)."""
        return len(text.encode("utf-8")) / len(self.encode(text))

    def save(self, path):
        """Write the merges as JSON; the vocabulary follows from them."""
        data = {"type": "BPETokenizer", "merges": [[a, b, new_id] for (a, b), new_id in self.merges]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls([((a, b), new_id) for a, b, new_id in data["merges"]])
