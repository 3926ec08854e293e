"""Does `train.compile` (torch.compile per decoder layer) make a training step faster here? Eager and compiled, the
same steps on the same model in one process, alternated (eager, compiled warm-up, compiled, eager) so that a
machine whose load drifts affects both alike.

    python benchmarks/train_compile.py                              # LoRA, bundled model, NSMC, CPU
    python benchmarks/train_compile.py --method full --attention mask --steps 6

The warm-up run compiles one graph set per padded row length (multiples of 128 tokens) it meets; the measured
compiled run repeats its steps, so it compiles nothing. Ends with one JSON line:
{"eager_tok_s": ..., "compiled_tok_s": ..., "speedup": ..., "compile_warmup_s": ...}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from short_run import run_arguments

    ap = run_arguments(__doc__, n=128, batch=8, steps=8, steps_help="steps per timed run", out="runs/train_compile")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from short_run import nsmc_run
    from tunelab.train.loop import fit

    cfg, run, model = nsmc_run(args, "<train_compile>", max_steps=args.steps, micro_batch_tokens=2048,
                               activation_checkpointing=args.activation_checkpointing, threads=args.threads,
                               compile=True)
    cuda = run.device.type == "cuda"

    def timed(compiled: bool) -> tuple[float, int]:
        run.compile = compiled
        t0 = time.perf_counter()
        res = fit(run, model, resume=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, res.history[-1]["tokens"]

    runs = {}
    for name, compiled in (("eager", False), ("warmup", True), ("compiled", True), ("eager2", False)):
        wall, tokens = timed(compiled)
        runs[name] = {"wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1)}
        print(name, runs[name], flush=True)
    eager = (runs["eager"]["tok_s"] + runs["eager2"]["tok_s"]) / 2
    print(json.dumps({"device": str(run.device), "method": args.method, "attention": run.attention,
                      "activation_checkpointing": args.activation_checkpointing, "steps": args.steps,
                      "eager_tok_s": round(eager, 1), "compiled_tok_s": runs["compiled"]["tok_s"],
                      "speedup": round(runs["compiled"]["tok_s"] / eager, 3),
                      "compile_warmup_s": round(runs["warmup"]["wall_s"] - runs["compiled"]["wall_s"], 1),
                      "runs": runs}))


if __name__ == "__main__":
    main()
