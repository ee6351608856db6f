#!/usr/bin/env bash
# One prepared check on a machine with an NVIDIA GPU (no Jupyter stack needed):
#   bash scripts/gpu_check.sh [chapters/NN_x.ipynb ...]     (default: every chapter)
# 1. the library's unit tests; 2. chapter code on the GPU, compared with the
# stored outputs; 3. the core benchmark on the GPU; 4. a 2000-step GPT training
# run through gptcourse.train (bf16 autocast, fused AdamW) unless SKIP_TRAIN=1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PY:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"

echo "== 1. unit tests"
$PY -m pytest tests -q -p no:cacheprovider --ignore=tests/test_book_html.py \
    --ignore=tests/test_book_structure.py --ignore=tests/test_grading.py || status=1

echo "== 2. chapters on the GPU"
notebooks=("$@")
[ ${#notebooks[@]} -eq 0 ] && notebooks=(chapters/[0-9][0-9]_*.ipynb)
for nb in "${notebooks[@]}"; do
    $PY scripts/run_notebook_code.py "$nb" || status=1
done

echo "== 3. benchmark"
$PY benchmarks/bench_core.py --device cuda || status=1

[ "${SKIP_TRAIN:-0}" = 1 ] && exit $status
echo "== 4. GPT training through gptcourse.train"
$PY - <<'PYEOF' || status=1
import time, torch
from gptcourse.data import load_corpus, train_val_split
from gptcourse.gpt import GPT, GPTConfig
from gptcourse.tokenizers import CharTokenizer
from gptcourse.train import lm_batches, train, pick_device

text = load_corpus("pydoc")
tok = CharTokenizer(text)
data = torch.tensor(tok.encode(text))
tr, va = train_val_split(data)
device = pick_device()
model = GPT(GPTConfig.from_name("course-char", vocab_size=tok.vocab_size))
batches = lm_batches(tr, va, block_size=64, batch_size=12, seed=0, device=device)
start = time.perf_counter()
h = train(model, batches, steps=2000, lr=1e-3, eval_every=500, device=device, seed=0, progress=False)
seconds = time.perf_counter() - start
print(f"device {device}: 2000 steps in {seconds:.1f} s ({1000 * seconds / 2000:.1f} ms/step incl. evals)")
print("val loss at steps", h.eval_steps, ":", [round(v, 3) for v in h.val_loss])
idx = torch.tensor([tok.encode("The ")], device=device)
print(repr(tok.decode(model.generate(idx, 120, temperature=0.8, generator=torch.Generator(device=device).manual_seed(0))[0])))
PYEOF
exit $status
