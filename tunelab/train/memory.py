"""The memory a training run will need, estimated before any weight is loaded (``train.max_memory_gb``).

The model's shapes come from its config.json: the model is built on the meta device (accelerate's
``init_empty_weights``; nothing is allocated) and its parameters and Linear layers are counted (``model_shape``).
``estimate_memory`` adds up, in bytes (P: parameters, T: trained parameters, L layers, h hidden, i MLP width,
kv key/value width, a: bytes of the autocast dtype, 2 for bf16, 4 without autocast):

- weights: full 4 P (fp32 master weights); LoRA: the frozen Linear weights in ``lora.frozen_dtype`` (2 bytes in
  bf16, 4 in fp32; nf4 0.52, int8 1 + a scale per row), everything else 4 bytes, plus the adapter and the
  ``modules_to_save`` copies in fp32;
- grads 4 T; optimizer: AdamW 8 T, AdamW8bit 2 bytes per weight (plus a 4-byte scale per block of 256) for tensors
  of 4096 weights or more, 8 below (``optim.offload``: in CPU memory, with a 4-byte copy of the weights);
- the optimizer step's temporaries: torch's foreach AdamW 4 T; AdamW8bit on bitsandbytes' CPU backend 24 bytes per
  weight of the largest trained tensor (it dequantises the moments of one tensor at a time), none on CUDA. The
  step runs after backward has freed the activations and weight casts: the larger of the two counts;
- weight casts: autocast's copies of fp32 matmul weights, kept for backward: a x (Linear + output-head weights)
  in full fine-tuning, a x the head (fp32, tied to the embeddings) under LoRA;
- activations, per token of the largest micro-batch (``micro_batch_size`` x the longest example, capped by
  ``micro_batch_tokens``): per decoder layer 16 h (the two RMSNorms in fp32) + a (4 h + 2 kv + 4 i) saved for
  backward, for L + 1 layers (one more for backward's working set); with activation checkpointing
  4 h per layer (its input) + two layers' worth. The logits exist at the supervised positions only, at most 2048
  at a time: (a + 8) bytes x vocabulary per position. A trained embedding or output head adds backward's dense fp32
  gradient of each of its uses (two when they are tied) before they are summed into its gradient;
- runtime: on a CPU the process as it is when the estimate is made (Python, torch, the tokenizer and the data); on
  CUDA 1 GB for the context and kernels.

The peak is the larger of training (the sum) and loading (a non-quantised base is read in fp32 first: 4 P).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.train.config import TrainConfig
from tunelab.train.results import MemoryEstimate

GB = 1024 ** 3
HEAD_CHUNK = 2048  # SupervisedLoss.head_chunk: logits rows at a time
BNB_MIN_8BIT = 4096  # bitsandbytes: smaller tensors keep 32-bit optimizer state
BNB_BLOCK = 256
CUDA_RUNTIME = 1.0 * GB


@dataclass
class ModelShape:
    """What the estimate needs of a model: its parameters by name and its Linear layers."""

    params: dict[str, int]                 # unique parameters: name -> numel
    linears: dict[str, tuple[int, int]]    # decoder Linear modules: name -> (in, out); not the output head
    head: int                              # output-head weights (tied to the embeddings or not)
    head_tied: bool
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int
    modules: dict[str, int] = field(default_factory=dict)  # every module name -> its own parameters' numel
    embed_names: tuple[str, ...] = ()      # the parameter names of the input embedding and the output head

    @property
    def total(self) -> int:
        return sum(self.params.values())


def model_shape(path: str | Path) -> ModelShape:
    """The shapes of the causal LM at ``path`` from its config.json, built on the meta device (no allocation)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_mod = model.get_output_embeddings()
    emb = model.get_input_embeddings().weight
    head_w = head_mod.weight if head_mod is not None else emb
    tied = head_w is emb or bool(getattr(c, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    head_names = {n for n, p in model.named_parameters() if p is head_w} if head_w is not emb else set()
    emb_names = {n for n, p in model.named_parameters() if p is emb}
    # tied weights once (on the meta device they may not be tied yet)
    params = {n: p.numel() for n, p in model.named_parameters() if not (tied and n in head_names)}
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head_mod}
    modules = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules()}
    heads = getattr(c, "num_attention_heads", 1) or 1
    hidden = int(getattr(c, "hidden_size", 0) or emb.shape[1])
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = int((getattr(c, "num_key_value_heads", None) or heads) * head_dim)
    return ModelShape(params=params, linears=linears, head=head_w.numel(), head_tied=tied, hidden=hidden,
                      layers=int(getattr(c, "num_hidden_layers", 1) or 1),
                      intermediate=int(getattr(c, "intermediate_size", 4 * hidden) or 4 * hidden), kv_dim=kv,
                      vocab=int(head_w.shape[0]), modules=modules,
                      embed_names=tuple(sorted(emb_names | head_names)))


