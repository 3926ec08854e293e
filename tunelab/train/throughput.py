"""Throughput and memory numbers of the report: peak resident memory (``peak_rss_gb``), training FLOPs per token
of a Llama-style decoder (``flops_per_token``) and the machine's matmul FLOP/s that MFU is measured against
(``measured_matmul_flops``).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch


def peak_rss_gb() -> float:
    """Peak resident memory of this process: VmHWM of /proc/self/status (this program's own high-water mark), else
    ru_maxrss. Linux's ru_maxrss keeps the parent's resident size from before exec (a child of a 2 GB pytest or
    notebook reports at least 2 GB), so it is only the fallback."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def current_rss_bytes() -> int:
    """Resident memory of this process now (/proc/self/statm; elsewhere the peak so far)."""
    try:
        pages = int(open("/proc/self/statm", encoding="ascii").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(peak_rss_gb() * 1024 ** 3)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype | None, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in the training dtype on this machine now: the reference for MFU."""
    n = 1024
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def flops_per_token(model_config: Any, method: str, mean_row_len: float, target_share: float,
                    recompute: bool) -> float:
    """Approximate training FLOPs per token of a Llama-style decoder (forward = 2 x matmul params)."""
    d = model_config.hidden_size
    L = model_config.num_hidden_layers
    inter = model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", heads)
    hd = getattr(model_config, "head_dim", d // heads)
    linear = L * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter)
    fwd = 2 * linear + 4 * L * mean_row_len * heads * hd  # matmuls + attention scores and values
    head = 2 * d * model_config.vocab_size * target_share
    passes = 3 if method in ("full", "pretrain") else 2  # LoRA: no weight gradients for the frozen base
    total = passes * (fwd + head)
    if recompute:
        total += fwd
    return total
