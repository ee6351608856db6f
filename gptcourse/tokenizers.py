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

import heapq
import json
import re
import sys
from collections import OrderedDict


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


class ChunkCache:
    """The token ids of recently encoded chunks, at most max_bytes of them.

    A BPE tokenizer merges inside each chunk of the pre-tokenizer (a word, a
    number, a run of spaces) and the same words come back again and again,
    so it keeps their ids. The bound is in bytes, not entries: an entry
    counts its text, its list of ids and OVERHEAD for the rest (the
    OrderedDict's slot and links, with the room its table keeps after
    evictions, and the (ids, size) pair: at most about 220 bytes an entry,
    measured with tracemalloc), and the least recently used entries leave
    first, so no stream of distinct text (a client's 1 MB prompts, say)
    grows it past max_bytes.
    Chunks longer than MAX_CHUNK characters are not kept at all: a long one
    rarely comes back, and one would push out many short ones.

    >>> cache = ChunkCache(max_bytes=800)
    >>> for word in ["alpha", "beta", "gamma", "delta"]:
    ...     cache.put(word, [1, 2])
    >>> len(cache), cache.get("alpha"), cache.get("delta"), cache.nbytes <= 800
    (2, None, [1, 2], True)
    """
    OVERHEAD = 240
    MAX_CHUNK = 64

    def __init__(self, max_bytes=4 << 20):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries = OrderedDict()           # chunk -> (ids, its size in bytes), oldest first

    def get(self, chunk):
        """The ids of chunk, or None when it is not kept."""
        entry = self._entries.get(chunk)
        if entry is None:
            return None
        self._entries.move_to_end(chunk)        # used now: the last to leave
        return entry[0]

    def put(self, chunk, ids):
        """Keep chunk's ids (if chunk is short enough), the oldest entries leaving to make room."""
        if len(chunk) > self.MAX_CHUNK or chunk in self._entries:
            return
        size = sys.getsizeof(chunk) + sys.getsizeof(ids) + self.OVERHEAD
        if size > self.max_bytes:
            return
        while self.nbytes + size > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.nbytes -= old
        self._entries[chunk] = (ids, size)
        self.nbytes += size

    def clear(self):
        self._entries.clear()
        self.nbytes = 0

    def __len__(self):
        return len(self._entries)


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
        self._cache = ChunkCache()  # chunk (str) -> list of ids, filled by encode()
        for (a, b), new_id in merges:
            self._add_merge((a, b), new_id)

    def _add_merge(self, pair, new_id):
        if new_id != len(self.vocab):
            raise ValueError(f"merge {pair} -> {new_id}: expected new id {len(self.vocab)}")
        self.merges.append((pair, new_id))
        self.vocab[new_id] = self.vocab[pair[0]] + self.vocab[pair[1]]
        self._ranks[pair] = new_id
        self._cache.clear()

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
            chunk_ids = self._cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_chunk(chunk)
                self._cache.put(chunk, chunk_ids)
            ids.extend(chunk_ids)
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


# ----------------------------------------------------------------------------
# A pretrained byte-level BPE: the vocabulary and merges of a real model
# ----------------------------------------------------------------------------

def bytes_to_unicode():
    """GPT-2's table from the 256 byte values to 256 printable characters.

    A pretrained byte-level BPE (GPT-2, Llama 3, SmolLM2) writes its tokens
    and merges as text, so every byte needs a visible character: the
    printable ASCII and Latin-1 bytes stand for themselves, the other 68
    (space, control bytes, ...) get the characters from U+0100 on. A space
    is 'Ġ' (U+0120), a newline 'Ċ' (U+010A).

    >>> table = bytes_to_unicode()
    >>> table[ord(" ")], table[ord("\\n")], table[ord("a")]
    ('Ġ', 'Ċ', 'a')
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CLASS_CACHE = {}


def _unicode_class(prefix):
    """A regex character class of every code point whose Unicode category
    starts with `prefix` ("L": letters, "N": numbers), i.e. \\p{L} / \\p{N},
    which Python's `re` lacks. Built once per process from the code points
    themselves: str.isalpha() is exactly category L*; str.isnumeric() holds for
    every N* character (and a few letters with numeric values, such as CJK
    numerals), so the category is looked up only for those."""
    if prefix not in _CLASS_CACHE:
        import unicodedata
        if prefix == "L":
            inside = [c.isalpha() for c in map(chr, range(0x110000))]
        elif prefix == "N":
            inside = [c.isnumeric() and unicodedata.category(c).startswith("N")
                      for c in map(chr, range(0x110000))]
        else:
            raise ValueError(f"prefix must be 'L' or 'N', got {prefix!r}")
        ranges, start = [], None
        for cp, flag in enumerate(inside):
            if flag and start is None:
                start = cp
            elif not flag and start is not None:
                ranges.append((start, cp - 1))
                start = None
        if start is not None:
            ranges.append((start, 0x10FFFF))
        _CLASS_CACHE[prefix] = "".join(
            re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return _CLASS_CACHE[prefix]


def gpt2_split_pattern():
    """GPT-2's pre-tokenizer regex, with \\p{L} and \\p{N} spelled out:

        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    """
    L, N = _unicode_class("L"), _unicode_class("N")
    return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+""")


