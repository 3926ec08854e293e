"""Recipe: LoRA through PEFT. The base stays frozen; small A, B matrices per target module are trained.

    load base (fp32; lora.quantize: Linear weights nf4/int8) -> forgetting probe (before) -> attach LoRA
    -> frozen Linear weights to the autocast dtype -> fit -> OUT/adapter (PEFT dir + chat_template.jinja + prompt_spec.yaml) -> probe, eval, report

Run: ``tunelab train --method lora --prompt SPEC.yaml --data FILE.jsonl --out DIR`` or
``tunelab train examples/train/nsmc_lora.yaml``.
"""

from __future__ import annotations

import torch

from tunelab.models.adapters import BaseInfo, adapter_load_error, check_adapter_fits
from tunelab.train.artifacts import save_adapter, save_last
from tunelab.train.config import LoraSettings, TrainConfig, resolve_init_adapter
from tunelab.train.forgetting import ForgettingProbe
from tunelab.train.freeze import apply_trainable
from tunelab.train.loop import fit
from tunelab.train.modeling import count_parameters, load_base_model
from tunelab.train.precision import cast_frozen_linears, frozen_dtype, trainable_in_fp32
from tunelab.train.preview import dry_run_summary, show_preview
from tunelab.models.quantize import base_linear_bytes
from tunelab.train.finish import finish
from tunelab.train.results import TrainDryRun, TrainReport
from tunelab.train.session import TrainSession, start_session


def attach_lora(model: torch.nn.Module, settings: LoraSettings, run: TrainSession | None = None) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    if settings.init_adapter:
        model = load_init_adapter(model, settings, run)
    else:
        cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                         target_modules=settings.target_modules, task_type="CAUSAL_LM", bias="none",
                         modules_to_save=settings.modules_to_save)
        model = get_peft_model(model, cfg)
    # Let lora_A read its input in the dtype it arrives in (bf16 under autocast): PEFT would otherwise copy it
    # to fp32 first, only for autocast to cast it back for the matmul (same numbers, two more saved copies).
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = False
    trainable_in_fp32(model)  # a base cast before LoRA (on CUDA) gave PEFT's new tensors its dtype
    dtype = frozen_dtype(settings, run.autocast if run is not None else None)
    if dtype is not None:
        cast_frozen_linears(model, dtype)
    return model


def load_init_adapter(model: torch.nn.Module, settings: LoraSettings,
                      run: TrainSession | None = None) -> torch.nn.Module:
    """The base with a saved adapter attached, trainable: training continues from its A, B (and saved modules).
    An adapter of other shapes is refused; one trained on a same-shaped other base is carried over, with a
    warning (training on goes on from it: carrying an adapter to a related base is a use of --init-adapter)."""
    from peft import LoraConfig, PeftModel

    path = settings.init_adapter
    check_adapter_fits(BaseInfo.of(model, run.model_path if run is not None else None), path,
                       allow_other_base=True, warn=run.log if run is not None else None)
    cfg = LoraConfig.from_pretrained(path)
    cfg.lora_dropout = settings.dropout
    cfg.inference_mode = False
    try:
        return PeftModel.from_pretrained(model, path, config=cfg, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:  # what the shape check cannot see
        raise adapter_load_error(path, e) from None


def _probe_base(r: TrainSession, model, probe: ForgettingProbe, loss_module) -> None:
    """FSDP: the forgetting probe's before on the sharded model (every process), the adapter switched off: the
    base alone, as measured before the adapter was attached in a run without FSDP."""
    if probe.data is not None:
        with model.disable_adapter():
            probe.measure_before(r, model, loss_module)


def run(cfg: TrainConfig, *, resume: bool = False, dry_run: bool = False, force: bool = False, log=print,
        console=None) -> TrainReport | TrainDryRun | None:
    """Train (or, with ``dry_run``, only plan); the report, None on processes other than the main one."""
    cfg = cfg.model_copy(update={"lora": resolve_init_adapter(cfg.lora)})
    r = start_session(cfg, resume=resume, dry_run=dry_run, force=force, log=log, console=console)
    show_preview(r)
    if dry_run:
        return dry_run_summary(r)
    model = load_base_model(r)
    if cfg.lora.quantize != "none":
        b = base_linear_bytes(model)
        r.log(f"base quantised ({cfg.lora.quantize}, bitsandbytes): {b['quantized']} of {b['linears']} Linear weights, "
              f"{b['bytes'] / 2**20:.2f} MiB in memory, {b['ratio']:.3f}x their bf16 size")
    probe = ForgettingProbe.create(r)
    probe.measure_before(r, model)
    model = attach_lora(model, cfg.lora, r)
    apply_trainable(model, cfg.trainable, r.model_path, log=r.log)  # new_rows_only: of modules_to_save's copy
    params = count_parameters(model)
    if cfg.lora.init_adapter:
        r.log(f"LoRA initialised from {cfg.lora.init_adapter}")
    r.log(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {cfg.lora.target_modules}: "
          f"{params['trainable']:,} trainable of {params['total']:,} ({params['trainable_share']:.2%})")
    result = fit(r, model, on_prepared=(lambda lm: _probe_base(r, model, probe, lm)) if r.fsdp else None)
    artifact = save_adapter(r, model)  # written by the main process (under FSDP gathered from every one)
    last = save_last(r, model, result, save_adapter, artifact)
    probe.measure_after(r, model, result.loss_module)
    del model
    return finish(r, result, params, probe, artifact=artifact, kind="adapter", last=last)
