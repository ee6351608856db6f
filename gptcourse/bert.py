"""BERT's objective on GPT's body: masked language modelling (Devlin et al. 2019).

GPT reads left to right (a causal mask) and predicts the next token. BERT
lets every position see every other (no mask) and predicts tokens that were
hidden: 15% of the positions are chosen; of those, 80% become [MASK], 10% a
random token and 10% stay as they are; the loss is taken on the chosen
positions only. Here the body is the same gptcourse.gpt.GPT, built with
GPTConfig(causal=False).
"""
import torch

from .sampling import evaluating

IGNORE = -100          # targets with this value do not count in the loss


def mask_tokens(ids, mask_id, vocab_size, prob=0.15, generator=None):
    """Choose and corrupt positions for masked-LM training.

    ids: (B, T) token ids. Returns (inputs, targets), both (B, T): inputs with
    the chosen positions corrupted (80% mask_id, 10% random, 10% unchanged),
    targets holding the original id at chosen positions and IGNORE elsewhere.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, T), got {tuple(ids.shape)}")
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    u = torch.rand(ids.shape, generator=generator)
    chosen = u < prob
    how = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (how < 0.8)] = mask_id
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    swap = chosen & (how >= 0.8) & (how < 0.9)
    inputs[swap] = random_ids[swap]
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return inputs, targets


@torch.no_grad()
def fill_in(model, idx, mask_id):
    """Replace every mask_id in idx (B, T) by the model's most likely token."""
    if model.config.causal:
        raise ValueError("fill_in needs a bidirectional model (GPTConfig(causal=False))")
    with evaluating(model):
        logits, _ = model(idx)
    return torch.where(idx == mask_id, logits.argmax(-1), idx)
