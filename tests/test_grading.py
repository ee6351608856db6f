"""The grader against deliberately wrong submissions: each usual mistake
earns its exact grade and its hint, cheating earns zero, and broken code
never breaks the grader, through check() and through batch grading.

Wrong submissions are written here the way a student would write them, not
taken from the grader's own list of mistakes."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptcourse import grading
from gptcourse.grading import exercises
from gptcourse.grading.exercises import EXERCISES
from gptcourse.grading import grade

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (11, 2024, 777)          # every exact grade must hold for each of these inputs
sys.path.insert(0, str(ROOT / "scripts"))
from make_exercises import NOTEBOOKS  # noqa: E402
from test_exercise_alignment import WRONG as WRONG_CH15  # noqa: E402  (chapter 15's, graded there)


def solution_functions():
    """The reference solutions of the exercise notebooks, as a student would define them."""
    namespace = {"torch": torch, "math": math}
    for _, _, _, items in NOTEBOOKS.values():
        for _, stub, solution in items:
            exec(stub.replace("    raise NotImplementedError", solution), namespace)
    return namespace


SOLUTIONS = solution_functions()


# --- wrong submissions, one per usual mistake ---------------------------------

def sdpa_no_scale(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, -1)
    return w @ v, w


def sdpa_scale_dk(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / q.shape[-1]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, -1)
    return w @ v, w


def sdpa_wrong_axis(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, dim=1 if q.dim() == 3 else 2)        # over the queries
    return w @ v, w


def sdpa_mask_after(q, k, v, mask=None):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
    if mask is not None:
        w = w * mask
    return w @ v, w


def sdpa_mask_inverted(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    w = torch.softmax(s, -1)
    return w @ v, w


def pe_swapped(n, d, base=10000):
    P = torch.zeros(n, d)
    for k in range(n):
        for i in range(d // 2):
            P[k, 2 * i] = math.cos(k / base ** (2 * i / d))
            P[k, 2 * i + 1] = math.sin(k / base ** (2 * i / d))
    return P


def pe_i_over_d(n, d, base=10000):
    P = torch.zeros(n, d)
    for k in range(n):
        for i in range(d // 2):
            P[k, 2 * i] = math.sin(k / base ** (i / d))
            P[k, 2 * i + 1] = math.cos(k / base ** (i / d))
    return P


def pe_multiply(n, d, base=10000):
    P = torch.zeros(n, d)
    for k in range(n):
        for i in range(d // 2):
            P[k, 2 * i] = math.sin(k * base ** (2 * i / d))
            P[k, 2 * i + 1] = math.cos(k * base ** (2 * i / d))
    return P


def ln_unbiased(x, gamma, beta, eps=1e-5):
    return gamma * (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) + beta


def ln_batch_axis(x, gamma, beta, eps=1e-5):
    m, v = x.mean(0, keepdim=True), x.var(0, keepdim=True, unbiased=False)
    return gamma * (x - m) / torch.sqrt(v + eps) + beta


def ln_eps_outside(x, gamma, beta, eps=1e-5):
    m = x.mean(-1, keepdim=True)
    return gamma * (x - m) / (((x - m) ** 2).mean(-1, keepdim=True).sqrt() + eps) + beta


def merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


def merge_right_to_left(ids, pair, new_id):
    out, i = [], len(ids) - 1
    while i >= 0:
        if i > 0 and (ids[i - 1], ids[i]) == tuple(pair):
            out.append(new_id)
            i -= 2
        else:
            out.append(ids[i])
            i -= 1
    return out[::-1]


def count_no_positions(L, d, V, block):
    return V * d + L * (12 * d * d + 13 * d) + 2 * d


def count_untied(L, d, V, block):
    return 2 * V * d + block * d + L * (12 * d * d + 13 * d) + 2 * d


def count_12LC2(L, d, V, block):
    return 12 * L * d * d + V * d


def top_k_drops_kth(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits <= kth, float("-inf"))


def top_p_off_by_one(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, -1), -1)
    drop = cum > p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


# mistakes the adversarial review found without a hint

def sdpa_zero_not_inf(q,k,v,mask=None):
    s = q @ k.transpose(-2,-1) / math.sqrt(q.shape[-1])
    if mask is not None: s = s.masked_fill(mask == 0, 0)
    w = torch.softmax(s, -1); return w @ v, w
def pe_halves(n, d, base=10000):
    P = torch.zeros(n, d)
    for k in range(n):
        for i in range(d // 2):
            P[k, i] = math.sin(k / base ** (2 * i / d)); P[k, d // 2 + i] = math.cos(k / base ** (2 * i / d))
    return P
def count_no_final_ln(L, d, V, block):
    return V * d + block * d + L * (12 * d * d + 13 * d)
def topk_neg(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, -1e9)
def topp_sorted(logits, p):
    sl, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sl, -1); keep = torch.cumsum(probs, -1) - probs < p
    return torch.where(keep, sl, torch.tensor(float('-inf')))

def rms_centred(x, w, eps=1e-5):                       # LayerNorm's centring kept
    x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rms_sum(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps) * w


def rms_eps_outside(x, w, eps=1e-5):
    return x / (torch.sqrt((x * x).mean(-1, keepdim=True)) + eps) * w


def rms_no_weight(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rope_student(x, positions, base, halves=False, sign=1.0, exponent_step=2, shift=0):
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * exponent_step / d)
    angle = sign * (positions.double() + shift)[:, None] * theta
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    if halves:                                              # pairs (x_i, x_i+d/2)
        a, b = x[..., :d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


WRONG = [
    # (exercise, submission, exact points, a words of the hint it must earn)
    ("additive_scores", lambda s, h, W, U, v: ((s @ W.T)[:, None] + h @ U.T) @ v, 0, "tanh"),
    ("context_vector", lambda e, h, m: ((h * m[..., None]).sum(1) / m.sum(1, keepdim=True),
                                        m / m.sum(1, keepdim=True)), 1, "plain average"),
    ("context_vector", lambda e, h, m: ((torch.softmax(e, -1)[..., None] * h).sum(1),
                                        torch.softmax(e, -1)), 0, "Padding positions"),
    ("sdpa", sdpa_no_scale, 2, "by sqrt(d_k) before"),
    ("sdpa", sdpa_scale_dk, 2, "not by d_k"),
    ("sdpa", sdpa_wrong_axis, 1, "over the keys"),
    ("sdpa", sdpa_mask_after, 3, "BEFORE the softmax"),
    ("sdpa", sdpa_mask_inverted, 3, "inverted"),
    # T=1 and one position are trivial fixed cases: passing them honestly keeps their point
    ("causal_mask", lambda T: torch.ones(T, T, dtype=torch.bool).triu(), 1, "BELOW the diagonal"),
    ("causal_mask", lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1), 0, "keep the diagonal"),
    ("causal_mask", lambda T: torch.ones(T, T).tril(), 0, "bool tensor"),
    ("causal_mask", lambda T: torch.ones(T, T, dtype=torch.bool).triu(1), 0, "True = blocked"),
    ("split_heads", lambda x, H: x.reshape(x.shape[0], H, x.shape[1], -1), 1, "swap the T and H"),
    ("merge_heads", lambda x: x.reshape(x.shape[0], x.shape[2], -1), 1, "transpose(1, 2)"),
    ("positional", pe_swapped, 0, "look swapped"),
    ("positional", pe_i_over_d, 1, "n^(2i/d), not n^(i/d)"),
    ("positional", pe_multiply, 1, "not k * n^(2i/d)"),
    ("layer_norm", ln_unbiased, 0, "biased variance"),
    ("layer_norm", ln_batch_axis, 0, "not over the batch"),
    ("layer_norm", ln_eps_outside, 1, "inside the square root"),
    # RMSNorm, RoPE (chapter 14); position 0 is a trivial fixed case: its point is kept
    ("rms_norm", rms_centred, 0, "does not subtract the mean"),
    ("rms_norm", rms_sum, 0, "MEAN of the squares"),
    ("rms_norm", rms_eps_outside, 1, "inside the square root: x / sqrt"),
    ("rms_norm", rms_no_weight, 0, "learned scale"),
    ("rope", lambda x, p, base=10000.0: _rope_student(x, p, base, halves=True), 1, "ADJACENT"),
    ("rope", lambda x, p, base=10000.0: _rope_student(x, p, base, sign=-1.0), 1, "counter-clockwise"),
    ("rope", lambda x, p, base=10000.0: _rope_student(x, p, base, exponent_step=1), 1, "arange(0, d, 2)"),
    ("rope", lambda x, p, base=10000.0: _rope_student(x, p, base, shift=1), 0, "position 0"),
    ("bpe_merge", merge_first_only, 2, "EVERY occurrence"),
    ("bpe_merge", merge_right_to_left, 3, "left to right"),
    ("count_params", count_no_positions, 0, "position embeddings"),
    ("count_params", count_untied, 0, "count it once"),
    ("count_params", count_12LC2, 0, "only the blocks' matrices"),
    ("top_k", top_k_drops_kth, 0, "the k-th largest itself"),
    ("top_p", top_p_off_by_one, None, "cumulative probability cross p"),       # None: see the test
    ("kv_cache", lambda ck, cv, kn, vn: (torch.cat([kn, ck], -2), torch.cat([vn, cv], -2)), 0, "AFTER"),
    ("sdpa", sdpa_zero_not_inf, 3, "not 0"),
    ("positional", pe_halves, 0, "Interleave sine and cosine"),
    ("count_params", count_no_final_ln, 0, "final LayerNorm"),
    ("top_k", topk_neg, 1, "not a large negative number"),
    ("top_p", topp_sorted, 0, "original token order"),
]


# chapter 14's new exercises: wrong submissions written as a student would

def rope_float32_angles(x, positions, base=10000.0):   # right: float32 angles, as chapter 14 computes them
    d = x.shape[-1]
    theta = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    angle = positions[:, None] * theta                 # int64 * float32 -> float32
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)


def rope_integer_exponent(x, positions, base=10000.0):
    d = x.shape[-1]
    theta = base ** -(torch.arange(0, d, 2) // d)      # integer division: every exponent is 0
    angle = positions.double()[:, None] * theta
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def rope_half_angles(x, positions, base=10000.0):      # the angles in x's dtype
    d = x.shape[-1]
    theta = (base ** (-torch.arange(0, d, 2) / d)).to(x.dtype)
    angle = positions.to(x.dtype)[:, None] * theta
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(-2)


def rope_float32_result(x, positions, base=10000.0):   # never cast back to x's dtype
    d = x.shape[-1]
    angle = positions.float()[:, None] * base ** (-torch.arange(0, d, 2).float() / d)
    a, b = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(-2)


def _gqa_student(q, k, v, tile=False, scale=True, causal=True):
    g = q.shape[1] // k.shape[1]
    if tile:
        k, v = k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1)
    else:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2)
    if scale:
        s = s / q.shape[-1] ** 0.5
    if causal:
        T = q.shape[2]
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return s.softmax(-1) @ v


SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _chatml_student(messages, system=True, end="<|im_end|>\n", prompt="<|im_start|>assistant\n"):
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SYSTEM}] + messages
    return "".join("<|im_start|>" + m["role"] + "\n" + m["content"] + end for m in messages) + prompt


WRONG += [
    ("rope", rope_integer_exponent, 1, "true division"),
    ("rope", rope_half_angles, 4, "not in x's dtype"),
    ("rope", rope_float32_result, 3, "cast back with .to(x.dtype)"),
    ("gqa", lambda q, k, v: _gqa_student(q, k, v, tile=True), 2, "repeat_interleave"),
    ("gqa", lambda q, k, v: _gqa_student(q, k, v, scale=False), 1, "sqrt(d)"),
    ("gqa", lambda q, k, v: _gqa_student(q, k, v, causal=False), 1, "causal"),
    ("chatml", lambda m: _chatml_student(m, system=False), 2, "default one first"),
    ("chatml", lambda m: _chatml_student(m, end="<|im_end|>"), 0, "AND a newline"),
    ("chatml", lambda m: _chatml_student(m, prompt=""), 0, "generation prompt <|im_start|>assistant"),
    ("chatml", lambda m: _chatml_student(m, prompt="<|im_start|>assistant"), 0, "ends with a newline too"),
    ("kv_bytes", lambda L, H, H_kv, d, b: L * H_kv * d * b, 0, "multiply by 2"),
    ("kv_bytes", lambda L, H, H_kv, d, b: 2 * L * H * d * b, 0, "n_head does not enter"),
    ("kv_bytes", lambda L, H, H_kv, d, b: 2 * L * H_kv * d, 0, "multiply by bytes_per_element"),
]


@pytest.mark.parametrize("key", list(EXERCISES))
def test_reference_solutions_earn_full_marks(key):
    fn = SOLUTIONS[EXERCISES[key].function]
    for seed in SEEDS:
        result = grade(key, fn, seed=seed)
        assert result["points"] == result["possible"], result
        assert result["hints"] == []


@pytest.mark.parametrize("key, fn, expected, hint", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_usual_mistakes_get_their_grade_and_hint(key, fn, expected, hint):
    for seed in SEEDS:
        result = grade(key, fn, seed=seed)
        assert any(hint in h for h in result["hints"]), result["hints"]
        if expected is None:
            # drop-when-cumsum>p keeps everything at p=1.0 unless rounding pushes the
            # running sum just past 1.0, so that one case may go either way
            assert result["points"] <= 1
        else:
            assert result["points"] == expected, (seed, result)


def test_every_hint_is_reached_by_a_wrong_submission():
    reached = set()
    for key, fn, _, _ in WRONG + WRONG_CH15:
        for seed in SEEDS:
            reached.update(grade(key, fn, seed=seed)["hints"])
    every = {hint for e in EXERCISES.values() for _, _, hint in e.mistakes}
    assert every <= reached, every - reached


def test_stub_reports_not_implemented():
    def scaled_dot_product_attention(q, k, v, mask=None):
        raise NotImplementedError
    result = grade("sdpa", scaled_dot_product_attention, seed=1)
    assert result["points"] == 0
    assert all("not implemented yet" in t["message"] for t in result["tests"])
    assert "Fill in the YOUR CODE block" in result["hints"][0]


@pytest.mark.parametrize("fn, message", [
    (lambda q, k, v, mask=None: 1 / 0, "raised ZeroDivisionError"),
    (lambda q, k, v, mask=None: (q[..., :1], None), "expected shape"),
    (lambda q, k, v, mask=None: tuple(t * float("nan") for t in SOLUTIONS["scaled_dot_product_attention"](
        q, k, v, mask)), "contains NaN"),
    (lambda q, k, v, mask=None: tuple(t.half() for t in SOLUTIONS["scaled_dot_product_attention"](
        q, k, v, mask)), "expected dtype"),
    (lambda q, k, v, mask=None: "attention!", "expected a tuple of 2 items"),
])
def test_broken_code_fails_readably(fn, message):
    result = grade("sdpa", fn, seed=3)
    assert result["points"] == 0
    assert all(message in t["message"] for t in result["tests"]), result["tests"]


def test_endless_loop_hits_the_time_limit(monkeypatch):
    monkeypatch.setattr(grading, "TIME_LIMIT_S", 0.5)

    def forever(q, k, v, mask=None):
        while True:
            pass
    exercise = EXERCISES["sdpa"]
    inputs = grading.case_inputs(exercise, 5)
    result = grading.score(exercise, grading.run_cases(exercise, forever, inputs, 0.5), inputs)
    assert result["points"] == 0
    assert "did not return within 0.5 s" in result["tests"][0]["message"]
    assert "not run" in result["tests"][1]["message"]


def test_calling_the_reference_earns_zero():
    from gptcourse.attention import scaled_dot_product_attention as renamed
    import torch.nn.functional as F

    def uses_library(q, k, v, mask=None):
        return renamed(q, k, v, mask)

    def uses_pytorch(q, k, v, mask=None):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out, None

    def uses_grader_reference(q, k, v, mask=None):
        return exercises.sdpa_ref(q, k, v, mask)

    def hides_the_call(q, k, v, mask=None):
        sys.setprofile(None)                   # switch off the call monitor first
        return renamed(q, k, v, mask)

    for fn in (uses_library, uses_pytorch, uses_grader_reference, hides_the_call):
        result = grade("sdpa", fn, seed=4)
        assert result["points"] == 0, fn.__name__
        assert "earns no points" in result["hints"][0]
    result = grade("layer_norm", lambda x, g, b, eps=1e-5: torch.nn.functional.layer_norm(
        x, x.shape[-1:], g, b, eps), seed=4)
    assert result["points"] == 0
    assert grade("count_params", lambda L, d, V, T: exercises.gpt.count_params(
        exercises.gpt.GPTConfig(n_layer=L, n_head=1, n_embd=d, vocab_size=V, block_size=T)), seed=4)["points"] == 0


def test_calling_ready_made_rmsnorm_or_rope_earns_zero():
    from gptcourse import llama
    ready_made = [
        ("rms_norm", lambda x, w, eps=1e-5: torch.nn.functional.rms_norm(x, x.shape[-1:], w, eps)),
        ("rms_norm", lambda x, w, eps=1e-5: torch.nn.RMSNorm(x.shape[-1], eps=eps, dtype=x.dtype)(x) * w),
        ("rms_norm", lambda x, w, eps=1e-5: llama.rms_norm(x, w, eps)),
        ("rope", lambda x, p, base=10000.0: llama.apply_rope(x, llama.rope_angles(p, x.shape[-1], base))),
        ("rope", lambda x, p, base=10000.0: exercises.rope_ref(x, p, base)),
    ]
    for key, fn in ready_made:
        result = grade(key, fn, seed=4)
        assert result["points"] == 0, (key, result)


def test_hard_coded_answers_earn_zero():
    # the answer for the inputs a notebook shows, returned whatever the inputs
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 8, generator=gen)
    shown = SOLUTIONS["scaled_dot_product_attention"](q, q, q)

    def memorised(q, k, v, mask=None):
        return shown
    assert grade("sdpa", memorised, seed=6)["points"] == 0
    # right on GPT-2's published count (a fixed example), wrong on random configs
    result = grade("count_params", lambda *a: 124_439_808, seed=6)
    assert result["points"] == 0
    assert result["tests"][0]["message"] == "counts only when a test with fresh random inputs passes too"
    assert "right only on the fixed examples" in result["hints"][-1]
    assert grade("causal_mask", lambda T: torch.ones(4, 4, dtype=torch.bool).tril()[:T, :T],
                 seed=6)["points"] == 0


def test_patching_the_grader_or_printing_pass_earns_zero(capsys):
    def patches_compare(q, k, v, mask=None):
        grading.compare = lambda *a, **kw: None
        print("PASS 8/8 points")
        return q, None

    def patches_torch(q, k, v, mask=None):
        torch.isclose = lambda a, b, **kw: torch.ones_like(a, dtype=torch.bool)
        return q, q
    original_compare, original_isclose = grading.compare, torch.isclose
    for fn in (patches_compare, patches_torch):
        result = grade("sdpa", fn, seed=7)
        assert result["points"] == 0
        assert "changes the grader or torch" in result["tests"][0]["message"]
    assert grading.compare is original_compare and torch.isclose is original_isclose   # restored


def test_no_module_frame_or_globals_is_reachable_from_the_allowed_modules():
    """Walk what graded code can reach by attribute from the allowed modules (three
    levels, as the clean room's vetting and the worker's guard let it): no module
    outside the allowed ones, no module's globals, no frame, code object or loader."""
    import importlib
    import importlib.machinery
    import types
    import warnings
    from gptcourse.grading.cleanroom import ALLOWED_MODULES, _attribute_problem
    allowed, seen, found = set(ALLOWED_MODULES), set(), []
    queue = [(m, importlib.import_module(m), 0) for m in ALLOWED_MODULES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while queue:
            path, obj, depth = queue.pop()
            if id(obj) in seen or depth > 3:
                continue
            seen.add(id(obj))
            for name in dir(obj):
                if _attribute_problem(name):                       # refused by the vetting
                    continue
                try:
                    value = getattr(obj, name)
                except Exception:
                    continue
                if isinstance(value, types.ModuleType):
                    if value.__name__ not in allowed:               # the worker's guard refuses it
                        continue
                elif isinstance(value, dict) and ("__builtins__" in value or "__loader__" in value) or \
                        isinstance(value, (importlib.machinery.ModuleSpec, types.FrameType, types.CodeType,
                                           types.TracebackType)) or type(value).__name__.endswith("Loader"):
                    found.append(f"{path}.{name}")
                elif isinstance(value, type) or callable(value):
                    queue.append((f"{path}.{name}", value, depth + 1))
    assert len(seen) > 2000 and not found, found[:10]


def test_check_says_what_the_batch_grader_would_refuse():
    from gptcourse.grading.exercises import EXERCISES
    sdpa = EXERCISES["sdpa"]
    fine = "import torch\ndef scaled_dot_product_attention(q, k, v, mask=None):\n    return q, q\n"
    assert grading.grader_note(sdpa, [fine]) is None
    assert grading.grader_note(sdpa, ["import os\n", fine.replace("return q, q", "return getattr(q, 'T'), q")]) == (
        "Note: the batch grader would not run scaled_dot_product_attention as it stands: code cell 2, line 3: "
        "uses `getattr`, which graded code may not use (it reaches objects by name or opens files); "
        "write the name out.")
    assert "uses F.scaled_dot_product_attention" in grading.grader_note(sdpa, [
        "import torch.nn.functional as F\n" + fine.replace("return q, q", "return F.scaled_dot_product_attention(q, k, v), q")])
    assert "no function named scaled_dot_product_attention" in grading.grader_note(sdpa, ["def my_sdpa(q): pass"])
    assert grading.grader_note(sdpa) is None                 # outside IPython: no history, no note


def test_check_prints_the_report(capsys):
    grading.check("sdpa", sdpa_mask_after)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Exercise 3.1: scaled dot-product attention: 3/8 points"
    assert out[1].startswith("  PASS  B=2, T=5, d_k=8, no mask") and out[1].endswith("1/1")
    assert out[3].startswith("  FAIL  causal mask") and "0/2  item 0: values differ" in out[3]
    assert out[-1] == "  Hint: Apply the mask BEFORE the softmax (masked scores = -inf), so the weights " \
                      "still sum to 1."


# --- batch grading ------------------------------------------------------------

STUB = json.loads((ROOT / "exercises" / "03_scaled_dot_product_attention.ipynb").read_text())
SOLVED = json.loads((ROOT / "exercises" / "solutions" / "03_scaled_dot_product_attention.ipynb").read_text())


def notebook(*cells, base=SOLVED):
    """A submission: the base notebook with extra code cells inserted after the set-up cell."""
    nb = json.loads(json.dumps(base))
    extra = [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
              "source": source} for source in cells]
    nb["cells"][2:2] = extra
    return json.dumps(nb)


