"""Quality gates for teacher outputs, and exact / near-duplicate removal, with counts of what was dropped.

Near duplicates follow self-instruct (Wang et al., 2023): a new instruction is dropped when its ROUGE-L F
score against any kept one is >= 0.7. ROUGE-L here tokenises on Unicode word characters (the reference
``rouge_score`` tokenizer drops everything outside [a-z0-9], which would make all Korean text empty). For
large pools MinHash (128 permutations, LSH bands) finds candidates in near-constant time and the exact
Jaccard of their shingle sets decides.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ------------------------------------------------------------------------------------------------------
# drop accounting
# ------------------------------------------------------------------------------------------------------
@dataclass
class Drops:
    """Why rows were dropped: a count per reason and the first few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, **example: Any) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append({k: (v[:300] if isinstance(v, str) else v) for k, v in example.items()})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts.most_common()), "examples": self.examples}


# ------------------------------------------------------------------------------------------------------
# text helpers
# ------------------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """For exact-duplicate checks: NFKC, case-folded, punctuation and runs of space collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD.findall(t))


def tokens(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def lcs_len(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists."""
    if not a or not b:
        return 0.0
    lcs = lcs_len(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def numbers(text: str) -> list[float]:
    out = []
    for m in _NUM.findall(text):
        try:
            out.append(float(m.replace(",", "")))
        except ValueError:
            pass
    return out


def same_number(a: Any, b: Any, tol: float = 1e-6) -> bool:
    try:
        fa = float(str(a).replace(",", "").strip())
        fb = float(str(b).replace(",", "").strip())
    except (TypeError, ValueError):
        return False
    return abs(fa - fb) <= tol * max(1.0, abs(fa), abs(fb))


def reasoning_agrees(text: str, answer: Any, answer_prefix: str | None = None) -> bool:
    """Does the final answer equal the last number of the reasoning (the text before the answer line)?

    The answer line starts at the last ``answer_prefix`` (e.g. "Answer:"), else at the last "####", else it
    is the last non-empty line. A reasoning with no number at all passes (nothing to disagree with)."""
    if answer_prefix and answer_prefix in text:
        body = text[: text.rfind(answer_prefix)]
    elif "####" in text:
        body = text[: text.rfind("####")]
    else:
        lines = [ln for ln in text.rstrip().splitlines() if ln.strip()]
        body = "\n".join(lines[:-1])
    nums = numbers(body)
    if not nums:
        return True
    return same_number(nums[-1], answer)


def json_schema_errors(obj: Any, schema: dict[str, Any]) -> str | None:
    """The first JSON Schema violation as one line, or None."""
    import jsonschema

    v = jsonschema.Draft202012Validator(schema)
    err = next(iter(sorted(v.iter_errors(obj), key=lambda e: list(e.path))), None)
    if err is None:
        return None
    where = "/".join(str(p) for p in err.path) or "<root>"
    return f"{where}: {err.message}"[:300]


# ------------------------------------------------------------------------------------------------------
# duplicate filters
# ------------------------------------------------------------------------------------------------------
class ExactDedup:
    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def check(self, text: str) -> int | None:
        """Index of an earlier identical text, else None (and remember this one)."""
        k = normalize(text)
        if k in self.seen:
            return self.seen[k]
        self.seen[k] = len(self.seen)
        return None


class RougeDedup:
    """Self-instruct's filter: drop a text whose ROUGE-L F against any kept text is >= threshold."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self.kept: list[list[str]] = []
        self._bags: list[Counter] = []
        self._by_token: dict[str, set[int]] = {}

    def check(self, text: str) -> tuple[int, float] | None:
        """(index of the most similar kept text, score) if this is a near-duplicate, else None (and keep it)."""
        toks = tokens(text)
        bag = Counter(toks)
        cands: set[int] = set()
        for t in bag:
            cands |= self._by_token.get(t, set())
        best: tuple[int, float] | None = None
        for i in cands:
            other = self.kept[i]
            # LCS <= the multiset overlap, so an upper bound of the F score rules most pairs out cheaply.
            overlap = sum((bag & self._bags[i]).values())
            if overlap == 0 or 2 * overlap / (len(toks) + len(other)) < self.threshold:
                continue
            s = rouge_l(toks, other)
            if s >= self.threshold and (best is None or s > best[1]):
                best = (i, s)
        if best is not None:
            return best
        self.add_tokens(toks)
        return None

    def add_tokens(self, toks: list[str]) -> None:
        i = len(self.kept)
        self.kept.append(toks)
        self._bags.append(Counter(toks))
        for t in set(toks):
            self._by_token.setdefault(t, set()).add(i)


class MinHashDedup:
    """Near-duplicates by Jaccard similarity of shingle sets, with MinHash + LSH to find candidates.

    Shingles are word 3-grams (character 5-grams for texts of fewer than 8 words, e.g. Korean reviews)."""

    _P = (1 << 31) - 1  # a Mersenne prime: a*h+b stays below 2^63, no overflow in uint64

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, seed: int = 0):
        self.threshold = threshold
        self.num_perm = num_perm
        rows = 4 if threshold >= 0.5 else 2
        self.bands = num_perm // rows
        self.rows = rows
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, self._P, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, self._P, size=num_perm, dtype=np.uint64)
        self._sets: list[set[str]] = []
        self._buckets: list[dict[bytes, list[int]]] = [dict() for _ in range(self.bands)]

    @staticmethod
    def shingles(text: str) -> set[str]:
        toks = tokens(text)
        if len(toks) >= 8:
            return {" ".join(toks[i:i + 3]) for i in range(len(toks) - 2)}
        s = " ".join(toks)
        return {s[i:i + 5] for i in range(max(1, len(s) - 4))}

    def _signature(self, sh: set[str]) -> np.ndarray:
        import zlib

        hs = np.array([zlib.crc32(x.encode("utf-8")) for x in sh], dtype=np.uint64) % np.uint64(self._P)
        v = (self._a[:, None] * hs[None, :] + self._b[:, None]) % np.uint64(self._P)  # (num_perm, shingles)
        return v.min(axis=1)

    def check(self, text: str) -> tuple[int, float] | None:
        sh = self.shingles(text)
        if not sh:
            return None
        sig = self._signature(sh)
        cands: set[int] = set()
        keys = []
        for b in range(self.bands):
            k = sig[b * self.rows:(b + 1) * self.rows].tobytes()
            keys.append(k)
            cands.update(self._buckets[b].get(k, ()))
        best: tuple[int, float] | None = None
        for i in cands:
            o = self._sets[i]
            j = len(sh & o) / len(sh | o)
            if j >= self.threshold and (best is None or j > best[1]):
                best = (i, j)
        if best is not None:
            return best
        i = len(self._sets)
        self._sets.append(sh)
        for b, k in enumerate(keys):
            self._buckets[b].setdefault(k, []).append(i)
        return None


