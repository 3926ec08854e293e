"""Where does a training step spend its time? torch.profiler over a few `tunelab train` steps.

    python benchmarks/train_profile.py                       # LoRA, 64 NSMC reviews, CPU (or CUDA if present)
    python benchmarks/train_profile.py --method full --steps 6 --device cuda

Prints the top operators by self time (CPU and, on CUDA, device time), the share of the step spent inside
torch operators (the rest is Python and data handling), and ends with one JSON line:
{"tok_s": ..., "op_share": ..., "top": [...]}. Use it when tokens/s looks wrong for the hardware (a GPU
step that is CPU-bound shows a low op_share or a CPU op on top).
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
    ap.add_argument("--n", type=int, default=64, help="reviews (examples/data/nsmc_binary_train_512.jsonl)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="profiled steps (after 1 warm-up step)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--attention", default="auto", choices=["auto", "varlen", "mask"], help="train.attention")
    ap.add_argument("--plain", action="store_true", help="also time the same steps without the profiler")
    ap.add_argument("--out", default="runs/train_profile")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from torch.profiler import ProfilerActivity, profile

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
        "train": {"max_steps": args.steps + 1, "batch_size": args.batch, "micro_batch_size": args.batch,
                  "micro_batch_tokens": None, "device": args.device,
                  "attention": args.attention},
    }, "<profile>")
    run = start_session(cfg, log=lambda m: None)
    model = load_base_model(run)
    if args.method == "lora":
        model = lora.attach_lora(model, cfg.lora, run)
    cuda = run.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    # one warm-up step outside the profiler, then the profiled steps
    cfg.train.max_steps = 1
    fit(run, model)
    cfg.train.max_steps = args.steps + 1
    plain = None
    if args.plain:  # the profiler's own cost per op is large for a launch-bound GPU step
        t0 = time.perf_counter()
        res = fit(run, model, resume=False)
        if cuda:
            torch.cuda.synchronize()
        plain = round(res.history[-1]["tokens"] / (time.perf_counter() - t0), 1)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        res = fit(run, model, resume=False)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = res.history[-1]["tokens"] if res.history else 0
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # the averages' attribute (table: old name)
    print(events.table(sort_by=sort, row_limit=15, max_name_column_width=60))
    cpu_ops_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:5]
    figures = {"device": str(run.device), "method": args.method, "steps": len(res.history), "tokens": tokens,
               "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1) if wall else None,
               "tok_s_unprofiled": plain, "attention": args.attention,
               "op_share": round(cpu_ops_us / 1e6 / wall, 3) if wall else None,
               "top": [e.key for e in top]}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
