"""Shared by benchmarks/train_profile.py and train_compile.py: a short LoRA (or full) run of the bundled model on the
repo's NSMC reviews, set up as `tunelab train` sets it up, with its session and model returned to time ``fit`` on."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_arguments(doc: str, *, n: int, batch: int, steps: int, steps_help: str, out: str):
    """The command line both benchmarks share (each adds its own options)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--n", type=int, default=n, help="reviews (examples/data/nsmc_binary_train_512.jsonl)")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--attention", default="auto", choices=["auto", "varlen", "mask"], help="train.attention")
    ap.add_argument("--out", default=out)
    return ap


def nsmc_run(args, label: str, *, max_steps: int, **train):
    """(config, session, model) of ``args.method`` on ``args.n`` reviews, batch ``args.batch`` in one micro-batch;
    ``train``: more train.* fields."""
    from tunelab.config import validate_as
    from tunelab.train import lora
    from tunelab.train.config import TrainConfig
    from tunelab.train.modeling import load_base_model
    from tunelab.train.session import start_session

    cfg = validate_as(TrainConfig, {
        "method": args.method, "model": args.model, "out": args.out,
        "data": {"path": str(ROOT / "examples/data/nsmc_binary_train_512.jsonl"), "limit": args.n,
                 "prompt": str(ROOT / "examples/train/sentiment_binary_short.yaml"), "max_seq_len": 512},
        "optim": {"lr": 3e-4, "warmup_ratio": 0.0},
        "train": {"max_steps": max_steps, "batch_size": args.batch, "micro_batch_size": args.batch,
                  "device": args.device, "attention": args.attention, **train},
    }, label)
    run = start_session(cfg, log=lambda m: None)
    model = load_base_model(run)
    if args.method == "lora":
        model = lora.attach_lora(model, cfg.lora, run)
    return cfg, run, model
