"""LoRA vs QLoRA (lora.quantize: nf4): memory and tokens/s of the same job, side by side.

Each run is `tunelab train`'s LoRA recipe (tunelab.train.lora.run) in its own process, so its peak memory is its
own: the same data, steps, rank and seed; only ``lora.quantize`` differs. A third process loads the base both ways,
trains nothing, and counts the frozen Linear weights' bytes in memory (tunelab.models.quantize.base_linear_bytes:
the quantised data and every scale, against the bf16 copy that a LoRA run keeps, lora.frozen_dtype auto).

    python benchmarks/qlora_memory.py --threads 1          # CPU: the bundled SmolLM2-135M, NSMC reviews
    python benchmarks/qlora_memory.py --device cuda --shape llama-8b --seq-len 2048 --activation-checkpointing

``--shape llama-8b`` trains a random-init model of Llama-3.1-8B's shapes (written once to --workdir in bf16,
16 GB), on rows of --seq-len tokens (random reviews' text repeated); on CUDA the memory figure is
torch.cuda.max_memory_allocated. The last line is JSON: both runs, the weight bytes and the ratios, and the targets
(base weights <= 0.3x bf16; peak RSS of QLoRA <= LoRA's on the CPU; 8B QLoRA peak <= 10 GB on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tunelab, also where another one is installed
sys.path.insert(0, str(ROOT / "benchmarks"))

from children import run_child  # noqa: E402
from tunelab.train.throughput import peak_rss_gb  # noqa: E402  (this process's own high-water mark, not ru_maxrss)
DATA = ROOT / "examples" / "data" / "nsmc_binary_train_512.jsonl"
PROMPT = ROOT / "examples" / "train" / "sentiment_binary_short.yaml"
SHAPES = {  # LlamaConfig fields of a random-init model
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=False),
}


def random_model(shape: str, workdir: Path) -> Path:
    """A random-init model of ``shape`` in bf16 with the bundled tokenizer, written once to ``workdir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models.convert import resolve_local_path

    out = workdir / f"random-{shape}"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(resolve_local_path(None)))
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def write_data(args, tmp: Path) -> Path:
    """--n reviews as labelled items; with --seq-len each review's text repeated to about that many tokens."""
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()[:args.n]]
    if args.seq_len:
        # A Korean review is about 3 bytes (byte tokens) per character for SmolLM2's tokenizer: repeat to length.
        rows = [{**r, "text": (r["text"] + " ") * max(1, args.seq_len // max(1, 3 * len(r["text"]) + 1))}
                for r in rows]
    path = tmp / "items.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_train(quantize: str, args) -> dict:
    import torch

    from tunelab.train import lora
    from tunelab.train.config import TrainConfig

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-qlora-{quantize}-"))
    max_len = max(args.max_len, (args.seq_len or 0) + 64)
    cfg = TrainConfig.model_validate({
        "method": "lora", "out": str(tmp / "out"), "model": args.model,
        "data": {"path": str(write_data(args, tmp)), "prompt": str(PROMPT), "max_seq_len": max_len},
        "lora": {"r": args.r, "alpha": 2.0 * args.r, "quantize": quantize},
        "optim": {"lr": 2e-4, "warmup_ratio": 0.0},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "micro_batch_size": args.micro_batch,
                  "micro_batch_tokens": max(2048, max_len), "pack_len": max(1024, max_len), "seed": 0,
                  "device": args.device, "threads": args.threads,
                  "activation_checkpointing": args.activation_checkpointing},
    })
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lines: list[str] = []
    rep = lora.run(cfg, log=lines.append)
    out = {"quantize": quantize, "steps": rep.steps, "tokens": rep.tokens, "train_s": rep.train_seconds,
           "tok_s": rep.tok_s, "peak_rss_gb": round(peak_rss_gb(), 3), "loss_first": rep.loss.first,
           "loss_last": rep.loss.last}
    if args.device == "cuda":
        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return out


def count_weights(args) -> dict:
    """The frozen Linear weights in memory: as a LoRA run keeps them (bf16) and quantised (nf4, int8)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.convert import resolve_local_path
    from tunelab.train.precision import cast_frozen_linears
    from tunelab.models.quantize import base_linear_bytes, load_quantized

    path = resolve_local_path(args.model)
    device = torch.device(args.device if args.device != "auto" else "cpu")
    out = {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).requires_grad_(False)
    cast_frozen_linears(model, torch.bfloat16)
    out["bf16"] = base_linear_bytes(model)
    del model
    for q in args.quantize:
        model = load_quantized(path, q, device, compute_dtype=torch.bfloat16)
        out[q] = base_linear_bytes(model)
        del model
    return out


def child(which: str, args) -> dict:
    return run_child(__file__, which, timeout=args.timeout, threads=args.threads, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="a random-init model of these shapes "
                                                                          "instead of the bundled one")
    ap.add_argument("--model", default=None, help="an HF directory (default: bundled, or --shape)")
    ap.add_argument("--workdir", default=None, help="where --shape's model is written (default: a temp dir)")
    ap.add_argument("--n", type=int, default=32, help="reviews")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=None, help="rows of about this many tokens (reviews repeated)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of each run")
    ap.add_argument("--quantize", nargs="+", default=["nf4"], choices=["nf4", "int8"])
    ap.add_argument("--timeout", type=int, default=7200)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shape and not args.model:
        args.model = str(random_model(args.shape, Path(args.workdir or tempfile.mkdtemp(prefix="bench-shape-"))))
        sys.argv += ["--model", args.model]
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = count_weights(args) if args.child == "weights" else run_train(args.child, args)
        print(json.dumps(result))
        return
    t0 = time.perf_counter()
    weights = child("weights", args)
    runs = {}
    for q in ["none", *args.quantize]:
        runs[q] = child(q, args)
        print(f"{q:>5}: {runs[q]}", file=sys.stderr, flush=True)
    mem = "peak_cuda_gb" if args.device == "cuda" else "peak_rss_gb"
    summary = {
        "device": args.device, "model": args.model or "bundled", "threads": args.threads, "steps": args.steps,
        "batch": args.batch, "seq_len": args.seq_len, "activation_checkpointing": args.activation_checkpointing,
        "weights": weights, "runs": runs,
        "weight_ratio": {q: round(weights[q]["bytes"] / weights["bf16"]["bytes"], 4) for q in args.quantize},
        "memory": mem,
        "peak_ratio": {q: round(runs[q][mem] / runs["none"][mem], 4) for q in args.quantize},
        "tok_s_ratio": {q: round(runs[q]["tok_s"] / runs["none"]["tok_s"], 4) for q in args.quantize},
        "weights_share_of_lora_peak": round(weights["bf16"]["bytes"] / (2**30 if mem == "peak_rss_gb" else 1e9)
                                            / runs["none"][mem], 4),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    summary["targets"] = {"nf4_weights_le_0.3x_bf16": summary["weight_ratio"].get("nf4", 1) <= 0.3,
                          "nf4_peak_le_lora": summary["peak_ratio"].get("nf4", 2) <= 1.0}
    if args.device == "cuda" and args.shape == "llama-8b" and "nf4" in runs:
        summary["targets"]["nf4_8b_peak_le_10gb"] = runs["nf4"]["peak_cuda_gb"] <= 10.0
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