def make_dedup(kind: str, threshold: float):
    """A filter whose ``check(text)`` returns None for a new text, or what it duplicates."""
    if kind == "exact":
        return ExactDedup()
    if kind == "rouge":
        return _Both(ExactDedup(), RougeDedup(threshold))
    if kind == "minhash":
        return _Both(ExactDedup(), MinHashDedup(threshold))
    return None


class _Both:
    """Exact duplicates first (reported as such), then the near-duplicate filter."""

    def __init__(self, exact: ExactDedup, near: Any):
        self.exact, self.near = exact, near

    def check(self, text: str) -> Any:
        hit = self.exact.check(text)
        if hit is not None:
            return hit
        return self.near.check(text)


def dup_reason(hit: Any) -> str:
    return "near_duplicate" if isinstance(hit, tuple) else "duplicate"


# ------------------------------------------------------------------------------------------------------
# self-instruct filters (as in self-instruct / Alpaca's generate_instruction.py)
# ------------------------------------------------------------------------------------------------------
def instruction_problem(instruction: str, *, min_words: int, max_words: int, blacklist: list[str]) -> str | None:
    """Why a generated instruction is unusable, as a drop reason, or None."""
    text = instruction.strip()
    if not text:
        return "empty"
    n = len(text.split())
    if n < min_words:
        return "too_short"
    if n > max_words:
        return "too_long"
    low = text.lower()
    for w in blacklist:
        if re.search(rf"\b{re.escape(w.lower())}\b", low):
            return "blacklisted_word"
    if low.startswith("write a program"):
        return "blacklisted_word"
    if not text[0].isalnum():
        return "starts_with_punctuation"
    return None
