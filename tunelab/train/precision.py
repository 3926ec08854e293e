"""Precision: the autocast dtype of a run (``pick_autocast``, ``autocast_ctx``), decoder norms that hand their
outputs on in that dtype once (``cast_norm_outputs``), and the frozen base weights of a LoRA run stored in it
(``frozen_dtype``, ``cast_frozen_linears``). Everything that trains keeps fp32 master weights.
"""

from __future__ import annotations

import torch

from tunelab.models.scoring import pick_autocast  # noqa: F401  (the run's autocast dtype; models/ holds it)
from tunelab.train.config import LoraSettings


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    from tunelab.models.scoring import autocast_context

    return autocast_context(device.type, dtype)


NORMS_FEEDING_LINEARS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")


def cast_norm_outputs(model: torch.nn.Module) -> int:
    """Under autocast, hand the decoder-layer norms' outputs on in the autocast dtype.

    Autocast casts a fp32 input to bf16 separately for every matmul that reads it (q, k, v, and with LoRA
    each lora_A again), keeping each copy for backward. The norms' outputs feed only such matmuls, so casting
    once gives the same numbers with one saved copy instead of up to seven. Outside autocast: a no-op.
    """
    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            dev = output.device.type
            if torch.is_autocast_enabled(dev):
                return output.to(torch.get_autocast_dtype(dev))
        return output

    n = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in NORMS_FEEDING_LINEARS:
            module.register_forward_hook(hook)
            n += 1
    return n


def frozen_dtype(settings: LoraSettings, autocast: torch.dtype | None) -> torch.dtype | None:
    if settings.frozen_dtype == "bfloat16":
        return torch.bfloat16
    if settings.frozen_dtype == "auto" and autocast is not None:
        return autocast
    return None


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype, *, before_lora: bool = False,
                        keep: list[str] | None = None) -> int:
    """Store frozen Linear weights in ``dtype``: autocast would cast them to it on every call anyway.

    Embeddings, norms and anything tied to the embeddings (the lm_head of SmolLM2) stay fp32, so the residual
    stream keeps its precision, and so do quantised weights (``lora.quantize``: not floating point). With
    ``before_lora`` (the base of a LoRA run, before PEFT wraps it and freezes what it does not train) every such
    Linear is cast but those named in ``keep`` (``modules_to_save``: PEFT trains a copy of them in full, from
    their exact weights). Returns the number of weights cast.
    """
    emb = model.get_input_embeddings().weight
    n = 0
    for name, m in model.named_modules():
        if keep and name.rsplit(".", 1)[-1] in keep:
            continue
        if isinstance(m, torch.nn.Linear) and (before_lora or not m.weight.requires_grad) and m.weight is not emb \
                and m.weight.dtype.is_floating_point and m.weight.dtype != dtype:
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
            n += 1
    return n


def trainable_in_fp32(model: torch.nn.Module) -> int:
    """Every trainable floating-point tensor in fp32 (master weights): PEFT moves a new adapter to its base layer's
    dtype and copies ``modules_to_save`` as they are, so a base cast before LoRA would leave some in bf16."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype.is_floating_point and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n
