import random
import re

import pytest
import torch

from gptcourse.data import load_corpus
from gptcourse.tokenizers import SPLIT_PATTERN, BPETokenizer, CharTokenizer


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("pydoc")


@pytest.fixture(scope="module")
def bpe512(corpus):
    return BPETokenizer.train(corpus, vocab_size=512)


# ---------------------------------------------------------------- characters


def test_char_hand_worked_example():
    tok = CharTokenizer("hello")
    assert tok.chars == ["e", "h", "l", "o"]
    assert tok.vocab_size == 4
    assert tok.stoi == {"e": 0, "h": 1, "l": 2, "o": 3}
    assert tok.itos == {0: "e", 1: "h", 2: "l", 3: "o"}
    assert tok.encode("hell") == [1, 0, 2, 2]
    assert tok.decode([3, 1, 0]) == "ohe"
    assert tok.decode(torch.tensor([1, 0, 2, 2])) == "hell"
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_char_corpus_round_trip_and_vocab_size(corpus):
    tok = CharTokenizer(corpus)
    assert tok.vocab_size == len(set(corpus))
    if len(corpus) == 464970:  # Python 3.11's pydoc topics
        assert tok.vocab_size == 103
    ids = tok.encode(corpus)
    assert len(ids) == len(corpus)
    assert tok.decode(ids) == corpus
    assert tok.chars == sorted(tok.chars) and tok.chars[0] == "\n"


def test_char_errors():
    tok = CharTokenizer("hello")
    with pytest.raises(ValueError, match=r"'z' at position 4 .* vocabulary of 4 characters"):
        tok.encode("hellz")
    with pytest.raises(ValueError, match=r"token id 4 .* vocab_size 4"):
        tok.decode([0, 4])
    with pytest.raises(ValueError, match=r"token id -1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"hell")


# ---------------------------------------------------------------- BPE


def naive_bpe_merges(text, vocab_size):
    """Reference: recount all pairs after every merge (slow but obviously right)."""
    chunks = [list(c.encode("utf-8")) for c in SPLIT_PATTERN.findall(text)]
    merges = []
    for new_id in range(256, vocab_size):
        counts = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        top = max(counts.values())
        best = min(p for p, c in counts.items() if c == top)  # tie: smallest pair
        merges.append((best, new_id))
        new_chunks = []
        for ids in chunks:
            out, i = [], 0
            while i < len(ids):
                if ids[i : i + 2] == list(best):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            new_chunks.append(out)
        chunks = new_chunks
    return merges


def test_split_pattern_covers_every_character():
    rng = random.Random(0)
    samples = ["Hello, world! I'm here_now 123.45\r\n\tx  y   ", "naïve café ☃ 日本語 😀 e\u0301"]
    for _ in range(200):
        samples.append("".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)])) for _ in range(30)))
    for s in samples:
        assert "".join(SPLIT_PATTERN.findall(s)) == s
    assert SPLIT_PATTERN.findall("I'm here_now, 42x  y") == ["I", "'m", " here", "_", "now", ",", " 42", "x", " ", " y"]


def test_bpe_wikipedia_example(capsys):
    # "aaabdaaabac" is one chunk. Pair counts: aa=4 (overlapping), ab=2, ...
    # 1. aa -> Z: ZabdZabac. Now Za=2 and ab=2 tie; (97, 98) < (256, 97) so
    # 2. ab -> Y: ZYdZYac.  3. ZY -> X: XdXac.
    bpe = BPETokenizer.train("aaabdaaabac", vocab_size=259, verbose=True)
    assert bpe.merges == [((97, 97), 256), ((97, 98), 257), ((256, 257), 258)]
    assert bpe.vocab[256] == b"aa" and bpe.vocab[257] == b"ab" and bpe.vocab[258] == b"aaab"
    assert bpe.vocab_size == 259
    assert bpe.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert bpe.tokens("aaabdaaabac") == ["aaab", "d", "aaab", "a", "c"]
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "merge 1/3: 'a' + 'a' -> 'aa' (id 256, count 4)",
        "merge 2/3: 'a' + 'b' -> 'ab' (id 257, count 2)",
        "merge 3/3: 'aa' + 'ab' -> 'aaab' (id 258, count 2)",
    ]


def test_bpe_stops_when_nothing_left_to_merge():
    bpe = BPETokenizer.train("aaabdaaabac", vocab_size=1000)
    assert bpe.vocab_size == 263  # XdXac needs 4 more merges to become one token
    assert bpe.encode("aaabdaaabac") == [262]
    assert bpe.token_bytes(262) == b"aaabdaaabac"


def test_bpe_matches_naive_reference(corpus):
    text = corpus[:30000]
    bpe = BPETokenizer.train(text, vocab_size=400)
    assert bpe.merges == naive_bpe_merges(text, 400)


def test_bpe_deterministic_and_vocab_size(corpus, bpe512):
    again = BPETokenizer.train(corpus, vocab_size=512)
    assert again.merges == bpe512.merges
    assert bpe512.vocab_size == 512 == len(bpe512.vocab) == 256 + len(bpe512.merges)
    assert [new_id for _, new_id in bpe512.merges] == list(range(256, 512))
    for (a, b), new_id in bpe512.merges:
        assert a < new_id and b < new_id
        assert bpe512.vocab[new_id] == bpe512.vocab[a] + bpe512.vocab[b]
    assert len(set(bpe512.vocab.values())) == 512  # every token distinct


