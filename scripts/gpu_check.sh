#!/usr/bin/env bash
# One prepared check on a machine with an NVIDIA GPU (no Jupyter stack needed):
#   bash scripts/gpu_check.sh [chapters/NN_x.ipynb ...]     (default: every chapter)
#   PARTS="chapters mfu" bash scripts/gpu_check.sh          (only some parts)
# Parts, in order (about 10 minutes in all on an H100; PARTS picks some):
#   unit      the library's unit tests, on the GPU where they pick a device
#             (the 2-process DDP test runs on the CPU with gloo, as on any machine)
#   chapters  every chapter's code on the GPU, each printed output compared with
#             the stored CPU output: integers exact, decimals within rtol 5% /
#             atol 0.02 (bf16 training), text exact (scripts/compare_outputs.py)
#   core      benchmarks/bench_core.py on the GPU
#   mfu       GPT-2 124M at context 1024: tokens/s and MFU (benchmarks/bench_gpu.py);
#             on an H100/H200 it fails below the 40% target
#   ddp       torchrun on every GPU here (NCCL): a run, the same run interrupted
#             and resumed from its checkpoint, the two loss curves compared
#   train     2000 steps of the course GPT through gptcourse.train, without
#             and with torch.compile (SKIP_TRAIN=1 skips it, as before)
# Ends with a summary, one line per part; exit status 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PY:-python3}
PARTS=${PARTS:-unit chapters core mfu ddp train}
[ "${SKIP_TRAIN:-0}" = 1 ] && PARTS=${PARTS//train/}
TMP=$(mktemp -d)
summary=()
status=0

record() {   # record NAME EXIT_CODE DETAIL
    local verdict=PASS
    [ "$2" -ne 0 ] && verdict=FAIL && status=1
    summary+=("$(printf '%-9s %s  %s' "$1" "$verdict" "$3")")
}
want() { [[ " $PARTS " == *" $1 "* ]]; }

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
ngpu=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"

if want unit; then
    echo "== unit tests"
    start=$SECONDS
    $PY -m pytest tests -q -p no:cacheprovider --ignore=tests/test_book_html.py \
        --ignore=tests/test_book_structure.py --ignore=tests/test_grading.py 2>&1 | tee "$TMP/unit.log"
    record unit "${PIPESTATUS[0]}" "$(tail -1 "$TMP/unit.log") ($((SECONDS - start)) s)"
fi

if want chapters; then
    echo "== chapters on the GPU, compared with their stored outputs"
    notebooks=("$@")
    [ ${#notebooks[@]} -eq 0 ] && notebooks=(chapters/[0-9][0-9]_*.ipynb)
    start=$SECONDS; failed=0; checks=()
    for nb in "${notebooks[@]}"; do
        $PY scripts/compare_outputs.py "$nb" 2>&1 | tee "$TMP/nb.log"
        [ "${PIPESTATUS[0]}" -ne 0 ] && failed=$((failed + 1))
        grep -q "^CHECK " "$TMP/nb.log" && checks+=("$(basename "$nb")")
    done
    record chapters $failed "${#notebooks[@]} notebooks, $failed failed; text differs in: ${checks[*]:-none} ($((SECONDS - start)) s)"
fi

if want core; then
    echo "== core benchmark"
    $PY benchmarks/bench_core.py --device cuda
    record core $? ""
fi

if want mfu; then
    echo "== GPT-2 124M training throughput and MFU"
    target=()
    [[ "$gpu" == *H100* || "$gpu" == *H200* ]] && target=(--min-mfu 0.40)
    $PY benchmarks/bench_gpu.py "${target[@]}" --json "$TMP/mfu.json"
    code=$?
    detail=$($PY -c "import json; r = json.load(open('$TMP/mfu.json')); print(f\"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * (r['mfu'] or 0):.1f}% (batch {r['batch_size']}, compile {r['compile']})\")" 2>/dev/null)
    [ -z "$detail" ] && code=1
    record mfu $code "${detail:-no result} ${target[*]}"
fi

if want ddp; then
    echo "== torchrun on $ngpu GPU(s) (NCCL): a run, and the same run interrupted and resumed"
    run=(-m torch.distributed.run --standalone --nproc_per_node="$ngpu" -m gptcourse.distributed
         --no-progress)
    steps=${DDP_STEPS:-600}      # a dry run on a CPU machine: DDP_STEPS=30 PARTS=ddp
    flags=(--steps "$steps" --batch-size $((32 * ngpu)) --eval-every $((steps / 3))
           --warmup-steps $((steps / 12)) --min-lr 1e-4)
    $PY "${run[@]}" "${flags[@]}" --out-dir "$TMP/full" &&
    $PY "${run[@]}" "${flags[@]}" --out-dir "$TMP/cut" --ckpt-every $((steps / 6)) --stop-at $((steps / 2)) &&
    $PY "${run[@]}" --resume "$TMP/cut/ckpt.pt" --out-dir "$TMP/cut"
    code=$?
    # bf16 kernels may add in a run-dependent order (atomics), so compare within 2%
    detail=$($PY - "$TMP" "$steps" <<'PYEOF'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{d}/history.json")) for d in ("full", "cut"))
drift = max(abs(x - y) / x for x, y in zip(a["step_loss"], b["step_loss"]))
same = len(a["step_loss"]) == len(b["step_loss"]) == int(sys.argv[2])
print(f"resumed vs uninterrupted: max relative step-loss difference {drift:.2e}; "
      f"val {a['val_loss'][-1]:.3f} vs {b['val_loss'][-1]:.3f}")
sys.exit(0 if same and drift < 0.02 else 1)
PYEOF
)
    [ $? -ne 0 ] && code=1
    echo "$detail"
    record ddp $code "$ngpu GPU(s): $detail"
fi

if want train; then
    echo "== GPT training through gptcourse.train, without and with torch.compile"
    $PY - <<'PYEOF'
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
for compile in (False, True):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("course-char", vocab_size=tok.vocab_size))
    batches = lm_batches(tr, va, block_size=64, batch_size=12, seed=0, device=device)
    start = time.perf_counter()
    h = train(model, batches, steps=2000, lr=1e-3, eval_every=500, device=device, seed=0,
              progress=False, compile=compile)
    seconds = time.perf_counter() - start
    print(f"device {device}, compile={compile}: 2000 steps in {seconds:.1f} s "
          f"({1000 * seconds / 2000:.1f} ms/step incl. evals and compilation)")
    print("val loss at steps", h.eval_steps, ":", [round(v, 3) for v in h.val_loss])
g = torch.Generator(device=device).manual_seed(0)
idx = torch.tensor([tok.encode("The ")], device=device)
print(repr(tok.decode(model.generate(idx, 120, temperature=0.8, generator=g)[0])))
PYEOF
    record train $? ""
fi

echo "== summary ($gpu x $ngpu)"
printf '%s\n' "${summary[@]}"
rm -rf "$TMP"
exit $status
