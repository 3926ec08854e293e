"""PromptSpec: a prompt as a typed, validated YAML file (task, examples, input template, output format).

    spec = load_prompt_spec("examples/prompts/sentiment_fewshot.yaml")
    spec.render({"text": "..."})   # -> [{"role": "user", "content": "..."}]
    spec.parse("Positive")         # -> ParseResult(prediction="Positive", complied=True, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import jsonschema
from jinja2 import TemplateSyntaxError
from pydantic import ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator

from tunelab.config import StrictModel, describe_validation_error, load_yaml
from tunelab.data.io import read_records
from tunelab.errors import ConfigError, TunelabError
from tunelab.prompts import parsers as P
from tunelab.prompts.render import LAYOUTS, Message, Parts, compile_template, render_template, template_fields

GOLD_FIELDS = ("label", "answer", "output")


# --------------------------------------------------------------------------------------------------
# output types: each knows its format instruction, parser and answer comparison
# --------------------------------------------------------------------------------------------------
def _unique(values: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for v in values:
        if not v.strip():
            raise ValueError(f"{what} must not be empty strings")
        if v.casefold() in seen:
            raise ValueError(f"duplicate {what[:-1]} {v!r}")
        seen.add(v.casefold())
    return values


class LabelOutput(StrictModel):
    type: Literal["label"] = "label"
    labels: list[str] = Field(min_length=1)

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        return _unique(v, "labels")

    def format_instruction(self, cot: bool) -> str:
        return f"Answer with exactly one of: {', '.join(self.labels)}."

    def parse(self, text: str, prefix: str | None) -> P.ParseResult:
        return P.parse_label(text, self.labels, prefix)

    def is_correct(self, prediction: Any, gold: Any) -> bool:
        return P.normalize_label(str(prediction)) == P.normalize_label(str(gold))


class JsonOutput(StrictModel):
    type: Literal["json"] = "json"
    json_schema: dict[str, Any] = Field(alias="schema")

    @field_validator("json_schema")
    @classmethod
    def _check_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.validators.validator_for(v).check_schema(v)
        except jsonschema.SchemaError as e:
            raise ValueError(f"not a valid JSON schema: {e.message}") from None
        return v

    def format_instruction(self, cot: bool) -> str:
        schema = json.dumps(self.json_schema, ensure_ascii=False)
        return f"Respond with only a JSON object that matches this JSON schema: {schema}"

    def parse(self, text: str, prefix: str | None) -> P.ParseResult:
        return P.parse_json(text, self.json_schema, prefix)

    def is_correct(self, prediction: Any, gold: Any) -> bool:
        return P.same_json(prediction, gold)


class SectionsOutput(StrictModel):
    type: Literal["sections"] = "sections"
    sections: list[str] = Field(min_length=1)
    numbering: Literal["1)", "1."] = "1)"

    @field_validator("sections")
    @classmethod
    def _unique_sections(cls, v: list[str]) -> list[str]:
        return _unique(v, "sections")

    def format_instruction(self, cot: bool) -> str:
        sep = self.numbering[1:]
        return "Answer in exactly these numbered sections: " + " ".join(
            f"{k}{sep} {t}" for k, t in enumerate(self.sections, 1))

    def parse(self, text: str, prefix: str | None) -> P.ParseResult:
        return P.parse_sections(text, self.sections, prefix)

    def is_correct(self, prediction: Any, gold: Any) -> bool:
        def as_dict(x: Any) -> dict[str, str] | None:
            d = P.parse_sections(x, self.sections).prediction if isinstance(x, str) else x
            return {k: P.normalize_text(v) for k, v in d.items()} if isinstance(d, dict) else None

        return as_dict(prediction) is not None and as_dict(prediction) == as_dict(gold)


class NumberOutput(StrictModel):
    type: Literal["number"] = "number"

    def format_instruction(self, cot: bool) -> str:
        return "The answer is a single number." if cot else "Answer with only the final number."

    def parse(self, text: str, prefix: str | None) -> P.ParseResult:
        return P.parse_number(text, prefix)

    def is_correct(self, prediction: Any, gold: Any) -> bool:
        return P.same_number(prediction, gold)


class FreeOutput(StrictModel):
    type: Literal["free"] = "free"

    def format_instruction(self, cot: bool) -> str | None:
        return None

    def parse(self, text: str, prefix: str | None) -> P.ParseResult:
        return P.parse_free(text, prefix)

    def is_correct(self, prediction: Any, gold: Any) -> bool:
        return P.normalize_text(prediction) == P.normalize_text(gold)


Output = Annotated[Union[LabelOutput, JsonOutput, SectionsOutput, NumberOutput, FreeOutput],
                   Field(discriminator="type")]


class NoReasoning(StrictModel):
    type: Literal["none"] = "none"


class CotReasoning(StrictModel):
    type: Literal["cot"] = "cot"
    trigger: str = "Let's think step by step."
    answer_prefix: str = Field("Answer:", min_length=1)


Reasoning = Annotated[Union[NoReasoning, CotReasoning], Field(discriminator="type")]


# --------------------------------------------------------------------------------------------------
# few-shot examples
# --------------------------------------------------------------------------------------------------
class Example(StrictModel):
    model_config = ConfigDict(coerce_numbers_to_str=True)

    input: str | dict[str, Any]  # a dict is rendered through input_template
    output: str | dict[str, Any]  # a dict (a JSON answer) is written as JSON


class ExampleSource(StrictModel):
    path: str = Field(description="JSONL or CSV file, relative to the spec file")
    k: int = Field(ge=1, description="how many examples to draw")
    seed: int = 0
    balanced: bool = Field(True, description="label tasks: round-robin across the labels")
    output_field: str | None = Field(None, description="default: the spec's answer text for the row")


Examples = Annotated[Union[Annotated[list[Example], Tag("inline")], Annotated[ExampleSource, Tag("source")]],
                     Discriminator(lambda v: "inline" if isinstance(v, list) else "source")]


def clean_solution(solution: str) -> str:
    """A worked solution without GSM8K's ``<<calc>>`` marks and ``#### N`` line."""
    s = re.sub(r"<<[^<>]*>>", "", solution)
    return "\n".join(ln for ln in s.strip().splitlines() if not ln.lstrip().startswith("####")).strip()