def replace_sdpa(body):
    """The solved notebook with scaled_dot_product_attention redefined (after the original)."""
    nb = json.loads(json.dumps(SOLVED))
    nb["cells"].insert(3, {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                           "source": body})
    return json.dumps(nb)


def _weights(q, k, mask=None):
    return ("    w = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))"
            ".masked_fill(~mask if mask is not None else torch.zeros((), dtype=torch.bool), float('-inf')), -1)\n")


# a cheat's attention: PyTorch's ready-made output, the weights by hand (so both items match)
CHEAT_WEIGHTS = ("    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
                 "    if mask is not None:\n        s = s.masked_fill(~mask, float('-inf'))\n"
                 "    w = torch.softmax(s, -1)\n")


def cheat(call):
    return replace_sdpa("import torch.nn.functional as F, functools, threading\n"
                        "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                        + CHEAT_WEIGHTS + f"    out = {call}\n    return out, w\n")


def in_sdpa(*lines, before=""):
    """The solved notebook with scaled_dot_product_attention redefined: a correct
    attention (the weights by hand) that also runs `lines` inside the function."""
    body = "".join(f"    {line}\n" for line in lines)
    return replace_sdpa(before + "import torch.nn.functional as F\n"
                        "def scaled_dot_product_attention(q, k, v, mask=None):\n" + CHEAT_WEIGHTS + body +
                        "    return w @ v, w\n")


def attack_submissions(subs):
    """name -> (notebook text, sdpa points, causal_mask points, words of the status, words of
    sdpa's first message). The grader runs only what the graded function uses (the clean
    room: gptcourse/cleanroom.py), vetted; everything else in a notebook never runs."""
    wrong_scale = ("def scaled_dot_product_attention(q, k, v, mask=None):\n"
                   "    s = q @ k.transpose(-2, -1)\n"
                   "    if mask is not None:\n"
                   "        s = s.masked_fill(~mask, float('-inf'))\n"
                   "    w = torch.softmax(s, -1)\n"
                   "    return w @ v, w\n")
    different = ("def scaled_dot_product_attention(q, k, v, mask=None):\n"     # correct, written otherwise
                 "    s = torch.einsum('...qd,...kd->...qk', q, k) * q.shape[-1] ** -0.5\n"
                 "    if mask is not None:\n        s = torch.where(mask, s, torch.tensor(float('-inf'), dtype=s.dtype))\n"
                 "    w = (s - s.amax(-1, keepdim=True)).exp()\n    w = w / w.sum(-1, keepdim=True)\n"
                 "    return torch.einsum('...qk,...kd->...qd', w, v), w\n"
                 "def causal_mask(T):\n    i = torch.arange(T)\n    return i[:, None] >= i[None, :]\n")
    return {
        "alice_solution": (json.dumps(SOLVED), 8, 3, "graded", ""),
        "amy_different_but_correct": (replace_sdpa(different), 8, 3, "graded", ""),
        "bob_stub": (json.dumps(STUB), 0, 0, "graded", "not implemented"),
        "carol_not_json": ("{ this is not a notebook", 0, 0, "not a valid notebook", "not a valid notebook"),
        "dave_no_scale": (replace_sdpa(wrong_scale), 2, 3, "graded", ""),
        # PyTorch's ready-made attention: by name (read in the text), or by a route that names
        # nothing forbidden (a Transformer layer), which meets the operators blocked below Python
        "eve_torch_function": (cheat("F.scaled_dot_product_attention(q, k, v, attn_mask=mask)"), 0, 3, "graded",
                               "uses F.scaled_dot_product_attention"),
        "eve_aten_op": (cheat("torch.ops.aten.scaled_dot_product_attention(q, k, v, attn_mask=mask)"), 0, 3,
                        "graded", "uses torch.ops.aten.scaled_dot_product_attention"),
        "eve_from_import": (replace_sdpa(
            "from torch.nn.functional import scaled_dot_product_attention as fast\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n" + CHEAT_WEIGHTS +
            "    return fast(q, k, v, attn_mask=mask), w\n"), 0, 3, "graded",
            "uses torch.nn.functional.scaled_dot_product_attention"),
        "eve_transformer_layer": (in_sdpa(
            "layer = torch.nn.TransformerEncoderLayer(q.shape[-1], 1, dim_feedforward=4, dropout=0.0, batch_first=True)",
            "layer(q.reshape(-1, q.shape[-2], q.shape[-1]).float())"), 0, 3, "graded",
            "calls aten::"),
        "eve_getattr": (in_sdpa("out = getattr(F, 'scaled_dot_' + 'product_attention')(q, k, v, attn_mask=mask)"),
                        0, 3, "graded", "uses `getattr`"),
        "eve_dunder_dict": (in_sdpa("out = F.__dict__['scaled_dot_' + 'product_attention'](q, k, v)"),
                            0, 3, "graded", "`.__dict__`"),
        "eve_torch_c": (in_sdpa("torch._C._pop_torch_dispatch_stack(None)"), 0, 3, "graded",
                        "begins with an underscore"),
        "eve_thread": (in_sdpa("import threading", "threading.Thread(target=print).start()"), 0, 3, "graded",
                       "imports threading"),
        "eve_library_reference": (in_sdpa("from gptcourse.attention import scaled_dot_product_attention as ref"),
                                  0, 3, "graded", "imports gptcourse.attention"),
        # the attacks of the second round, written into the graded function itself
        "grace_signal_frames": (in_sdpa("import signal", "signal.signal(signal.SIGALRM, lambda s, f: f.f_back)"),
                                0, 3, "graded", "imports signal"),
        "grace_generator_frames": (in_sdpa("g = (i for i in [1])", "g.gi_frame.f_back.f_globals.clear()"),
                                   0, 3, "graded", "an attribute of frames"),
        "grace_copyreg": (in_sdpa("import copyreg", "copyreg.dispatch_table[torch.Tensor] = print"), 0, 3,
                          "graded", "imports copyreg"),
        "grace_fork_exec": (in_sdpa("import _posixsubprocess"), 0, 3, "graded", "imports _posixsubprocess"),
        "grace_reads_parent_memory": (in_sdpa("open('/proc/1/mem', 'rb').read(64)"), 0, 3, "graded",
                                      "uses `open`"),
        "grace_eval": (in_sdpa("eval('__import__(\"os\").fork()')"), 0, 3, "graded", "uses `eval`"),
        "grace_builtins": (in_sdpa("__builtins__['__import__']('os').fork()"), 0, 3, "graded",
                           "uses `__builtins__`"),
        "grace_numpy_memory": (in_sdpa("import numpy", "numpy.lib.stride_tricks.as_strided(numpy.zeros(1), (1 << 40,))"),
                               0, 3, "graded", "raw memory"),
        # the modules that allowed modules import (torch.os, fractions.sys, numpy's inspect) are out of reach
        "mallory_module_of_a_module": (in_sdpa("import statistics", "statistics.sys.path.insert(0, '/tmp')"),
                                       0, 3, "graded", "may not use the module sys"),
        "mallory_numpy_to_os": (in_sdpa("import numpy", "numpy.ma.extras.ma.inspect.os.remove('/tmp/x')"),
                                0, 3, "graded", "may not use the module numpy.ma"),
        "mallory_device_module": (in_sdpa("torch.get_device_module('cpu').amp"), 0, 3, "graded",
                                  "may not use the module torch.cpu"),
        "mallory_from_import_module": (in_sdpa("from statistics import sys"), 0, 3, "graded",
                                       "may not import the module sys"),
        # special methods that hand C code a hook (raw memory through NumPy's array interface)
        "mallory_array_interface": (in_sdpa("numpy.array(Raw())", before="import numpy\nclass Raw:\n    @property\n"
                                            "    def __array_interface__(self):\n"
                                            "        return {'shape': (1 << 30,), 'typestr': '|u1', 'data': (4096, False), "
                                            "'version': 3}\n"), 0, 3, "graded", "defines __array_interface__"),
        "mallory_type_with_dunders": (in_sdpa("Raw = type('Raw', (), {'__array_interface__': {}})"), 0, 3,
                                      "graded", "uses type other than as type(x)"),
        "grace_pickle_file": (in_sdpa("torch.save(q, '/tmp/x')", "torch.load('/tmp/x', weights_only=False)"),
                              0, 3, "graded", "`.save`"),
        # a helper the function needs, with an attack at the top of its cell: the attack is not
        # something the function uses, so it never runs; a value the function uses that an
        # attack computes is refused
        "grace_hostile_helper": (replace_sdpa(
            "import os\nos.fork()\ndef helper(w, v):\n    return w @ v\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n" + CHEAT_WEIGHTS +
            "    return helper(w, v), w\n"), 8, 3, "graded", ""),
        "grace_hostile_dependency": (replace_sdpa(
            "import os\nCHILD = os.fork()\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n" + CHEAT_WEIGHTS +
            "    return w @ v + CHILD, w\n"), 0, 3, "graded", "imports os"),
        # everything outside the graded functions never runs: the grader, the results channel,
        # the host and the other students are out of reach, and the honest functions count
        "grace_patches_grader": (notebook(
            "import gptcourse.grading as g\n"
            "g.evaluate = lambda ex, outcomes, inputs: dict(points=99, possible=99, tests=[], hints=[])\n"
            "g.compare = lambda *a, **k: None\nprint('PASS 11/11 points')\n", base=STUB), 0, 0, "graded",
            "not implemented"),
        "grace_forges_results": (notebook(
            "import os, torch, io, struct\nb = io.BytesIO()\n"
            "torch.save({'exercise': 'sdpa', 'defined': 'ok', 'cases': [['ok', 1]] * 9}, b)\n"
            "for fd in range(3, 64):\n    try:\n        os.write(fd, struct.pack('<Q', len(b.getvalue())) + b.getvalue())\n"
            "    except OSError:\n        pass\nos._exit(0)\n", base=STUB), 0, 0, "graded", "not implemented"),
        "heidi_hostile_but_honest": (notebook(
            f"for p in [{str(subs)!r} + '/alice_solution.ipynb', {str(subs.parent)!r} + '/out/grades.csv', "
            f"{str(ROOT / 'gptcourse' / 'grading' / 'exercises' / '__init__.py')!r}]:\n"
            "    try:\n        open(p, 'w').write('owned')\n    except OSError:\n        pass\n",
            f"import shutil\nshutil.rmtree({str(subs)!r}, ignore_errors=True)\n",
            "import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 1000'], start_new_session=True)\n",
            "import os\nwhile True:\n    os.fork()\n",
            "hog = b'1' * (6 * 1024 ** 3)\n",
            "while True:\n    pass\n"), 8, 3, "graded", ""),
        "ivan_endless_function": (replace_sdpa(
            "def scaled_dot_product_attention(q, k, v, mask=None):\n    while True:\n        pass\n"),
            0, 3, "graded", "did not return within 2 s"),
        "ivan_catches_the_clock": (replace_sdpa(
            "def scaled_dot_product_attention(q, k, v, mask=None):\n    while True:\n        try:\n"
            "            while True:\n                pass\n        except BaseException:\n            pass\n"),
            0, 0, "time limit", "time limit"),
        "ivan_sparse_output": (replace_sdpa(
            "def scaled_dot_product_attention(q, k, v, mask=None):\n    return q.to_sparse(), object()\n"),
            0, 3, "graded", "returned a builtins.object"),
        "ivan_huge_answer": (replace_sdpa(
            "def scaled_dot_product_attention(q, k, v, mask=None):\n    return torch.zeros(15_000_000), q\n"),
            0, 0, "results too large", "results too large"),
        "judy_definitions_raise": (replace_sdpa(
            "SCALE = 1 / 0\ndef scaled_dot_product_attention(q, k, v, mask=None):\n    return SCALE\n"),
            0, 3, "graded", "the definitions raised ZeroDivisionError"),
    }


def grade_batch(tmp_path, cases, timeout, cell_timeout=3, runner=()):
    """Grade the cases in one run of the command line; the CSV's rows by student and the output folder."""
    subs = tmp_path / "submissions"
    for name, (text, *_rest) in cases.items():
        if text is not None:                                # None: the test made the entry itself
            (subs / f"{name}.ipynb").write_text(text)
    out = tmp_path / "out" / "grades.csv"
    result = subprocess.run(
        [*runner, sys.executable, "-m", "gptcourse.grading", "grade", str(subs), "--out", str(out),
         "--notebook", "03_scaled_dot_product_attention", "--timeout", str(timeout),
         "--cell-timeout", str(cell_timeout),
         "--call-timeout", "2", "--jobs", "2", "--memory-mb", "2048"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return {r["student"]: r for r in csv.DictReader(out.open())}, out


def assert_grades(rows, cases, out):
    assert set(rows) == set(cases)
    report = {r["student"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    wrong = []
    for name, (_, sdpa, causal, status, message) in cases.items():
        row = rows[name]
        statuses = status if isinstance(status, tuple) else (status,)
        first = report[name]["exercises"]["sdpa"]["tests"][0]["message"]
        if (int(row["sdpa"]), int(row["causal_mask"])) != (sdpa, causal) or \
                not any(st in row["status"] for st in statuses) or message not in first:
            wrong.append((name, row["sdpa"], row["causal_mask"], row["status"], first))
        assert row["sandbox"] == "bubblewrap" and row["possible"] == "11"
    assert not wrong, wrong
    return report


def test_batch_grading_against_whole_notebook_limits(tmp_path):
    """The clocks and the memory limit, met by code the graded function needs: a Python
    loop in C meets the definitions' clock (--cell-timeout), one C++ call that never
    returns to Python meets the notebook's wall clock (--timeout), and 2.5 GB against
    2 GB fails. The honest student in the same run keeps full marks."""
    (tmp_path / "submissions").mkdir()
    uses = "def scaled_dot_product_attention(q, k, v, mask=None):\n    return BIG, BIG\n"
    cases = {
        "alice_solution": (json.dumps(SOLVED),),
        "nancy_big_power": (replace_sdpa("BIG = 10 ** (10 ** 8)\n" + uses),),
        "olga_holds_in_cpp": (replace_sdpa("BIG = torch.ones(6000, 6000).matrix_power(1000)\n" + uses),),
        "ken_memory_hog": (replace_sdpa("BIG = [b'1' * (100 << 20) for _ in range(25)]\n" + uses),),
    }
    rows, out = grade_batch(tmp_path, cases, timeout=20, cell_timeout=8)
    report = {r["student"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    first = {name: r["exercises"]["sdpa"]["tests"][0]["message"] for name, r in report.items()}
    assert rows["alice_solution"]["total"] == "11" and rows["alice_solution"]["status"] == "graded"
    assert rows["nancy_big_power"]["sdpa"] == "0" and "did not finish within 8 s" in first["nancy_big_power"]
    assert rows["nancy_big_power"]["causal_mask"] == "3"         # the next exercise runs on
    assert rows["olga_holds_in_cpp"]["total"] == "0" and "time limit of 20 s" in rows["olga_holds_in_cpp"]["status"]
    ken = rows["ken_memory_hog"]
    assert ken["sdpa"] == "0", ken
    assert "memory limit" in ken["status"] or "MemoryError" in first["ken_memory_hog"], (ken, first)


def test_batch_grading_against_attacks(tmp_path):
    """Every attack in one grading run: the cheats earn zero and are told why, honest
    code (however written) keeps full marks, code outside the graded functions never
    runs, and the CSV holds every student, sandboxed."""
    subs = tmp_path / "submissions"
    subs.mkdir()
    cases = attack_submissions(subs)
    (subs / "zoe_folder.ipynb").mkdir()                     # a folder whose name ends in .ipynb: a row, 0 points
    cases["zoe_folder"] = (None, 0, 0, "not a regular file (a folder)", "not a regular file")
    rows, out = grade_batch(tmp_path, cases, timeout=60)
    assert list(csv.reader(out.open()))[0] == ["student", "sdpa", "causal_mask", "total", "possible", "status",
                                               "sandbox"]
    report = assert_grades(rows, cases, out)
    assert any("sqrt(d_k)" in h for h in report["dave_no_scale"]["exercises"]["sdpa"]["hints"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["grades.csv", "grades.json"]   # no temp files left
    assert (ROOT / "gptcourse" / "grading" / "exercises" / "__init__.py").read_text() != "owned"
    assert sorted(p.name for p in subs.iterdir()) == sorted(f"{n}.ipynb" for n in cases)
    leftovers = subprocess.run(["pgrep", "-f", "sleep 1000"], capture_output=True, text=True).stdout
    assert not leftovers.strip(), leftovers                # nothing of a submission outlives the run


HONEST = {
    # correct but unusual: each must keep full marks through the clean room and the sandbox
    "einsum": "def scaled_dot_product_attention(q, k, v, mask=None):\n"
              "    s = torch.einsum('...qd,...kd->...qk', q, k) / math.sqrt(q.shape[-1])\n"
              "    if mask is not None:\n        s = s.masked_fill(~mask, float('-inf'))\n"
              "    w = s.softmax(-1)\n    return torch.einsum('...qk,...kd->...qd', w, v), w\n",
    "float64_inside": "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                      "    s = (q.double() @ k.double().transpose(-2, -1)) / q.shape[-1] ** 0.5\n"
                      "    if mask is not None:\n        s = s.masked_fill(~mask, -math.inf)\n"
                      "    w = torch.softmax(s, dim=-1)\n    return (w @ v.double()).to(q.dtype), w.to(q.dtype)\n",
    "numpy_scalar": "import numpy as np\n"
                    "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                    "    s = q @ k.transpose(-2, -1) / np.sqrt(q.shape[-1])\n"
                    "    if mask is not None:\n        s = s.masked_fill(~mask, float('-inf'))\n"
                    "    w = torch.softmax(s, -1)\n    return w @ v, w\n",
    "helper_in_another_cell": ("SCALE_POWER = -0.5\n",
                               "def softmax_last(s):\n"
                               "    e = (s - s.max(-1, keepdim=True).values).exp()\n    return e / e.sum(-1, keepdim=True)\n"
                               "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                               "    s = q @ k.transpose(-2, -1) * q.shape[-1] ** SCALE_POWER\n"
                               "    if mask is not None:\n        s = torch.where(mask, s, -torch.inf)\n"
                               "    w = softmax_last(s)\n    return w @ v, w\n"),
    "lists_of_tuples_loops": "from math import sqrt\n"
                             "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                             "    d = q.size(-1)\n    scores = torch.matmul(q, k.mT) / sqrt(d)\n"
                             "    if mask is not None:\n        scores = scores.masked_fill(mask.logical_not(), float('-inf'))\n"
                             "    weights = torch.nn.functional.softmax(scores, dim=-1)\n"
                             "    outs = tuple([weights @ v, weights])\n    return outs\n",
    "class_module": "import torch.nn as nn\nclass Attention(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n        self.scale_power = -0.5\n"
                    "    def forward(self, q, k, v, mask=None):\n"
                    "        s = q @ k.transpose(-2, -1) * q.shape[-1] ** self.scale_power\n"
                    "        if mask is not None:\n            s = s.masked_fill(~mask, float('-inf'))\n"
                    "        w = s.softmax(-1)\n        return w @ v, w\n"
                    "ATTENTION = Attention()\n"
                    "def scaled_dot_product_attention(q, k, v, mask=None):\n    return ATTENTION(q, k, v, mask)\n",
    "lambda_and_functools": "import functools\nsoftmax = functools.partial(torch.softmax, dim=-1)\n"
                            "scaled_dot_product_attention = lambda q, k, v, mask=None: (lambda w: (w @ v, w))("
                            "softmax((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill("
                            "~mask, float('-inf')) if mask is not None else q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])))\n",
    "redefined_later": ("import torch.nn.functional as F\n"                       # a first try, replaced
                        "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                        "    return F.scaled_dot_product_attention(q, k, v)\n",
                        "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                        "    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
                        "    if mask is not None:\n        s = s.masked_fill(~mask, float('-inf'))\n"
                        "    w = torch.softmax(s, -1)\n    return w @ v, w\n"),
}


def test_unusual_but_correct_solutions_keep_full_marks(tmp_path):
    """Through the command line, sandboxed: einsum, float64 inside, a NumPy scalar, a
    helper and a constant in other cells, loops and tuples, an nn.Module, a lambda with
    functools, and a first try with the ready-made version replaced in a later cell."""
    subs = tmp_path / "submissions"
    subs.mkdir()
    cases = {name: (notebook(*(cells if isinstance(cells, tuple) else (cells,))), 8, 3, "graded", "")
             for name, cells in HONEST.items()}
    rows, out = grade_batch(tmp_path, cases, timeout=60)
    assert_grades(rows, cases, out)


def as_nobody():
    """A command prefix that runs what follows as the user nobody (uid 65534: no
    capabilities, no writable cgroup), in a private mount namespace where the folders
    above this Python that nobody could not enter (root's 0700 home, say) are replaced
    by an empty one holding only the Python. None where this cannot be arranged."""
    import shutil
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        return None
    real = os.path.realpath(sys.executable)
    steps = []
    parts = Path(real).parents
    for folder in reversed(parts):                    # from / down
        if folder != Path("/") and not os.stat(folder).st_mode & 0o001:
            keep = Path(real).relative_to(folder).parts[0]
            aside = f"/tmp/as-nobody-{os.getpid()}"
            steps += [f"mkdir -p {aside}", f"mount --bind {folder / keep} {aside}",
                      f"mount -t tmpfs -o mode=755,size=1m none {folder}", f"mkdir {folder / keep}",
                      f"mount --bind {aside} {folder / keep}"]
            break
    script = " && ".join(steps + ['exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all '
                                  '--bounding-set=-all env HOME=/tmp "$@"'])
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                            sys.executable, "-c", "import os, torch; print(os.getuid())"],
                           capture_output=True, text=True)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"] \
        if probe.stdout.strip() == "65534" else None


def test_batch_grading_as_an_ordinary_user(tmp_path):
    """The grader run by an ordinary user (nobody here: no capabilities, no cgroup it
    may write): bubblewrap still isolates each notebook, seccomp still refuses new
    processes, and the limits are the per-process ones (one process, RLIMIT_AS and
    RLIMIT_CPU, sized tmpfs). The same attacks earn the same (no) points."""
    import tempfile
    runner = as_nobody()
    if runner is None:
        pytest.skip("needs root to become nobody (unshare, setpriv)")
    with tempfile.TemporaryDirectory(prefix="grading-as-nobody-") as folder:   # pytest's own is 0700
        os.chmod(folder, 0o777)
        _grade_as_nobody(Path(folder), runner)


def _grade_as_nobody(tmp_path, runner):
    subs = tmp_path / "submissions"
    subs.mkdir()
    subs.chmod(0o755)
    everything = attack_submissions(subs)
    keep = ("alice_solution", "amy_different_but_correct", "dave_no_scale", "eve_torch_function", "eve_aten_op",
            "eve_getattr", "grace_fork_exec", "grace_forges_results", "grace_hostile_helper",
            "ivan_endless_function", "ivan_huge_answer")
    cases = {name: everything[name] for name in keep}
    uses = "def scaled_dot_product_attention(q, k, v, mask=None):\n    return BIG, BIG\n"
    cases["ken_memory_hog"] = (replace_sdpa("BIG = bytearray(8 << 30)\n" + uses), 0, 3,
                               "graded", "MemoryError")
    (tmp_path / "out").mkdir(mode=0o777)
    (tmp_path / "out").chmod(0o777)
    rows, out = grade_batch(tmp_path, cases, timeout=60, runner=runner)
    report = assert_grades(rows, cases, out)
    assert {r["limits"] for r in report.values()} == {"rlimit+seccomp"}
    assert os.stat(out).st_uid == 65534                 # written by the ordinary user
    assert not leftover("grading_worker.py")


def test_no_bubblewrap_refuses_unless_unsafe(tmp_path, monkeypatch, capsys):
    import shutil
    from gptcourse.grading import sandbox
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "alice.ipynb").write_text(json.dumps(SOLVED))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name))
    code = grading.main(["grade", str(subs), "--out", str(tmp_path / "g.csv"), "--notebook",
                         "03_scaled_dot_product_attention"])
    assert code == 2 and "bubblewrap (bwrap) is not installed" in capsys.readouterr().err
    assert not (tmp_path / "g.csv").exists()
    with pytest.raises(sandbox.SandboxUnavailable):
        grading.grade_folder(str(subs), str(tmp_path / "g.csv"), notebook="03_scaled_dot_product_attention")
    # installed, but the kernel refuses its namespaces: refused as clearly, before grading anything
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: str(fake) if name == "bwrap" else real_which(name))
    with pytest.raises(sandbox.SandboxUnavailable, match="cannot create its sandbox here.*No permissions"):
        grading.grade_folder(str(subs), str(tmp_path / "g.csv"), notebook="03_scaled_dot_product_attention")
    assert not (tmp_path / "g.csv").exists()
    reports = grading.grade_folder(str(subs), str(tmp_path / "g.csv"), notebook="03_scaled_dot_product_attention",
                                   sandbox=False, progress=False, timeout_s=60)
    assert reports[0]["exercises"]["sdpa"]["points"] == 8
    row = next(csv.DictReader((tmp_path / "g.csv").open()))
    assert row["sandbox"] == "NONE (--unsafe-no-sandbox)"


def test_the_submissions_folder_is_data(tmp_path):
    """Links are not followed (one to the solution, one to a classmate's notebook),
    a FIFO or a folder named *.ipynb is a row with 0 points and a reason, a name
    that is not UTF-8 costs nobody the CSV or the JSON, and a name that a
    spreadsheet would read as a formula is neutralised in the CSV."""
    subs = tmp_path / "submissions"
    subs.mkdir()
    solved = json.dumps(SOLVED)
    (subs / "alice.ipynb").write_text(solved)
    (subs / "=HYPERLINK(1).ipynb").write_text(solved)
    with open(os.path.join(os.fsencode(subs), b"bad\xffname.ipynb"), "w") as f:   # not UTF-8
        f.write(solved)
    (subs / "mallory_copies_alice.ipynb").symlink_to(subs / "alice.ipynb")
    (subs / "mallory_links_solution.ipynb").symlink_to(
        ROOT / "exercises" / "solutions" / "03_scaled_dot_product_attention.ipynb")
    os.mkfifo(subs / "fifo.ipynb")                          # opened for reading, it would block for ever
    (subs / "folder.ipynb").mkdir()
    out = tmp_path / "grades.csv"
    reports = grading.grade_folder(str(subs), str(out), notebook="03_scaled_dot_product_attention",
                                   progress=False, timeout_s=90, jobs=2)
    status = {r["student"]: (r["status"], sum(e["points"] for e in r["exercises"].values())) for r in reports}
    assert status == {
        "=HYPERLINK(1)": ("graded", 11), "alice": ("graded", 11), "bad\\xffname": ("graded", 11),
        "fifo": ("not a regular file (not a plain file): not graded", 0),
        "folder": ("not a regular file (a folder): not graded", 0),
        "mallory_copies_alice": ("not a regular file (a symbolic link): not graded", 0),
        "mallory_links_solution": ("not a regular file (a symbolic link): not graded", 0)}, status
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert sorted(r[0] for r in rows[1:]) == sorted(["'=HYPERLINK(1)", "alice", "bad\\xffname", "fifo", "folder",
                                                     "mallory_copies_alice", "mallory_links_solution"])
    assert not any(cell.startswith(grading.FORMULA_START) for row in rows for cell in row[:1] + row[-2:])
    assert {r["student"] for r in json.loads(out.with_suffix(".json").read_text())} == set(status)


def test_csv_is_replaced_atomically(tmp_path):
    target = tmp_path / "grades.csv"
    target.write_text("old\n")
    grading._write_atomically(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["grades.csv"]


# --- feedback: no false accusations, usual idioms accepted -----------------------

def test_float32_scalar_idiom_on_float64_inputs_earns_full_marks():
    def sdpa(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1) / torch.sqrt(torch.tensor(q.shape[-1]))     # a float32 scalar
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, -1)
        return w @ v, w
    for seed in SEEDS:
        assert grade("sdpa", sdpa, seed=seed)["points"] == 8


def test_integer_answers_of_any_integer_like_type():
    import numpy as np
    right = SOLUTIONS["count_gpt_params"]
    for convert in (float, np.int64, lambda n: torch.tensor(n)):
        result = grade("count_params", lambda *a: convert(right(*a)), seed=5)
        assert result["points"] == result["possible"], convert
    assert grade("count_params", lambda *a: right(*a) + 0.5, seed=5)["points"] == 0


def test_arguments_are_copied_so_mutating_them_changes_nothing():
    def merge_pair(ids, pair, new_id):               # right, but empties its input as it goes
        out = []
        while ids:
            if len(ids) > 1 and (ids[0], ids[1]) == tuple(pair):
                out.append(new_id)
                del ids[:2]
            else:
                out.append(ids.pop(0))
        return out
    result = grade("bpe_merge", merge_pair, seed=3)
    assert result["points"] == result["possible"], result


def test_no_hard_coded_accusation_for_a_trivial_fixed_case():
    # triu() is wrong but passes T=1 honestly: one point, the real hint, no accusation
    result = grade("causal_mask", lambda T: torch.ones(T, T, dtype=torch.bool).triu(), seed=2)
    assert result["points"] == 1
    assert not any("fixed examples" in h for h in result["hints"])
    assert any("BELOW the diagonal" in h for h in result["hints"])


def test_pytorch_blocked_convention_gets_its_hint():
    result = grade("causal_mask", lambda T: torch.ones(T, T, dtype=torch.bool).triu(1), seed=2)
    assert result["points"] == 0
    assert any("True = blocked" in h for h in result["hints"]), result["hints"]


def test_forbidden_by_executed_operators_in_check():
    import functools
    import torch.nn.functional as F

    def aten(q, k, v, mask=None):
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        return torch.ops.aten.scaled_dot_product_attention(q, k, v), w

    def wrapped(q, k, v, mask=None):
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        return list(map(functools.partial(F.scaled_dot_product_attention), [q], [k], [v]))[0], w
    for fn in (aten, wrapped):
        assert grade("sdpa", fn, seed=1)["points"] == 0
    for fn in (lambda x, g, b, eps=1e-5: torch.native_layer_norm(x, x.shape[-1:], g, b, eps)[0],
               lambda x, g, b, eps=1e-5: F.group_norm(x.reshape(-1, x.shape[-1]), 1, g, b, eps).reshape(x.shape)):
        result = grade("layer_norm", fn, seed=1)
        assert result["points"] == 0 and "norm" in result["tests"][0]["message"]


def test_odd_outputs_fail_the_test_without_crashing_the_grader():
    right = SOLUTIONS["scaled_dot_product_attention"]
    for odd in (lambda o, w: (o.to_sparse(), w), lambda o, w: (o.to(torch.complex64), w),
                lambda o, w: (o, w.numpy()), lambda o, w: {"out": o}):
        result = grade("sdpa", lambda q, k, v, mask=None, odd=odd: odd(*right(q, k, v, mask)), seed=2)
        assert result["points"] == 0


# --- the sandbox's own limits, below anything Python does ---------------------------
# A stand-in worker (not vetted, not the real worker) that does what a submission would
# like to, to show the kernel-level limits hold by themselves: seccomp, the cgroup, the
# sized tmpfs, the read-only root, the wall clock, the output cap.

def run_raw_worker(tmp_path, body, timeout_s=4, memory_mb=1000, max_tasks=16, tmp_mb=256):
    import time
    from gptcourse.grading import sandbox
    stub = tmp_path / f"stub{len(list(tmp_path.iterdir()))}"
    stub.mkdir()
    (stub / "grading_worker.py").write_text("import os, sys, time, errno\nsys.stdin.read()\n" + body)
    stub.chmod(0o755)
    start = time.perf_counter()
    run = sandbox.run_worker(str(stub), b'{"result_fd": -1, "rlimit_mb": 0}\n', timeout_s, memory_mb,
                             max_tasks=max_tasks, tmp_mb=tmp_mb)
    return run, time.perf_counter() - start


def leftover(pattern):
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.strip()


def report_lines(run):
    """The raw worker's `name: value` lines on stderr, as a dict."""
    lines = run["stderr"].decode(errors="replace").splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def test_sandbox_limits_hold_without_the_worker(tmp_path):
    # one process touching 1.5 GB: the cgroup's OOM killer ends it
    run, _ = run_raw_worker(tmp_path, "x = b'1' * (1500 << 20)\ntime.sleep(1000)\n", timeout_s=20,
                            memory_mb=256)
    assert run["oom"] and not run["timed_out"], run
    assert run["limits"] in ("cgroup v1", "cgroup v2")
    # threads (the one way left to add tasks) stop at pids.max
    run, _ = run_raw_worker(tmp_path, "import threading\nn = 0\ntry:\n    while True:\n"
                                      "        threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()\n"
                                      "        n += 1\nexcept RuntimeError as e:\n"
                                      "    print('threads:', n, file=sys.stderr)\nos._exit(0)\n",
                            timeout_s=10, max_tasks=12)
    threads = int(report_lines(run)["threads"])
    assert 0 < threads < 12, run
    # every writable place is sized; the root is read-only; there is no /dev/shm
    run, _ = run_raw_worker(tmp_path, """
def fill(path):
    total = 0
    try:
        with open(path, 'wb') as f:
            while True:
                f.write(b'x' * (1 << 20)); f.flush(); total += 1
    except OSError as e:
        return f'{errno.errorcode[e.errno]} after {total} MB'
print('tmp:', fill('/tmp/big'), file=sys.stderr); os.remove('/tmp/big')
print('home:', fill('/home/student/big'), file=sys.stderr); os.remove('/home/student/big')
for path in ('/big', '/usr/big', '/dev/big'):
    print(path + ':', fill(path), file=sys.stderr)
print('shm:', os.path.exists('/dev/shm'), file=sys.stderr)
""", timeout_s=30, tmp_mb=64)
    lines = report_lines(run)
    assert lines["tmp"].startswith("ENOSPC") and int(lines["tmp"].split()[2]) <= 64, lines
    assert lines["home"].startswith("ENOSPC") and int(lines["home"].split()[2]) <= 64, lines
    assert all(lines[p].startswith(("EROFS", "EACCES")) for p in ("/big", "/usr/big", "/dev/big")), lines
    assert lines["shm"] == "False"
    # a worker that never ends: the wall clock ends it, and nothing of it is left
    run, seconds = run_raw_worker(tmp_path, "open('/tmp/marker-1003', 'w')\ntime.sleep(1003)\n", timeout_s=3)
    assert run["timed_out"] and seconds < 15 and not leftover("grading_worker.py")
    # 300 MB of output: the grader keeps the last 64 KB
    run, _ = run_raw_worker(tmp_path, "for _ in range(300):\n    os.write(2, b'x' * (1 << 20))\n", timeout_s=30)
    assert len(run["stderr"]) == 64 * 1024 and not run["timed_out"]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers for x86-64")
def test_seccomp_refuses_every_way_of_starting_a_process_but_threads(tmp_path):
    body = r"""
import ctypes, threading, subprocess
libc = ctypes.CDLL(None, use_errno=True)
def report(name, attempt, marker=None):
    try:
        value = attempt()
        if isinstance(value, int) and value < 0:
            value = 'error ' + errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    except BaseException as e:
        value = type(e).__name__ + ' ' + errno.errorcode.get(getattr(e, 'errno', None) or 0, str(e)[:60])
    time.sleep(0.2)
    ran = marker is not None and os.path.exists(marker)
    print(f'{name}: {value}' + (' RAN' if ran else ''), file=sys.stderr, flush=True)
def child(path):
    open(path, 'w').close(); os._exit(0)
def fork():
    pid = os.fork()
    if pid == 0:
        child('/tmp/fork')
    return pid
report('os.fork', fork, '/tmp/fork')
report('os.posix_spawn', lambda: os.posix_spawn('/usr/bin/touch', ['touch', '/tmp/spawn'], {}), '/tmp/spawn')
report('subprocess.Popen', lambda: subprocess.Popen(['/usr/bin/touch', '/tmp/popen']), '/tmp/popen')
import _posixsubprocess
report('os.system', lambda: os.system('touch /tmp/system') or 'returned 0', '/tmp/system')
import multiprocessing
report('multiprocessing', lambda: multiprocessing.Process(target=child, args=('/tmp/mp',)).start(), '/tmp/mp')
import pty
def forkpty():
    pid, fd = pty.fork()
    if pid == 0:
        child('/tmp/pty')
    return pid
report('pty.fork', forkpty, '/tmp/pty')
report('clone', lambda: libc.syscall(56, 17, 0, 0, 0, 0))     # SIGCHLD: a new process
report('clone3', lambda: libc.syscall(435, 0, 0))
report('vfork', lambda: libc.syscall(58))
report('unshare', lambda: libc.unshare(0x10000000))          # CLONE_NEWUSER
report('setns', lambda: libc.setns(0, 0))
report('ptrace', lambda: libc.ptrace(0, 0, 0, 0))              # PTRACE_TRACEME
buf = ctypes.create_string_buffer(8)
report('process_vm_readv', lambda: libc.process_vm_readv(os.getpid(), 0, 0, 0, 0, 0))
report('mount', lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))
report('bpf', lambda: libc.syscall(321, 0, 0, 0))
report('keyctl', lambda: libc.syscall(250, 0, 0, 0, 0, 0))
report('io_uring_setup', lambda: libc.syscall(425, 1, ctypes.byref(ctypes.create_string_buffer(120))))
import socket
report('socket', lambda: socket.socket(socket.AF_UNIX))
done = []
t = threading.Thread(target=done.append, args=('ran',)); t.start(); t.join()
report('thread', lambda: done[0])
"""
    run, _ = run_raw_worker(tmp_path, body, timeout_s=60)
    lines = report_lines(run)
    for name in ("os.fork", "os.posix_spawn", "subprocess.Popen", "multiprocessing", "clone", "vfork",
                 "unshare", "setns", "ptrace", "process_vm_readv", "mount", "bpf", "keyctl", "io_uring_setup",
                 "socket"):
        assert "EPERM" in lines[name] and "RAN" not in lines[name], (name, lines)
    assert "ENOSYS" in lines["clone3"]                  # glibc then falls back to clone, refused above
    assert lines["os.system"] != "returned 0" and "RAN" not in lines["os.system"], lines
    assert "RAN" not in lines["pty.fork"] and "Error" in lines["pty.fork"], lines
    assert lines["thread"] == "ran"
    assert not leftover("grading_worker.py")


# --- chapter 14's exercises against the course's own implementations -------------

def test_rope_accepts_float32_angles_as_chapter_14_computes_them():
    """Angles m * theta in float32 (gptcourse.llama.rope_angles, and a student following
    chapter 14) are off by ~1e-5 near m = 100: every case must still pass, and so must
    the library's own RoPE (its outputs compared outside the grader, which forbids it)."""
    from gptcourse import llama
    exercise = EXERCISES["rope"]
    for seed in SEEDS:
        assert grade("rope", rope_float32_angles, seed=seed)["points"] == exercise.possible
        for case, args in zip(exercise.cases, grading.case_inputs(exercise, seed)):
            x, positions, base = args
            ours = llama.apply_rope(x, llama.rope_angles(positions, x.shape[-1], base))
            assert grading.compare(ours, exercise.reference(*args), case.rtol, case.atol) is None, case.name
    # the tolerance is loose enough for float32 angles, not for a wrong angle: position + 1
    # changes the first pair by up to 2 sin(1/2) ~ 0.96 at |x| ~ 1
    x = torch.randn(1, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = torch.arange(100, 104)
    off = (llama.apply_rope(x, llama.rope_angles(p, 16)).double() - exercises.rope_ref(x, p)).abs().max().item()
    assert 1e-7 < off < 1e-4            # float32 angles: beyond float64's default atol, within the case's


def test_rope_reference_by_hand():
    """One pair rotated by hand: position 3, d = 2 (theta_0 = 1), so the angle is 3 radians."""
    x = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 1.0]]], dtype=torch.float64)
    out = exercises.rope_ref(x, torch.arange(4))
    c, s = math.cos(3.0), math.sin(3.0)
    assert out[0, 3].tolist() == pytest.approx([2 * c - 1 * s, 2 * s + 1 * c], abs=1e-15)
    assert exercises.rope_ref(x.half(), torch.arange(4)).dtype == torch.float16


