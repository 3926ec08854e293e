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

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--n", type=int, default=128, help="reviews (examples/data/nsmc_binary_train_512.jsonl)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed run")
    ap.add_argument("--attention", default="auto", choices=["auto", "varlen", "mask"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default="runs/train_compile")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from tunelab.config import validate_as
    from tunelab.train import lora
    from tunelab.train.config import TrainConfig
    from tunelab.train.loop import fit
    from tunelab.train.modeling import load_base_model
    from tunelab.train.session import start_session

    cfg = validate_as(TrainConfig, {
        "method": args.method, "model": args.model, "out": args.out,
        "data": {"path": str(ROOT / "examples/data/nsmc_binary_train_512.jsonl"), "limit": args.n,
                 "prompt": str(ROOT / "examples/train/sentiment_binary_short.yaml"), "max_seq_len": 512},
        "optim": {"lr": 3e-4, "warmup_ratio": 0.0},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "micro_batch_size": args.batch,
                  "micro_batch_tokens": 2048, "device": args.device, "attention": args.attention,
                  "activation_checkpointing": args.activation_checkpointing, "threads": args.threads,
                  "compile": True},
    }, "<train_compile>")
    run = start_session(cfg, log=lambda m: None)
    model = load_base_model(run)
    if args.method == "lora":
        model = lora.attach_lora(model, cfg.lora, run)
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
