"""`tunelab vocab extend`: learn new tokens from in-domain text and add them to a byte-level BPE base model.

How, in order:

1. A BPE vocabulary is trained on the texts (``tokenizers``' BpeTrainer) with the base's own normaliser and
   pre-tokenizer, from the 256 byte symbols, so every learnt token is a byte string the base also sees as (part of)
   one pre-token, and every learnt merge joins two tokens the trained vocabulary has.
2. Each learnt token the base lacks is scored by how useful it is: ``frequency x tokens saved``, its count when the
   texts are encoded with the trained tokenizer times (pieces the base's BPE splits it into - 1).
3. The ``add`` most useful are taken, best first, each with the learnt tokens it is merged from that the base lacks
   (its ancestors: BPE can only reach a token through them); every one counts towards ``add``.
4. They join the base's tokenizer.json as vocabulary entries with ids after all old ids, and their merges after all
   old merges (lowest priority): the base's merges run first, exactly as before, and the new ones only join what
   they left. A text in which no new token occurs keeps its old ids; special tokens, the chat template and every
   old id are unchanged. (Measured against ``add_tokens``, which matches added tokens as literal strings before
   pre-tokenization: more tokens per review, most of all on text it was not learnt from; docs/train.md.)
5. The embedding matrix (and the output layer when it is not tied to it) grows to the new size, each new row the
   mean of the rows of the pieces the base tokenizer splits the token into.

The result is an ordinary HF model directory plus ``tunelab_vocab.json`` (results.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from tunelab.errors import DataError, ModelError
from tunelab.vocab.config import VocabConfig
from tunelab.vocab.results import VOCAB_FILE, VocabReport

Progress = Callable[[str, int], Callable[[int], None]]
CHUNK = 512  # texts per tokenizer batch (one progress step)


def read_texts(path: Path, field: str, *, limit: int | None = None, encoding: str | None = None) -> list[str]:
    """The non-blank ``field`` of every record of a JSONL/CSV file; a record without it is one error line."""
    from tunelab.data.io import read_records, record_location

    rows = read_records(path, limit=limit, encoding=encoding, encoding_option="--encoding")
    texts = []
    for row in rows:
        if field not in row:
            keys = ", ".join(k for k in row if not k.startswith("_")) or "none"
            raise DataError(f"no field {field!r} in this record (its fields: {keys}); name the text field with "
                            "--field", where=record_location(row, path))
        value = row[field]
        if not isinstance(value, str):
            raise DataError(f"field {field!r} is {type(value).__name__}, not text", where=record_location(row, path))
        if value.strip():
            texts.append(value)
    if not texts:
        raise DataError(f"no text in {path} (field {field!r}): the file is empty or every text is blank")
    return texts


def base_tokenizer_json(tok) -> dict[str, Any]:
    """The base's tokenizer.json as a dict; refused unless it is a byte-level BPE (GPT-2, Llama 3, SmolLM style)."""
    data = json.loads(tok.backend_tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or '"ByteLevel"' not in json.dumps(data.get("pre_tokenizer")):
        raise ModelError(f"vocab extend needs a byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM style); this base "
                         f"has a {model.get('type')} model with pre-tokenizer "
                         f"{(data.get('pre_tokenizer') or {}).get('type')}")
    return data


def merge_pair(m: Any) -> tuple[str, str]:
    return tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))  # type: ignore[return-value]


def train_bpe(texts: list[str], base_backend, vocab_size: int, min_frequency: int):
    """A BPE tokenizer trained on ``texts`` with the base's normaliser and pre-tokenizer, from all 256 bytes."""
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    trained = Tokenizer(models.BPE())
    if base_backend.normalizer is not None:
        trained.normalizer = base_backend.normalizer
    trained.pre_tokenizer = base_backend.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=ByteLevel.alphabet())
    trained.train_from_iterator(texts, trainer, length=len(texts))
    return trained


def batches(texts: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(texts), CHUNK):
        yield texts[i:i + CHUNK]


def token_counts(tokenizer, texts: list[str], advance: Callable[[int], None]) -> tuple[dict[str, int], int]:
    """How often each token occurs when ``tokenizer`` encodes the texts, and the total number of tokens."""
    from collections import Counter

    counts: Counter = Counter()
    total = 0
    for chunk in batches(texts):
        for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
            counts.update(enc.tokens)
            total += len(enc.ids)
        advance(len(chunk))
    return counts, total


