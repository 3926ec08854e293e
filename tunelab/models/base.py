"""The one interface every model backend implements (local transformers, OpenAI-compatible API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from tunelab.errors import ModelError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def key(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": list(self.stop), "seed": self.seed}


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # "stop" | "length"
    latency_ms: float = 0.0


@dataclass
class ChoiceScores:
    """Log-likelihood of each candidate completion given one prompt (sum over the completion's tokens)."""

    logprobs: list[float]
    prompt_tokens: int
    choice_tokens: list[int] = field(default_factory=list)
    latency_ms: float = 0.0

    @property
    def best(self) -> int:
        return max(range(len(self.logprobs)), key=self.logprobs.__getitem__)


@runtime_checkable
class ModelBackend(Protocol):
    """What eval, generate and serve need from a model."""

    name: str  # a short display name
    identity: str  # stable identity for caching (content hash of weights + adapter, or endpoint + model)
    supports_scoring: bool
    context_length: int | None  # the most tokens the model attends over (None: unknown, e.g. an API endpoint)

    def generate(self, prompts: list[list[Message]], params: GenerationParams, *,
                 progress: object | None = None) -> list[Generation]: ...

    def score_choices(self, prompts: list[list[Message]], choices: list[str], *,
                      progress: object | None = None) -> list[ChoiceScores]: ...

    def count_tokens(self, messages: list[Message]) -> int: ...


VOCAB_FILE = "tunelab_vocab.json"  # what `tunelab vocab extend` writes into a model directory (vocab.results)


def adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter directory as given, or the ``adapter/`` inside a tunelab train output directory."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    return p


def find_adapter_dir(path: str | Path) -> Path:
    """``adapter_dir``, required to hold ``adapter_config.json``."""
    p = adapter_dir(path)
    if not (p / "adapter_config.json").is_file():
        raise ModelError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    return p
