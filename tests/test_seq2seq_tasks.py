"""The generated seq2seq tasks of Part I: dates and spoken digits, vocabularies, batches."""
import calendar
import datetime
from collections import Counter

import pytest
import torch

from gptcourse.data import (
    DATE_FORMATS, FIRST_DATE, LAST_DATE, Vocab, date_pairs, number_pairs, seq2seq_batch,
    seq2seq_batches,
)


def test_every_date_parses_back_to_its_target():
    """Read each generated source with the standard library's strptime and
    compare with the ISO target (an independent parser)."""
    for name, (_, pattern) in DATE_FORMATS.items():
        for source, target in date_pairs(300, seed=1, formats=[name]):
            parsed = datetime.datetime.strptime(source, pattern).date()
            if "%y" in pattern and parsed.year >= 2050:     # strptime's pivot is 1969; ours 1950
                parsed = parsed.replace(year=parsed.year - 100)
            assert parsed == datetime.date.fromisoformat(target), (name, source, target)


def test_weekday_names_are_the_calendars():
    for source, target in date_pairs(500, seed=2, formats=["weekday, d month yyyy"]):
        date = datetime.date.fromisoformat(target)
        assert source.startswith(calendar.day_name[date.weekday()] + ","), source
    for source, target in date_pairs(500, seed=3, formats=["weekday mon d yyyy"]):
        date = datetime.date.fromisoformat(target)
        assert source.startswith(calendar.day_abbr[date.weekday()].lower() + " "), source


def test_worked_example_from_the_issue():
    thursday = datetime.date(2026, 11, 26)
    written = {name: write(thursday) for name, (write, _) in DATE_FORMATS.items()}
    assert written["weekday, d month yyyy"] == "Thursday, 26 November 2026"
    assert written["mm/dd/yy"] == "11/26/26"
    assert written["d mon yyyy"] == "26 nov 2026"


def test_dates_are_seeded_in_range_and_use_every_format():
    pairs = date_pairs(4000, seed=0)
    assert pairs == date_pairs(4000, seed=0)
    assert pairs != date_pairs(4000, seed=1)
    dates = [datetime.date.fromisoformat(t) for _, t in pairs]
    assert FIRST_DATE <= min(dates) and max(dates) <= LAST_DATE
    assert min(dates).year < 1955 and max(dates).year > 2044        # the whole range is used
    slashes = sum("/" in s for s, _ in pairs)
    assert 0.08 < slashes / len(pairs) < 0.17                        # ~1/8 of the 8 formats


def test_date_pairs_bad_arguments():
    with pytest.raises(ValueError, match="unknown date formats"):
        date_pairs(3, formats=["yyyy"])
    with pytest.raises(ValueError, match="positive integer"):
        date_pairs(0)


def test_number_pairs_read_aloud():
    words = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
             "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}
    pairs = number_pairs(2000, 3, 7, seed=0)
    for source, target in pairs:
        assert "".join(words[w] for w in source.split()) == target
    lengths = Counter(len(t) for _, t in pairs)
    assert set(lengths) == {3, 4, 5, 6, 7}
    assert min(lengths.values()) > 300                              # ~400 each
    assert number_pairs(5, 4, 4, seed=9) == number_pairs(5, 4, 4, seed=9)
    with pytest.raises(ValueError, match="min_digits"):
        number_pairs(5, 4, 3)


def test_vocab_specials_round_trip_and_errors():
    v = Vocab.from_texts(["2026-11-26"])
    assert v.itos[:3] == ["<pad>", "<s>", "</s>"] and (v.PAD, v.BOS, v.EOS) == (0, 1, 2)
    assert v.itos[3:] == sorted(set("2026-11-26"))
    ids = v.encode("2026-11-26")
    assert ids[-1] == Vocab.EOS and len(ids) == 11
    assert v.decode(ids + [5, 5]) == "2026-11-26"                   # stops at EOS
    w = Vocab.from_texts(["six zero four"], split="word")
    assert w.decode(w.encode("four six")) == "four six"
    with pytest.raises(ValueError, match="'x' at position 1"):
        v.encode("2x")
    with pytest.raises(ValueError, match="split"):
        Vocab([], split="bytes")


def test_seq2seq_batch_by_hand():
    src_v = Vocab.from_texts(["ab", "b"])          # a=3, b=4
    tgt_v = Vocab.from_texts(["xy", "y"])          # x=3, y=4
    src, lengths, tgt_in, tgt_out = seq2seq_batch([("ab", "xy"), ("b", "y")], src_v, tgt_v)
    assert src.tolist() == [[3, 4, 2], [4, 2, 0]]
    assert lengths.tolist() == [3, 2]
    assert tgt_in.tolist() == [[1, 3, 4], [1, 4, 0]]               # BOS + target shifted right
    assert tgt_out.tolist() == [[3, 4, 2], [4, 2, 0]]              # target + EOS, then PAD


def test_seq2seq_batches_are_reproducible():
    pairs = date_pairs(200, seed=0)
    sv = Vocab.from_texts([s for s, _ in pairs])
    tv = Vocab.from_texts([t for _, t in pairs])
    a = seq2seq_batches(pairs, pairs, sv, tv, batch_size=16, seed=3)
    b = seq2seq_batches(pairs, pairs, sv, tv, batch_size=16, seed=3)
    for split in ("train", "val", "train"):
        for x, y in zip(a(split), b(split)):
            assert torch.equal(x, y)
