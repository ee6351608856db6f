"""Write the exercise notebooks from one source: the student versions
(exercises/NN_*.ipynb, stubs that raise NotImplementedError inside a marked
YOUR CODE block) and the reference solutions (exercises/solutions/NN_*.ipynb,
the same notebooks with the blocks filled in).

    python scripts/make_exercises.py && make outputs NB="exercises/*.ipynb exercises/solutions/*.ipynb"

Each graded function is followed by a check cell that calls
gptcourse.grading.check, which prints PASS/FAIL per test, points and hints.
"""
import re
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
REPO = "https://github.com/gptcourse/gptcourse"

SETUP = f'''# Set-up: works here and in Colab. Installs gptcourse only when it is missing.
import importlib.util, subprocess, sys
if importlib.util.find_spec("gptcourse") is None:
    url = "git+{REPO}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", url],
                   check=True)

import math
import torch
from gptcourse.grading import check'''

HOW = """**How it works.** Fill in each block between `# YOUR CODE` and `# END`,
run the cell, then run the check cell below it. The check tests your function
on fresh random inputs of several shapes and dtypes and on edge cases, prints
PASS or FAIL for each test with your points, and a hint when it recognises a
usual mistake. Write the computation yourself with basic tensor operations:
a function that calls the library's (or PyTorch's) ready-made version of the
same thing earns no points."""

