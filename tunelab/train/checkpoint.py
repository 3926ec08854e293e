"""Resumable checkpoints without pickles: safetensors for tensors, JSON for everything else.

A checkpoint ``OUT/checkpoints/step-000040/`` holds

- ``weights.safetensors``: the trainable parameters by name (LoRA: the adapter only; full: every weight),
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter tensors and its param groups,
- ``rng-rank{r}.safetensors`` + ``rng-rank{r}.json``: torch (CPU and CUDA), Python and NumPy RNG states,
- ``state.json``: step, data position (epoch, step in epoch), schedule, tokens seen, elapsed time.

It is written to a temporary folder and renamed into place, then ``OUT/checkpoints/latest`` is replaced, so
a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _contiguous(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in d.items()}


# --------------------------------------------------------------------------------------------------
# optimizer
# --------------------------------------------------------------------------------------------------
def optimizer_to_files(opt: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict (or ``opt`` itself when it is one) as safetensors tensors and JSON."""
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            elif isinstance(v, dict):  # bitsandbytes' 8-bit state: {"__bnb_optimizer_quant_state__": {name: tensor}}
                for kk, vv in v.items():
                    if torch.is_tensor(vv):
                        tensors[f"{pid}.{k}.{kk}"] = vv
                    else:
                        scalars.setdefault(str(pid), {}).setdefault(k, {})[kk] = vv
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    seen: set[int] = set()
    for k, v in tensors.items():  # safetensors refuses shared storage (bitsandbytes' qmaps are one per optimizer)
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[k] = v.clone()
        seen.add(ptr)
    return _contiguous(tensors), {"param_groups": groups, "scalars": scalars}


def gathered_optimizer_state(opt: torch.optim.Optimizer, *, main: bool) -> dict[str, Any]:
    """FSDP: the optimizer's state dict with its DTensor shards gathered to full CPU tensors on the main process
    (``{}`` elsewhere), in the form ``opt.state_dict()`` has in one process; every process must call it."""
    from tunelab.train.sharding import gathered

    sd = opt.state_dict()
    state = {}
    for pid in sorted(sd["state"]):
        st = sd["state"][pid]
        tensors = gathered({k: v for k, v in st.items() if torch.is_tensor(v)}, main=main)
        state[pid] = {k: tensors.get(k) if torch.is_tensor(v) else v for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else {}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        if "." in name:  # one level of nesting (bitsandbytes' 8-bit state)
            outer, inner = name.split(".", 1)
            state.setdefault(int(pid), {}).setdefault(outer, {})[inner] = v
        else:
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta.get("scalars", {}).items():
        for k, v in st.items():
            if isinstance(v, dict):
                state.setdefault(int(pid), {}).setdefault(k, {}).update(v)
            else:
                state.setdefault(int(pid), {})[k] = v
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in g.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------
def rng_to_files() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    meta: dict[str, Any] = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return tensors, meta


def rng_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    if "numpy" in meta:
        import numpy as np

        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------
def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(out: Path, step: int, *, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | dict,
                    state: dict[str, Any], keep: int = 2, rank: int = 0, world: int = 1,
                    barrier=lambda: None) -> Path:
    """Write a checkpoint for ``step``. Every process writes its RNG state; rank 0 writes the rest."""
    root = checkpoint_root(out)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_t, rng_m = rng_to_files()
    save_file(_contiguous(rng_t), str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_m), encoding="utf-8")
    if rank == 0:
        save_file(_contiguous(weights), str(tmp / "weights.safetensors"), metadata={"format": "pt"})
        opt_t, opt_m = optimizer_to_files(optimizer)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_m), encoding="utf-8")
        (tmp / STATE).write_text(json.dumps({**state, "step": step, "world_size": world}, indent=1),
                                 encoding="utf-8")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(root / "latest", final.name + "\n")
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    root = checkpoint_root(out)
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if (p / STATE).is_file():
            return p
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file())
    return done[-1] if done else None


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json alone (step, counters, the run's config hash)."""
    return json.loads((path / STATE).read_text(encoding="utf-8"))


def load_checkpoint(path: Path, *, rank: int = 0) -> dict[str, Any]:
    """Everything in a checkpoint as plain objects (tensors on the CPU)."""
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    rng_file = path / f"rng-rank{rank}.safetensors"
    return {
        "state": state,
        "weights": load_file(str(path / "weights.safetensors")),
        "optimizer": (load_file(str(path / "optimizer.safetensors")),
                      json.loads((path / "optimizer.json").read_text(encoding="utf-8"))),
        "rng": (load_file(str(rng_file)), json.loads((path / f"rng-rank{rank}.json").read_text(encoding="utf-8")))
        if rng_file.is_file() else None,
    }