def _answer_str(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)


# --------------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------------
class PromptSpec(StrictModel):
    name: str | None = None
    description: str | None = None
    instruction: str = Field(description="the task, e.g. 'Classify the sentiment of the review.'")
    role: str | None = Field(None, description="persona: the system message (chat/markdown/xml) or first part")
    context: str | None = Field(None, description="background shown before the input")
    system_prompt: str | None = Field(None, description="explicit system message; the role then moves into "
                                                        "the user message")
    examples: Examples = Field(default_factory=list)
    input_template: str = "{{ text }}"
    target_field: str | None = Field(None, description="gold answer field; default: label, answer or output")
    output: Output = Field(default_factory=FreeOutput)
    format_instruction: str | None = Field(None, description="override the automatic one; '' disables it")
    reasoning: Reasoning = Field(default_factory=NoReasoning)
    layout: Literal["chat", "markdown", "xml", "bracket", "plain"] = "chat"
    input_label: str = Field("Text", description="plain layout: the label before each input")
    output_label: str = Field("Answer", description="plain layout: the label before each answer")

    _base_dir: Path | None = PrivateAttr(None)
    _resolved: list[Example] | None = PrivateAttr(None)
    _shots: list[tuple[str, str]] | None = PrivateAttr(None)

    @field_validator("input_template")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            compile_template(v)
        except TemplateSyntaxError as e:
            raise ValueError(f"invalid Jinja2 template: {e.message} (line {e.lineno})") from None
        return v

    # ---- facts about the task ----
    @property
    def task(self) -> str:
        return self.output.type

    @property
    def labels(self) -> list[str] | None:
        return list(self.output.labels) if isinstance(self.output, LabelOutput) else None

    @property
    def answer_prefix(self) -> str | None:
        return self.reasoning.answer_prefix if isinstance(self.reasoning, CotReasoning) else None

    def directions(self) -> str:
        """Instruction, format instruction and (CoT) the final-line instruction, one per line."""
        cot = self.answer_prefix is not None
        fmt = self.format_instruction if self.format_instruction is not None else \
            self.output.format_instruction(cot)
        final = f'End your response with a final line of the form "{self.answer_prefix} <answer>".' if cot else None
        return "\n".join(p for p in (self.instruction, fmt, final) if p)

    # ---- items ----
    def render_input(self, item: dict[str, Any]) -> str:
        return render_template(self.input_template, item)

    def input_fields(self) -> list[str]:
        """The item fields the prompt shows the model (what its input template reads): never the gold answer,
        unless the template itself names it."""
        return template_fields(self.input_template)

    def gold(self, item: dict[str, Any]) -> str | None:
        if self.target_field is not None:
            v = item.get(self.target_field)
        else:
            v = next((item[f] for f in GOLD_FIELDS if f in item), None)
        return None if v is None else _answer_str(v)

    def target_text(self, item: dict[str, Any]) -> str | None:
        """The assistant answer to train on: the gold answer; with CoT the item's ``solution`` (if any)
        followed by a final line ``<answer_prefix> <gold>``."""
        g = self.gold(item)
        if g is None or self.answer_prefix is None:
            return g
        sol = item.get("solution")
        final = f"{self.answer_prefix} {g}"
        return f"{clean_solution(sol)}\n{final}" if isinstance(sol, str) and sol.strip() else final

    def render(self, item: dict[str, Any]) -> list[Message]:
        """The messages for one item, without the answer."""
        parts = Parts(self.directions(), self.render_input(item), self.shots(), self.role, self.context,
                      self.system_prompt, getattr(self.reasoning, "trigger", None) or None,
                      self.input_label, self.output_label)
        return LAYOUTS[self.layout](parts)

    def parse(self, text: str) -> P.ParseResult:
        return self.output.parse(text, self.answer_prefix)

    def is_correct(self, prediction: Any, gold: Any) -> bool | None:
        """None when there is no gold answer; False when there is no prediction."""
        if gold is None:
            return None
        if prediction is None:
            return False
        return self.output.is_correct(prediction, gold)

    # ---- examples ----
    def resolve_examples(self, base_dir: str | os.PathLike | None = None) -> list[Example]:
        """The few-shot examples, drawn from ``examples.path`` if it is a source (once; cached).
        Raises ConfigError (where = the field path) for an example that does not render or comply."""
        if self._resolved is not None:
            return self._resolved
        if base_dir is not None:
            self._base_dir = Path(base_dir)
        drawn = isinstance(self.examples, ExampleSource)
        exs = self._draw(self._base_dir or Path.cwd()) if drawn else list(self.examples)
        shots = []
        for i, ex in enumerate(exs):
            try:
                x = ex.input if isinstance(ex.input, str) else self.render_input(ex.input)
            except TunelabError as e:
                raise ConfigError(e.message, where="examples.path" if drawn else f"examples.{i}.input") from None
            y = _answer_str(ex.output)
            if not drawn and not (p := self.parse(y)).complied:  # an example must show the requested format
                raise ConfigError(f"the example answer {y!r} does not follow the output format ({p.error})",
                                  where=f"examples.{i}.output")
            shots.append((x, y))
        self._resolved, self._shots = exs, shots
        return exs

    def shots(self) -> list[tuple[str, str]]:
        """The examples as rendered (input, output) pairs."""
        if self._shots is None:
            self.resolve_examples()
        assert self._shots is not None
        return self._shots

    def _draw(self, base_dir: Path) -> list[Example]:
        src = self.examples
        assert isinstance(src, ExampleSource)
        path = Path(src.path) if Path(src.path).is_absolute() else base_dir / src.path
        try:
            rows = read_records(path)
        except TunelabError as e:
            raise ConfigError(str(e), where="examples.path") from None
        labels = self.labels
        pool: list[tuple[str, dict[str, Any], str]] = []  # (key for balancing, fields, answer)
        for r in rows:
            fields = {k: v for k, v in r.items() if not str(k).startswith("_")}
            key = _answer_str(r[src.output_field]) if src.output_field and r.get(src.output_field) is not None \
                else self.gold(r)
            out = key if src.output_field else self.target_text(r)
            if key is None or not out or (labels is not None and key not in labels):
                continue
            pool.append((key, fields, out))
        if len(pool) < src.k:
            raise ConfigError(f"only {len(pool)} usable examples in {path} (rows with an answer"
                              f"{' in the label set' if labels else ''}), fewer than k={src.k}", where="examples.k")
        rng = random.Random(src.seed)
        if src.balanced and labels is not None:
            groups = [[p for p in pool if p[0] == lab] for lab in labels]
            for g in groups:
                rng.shuffle(g)
            picked = []
            while len(picked) < src.k:  # round-robin over the labels that still have rows
                for g in groups:
                    if g and len(picked) < src.k:
                        picked.append(g.pop())
            rng.shuffle(picked)  # no fixed label order (the last example's label would bias the answer)
        else:
            picked = rng.sample(pool, src.k)
        return [Example(input=fields, output=out) for _, fields, out in picked]

    # ---- identity ----
    def resolved_dict(self) -> dict[str, Any]:
        """The spec as plain data with its examples inline (drawn ones included): a self-contained copy
        that ``spec_from_dict`` loads anywhere, e.g. next to a trained adapter."""
        data = self.model_dump(mode="json", by_alias=True)
        data["examples"] = [e.model_dump(mode="json") for e in self.resolve_examples()]
        return data

    def content_hash(self) -> str:
        """sha256 of everything that shapes the prompt and its scoring (examples resolved; name and
        description excluded), stable across runs and machines."""
        data = self.resolved_dict()
        del data["name"], data["description"]
        blob = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def spec_from_dict(data: Any, *, base_dir: str | os.PathLike | None = None,
                   source: str = "<prompt spec>") -> PromptSpec:
    """Validate a spec and resolve its examples (relative paths against ``base_dir``).
    Errors are ConfigError with where='<source>: <field path>'."""
    if data is None:
        raise ConfigError("the prompt spec is empty", where=source)
    try:
        spec = PromptSpec.model_validate(data)
    except ValidationError as e:
        loc, msg = describe_validation_error(e, PromptSpec)
        raise ConfigError(msg, where=f"{source}: {loc}" if loc else source) from None
    try:
        spec.resolve_examples(base_dir if base_dir is not None else Path.cwd())
    except ConfigError as e:
        raise ConfigError(e.message, where=f"{source}: {e.where}" if e.where else source) from None
    return spec


def load_prompt_spec(path: str | os.PathLike) -> PromptSpec:
    """Load a PromptSpec YAML. YAML syntax errors name file:line; validation errors name the file and the
    field path (``spec.yaml: output.labels: ...``)."""
    p = Path(path)
    return spec_from_dict(load_yaml(p), base_dir=p.parent, source=str(p))