# notebook -> (title, chapter stem, recap, [(check key, stub source, solution body)])
# The stub source has a line "    raise NotImplementedError" that the solution replaces.
NOTEBOOKS = {
    "02_attention_with_rnns": ("Exercises 2: Bahdanau attention", "02_attention_with_rnns", r"""
Recap. The alignment model scores how well the decoder state $s_{i-1}$ matches
each annotation $h_j$: $e_{ij} = v^\top \tanh(W s_{i-1} + U h_j)$. The weights
$\alpha_{ij} = \mathrm{softmax}_j(e_{ij})$ over the real (not padded) positions
give the context $c_i = \sum_j \alpha_{ij} h_j$.""", [
        ("additive_scores", '''def additive_scores(s, h, W, U, v):
    """Bahdanau's alignment scores e_j = v^T tanh(W s + U h_j).

    s: (B, d_s) decoder state; h: (B, T, d_h) annotations;
    W: (A, d_s), U: (A, d_h), v: (A,). Returns e: (B, T).
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    return torch.tanh((s @ W.T)[:, None, :] + h @ U.T) @ v'''),
        ("context_vector", '''def context_vector(e, h, mask):
    """alpha = softmax over j of the scores e, only over the real positions
    (mask True); c = sum_j alpha_j h_j.

    e: (B, T); h: (B, T, d_h); mask: (B, T) bool.
    Returns (c (B, d_h), alpha (B, T)).
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    alpha = torch.softmax(e.masked_fill(~mask, float("-inf")), dim=-1)
    return (alpha[:, :, None] * h).sum(dim=1), alpha'''),
    ]),
    "03_scaled_dot_product_attention": ("Exercises 3: scaled dot-product attention",
                                        "03_scaled_dot_product_attention", r"""
Recap. $\mathrm{Attention}(Q, K, V) = \mathrm{softmax}(QK^\top / \sqrt{d_k})\,V$.
A boolean mask says which keys each query may attend to (True = may attend);
blocked scores become $-\infty$ before the softmax.""", [
        ("sdpa", '''def scaled_dot_product_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d_k)) v.

    q: (..., T_q, d_k), k: (..., T_k, d_k), v: (..., T_k, d_v);
    mask: None or bool, broadcastable to (..., T_q, T_k), True = may attend.
    Returns (output (..., T_q, d_v), weights (..., T_q, T_k)).
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights'''),
        ("causal_mask", '''def causal_mask(T):
    """The (T, T) bool mask of a decoder: query i may attend to keys j <= i."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    return torch.ones(T, T, dtype=torch.bool).tril()'''),
    ]),
    "05_multi_head_attention": ("Exercises 5: multi-head attention", "05_multi_head_attention", r"""
Recap. With $h$ heads, the $d_\text{model}$ features of each position are cut
into $h$ slices of $d_k = d_\text{model} / h$: each head attends with its own
slice, and the heads' outputs are concatenated back.""", [
        ("split_heads", '''def split_heads(x, n_heads):
    """(B, T, C) -> (B, H, T, C // H): head h gets features h*d .. (h+1)*d - 1."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)'''),
        ("merge_heads", '''def merge_heads(x):
    """(B, H, T, d) -> (B, T, H * d): the concatenation of the heads."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)'''),
    ]),
    "07_positional_encoding": ("Exercises 7: positional encoding", "07_positional_encoding", r"""
Recap. $P(k, 2i) = \sin(k / n^{2i/d})$ and $P(k, 2i+1) = \cos(k / n^{2i/d})$ for
position $k$, embedding size $d$, base $n$ and $0 \le i < d/2$.""", [
        ("positional", '''def sinusoidal_encoding(n_positions, d_model, base=10000):
    """The (n_positions, d_model) float32 matrix P of the formula above
    (d_model is even)."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    P = torch.zeros(n_positions, d_model, dtype=torch.float64)
    for k in range(n_positions):
        for i in range(d_model // 2):
            angle = k / base ** (2 * i / d_model)
            P[k, 2 * i] = math.sin(angle)
            P[k, 2 * i + 1] = math.cos(angle)
    return P.float()'''),
    ]),
    "08_residuals_and_layer_norm": ("Exercises 8: layer normalisation", "08_residuals_and_layer_norm", r"""
Recap. LayerNorm normalises each token over its features:
$\mathrm{LN}(x) = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta$, with
$\mu$ and $\sigma^2$ the mean and (biased) variance of the last axis.""", [
        ("layer_norm", '''def layer_norm(x, gamma, beta, eps=1e-5):
    """x: (..., C); gamma, beta: (C,). Returns (..., C)."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return gamma * (x - mean) / torch.sqrt(var + eps) + beta'''),
    ]),
    "10_tokens_and_embeddings": ("Exercises 10: byte-pair encoding", "10_tokens_and_embeddings", r"""
Recap. BPE training repeatedly finds the most frequent adjacent pair of
tokens and replaces every occurrence of it, scanning left to right, by a new
token id.""", [
        ("bpe_merge", '''def merge_pair(ids, pair, new_id):
    """Replace every occurrence of pair (a, b) in the list ids, left to right,
    by new_id. merge_pair([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out'''),
    ]),
    "12_gpt3_on_a_napkin": ("Exercises 12: counting parameters", "12_gpt3_on_a_napkin", r"""
Recap. A GPT-2/GPT-3 style model has a token embedding ($V \times d$), a learned
position embedding ($\text{block} \times d$), and per block two LayerNorms, the
attention projections $W^Q, W^K, W^V, W^O$ and an MLP $d \to 4d \to d$, all with
biases; then a final LayerNorm. The output layer reuses the token embedding.""", [
        ("count_params", '''def count_gpt_params(n_layer, n_embd, vocab_size, block_size):
    """The number of parameters of that GPT (biases on, output tied)."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    d = n_embd
    block = 2 * (2 * d) + (4 * d * d + 4 * d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return vocab_size * d + block_size * d + n_layer * block + 2 * d'''),
    ]),
    "13_decoding_and_kv_cache": ("Exercises 13: decoding and the KV cache", "13_decoding_and_kv_cache", r"""
Recap. Top-k keeps the $k$ largest logits; top-p keeps the smallest set of most
likely tokens whose probabilities reach $p$; the rest become $-\infty$. A KV
cache stores the keys and values of past positions so each new token only
computes its own.""", [
        ("top_k", '''def top_k_filter(logits, k):
    """logits (B, V): keep the k largest of each row, set the others to -inf."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))'''),
        ("top_p", '''def top_p_filter(logits, p):
    """logits (B, V): keep the smallest set of most likely tokens whose
    probabilities sum to at least p; set the others to -inf."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = mass_before >= p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))'''),
        ("kv_cache", '''def kv_cache_update(cache_k, cache_v, k_new, v_new):
    """Append this step's keys and values (B, H, T_new, d) to the cached ones
    (B, H, T, d). Returns (keys, values), each (B, H, T + T_new, d)."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    return torch.cat([cache_k, k_new], dim=-2), torch.cat([cache_v, v_new], dim=-2)'''),
    ]),
    "14_a_real_chat_model": ("Exercises 14: the pieces of a real chat model", "14_a_real_chat_model", r"""
Recap. RMSNorm scales each token's vector by the root mean square of its
features, with no centring and no bias:
$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{C}\sum_i x_i^2 + \epsilon}} \odot g$.
Rotary embeddings rotate each adjacent pair $(x_{2i}, x_{2i+1})$ of a query or
key at position $m$ by the angle $m\,\theta_i$, $\theta_i = b^{-2i/d}$:
$x'_{2i} = x_{2i}\cos m\theta_i - x_{2i+1}\sin m\theta_i$,
$x'_{2i+1} = x_{2i}\sin m\theta_i + x_{2i+1}\cos m\theta_i$.
Grouped-query attention gives $H$ query heads only $H_{kv}$ key/value heads:
with $g = H / H_{kv}$, query heads $0 \dots g-1$ share key/value head 0, the
next $g$ share head 1, and so on. SmolLM2 reads a conversation in ChatML: each
message is `<|im_start|>{role}\n{content}<|im_end|>\n`, a conversation
without a system message gets SmolLM2's default one first, and the prompt ends
with `<|im_start|>assistant\n`, after which the model writes. The KV cache
keeps a key and a value per layer, key/value head and position.""", [
        ("rms_norm", '''def rms_norm(x, weight, eps=1e-5):
    """x: (..., C); weight: (C,). Returns (..., C)."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    return x / torch.sqrt((x ** 2).mean(dim=-1, keepdim=True) + eps) * weight'''),
        ("rope", '''def apply_rope(x, positions, base=10000.0):
    """x: (..., T, d) queries or keys, d even; positions: (T,) integers.
    Rotate pair (x_2i, x_2i+1) of the token at position m by m * base^(-2i/d).
    Returns (..., T, d) in x's dtype; compute the angles in float32 or float64."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)       # (d/2,)
    angle = positions.double()[:, None] * theta                            # (T, d/2)
    wide = torch.promote_types(x.dtype, torch.float32)                     # float16 -> float32
    cos, sin = torch.cos(angle).to(wide), torch.sin(angle).to(wide)
    even, odd = x[..., 0::2].to(wide), x[..., 1::2].to(wide)
    out = torch.empty(x.shape, dtype=wide)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out.to(x.dtype)'''),
        ("gqa", '''def grouped_query_attention(q, k, v):
    """Causal attention with shared key/value heads.

    q: (B, H, T, d); k, v: (B, H_kv, T, d), H a multiple of H_kv. Query head h
    reads key/value head h // (H // H_kv). Position i attends to positions j <= i.
    Returns (B, H, T, d).
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)                                   # (B, H, T, d)
    v = v.repeat_interleave(group, dim=1)
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])              # (B, H, T, T)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v'''),
        ("chatml", '''SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml_prompt(messages):
    """The ChatML text SmolLM2 reads for a conversation, ending with the
    assistant's generation prompt. messages: a list of {"role", "content"}
    dicts; without a system message first, SMOLLM2_SYSTEM comes first."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOLLM2_SYSTEM}] + list(messages)
    text = "".join(f"<|im_start|>{m['role']}\\n{m['content']}<|im_end|>\\n" for m in messages)
    return text + "<|im_start|>assistant\\n"'''),
        ("kv_bytes", '''def kv_cache_bytes_per_token(n_layer, n_head, n_kv_head, head_size, bytes_per_element):
    """The bytes the KV cache holds for one token of one sequence, for a model with
    n_layer layers, n_head query heads and n_kv_head key/value heads of head_size
    numbers, stored with bytes_per_element bytes each (4: float32, 2: bfloat16)."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    return 2 * n_layer * n_kv_head * head_size * bytes_per_element'''),
    ]),
    "15_from_gpt_to_chatgpt": ("Exercises 15: from GPT to ChatGPT", "15_from_gpt_to_chatgpt", r"""
Recap. Supervised fine-tuning trains on chat transcripts with the loss on the
answer tokens only: the mean cross-entropy over the targets where the answer
mask is True. DPO trains on pairs of a chosen answer $y_c$ and a rejected one
$y_r$, with $\log\pi(y)$ an answer's summed log-probability under the policy and
$\log\pi_\text{ref}(y)$ under the frozen reference model:
$\mathcal{L} = -\log\sigma\big(\beta\,[(\log\pi(y_c) - \log\pi_\text{ref}(y_c)) - (\log\pi(y_r) - \log\pi_\text{ref}(y_r))]\big)$,
averaged over the pairs. LoRA leaves a weight $W$ (out, in) frozen and learns
$A$ (r, in) and $B$ (out, r) beside it:
$y = xW^\top + b + \frac{\alpha}{r}\,(xA^\top)B^\top$. $A$ starts random
(as `nn.Linear` initialises a weight), $B$ at zero; after training,
$W + \frac{\alpha}{r}BA$ is one matrix again.""", [
        ("sft_loss", '''import torch.nn.functional as F


def sft_loss(logits, targets, answer_mask):
    """The mean cross-entropy over the answer tokens only.

    logits: (B, T, V); targets: (B, T) next-token ids; answer_mask: (B, T) bool,
    True where the target is a token of an assistant's answer.
    Returns a 0-dim tensor.
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    logp = torch.log_softmax(logits, dim=-1)                                # (B, T, V)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)               # (B, T)
    return nll[answer_mask].mean()                                          # answer tokens only'''),
        ("dpo_loss", '''def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """The DPO loss of B preference pairs.

    Each argument is (B,): an answer's summed log-probability under the policy
    being trained or under the frozen reference model, for the chosen and the
    rejected answer of each pair. Returns the mean over the pairs of
    -log sigmoid(beta * margin), a 0-dim tensor.
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()'''),
        ("dpo_gradient", '''def dpo_first_step(logits, chosen, rejected, beta=0.1):
    """The DPO loss and its gradient at the first step, when the policy still is
    the reference model (both start as the SFT model).

    A toy policy: logits (T, V) are its next-token logits at the T positions of
    every answer, so an answer a (T token ids) has
    log pi(a) = sum over t of log_softmax(logits[t])[a[t]].
    chosen, rejected: (B, T) the answers of B preference pairs.
    The reference is a frozen copy of the policy: the same log-probabilities,
    but no gradient may flow into it. You may use your dpo_loss.
    Returns (loss, grad): the 0-dim loss and d loss / d logits, (T, V).
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    logits = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(logits, dim=-1)                                # (T, V)
    t = torch.arange(logits.shape[0])
    policy_chosen, policy_rejected = logp[t, chosen].sum(-1), logp[t, rejected].sum(-1)    # (B,)
    with torch.no_grad():                                                   # the frozen reference
        ref_chosen, ref_rejected = logp[t, chosen].sum(-1), logp[t, rejected].sum(-1)
    loss = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss.backward()
    return loss.detach(), logits.grad'''),
        ("lora_init", '''def lora_init(in_features, out_features, r, seed):
    """LoRA's A and B for a linear layer with in_features inputs and out_features
    outputs, at rank r, before any training.

    A: (r, in_features), initialised as nn.Linear initialises a weight with
    in_features inputs (kaiming uniform with a = sqrt(5): uniform on
    [-1/sqrt(in_features), 1/sqrt(in_features)]), drawn in one call from
    g = torch.Generator().manual_seed(seed). B: (out_features, r), initialised
    so that the adapted layer starts exactly as the base layer.
    Returns (A, B), float32.
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)
    A = torch.empty(r, in_features).uniform_(-bound, bound, generator=g)    # random: x meets it first
    B = torch.zeros(out_features, r)                                        # zero: B @ A = 0 at the start
    return A, B'''),
        ("lora_forward", '''def lora_forward(x, weight, bias, A, B, alpha):
    """A LoRA layer's output: the frozen base layer plus the scaled low-rank update.

    x: (..., in_features); weight: (out_features, in_features); bias:
    (out_features,) or None; A: (r, in_features); B: (out_features, r);
    alpha: a number. Returns (..., out_features).
    """
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out + (alpha / A.shape[0]) * ((x @ A.T) @ B.T)'''),
        ("lora_merge", '''def lora_merge(weight, A, B, alpha):
    """The merged weight (out_features, in_features): the one matrix that gives the
    LoRA layer's output by itself, x @ merged.T (+ the bias). weight, A, B and
    alpha as in lora_forward."""
    # YOUR CODE
    raise NotImplementedError
    # END''', '''    return weight + (alpha / A.shape[0]) * (B @ A)'''),
    ]),
}


