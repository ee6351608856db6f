"""Chapter 15's graded exercises (gptcourse/grading/exercises/ch15_alignment.py): the
references against the library and hand-worked numbers, each usual mistake (written
here as a student would write it) earning its grade and its hint, and the notebooks
through the batch grader: the solutions earn full marks, the stubs zero.

WRONG is also read by tests/test_grading.py, whose test checks that every hint of
every exercise is reached by some wrong submission."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcourse import grading
from gptcourse.dpo import dpo_loss as library_dpo_loss
from gptcourse.grading import grade
from gptcourse.grading.exercises import EXERCISES, ch15_alignment
from gptcourse.lora import LoRALinear
from gptcourse.sft import sft_loss as library_sft_loss

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (11, 2024, 777)
NOTEBOOK = "15_from_gpt_to_chatgpt"
KEYS = [k for k, e in EXERCISES.items() if e.notebook == NOTEBOOK]


# --- wrong submissions, one per usual mistake ---------------------------------

def _nll(logits, targets):
    return -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]          # (B, T)


def sft_all_tokens(logits, targets, answer_mask):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def sft_divided_by_all(logits, targets, answer_mask):
    return (_nll(logits, targets) * answer_mask).sum() / answer_mask.numel()


def sft_per_sequence(logits, targets, answer_mask):
    nll = _nll(logits, targets)
    return torch.stack([nll[b][answer_mask[b]].mean() for b in range(len(nll))]).mean()


def sft_inverted(logits, targets, answer_mask):
    return _nll(logits, targets)[answer_mask == 0].mean()


def dpo_sign(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid(beta * ((pr - rr) - (pc - rc))).mean()


def dpo_no_reference(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid(beta * (pc - pr)).mean()


def dpo_no_beta(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid((pc - rc) - (pr - rr)).mean()


def dpo_sum(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).sum()


def dpo_log_of_sigmoid(pc, pr, rc, rr, beta=0.1):
    return -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr)))).mean()


def _first_step(logits, chosen, rejected, beta, loss_fn, detach=True):
    logits = logits.clone().requires_grad_()
    t = torch.arange(logits.shape[0])
    logp = torch.log_softmax(logits, -1)
    pc, pr = logp[t, chosen].sum(1), logp[t, rejected].sum(1)
    ref_logp = torch.log_softmax(logits, -1)                   # the reference: the same weights
    if detach:
        ref_logp = ref_logp.detach()
    rc, rr = ref_logp[t, chosen].sum(1), ref_logp[t, rejected].sum(1)
    loss = loss_fn(pc, pr, rc, rr, beta)
    loss.backward()
    return loss.detach(), logits.grad


def _right_dpo(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def lora_init_b_kaiming(n_in, n_out, r, seed):         # B initialised like any nn.Linear weight
    g = torch.Generator().manual_seed(seed)
    A, B = torch.empty(r, n_in), torch.empty(n_out, r)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
    nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=g)
    return A, B


def lora_init_b_same_bound(n_in, n_out, r, seed):
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(n_in)
    return (torch.empty(r, n_in).uniform_(-bound, bound, generator=g),
            torch.empty(n_out, r).uniform_(-bound, bound, generator=g))


def lora_init_b_randn(n_in, n_out, r, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.empty(r, n_in)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
    return A, torch.randn(n_out, r, generator=g)


def lora_init_both_zero(n_in, n_out, r, seed):
    return torch.zeros(r, n_in), torch.zeros(n_out, r)


def lora_init_roles_swapped(n_in, n_out, r, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.empty(n_out, r)
    nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=g)
    return torch.zeros(r, n_in), B


def lora_init_kaiming_default(n_in, n_out, r, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.empty(r, n_in)
    nn.init.kaiming_uniform_(A, generator=g)                  # a=0: bound sqrt(6 / fan_in)
    return A, torch.zeros(n_out, r)


def lora_init_transposed(n_in, n_out, r, seed):
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(n_in)
    return torch.empty(n_in, r).uniform_(-bound, bound, generator=g), torch.zeros(r, n_out)


def _lora_out(x, weight, bias, A, B, scale, base=True, use_bias=True):
    out = F.linear(x, weight, bias if use_bias else None) if base else 0
    return out + scale * F.linear(F.linear(x, A), B)


def _merge(weight, A, B, scale, base=True, transposed=False):
    update = scale * (A.T @ B.T if transposed else B @ A)
    return weight + update if base else update


WRONG = [
    ("sft_loss", sft_all_tokens, 0, "Count only the answer tokens"),
    ("sft_loss", sft_divided_by_all, 0, "not by all B * T positions"),
    ("sft_loss", sft_per_sequence, 1, "not per transcript"),
    ("sft_loss", sft_inverted, 0, "you counted the other ones"),
    ("dpo_loss", dpo_sign, 1, "The margin is chosen minus rejected"),
    ("dpo_loss", dpo_no_reference, 0, "Subtract the reference model's log-probabilities"),
    ("dpo_loss", dpo_no_beta, 1, "Multiply the margin by beta"),
    ("dpo_loss", dpo_sum, 0, "not their sum"),
    ("dpo_loss", dpo_log_of_sigmoid, 6, "F.logsigmoid(z)"),
    ("dpo_gradient", lambda lg, c, r, b: _first_step(lg, c, r, b, _right_dpo, detach=False), 0,
     "The reference model is frozen"),
    ("dpo_gradient", lambda lg, c, r, b: _first_step(lg, c, r, b, dpo_sign), 0, "The margin is chosen minus rejected"),
    ("dpo_gradient", lambda lg, c, r, b: _first_step(lg, c, r, b, dpo_no_reference), 0, "Subtract the reference"),
    ("dpo_gradient", lambda lg, c, r, b: _first_step(lg, c, r, b, dpo_no_beta), 0, "Multiply the margin by beta"),
    ("lora_init", lora_init_b_kaiming, 0, "B starts at ZERO"),
    ("lora_init", lora_init_b_same_bound, 0, "B starts at ZERO"),
    ("lora_init", lora_init_b_randn, 0, "B starts at ZERO"),
    ("lora_init", lora_init_both_zero, 0, "A must be random"),
    ("lora_init", lora_init_roles_swapped, 0, "It is A (r, in_features)"),
    ("lora_init", lora_init_kaiming_default, 0, "a=math.sqrt(5)"),
    ("lora_init", lora_init_transposed, 0, "A is (r, in_features)"),
    ("lora_forward", lambda x, w, b, A, B, alpha: _lora_out(x, w, b, A, B, 1.0), 1, "Scale the low-rank update"),
    ("lora_forward", lambda x, w, b, A, B, alpha: _lora_out(x, w, b, A, B, A.shape[0] / alpha), 1,
     "not r / alpha"),
    ("lora_forward", lambda x, w, b, A, B, alpha: _lora_out(x, w, b, A, B, alpha / A.shape[0] ** 0.5), 0,
     "rsLoRA"),
    ("lora_forward", lambda x, w, b, A, B, alpha: _lora_out(x, w, b, A, B, alpha / A.shape[0], use_bias=False),
     2, "Keep the base layer's bias"),
    ("lora_forward", lambda x, w, b, A, B, alpha: _lora_out(x, w, b, A, B, alpha / A.shape[0], base=False), 0,
     "LoRA ADDS"),
    ("lora_merge", lambda w, A, B, alpha: _merge(w, A, B, 1.0), 1, "Scale the low-rank update"),
    ("lora_merge", lambda w, A, B, alpha: _merge(w, A, B, A.shape[0] / alpha), 1, "not r / alpha"),
    ("lora_merge", lambda w, A, B, alpha: _merge(w, A, B, alpha / math.sqrt(A.shape[0])), 1, "rsLoRA"),
    ("lora_merge", lambda w, A, B, alpha: _merge(w, A, B, alpha / A.shape[0], transposed=True), 0,
     "A.T @ B.T is its transpose"),
    ("lora_merge", lambda w, A, B, alpha: _merge(w, A, B, alpha / A.shape[0], base=False), 0,
     "not the update alone"),
]


@pytest.mark.parametrize("key, fn, expected, hint", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_usual_mistakes_get_their_grade_and_hint(key, fn, expected, hint):
    for seed in SEEDS:
        result = grade(key, fn, seed=seed)
        assert any(hint in h for h in result["hints"]), (seed, result["hints"])
        assert result["points"] == expected, (seed, result)


def test_every_hint_of_chapter_15_is_reached_by_a_wrong_submission():
    reached = {h for key, fn, _, _ in WRONG for seed in SEEDS for h in grade(key, fn, seed=seed)["hints"]}
    every = {hint for k in KEYS for _, _, hint in EXERCISES[k].mistakes}
    assert every <= reached, every - reached


# --- the references, against the library and by hand ----------------------------

def test_references_agree_with_the_library():
    g = torch.Generator().manual_seed(0)
    for case in EXERCISES["sft_loss"].cases:
        args = case.make(g)
        torch.testing.assert_close(ch15_alignment.sft_loss_ref(*args), library_sft_loss(*args))
    for case in EXERCISES["dpo_loss"].cases:
        args = case.make(g)
        torch.testing.assert_close(ch15_alignment.dpo_loss_ref(*args), library_dpo_loss(*args[:4], beta=args[4])[0])
    for case in EXERCISES["lora_init"].cases:              # A and B as gptcourse.lora.LoRALinear draws them
        n_in, n_out, r, seed = case.make(g)
        A, B = ch15_alignment.lora_init_ref(n_in, n_out, r, seed)
        base = nn.Linear(n_in, n_out)
        torch.manual_seed(seed)                            # the library draws A from the global generator
        layer = LoRALinear(base, r)
        assert torch.equal(A, layer.A.detach()) and torch.equal(B, layer.B.detach())
    for case in EXERCISES["lora_forward"].cases:
        x, weight, bias, A, B, alpha = case.make(g)
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)
        layer = LoRALinear(base, A.shape[0], alpha)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            torch.testing.assert_close(ch15_alignment.lora_forward_ref(x, weight, bias, A, B, alpha), layer(x))
            torch.testing.assert_close(ch15_alignment.lora_merge_ref(weight, A, B, alpha), layer.merged().weight)


def test_dpo_references_by_hand():
    # margin 0: log 2; margin log 3 (beta 1): log(4/3)
    z = torch.zeros(2)
    assert ch15_alignment.dpo_loss_ref(z, z, z, z, 0.3).item() == pytest.approx(math.log(2))
    three = torch.tensor([math.log(3)], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    assert ch15_alignment.dpo_loss_ref(three, zero, zero, zero, 1.0).item() == pytest.approx(math.log(4 / 3))
    # the first step: policy = reference, margin 0, so d loss / d log pi(y_c) = -beta / 2 per pair (mean over B)
    T, V, beta = 2, 3, 0.4
    logits = torch.randn(T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    chosen, rejected = torch.tensor([[0, 1]]), torch.tensor([[2, 1]])
    loss, grad = ch15_alignment.dpo_gradient_ref(logits, chosen, rejected, beta)
    assert loss.item() == pytest.approx(math.log(2))
    p = torch.softmax(logits, -1)
    onehot = lambda ids: F.one_hot(ids[0], V).double()                     # noqa: E731
    d_logp = onehot(chosen) - p - (onehot(rejected) - p)                    # d (log pi(y_c) - log pi(y_r)) / d logits
    torch.testing.assert_close(grad, -beta / 2 * d_logp)
    assert grad[1].abs().max() == 0                                         # the same token at t=1: no gradient


def test_a_solution_using_backward_passes_through_the_monitor():
    """check() runs the function under the call monitor: backward() and .grad work there."""
    def dpo_first_step(logits, chosen, rejected, beta=0.1):
        logits = logits.detach().requires_grad_()
        t = torch.arange(logits.shape[0])
        logp = torch.log_softmax(logits, -1)
        pc, pr = logp[t, chosen].sum(1), logp[t, rejected].sum(1)
        loss = -F.logsigmoid(beta * ((pc - pc.detach()) - (pr - pr.detach()))).mean()
        loss.backward()
        return loss.detach(), logits.grad
    result = grade("dpo_gradient", dpo_first_step, seed=5)
    assert result["points"] == result["possible"], result


def test_calling_the_library_earns_zero():
    from gptcourse import dpo, sft
    for key, fn in (("sft_loss", lambda *a: sft.sft_loss(*a)), ("dpo_loss", lambda *a: dpo.dpo_loss(*a[:4], a[4])[0])):
        result = grade(key, fn, seed=1)
        assert result["points"] == 0 and "earns no points" in result["hints"][0], result


# --- the notebooks, through the batch grader -------------------------------------

def test_batch_grading_of_the_chapter_15_notebooks():
    """Through the worker process (our own notebooks, so without the sandbox): the
    solutions earn full marks (backward() and torch.Generator included), the stubs zero."""
    for folder, full in ((ROOT / "exercises" / "solutions", True), (ROOT / "exercises", False)):
        path = folder / f"{NOTEBOOK}.ipynb"
        report = grading.grade_one(path.stem, path.read_text(), seed=5, notebook=path.stem, sandbox=False,
                                   timeout_s=120)
        assert report["status"] == "graded", report["status"]
        assert sorted(report["exercises"]) == sorted(KEYS)
        for key, result in report["exercises"].items():
            assert result["points"] == (result["possible"] if full else 0), (key, result)