def test_bpe_merges_stay_inside_chunks(bpe512):
    for (a, b), new_id in bpe512.merges:
        t = bpe512.vocab[new_id]
        if not t.isspace():
            assert b" " not in t[1:], t  # at most one leading space, never "word word"
        assert not (re.search(rb"[A-Za-z]", t) and re.search(rb"[0-9]", t)), t  # letters and digits never mix
    assert any(t.startswith(b" ") and t[1:].isalpha() for t in bpe512.vocab.values())  # e.g. b' the'


def test_bpe_round_trip_unicode(corpus):
    bpe = BPETokenizer.train(corpus[:20000] + " café 日本語 😀", vocab_size=400)
    samples = [
        "",
        "Hello, world!",
        "naïve café, crème brûlée",
        "e\u0301 a\u0300 \u0041\u030a",  # combining accents
        "日本語のテキスト 中文",
        "😀👍🏽 👨‍👩‍👧",
        "line1\r\nline2\n\ttabbed\x00nul",
        "   leading and trailing   ",
        "\U0010ffff\ufeff",
    ]
    rng = random.Random(1)
    for _ in range(50):
        n = rng.randrange(1, 40)
        samples.append("".join(chr(rng.choice([rng.randrange(0, 0xD800), rng.randrange(0xE000, 0x110000)])) for _ in range(n)))
    for s in samples:
        ids = bpe.encode(s)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == s
        assert b"".join(bpe.token_bytes(i) for i in ids) == s.encode("utf-8")
    assert bpe.decode(torch.tensor(bpe.encode("café"))) == "café"
    assert bpe.decode([0xC3]) == "\ufffd"  # half a UTF-8 character


def test_bpe_compression_ratio(corpus, bpe512):
    assert BPETokenizer().compression_ratio(corpus) == 1.0
    assert BPETokenizer.train(corpus, vocab_size=256).compression_ratio(corpus) == 1.0
    r300 = BPETokenizer.train(corpus, vocab_size=300).compression_ratio(corpus)
    r512 = bpe512.compression_ratio(corpus)
    r1024 = BPETokenizer.train(corpus, vocab_size=1024).compression_ratio(corpus)
    assert 1.0 < r300 < r512 < r1024
    assert r512 > 2.0  # measured 2.15 on Python 3.11
    assert r1024 > 2.7  # measured 2.93
    ids = bpe512.encode(corpus)
    assert bpe512.decode(ids) == corpus
    assert r512 == len(corpus.encode("utf-8")) / len(ids)


def test_bpe_save_load(tmp_path, bpe512, corpus):
    path = tmp_path / "bpe.json"
    bpe512.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.merges == bpe512.merges
    assert loaded.vocab == bpe512.vocab
    text = corpus[:5000]
    assert loaded.encode(text) == bpe512.encode(text)


def test_bpe_errors(bpe512):
    with pytest.raises(ValueError, match="255"):
        BPETokenizer.train("abc", vocab_size=255)
    with pytest.raises(TypeError, match="bytes"):
        BPETokenizer.train(b"abc", vocab_size=300)
    with pytest.raises(TypeError, match="NoneType"):
        bpe512.encode(None)
    with pytest.raises(ValueError, match=r"token id 512 .* vocab_size 512"):
        bpe512.decode([1, 512])
    with pytest.raises(ValueError, match=r"token id -3"):
        bpe512.token_bytes(-3)


def test_unicode_classes_equal_the_unicode_categories():
    """\\p{L} and \\p{N} as built for the pretrained tokenizer's regex: every code
    point, against unicodedata's own categories."""
    import re
    import unicodedata
    from gptcourse.tokenizers import _unicode_class
    for prefix in ("L", "N"):
        rx = re.compile(f"[{_unicode_class(prefix)}]")
        for cp in range(0x110000):
            assert bool(rx.match(chr(cp))) == unicodedata.category(chr(cp)).startswith(prefix), hex(cp)


def test_bpe_chunk_cache_is_bounded_in_bytes_and_changes_no_ids(corpus, bpe512):
    """The cache of encoded chunks (issue 27): a stream of distinct words never
    grows it past its bytes, the least recently used leave first, and every
    id is what the merges give without it."""
    from gptcourse.tokenizers import ChunkCache
    text = corpus[:20000]
    expected = [i for chunk in SPLIT_PATTERN.findall(text) for i in bpe512._encode_chunk(chunk)]
    small = BPETokenizer(bpe512.merges)
    small._cache = ChunkCache(max_bytes=4000)
    for _ in range(2):                                           # cold, then warm
        assert small.encode(text) == expected == bpe512.encode(text)
        assert 0 < small._cache.nbytes <= 4000 and len(small._cache) < len(set(SPLIT_PATTERN.findall(text)))
    rng = random.Random(0)
    for _ in range(3000):                                        # distinct words, never seen again
        small.encode("".join(rng.choice("abcdefghij") for _ in range(12)))
    assert small._cache.nbytes <= 4000
    small.encode(" kept")
    small.encode("".join(rng.choice("xyz") for _ in range(8)))
    assert small._cache.get(" kept") is not None                 # just used: not the first to leave
    assert small._cache.get("z" * 70) is None and small.encode("z" * 70) == bpe512.encode("z" * 70)
    assert small._cache.get("z" * 70) is None                    # longer than 64 characters: not kept