def chapter_link(stem):
    path = "md" if (ROOT / "chapters" / f"{stem}.md").exists() else "ipynb"
    return f"[the chapter](../chapters/{stem}.{path})"


def build(name, solutions):
    title, chapter, recap, items = NOTEBOOKS[name]
    cells = [new_markdown_cell(f"# {title}\n\n{recap.strip()}\n\nSee {chapter_link(chapter)} "
                               f"for the full story.\n\n{HOW}"),
             new_code_cell(SETUP)]
    for key, stub, solution in items:
        source = stub.replace("    raise NotImplementedError", solution) if solutions else stub
        cells.append(new_code_cell(source))
        function = re.search(r"^def (\w+)\(", stub, re.M).group(1)
        cells.append(new_code_cell(f'check("{key}", {function})'))
    for i, cell in enumerate(cells):               # stable ids: regenerating changes nothing
        cell.id = f"cell-{i}"
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})


def keep_outputs(new, path):
    """Where the code cells are unchanged, keep the outputs the old notebook saved,
    with the cells' and the notebook's metadata (so editing prose needs no
    re-execution, and regenerating an unchanged notebook changes nothing);
    otherwise the code cells come out empty."""
    if not path.exists():
        return new
    saved = nbformat.read(path, as_version=4)
    old = [c for c in saved.cells if c.cell_type == "code"]
    new_code = [c for c in new.cells if c.cell_type == "code"]
    if [c.source for c in old] == [c.source for c in new_code]:
        for o, n in zip(old, new_code):
            n.outputs, n.execution_count, n.metadata = o.outputs, o.execution_count, o.metadata
        new.metadata = saved.metadata              # where the outputs were recorded, the kernel's language_info
    else:
        new.metadata.update({k: v for k, v in saved.metadata.items() if k == "widgets"})
    return new


def main():
    for name in NOTEBOOKS:
        for solutions, folder in ((False, ROOT / "exercises"), (True, ROOT / "exercises" / "solutions")):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.ipynb"
            nbformat.write(keep_outputs(build(name, solutions), path), path)
    print(f"wrote {len(NOTEBOOKS)} exercise notebooks and their solutions")


if __name__ == "__main__":
    main()