def micro_batch_tokens(cfg: TrainConfig, longest: int) -> int:
    """Tokens of the largest micro-batch: ``micro_batch_size`` examples of the longest length, capped by
    ``micro_batch_tokens`` (an example longer than the cap is a micro-batch of its own); with ``micro_batch_size``
    auto the budget itself."""
    t = cfg.train
    if t.micro_batch_size == "auto":
        return max(t.micro_batch_tokens, longest)
    n = t.micro_batch_size * max(1, longest)
    return min(n, max(t.micro_batch_tokens, longest)) if t.micro_batch_tokens else n


def _lora_targets(cfg: TrainConfig, shape: ModelShape) -> dict[str, tuple[int, int]]:
    t = cfg.lora.target_modules
    if t == "all-linear":
        return dict(shape.linears)
    names = set(t)
    return {n: io for n, io in shape.linears.items() if n.rsplit(".", 1)[-1] in names or n in names}


def _saved_modules(cfg: TrainConfig, shape: ModelShape) -> dict[str, int]:
    """lora.modules_to_save: module name -> its trained parameters."""
    names = set(cfg.lora.modules_to_save or [])
    return {n: k for n, k in shape.modules.items() if n and n.rsplit(".", 1)[-1] in names}


def _adam_bytes(numels: list[int], optimizer: str) -> int:
    if optimizer != "adamw8bit":
        return 8 * sum(numels)
    return sum(2 * (k + 4 * math.ceil(k / BNB_BLOCK)) if k >= BNB_MIN_8BIT else 8 * k for k in numels)


