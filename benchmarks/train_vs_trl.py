"""tunelab train vs TRL's SFTTrainer + PEFT: tokens/s and peak memory on the same LoRA job.

Same model (the bundled SmolLM2-135M-Instruct, converted to a plain HF directory), same data (NSMC reviews
as a Korean instruction + review -> label), LoRA r16 all-linear (alpha 32, no dropout), batch 8, one epoch,
lr 2e-4, bf16 autocast where the CPU has native bf16, loss on the answer only. Each trainer runs in its own
process so peak RSS is its own. Tokens/s = the dataset's tokens / the training loop's wall time.

    python benchmarks/train_vs_trl.py            # 64 reviews (a few minutes on 2 cores)
    python benchmarks/train_vs_trl.py --n 512    # the issue's setting

TRL is a bench-only extra (`pip install trl`; it must not pull another torch). The last line is JSON:
{"tok_s_ratio": tunelab/TRL, "rss_ratio": tunelab/TRL, ...}. Targets: tok_s_ratio >= 2, rss_ratio <= 0.8.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from children import run_child  # noqa: E402
from tunelab.train.throughput import peak_rss_gb  # noqa: E402  (this process's own high-water mark, not ru_maxrss)

DATA = ROOT / "examples" / "data" / "nsmc_binary_train_512.jsonl"
INSTRUCTION = "다음 영화 리뷰의 감정을 Positive 또는 Negative로 답하세요."


def conversations(n: int) -> list[dict]:
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()[:n]]
    if len(rows) < n:
        sys.exit(f"{DATA} has only {len(rows)} reviews")
    return [{"prompt": [{"role": "user", "content": f"{INSTRUCTION}\n\n{r['text']}"}],
             "completion": [{"role": "assistant", "content": r["label"]}]} for r in rows]


# --------------------------------------------------------------------------------------------------
# the two trainers (each runs in a child process)
# --------------------------------------------------------------------------------------------------
def run_tunelab(args) -> dict:
    from tunelab.train import lora
    from tunelab.train.config import TrainConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-tunelab-"))
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c["prompt"] + c["completion"]}, ensure_ascii=False) + "\n"
                            for c in conversations(args.n)), encoding="utf-8")
    cfg = TrainConfig.model_validate({
        "method": "lora", "out": str(tmp / "out"), "data": {"path": str(data), "max_seq_len": args.max_len},
        "lora": {"r": args.r, "alpha": args.alpha, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": args.lr, "warmup_ratio": 0.0},
        "train": {"epochs": 1, "batch_size": args.batch, "micro_batch_size": args.micro_batch or args.batch,
                  "micro_batch_tokens": args.micro_batch_tokens or None,
                  "packing": not args.no_packing, "seed": 0, "dtype": args.dtype,
                  "activation_checkpointing": args.activation_checkpointing},
    })
    rep = lora.run(cfg, log=lambda s: None)
    return {"trainer": "tunelab", "tokens": rep.tokens, "train_s": rep.train_seconds, "tok_s": rep.tok_s,
            "peak_rss_gb": peak_rss_gb(), "steps": rep.steps, "loss_first": rep.loss.first,
            "loss_last": rep.loss.last}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunelab.models.convert import resolve_local_path
    from tunelab.models.local import cpu_has_fast_bf16

    path = str(resolve_local_path(None))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    convs = conversations(args.n)
    tokens = sum(len(tok(tok.apply_chat_template(c["prompt"] + c["completion"], tokenize=False),
                         add_special_tokens=False)["input_ids"]) for c in convs)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and cpu_has_fast_bf16())
    tmp = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
                    max_length=args.max_len, packing=False, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                    logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                    gradient_checkpointing=args.activation_checkpointing, completion_only_loss=True)
    peft_cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(convs), processing_class=tok,
                         peft_config=peft_cfg)
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"trainer": "trl", "tokens": tokens, "train_s": train_s, "tok_s": tokens / train_s,
            "peak_rss_gb": peak_rss_gb(), "steps": out.global_step,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


# --------------------------------------------------------------------------------------------------
def child(which: str, args) -> dict:
    return run_child(__file__, which, timeout=args.timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="reviews (the issue: 512)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=None, help="tunelab micro-batch (default: --batch)")
    ap.add_argument("--micro-batch-tokens", type=int, default=2048, help="tunelab token cap per micro-batch (0: none)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--no-packing", action="store_true", help="tunelab: padded batches instead of packed rows")
    ap.add_argument("--activation-checkpointing", action="store_true", help="both trainers")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads in both trainers (1 is steadier on a busy shared machine)")
    ap.add_argument("--only", choices=["tunelab", "trl"], default=None)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--child", choices=["tunelab", "trl"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        res = run_tunelab(args) if args.child == "tunelab" else run_trl(args)
        print(json.dumps(res))
        return
    results = {}
    for which in ("tunelab", "trl"):
        if args.only and which != args.only:
            continue
        r = child(which, args)
        results[which] = r
        print(f"{which:8s} {r['tokens']:>8,} tokens  {r['train_s']:7.1f} s  {r['tok_s']:7.1f} tok/s  "
              f"peak RSS {r['peak_rss_gb']:.2f} GB  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)
    if len(results) == 2:
        t, b = results["tunelab"], results["trl"]
        print(json.dumps({"tok_s_ratio": round(t["tok_s"] / b["tok_s"], 3),
                          "rss_ratio": round(t["peak_rss_gb"] / b["peak_rss_gb"], 3),
                          "n": args.n, "batch": args.batch, "threads": args.threads, "tunelab": t, "trl": b}))


if __name__ == "__main__":
    main()
