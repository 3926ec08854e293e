"""QLoRA: the frozen base of a LoRA run loaded with its Linear weights quantised (``lora.quantize``), through
bitsandbytes (CUDA, and its CPU backend): ``nf4`` = 4-bit NormalFloat, blocks of 64, with double quantisation of the
block scales (Dettmers et al. 2023, QLoRA); ``int8`` = 8-bit LLM.int8 (row-wise scales, outlier columns in fp16).

``load_quantized`` loads a base so, ``base_linear_bytes`` counts what its Linear weights hold in memory (quantised
data + scales, against a bf16 copy), ``dequantize_linears`` turns a quantised base back into plain fp32 ``nn.Linear``
modules holding the dequantised weights (what `tunelab merge` folds a QLoRA adapter into, and the base
``LocalModel`` puts one on: ``load_dequantized``). The embeddings, norms and the output head stay in full precision
(transformers keeps the head, tied to the embeddings in SmolLM2, out). In ``models/`` rather than ``train/``
because loading (train, merge, eval, export) all needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ConfigError, ModelError

QUANTIZE_CHOICES = ("none", "nf4", "int8")
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (weights per absmax); double quantisation: 256 absmax per block


def require_bitsandbytes() -> Any:
    """The bitsandbytes module, or one error line saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(f"lora.quantize needs bitsandbytes (pip install 'bitsandbytes>=0.49'): {e}",
                          where="lora.quantize") from None
    return bitsandbytes


def quantization_config(quantize: str, compute_dtype: torch.dtype | None) -> Any:
    """The transformers ``BitsAndBytesConfig`` of ``quantize`` (nf4 | int8). ``compute_dtype``: what a 4-bit Linear
    dequantises its weight to for the matmul (the run's autocast dtype; fp32 without autocast)."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype or torch.float32,
                                  bnb_4bit_quant_storage=torch.uint8)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"not a quantisation: {quantize!r} (one of {', '.join(QUANTIZE_CHOICES[1:])})")


def load_quantized(path: str | Path, quantize: str, device: torch.device | str,
                   compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The causal LM at ``path`` with its Linear weights quantised on ``device``; everything else fp32."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    q = quantization_config(quantize, compute_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, quantization_config=q,
                                                     device_map={"": device.index if device.type == "cuda"
                                                                 and device.index is not None else device.type})
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load {path} quantised ({quantize}): {str(e).splitlines()[0]}") from None
    keep_training_layout(model)
    return model


def load_dequantized(path: str | Path, quantize: str) -> torch.nn.Module:
    """The causal LM at ``path`` as a QLoRA adapter trained on it saw it: each Linear weight quantised (as
    ``load_quantized`` does, on the CPU) and turned back into fp32, dequant(quant(W)); a plain fp32 model."""
    model = load_quantized(path, quantize, "cpu", compute_dtype=torch.float32)
    dequantize_linears(model)
    return model


def keep_training_layout(model: torch.nn.Module) -> int:
    """Keep 4-bit weights in bitsandbytes' common layout on a CPU with AVX512-BF16.

    There a 4-bit Linear that runs in eval mode without gradients (the forgetting probe, an eval) repacks its weight
    in place into a CPU inference layout, after which a training forward takes the inference kernel (bf16, and no
    gradient to its input) and the weight no longer dequantises by the common rule. Training and the merge need one
    layout throughout, so the repacking is switched off (inference then dequantises and multiplies, as on other
    CPUs). Returns the number of modules changed."""
    n = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def is_quantized_weight(p: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit (Params4bit, packed uint8) or 8-bit (Int8Params) weight."""
    return type(p).__name__ in ("Params4bit", "Int8Params") or (
        getattr(p, "quant_state", None) is not None) or (p.dtype == torch.int8 and hasattr(p, "SCB"))


def logical_numel(p: torch.Tensor) -> int:
    """The number of weights ``p`` stands for: a 4-bit weight packs two per byte (its ``quant_state`` has the
    original shape)."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return p.numel()


def _tensor_bytes(t: Any, seen: set[int] | None = None) -> int:
    """Bytes of ``t``; a tensor whose storage is in ``seen`` (a code book shared by many weights) counts once."""
    if not isinstance(t, torch.Tensor):
        return 0
    if seen is not None:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
    return t.numel() * t.element_size()


def quantized_weight_bytes(p: torch.Tensor, seen: set[int] | None = None) -> int:
    """Bytes ``p`` holds in memory: the quantised data and every scale beside it (4-bit: absmax per block, with
    double quantisation their own absmax, offset and code book; 8-bit: one fp32 scale per row)."""
    total = _tensor_bytes(p.data)
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        total += _tensor_bytes(qs.absmax) + _tensor_bytes(getattr(qs, "code", None), seen) \
            + _tensor_bytes(getattr(qs, "offset", None))
        s2 = getattr(qs, "state2", None)
        if s2 is not None:
            total += _tensor_bytes(s2.absmax) + _tensor_bytes(getattr(s2, "code", None), seen)
    total += _tensor_bytes(getattr(p, "SCB", None))
    return total


def base_linear_bytes(model: torch.nn.Module) -> dict[str, Any]:
    """The frozen Linear weights of the decoder layers in memory against a bf16 copy of the same weights.

    Counts every Linear weight that is not tied to the input embeddings and is not a LoRA A/B or a trained copy:
    ``quantized`` of them are quantised, ``bytes`` is what they hold (scales included), ``bf16_bytes`` what they
    would hold in bf16, ``ratio`` the two divided."""
    emb = model.get_input_embeddings().weight
    n = quantized = held = bf16 = 0
    seen: set[int] = set()
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, torch.nn.Linear) or w is None or w is emb or "lora_" in name \
                or "modules_to_save" in name or w.requires_grad:
            continue
        n += 1
        if is_quantized_weight(w):
            quantized += 1
            held += quantized_weight_bytes(w, seen)
        else:
            held += _tensor_bytes(w.data)
        bf16 += 2 * logical_numel(w)
    return {"linears": n, "quantized": quantized, "bytes": held, "bf16_bytes": bf16,
            "ratio": round(held / bf16, 4) if bf16 else None}


def dequantized_weight(m: torch.nn.Module) -> torch.Tensor:
    """The fp32 weight a bitsandbytes Linear computes with: 4-bit blocks times their (double-quantised) absmax;
    8-bit rows times their scale / 127."""
    import bitsandbytes.functional as F

    w = m.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        return F.dequantize_4bit(w.data, qs).to(torch.float32)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(getattr(m, "state", None), "SCB", None)
    if w.dtype == torch.int8 and scb is not None:
        return w.data.to(torch.float32) * (scb.to(torch.float32).unsqueeze(1) / 127.0)
    return w.data.to(torch.float32)


def dequantize_linears(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes Linear of ``model`` by a plain fp32 ``nn.Linear`` holding its dequantised
    weight, and drop the quantisation from the model (config and flags), so that it saves as a plain HF model.
    Returns the number of modules replaced."""
    n = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, torch.nn.Linear) or not is_quantized_weight(m.weight):
            continue
        w = dequantized_weight(m)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.to(torch.float32))
        lin.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
        n += 1
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return n