def test_gqa_reference_is_the_library_attention():
    """gqa_ref inside the library's GroupedQueryAttention (its projections and RoPE by hand)
    gives the module's output, for SmolLM2's 9 query / 3 key-value heads."""
    from gptcourse import llama
    torch.manual_seed(0)
    attn = llama.GroupedQueryAttention(n_embd=36, n_head=9, n_kv_head=3, fast=False).double()
    x = torch.randn(2, 5, 36, dtype=torch.float64)
    angles = llama.rope_angles(torch.arange(5), 4)
    B, T, d = 2, 5, 4
    q = llama.apply_rope(attn.w_q(x).view(B, T, 9, d).transpose(1, 2), angles)
    k = llama.apply_rope(attn.w_k(x).view(B, T, 3, d).transpose(1, 2), angles)
    v = attn.w_v(x).view(B, T, 3, d).transpose(1, 2)
    out = attn.w_o(exercises.gqa_ref(q, k, v).transpose(1, 2).reshape(B, T, 36))
    torch.testing.assert_close(out, attn(x, angles))
    # query head h reads key/value head h // 3: heads 0-2 see only k[:, 0], so changing
    # key/value head 1 changes query heads 3-5 and no other
    k2, v2 = k.clone(), v.clone()
    k2[:, 1] += 1.0
    v2[:, 1] += 1.0
    changed = (exercises.gqa_ref(q, k2, v2) - exercises.gqa_ref(q, k, v)).abs().amax(dim=(0, 2, 3)) > 1e-9
    assert changed.tolist() == [False] * 3 + [True] * 3 + [False] * 3


