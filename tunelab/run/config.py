"""The experiment file of `tunelab run`: one YAML that names the prompts to measure, the optional teacher
data, the fine-tuning methods, the eval after tuning and the optional serve check.

Every field is checked on load; errors read ``file:line: field: what to fix``. Input paths are relative to
the experiment file. A minimal experiment::

    name: nsmc
    data: {eval: ../data/nsmc_binary_dev_200.jsonl, train: ../data/nsmc_binary_train_512.jsonl}
    prompts: {short: ../train/sentiment_binary_short.yaml}
    train: [{name: lora, method: lora, prompt: short}]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tunelab.config import GenerationConfig, StrictModel, describe_validation_error, field_line, load_yaml
from tunelab.errors import ConfigError
from tunelab.vocab.config import VocabOptions

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TRAIN_SECTIONS = ("lora", "optim", "train", "checkpoint", "forgetting", "trainable")


class ExperimentData(StrictModel):
    eval: str = Field(description="labelled items every prompt and every tuned model is scored on (JSONL/CSV)")
    eval_limit: int | None = Field(None, ge=1, description="use only the first N eval items")
    train: str | None = Field(None, description="labelled training items ('gold' data of the train methods)")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training records")
    id_field: str | None = Field(None, description="item id field of the eval data (default: 'id' if present)")
    name: str | None = Field(None, description="display name of the eval set")


class EvalSettings(StrictModel):
    scoring: Literal["auto", "loglik", "generate"] = "auto"
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    batch_size: int = Field(16, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    use_cache: bool = Field(True, description="reuse model answers from tunelab's call cache")


class GenerateSettings(StrictModel):
    config: str | dict[str, Any] = Field(description="a `tunelab generate` config file, or the config inline")
    limit: int | None = Field(None, ge=1, description="send only the first N inputs")
    inputs: Literal["config", "train"] = Field(
        "config", description="config: the generate config's data; train: the texts of data.train (up to "
                              "train_limit), with only the fields the prompt reads, so the teacher never sees a gold "
                              "label; the stage then scores the teacher's labels against the withheld gold ones "
                              "(agreement, Cohen's kappa, confusion; label pipelines only)")
    exclude_gold: bool = Field(True, description="inputs: config: the texts of data.train and data.eval are added to "
                                                 "the generate config's data.exclude, so the teacher never labels a gold "
                                                 "training review (the student would see it twice, once with the "
                                                 "teacher's label) nor an eval review (a leak into training)")
    serve: bool | str = Field(False, description="true: the teacher is the experiment's base model behind `tunelab "
                                                 "serve` on 127.0.0.1, started for the stage (a plumbing check without "
                                                 "an API); the name of a train method: that tuned model (adapter on its "
                                                 "base, or model) is the teacher, and the stage runs after it "
                                                 "(pseudo-labelling unlabelled text with a fine-tuned model)")


class VocabSettings(VocabOptions):
    """The ``vocab:`` stage: `tunelab vocab extend` on the experiment's model (the command's fields: add, field,
    limit, min_frequency, encoding); train methods with ``model: vocab`` start from the extended model."""

    data: str = Field(description="in-domain text (JSONL/CSV records) the new tokens are learnt from")


class TrainMethod(StrictModel):
    name: str = Field(description="folder name under train/ and the model name in tables and the server")
    method: Literal["lora", "full", "pretrain"] | None = Field(
        None, description="default: the config's method, else lora; pretrain: continued pre-training on raw text "
                          "(data: a text file), a stage other methods start from (model: NAME)")
    model: str = Field("base", description="what it starts from: base (the experiment's model), vocab (the vocab: "
                                           "stage's extended model), or the name of an earlier full or pretrain "
                                           "method (the model it wrote): stages chained, each cached")
    score: bool | None = Field(None, description="eval_after scores it; default: every method but pretrain")
    config: str | None = Field(None, description="a `tunelab train` config to start from (its eval: is dropped)")
    data: str = Field("gold", description="gold (data.train), generated (the generate stage's output), or a file")
    mix: list[str] = Field(default_factory=list, description="more training data through the same prompt, shuffled "
                                                             "in: gold, generated or files (e.g. data: gold, mix: "
                                                             "[generated]: gold + teacher labels)")
    items: Literal["all", "generated"] = Field(
        "all", description="generated: only the items the generate stage kept, in its order (gold data on the "
                           "texts a teacher labelled: a like-for-like teacher-vs-gold comparison)")
    prompt: str | None = Field(None, description="a name from prompts:, 'best' (the winner of the eval stage), "
                                                 "or a PromptSpec file; default: the first prompt")
    limit: int | None = Field(None, ge=1, description="train on the first N records only")
    max_seq_len: int | None = Field(None, ge=8)
    lora: dict[str, Any] | None = Field(None, description="fields of the train config's lora: section")
    optim: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    forgetting: dict[str, Any] | None = None
    trainable: dict[str, Any] | None = Field(None, description="fields of the train config's trainable: section")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use letters, digits, '_', '-' or '.' (it names a folder)")
        if v in ("base", "vocab"):
            raise ValueError(f"{v!r} names a starting model (model: base / vocab); call the method otherwise")
        return v


class EvalAfterSettings(StrictModel):
    prompt: str = Field("train", description="'train': each model with the prompt it was trained with; or a name "
                                             "from prompts:")
    compare: list[tuple[str, str]] = Field(
        default_factory=list, description="pairs [A, B] of train method names: B against A on the same items "
                                          "(paired bootstrap, exact McNemar, Holm over the pairs)")


class ServeSettings(StrictModel):
    mode: Literal["smoke", "command"] = Field(
        "smoke", description="smoke: start the server over the base model + adapters, send one request through "
                             "the openai client, stop; command: only write the command that serves them")
    max_tokens: int = Field(16, ge=1, le=512)


class Experiment(StrictModel):
    name: str
    description: str | None = None
    model: str = Field("bundled", description="base model: bundled, an HF directory or a .gguf file")
    seed: int = 0
    data: ExperimentData
    prompts: dict[str, str | dict[str, Any]] = Field(description="name -> PromptSpec file or an inline spec")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    generate: GenerateSettings | None = None
    vocab: VocabSettings | None = None
    train: list[TrainMethod] = Field(default_factory=list)
    eval_after: EvalAfterSettings = Field(default_factory=EvalAfterSettings)
    serve: ServeSettings | None = None
    tracking: list[Literal["mlflow", "tensorboard"]] = Field(
        default_factory=list, description="also log to these when installed (skipped when not)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use letters, digits, '_', '-' or '.' (it names the run folder)")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one prompt is needed")
        for k in v:
            if not NAME_RE.match(str(k)) or k in ("best", "train"):
                raise ValueError(f"prompt name {k!r}: use letters, digits, '_', '-' or '.' (not 'best' or 'train')")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        names = [m.name for m in self.train]
        if len(set(names)) != len(names):
            raise ValueError(f"train method names must be unique, got {names}")
        for i, m in enumerate(self.train):
            if m.model == "vocab" and self.vocab is None:
                raise ValueError(f"train.{i}.model: 'vocab' needs a vocab: stage (the extended model)")
            if m.model not in ("base", "vocab") and m.model not in names[:i]:
                raise ValueError(f"train.{i}.model: {m.model!r} is neither base, vocab nor an earlier train method "
                                 f"({', '.join(names[:i]) or 'none before it'})")
            if "generated" in (m.data, *m.mix) and self.generate is None:
                raise ValueError(f"train.{i}.data: 'generated' needs a generate: stage")
            teacher = self.generate.serve if self.generate is not None else None
            if isinstance(teacher, str) and "generated" in (m.data, *m.mix, m.items) and teacher not in names[:i]:
                raise ValueError(f"train.{i}: it trains on the labels of teacher {teacher!r} (generate.serve), "
                                 f"which must be a train method before it")
            if m.data == "gold" and self.data.train is None:
                raise ValueError(f"train.{i}.data: 'gold' needs data.train (the training items)")
            if m.items == "generated" and (self.generate is None or m.data == "generated"):
                raise ValueError(f"train.{i}.items: 'generated' picks the generate stage's items from other data "
                                 "(e.g. data: gold); it needs a generate: stage")
            if m.prompt in self.prompts or m.prompt in (None, "best"):
                continue
            if not m.prompt.endswith((".yaml", ".yml")):
                raise ValueError(f"train.{i}.prompt: {m.prompt!r} is neither a name from prompts: "
                                 f"({', '.join(self.prompts)}), 'best', nor a .yaml file")
        for j, pair in enumerate(self.eval_after.compare):
            for name in pair:
                if name not in names:
                    raise ValueError(f"eval_after.compare.{j}: {name!r} is not a train method ({', '.join(names)})")
            if pair[0] == pair[1]:
                raise ValueError(f"eval_after.compare.{j}: a method against itself")
        if self.generate is not None and isinstance(self.generate.serve, str) and self.generate.serve not in names:
            raise ValueError(f"generate.serve: {self.generate.serve!r} is not a train method ({', '.join(names)})")
        if self.generate is not None and self.generate.inputs == "train" and self.data.train is None:
            raise ValueError("generate.inputs: 'train' needs data.train (the texts the teacher labels)")
        p = self.eval_after.prompt
        if p != "train" and p not in self.prompts:
            raise ValueError(f"eval_after.prompt: {p!r} is neither 'train' nor a name from prompts: "
                             f"({', '.join(self.prompts)})")
        return self


# --------------------------------------------------------------------------------------------------
# loading, with file:line errors
# --------------------------------------------------------------------------------------------------
def where(path: Path, *loc: Any) -> str:
    line = field_line(path, tuple(loc)) if loc else None
    return f"{path}:{line}" if line else str(path)


def config_error(path: Path, loc: tuple, message: str) -> ConfigError:
    dotted = ".".join(str(x) for x in loc)
    return ConfigError(f"{dotted}: {message}" if dotted else message, where=where(path, *loc))


def _loc(dotted: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in dotted.split(".")) if dotted else ()


def read_experiment(path: Path) -> Experiment:
    """Load and validate an experiment file (not yet resolved: see tunelab.run.resolve.load_experiment)."""
    raw = load_yaml(path)
    if raw is None:
        raise ConfigError("the file is empty", where=str(path))
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping of fields (name, data, prompts, train, ...)", where=f"{path}:1")
    try:
        return Experiment.model_validate(raw)
    except ValidationError as e:
        dotted, msg = describe_validation_error(e, Experiment)
        loc = _loc(dotted)
        if loc:
            msg = f"{dotted}: {msg}"
        else:  # a check over several fields names its field first ("train.0.data: ..."): point there
            m = re.match(r"^([a-z_]+(?:\.[A-Za-z0-9_]+)*): ", msg)
            if m:
                loc = _loc(m.group(1))
        raise ConfigError(msg, where=where(path, *loc)) from None


@dataclass
class PromptRef:
    name: str
    spec: Any              # PromptSpec
    path: Path | None      # the file it came from (None: inline)
    hash: str


@dataclass
class MethodPlan:
    entry: TrainMethod
    index: int
    base_data: dict[str, Any]   # the merged train-config dict before the stage fills data.path / prompt / out
    prompt: str                 # a prompt name, 'best', or '@file' for a PromptSpec file outside prompts:
    prompt_ref: PromptRef | None = None
    scored: bool = True         # eval_after scores it (TrainMethod.score; default: not a pretrain method)
    method: str = "lora"        # the method it trains (base_data's, after the config and the entry are merged)


@dataclass
class ResolvedExperiment:
    exp: Experiment
    path: Path
    base_dir: Path
    prompts: dict[str, PromptRef]
    eval_data: Path
    train_data: Path | None
    methods: list[MethodPlan] = field(default_factory=list)
    generate_config: Path | dict[str, Any] | None = None
    model: str = "bundled"
    limit: int | None = None   # --limit N: a quick smoke run
    shown: Path | None = None  # the file as the user named it (for error messages)
    vocab_data: Path | None = None  # the vocab: stage's text file

    @property
    def where_path(self) -> Path:
        return self.shown or self.path

    @property
    def name(self) -> str:
        return self.exp.name
