"""What a run leaves besides checkpoints and the report: the trained artifact (``save_adapter``: a PEFT adapter
directory; ``save_model``: a complete HF model directory; ``save_last``: with a weight average, the last weights
beside it), the files that make it self-describing (the chat template and PromptSpec used,
``tunelab_train.json``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab.models.adapters import IDENTITY_KEY, TRAIN_META, base_identity
from tunelab.results import write_json
from tunelab.train.ema import swapped_weights
from tunelab.train.loop import FitResult
from tunelab.train.session import TrainSession
from tunelab.train.sharding import gathered
from tunelab.models.base import VOCAB_FILE


def save_adapter(run: TrainSession, model, target: Path | None = None) -> Path:
    """A standard PEFT adapter dir, plus the exact chat template and PromptSpec used in training. Called on the
    main process; under FSDP on every process (the adapter's shards are gathered), the main one writing."""
    target = target or run.out / "adapter"
    unwrapped = run.accelerator.unwrap_model(model)
    # PEFT picks the adapter's tensors (lora_*, modules_to_save copies) out of the state dict: gather those only
    state = _full_state(run, unwrapped, keep=lambda n, t: t.requires_grad or "lora_" in n or "modules_to_save" in n)
    if not run.is_main:
        return target
    target.mkdir(parents=True, exist_ok=True)
    unwrapped.save_pretrained(str(target), safe_serialization=True, **({"state_dict": state} if run.fsdp else {}))
    write_inference_files(run, target)
    return target


def save_model(run: TrainSession, model, target: Path | None = None) -> Path:
    """A complete HF model directory that `tunelab eval --model DIR` and every HF tool load. Called on the main
    process; under FSDP on every process (the weights are gathered), the main one writing."""
    target = target or run.out / "model"
    unwrapped = run.accelerator.unwrap_model(model)
    state = _full_state(run, unwrapped)
    if not run.is_main:
        return target
    target.mkdir(parents=True, exist_ok=True)
    unwrapped.config.use_cache = True
    unwrapped.save_pretrained(str(target), safe_serialization=True, **({"state_dict": state} if run.fsdp else {}))
    run.tokenizer.save_pretrained(str(target))
    write_inference_files(run, target)
    vocab = run.model_path / VOCAB_FILE  # an extended vocabulary stays one (a later stage's new_rows_only reads it)
    if vocab.is_file():
        shutil.copyfile(vocab, target / VOCAB_FILE)
    return target


def _full_state(run: TrainSession, model, keep=lambda n, t: True) -> dict[str, torch.Tensor] | None:
    """FSDP: the model's state dict (what ``keep`` selects) as full CPU tensors on the main process, gathered
    shard by shard on every process; None without FSDP (save_pretrained reads the model itself)."""
    if not run.fsdp:
        return None
    return gathered(model.state_dict(keep_vars=True), main=run.is_main, keep=keep)


def save_last(run: TrainSession, model: torch.nn.Module, result: FitResult, save: Callable[..., Path],
              artifact: Path) -> Path | None:
    """With ``train.ema_decay`` the run's result (``artifact``: OUT/adapter, OUT/model) is the average; this saves
    the last weights beside it (OUT/adapter-last, OUT/model-last) with the same ``save``."""
    if result.last_weights is None:
        return None
    target = artifact.with_name(artifact.name + "-last")
    if run.is_main or run.fsdp:  # under FSDP every process holds its shards of both and takes part in the save
        with swapped_weights(run.accelerator.unwrap_model(model), result.last_weights):
            save(run, model, target)
    return target


def write_inference_files(run: TrainSession, target: Path) -> None:
    """The exact chat template and PromptSpec used, so eval and serve render the same tokens as training."""
    tmpl = getattr(run.tokenizer, "chat_template", None)
    if isinstance(tmpl, str):
        (target / "chat_template.jinja").write_text(tmpl, encoding="utf-8")
    meta: dict[str, Any] = {"method": run.cfg.method, "base_model": run.cfg.model or "bundled",
                            "base_model_path": str(run.model_path), "data": str(run.data.path),
                            "format": run.data.format,
                            # what eval, merge and serve compare with the base they are given (models/adapters.py)
                            IDENTITY_KEY: base_identity(run.model_path, run.cfg.model or "bundled")}
    if run.cfg.data.prompt:
        write_prompt_spec(run.cfg.data.prompt, run.data.spec, target / "prompt_spec.yaml")
        spec = run.data.spec
        if spec is not None and hasattr(spec, "content_hash"):
            meta["prompt_spec_hash"] = spec.content_hash()
        meta["prompt_spec_source"] = run.cfg.data.prompt
    meta["config"] = run.cfg.model_dump(mode="json")
    write_json(target / TRAIN_META, meta)


def write_prompt_spec(source: str, spec: Any, target: Path) -> None:
    """The spec as trained: the file itself, or (few-shot examples drawn from a file) a self-contained copy
    with the examples inline, so the adapter directory does not depend on paths next to the original."""
    examples = getattr(spec, "examples", None)
    if spec is None or isinstance(examples, list) or not hasattr(spec, "resolve_examples"):
        shutil.copyfile(source, target)
        return
    import yaml

    data = spec.model_dump(mode="json", exclude_none=True)
    data["examples"] = [e.model_dump(mode="json", exclude_none=True) for e in spec.resolve_examples()]
    target.write_text(f"# {Path(source).name} as trained (few-shot examples resolved inline)\n"
                      + yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


