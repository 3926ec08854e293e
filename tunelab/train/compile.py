"""``train.compile``: torch.compile per decoder layer, as torchtune does (not the whole model: the layers share one
compiled graph, the loss and the packing stay plain Python).

Shapes stay few: with compile on, packed rows are padded up to a multiple of ``ROW_MULTIPLE`` tokens (the padding
is no target and attends to nothing real; ``tunelab.train.collate``), the layers are compiled with static shapes
(``dynamic=False``) and dynamo's recompile limit is raised to the number of row lengths a run can meet, so each
bucket compiles once. varlen's per-sequence attention runs eagerly between two compiled graphs (it is registered
with ``torch.compiler.disable``), the mask and flex paths are traced whole.

``compile_problem`` says why torch.compile cannot run here (no C++ compiler for inductor's CPU code, no triton for
CUDA): ``compile: true`` is then refused with one line, ``auto`` (on CUDA only) is off.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from tunelab.errors import ConfigError

ROW_MULTIPLE = 128  # packed rows are padded to a multiple of this many tokens when layers are compiled (or flex)


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot run on ``device``; None when it can."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
    except Exception as e:  # noqa: BLE001  (an import failure of torch's own compiler stack)
        return f"torch.compile is unavailable: {str(e).splitlines()[0]}"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile on CUDA needs triton, which is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001  (InvalidCxxCompiler, or whatever the search raised)
        return (f"torch.compile on a CPU builds C++ with a compiler (inductor looks for g++ on PATH), and none was "
                f"found ({type(e).__name__})")
    return None


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """``train.compile`` for this device: auto is on CUDA only (measured slower on the CPU, docs/train.md "On a
    GPU") and off where torch.compile cannot run; true where it cannot run is one error line."""
    if setting == "auto":
        return device.type == "cuda" and compile_problem(device) is None
    if setting and (why := compile_problem(device)):
        raise ConfigError(f"train.compile is true but {why}; set train.compile to false (or auto)",
                          where="train.compile")
    return bool(setting)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (through a PEFT wrapper)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(f"train.compile compiles each decoder layer, and {type(model).__name__} has no "
                          "decoder.layers list; set train.compile to false", where="train.compile")
    return list(layers)


def row_buckets(max_row_tokens: int) -> int:
    """How many padded row lengths a run whose longest row is ``max_row_tokens`` can meet."""
    return max(1, math.ceil(max_row_tokens / ROW_MULTIPLE))


def allow_recompiles(max_row_tokens: int) -> None:
    """Raise dynamo's recompile limit to what a run's row buckets need (else it falls back to eager after 8): one
    cache entry per bucket and grad mode (the layers share them), plus room for the graphs after varlen's graph
    break. Also for flex compiled on its own (``compile: false``)."""
    import torch._dynamo.config as dynamo

    want = 2 * row_buckets(max_row_tokens) + 8
    dynamo.recompile_limit = max(dynamo.recompile_limit, want)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 8 * want)


def compile_layers(model: torch.nn.Module, max_row_tokens: int) -> Callable[[], None]:
    """Compile each decoder layer in place (lazily: the first forward compiles); returns the undo, which puts
    the plain layers back (the probes and evals after training run eagerly, on rows of any length).

    With activation checkpointing the layer's own forward is compiled and checkpointed from outside, as torchtune
    does: torch.utils.checkpoint runs its function with dynamo disabled, so a compiled layer that checkpoints inside
    (transformers' way) would compile nothing whenever the graph breaks inside it (varlen's attention)."""
    layers = decoder_layers(model)
    allow_recompiles(max_row_tokens)
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            forward = type(layer).forward
            forward = getattr(forward, "__wrapped__", forward)  # transformers' checkpointing wrapper's inner forward
            layer.forward = functools.partial(_checkpointed, torch.compile(forward.__get__(layer), dynamic=False))
        else:
            layer.compile(dynamic=False)

    def undo() -> None:
        for layer in layers:
            layer._compiled_call_impl = None
            layer.__dict__.pop("forward", None)

    return undo


def _checkpointed(forward: Callable, *args, **kwargs):
    """``forward`` under non-reentrant activation checkpointing where gradients are taken (a recompute in backward)."""
    if torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