def estimate_memory(cfg: TrainConfig, shape: ModelShape, *, longest: int, target_share: float,
                    autocast_bytes: int = 2, cuda: bool = False, runtime_bytes: float = 0.0) -> MemoryEstimate:
    """The peak memory of a run of ``cfg`` on a model of ``shape`` (formula: the module docstring)."""
    t, o, lo = cfg.train, cfg.optim, cfg.lora
    a = autocast_bytes
    h, L, i, kv = shape.hidden, shape.layers, shape.intermediate, shape.kv_dim
    P = shape.total
    if cfg.method == "lora":
        targets = _lora_targets(cfg, shape)
        lora = [k for fi, fo in targets.values() for k in (lo.r * fi, lo.r * fo)]
        saved = _saved_modules(cfg, shape)
        trained = lora + list(saved.values())
        embed_mods = {n.rsplit(".", 1)[0] for n in shape.embed_names}
        head_trained = any(n in embed_mods for n in saved)
        linear_w = sum(fi * fo for fi, fo in shape.linears.values())
        frozen_bytes = {"nf4": 0.5 + (1 + 4 / 256) / 64, "int8": 1.0}.get(
            lo.quantize, 2.0 if lo.frozen_dtype == "bfloat16" or (lo.frozen_dtype == "auto" and a == 2) else 4.0)
        row_scales = 4 * sum(fo for _, fo in shape.linears.values()) if lo.quantize == "int8" else 0
        weights = frozen_bytes * linear_w + row_scales + 4 * (P - linear_w) + 4 * sum(trained)
        casts = a * shape.head if a < 4 else 0
        load = weights if lo.quantize != "none" else 4 * P
    else:
        if cfg.trainable.match:
            pats = [re.compile(m) for m in cfg.trainable.match]
            names = [n for n in shape.params if any(p.search(n) for p in pats)]
        else:
            names = list(shape.params)
        trained = [shape.params[n] for n in names]
        head_trained = any(n in shape.embed_names for n in names)
        weights = 4 * P
        casts = a * (sum(fi * fo for fi, fo in shape.linears.values()) + shape.head) if a < 4 else 0
        load = 4 * P
    T = sum(trained)
    grads = 4 * T
    optimizer = _adam_bytes(trained, o.optimizer)
    offloaded = 0
    if o.offload and cuda:
        offloaded, optimizer = optimizer + 4 * T, 0
    tokens = micro_batch_tokens(cfg, longest)
    layer = 16 * h + a * (4 * h + 2 * kv + 4 * i)
    per_token = (4 * h * L + 2 * layer) if t.activation_checkpointing else (L + 1) * layer
    share = 1.0 if (t.prompt_loss_weight or cfg.method == "pretrain") else max(0.0, min(1.0, target_share))
    rows = min(HEAD_CHUNK, max(1, math.ceil(tokens * share)))
    # a trained embedding/head: backward's dense fp32 gradient of each use before they are summed
    head_grads = 4 * shape.head * (2 if shape.head_tied else 1) if head_trained else 0
    activations = tokens * per_token + rows * shape.vocab * (a + 8) + head_grads
    if o.optimizer == "adamw8bit":  # bitsandbytes' CPU backend dequantises a tensor's moments for its update
        step = 0 if cuda else 6 * 4 * max(trained, default=0)
    else:  # torch's foreach AdamW: one fp32 temporary per trained weight
        step = 0 if offloaded else 4 * T
    train = weights + grads + optimizer + max(casts + activations, step)
    peak = max(train, load)
    r = lambda b: round(b / GB, 4)  # noqa: E731
    return MemoryEstimate(total_gb=r(peak + runtime_bytes), tensors_gb=r(peak), weights_gb=r(weights),
                          grads_gb=r(grads), optimizer_gb=r(optimizer), optimizer_step_gb=r(step),
                          weight_casts_gb=r(casts),
                          activations_gb=r(activations), load_gb=r(load), runtime_gb=r(runtime_bytes),
                          offloaded_gb=r(offloaded), parameters=P, trained_parameters=T,
                          micro_batch_tokens=tokens, device="cuda" if cuda else "cpu",
                          budget_gb=t.max_memory_gb)


def describe(m: MemoryEstimate) -> str:
    """One line: the total and its parts."""
    parts = [f"weights {m.weights_gb:.2f}", f"grads {m.grads_gb:.2f}", f"optimizer {m.optimizer_gb:.2f}"]
    if m.weight_casts_gb:
        parts.append(f"weight casts {m.weight_casts_gb:.2f}")
    parts += [f"activations {m.activations_gb:.2f} ({m.micro_batch_tokens} tokens per micro-batch)",
              f"runtime {m.runtime_gb:.2f}"]
    step = m.optimizer_step_gb > m.weight_casts_gb + m.activations_gb
    text = f"about {m.total_gb:.2f} GB ({' + '.join(parts)} GB"
    if step:
        text += f"; the optimizer step's {m.optimizer_step_gb:.2f} GB of temporaries outweigh activations and casts"
    if m.load_gb > m.tensors_gb:
        text += f"; loading the base in fp32 peaks at {m.load_gb:.2f} GB + runtime"
    if m.offloaded_gb:
        text += f"; {m.offloaded_gb:.2f} GB optimizer state and weight copy in CPU memory (optim.offload)"
    return text + ")"


