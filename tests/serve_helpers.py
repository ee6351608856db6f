"""What the batching and serving tests share (tests/ is on sys.path: tests/conftest.py)."""
import time

import torch

from gptcourse.attention import KVCache
from gptcourse.llama import Llama, LlamaConfig


def tiny_llama_model():
    """A small random Llama (seeded): fast references for the batched, paged and served steps."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48,
                         block_size=128)
    return Llama(config).eval()


def cached_kv(model, tokens):
    """Keys and values of tokens by the model's own forward pass: two lists of (H_kv, T, d)."""
    caches = [KVCache() for _ in model.blocks]
    model(torch.tensor([tokens]), caches=caches)
    return [c.k[0] for c in caches], [c.v[0] for c in caches]


def wait_until(condition, timeout=10.0):
    """Poll condition() every 20 ms until it is true (True) or timeout seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False
