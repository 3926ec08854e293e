"""The `tunelab generate` config: one YAML file per dataset to generate (see docs/generate.md).

Every field is checked on load; an unknown or mistyped field is an error that names the file, the line and
the field. Paths are relative to the config file. The API key is never a config value: name the environment
variable that holds it (``teacher.api_key_env``) or a file (``teacher.api_key_file``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from tunelab.config import Encoding, StrictModel, field_line, format_validation_error, load_yaml
from tunelab.errors import ConfigError

Pipeline = Literal["label", "respond", "self-instruct"]


class Price(StrictModel):
    input: float = Field(ge=0, description="USD per 1M prompt tokens")
    output: float = Field(ge=0, description="USD per 1M completion tokens")


class TeacherConfig(StrictModel):
    model: str = Field(description="model name the endpoint knows, e.g. gpt-4o-mini")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint; default $OPENAI_BASE_URL or OpenAI")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable that holds the key")
    api_key_file: str | None = Field(None, description="file that holds the key (relative to the config)")
    concurrency: int = Field(16, ge=1, le=1024, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="per request, from sending to the whole answer")
    max_retries: int = Field(6, ge=0, le=50, description="retries on 429, 5xx, timeouts, broken answers")
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    jitter: float = Field(0.5, ge=0, le=1, description="random share of each backoff delay")
    max_retry_after_s: float = Field(300.0, ge=0, description="cap on a server's Retry-After")
    price: Price | None = Field(None, description="USD per 1M tokens; default from tunelab's table by model name")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra request fields for this server")

    @model_validator(mode="before")
    @classmethod
    def _no_literal_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("never put the API key in a config file: set api_key_env (the name of an "
                             "environment variable) or api_key_file")
        return data


class SamplingConfig(StrictModel):
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1, le=131072)
    seed: int | None = 0
    stop: list[str] = Field(default_factory=list)
    samples: int = Field(1, ge=1, le=64, description="answers per input, each its own request (needs temperature > 0)")
    logprobs: Literal["auto", True, False] = Field(
        "auto", description="ask the teacher for the log probability of each answer token (label: the label's "
                            "confidence); auto: on for the label pipeline with one sample when quality.min_confidence "
                            "or quality.balance needs the confidence, off otherwise")
    top_logprobs: int = Field(5, ge=0, le=20, description="with logprobs: the most likely alternatives per token "
                                                         "(the label's normalised confidence reads the first token's)")

    def request_params(self, sample: int = 0, *, logprobs: bool = False) -> dict[str, Any]:
        """What goes into each request and into its journal key (logprobs only when on, so the keys of runs
        without them stay what they were)."""
        p: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.seed is not None:
            p["seed"] = self.seed + sample
        if self.stop:
            p["stop"] = list(self.stop)
        if logprobs:
            p["logprobs"] = True
            if self.top_logprobs:
                p["top_logprobs"] = self.top_logprobs
        return p


class BudgetConfig(StrictModel):
    max_requests: int | None = Field(None, ge=0, description="requests sent to the teacher (retries not counted)")
    max_tokens: int | None = Field(None, ge=0, description="prompt + completion tokens")
    max_cost_usd: float | None = Field(None, ge=0, description="estimated from teacher.price")


class InputsConfig(StrictModel):
    path: str = Field(description="JSONL or CSV, relative to the config file")
    limit: int | None = Field(None, ge=1)
    id_field: str | None = Field(None, description="default 'id' if present, else the line number")
    encoding: Encoding | None = Field(None, description="the file's encoding when it is not UTF-8 (e.g. cp949 for a file saved by Windows or Excel in Korea); default: UTF-8, with or without a BOM")
    exclude: list[str] = Field(
        default_factory=list,
        description="files (JSONL/CSV, relative to the config) whose items are not sent: an input is skipped when "
                    "every field the prompt reads equals that of a record there (a gold training set, so a teacher "
                    "label never stands beside or instead of a gold one; an eval set, so it never leaks into "
                    "training); limit counts the inputs left")


class QualityConfig(StrictModel):
    min_chars: int = Field(1, ge=0, description="shortest acceptable answer")
    max_chars: int | None = Field(None, ge=1, description="longest acceptable answer")
    allow_truncated: bool = Field(False, description="keep answers cut off by max_tokens")
    repair: int = Field(1, ge=0, le=5, description="re-ask up to N times when an answer cannot be parsed")
    dedup: Literal["auto", "none", "exact", "rouge", "minhash"] = Field(
        "auto", description="exact, or near-duplicates by ROUGE-L (as self-instruct) or MinHash; auto: rouge "
                            "for self-instruct, exact otherwise")
    dedup_threshold: float = Field(0.7, gt=0, le=1, description="ROUGE-L F or Jaccard at or above this is a dup")
    answer_check: Literal["none", "consistent"] = Field(
        "consistent", description="number tasks: the final answer must equal the reasoning's last number")
    require_correct: bool = Field(False, description="respond: keep only answers equal to the gold answer")
    json_schema: dict[str, Any] | str | None = Field(None, description="json tasks: a JSON Schema (or a file)")
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="label: drop labels whose confidence is below this (low_confidence), and "
                                      "labels without a confidence (no_confidence); see docs/generate.md")
    balance: Literal["none", "equal"] = Field(
        "none", description="label: equal keeps as many rows of every label as the rarest label has, the most "
                            "confident of each (ties: input order); the rest are dropped as balance")


class SelfInstructConfig(StrictModel):
    seed_tasks: str = Field(description="JSONL of seed tasks: instruction, instances[{input, output}]")
    num_instructions: int = Field(100, ge=1, description="stop once this many new tasks are kept")
    seeds_per_prompt: int = Field(3, ge=1, le=20, description="seed tasks shown in each request")
    machine_per_prompt: int = Field(2, ge=0, le=20, description="generated tasks shown too, once there are some")
    tasks_per_request: int = Field(5, ge=1, le=50, description="new tasks asked for in each request")
    requests_per_round: int = Field(8, ge=1, le=1024)
    max_rounds: int = Field(50, ge=1)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    blacklist: list[str] = Field(default_factory=lambda: [
        "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
        "plot", "go to", "video", "audio", "music", "flowchart", "diagram"],
        description="instructions with these words are dropped (a text model cannot do them)")


class OutputConfig(StrictModel):
    dir: str | None = Field(None, description="output folder; default runs/generate/<name> (relative to cwd)")
    formats: list[Literal["chat", "alpaca"]] = Field(default_factory=lambda: ["chat", "alpaca"])
    chat_prompt: Literal["auto", "rendered", "input"] = Field(
        "auto", description="chat rows: the spec's rendered messages, or the bare input (auto: rendered for "
                            "label, input for respond and self-instruct)")
    system_prompt: str | None = Field(None, description="system message for chat rows in 'input' mode")
    provenance: bool = Field(True, description="add a provenance object to every chat and alpaca row")
    label_field: str = Field("label", description="label: field that receives the teacher's label (the spec's "
                                                   "target_field wins); the gold label moves to gold_<field>")


class ContaminationConfig(StrictModel):
    eval_path: str = Field(description="eval set (JSONL/CSV) to compare the generated data against")
    fields: list[str] = Field(default_factory=lambda: ["text", "question", "instruction", "input"])
    ngram: int = Field(8, ge=1, le=50, description="word n-gram length; shorter texts must match whole")
    drop: bool = Field(False, description="drop contaminated rows instead of only reporting them")


class GenerateConfig(StrictModel):
    name: str = "generate"
    description: str | None = None
    pipeline: Pipeline
    prompt: str | None = Field(None, description="PromptSpec YAML (required for label and respond)")
    data: InputsConfig | None = Field(None, description="inputs (required for label and respond)")
    teacher: TeacherConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    self_instruct: SelfInstructConfig | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)
    contamination: ContaminationConfig | None = None
    cache: bool = Field(True, description="reuse answers from tunelab's response cache (repeated runs are free)")
    seed: int = 0

    def wants_logprobs(self) -> bool:
        """Whether requests ask for logprobs (``sampling.logprobs``, with auto resolved)."""
        lp = self.sampling.logprobs
        if lp != "auto":
            return bool(lp)
        return (self.pipeline == "label" and self.sampling.samples == 1
                and (self.quality.min_confidence is not None or self.quality.balance != "none"))


def load_generate_config(path: str | Path) -> GenerateConfig:
    """Load and check a config; errors read ``file:line: field: what to fix``."""
    p = Path(path)
    data = load_yaml(p)
    if data is None:
        raise ConfigError("the file is empty", where=str(p))
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of fields (pipeline, teacher, ...)", where=str(p))
    try:
        cfg = GenerateConfig.model_validate(data)
    except ValidationError as e:
        loc = tuple(x for x in e.errors()[0]["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        line = field_line(p, loc)
        msg = format_validation_error(e).replace("Value error, ", "")
        raise ConfigError(msg, where=f"{p}:{line}" if line else str(p)) from None

    def need(field: str, why: str) -> None:
        line = field_line(p, ("pipeline",))
        raise ConfigError(f"{field}: required for pipeline {cfg.pipeline} ({why})",
                          where=f"{p}:{line}" if line else str(p))

    if cfg.pipeline in ("label", "respond"):
        if cfg.data is None:
            need("data", "the inputs to send to the teacher")
        if cfg.prompt is None:
            need("prompt", "a PromptSpec that renders each input")
    if cfg.pipeline == "self-instruct" and cfg.self_instruct is None:
        need("self_instruct", "at least self_instruct.seed_tasks")
    for fname, on in (("min_confidence", cfg.quality.min_confidence is not None),
                      ("balance", cfg.quality.balance != "none")):
        if on and cfg.pipeline != "label":
            line = field_line(p, ("quality", fname))
            raise ConfigError(f"quality.{fname}: only the label pipeline has label confidences (this is "
                              f"pipeline {cfg.pipeline})", where=f"{p}:{line}" if line else str(p))
    if cfg.sampling.samples > 1 and cfg.sampling.temperature == 0:
        line = field_line(p, ("sampling", "samples"))
        raise ConfigError("sampling.samples > 1 needs sampling.temperature > 0 (greedy decoding repeats "
                          "the same answer)", where=f"{p}:{line}" if line else str(p))
    return cfg
