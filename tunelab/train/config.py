"""TrainConfig: the YAML of `tunelab train`, validated on load (errors name the file and the field).

Input paths inside a config file are relative to that file; ``out`` and paths given on the command line are
relative to the current directory. Every field has a default except ``data.path`` (and ``data.prompt`` for the
prompt format), so the smallest config is three lines::

    method: lora
    data: {path: reviews.jsonl, prompt: sentiment_binary.yaml}
    out: runs/train/sentiment
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config import Encoding, StrictModel, load_yaml, validate_as
from tunelab.errors import ConfigError
from tunelab.models.base import adapter_dir

Method = Literal["lora", "full", "pretrain"]
DataFormat = Literal["auto", "chat", "alpaca", "sharegpt", "text", "prompt"]


class DataSource(StrictModel):
    """One training file: its format, and the PromptSpec its labelled items are rendered through."""

    path: str = Field(description="JSONL (chat/alpaca/sharegpt/labelled items/text), a .txt file or a folder of .txt")
    format: DataFormat = Field("auto", description="auto: by file type and the first record's fields")
    prompt: str | None = Field(None, description="PromptSpec YAML for labelled items (format: prompt)")
    limit: int | None = Field(None, ge=1, description="use only the first N records")
    text_field: str = Field("text", description="field that holds the document (format: text, JSONL)")
    encoding: Encoding | None = Field(None, description="the file's encoding when it is not UTF-8 (e.g. cp949 for a file saved by Windows or Excel in Korea); default: UTF-8, with or without a BOM")

    @model_validator(mode="after")
    def _prompt_format(self) -> "DataSource":
        if self.format == "prompt" and not self.prompt:
            raise ValueError("format 'prompt' needs prompt: a PromptSpec YAML")
        return self


class TrainDataConfig(DataSource):
    mix: list[DataSource] = Field(
        default_factory=list, description="more files trained together with data.path, each in its own format "
        "and PromptSpec (another task, general chat data against forgetting); all examples are shuffled together. "
        "data.prompt stays the one saved with the adapter and used by eval.data")
    max_seq_len: int = Field(1024, ge=8, description="longest example in tokens (pretrain: block size)")
    too_long: Literal["drop", "error"] = Field("drop", description="what to do with longer SFT examples")


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear",
                                            description="'all-linear' or module names, e.g. [q_proj, v_proj]")
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved with the adapter, e.g. [embed_tokens] (input "
                          "embeddings: new vocabulary or a script the base model saw little of; a large adapter)")
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="storage of the frozen base Linear weights; auto: the autocast dtype "
                            "(saves the per-step weight casts and half their memory)")
    quantize: Literal["none", "nf4", "int8"] = Field(
        "none", description="load the frozen base Linear weights quantised (bitsandbytes; QLoRA): nf4 = 4-bit "
                            "NormalFloat with double quantisation, int8 = 8-bit; LoRA trains on top in the autocast "
                            "dtype and is saved as a plain PEFT adapter for the full-precision base. none: off")
    init_adapter: str | None = Field(
        None, description="start from this PEFT adapter (a directory with adapter_config.json, or a train --out "
                          "directory holding adapter/) instead of fresh A, B: continue training it, or carry it "
                          "to a related task. Its r, alpha, target modules and modules_to_save are used")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one module name, or 'all-linear'")
        if isinstance(v, str) and v != "all-linear":
            return [v]
        return v


def resolve_init_adapter(settings: LoraSettings) -> LoraSettings:
    """With ``init_adapter``, the adapter's own shape is the setting: the settings with its r, alpha, targets and
    modules_to_save; a config that says otherwise is refused (a silently ignored ``r: 8`` would train something
    other than the file reads). Read when a run starts, so that a config may name an adapter a run will make."""
    if settings.init_adapter is None:
        return settings
    path = adapter_dir(settings.init_adapter)
    where = "lora.init_adapter"
    try:
        saved = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path / 'adapter_config.json'} (expected a PEFT adapter directory, e.g. "
                          f"the adapter/ of a train run): {str(e).splitlines()[0]}", where=where) from None
    if saved.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path} is a {saved.get('peft_type')} adapter, not LoRA", where=where)
    theirs = {"r": saved.get("r"), "alpha": saved.get("lora_alpha"),
              "target_modules": saved.get("target_modules"), "modules_to_save": saved.get("modules_to_save")}
    for name, other in theirs.items():
        mine = getattr(settings, name)
        if name not in settings.model_fields_set or (name == "target_modules" and mine == "all-linear"):
            continue
        if _norm(mine) != _norm(other):
            raise ConfigError(f"lora.{name} is {mine} but the adapter in {path} has {other}: drop lora.{name} "
                              f"(the adapter's is used) or start a fresh adapter", where=where)
    return settings.model_copy(update={"init_adapter": str(path), "r": int(theirs["r"]),
                                       "alpha": float(theirs["alpha"]), "target_modules": theirs["target_modules"],
                                       "modules_to_save": theirs["modules_to_save"]})


def _norm(v: Any) -> Any:
    """Compare settings as values: lists as sets, numbers as floats."""
    if isinstance(v, (list, tuple, set)):
        return sorted(map(str, v))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


class ParamGroup(StrictModel):
    """Trainable parameters whose name matches ``match`` (a regular expression, searched) train with their own
    learning-rate multiplier and/or weight decay: e.g. ``{match: embed_tokens, lr_scale: 0.1}`` for embeddings
    trained next to LoRA (``lora.modules_to_save``), or ``{match: lora_B, lr_scale: 16}`` (LoRA+)."""

    match: str = Field(description="regular expression searched in parameter names; the first matching group wins")
    lr_scale: float = Field(1.0, gt=0, description="this group's lr = optim.lr x lr_scale, same schedule")
    weight_decay: float | None = Field(None, ge=0.0, description="null: optim.weight_decay (0 for 1-D tensors)")

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return v


class OptimConfig(StrictModel):
    lr: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="share of the steps with a linear warmup")
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final lr as a share of lr (cosine/linear)")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="null: no clipping")
    param_groups: list[ParamGroup] = Field(default_factory=list, description="per-parameter lr multipliers / "
                                                                             "weight decay, by name")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw: torch AdamW, fp32 state (8 bytes per trained weight); adamw8bit: bitsandbytes' "
                             "AdamW8bit, its two moments block-wise quantised to 8 bits (about 2 bytes per trained "
                             "weight; tensors under 4096 weights keep fp32 state). Runs on CUDA and on the CPU")
    fused: bool | Literal["auto"] = Field(
        "auto", description="adamw: torch's fused AdamW kernel (one kernel for all parameters); auto: on CUDA "
                            "only. Not for adamw8bit")
    offload: bool = Field(
        False, description="method full/pretrain on CUDA: keep the AdamW state (and an fp32 copy of the weights it "
                           "updates) in CPU memory, the step computed there; saves 8 bytes per weight of GPU "
                           "memory at the cost of two copies per step. On a CPU run: a no-op (with a note)")


class LoopConfig(StrictModel):
    epochs: float = Field(1.0, gt=0, description="may be fractional, e.g. 0.5")
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps (overrides epochs)")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step, over all processes")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8, description="examples per forward pass (grad accumulation = batch_size / (micro_batch_size x "
                       "processes)); auto (or null): as many as fit in micro_batch_tokens, each step's examples "
                       "packed into the fewest micro-batches of at most that many tokens (the token budget is "
                       "the knob; the loss is still the mean over the step's target tokens)")
    micro_batch_tokens: int | None = Field(
        2048, ge=8, description="also cap a micro-batch at this many tokens (bounds activation memory on long "
                                "examples; an example longer than this is a micro-batch of its own); null: no cap. "
                                "With micro_batch_size auto: the budget each micro-batch is filled to")
    packing: bool = Field(True, description="padding-free rows: sequences concatenated with per-sequence "
                                            "positions and a block-diagonal causal mask")
    pack_len: int = Field(1024, ge=8, description="attention 'mask': longest packed row in tokens")
    attention: Literal["auto", "varlen", "mask", "flex"] = Field(
        "auto", description="packed rows: varlen = one row, causal attention per sequence (sum of L^2 work; "
                            "fastest on a CPU); mask = rows of pack_len with a block-diagonal 4D mask, one "
                            "attention kernel per layer (any attention implementation); flex = one row, torch's "
                            "flex attention with a document block mask (one fused kernel per layer that skips the "
                            "blocks across sequences; CUDA only: it has no backward on a CPU); auto: varlen on a "
                            "CPU; on CUDA, where a step is bound by kernel launches, flex (mask without triton)")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer (packed rows padded to a multiple of 128 tokens so "
                            "that few shapes compile); auto: on CUDA only (on a CPU it measured slower)")
    seed: int = 0
    dtype: Literal["auto", "bfloat16", "float32"] = Field("auto", description="autocast dtype; auto: bf16 on CPUs "
                                                                              "with native bf16 and on CUDA")
    prompt_loss_weight: float = Field(
        0.0, ge=0.0, description="SFT: also train language modelling on the prompt tokens (system prompt, user "
                                 "turn; everything but the answer), its mean loss counted this many times the "
                                 "answer's; 0: answers only. Helps short answers to long inputs (a label)")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="keep an exponential moving average of the trained weights (Polyak "
                                           "averaging; e.g. 0.998 averages over about the last 500 steps) and save "
                                           "it as the result; the last weights are saved beside it (adapter-last/, "
                                           "model-last/) and the before/after eval scores both. null: off")
    activation_checkpointing: bool = False
    max_memory_gb: float | None = Field(
        None, gt=0, description="memory budget of the run in GB (GPU memory on CUDA, process memory on a CPU): "
                                "before any weight is loaded the run's peak is estimated from the model's "
                                "config.json (tunelab.train.memory; the preview prints it) and a run over the "
                                "budget is refused with the breakdown and what would fit. null: no check")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    log_every: int = Field(1, ge=1)

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _auto_micro(cls, v: Any) -> Any:
        return "auto" if v is None else v

    @model_validator(mode="after")
    def _token_budget(self) -> "LoopConfig":
        if self.micro_batch_size == "auto" and self.micro_batch_tokens is None:
            raise ValueError("micro_batch_size auto fills each micro-batch up to micro_batch_tokens: set "
                             "micro_batch_tokens (e.g. 2048), or give micro_batch_size a number")
        return self


class TrainableConfig(StrictModel):
    """The ``trainable:`` section: which weights a run trains (a language's new vocabulary, stage by stage)."""

    match: list[str] | None = Field(
        None, description="method full/pretrain: train only the parameters whose name matches one of these regular "
                          "expressions (searched), everything else frozen; e.g. [embed_tokens, lm_head] for a new "
                          "vocabulary's first stage. null: every weight (LoRA: lora.target_modules, "
                          "lora.modules_to_save)")
    new_rows_only: bool = Field(
        False, description="of the input embedding and the output layer, train only the rows `tunelab vocab extend` "
                           "added (from the first_new_id of the model's tunelab_vocab.json); every old row stays "
                           "exactly as it was (EEVE's first stage: new tokens learn, the model's old knowledge is "
                           "untouched). Needs optim.weight_decay 0 for them")

    @field_validator("match")
    @classmethod
    def _regexes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("give at least one regular expression, or null for every weight")
        for m in v or []:
            try:
                re.compile(m)
            except re.error as e:
                raise ValueError(f"{m!r} is not a regular expression: {e}") from None
        return v


class CheckpointConfig(StrictModel):
    every_steps: int | None = Field(None, ge=1, description="save a resumable checkpoint every N steps")
    keep: int = Field(2, ge=1, description="keep the last N checkpoints")


class BeforeAfterEval(StrictModel):
    config: str | None = Field(None, description="tunelab eval config; its models are replaced by before/after")
    data: str | None = Field(None, description="or: held-out labelled items scored with the training PromptSpec")
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> "BeforeAfterEval":
        if (self.config is None) == (self.data is None):
            raise ValueError("give either eval.config (an eval YAML) or eval.data (held-out items)")
        return self


class ForgettingConfig(StrictModel):
    """The ``forgetting:`` section: general data whose perplexity is compared before and after training."""

    data: str = Field(description="general chat/alpaca/text data the task does not train; "
                                  "reported as perplexity on its answers before and after")
    format: DataFormat = "auto"
    limit: int | None = Field(64, ge=1)
    max_seq_len: int = Field(512, ge=8, description="the probe's own length limit (longer examples are dropped), "
                                                    "not data.max_seq_len: probes of runs with different "
                                                    "max_seq_len measure the same examples")


class TrainConfig(StrictModel):
    name: str | None = None
    method: Method = "lora"
    model: str | None = Field(None, description="'bundled' (default), an HF directory or a .gguf file")
    out: str = Field("runs/train", description="output directory (adapter/, model/, checkpoints/, report)")
    data: TrainDataConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)
    trainable: TrainableConfig = Field(default_factory=TrainableConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: BeforeAfterEval | None = None
    forgetting: ForgettingConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        t = self.train
        if t.micro_batch_size != "auto" and t.batch_size % t.micro_batch_size:
            raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                             f"({t.micro_batch_size})")
        if self.eval is not None and self.eval.data and not self.data.prompt:
            raise ValueError("eval.data scores held-out items with the training PromptSpec: set data.prompt, "
                             "or use eval.config")
        if self.method != "lora" and self.lora.init_adapter:
            raise ValueError(f"lora.init_adapter is for method lora; for {self.method}, merge the adapter first "
                             f"(tunelab merge) and give the merged model as model")
        if self.method != "lora" and self.lora.quantize != "none":
            raise ValueError(f"lora.quantize is for method lora (a frozen quantised base under trained LoRA "
                             f"weights); method {self.method} trains the weights themselves")
        if self.method == "lora" and self.trainable.match is not None:
            raise ValueError("trainable.match is for methods full and pretrain; a LoRA run trains its adapter "
                             "(lora.target_modules) and the modules in lora.modules_to_save")
        if self.trainable.new_rows_only and (self.optim.weight_decay or any(
                g.weight_decay for g in self.optim.param_groups)):
            raise ValueError("trainable.new_rows_only keeps the old embedding rows exactly: set optim.weight_decay "
                             "(and param_groups' weight_decay) to 0, or decay would shrink them")
        if self.optim.optimizer == "adamw8bit" and self.optim.fused is True:
            raise ValueError("optim.fused is torch AdamW's fused kernel; optim.optimizer adamw8bit has its own: "
                             "drop optim.fused")
        if self.optim.offload and self.method == "lora":
            raise ValueError("optim.offload is for methods full and pretrain: a LoRA run's optimizer state is "
                             "already small (the adapter's)")
        if self.optim.offload and self.optim.optimizer != "adamw":
            raise ValueError("optim.offload keeps AdamW's fp32 state on the CPU; with adamw8bit choose one of them")
        if self.method == "pretrain" and self.train.prompt_loss_weight:
            raise ValueError("train.prompt_loss_weight is for SFT (lora, full): pretrain already trains every token")
        if self.method == "pretrain" and self.data.format not in ("auto", "text"):
            raise ValueError("method 'pretrain' trains on raw text: set data.format to 'text' (or auto)")
        return self


