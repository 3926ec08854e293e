"""Training data: files in the formats people have -> token ids + a supervision mask per example.

Formats (``data.format``; ``auto`` picks by file type and the first record's fields):

- ``chat``: OpenAI fine-tuning JSONL, ``{"messages": [{"role", "content"}, ...]}``; an assistant message with
  ``"weight": 0`` is context only, as in OpenAI's format.
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``.
- ``prompt``: labelled items rendered through a PromptSpec (the same messages ``tunelab eval`` sends), with
  ``spec.target_text(item)`` as the assistant answer.
- ``text``: raw documents for continued pre-training (a .txt file, a folder of .txt files, or JSONL with a
  ``text`` field), cut into blocks of ``max_seq_len`` tokens; every token is a target.

SFT examples are rendered with the model's own chat template; the loss falls on the assistant turns only,
from the first answer token up to and including the end-of-turn token (``<|im_end|>``), not on the
whitespace the template puts after it. Spans are found by rendering the conversation up to each assistant
turn (with the generation prompt) and after it, so any template whose renderings are prefixes of each other
works; one that is not raises a clear error. The text is tokenized in pieces cut where each trained answer starts,
so the ids before an answer are exactly those of the rendered prompt that `tunelab eval` and `tunelab serve`
give the model (tested per model family in tests/train/test_train_families.py).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from tunelab.data.io import read_records, record_location
from tunelab.errors import DataError
from tunelab.textfiles import read_text

ENCODING_OPTION = "--encoding"  # how a user names a data file's encoding (data.encoding, or a data.mix file's)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass
class Example:
    """One training sequence. ``targets[t]`` says token ``t`` is predicted (from position t-1) and scored."""

    input_ids: list[int]
    targets: list[bool]
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(self.targets[1:])

    @property
    def n_prompt_targets(self) -> int:
        """The other predicted tokens (system prompt, user turn): scored with ``train.prompt_loss_weight``."""
        return len(self.input_ids) - 1 - self.n_targets


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    dropped_too_long: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def add(self, other: "DataStats") -> None:
        """Another file's counts and lengths added to these (every field, so a new one is not forgotten)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, Any]:
        ls = sorted(self.lengths) or [0]
        pick = lambda q: ls[min(len(ls) - 1, int(q * len(ls)))]  # noqa: E731
        return {"examples": self.examples, "tokens": self.tokens, "target_tokens": self.target_tokens,
                "target_share": round(self.target_tokens / max(1, self.tokens), 4),
                "dropped_too_long": self.dropped_too_long,
                "length_mean": round(statistics.fmean(ls), 1), "length_p50": pick(0.5), "length_p95": pick(0.95),
                "length_max": ls[-1]}


@dataclass
class TrainData:
    examples: list[Example]
    stats: DataStats
    format: str
    path: Path
    spec: Any = None  # the PromptSpec for format 'prompt'
    sources: list[dict[str, Any]] = field(default_factory=list)  # per file: path, format, examples, tokens

    def describe(self) -> str:
        """``path (format)``, and the mixed-in files after it."""
        head = f"{self.path} ({self.format})"
        return head + "".join(f" + {Path(s['path']).name} ({s['format']}, {s['examples']:,})"
                              for s in self.sources[1:])


# --------------------------------------------------------------------------------------------------
# format detection and record -> messages
# --------------------------------------------------------------------------------------------------
def detect_format(path: Path, first: dict[str, Any] | None, *, has_prompt: bool, method: str) -> str:
    if path.is_dir() or path.suffix.lower() in (".txt", ".md"):
        return "text"
    if method == "pretrain":
        return "text"
    if has_prompt:
        return "prompt"
    if first is None:
        raise DataError("the dataset is empty", where=str(path))
    if "messages" in first:
        return "chat"
    if "conversations" in first:
        return "sharegpt"
    if "instruction" in first and "output" in first:
        return "alpaca"
    keys = sorted(k for k in first if not k.startswith("_"))
    raise DataError(f"cannot tell the format from the fields {keys}: expected 'messages' (chat), 'conversations' "
                    "(sharegpt), 'instruction'+'output' (alpaca), or give --prompt SPEC.yaml for labelled items "
                    "(or set data.format)", where=record_location(first, path))


