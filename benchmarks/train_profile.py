"""Where does a training step spend its time? torch.profiler over a few `tunelab train` steps.

    python benchmarks/train_profile.py                       # LoRA, 64 NSMC reviews, CPU (or CUDA if present)
    python benchmarks/train_profile.py --method full --steps 6 --device cuda

Prints the top operators by self time (CPU and, on CUDA, device time), the share of the step spent inside
torch operators (the rest is Python and data handling), and ends with one JSON line:
{"tok_s": ..., "op_share": ..., "top": [...]}. Use it when tokens/s looks wrong for the hardware (a GPU
step that is CPU-bound shows a low op_share or a CPU op on top).
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

    ap = run_arguments(__doc__, n=64, batch=16, steps=4, steps_help="profiled steps (after 1 warm-up step)",
                       out="runs/train_profile")
    ap.add_argument("--plain", action="store_true", help="also time the same steps without the profiler")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from short_run import nsmc_run
    from tunelab.train.loop import fit

    cfg, run, model = nsmc_run(args, "<profile>", max_steps=args.steps + 1, micro_batch_tokens=None)
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
