"""FSDP2 under `accelerate launch --config_file examples/accelerate/fsdp2.yaml`: what tunelab checks before a
sharded run (``check_fsdp``: one error line for a setting it cannot honour), the CPU processes it shards itself
(``enable_fsdp``: accelerate 1.15 leaves CPU processes unsharded), and the full tensors it writes from sharded ones
(``gathered``: a state dict gathered to the main process one tensor at a time; ``shard_like``: a full tensor back
into a parameter's shards).

Under FSDP2 the parameters become DTensors when ``accelerator.prepare`` runs (``fully_shard`` replaces them in
place); every collective here must run on all processes in the same order, which is why the artifacts, checkpoints
and the forgetting probe of a sharded run run on every process and write on the main one.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from tunelab.errors import ConfigError

FSDP_ENV = "ACCELERATE_USE_FSDP"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _true(name: str) -> bool:
    return _env(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """An accelerate FSDP config (``distributed_type: FSDP``) started this process."""
    return _true(FSDP_ENV)


def check_fsdp(cfg) -> None:
    """Refuse, as one ConfigError, what tunelab cannot honour under an FSDP config (read from the environment
    `accelerate launch` sets from the config file, so also with a single process). No-op without FSDP."""
    if not fsdp_requested():
        return
    where = "accelerate config (fsdp_config)"
    version = _env("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"fsdp_version {version} is not supported by tunelab train: set fsdp_version: 2 "
                          "(examples/accelerate/fsdp2.yaml)", where=where)
    if _true("FSDP_OFFLOAD_PARAMS"):
        raise ConfigError("fsdp_offload_params: true is not supported by tunelab train (untested: the loop, "
                          "checkpoints and artifacts expect the shards on the training device); set it to false",
                          where=where)
    if _true("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError("fsdp_activation_checkpointing is not supported by tunelab train: set it to false and "
                          "train.activation_checkpointing: true instead", where=where)
    sd_type = _env("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT").upper()
    if sd_type not in ("FULL_STATE_DICT", ""):
        raise ConfigError(f"fsdp_state_dict_type {sd_type} is not supported by tunelab train: checkpoints and the "
                          "adapter/model are always written as full tensors; set FULL_STATE_DICT", where=where)
    if cfg.method == "lora" and cfg.lora.quantize != "none":
        raise ConfigError(f"{cfg.lora.quantize} (bitsandbytes) does not work with FSDP: train the quantised base "
                          "with DDP (examples/accelerate/ddp.yaml) or one process",
                          where="lora.quantize")
    if cfg.optim.optimizer == "adamw8bit":
        raise ConfigError("adamw8bit (bitsandbytes) does not step FSDP's sharded DTensor parameters: use adamw "
                          "(FSDP shards its state over the processes already)",
                          where="optim.optimizer")
    if cfg.optim.offload:
        raise ConfigError("does not work with FSDP (it keeps a full CPU copy of the weights): FSDP shards the "
                          "optimizer state over the processes already; unset it",
                          where="optim.offload")
    if cfg.trainable.new_rows_only:
        raise ConfigError("not supported under FSDP (its gradient hook needs the whole vocabulary matrix): use DDP "
                          "(examples/accelerate/ddp.yaml) or one process",
                          where="trainable.new_rows_only")


def enable_fsdp(accelerator) -> bool:
    """Shard with FSDP2 where the config asks for it; True if this run's model will be sharded. accelerate
    1.15 ignores ``distributed_type: FSDP`` in CPU processes (they become MULTI_CPU, i.e. DDP over gloo);
    ``fully_shard`` works over a CPU device mesh, so tunelab switches such a run to FSDP itself."""
    if not fsdp_requested():
        return False
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:  # (one process is DistributedType.NO: not sharded)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator.is_fsdp2


def cpu_ram_efficient_loading() -> bool:
    """``fsdp_cpu_ram_efficient_loading``: transformers loads the weights on local rank 0 only (the others on
    the meta device) and accelerate broadcasts them when it shards the model."""
    return fsdp_requested() and _true("FSDP_CPU_RAM_EFFICIENT_LOADING")


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gathered(tensors: dict[str, torch.Tensor], *, main: bool,
             keep: Callable[[str, torch.Tensor], bool] = lambda n, t: True) -> dict[str, torch.Tensor]:
    """``tensors`` (some of them DTensor shards) as full CPU tensors on the main process, ``{}`` on the others;
    gathered one at a time (the device holds one full tensor at most), a tensor shared by two names (tied
    embeddings) once. Every process must call it with the same names in the same order."""
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, t in tensors.items():
        if not keep(name, t):
            continue
        if id(t) in done:
            if main:
                out[name] = done[id(t)]
            continue
        full = t.detach()
        if is_sharded(full):
            full = full.full_tensor()
        if main:
            out[name] = done[id(t)] = full.to("cpu", copy=True)
        else:
            done[id(t)] = None
        del full
    return out


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every process) as ``like``'s shards when ``like`` is a DTensor; no communication."""
    if not is_sharded(like) or is_sharded(full):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def sharded_share(model: torch.nn.Module) -> float:
    """The share of ``model``'s parameter elements this process holds (1/world when all are sharded)."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if is_sharded(p) else p.numel()
    return local / max(1, total)