def set_field(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict (command-line overrides), creating sections as needed."""
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section", where="<command line>")
        cur = nxt
    cur[parts[-1]] = value


PATH_FIELDS = ("data.path", "data.prompt", "out", "model", "eval.config", "eval.data", "forgetting.data",
               "lora.init_adapter", "data.mix.*.path", "data.mix.*.prompt")  # *: every item of a list


def _slots(data: dict[str, Any], dotted: str) -> list[tuple[dict[str, Any], str]]:
    """The (mapping, key) pairs that ``a.b.c`` names and that are present; ``*`` steps into every list item."""
    holders: list[Any] = [data]
    *parents, last = dotted.split(".")
    for p in parents:
        if p == "*":
            holders = [x for h in holders if isinstance(h, list) for x in h]
        else:
            holders = [h[p] for h in holders if isinstance(h, dict) and p in h]
    return [(h, last) for h in holders if isinstance(h, dict) and h.get(last) is not None]


def _absolute(value: Any, base_dir: Path, key: str) -> Any:
    """A relative path made absolute; model names such as 'bundled' that are not files stay as they are."""
    if not isinstance(value, str):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return value
    if key == "model" and not (base_dir / p).exists():
        return value
    return str((base_dir / p).resolve())


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                      sets: dict[str, Any] | None = None) -> TrainConfig:
    """Load a config file (or start from nothing) and apply ``{"dotted.field": value}`` overrides.

    Input paths in the file are relative to its folder; ``out`` and paths given as overrides are relative
    to the current directory. ``None`` overrides are ignored (a flag that was not given); ``sets``
    (``--set FIELD=VALUE``) apply as given, so ``--set checkpoint.every_steps=null`` unsets a field.
    """
    data: dict[str, Any] = {}
    source = "<command line>"
    if path is not None:
        raw = load_yaml(path)
        if raw is None:
            raise ConfigError("the file is empty", where=str(path))
        if not isinstance(raw, dict):
            raise ConfigError("expected a mapping of fields at the top level", where=str(path))
        data = raw
        source = str(path)
        base = Path(path).resolve().parent
        for key in PATH_FIELDS:
            if key == "out":  # outputs go where the command runs, like `tunelab eval --out`
                continue
            for holder, k in _slots(data, key):
                holder[k] = _absolute(holder[k], base, key)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    given.update(sets or {})
    for key, value in given.items():
        fix = key in PATH_FIELDS and value is not None
        set_field(data, key, _absolute(value, Path.cwd(), key) if fix else value)
    if given and path is not None:
        source += " (with command-line overrides)"
    if "data" not in data:
        raise ConfigError("data: required field is missing (give --data FILE or a data: section)", where=source)
    return validate_as(TrainConfig, data, source)
