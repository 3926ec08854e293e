"""Parsers from a model's text to a prediction, one per output type, plus answer comparison.

Each parser is a pure function ``text -> ParseResult``. ``complied`` says whether the model followed the
requested format exactly; ``prediction`` may still be recovered when it did not (e.g. a label inside prose).
With chain of thought (``answer_prefix`` set) only the text after the last ``answer_prefix`` is the answer;
a missing prefix means ``complied=False``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema


@dataclass(frozen=True)
class ParseResult:
    prediction: Any
    complied: bool
    error: str | None = None
    answer_text: str = ""  # the part of the output the answer was read from


def after_prefix(text: str, prefix: str | None) -> tuple[str, bool]:
    """(text after the last ``prefix``, whether it was found); the whole text when there is no prefix."""
    if not prefix:
        return text, True
    i = text.rfind(prefix)
    if i < 0:
        return text, False
    return text[i + len(prefix):], True


def _missing_prefix(found: bool, prefix: str | None) -> str | None:
    return None if found else f"no final answer line starting with {prefix!r}"


# --------------------------------------------------------------------------------------------------
# label
# --------------------------------------------------------------------------------------------------
_STRIP = " \t\r\n\"'`*_“”‘’「」[]()"
_TRAILING = ".!?,;:。！？"


def normalize_label(s: str) -> str:
    """Case-, space-, quote- and trailing-punctuation-insensitive form of a label."""
    s = s.strip(_STRIP).rstrip(_TRAILING).strip(_STRIP)
    return " ".join(s.split()).casefold()


def parse_label(text: str, labels: list[str], answer_prefix: str | None = None) -> ParseResult:
    seg, found = after_prefix(text, answer_prefix)
    norm = normalize_label(seg)
    by_norm = {normalize_label(lab): lab for lab in labels}
    if norm in by_norm:
        return ParseResult(by_norm[norm], found, _missing_prefix(found, answer_prefix), seg.strip())
    hits = [lab for lab in labels
            if re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", seg, flags=re.IGNORECASE)]
    if len(hits) == 1:
        return ParseResult(hits[0], False, "the label is inside other text", seg.strip())
    why = "no label found" if not hits else f"several labels found ({', '.join(hits)})"
    return ParseResult(None, False, f"{why}; expected exactly one of: {', '.join(labels)}", seg.strip())


# --------------------------------------------------------------------------------------------------
# json
# --------------------------------------------------------------------------------------------------
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def find_json_object(text: str) -> tuple[dict | None, str]:
    """The first JSON object in ``text`` (inside ```json fences if there are any, else the first balanced
    {...} that parses), and the substring it came from."""
    m = _FENCE.search(text)
    if m:
        text = m.group(1)
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch != "{":
            continue
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj, text[i:end]
    return None, text.strip()


def parse_json(text: str, schema: dict[str, Any] | None = None, answer_prefix: str | None = None) -> ParseResult:
    seg, found = after_prefix(text, answer_prefix)
    obj, src = find_json_object(seg)
    if obj is None:
        return ParseResult(None, False, "no JSON object found", src)
    if schema is not None:
        validator = jsonschema.validators.validator_for(schema)(schema)
        err = next(iter(sorted(validator.iter_errors(obj), key=lambda e: list(e.path))), None)
        if err is not None:
            where = "/".join(str(p) for p in err.path) or "<root>"
            return ParseResult(obj, False, f"does not match the schema at {where}: {err.message}", src)
    return ParseResult(obj, found, _missing_prefix(found, answer_prefix), src)


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------
_MARKER = re.compile(r"^[ \t>*#_]*(\d+)[ \t]*[).](?!\d)[ \t]*", re.MULTILINE)


def parse_sections(text: str, titles: list[str], answer_prefix: str | None = None) -> ParseResult:
    """Numbered sections ``1) title ...`` in order. Titles are optional; a title of another section where
    one is expected counts as out of order. Lines numbered out of sequence (a list inside a section) are
    body text. The prediction maps each found section's title to its body."""
    seg, found = after_prefix(text, answer_prefix)
    starts: list[tuple[int, int]] = []  # (marker start, body start) of sections 1..n
    for m in _MARKER.finditer(seg):
        if len(starts) < len(titles) and int(m.group(1)) == len(starts) + 1:
            starts.append((m.start(), m.end()))
    out: dict[str, str] = {}
    error = _missing_prefix(found, answer_prefix)
    for k, (_, body_start) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(seg)
        body = seg[body_start:end].strip()
        head = body.lstrip("*_ ").casefold()
        other = next((t for t in titles if t != titles[k] and head.startswith(t.casefold())), None)
        if head.startswith(titles[k].casefold()):
            body = body.lstrip("*_ ")[len(titles[k]):].lstrip("*_ :：-—").strip()
        elif other is not None and error is None:
            error = f"section {k + 1} is titled {other!r}, expected {titles[k]!r} (sections out of order)"
        out[titles[k]] = body
    if len(starts) < len(titles):
        error = (f"expected {len(titles)} numbered sections in order ({', '.join(titles)}), "
                 f"found {len(starts)} in sequence")
    return ParseResult(out or None, error is None, error, seg.strip())


# --------------------------------------------------------------------------------------------------
# number
# --------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\w.])(-?)\$?(-?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?!\d)")


def to_number(s: Any) -> int | float | None:
    """A number from text like '1,234', '$5', '-3.50' (int when integral), or None."""
    if isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        return int(s) if float(s).is_integer() else float(s)
    m = _NUMBER.search(str(s).replace("\u2212", "-"))
    if m is None:
        return None
    v = float(m.group(3).replace(",", ""))
    if m.group(1) or m.group(2):
        v = -v
    return int(v) if v.is_integer() else v


def _numbers(text: str) -> list[re.Match[str]]:
    return list(_NUMBER.finditer(text.replace("\u2212", "-")))


def parse_number(text: str, answer_prefix: str | None = None) -> ParseResult:
    """The number after the last ``answer_prefix``, else after the last '####', else the last number."""
    if answer_prefix:
        seg, found = after_prefix(text, answer_prefix)
        if found and (nums := _numbers(seg)):
            return ParseResult(to_number(nums[0].group(0)), True, None, seg.strip())
    i = text.rfind("####")
    if i >= 0 and (nums := _numbers(text[i + 4:])):
        err = f"no final answer line starting with {answer_prefix!r}" if answer_prefix else None
        return ParseResult(to_number(nums[0].group(0)), err is None, err, text[i + 4:].strip())
    nums = _numbers(text)
    if not nums:
        return ParseResult(None, False, "no number found", text.strip())
    last = nums[-1].group(0)
    alone = not answer_prefix and text.strip().rstrip(".").strip() == last.strip()
    err = None if alone else ("no final answer line starting with " + repr(answer_prefix) if answer_prefix
                              else "the answer is not a bare number; took the last number in the text")
    return ParseResult(to_number(last), alone, err, last.strip())


# --------------------------------------------------------------------------------------------------
# free
# --------------------------------------------------------------------------------------------------
def parse_free(text: str, answer_prefix: str | None = None) -> ParseResult:
    seg, found = after_prefix(text, answer_prefix)
    s = seg.strip()
    if not s:
        return ParseResult(s, False, "empty answer", s)
    return ParseResult(s, found, _missing_prefix(found, answer_prefix), s)


# --------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------
def normalize_text(s: str) -> str:
    return " ".join(str(s).split()).casefold()


def same_number(a: Any, b: Any, tol: float = 1e-6) -> bool:
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and abs(x - y) < tol


def same_json(prediction: Any, gold: Any) -> bool:
    if isinstance(gold, str):
        try:
            gold = json.loads(gold)
        except json.JSONDecodeError:
            return False
    if isinstance(prediction, str):
        prediction, _ = find_json_object(prediction)
    return prediction == gold