class PretrainedBPE:
    """A byte-level BPE tokenizer from a pretrained model's vocabulary and merges.

    It is the course's BPETokenizer with someone else's training: `tokens`
    lists every token as text in GPT-2's byte-to-character alphabet
    (`bytes_to_unicode`), `merges` the learned pairs ("Ġ t") in the order
    they were learned (earlier = applied first), `special` the tokens that
    stand for themselves (e.g. "<|im_start|>") and are never split.

    pre_tokenizer (how text is cut into chunks before the merges):
        "gpt2"    GPT-2's regex;
        "smollm"  SmolLM2's: every digit on its own, then GPT-2's regex.

    encode(text) adds no special tokens of its own; a special token written
    in the text is encoded as that token, unless allow_special=False: then
    "<|im_start|>" in the text is plain characters, as it must be in anything
    a user wrote (a server builds the template's special tokens itself, see
    gptcourse.chat.encode_chatml).

    cache_bytes: the most bytes the cache of encoded chunks holds (ChunkCache).
    """

    PRE_TOKENIZERS = ("gpt2", "smollm")

    def __init__(self, tokens, merges, special=(), pre_tokenizer="gpt2", cache_bytes=4 << 20):
        if pre_tokenizer not in self.PRE_TOKENIZERS:
            raise ValueError(f"unsupported pre-tokenizer {pre_tokenizer!r}; "
                             f"supported: {', '.join(self.PRE_TOKENIZERS)}")
        self.tokens = list(tokens)                                   # id -> token text
        self.ids = {t: i for i, t in enumerate(self.tokens)}         # token text -> id
        if len(self.ids) != len(self.tokens):
            raise ValueError("the vocabulary has duplicate tokens")
        self.ranks = {}                                              # (a, b) -> rank
        for rank, merge in enumerate(merges):
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            if a + b not in self.ids:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) makes {a + b!r}, which is not in the vocabulary")
            self.ranks[(a, b)] = rank
        self.special = {t: self.ids[t] for t in special}
        self.pre_tokenizer = pre_tokenizer
        self.byte_char = bytes_to_unicode()                          # byte -> char
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self._split = gpt2_split_pattern()
        self._digits = re.compile(rf"[{_unicode_class('N')}]")
        self._special_re = (re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)))
                            if self.special else None)
        self._cache = ChunkCache(cache_bytes)
        # for min_tokens: the longest token in bytes (a special token's text included), and the
        # bytes that have no token of their own, which encode drops
        self.max_token_bytes = max([len(self.token_bytes(i)) for i in range(len(self.tokens))] or [1])
        self._silent_bytes = bytes(b for b in range(256) if self.byte_char[b] not in self.ids)

    @property
    def vocab_size(self):
        return len(self.tokens)

    def _chunks(self, text):
        """Pre-tokenization: the pieces the merges work inside."""
        pieces = [text]
        if self.pre_tokenizer == "smollm":                # "12 a" -> "1", "2", " a"
            pieces = []
            start = 0
            for m in self._digits.finditer(text):
                pieces += [text[start:m.start()], m.group()]
                start = m.end()
            pieces.append(text[start:])
        return [chunk for piece in pieces if piece for chunk in self._split.findall(piece)]

    def _bpe(self, chunk):
        """The merges on one chunk: bytes as characters, then always merge the
        adjacent pair learned first (the leftmost if it occurs twice), until no
        learned pair is left.

        A heap of (rank, position) over the adjacent pairs and a linked list of
        the parts: each merge pops one pair and pushes the two it makes with its
        neighbours, so a chunk of n bytes costs O(n log n), not a rescan of every
        pair after every merge (n^2: 12,000 letters without a space took seconds).
        A pair a merge made is always learned after the pair it came from, so the
        order of merges is the rescanning one's.
        """
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        # a byte with no token of its own (e.g. a control byte the training data
        # never had) is dropped, as Hugging Face's tokenizers do without an unknown token
        parts = [c for c in (self.byte_char[b] for b in chunk.encode("utf-8")) if c in self.ids]
        n, ranks = len(parts), self.ranks
        nxt, prv = list(range(1, n)) + [-1], list(range(-1, n - 1))      # the linked list of parts
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i] if parts[i] is not None else -1
            if j == -1 or ranks.get((parts[i], parts[j])) != rank:     # a pair a merge has changed
                continue
            parts[i], parts[j] = parts[i] + parts[j], None              # j joins i
            nxt[i] = nxt[j]
            if nxt[i] != -1:
                prv[nxt[i]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):                      # the new pairs with the neighbours
                if a != -1 and b != -1 and (parts[a], parts[b]) in ranks:
                    heapq.heappush(heap, (ranks[(parts[a], parts[b])], a))
        ids = [self.ids[p] for p in parts if p is not None]
        self._cache.put(chunk, ids)                                      # bounded in bytes
        return ids

    def min_tokens(self, text):
        """A lower bound on len(self.encode(text)), found without encoding: one
        pass over the text's UTF-8 bytes, no merges.

        Every byte of the text ends up in exactly one token, or is dropped (a
        byte with no token of its own), and no token holds more than
        max_token_bytes bytes. For SmolLM2 that is 81 ("\n" and 80 spaces),
        and 6 control characters (\x04, \x06, \x13, \x14, \x16, \x1d) are
        dropped: so a text that fits 2,047 tokens has at most 81 * 2,047 =
        165,807 bytes that are not dropped, and a server can refuse a longer
        one before tokenizing it. The bound is nearly reached: "\n" and 80
        spaces, repeated, is one token per 81 bytes.

        Encoding a text at that bound takes a fraction of a second, the merges
        in pure Python, measured on a shared 2-core CPU for 165,807 bytes:
        0.12 s of digits (one chunk each), 0.12 s of random emoji, 0.16 s of
        words, 0.19 s of random letters in one word, 0.37 s of one letter
        repeated, 0.62-0.68 s of one run of "#" or spaces (every byte merged,
        2,593 tokens). So it is bounded but not free: more than 0.1 s, and a
        caller that serves many clients should cancel it for a client that
        left, or limit what one client may send.
        """
        _check_text(text)
        kept = len(text.encode("utf-8").translate(None, self._silent_bytes))
        return -(-kept // self.max_token_bytes)

    def encode(self, text, allow_special=True):
        """str -> list of token ids (no BOS/EOS added).

        allow_special=True: a special token's text ("<|im_end|>") becomes that
        token; False: it is encoded as ordinary text, character by character.
        """
        _check_text(text)
        if not isinstance(allow_special, bool):
            raise ValueError(f"allow_special must be True or False, got {allow_special!r}")
        ids, start = [], 0
        matches = self._special_re.finditer(text) if self._special_re and allow_special else ()
        for m in matches:
            for chunk in self._chunks(text[start:m.start()]):
                ids += self._bpe(chunk)
            ids.append(self.special[m.group()])
            start = m.end()
        for chunk in self._chunks(text[start:]):
            ids += self._bpe(chunk)
        return ids

    def decode(self, ids, skip_special=False):
        """list of ints (or 1-D tensor) -> str. Invalid UTF-8 becomes '\\ufffd'."""
        ids = _as_id_list(ids, self.vocab_size)
        out, pending = [], bytearray()
        for i in ids:
            token = self.tokens[i]
            if token in self.special:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
                if not skip_special:
                    out.append(token)
            else:
                pending += self.token_bytes(i)
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes(self, token_id):
        """The bytes that one (non-special) token stands for."""
        token = self.tokens[token_id]
        if token in self.special:
            return token.encode("utf-8")
        return bytes(self.char_byte[c] for c in token)

    def pieces(self, text):
        """The pieces of `text` as strings, for display: "Hello world" -> ['Hello', ' world']."""
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in self.encode(text)]
