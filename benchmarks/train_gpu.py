"""tunelab vs TRL's SFTTrainer (vs Unsloth where it runs) on one GPU: tokens/s, peak memory, MFU and loss of the
same training job, each trainer in a process of its own, every case in one run.

    python benchmarks/train_gpu.py --out runs/train_gpu                  # a CUDA machine: every case (~8 min, H200)
    python benchmarks/train_gpu.py --tiny --device cpu --out runs/gpu-dry  # the CPU dry run: same code paths

The models are random-initialised from the real configs of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B (``MODELS``:
hidden size, layers, heads, kv heads, MLP width, vocabulary, rope, tied embeddings), written once to --workdir in
bf16 with the bundled tokenizer (its ids all fit each vocabulary). The data is NSMC reviews (the first file of
``DATA_FILES`` that exists, or --data-file) cut into rows of --seq-len (2048) tokens:

* ``--data blocks`` (default): the reviews joined by newlines into one text, cut into blocks of exactly --seq-len
  tokens (tunelab's own `format: text` cutting, ``tunelab.train.data.encode_text_blocks``): every trainer gets the same
  token rows, the same tokens per step (--batch rows) and the same targets (every token but a row's first). With no
  padding to remove, TRL gets (micro, seq_len) rows and plain causal SDPA (its fastest path without flash-attn).
* ``--data reviews``: each review its own sequence, packed: tunelab's packing (``train.attention`` mask or varlen),
  TRL's best-fit-decreasing packing with padding-free batches (position ids; transformers builds the block-diagonal
  mask for SDPA). tunelab's step takes as many reviews as fill --batch rows on average.

Cases, in this order (most important first; --cases picks): ``135m-lora``, ``1b-lora``, ``8b-lora``, ``1b-full``,
``135m-full``. LoRA: r16, alpha 32, no dropout, every Linear of the decoder (PEFT's all-linear); frozen weights bf16.
Full: fp32 master weights under bf16 autocast. Both: AdamW (fused on CUDA), lr --lr-lora / --lr-full, cosine decay
from step 0 to 0 over --steps steps (no warm-up, the same in tunelab and HF schedulers), clip 1.0, seed 0, no
activation checkpointing (--activation-checkpointing: all trainers). tunelab runs through the recipe of
`tunelab train` (``tunelab.train.recipes.recipe(method).run``); TRL 1.16's SFTTrainer (+ PEFT LoRA; Liger's layer
kernels when ``liger_kernel`` and CUDA are there); Unsloth's FastLanguageModel + the same SFTTrainer when ``unsloth``
imports on CUDA. A trainer that cannot run is skipped with its reason.

Measured per trainer: tokens/s over the steps after --warmup (excluded: kernel selection, allocator growth);
peak memory (CUDA: ``torch.cuda.max_memory_allocated`` of the whole run, loading included, and of training alone;
CPU: peak RSS, ``tunelab.train.throughput.peak_rss_gb``); the loss of each step; MFU against --peak-tflops (H200:
989 TFLOP/s bf16 dense, NVIDIA's datasheet; on a CPU none unless given).

FLOPs per token (the PaLM / llm-foundry convention: attention counted over the full T x T, not halved for
causality; nanotron's count is the same):

    full:  6 N + 12 L d T
    LoRA:  4 N + 6 N_lora + 12 L d T   (the frozen weights: forward + the activation gradient, no weight gradient)

N: weights that take part in a matmul per token (every Linear of the decoder and the LM head; not the input
embedding lookup), N_lora: LoRA's A and B, L: layers, d: attention width (heads x head_dim), T: the sequence length a
token attends over (blocks: --seq-len; reviews: the token-weighted mean review length).

Loss: the mean of the last 3 steps' losses; two trainers agree when they differ by at most the largest of a tenth of
the loss drop over the run, twice the sum of their last-5-step standard deviations, and 0.01 (their data order and
LoRA initialisation differ, nothing else). Where they don't, the case's comparison is VOID.

Targets (the last line, with every case): 135M LoRA >= 20,000 tok/s (20x 1,000); 1B full >= 40% MFU; 1B and 8B
LoRA >= 1.5x TRL's tok/s at <= 0.8x its peak memory. One JSON line per trainer run and per case, then the summary;
with --out each is appended to OUT/results.jsonl as it finishes (a timeout keeps what finished).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tunelab
sys.path.insert(0, str(ROOT / "benchmarks"))

from children import QUIET_ENV  # noqa: E402

DATA_FILES = [ROOT.parent / "shared/data/nsmc/unlabeled.jsonl", ROOT / "shared/data/nsmc/unlabeled.jsonl",
              ROOT / ".bench-carry/unlabeled.jsonl", ROOT / "examples/data/nsmc_binary_train_512.jsonl"]
H200_BF16_TFLOPS = 989.0

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
MODELS = {  # LlamaConfig fields of the real models' config.json
    "135m": dict(name="SmolLM2-135M", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, tie_word_embeddings=True),
    "1b": dict(name="Llama-3.2-1B", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
               tie_word_embeddings=True),
    "8b": dict(name="Llama-3.1-8B", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
               tie_word_embeddings=False),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)  # --tiny: the vocabulary, rope and tying stay the real model's
CASES = ["135m-lora", "1b-lora", "8b-lora", "1b-full", "135m-full"]
MICRO = {"135m": 8, "1b": 8, "8b": 4}  # rows per forward pass on the GPU (--micro overrides)
TRAINERS = ["tunelab", "trl", "unsloth"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = all-linear


# --------------------------------------------------------------------------------------------------
# settings shared by parent and children
# --------------------------------------------------------------------------------------------------
def model_fields(key: str, tiny: bool) -> dict:
    f = {k: v for k, v in MODELS[key].items() if k != "name"}
    if tiny:
        f.update(TINY)
    return f


def device_of(args) -> str:
    if args.device != "auto":
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def case_settings(args, model: str, method: str) -> dict:
    micro = args.micro or (2 if args.tiny else MICRO[model])
    micro = min(micro, args.batch)
    if args.batch % micro:
        sys.exit(f"--batch {args.batch} is not a multiple of the micro-batch {micro}")
    return {"model": model, "method": method, "seq_len": args.seq_len, "batch": args.batch, "micro": micro,
            "accum": args.batch // micro, "steps": args.steps, "warmup": args.warmup,
            "lr": args.lr_lora if method == "lora" else args.lr_full}


def workdir(args) -> Path:
    w = Path(args.workdir or Path(tempfile.gettempdir()) / "tunelab-train-gpu")
    w.mkdir(parents=True, exist_ok=True)
    return w


def model_dir(args, model: str) -> Path:
    return workdir(args) / f"random-{model}{'-tiny' if args.tiny else ''}"


def data_paths(args) -> dict:
    d = workdir(args) / f"data-{args.data}-{args.seq_len}"
    return {"dir": d, "text": d / ("train.txt" if args.data == "blocks" else "train.jsonl"),
            "rows": d / "sequences.json", "meta": d / "meta.json"}


# --------------------------------------------------------------------------------------------------
# child: prepare (random model + data, written once)
# --------------------------------------------------------------------------------------------------
def load_tokenizer(args):
    from transformers import AutoTokenizer

    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    from tunelab.models.convert import resolve_local_path

    return AutoTokenizer.from_pretrained(str(resolve_local_path(None)))


def prepare(args, model: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(args)
    meta = prepare_data(args, tok)
    out = model_dir(args, model)
    if not (out / "config.json").is_file():
        cfg = LlamaConfig(**model_fields(model, args.tiny), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        with torch.device("cuda" if device_of(args) == "cuda" else "cpu"):
            m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        tmp = out.with_name(out.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        tmp.rename(out)
    return {"model_dir": str(out), **meta}


def prepare_data(args, tok) -> dict:
    """Token sequences the same for every trainer: written once as tunelab's input file + their ids (TRL)."""
    from tunelab.train.data import encode_text_blocks

    p = data_paths(args)
    need = args.batch * args.seq_len * (args.steps + 2)  # tokens; a few spare rows
    if p["meta"].is_file():
        meta = json.loads(p["meta"].read_text())
        if meta["tokens"] >= need:
            return meta
    src = Path(args.data_file) if args.data_file else next(f for f in DATA_FILES if f.is_file())
    reviews = [json.loads(x)["text"] for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    reviews = [r.strip() for r in reviews if r.strip()]
    p["dir"].mkdir(parents=True, exist_ok=True)
    if args.data == "blocks":
        parts, n, i = [], 0, 0
        while n < need * 1.05:  # the reviews again from the start when a small file runs out
            r = reviews[i % len(reviews)]
            parts.append(r)
            n += len(tok(r, add_special_tokens=False)["input_ids"]) + 1
            i += 1
        text = "\n".join(parts)
        p["text"].write_text(text, encoding="utf-8")
        seqs = [ex.input_ids for ex in encode_text_blocks(tok, text, args.seq_len, str(p["text"]))]
        seqs = [s for s in seqs if len(s) == args.seq_len]  # TRL: full rows only (tunelab may meet the short tail)
        t_eff = float(args.seq_len)
    else:
        seqs, docs, n, i = [], [], 0, 0
        while n < need * 1.05:
            r = reviews[i % len(reviews)]
            ex = encode_text_blocks(tok, r, args.seq_len, "review")
            docs.append(r)
            seqs += [e.input_ids for e in ex]
            n += sum(len(e.input_ids) for e in ex)
            i += 1
        p["text"].write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
                             encoding="utf-8")
        t_eff = sum(len(s) ** 2 for s in seqs) / sum(len(s) for s in seqs)
    p["rows"].write_text(json.dumps(seqs))
    meta = {"data_file": str(src), "reviews": len(parts if args.data == "blocks" else docs), "sequences": len(seqs),
            "tokens": sum(map(len, seqs)), "mean_len": round(sum(map(len, seqs)) / len(seqs), 1),
            "attn_len": round(t_eff, 1)}
    p["meta"].write_text(json.dumps(meta))
    return meta


