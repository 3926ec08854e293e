"""From a PromptSpec's parts to OpenAI-style chat messages, one function per layout.

Every layout gets the same ``Parts``: the directions (instruction + format instruction + chain-of-thought
answer-line instruction), the rendered input, the few-shot ``(input, output)`` pairs and the optional role,
context, explicit system prompt and CoT trigger. The trigger is appended to the request: the last line of
the user message, or just before the answer cue in the ``plain`` and ``bracket`` layouts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypedDict

from jinja2 import StrictUndefined, Template, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from tunelab.errors import DataError
from tunelab.prompts.filters import FILTERS


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


# --------------------------------------------------------------------------------------------------
# input templates
# --------------------------------------------------------------------------------------------------
_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_ENV.filters.update(FILTERS)  # {{ text | romanize }}


@functools.lru_cache(maxsize=256)
def compile_template(source: str) -> Template:
    """A sandboxed Jinja2 template; syntax errors raise jinja2.TemplateSyntaxError."""
    return _ENV.from_string(source)


def template_fields(source: str) -> list[str]:
    """The item fields a template reads, sorted (``{{ text }} ({{ title }})`` -> ``["text", "title"]``)."""
    from jinja2 import meta

    return sorted(meta.find_undeclared_variables(_ENV.parse(source)))


def render_template(source: str, item: dict[str, Any]) -> str:
    """Render ``source`` over the item's fields; a missing field raises DataError naming it."""
    try:
        return compile_template(source).render(item)
    except UndefinedError as e:
        m = re.match(r"'([^']+)' is undefined", str(e.message))
        fields = ", ".join(k for k in item if not str(k).startswith("_")) or "none"
        what = f"field {m.group(1)!r}" if m else f"a value ({e.message})"
        raise DataError(f"input_template {source!r} needs {what}, which this item does not have "
                        f"(its fields: {fields})") from None
    except TemplateError as e:
        raise DataError(f"input_template {source!r} failed: {e}") from None


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parts:
    directions: str
    input: str
    shots: list[tuple[str, str]]
    role: str | None = None
    context: str | None = None
    system_prompt: str | None = None
    trigger: str | None = None
    input_label: str = "Text"
    output_label: str = "Answer"


def _join(*parts: str | None, sep: str = "\n\n") -> str:
    return sep.join(p for p in parts if p)


def _with_system(system: str | None, user: str) -> list[Message]:
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    return msgs


def chat(p: Parts) -> list[Message]:
    """System = role + context (or the explicit system prompt); shots as user/assistant turns."""
    if p.system_prompt:
        system, preamble = p.system_prompt, _join(p.role, p.context)
    else:
        system, preamble = _join(p.role, p.context), None
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    for x, y in p.shots:
        msgs += [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
    msgs.append({"role": "user", "content": _join(preamble, p.directions, p.input, p.trigger)})
    return msgs


def markdown(p: Parts) -> list[Message]:
    role_in_body = p.role if p.system_prompt else None
    shots = "\n\n".join(f"## Example {k}\nInput: {x}\nOutput: {y}" for k, (x, y) in enumerate(p.shots, 1))
    user = _join(role_in_body and f"# Role\n{role_in_body}", f"# Instruction\n{p.directions}",
                 p.context and f"# Context\n{p.context}", shots and f"# Examples\n{shots}",
                 f"# Input\n{p.input}", p.trigger)
    return _with_system(p.system_prompt or p.role, user)


def xml(p: Parts) -> list[Message]:
    role_in_body = p.role if p.system_prompt else None
    shots = "\n".join(f"<example>\n<input>{x}</input>\n<output>{y}</output>\n</example>" for x, y in p.shots)
    user = _join(role_in_body and f"<role>{role_in_body}</role>", p.directions,
                 p.context and f"<context>{p.context}</context>", shots and f"<examples>\n{shots}\n</examples>",
                 f"<input>{p.input}</input>", p.trigger)
    return _with_system(p.system_prompt or p.role, user)


def bracket(p: Parts) -> list[Message]:
    shots = "\n\n".join(f"[입력] {x}\n[답변] {y}" for x, y in p.shots)
    user = _join(p.role and f"[역할] {p.role}", p.directions and f"[지시] {p.directions}",
                 p.context and f"[배경] {p.context}", shots and f"[예시]\n{shots}\n",
                 f"[입력] {p.input}", p.trigger, "[답변]", sep="\n")
    return _with_system(p.system_prompt, user)


def plain(p: Parts) -> list[Message]:
    il, ol = p.input_label, p.output_label
    shots = [f"{il}: {x}\n{ol}: {y}" for x, y in p.shots]
    last = _join(f"{il}: {p.input}", p.trigger, f"{ol}:", sep="\n")
    return _with_system(p.system_prompt, _join(p.role, p.directions, p.context, *shots, last))


LAYOUTS: dict[str, Callable[[Parts], list[Message]]] = {
    "chat": chat, "markdown": markdown, "xml": xml, "bracket": bracket, "plain": plain}
