"""Turning next-token logits into a token: greedy, temperature, top-k, top-p.

logits: (B, V), one row of unnormalised scores per sequence.
"""
import torch


def top_k_filter(logits, k):
    """Keep the k largest logits of each row, set the rest to -inf. (B, V) -> (B, V)

    Ties at the k-th value are all kept.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive integer, got {k!r}")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus sampling: keep the smallest set of most likely tokens whose
    probabilities sum to at least p; set the rest to -inf. (B, V) -> (B, V)

    A token is dropped when the tokens ranked above it already reach p, so
    the token that crosses p is kept and the most likely token always is.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if p == 1.0:                        # the whole distribution: nothing to drop (a rounded
        return logits.clone()           # cumsum can reach 1.0 before the last token)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    mass_before = torch.cumsum(probs, dim=-1) - probs                  # mass ranked above
    # "reach p" up to rounding: 0.5 + 0.3 may come out as 0.7999999999999999 < 0.8
    drop_sorted = mass_before >= p * (1 - 16 * torch.finfo(probs.dtype).eps)
    drop_sorted[..., 0] = False                                        # even when p underflows
    drop = drop_sorted.scatter(-1, order, drop_sorted)                 # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token of each row. logits (B, V) -> ids (B, 1).

    temperature=0 is greedy (argmax); otherwise logits are divided by the
    temperature, filtered by top-k then top-p, and sampled.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, V), got {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
