"""The exercises of chapter 15, from GPT to ChatGPT: the SFT loss on the answer tokens,
the DPO loss and its first step (a frozen reference), LoRA's initialisation, forward
pass and merge."""
import math

import torch
import torch.nn.functional as F

from .base import Case, Exercise, f64, randn

# the hints two exercises share
_SIGN_HINT = ("The margin is chosen minus rejected: loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))). "
              "Minimising it must RAISE the chosen answer's log-probability and lower the rejected one's; "
              "with the sign flipped it teaches the opposite preference.")
_NO_REF_HINT = ("Subtract the reference model's log-probabilities: DPO's implicit reward is "
                "beta * (log pi(y) - log pi_ref(y)), so the margin is (pi_c - ref_c) - (pi_r - ref_r). "
                "Without them nothing keeps the policy near the reference.")
_NO_BETA_HINT = "Multiply the margin by beta before the sigmoid: -log sigmoid(beta * margin)."
# three ways of starting B random, one mistake
_B_ZERO_HINT = ("B starts at ZERO (only A is random): then B @ A = 0 and the adapted layer's output at the "
                "start is exactly the base layer's, so fine-tuning starts from the model you had.")


# ----------------------------------------------------------------------------
# 15: supervised fine-tuning: the loss on the answer tokens only
# ----------------------------------------------------------------------------

def sft_loss_ref(logits, targets, answer_mask):
    """Mean cross-entropy over the targets where answer_mask is True.
    logits (B, T, V), targets (B, T), answer_mask (B, T) bool -> a 0-dim tensor."""
    return F.cross_entropy(logits[answer_mask], targets[answer_mask])


def _sft_variant(kind):
    def wrong(logits, targets, answer_mask):
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")           # (B, T)
        mask = answer_mask.to(ce.dtype)
        if kind == "all tokens":
            return ce.mean()
        if kind == "divided by all":
            return (ce * mask).sum() / ce.numel()
        if kind == "per sequence":
            return ((ce * mask).sum(1) / mask.sum(1)).mean()
        if kind == "inverted":
            return ce[~answer_mask].mean()
        return sft_loss_ref(logits, targets, answer_mask)
    return wrong


def _sft_inputs(lengths, T, V, dtype=torch.float32):
    """B = len(lengths) transcripts laid out as a chat batch: a prompt, then an answer of
    lengths[b] tokens (mask True), then padding; logits and targets random."""
    def make(g):
        B = len(lengths)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(lengths):
            start = torch.randint(1, T - n + 1, (1,), generator=g).item()
            mask[b, start:start + n] = True
        return randn(g, B, T, V, dtype=dtype) * 2, torch.randint(0, V, (B, T), generator=g), mask
    return make


# ----------------------------------------------------------------------------
# 15: direct preference optimisation
# ----------------------------------------------------------------------------

