#!/usr/bin/env bash
# The one command a GPU session runs for benchmarks/train_gpu.py on the lent H200 (about 8 minutes).
#
# Before it, here (no GPU needed):  bash benchmarks/gpu_carry.sh      # .bench-carry/, ~12 MB (wheels cp312, tokenizer,
#                                                                     # 20,000 reviews); it is git-ignored
# Then one device call (run tool):
#     command:   bash benchmarks/gpu_session.sh
#     carry:     [".bench-carry"]
#     timeout_s: 560
# What comes back in $OUT: env.txt (GPU, versions, import checks), log.txt (every case's output), results.jsonl
# (one JSON line per trainer run and per case, appended as each finishes, then one summary line per case's
# invocation), so a run cut short still returns the cases that finished. Cases run most important first, each
# one its own invocation with a share of the budget: 135m-lora (quick: shows every trainer works), 1b-lora,
# 8b-lora, 1b-full, 135m-full. BUDGET (seconds, default 480) is the whole script's.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET:-480}
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PY:-python3}
if [ -d .bench-carry/wheels ] && ! $PY -c "import pydantic, trl, datasets, liger_kernel" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .bench-carry/wheels/*.whl >>"$OUT/env.txt" 2>&1 || echo "wheel install failed" >>"$OUT/env.txt"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u; nvidia-smi -L 2>&1; $PY -V
  $PY - <<'EOF' 2>&1
import importlib, sys
sys.path.insert(0, ".")
for m in ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "liger_kernel", "triton", "unsloth",
          "pydantic", "tunelab.train.lora"]:
    try:
        mod = importlib.import_module(m)
        print(f"{m:20s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001
        print(f"{m:20s} MISSING: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} >>"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

ARGS=(--workdir /tmp/train-gpu --out "$OUT")
[ -d .bench-carry/tokenizer ] && ARGS+=(--tokenizer .bench-carry/tokenizer)
[ -f .bench-carry/unlabeled.jsonl ] && ARGS+=(--data-file .bench-carry/unlabeled.jsonl)
# case:seconds it may take at most (model written once, two trainers, 20 steps each)
for spec in 135m-lora:75 1b-lora:100 8b-lora:230 1b-full:90 135m-full:50; do
  case=${spec%%:*}; want=${spec##*:}
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 45 ]; then echo "== $case: not started, ${left}s left" | tee -a "$OUT/log.txt"; continue; fi
  limit=$(( want < left ? want : left ))
  echo "== $case (limit ${limit}s, ${left}s left)" | tee -a "$OUT/log.txt"
  timeout -k 5 "$limit" $PY benchmarks/train_gpu.py --cases "$case" --timeout "$limit" "${ARGS[@]}" "$@" 2>&1 \
    | tee -a "$OUT/log.txt"
  [ "${PIPESTATUS[0]}" = 124 ] && echo "== $case: cut at ${limit}s" | tee -a "$OUT/log.txt"
  rm -rf /tmp/train-gpu/tunelab-* /tmp/train-gpu/trl-* /tmp/train-gpu/unsloth-*
  # TRL with Liger failed once (and ran again without it): leave Liger out of the later cases
  grep -q '"liger_failed"' "$OUT/results.jsonl" 2>/dev/null && [[ " ${ARGS[*]} " != *" --no-liger "* ]] \
    && ARGS+=(--no-liger)
done
echo "== all cases: table and targets" | tee -a "$OUT/log.txt"
$PY benchmarks/train_gpu.py --report "$OUT/results.jsonl" 2>&1 | tee -a "$OUT/log.txt"
echo "== done in $(( $(date +%s) - T0 ))s" | tee -a "$OUT/log.txt"