# --------------------------------------------------------------------------------------------------
# child: one trainer on one case
# --------------------------------------------------------------------------------------------------
class Meter:
    """Wall-clock stamps at the end of each optimizer step, and peak device memory of the whole run and of training."""

    def __init__(self, device: str):
        self.device, self.stamps, self.load_peak = device, [], 0.0
        if device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def train_begins(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.load_peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def step_ends(self, tokens: int, loss: float | None):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.stamps.append([time.perf_counter() - self.t0, tokens, loss])

    def result(self, warmup: int) -> dict:
        from tunelab.train.throughput import peak_rss_gb

        s = self.stamps
        w = min(warmup, len(s) - 1)
        t0, k0 = (s[w - 1][0], s[w - 1][1]) if w > 0 else (0.0, 0)
        dt, dk = s[-1][0] - t0, s[-1][1] - k0
        out = {"steps": len(s), "timed_steps": len(s) - w, "tokens_timed": dk, "seconds_timed": round(dt, 3),
               "tok_s": round(dk / dt, 1) if dt > 0 else None, "losses": [None if x[2] is None else round(x[2], 4)
                                                                         for x in s]}
        if self.device == "cuda":
            import torch

            train_peak = torch.cuda.max_memory_allocated() / 2**30
            out.update(peak_gb=round(max(self.load_peak, train_peak), 3), peak_train_gb=round(train_peak, 3),
                       peak_kind="cuda max_memory_allocated")
        else:
            out.update(peak_gb=round(peak_rss_gb(), 3), peak_train_gb=None, peak_kind="cpu peak RSS")
        return out


def run_tunelab(args, st: dict, prep: dict, device: str) -> dict:
    """`tunelab train`'s recipe, with a meter around its loop (step ends: the progress view's update)."""
    import tunelab.train.loop as loop
    from tunelab.config import validate_as
    from tunelab.train.config import TrainConfig
    from tunelab.train.recipes import recipe

    meter = Meter(device)
    rec = recipe(st["method"])

    class TimedView(loop.ProgressView):
        def update(self, row):
            meter.step_ends(row["tokens"], row["loss"])
            return super().update(row)

    real_fit = rec.fit

    def timed_fit(run, model, **kw):
        meter.train_begins()
        return real_fit(run, model, **kw)

    loop.ProgressView, rec.fit = TimedView, timed_fit
    out = Path(tempfile.mkdtemp(prefix="tunelab-", dir=workdir(args)))
    seq, paths = st["seq_len"], data_paths(args)
    if args.data == "blocks":
        per_step, micro_n, micro_tokens = st["batch"], st["micro"], st["micro"] * seq
    else:  # reviews: as many as fill `batch` rows on average; micro-batches cut by tokens
        per_step = max(1, round(st["batch"] * seq / prep["mean_len"]))
        micro_n, micro_tokens = per_step, st["micro"] * seq
    lora = st["method"] == "lora"
    cfg = validate_as(TrainConfig, {
        "method": st["method"], "model": prep["model_dir"], "out": str(out),
        "data": {"path": str(paths["text"]), "format": "text", "max_seq_len": seq},
        "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear", "frozen_dtype": "auto"},
        "optim": {"lr": st["lr"], "schedule": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
                  "clip_grad_norm": 1.0, "fused": device == "cuda"},
        "train": {"max_steps": st["steps"], "batch_size": per_step, "micro_batch_size": micro_n,
                  "micro_batch_tokens": micro_tokens, "packing": True, "pack_len": seq,
                  "attention": args.attention, "dtype": "bfloat16" if device == "cuda" else "auto", "seed": 0,
                  "device": device, "activation_checkpointing": args.activation_checkpointing, "log_every": 10**6},
    }, "<train_gpu>")
    try:
        rep = rec.run(cfg, log=lambda m: None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    res = meter.result(st["warmup"])
    res["config"] = {"attention": args.attention, "examples_per_step": per_step,
                     "lora_frozen": rep.autocast if lora else None, "fused_adamw": device == "cuda",
                     "trainable": rep.parameters.trainable}
    # what `tunelab train` itself reports (its tok/s counts every step; its MFU is against a measured matmul)
    res["report"] = {"tok_s": round(rep.tok_s, 1), "mfu_estimate": rep.mfu.estimate,
                     "memory_estimate_gb": rep.memory.total_gb if rep.memory is not None else None}
    return res


def _hf_args(args, st: dict, device: str, tmp: str, liger: bool, **extra):
    from trl import SFTConfig

    bf16 = device == "cuda" or _cpu_bf16()
    return SFTConfig(
        output_dir=tmp, per_device_train_batch_size=st["micro"], gradient_accumulation_steps=st["accum"],
        max_steps=st["steps"], learning_rate=st["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", bf16=bf16,
        use_cpu=device == "cpu", logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
        dataloader_num_workers=0, max_length=st["seq_len"], packing=args.data == "reviews",
        packing_strategy="bfd", gradient_checkpointing=args.activation_checkpointing,
        use_liger_kernel=liger, include_num_input_tokens_seen=True, disable_tqdm=True, **extra)


def _cpu_bf16() -> bool:
    from tunelab.models.local import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def _trl_dataset(args):
    from datasets import Dataset

    seqs = json.loads(data_paths(args)["rows"].read_text())
    return Dataset.from_dict({"input_ids": seqs})


def _hf_meter_callback(meter: Meter):
    from transformers import TrainerCallback

    class Cb(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            meter.train_begins()

        def on_step_end(self, a, state, control, **kw):
            meter.step_ends(int(state.num_input_tokens_seen), None)

    return Cb()


def _hf_losses(trainer, meter: Meter) -> None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for row, loss in zip(meter.stamps, losses):
        row[2] = loss


def run_trl(args, st: dict, prep: dict, device: str) -> dict:
    import torch
    from peft import LoraConfig
    from trl import SFTTrainer

    liger = device == "cuda" and not args.no_liger and _importable("liger_kernel")
    meter = Meter(device)
    lora = st["method"] == "lora"
    bf16 = device == "cuda" or _cpu_bf16()
    # LoRA: the base in bf16 (PEFT keeps A, B in fp32); full: fp32 master weights under bf16 autocast, as tunelab
    dtype = torch.bfloat16 if lora and bf16 else torch.float32
    tmp = tempfile.mkdtemp(prefix="trl-", dir=workdir(args))
    cfg = _hf_args(args, st, device, tmp, liger, model_init_kwargs={"dtype": dtype})
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                          bias="none") if lora else None
    trainer = SFTTrainer(model=prep["model_dir"], args=cfg, train_dataset=_trl_dataset(args), peft_config=peft_cfg,
                         callbacks=[_hf_meter_callback(meter)])
    res = _train_hf(trainer, tmp, meter, st)
    res["config"] = {"padding_free": args.data == "reviews", "liger": liger,
                     "base_dtype": str(dtype).replace("torch.", ""), "attn": "sdpa",
                     "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    return res


def _train_hf(trainer, tmp: str, meter, st: dict) -> dict:
    """Train a TRL/Unsloth trainer (its output folder removed after) and read the meter past the warm-up steps."""
    try:
        trainer.train()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _hf_losses(trainer, meter)
    return meter.result(st["warmup"])


def run_unsloth(args, st: dict, prep: dict, device: str) -> dict:
    import unsloth  # noqa: F401  (first: it patches transformers and TRL)
    import torch
    from trl import SFTTrainer
    from unsloth import FastLanguageModel

    meter = Meter(device)
    lora = st["method"] == "lora"
    model, tok = FastLanguageModel.from_pretrained(prep["model_dir"], max_seq_length=st["seq_len"],
                                                   dtype=torch.bfloat16, load_in_4bit=False,
                                                   full_finetuning=not lora)
    if lora:
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, bias="none", random_state=0,
                                                 use_gradient_checkpointing=args.activation_checkpointing)
    tmp = tempfile.mkdtemp(prefix="unsloth-", dir=workdir(args))
    trainer = SFTTrainer(model=model, processing_class=tok, args=_hf_args(args, st, device, tmp, False),
                         train_dataset=_trl_dataset(args), callbacks=[_hf_meter_callback(meter)])
    res = _train_hf(trainer, tmp, meter, st)
    res["config"] = {"unsloth": getattr(unsloth, "__version__", "?")}
    return res


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def skip_reason(trainer: str, device: str) -> str | None:
    """Why ``trainer`` cannot run here (None: it can), without importing it."""
    if trainer == "tunelab":
        return None
    missing = [m for m in (["trl", "datasets"] + (["unsloth"] if trainer == "unsloth" else [])) if not _importable(m)]
    if trainer == "unsloth" and device != "cuda":
        return "Unsloth needs CUDA"
    if missing:
        hint = {"trl": "pip install --no-deps trl (and datasets)", "unsloth": "not installed (its wheels and needs: "
                "bitsandbytes, xformers, torchao, unsloth_zoo ...; it pins trl<=1.15, transformers<=5.17)"}
        return f"{', '.join(missing)} not importable: " + "; ".join(hint.get(m, "install it") for m in missing)
    return None


# --------------------------------------------------------------------------------------------------
# FLOPs, MFU, comparisons
# --------------------------------------------------------------------------------------------------
def flop_counts(fields: dict, method: str, attn_len: float, r: int = 16) -> dict:
    d, L, i = fields["hidden_size"], fields["num_hidden_layers"], fields["intermediate_size"]
    h, kv, hd, V = fields["num_attention_heads"], fields["num_key_value_heads"], fields["head_dim"], fields["vocab_size"]
    shapes = [(d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d), (d, i), (d, i), (i, d)]  # q k v o gate up down
    n = L * sum(a * b for a, b in shapes) + d * V  # + LM head (tied or not: one matmul per token)
    n_lora = L * sum(r * (a + b) for a, b in shapes)
    attn = 12 * L * h * hd * attn_len
    per_token = (6 * n + attn) if method == "full" else (4 * n + 6 * n_lora + attn)
    return {"N": n, "N_lora": n_lora if method == "lora" else 0, "attn_T": attn_len, "flops_per_token": per_token}


def loss_tail(losses: list) -> tuple[float, float] | None:
    xs = [x for x in losses if x is not None]
    if len(xs) < 2:
        return None
    return statistics.fmean(xs[-3:]), statistics.pstdev(xs[-5:])


def agree(a: dict, b: dict) -> dict:
    """Same data, seed and schedule: the last losses should differ by no more than noise. Tolerance: the larger of
    a tenth of the loss drop over the run (the mean of both trainers'), twice the sum of their last-5-step
    standard deviations, and 0.01."""
    ta, tb = loss_tail(a.get("losses", [])), loss_tail(b.get("losses", []))
    if not ta or not tb:
        return {"agree": False, "why": "no losses"}
    first = [next(x for x in r["losses"] if x is not None) for r in (a, b)]
    drop = ((first[0] - ta[0]) + (first[1] - tb[0])) / 2
    tol = max(0.1 * abs(drop), 2 * (ta[1] + tb[1]), 0.01)
    return {"agree": abs(ta[0] - tb[0]) <= tol, "loss": [round(ta[0], 4), round(tb[0], 4)],
            "diff": round(ta[0] - tb[0], 4), "drop": round(drop, 4), "tol": round(tol, 4)}


# --------------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------------
def child(args, which: str) -> dict:
    """``which`` in a process of its own; its last stdout line is the JSON result (a failure: {"error": ...})."""
    import subprocess

    cmd = [sys.executable, __file__, "--child", which, *sys.argv[1:]]
    env = {**os.environ, **QUIET_ENV}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if p.returncode != 0:
        tail = [x for x in p.stderr.strip().splitlines() if x.strip()][-12:]
        sys.stderr.write(f"--- {which} failed (exit {p.returncode}):\n" + "\n".join(tail) + "\n")
        return {"error": (tail[-1] if tail else f"exit {p.returncode}")[:300]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def emit(args, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")


def fmt(x, spec: str, dash: str = "-") -> str:
    return dash if x is None else format(x, spec)


HEADER = (f"{'case':10s} {'trainer':8s} {'tok/s':>10s} {'peak GB':>8s} {'train GB':>8s} {'MFU %':>6s} "
          f"{'loss first':>10s} {'loss last':>9s} {'wall s':>7s}")


def table_row(case: str, t: str, r: dict) -> str:
    if "error" in r:
        return f"{case:10s} {t:8s} failed: {r['error'][:90]}"
    ls = [x for x in r["losses"] if x is not None]
    return (f"{case:10s} {t:8s} {fmt(r['tok_s'], ',.0f'):>10s} {fmt(r['peak_gb'], '.2f'):>8s} "
            f"{fmt(r.get('peak_train_gb'), '.2f'):>8s} {fmt(r.get('mfu') and 100 * r['mfu'], '.1f'):>6s} "
            f"{fmt(ls[0] if ls else None, '.3f'):>10s} {fmt(ls[-1] if ls else None, '.3f'):>9s} "
            f"{fmt(r.get('wall_s'), '7.1f')}")


def report(path: Path) -> None:
    """The table and the targets again from a results.jsonl (every case's last lines): gpu_session.sh's last step."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    runs = {(r["case"], r["trainer"]): r for r in rows if "trainer" in r}
    cases = {r["case"]: r for r in rows if "case" in r and "trainer" not in r and "flops" in r}
    heads = [r for r in rows if r.get("summary")]
    print(HEADER + "\n" + "\n".join(table_row(c, t, r) for (c, t), r in runs.items()))
    for c, r in cases.items():
        for k, v in r.items():
            if k.startswith("vs_"):
                print(f"{c}: tunelab {k}: {v['tok_s_ratio']}x tok/s, {v['peak_ratio']}x peak, loss "
                      f"{v['loss_check'].get('loss')} (tol {v['loss_check'].get('tol')}): {v['verdict']}")
    last = heads[-1] if heads else {}
    judged = last.get("device") == "cuda" and not last.get("tiny")
    print(json.dumps({"report": True, "device": last.get("device"), "tiny": last.get("tiny"),
                      "peak_tflops": last.get("peak_tflops"), "cases": sorted(cases),
                      "targets": targets(cases) if judged else "not judged: a tiny or CPU run"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="shrink every model (2 layers, hidden 64) and the run "
                                                        "(--seq-len 128, 3 steps, batch 4): the CPU dry run")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--data", default="blocks", choices=["blocks", "reviews"])
    ap.add_argument("--data-file", default=None, help="JSONL with a 'text' field (default: the first of DATA_FILES)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the bundled model's)")
    ap.add_argument("--seq-len", type=int, default=None, help="row length in tokens (2048; --tiny 128)")
    ap.add_argument("--batch", type=int, default=None, help="rows per optimizer step (8; --tiny 4)")
    ap.add_argument("--micro", type=int, default=None, help=f"rows per forward pass (default {MICRO}; --tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (20; --tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps left out of tokens/s (5; --tiny 1)")
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-full", type=float, default=3e-4)
    ap.add_argument("--attention", default="auto", choices=["auto", "varlen", "mask"], help="tunelab's train.attention")
    ap.add_argument("--no-liger", action="store_true", help="TRL without Liger's kernels")
    ap.add_argument("--report", default=None, metavar="RESULTS_JSONL",
                    help="only print the table and targets of an earlier run's results.jsonl")
    ap.add_argument("--activation-checkpointing", action="store_true", help="every trainer")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"the device's peak bf16 dense TFLOP/s for MFU (CUDA default: H200, {H200_BF16_TFLOPS})")
    ap.add_argument("--workdir", default=None, help="random models and data (default: TMPDIR/tunelab-train-gpu)")
    ap.add_argument("--out", default=None, help="append every JSON line to OUT/results.jsonl as it is made")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per trainer run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k, full, tiny in (("seq_len", 2048, 128), ("batch", 8, 4), ("steps", 20, 3), ("warmup", 5, 1)):
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else full)
    if args.report:
        report(Path(args.report))
        return
    if args.child:
        kind, _, rest = args.child.partition(":")
        if kind == "prepare":
            print(json.dumps(prepare(args, rest)))
            return
        trainer, model, method = rest.split(":")
        device = device_of(args)
        st = case_settings(args, model, method)
        prep = {"model_dir": str(model_dir(args, model)), **json.loads(data_paths(args)["meta"].read_text())}
        fn = {"tunelab": run_tunelab, "trl": run_trl, "unsloth": run_unsloth}[trainer]
        print(json.dumps(fn(args, st, prep, device)))
        return
    run_all(args)


def run_all(args) -> None:
    device = args.device if args.device != "auto" else ("cuda" if _cuda_present() else "cpu")
    peak = args.peak_tflops or (H200_BF16_TFLOPS if device == "cuda" else None)
    cases = [c for c in args.cases.split(",") if c]
    trainers = [t for t in args.trainers.split(",") if t]
    bad = [c for c in cases if c not in CASES] + [t for t in trainers if t not in TRAINERS]
    if bad:
        sys.exit(f"unknown case or trainer: {bad}")
    print(f"device {device}{' (tiny models)' if args.tiny else ''}; data {args.data}, rows of {args.seq_len} tokens, "
          f"{args.batch} rows a step, {args.steps} steps, tokens/s over the steps after {args.warmup}; peak "
          f"{fmt(peak, '.0f')} TFLOP/s", flush=True)
    print("FLOPs/token (PaLM/llm-foundry): full 6N + 12LdT; LoRA 4N + 6N_lora + 12LdT (N: matmul weights incl. the LM "
          "head, d: heads x head_dim, T: attended length)", flush=True)
    skips = {t: skip_reason(t, device) for t in trainers}
    for t, why in skips.items():
        if why:
            print(f"skip {t}: {why}", flush=True)
    t_start = time.perf_counter()
    table: list[str] = []
    summary: dict = {}
    prepared: dict = {}
    for case in cases:
        model, method = case.split("-")
        st = case_settings(args, model, method)
        if model not in prepared:
            prepared[model] = child(args, f"prepare:{model}")
            if "error" in prepared[model]:
                emit(args, {"case": case, "error": "prepare: " + prepared[model]["error"]})
                continue
        prep = prepared[model]
        if "error" in prep:
            continue
        flops = flop_counts(model_fields(model, args.tiny), method, prep["attn_len"])
        runs: dict = {}
        for t in trainers:
            if skips[t]:
                runs[t] = {"skipped": skips[t]}
                continue
            r = child(args, f"run:{t}:{model}:{method}")
            if t == "trl" and "error" in r and device == "cuda" and not args.no_liger and _importable("liger_kernel"):
                print(f"trl with Liger failed ({r['error'][:120]}); again without it", flush=True)
                sys.argv.append("--no-liger")
                r = {**child(args, f"run:{t}:{model}:{method}"), "liger_failed": r["error"]}
                sys.argv.pop()
            if r.get("tok_s") and peak:
                r["mfu"] = round(r["tok_s"] * flops["flops_per_token"] / (peak * 1e12), 4)
            runs[t] = r
            emit(args, {"case": case, "trainer": t, "model_name": MODELS[model]["name"], "tiny": args.tiny,
                        "device": device, **st, **r})
            table.append(table_row(case, t, r))
        row = case_row(case, method, flops, prep, runs)
        summary[case] = row
        emit(args, row)
    print("\n" + HEADER + "\n" + "\n".join(table), flush=True)
    final = {"summary": True, "device": device, "tiny": args.tiny, "peak_tflops": peak, "data": args.data,
             "seq_len": args.seq_len, "batch_rows": args.batch, "steps": args.steps, "warmup": args.warmup,
             "wall_s": round(time.perf_counter() - t_start, 1), "skipped": {t: w for t, w in skips.items() if w},
             "targets": targets(summary) if device == "cuda" and not args.tiny else "not judged: a tiny or CPU run",
             "cases": {c: {k: v for k, v in r.items() if k != "case"}
                                                    for c, r in summary.items()}}
    emit(args, final)


def case_row(case: str, method: str, flops: dict, prep: dict, runs: dict) -> dict:
    ok = {t: r for t, r in runs.items() if r.get("tok_s")}
    row = {"case": case, "flops": flops, "data": {k: prep[k] for k in ("sequences", "mean_len", "attn_len")},
           "tok_s": {t: r["tok_s"] for t, r in ok.items()}, "peak_gb": {t: r["peak_gb"] for t, r in ok.items()},
           "mfu": {t: r.get("mfu") for t, r in ok.items()},
           "skipped_or_failed": {t: r.get("skipped") or r.get("error") for t, r in runs.items() if t not in ok}}
    if "tunelab" in ok:
        for other in ("trl", "unsloth"):
            if other in ok:
                a, b = ok["tunelab"], ok[other]
                check = agree(a, b)
                row[f"vs_{other}"] = {
                    "tok_s_ratio": round(a["tok_s"] / b["tok_s"], 3),
                    "peak_ratio": round(a["peak_gb"] / b["peak_gb"], 3) if b["peak_gb"] else None,
                    "loss_check": check, "verdict": "ok" if check["agree"] else "VOID (losses disagree)"}
    return row


def targets(summary: dict) -> dict:
    def vs(case):
        v = summary.get(case, {}).get("vs_trl")
        if not v or v["verdict"] != "ok":
            return None if not v else "VOID"
        return v["tok_s_ratio"] >= 1.5 and (v["peak_ratio"] or 9) <= 0.8

    t135 = summary.get("135m-lora", {}).get("tok_s", {}).get("tunelab")
    mfu1 = summary.get("1b-full", {}).get("mfu", {}).get("tunelab")
    return {"135m_lora_ge_20000_tok_s": None if t135 is None else t135 >= 20000,
            "1b_full_ge_40pct_mfu": None if mfu1 is None else mfu1 >= 0.40,
            "1b_lora_ge_1.5x_trl_at_le_0.8x_peak": vs("1b-lora"),
            "8b_lora_ge_1.5x_trl_at_le_0.8x_peak": vs("8b-lora")}


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