def dpo_loss_ref(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """-log sigmoid(beta * ((pc - rc) - (pr - rr))), averaged over the B pairs: a 0-dim tensor."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def _dpo_variant(kind):
    def wrong(pc, pr, rc, rr, beta=0.1):
        margin = (pc - rc) - (pr - rr)
        if kind == "sign":
            return -F.logsigmoid(-beta * margin).mean()
        if kind == "no reference":
            return -F.logsigmoid(beta * (pc - pr)).mean()
        if kind == "no beta":
            return -F.logsigmoid(margin).mean()
        if kind == "sum":
            return -F.logsigmoid(beta * margin).sum()
        if kind == "log of sigmoid":
            return -torch.log(torch.sigmoid(beta * margin)).mean()
        return dpo_loss_ref(pc, pr, rc, rr, beta)
    return wrong


def _dpo_inputs(B, dtype=torch.float32, spread=3.0, beta=None, margin=None):
    """Summed log-probabilities of B pairs' answers (-60 to -5 nats), the policy a few nats
    from the reference; beta random in [0.05, 0.5] unless given. With `margin`, every pair's
    (pc - rc) - (pr - rr) is that many nats (the policy's chosen answer that much lower)."""
    def make(g):
        rc, rr = -5 - 55 * torch.rand(B, generator=g, dtype=f64), -5 - 55 * torch.rand(B, generator=g, dtype=f64)
        pc, pr = rc + spread * randn(g, B, dtype=f64), rr + spread * randn(g, B, dtype=f64)
        if margin is not None:                          # the chosen answer far less likely than before
            pc = rc + (pr - rr) + margin
        b = beta if beta is not None else round(0.05 + 0.45 * torch.rand(1, generator=g).item(), 3)
        return pc.to(dtype), pr.to(dtype), rc.to(dtype), rr.to(dtype), b
    return make


def _answer_logprobs(logp, answers):
    """logp (T, V) log-probabilities of a toy policy, answers (B, T) -> (B,) summed log-probs."""
    positions = torch.arange(logp.shape[0])
    return logp[positions, answers].sum(-1)


def dpo_gradient_ref(logits, chosen, rejected, beta=0.1):
    """DPO's loss at its first step, when the policy is still the reference, and its gradient
    with respect to the toy policy's logits (T, V). Returns (loss, grad)."""
    logits = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(logits, dim=-1)
    policy_chosen, policy_rejected = _answer_logprobs(logp, chosen), _answer_logprobs(logp, rejected)
    ref_chosen, ref_rejected = policy_chosen.detach(), policy_rejected.detach()     # the frozen reference
    loss = dpo_loss_ref(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss.backward()
    return loss.detach(), logits.grad


def _dpo_gradient_variant(kind):
    def wrong(logits, chosen, rejected, beta=0.1):
        logits = logits.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(logits, dim=-1)
        pc, pr = _answer_logprobs(logp, chosen), _answer_logprobs(logp, rejected)
        rc, rr = (pc, pr) if kind == "not detached" else (pc.detach(), pr.detach())
        margin = (pc - rc) - (pr - rr)
        z = {"sign": -beta * margin, "no reference": beta * (pc - pr), "no beta": margin}.get(kind, beta * margin)
        loss = -F.logsigmoid(z).mean()
        loss.backward()
        return loss.detach(), logits.grad
    return wrong


def _dpo_gradient_inputs(B, T, V, dtype=torch.float32, beta=None):
    """A toy policy's logits (T, V) and B pairs of answers (B, T) that differ at least
    at their first token."""
    def make(g):
        chosen = torch.randint(0, V, (B, T), generator=g)
        rejected = torch.randint(0, V, (B, T), generator=g)
        rejected[:, 0] = (chosen[:, 0] + 1 + torch.randint(0, V - 1, (B,), generator=g)) % V
        b = beta if beta is not None else round(0.05 + 0.45 * torch.rand(1, generator=g).item(), 3)
        return randn(g, T, V, dtype=dtype), chosen, rejected, b
    return make


# ----------------------------------------------------------------------------
# 15: LoRA: the initialisation, the forward pass, the merge
# ----------------------------------------------------------------------------

def lora_init_ref(in_features, out_features, r, seed):
    """A (r, in_features) uniform on +-1/sqrt(in_features) (nn.Linear's initialisation, drawn
    from torch.Generator().manual_seed(seed)), B (out_features, r) zero. Returns (A, B)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)
    return torch.empty(r, in_features).uniform_(-bound, bound, generator=g), torch.zeros(out_features, r)


def _lora_init_variant(kind):
    def wrong(in_features, out_features, r, seed):
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(in_features)
        if kind == "kaiming a=0":                       # kaiming_uniform_'s default a=0: sqrt(6 / fan_in)
            bound = math.sqrt(6 / in_features)
        if kind == "shapes":                            # A (in, r), B (r, out): the transposes
            return torch.empty(in_features, r).uniform_(-bound, bound, generator=g), torch.zeros(r, out_features)
        A = torch.empty(r, in_features).uniform_(-bound, bound, generator=g)
        if kind == "B uniform":                         # B initialised as nn.Linear would (fan-in r), after A
            B = torch.empty(out_features, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=g)
        elif kind == "B like A":
            B = torch.empty(out_features, r).uniform_(-bound, bound, generator=g)
        elif kind == "B normal":
            B = torch.randn(out_features, r, generator=g)
        else:
            B = torch.zeros(out_features, r)
        if kind == "both zero":
            A = torch.zeros(r, in_features)
        if kind == "roles swapped":                     # A zero, B random (as nn.Linear, fan-in r): the other way round
            g = torch.Generator().manual_seed(seed)
            A = torch.zeros(r, in_features)
            B = torch.empty(out_features, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=g)
        return A, B
    return wrong


def _lora_init_inputs(in_features, out_features, r):
    return lambda g: (in_features, out_features, r, torch.randint(0, 2 ** 31 - 1, (1,), generator=g).item())


def lora_forward_ref(x, weight, bias, A, B, alpha):
    """x W^T + b + (alpha / r) (x A^T) B^T with r = A.shape[0]; bias may be None."""
    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out + (alpha / A.shape[0]) * ((x @ A.T) @ B.T)


def _lora_forward_variant(kind):
    def wrong(x, weight, bias, A, B, alpha):
        r = A.shape[0]
        scale = {"no scale": 1.0, "r / alpha": r / alpha, "sqrt r": alpha / math.sqrt(r)}.get(kind, alpha / r)
        update = scale * ((x @ A.T) @ B.T)
        if kind == "no base":
            return update
        out = x @ weight.T
        if bias is not None and kind != "no bias":
            out = out + bias
        return out + update
    return wrong


def _lora_forward_inputs(lead, in_features, out_features, r, alpha, bias=True, dtype=torch.float32):
    def make(g):
        x = randn(g, *lead, in_features, dtype=dtype)
        weight = randn(g, out_features, in_features, dtype=dtype) / math.sqrt(in_features)
        b = randn(g, out_features, dtype=dtype) if bias else None
        A = randn(g, r, in_features, dtype=dtype) / math.sqrt(in_features)
        B = randn(g, out_features, r, dtype=dtype)                       # trained: no longer zero
        return x, weight, b, A, B, alpha
    return make


def lora_merge_ref(weight, A, B, alpha):
    """W + (alpha / r) B @ A: (out_features, in_features)."""
    return weight + (alpha / A.shape[0]) * (B @ A)


def _lora_merge_variant(kind):
    def wrong(weight, A, B, alpha):
        r = A.shape[0]
        scale = {"no scale": 1.0, "r / alpha": r / alpha, "sqrt r": alpha / math.sqrt(r)}.get(kind, alpha / r)
        update = scale * (A.T @ B.T if kind == "transposed" else B @ A)
        return update if kind == "no base" else weight + update
    return wrong


def _lora_merge_inputs(in_features, out_features, r, alpha, dtype=torch.float32):
    def make(g):
        return (randn(g, out_features, in_features, dtype=dtype) / math.sqrt(in_features),
                randn(g, r, in_features, dtype=dtype) / math.sqrt(in_features),
                randn(g, out_features, r, dtype=dtype), alpha)
    return make


_SCALE_HINTS = [
    ("no scale", "Scale the low-rank update by alpha / r (r = A.shape[0], the rank): LoRA's "
                 "scale = alpha / r keeps the update's size the same when you change r."),
    ("r / alpha", "The scale is alpha / r, not r / alpha."),
    ("sqrt r", "The scale is alpha / r (as in the LoRA paper and gptcourse.lora); alpha / sqrt(r) is rsLoRA's, "
               "another method."),
]

_LORA_REFS = ("gptcourse.lora.LoRALinear.forward", "gptcourse.lora.LoRALinear.merged",
              "gptcourse.lora.LoRALinear.delta_weight", "gptcourse.lora.merge_lora")


# ----------------------------------------------------------------------------


EXERCISES = [
    Exercise("sft_loss", "sft_loss", "Exercise 15.1: the SFT loss on the answer tokens",
             "15_from_gpt_to_chatgpt", sft_loss_ref,
             [Case("B=3 transcripts, answers of 2, 5 and 3 tokens, V=12", _sft_inputs((2, 5, 3), 9, 12), 2),
              Case("B=2, answers of 1 and 6 tokens, float64", _sft_inputs((1, 6), 10, 7, f64), 2),
              Case("B=4, T=16, V=50", _sft_inputs((4, 9, 1, 6), 16, 50)),
              Case("one transcript, a 3-token answer", _sft_inputs((3,), 8, 10))],
             [("all tokens", _sft_variant("all tokens"),
               "Count only the answer tokens: the mean is over the positions where answer_mask is True. "
               "The system and user tokens are context the model reads, not text it should learn to write."),
              ("divided by all", _sft_variant("divided by all"),
               "Divide by the number of answer tokens (answer_mask.sum()), not by all B * T positions: "
               "the loss must not shrink when the prompts get longer."),
              ("per sequence", _sft_variant("per sequence"),
               "Average over all the answer tokens of the batch together, not per transcript and then over "
               "transcripts: every answer token weighs the same, F.cross_entropy(logits[mask], targets[mask])."),
              ("inverted", _sft_variant("inverted"),
               "answer_mask is True on the tokens to learn (the answers): you counted the other ones.")],
             ("gptcourse.sft.sft_loss", "gptcourse.grading.exercises.sft_loss_ref")),
    Exercise("dpo_loss", "dpo_loss", "Exercise 15.2: the DPO loss",
             "15_from_gpt_to_chatgpt", dpo_loss_ref,
             [Case("policy = reference (margin 0): log 2", lambda g: (torch.tensor([-12.0, -30.5]),
                   torch.tensor([-14.0, -22.0]), torch.tensor([-12.0, -30.5]), torch.tensor([-14.0, -22.0]), 0.1),
                   fixed=True, trivial=True),
              Case("B=4 pairs", _dpo_inputs(4), 2),
              Case("B=8 pairs, float64", _dpo_inputs(8, f64), 2),
              Case("B=3 pairs, beta=0.5", _dpo_inputs(3, beta=0.5)),
              Case("confidently wrong pairs: margins of -400 nats, beta=0.5", _dpo_inputs(3, beta=0.5, margin=-400.0))],
             [("sign", _dpo_variant("sign"), _SIGN_HINT),
              ("no reference", _dpo_variant("no reference"), _NO_REF_HINT),
              ("no beta", _dpo_variant("no beta"), _NO_BETA_HINT),
              ("sum", _dpo_variant("sum"), "Average over the B pairs (.mean()), not their sum."),
              ("log of sigmoid", _dpo_variant("log of sigmoid"),
               "log(sigmoid(z)) underflows: for z below about -104 sigmoid(z) is 0 in float32 and its log -inf. "
               "Use F.logsigmoid(z), which is exact for every z.")],
             ("gptcourse.dpo.dpo_loss", "gptcourse.grading.exercises.dpo_loss_ref")),
    Exercise("dpo_gradient", "dpo_first_step", "Exercise 15.3: DPO's first step, with a frozen reference",
             "15_from_gpt_to_chatgpt", dpo_gradient_ref,
             [Case("B=2 pairs of 3-token answers, V=5", _dpo_gradient_inputs(2, 3, 5), 2),
              Case("B=4 pairs of 6-token answers, V=20, float64", _dpo_gradient_inputs(4, 6, 20, f64), 2),
              Case("one pair, beta=0.1", _dpo_gradient_inputs(1, 4, 8, beta=0.1))],
             [("not detached", _dpo_gradient_variant("not detached"),
               "The reference model is frozen: compute its log-probabilities under torch.no_grad() (or "
               ".detach() them). Here the policy IS the reference (DPO starts from the SFT model), so a "
               "gradient flowing through the reference cancels the policy's exactly: the gradient is 0 and "
               "the policy never moves."),
              ("sign", _dpo_gradient_variant("sign"), _SIGN_HINT),
              ("no reference", _dpo_gradient_variant("no reference"), _NO_REF_HINT),
              ("no beta", _dpo_gradient_variant("no beta"), _NO_BETA_HINT)],
             ("gptcourse.dpo.dpo_loss", "gptcourse.dpo.sequence_logprobs",
              "gptcourse.grading.exercises.dpo_gradient_ref", "gptcourse.grading.exercises.dpo_loss_ref")),
    Exercise("lora_init", "lora_init", "Exercise 15.4: LoRA's two matrices at the start",
             "15_from_gpt_to_chatgpt", lora_init_ref,
             [Case("in 16, out 8, rank 2", _lora_init_inputs(16, 8, 2), 2),
              Case("SmolLM2's w_v: in 576, out 192, rank 8", _lora_init_inputs(576, 192, 8), 2),
              Case("in 10, out 12, rank 1", _lora_init_inputs(10, 12, 1))],
             [("B uniform", _lora_init_variant("B uniform"), _B_ZERO_HINT),
              ("B like A", _lora_init_variant("B like A"), _B_ZERO_HINT),
              ("B normal", _lora_init_variant("B normal"), _B_ZERO_HINT),
              ("both zero", _lora_init_variant("both zero"),
               "A must be random: with A = 0 and B = 0 both gradients are 0 (each is the other times "
               "something) and the adapter never learns."),
              ("roles swapped", _lora_init_variant("roles swapped"),
               "It is A (r, in_features), the matrix x meets first, that is random, and B that starts at zero."),
              ("kaiming a=0", _lora_init_variant("kaiming a=0"),
               "A's bound is 1/sqrt(in_features), nn.Linear's: kaiming_uniform_ with a=math.sqrt(5). "
               "With the default a=0 the bound is sqrt(6/in_features)."),
              ("shapes", _lora_init_variant("shapes"),
               "A is (r, in_features): x @ A.T maps the in_features inputs to r numbers; B is "
               "(out_features, r): it maps them back up. B @ A then has W's shape (out_features, in_features).")],
             ("gptcourse.lora.LoRALinear.__init__", "gptcourse.grading.exercises.lora_init_ref")),
    Exercise("lora_forward", "lora_forward", "Exercise 15.5: a LoRA layer's forward pass",
             "15_from_gpt_to_chatgpt", lora_forward_ref,
             [Case("B=2, T=5, 16 -> 8, rank 2, alpha 16", _lora_forward_inputs((2, 5), 16, 8, 2, 16.0), 2),
              Case("SmolLM2's w_v, no bias: 576 -> 192, rank 8, alpha 16, float64",
                   _lora_forward_inputs((1, 3), 576, 192, 8, 16.0, bias=False, dtype=f64), 2),
              Case("4 tokens, 12 -> 12, rank 3, alpha 3 (scale 1)", _lora_forward_inputs((4,), 12, 12, 3, 3.0)),
              Case("rank 4, alpha 32", _lora_forward_inputs((3, 2), 10, 6, 4, 32.0))],
             [*((kind, _lora_forward_variant(kind), hint) for kind, hint in _SCALE_HINTS),
              ("no bias", _lora_forward_variant("no bias"),
               "Keep the base layer's bias (when it has one): y = x W^T + b + (alpha / r) (x A^T) B^T."),
              ("no base", _lora_forward_variant("no base"),
               "The frozen base layer's output stays: LoRA ADDS (alpha / r) (x A^T) B^T to x W^T + b.")],
             _LORA_REFS + ("gptcourse.grading.exercises.lora_forward_ref",)),
    Exercise("lora_merge", "lora_merge", "Exercise 15.6: merging LoRA back into the weight",
             "15_from_gpt_to_chatgpt", lora_merge_ref,
             [Case("16 -> 8, rank 2, alpha 4", _lora_merge_inputs(16, 8, 2, 4.0), 2),
              Case("square 12 x 12, rank 3, alpha 6", _lora_merge_inputs(12, 12, 3, 6.0), 2),
              Case("SmolLM2's w_v: 576 -> 192, rank 8, alpha 16, float64", _lora_merge_inputs(576, 192, 8, 16.0, f64)),
              Case("rank 1, alpha 1 (scale 1)", _lora_merge_inputs(6, 5, 1, 1.0))],
             [*((kind, _lora_merge_variant(kind), hint) for kind, hint in _SCALE_HINTS),
              ("transposed", _lora_merge_variant("transposed"),
               "The update of W is B @ A, (out_features, r) @ (r, in_features): W's own shape. "
               "A.T @ B.T is its transpose."),
              ("no base", _lora_merge_variant("no base"),
               "Return the merged weight W + (alpha / r) B @ A: the base weight plus the update, "
               "not the update alone.")],
             _LORA_REFS + ("gptcourse.grading.exercises.lora_merge_ref",)),
]