def test_chatml_reference_by_hand():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2 + 2?"}]
    assert exercises.chatml_ref(messages) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert exercises.chatml_ref(own) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # the notebook's solution and the reference agree on every generated conversation
    assert grade("chatml", SOLUTIONS["chatml_prompt"], seed=1)["points"] == EXERCISES["chatml"].possible


def test_kv_bytes_against_the_llama_model_and_by_hand():
    """SmolLM2-135M: 2 (K and V) x 30 layers x 3 key/value heads x 64 numbers x 4 bytes
    = 46,080 bytes per token in float32 (45 KiB), 23,040 in bfloat16; the model's own
    count (built on the meta device: no memory) says the same."""
    from gptcourse import llama
    assert 2 * 30 * 3 * 64 * 4 == 46_080
    assert exercises.kv_bytes_ref(30, 9, 3, 64, 4) == 46_080
    assert exercises.kv_bytes_ref(30, 9, 3, 64, 2) == 23_040
    with torch.device("meta"):
        model = llama.Llama(llama.SMOLLM2_135M)
    c = model.config
    args = (c.n_layer, c.n_head, c.n_kv_head, c.head_size)
    assert model.kv_cache_bytes_per_token() == exercises.kv_bytes_ref(*args, 4) == 46_080
    assert model.to(torch.bfloat16).kv_cache_bytes_per_token() == exercises.kv_bytes_ref(*args, 2)
    # the graded case "SmolLM2-135M in float32" asks exactly this config
    case = EXERCISES["kv_bytes"].cases[0]
    assert case.make(None) == (*args, 4)