def _content(value: Any, where: str, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DataError(f"{what}: only text content parts are supported", where=where)
        return "".join(parts)
    raise DataError(f"{what}: content must be a string, got {type(value).__name__}", where=where)


def chat_messages(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], list[bool]]:
    """OpenAI chat record -> (messages, trainable flag per message)."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError("expected 'messages': a non-empty list of {role, content}", where=where)
    out, train = [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"messages[{i}]: expected an object with role and content", where=where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise DataError(f"messages[{i}]: role {role!r} is not one of {list(ROLES)}", where=where)
        if "content" not in m or m["content"] is None:
            raise DataError(f"messages[{i}]: missing content", where=where)
        out.append({"role": role, "content": _content(m["content"], where, f"messages[{i}]")})
        w = m.get("weight", 1)
        if w not in (0, 1):
            raise DataError(f"messages[{i}]: weight must be 0 or 1, got {w!r}", where=where)
        train.append(role == "assistant" and w == 1)
    return out, train


def alpaca_messages(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], list[bool]]:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise DataError(f"alpaca record needs a string {key!r}", where=where)
    user = row["instruction"]
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError("'input' must be a string", where=where)
    if extra:
        user = f"{user}\n\n{extra}"
    msgs = ([{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else [])
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return msgs, [m["role"] == "assistant" for m in msgs]


def sharegpt_messages(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], list[bool]]:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError("expected 'conversations': a non-empty list of {from, value}", where=where)
    msgs = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise DataError(f"conversations[{i}]: expected an object with from and value", where=where)
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"conversations[{i}]: 'from' {turn.get('from')!r} is not one of "
                            f"{sorted(SHAREGPT_ROLES)}", where=where)
        msgs.append({"role": role, "content": _content(turn.get("value"), where, f"conversations[{i}]")})
    return msgs, [m["role"] == "assistant" for m in msgs]


def prompt_messages(spec: Any, row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], list[bool]]:
    """A labelled item through a PromptSpec: exactly the messages `tunelab eval` sends, plus the answer."""
    labels = getattr(spec, "labels", None)
    try:
        if labels and hasattr(spec, "gold"):
            gold = spec.gold(row)
            if gold is None or str(gold) not in labels:
                raise DataError(f"label {gold!r} is not in the label set {list(labels)}", where=where)
        msgs = [dict(m) for m in spec.render(row)]
        answer = spec.target_text(row)
    except DataError as e:
        raise DataError(e.message, where=where) from None
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"cannot render this item with the prompt spec: {e}", where=where) from None
    if not isinstance(answer, str) or not answer:
        raise DataError("the prompt spec gives no answer text for this item (is its label field set?)", where=where)
    msgs.append({"role": "assistant", "content": answer})
    return msgs, [False] * (len(msgs) - 1) + [True]


CONVERTERS: dict[str, Callable[[dict[str, Any], str], tuple[list[dict[str, str]], list[bool]]]] = {
    "chat": chat_messages, "alpaca": alpaca_messages, "sharegpt": sharegpt_messages}


# --------------------------------------------------------------------------------------------------
# messages -> tokens + supervision mask
# --------------------------------------------------------------------------------------------------
class ChatEncoder:
    """Renders conversations with the tokenizer's chat template and marks the assistant tokens."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; SFT needs one (or use format: text)")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("a fast tokenizer (with offset mapping) is needed to locate the assistant tokens")

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def spans(self, messages: list[dict[str, str]], train: list[bool], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans of the trained assistant turns (answer + end-of-turn)."""
        full = self.render(messages)
        spans = []
        for i, (m, t) in enumerate(zip(messages, train)):
            if not t:
                continue
            if i == 0:
                raise DataError("the conversation starts with an assistant turn; nothing prompts it", where=where)
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError("the chat template does not render conversations incrementally (the text up to "
                                "an assistant turn is not a prefix of the whole), so the assistant tokens cannot "
                                "be located; use a model whose template does", where=where)
            end = len(upto.rstrip())  # the answer and its end-of-turn marker, not the newline after it
            if end > len(before):
                spans.append((len(before), end))
        if not spans:
            raise DataError("no assistant answer to train on (an assistant message with weight 1 is needed)",
                            where=where)
        return full, spans

    def encode(self, messages: list[dict[str, str]], train: list[bool], where: str) -> Example:
        """The conversation's token ids, cut at the start of each trained answer: the text before an answer is
        tokenized on its own, as `tunelab eval` and `tunelab serve` tokenize the rendered prompt, so the model
        trains on the prompt ids it gets at inference. (Tokenized whole, a generation prompt that ends in
        whitespace, Llama 3's ``<|end_header_id|>\\n\\n`` or Qwen3's ``</think>\\n\\n``, merges with the answer in a
        GPT-2-style byte-level BPE: ``\\n\\nPositive`` is Ċ Ċ Positive, the prompt alone ends in ĊĊ.)"""
        text, spans = self.spans(messages, train, where)
        cuts = [0, *(a for a, _ in spans), len(text)]
        ids: list[int] = []
        targets: list[bool] = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if hi <= lo:
                continue
            enc = self.tok(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
            for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
                targets.append(bool(ids) and b > a and any(s <= lo + a < e for s, e in spans))
                ids.append(tid)
        if not any(targets):
            raise DataError("the answer has no tokens after rendering", where=where)
        return Example(ids, targets, where)


def encode_text_blocks(tokenizer, text: str, block: int, where: str) -> list[Example]:
    """A document -> blocks of at most ``block`` tokens, the end-of-sequence token after the last block."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids = ids + [eos]
    out = []
    for s in range(0, len(ids), block):
        chunk = ids[s:s + block]
        if len(chunk) >= 2:
            out.append(Example(chunk, [False] + [True] * (len(chunk) - 1), where))
    return out


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def _text_documents(path: Path, text_field: str, limit: int | None,
                    encoding: str | None = None) -> list[tuple[str, str]]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError("no .txt files in this folder", where=str(path))
        docs = [(read_text(f, encoding=encoding, option=ENCODING_OPTION), str(f)) for f in files]
        return docs[:limit] if limit else docs
    if path.suffix.lower() in (".txt", ".md"):
        if not path.is_file():
            raise DataError(f"no such file: {path}")
        return [(read_text(path, encoding=encoding, option=ENCODING_OPTION), str(path))]
    rows = read_records(path, limit=limit, encoding=encoding, encoding_option=ENCODING_OPTION)
    docs = []
    for r in rows:
        where = record_location(r, path)
        v = r.get(text_field)
        if not isinstance(v, str):
            raise DataError(f"expected a string field {text_field!r} (data.text_field)", where=where)
        if v.strip():
            docs.append((v, where))
    return docs


def load_train_data(data_cfg, tokenizer, *, method: str = "lora", spec: Any = None) -> TrainData:
    """Read, validate and tokenize a dataset and the files of ``data.mix``; errors name the file and line.
    Examples keep the order of the files (the training loop shuffles them together)."""
    data = _load_source(data_cfg, data_cfg, tokenizer, method, spec)
    for src in data_cfg.mix:
        more = _load_source(src, data_cfg, tokenizer, method, None)
        data.examples += more.examples
        data.stats.add(more.stats)
        data.sources += more.sources
    return data


def _load_source(data_cfg, limits, tokenizer, method: str, spec: Any) -> TrainData:
    """One file; ``limits`` holds max_seq_len and too_long (data's, for every mixed-in file too)."""
    path = Path(data_cfg.path)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    fmt = data_cfg.format
    rows: list[dict[str, Any]] | None = None
    if fmt == "auto":
        first = None
        if not (path.is_dir() or path.suffix.lower() in (".txt", ".md")):
            rows = read_records(path, limit=data_cfg.limit, encoding=data_cfg.encoding,
                                encoding_option=ENCODING_OPTION)
            first = rows[0] if rows else None
        fmt = detect_format(path, first, has_prompt=spec is not None or bool(data_cfg.prompt), method=method)
    if method == "pretrain" and fmt != "text":
        raise DataError(f"method 'pretrain' trains on raw text, but this is {fmt} data", where=str(path))
    stats = DataStats()
    examples: list[Example] = []
    if fmt == "text":
        for text, where in _text_documents(path, data_cfg.text_field, data_cfg.limit, data_cfg.encoding):
            examples += encode_text_blocks(tokenizer, text, limits.max_seq_len, where)
    else:
        if rows is None:
            rows = read_records(path, limit=data_cfg.limit, encoding=data_cfg.encoding,
                                encoding_option=ENCODING_OPTION)
        if not rows:
            raise DataError("the dataset has no records", where=str(path))
        if fmt == "prompt" and spec is None:
            if not data_cfg.prompt:
                raise DataError("format 'prompt' needs a PromptSpec (data.prompt / --prompt)", where=str(path))
            from tunelab.prompts import load_prompt_spec

            spec = load_prompt_spec(data_cfg.prompt)
        enc = ChatEncoder(tokenizer)
        for r in rows:
            where = record_location(r, path)
            if fmt == "prompt":
                msgs, train = prompt_messages(spec, r, where)
            else:
                msgs, train = CONVERTERS[fmt](r, where)
            ex = enc.encode(msgs, train, where)
            if len(ex) > limits.max_seq_len:
                if limits.too_long == "error":
                    raise DataError(f"example has {len(ex)} tokens, more than data.max_seq_len "
                                    f"({limits.max_seq_len})", where=where)
                stats.dropped_too_long += 1
                continue
            examples.append(ex)
    if not examples:
        extra = f" ({stats.dropped_too_long} longer than max_seq_len {limits.max_seq_len})" \
            if stats.dropped_too_long else ""
        raise DataError(f"no usable training examples{extra}", where=str(path))
    for ex in examples:
        stats.examples += 1
        stats.tokens += len(ex)
        stats.target_tokens += ex.n_targets
        stats.lengths.append(len(ex))
    source = {"path": str(path), "format": fmt, "examples": stats.examples, "tokens": stats.tokens,
              "dropped_too_long": stats.dropped_too_long}
    return TrainData(examples, stats, fmt, path, spec, [source])


# --------------------------------------------------------------------------------------------------
# preview
# --------------------------------------------------------------------------------------------------
def supervision_preview(example: Example, tokenizer, *, max_tokens: int = 400) -> list[tuple[str, bool]]:
    """(text, is_target) runs over the first ``max_tokens`` tokens (the tail if longer). Runs are decoded
    whole, so multi-byte characters split over tokens (Korean in byte-level BPE) stay readable."""
    ids, tg = example.input_ids, example.targets
    if len(ids) > max_tokens:
        ids, tg = ids[-max_tokens:], tg[-max_tokens:]
    runs: list[tuple[list[int], bool]] = []
    for i, t in zip(ids, tg):
        if runs and runs[-1][1] == t:
            runs[-1][0].append(i)
        else:
            runs.append(([i], t))
    return [(tokenizer.decode(r), t) for r, t in runs]


def eos_supervised(example: Example, tokenizer, end_of_turn: str | None) -> bool:
    """True when the end-of-turn (or EOS) token is among the targets: the model learns to stop."""
    ids = set()
    if end_of_turn:
        tid = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return any(t and i in ids for i, t in zip(example.input_ids, example.targets))


def end_of_turn_marker(tokenizer) -> str:
    """What the chat template writes after an assistant answer (``<|im_end|>`` for ChatML)."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ANSWER_SENTINEL"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - templates may refuse this probe
        return tokenizer.eos_token or ""
    return text.split("ANSWER_SENTINEL", 1)[-1].strip() or (tokenizer.eos_token or "")


def dump_example(example: Example, tokenizer) -> str:
    """A JSON line with the decoded text and the decoded targets, for debugging and the dry-run file."""
    target_text = "".join(text for text, t in supervision_preview(example, tokenizer, max_tokens=10 ** 9) if t)
    return json.dumps({"where": example.where, "tokens": len(example), "targets": example.n_targets,
                       "text": tokenizer.decode(example.input_ids), "target_text": target_text},
                      ensure_ascii=False)
