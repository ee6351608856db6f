import io
import sys
import urllib.error
import urllib.request

import pydoc_data.topics
import pytest
import torch

from gptcourse import data
from gptcourse.data import get_batch, load_corpus, train_val_split


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """Point the download cache at an empty temporary folder."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("GPTCOURSE_OFFLINE", raising=False)
    return tmp_path / "cache"


# ---------------------------------------------------------------- corpus


def test_pydoc_corpus():
    text = load_corpus()
    assert text == load_corpus("pydoc") == "".join(pydoc_data.topics.topics.values())
    assert len(text) > 100_000


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="pydoc topics differ between Python versions")
def test_pydoc_corpus_reference_numbers():
    text = load_corpus("pydoc")
    assert len(text) == 464970
    assert len(set(text)) == 103


def test_tinyshakespeare_offline_env(offline_cache, monkeypatch):
    monkeypatch.setenv("GPTCOURSE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be touched when GPTCOURSE_OFFLINE=1")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.warns(UserWarning, match=r"GPTCOURSE_OFFLINE=1.*falling back to the 'pydoc' corpus"):
        text = load_corpus("tinyshakespeare")
    assert text == load_corpus("pydoc")


def test_tinyshakespeare_download_failure_falls_back(offline_cache, monkeypatch):
    def broken(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", broken)
    with pytest.warns(UserWarning, match=r"URLError.*no route to host.*falling back"):
        text = load_corpus("tinyshakespeare")
    assert text == load_corpus("pydoc")
    assert not (offline_cache / "tinyshakespeare.txt").exists()


def test_tinyshakespeare_download_is_cached(offline_cache, monkeypatch):
    calls = []
    fake_text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"

    def fake_urlopen(url, timeout=None):
        calls.append((url, timeout))
        return io.BytesIO(fake_text.encode("utf-8"))

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert load_corpus("tinyshakespeare") == fake_text
    assert calls == [(data.TINYSHAKESPEARE_URL, 10)]
    assert (offline_cache / "tinyshakespeare.txt").read_text(encoding="utf-8") == fake_text
    assert load_corpus("tinyshakespeare") == fake_text  # second time from the cache
    assert len(calls) == 1


def test_unknown_corpus():
    with pytest.raises(ValueError, match=r"'shakespeare'.*pydoc.*tinyshakespeare"):
        load_corpus("shakespeare")


# ---------------------------------------------------------------- split


def test_train_val_split_tensor():
    d = torch.arange(1000)
    train, val = train_val_split(d)
    assert len(train) == 900 and len(val) == 100
    assert torch.equal(torch.cat([train, val]), d)
    train, val = train_val_split(d, val_fraction=0.25)
    assert torch.equal(train, torch.arange(750)) and torch.equal(val, torch.arange(750, 1000))


def test_train_val_split_str_and_list():
    assert train_val_split("abcdefghij", 0.2) == ("abcdefgh", "ij")
    assert train_val_split([1, 2, 3, 4], 0.5) == ([1, 2], [3, 4])
    text = load_corpus("pydoc")
    train, val = train_val_split(text)
    assert len(train) == int(0.9 * len(text))  # same split as nanoGPT
    assert train + val == text


def test_train_val_split_errors():
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"val_fraction.*{bad}"):
            train_val_split(torch.arange(10), val_fraction=bad)
    with pytest.raises(ValueError, match=r"length 1 .* empty train"):
        train_val_split([7], val_fraction=0.1)
    with pytest.raises(ValueError, match=r"length 5 .* empty val"):
        train_val_split("abcde", val_fraction=1e-20)  # 1 - 1e-20 == 1.0 in floating point


# ---------------------------------------------------------------- batches


def test_get_batch_shapes_and_shift():
    d = torch.arange(100, 1100)  # distinct values, so x[b, 0] tells the offset
    x, y = get_batch(d, block_size=8, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 8) and y.shape == (4, 8)
    assert x.dtype == torch.long and y.dtype == torch.long
    for b in range(4):
        offset = int(x[b, 0]) - 100
        assert torch.equal(x[b], d[offset : offset + 8])
        assert torch.equal(y[b], d[offset + 1 : offset + 9])
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_get_batch_uses_every_offset():
    d = torch.arange(11)  # block_size 8: offsets 0, 1, 2 are the only valid ones
    x, y = get_batch(d, block_size=8, batch_size=300, generator=torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2}
    assert int(y.max()) == 10
    x, y = get_batch(torch.arange(9), block_size=8, batch_size=2)  # exactly one window
    assert torch.equal(x, torch.arange(8).expand(2, 8)) and torch.equal(y, torch.arange(1, 9).expand(2, 8))


def test_get_batch_reproducible():
    d = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(123))
    x1, y1 = get_batch(d, 16, 8, generator=torch.Generator().manual_seed(42))
    x2, y2 = get_batch(d, 16, 8, generator=torch.Generator().manual_seed(42))
    x3, _ = get_batch(d, 16, 8, generator=torch.Generator().manual_seed(43))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    g = torch.Generator().manual_seed(42)
    a, _ = get_batch(d, 16, 8, generator=g)
    b, _ = get_batch(d, 16, 8, generator=g)  # the generator advances
    assert torch.equal(a, x1) and not torch.equal(a, b)


def test_get_batch_errors():
    with pytest.raises(ValueError, match=r"1-D.*\(4, 25\)"):
        get_batch(torch.zeros(4, 25, dtype=torch.long), block_size=8, batch_size=2)
    with pytest.raises(ValueError, match=r"length 8 .* block_size 8"):
        get_batch(torch.arange(8), block_size=8, batch_size=2)
    with pytest.raises(ValueError, match="1-D"):
        get_batch([1, 2, 3], block_size=1, batch_size=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_get_batch_cuda():
    d = torch.arange(1000)
    x, y = get_batch(d, 8, 4, generator=torch.Generator().manual_seed(0), device="cuda")
    assert x.device.type == "cuda" and y.device.type == "cuda"
    assert torch.equal(x[:, 1:], y[:, :-1])
