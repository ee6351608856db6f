"""The graded exercises: for each, the reference, the test cases (fresh random
inputs of several shapes and dtypes, plus edge cases), the usual mistakes the
grader recognises (a wrong implementation and the hint it earns), and the
reference implementations the student may not call.

One module per part of the book, each with its exercises in the order of the
chapters; EXERCISES is all of them, in that order (the columns of grades.csv):

    ch02_05_attention     additive attention, scaled dot-product attention, the
                          causal mask, splitting and merging heads
    ch07_10_transformer   the sinusoidal encoding, layer norm, one BPE merge
    ch12_13_gpt           counting a GPT's parameters, top-k, top-p, a KV-cache update
    ch14_chat_model       RMSNorm, RoPE, grouped-query attention, ChatML, the KV cache's size
    ch15_alignment        the SFT loss on the answers, the DPO loss and its first step, LoRA's
                          initialisation, forward pass and merge
    base                  Case and Exercise, what the parts share

Used by gptcourse.grading; the exercise notebooks live in exercises/.
"""
from ... import attention, chat, gpt, llama, positional, sampling
from . import base, ch02_05_attention, ch07_10_transformer, ch12_13_gpt, ch14_chat_model, ch15_alignment
from .base import Case, Exercise, randn
from .ch02_05_attention import (additive_scores_ref, causal_mask_ref, context_vector_ref, merge_heads_ref,
                                sdpa_ref, split_heads_ref)
from .ch07_10_transformer import pe_ref, layer_norm_ref, merge_ref
from .ch12_13_gpt import count_ref, kv_update_ref
from .ch14_chat_model import rms_norm_ref, rope_ref, gqa_ref, chatml_ref, kv_bytes_ref
from .ch15_alignment import (dpo_gradient_ref, dpo_loss_ref, lora_forward_ref, lora_init_ref, lora_merge_ref,
                             sft_loss_ref)

__all__ = ["EXERCISES", "PARTS", "Case", "Exercise", "randn", "selected_exercises", "additive_scores_ref",
           "context_vector_ref", "sdpa_ref", "causal_mask_ref", "split_heads_ref", "merge_heads_ref",
           "pe_ref", "layer_norm_ref", "merge_ref", "count_ref", "kv_update_ref", "rms_norm_ref", "rope_ref",
           "gqa_ref", "chatml_ref", "kv_bytes_ref", "sft_loss_ref", "dpo_loss_ref", "dpo_gradient_ref",
           "lora_init_ref", "lora_forward_ref", "lora_merge_ref", "base", "ch02_05_attention",
           "ch07_10_transformer", "ch12_13_gpt", "ch14_chat_model", "ch15_alignment", "attention", "chat", "gpt",
           "llama", "positional", "sampling"]

PARTS = (ch02_05_attention, ch07_10_transformer, ch12_13_gpt, ch14_chat_model, ch15_alignment)
EXERCISES = {e.key: e for part in PARTS for e in part.EXERCISES}


def selected_exercises(notebook=None):
    """All exercises, or those of one exercise notebook (e.g. "03_scaled_dot_product_attention")."""
    chosen = {k: e for k, e in EXERCISES.items() if notebook in (None, e.notebook)}
    if not chosen:
        names = sorted({e.notebook for e in EXERCISES.values()})
        raise ValueError(f"no exercises for notebook {notebook!r}; known: {', '.join(names)}")
    return chosen