def byte_of_symbol() -> dict[str, int]:
    """The byte each symbol of the byte-level alphabet stands for (GPT-2's table: printable bytes as themselves,
    the others shifted to U+0100 and up)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, shifted = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def learnt_parts(trained_merges: list[tuple[str, str]], base_vocab: dict[str, int]) -> dict[str, tuple[str, str]]:
    """The learnt tokens that may be added, each with the two tokens it is merged from: those the base lacks whose
    ancestors the base lacks all hold a non-ASCII byte. (So ASCII text, English and code, keeps its ids exactly: no
    new merge can apply to it.)"""
    table = byte_of_symbol()
    parts: dict[str, tuple[str, str]] = {}
    for a, b in trained_merges:
        t = a + b
        if t in base_vocab or t in parts:
            continue
        if all(table.get(c, 0x80) < 0x80 for c in t):
            continue
        if all(p in base_vocab or p in parts for p in (a, b)):
            parts[t] = (a, b)
    return parts


def choose_merges(trained_merges: list[tuple[str, str]], base_vocab: dict[str, int], counts: dict[str, int],
                  base_pieces: Callable[[str], int], n: int) -> list[tuple[str, str]]:
    """The merges of the ``n`` new tokens to add, in the trained order (each after the merges of its parts).

    Score of a new token: ``counts[t] * (base_pieces(t) - 1)``. The best go first, each with its ancestors the base
    lacks; a token whose ancestors no longer fit is passed over; what is left of ``n`` is filled in trained order."""
    parts = learnt_parts(trained_merges, base_vocab)
    order = {t: i for i, t in enumerate(parts)}
    ranked = sorted(parts, key=lambda t: (-counts.get(t, 0) * (base_pieces(t) - 1), order[t]))
    chosen: set[str] = set()

    def closure(t: str) -> set[str]:
        acc, stack = set(), [t]
        while stack:
            s = stack.pop()
            if s in parts and s not in chosen and s not in acc:
                acc.add(s)
                stack.extend(parts[s])
        return acc

    for t in ranked:
        if len(chosen) >= n:
            break
        need = closure(t)
        if len(chosen) + len(need) <= n:
            chosen |= need
    for t, (a, b) in parts.items():  # fill up, in trained order: every token's parts are there before it
        if len(chosen) >= n:
            break
        chosen.add(t)
    return [parts[t] for t in parts if t in chosen]


def extended_tokenizer(data: dict[str, Any], merges: list[tuple[str, str]], first_id: int) -> dict[str, Any]:
    """The base's tokenizer.json with the new tokens at ids ``first_id``... and their merges after the old ones."""
    data = json.loads(json.dumps(data))
    model = data["model"]
    as_list = not model["merges"] or isinstance(model["merges"][0], list)
    for i, (a, b) in enumerate(merges):
        model["vocab"][a + b] = first_id + i
        model["merges"].append([a, b] if as_list else f"{a} {b}")
    return data


def mean_rows(weight, pieces: list[list[int]], first_id: int) -> None:
    """Row ``first_id + i`` of ``weight`` := the mean of its rows ``pieces[i]`` (computed in fp32)."""
    import torch

    with torch.no_grad():
        for i, ids in enumerate(pieces):
            weight[first_id + i] = weight[ids].to(torch.float32).mean(0).to(weight.dtype)


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} exists and is not empty; give a new directory")


