"""The model a run trains: the base causal LM in fp32 (or, with ``lora.quantize``, its Linear weights quantised)
with the run's attention, norm casts and activation checkpointing (``load_base_model``), and its parameters
(``count_parameters``, ``trainable_named``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tunelab.errors import ConfigError, ModelError
from tunelab.train.attention import use_flex_attention, use_varlen_attention
from tunelab.train.precision import cast_frozen_linears, cast_norm_outputs, frozen_dtype
from tunelab.models.quantize import load_quantized, logical_numel
from tunelab.train.session import TrainSession
from tunelab.train.sharding import cpu_ram_efficient_loading


def load_base_model(run: TrainSession) -> torch.nn.Module:
    """The base causal LM in fp32 (master weights), in train mode, optionally with activation checkpointing. With
    ``lora.quantize`` (a LoRA run) its Linear weights are loaded quantised on the run's device instead."""
    from transformers import AutoModelForCausalLM

    if run.device.type == "cpu":
        # Grouped-query attention without materialising the repeated keys/values (CPU SDPA handles a mask with
        # it; tested equal): less activation memory. On CUDA a mask would force the slow kernel, so not there.
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    quantize = run.cfg.lora.quantize if run.cfg.method == "lora" else "none"
    if quantize != "none":
        model = load_quantized(run.model_path, quantize, run.device, compute_dtype=run.autocast)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(run.model_path), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model from {run.model_path}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    t = run.cfg.train
    run.varlen = False
    if t.packing and run.attention == "varlen":
        run.varlen = use_varlen_attention(model)
        if not run.varlen:
            run.attention = "mask"
            run.log("note: this model does not take a pluggable attention function; packed rows use a 4D mask")
    elif t.packing and run.attention == "flex":
        run.varlen = use_flex_attention(model)
        if not run.varlen:
            raise ConfigError(f"train.attention flex: {type(model).__name__} does not take a pluggable attention "
                              "function; use mask", where="train.attention")
    cast_norm_outputs(model)
    if t.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if quantize != "none":  # a quantised model is placed as it loads
        return model
    if run.fsdp and cpu_ram_efficient_loading():
        # local rank 0 holds the weights on the CPU, the others an empty (meta) model: accelerate hands rank 0's
        # weights on, shard by shard, as it shards the model onto the devices in fit
        return model
    if run.device.type == "cuda" and run.cfg.method == "lora":
        # The frozen base in the autocast dtype before it goes to the GPU, not after LoRA is attached: an 8B base
        # would otherwise pass through GPU memory in fp32 (32 GB) on the way. (PEFT initialises A in fp32 and rounds
        # it to the base's dtype, so a CUDA run's initial A is bf16-rounded; the CPU path is unchanged.)
        dtype = frozen_dtype(run.cfg.lora, run.autocast)
        if dtype is not None:
            cast_frozen_linears(model, dtype, before_lora=True, keep=run.cfg.lora.modules_to_save)
    return model.to(run.device)


def count_parameters(model: torch.nn.Module) -> dict[str, Any]:
    total = sum(logical_numel(p) for p in model.parameters())  # a 4-bit weight: the weights it stands for
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_share": trainable / max(1, total)}


def trainable_named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