ALTERNATIVES: list[tuple[str, Any, str]] = [
    ("train.micro_batch_tokens", "half", "train.micro_batch_tokens {v}"),
    ("train.micro_batch_size", "half", "train.micro_batch_size {v}"),
    ("train.activation_checkpointing", True, "train.activation_checkpointing true"),
    ("optim.optimizer", "adamw8bit", "optim.optimizer adamw8bit"),
    ("optim.offload", True, "optim.offload true"),
    ("method", "lora", "method lora"),
    ("lora.quantize", "nf4", "lora.quantize nf4"),
]


def _with(cfg: TrainConfig, dotted: str, value: Any) -> TrainConfig | None:
    from tunelab.train.config import set_field

    data = cfg.model_dump(mode="json")
    set_field(data, dotted, value)
    if dotted == "method":
        data["trainable"] = {"match": None, "new_rows_only": False}
    try:
        return TrainConfig.model_validate(data)
    except ValueError:
        return None


def suggestions(cfg: TrainConfig, shape: ModelShape, est: MemoryEstimate, **kw: Any) -> list[str]:
    """What would lower the estimate: each change alone with its estimate, the ones that fit the budget first."""
    out: list[tuple[bool, float, str]] = []
    for dotted, value, text in ALTERNATIVES:
        if dotted == "optim.offload" and not kw.get("cuda"):
            continue
        cur: Any = cfg
        for p in dotted.split("."):
            cur = getattr(cur, p)
        if value == "half":
            if not isinstance(cur, int) or cur <= 1:
                continue
            value = max(8, cur // 2) if dotted == "train.micro_batch_tokens" else max(1, cur // 2)
            if dotted == "train.micro_batch_size" and cfg.train.batch_size % value:
                continue
        if cur == value:
            continue
        other = _with(cfg, dotted, value)
        if other is None:
            continue
        m = estimate_memory(other, shape, **kw)
        if m.total_gb < est.total_gb - 0.005:
            fits = est.budget_gb is not None and m.total_gb <= est.budget_gb
            out.append((not fits, m.total_gb, f"{text.format(v=value)} -> {m.total_gb:.2f} GB"))
    return [s for _, _, s in sorted(out)]


def preflight(run: Any) -> MemoryEstimate | None:
    """The run's memory estimate (None, with a note, for a model whose shapes cannot be read); over
    ``train.max_memory_gb`` one ConfigError line with the breakdown and what would fit."""
    from tunelab.train.throughput import current_rss_bytes

    cfg = run.cfg
    try:
        shape = model_shape(run.model_path)
    except Exception as e:  # noqa: BLE001 - an architecture the meta build cannot make: no estimate, no refusal
        run.log(f"note: no memory estimate for {run.model_path}: {type(e).__name__}: {str(e).splitlines()[0]}")
        return None
    stats = run.data.stats.as_dict()
    cuda = run.device.type == "cuda"
    kw = dict(longest=int(stats["length_max"]), target_share=float(stats["target_share"]),
              autocast_bytes=run.autocast.itemsize if run.autocast is not None else 4,
              cuda=cuda, runtime_bytes=CUDA_RUNTIME if cuda else float(current_rss_bytes()))
    est = estimate_memory(cfg, shape, **kw)
    budget = cfg.train.max_memory_gb
    if budget is not None and est.total_gb > budget:
        tips = suggestions(cfg, shape, est, **kw)
        raise ConfigError(f"the run needs {describe(est)}, over the budget of {budget:g} GB"
                          + (f"; try {'; '.join(tips)}" if tips else "; no setting tried fits: a smaller model")
                          + (" (or raise train.max_memory_gb)" if tips else ""), where="train.max_memory_gb")
    return est