@contextlib.contextmanager
def new_directory(out: Path):
    """A temporary directory beside ``out`` to write into, renamed to ``out`` when the block ends without an error
    (``out`` still new or empty), removed otherwise: a model directory is there whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        check_out(out)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def extend_vocab(data_path: Path, out: Path, cfg: VocabConfig, *, log: Callable[[str], None] = lambda m: None,
                 progress: Progress | None = None) -> VocabReport:
    """Write the base ``cfg.model`` with ``cfg.add`` new tokens learnt from ``data_path`` to ``out`` (a new
    directory; nothing is written when anything is refused)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.io import file_digest
    from tunelab.models.convert import resolve_local_path

    start = time.monotonic()
    make = progress or (lambda desc, total: (lambda n: None))
    out = Path(out)
    check_out(out)
    texts = read_texts(Path(data_path), cfg.field, limit=cfg.limit, encoding=cfg.encoding)
    base_path = resolve_local_path(cfg.model)
    try:
        tok = AutoTokenizer.from_pretrained(str(base_path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer from {base_path}: {str(e).splitlines()[0]}") from None
    base_json = base_tokenizer_json(tok)
    backend = tok.backend_tokenizer
    base_vocab = base_json["model"]["vocab"]

    log(f"training a BPE vocabulary on {len(texts)} texts ({sum(map(len, texts))} characters)")
    size = 256 + 3 * cfg.add + 1000
    while True:
        trained = train_bpe(texts, backend, size, cfg.min_frequency)
        trained_merges = [merge_pair(m) for m in json.loads(trained.to_str())["model"]["merges"]]
        available = len(learnt_parts(trained_merges, base_vocab))
        exhausted = trained.get_vocab_size() < size
        if available >= cfg.add or exhausted:
            break
        size *= 2
    if available < cfg.add:
        raise DataError(f"--add {cfg.add}: this text gives only {available} new tokens (non-ASCII tokens occurring "
                        f"at least {cfg.min_frequency} times that the base lacks); give --add {available} or less, "
                        "or more text")
    counts, _ = token_counts(trained, texts, make("counting learnt tokens", len(texts)))

    def base_pieces(t: str) -> int:
        return len(backend.model.tokenize(t))

    merges = choose_merges(trained_merges, base_vocab, counts, base_pieces, cfg.add)
    added_ids = [t["id"] for t in base_json.get("added_tokens") or []]
    first_id = max([*base_vocab.values(), *added_ids, len(tok) - 1]) + 1
    new_json = extended_tokenizer(base_json, merges, first_id)
    new_backend = Tokenizer.from_str(json.dumps(new_json))

    before = sum(len(e.ids) for c in batches(texts) for e in backend.encode_batch(c, add_special_tokens=False))
    tick = make("measuring tokens per text", len(texts))
    after = 0
    for chunk in batches(texts):
        encs = new_backend.encode_batch(chunk, add_special_tokens=False)
        after += sum(len(e.ids) for e in encs)
        back = new_backend.decode_batch([e.ids for e in encs], skip_special_tokens=False)
        bad = next((x for x, y in zip(chunk, back) if x != y), None)
        if bad is not None:
            raise ModelError(f"the extended tokenizer does not decode a text back to itself: {bad[:60]!r}")
        tick(len(chunk))

    log(f"adding {len(merges)} tokens (ids {first_id}..{first_id + len(merges) - 1}) to {base_path}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype="auto")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {base_path}: {str(e).splitlines()[0]}") from None
    old_rows = model.get_input_embeddings().weight.shape[0]
    pieces = [[t.id for t in backend.model.tokenize(a + b)] for a, b in merges]
    model.resize_token_embeddings(max(old_rows, first_id + len(merges)), mean_resizing=False)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    mean_rows(emb.weight, pieces, first_id)
    if head is not None and not tied:
        mean_rows(head.weight, pieces, first_id)
        if getattr(head, "bias", None) is not None:
            mean_rows(head.bias.unsqueeze(1), pieces, first_id)

    report = VocabReport(
        base=cfg.model, base_path=str(base_path), base_vocab_size=old_rows,
        vocab_size=model.get_input_embeddings().weight.shape[0], added=len(merges), first_new_id=first_id,
        method="bpe-merges", data=str(data_path), data_field=cfg.field, data_digest=file_digest(data_path),
        texts=len(texts), chars=sum(map(len, texts)), tokens_per_text_before=round(before / len(texts), 3),
        tokens_per_text_after=round(after / len(texts), 3), tied_embeddings=tied,
        seconds=0.0)
    with new_directory(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False), encoding="utf-8")
        check = AutoTokenizer.from_pretrained(str(tmp))
        if len(check) != first_id + len(merges):
            raise ModelError(f"the saved tokenizer has {len(check)} tokens, not {first_id + len(merges)}")
        report.seconds = round(time.monotonic() - start, 1)
        report.write(tmp / VOCAB_FILE)
    return report