def test_string_answers_show_where_they_differ():
    reason = grading.compare("<|im_start|>user\nHi<|im_end|><|im_start|>", "<|im_start|>user\nHi<|im_end|>\n<|im_")
    assert "from character 29" in reason          # 12 + 4 + 1 + 2 + 10 characters agree and "<|im_end|>\\n" in reason
    assert grading.compare("abc", "abc") is None
    assert grading.compare(3, "abc") == "expected a str, got int 3"


def test_a_case_that_cannot_tell_two_mistakes_apart_gives_no_hint_of_its_own():
    """Without the factor 2 in bfloat16 (2 bytes) the answer is also the number of
    elements: that case alone names neither mistake; the float32 case names the right one."""
    result = grade("kv_bytes", lambda L, H, H_kv, d, b: L * H_kv * d * b, seed=3)
    assert len(result["hints"]) == 1 and "multiply by 2" in result["hints"][0]


def test_batch_grading_carries_chapter_14s_strings_lists_and_ints():
    """Through the worker process (our own notebooks, so without the sandbox): the ChatML
    exercise's list-of-dict inputs and str outputs, and the KV-cache exercise's int
    outputs, go through torch.save and back; the solutions earn full marks, the stubs zero."""
    for folder, full in ((ROOT / "exercises" / "solutions", True), (ROOT / "exercises", False)):
        path = folder / "14_a_real_chat_model.ipynb"
        report = grading.grade_one(path.stem, path.read_text(), seed=5, notebook=path.stem, sandbox=False,
                                   timeout_s=120)
        assert report["status"] == "graded", report["status"]
        for key, result in report["exercises"].items():
            assert result["points"] == (result["possible"] if full else 0), (key, result)
