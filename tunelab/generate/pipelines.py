"""The three pipelines: label, respond, self-instruct. Each turns inputs into requests, checks every answer
(with an optional repair re-ask), and returns rows plus counts of what was dropped and why.

- ``label``: classify each input with a label PromptSpec; the teacher's label must be in the spec's set.
  With ``sampling.samples > 1`` the label is the majority vote of the samples.
- ``respond``: answer each instruction/question with a PromptSpec; number tasks (GSM8K) check that the final
  answer agrees with the reasoning's last number, and optionally that it equals the gold answer (rejection
  sampling); json tasks can be checked against a JSON Schema.
- ``self-instruct``: new tasks (instruction, input, output) from seed tasks, in rounds: each request shows
  a few seed tasks and a few tasks generated so far, and asks for more; candidates pass the self-instruct
  filters (length, blacklist, punctuation) and the near-duplicate filter against everything kept so far.

A run is deterministic given the journal: the requests of round r depend only on answers already in it, so
a rerun makes exactly the same requests and skips the ones that are done.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from tunelab.errors import DataError, TunelabError
from tunelab.evaluate.cache import stable_hash
from tunelab.generate.confidence import confidence_summary, label_confidence
from tunelab.generate.config import GenerateConfig
from tunelab.generate.resolver import Answer, Resolver, Request
from tunelab.generate.journal import request_key
from tunelab.generate.quality import (Drops, dup_reason, instruction_problem, json_schema_errors, make_dedup,
                                      reasoning_agrees, same_number)


# ------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One generated training example in every output shape, with its provenance."""

    data: dict[str, Any]  # the full record (data.jsonl)
    messages: list[dict[str, str]]  # chat row, ending with the assistant answer
    alpaca: dict[str, str]
    provenance: dict[str, Any]
    dedup_text: str
    texts: list[str] = field(default_factory=list)  # what the contamination check compares
    label: str | None = None  # label: the teacher's label, its confidence and the input's gold label
    confidence: float | None = None
    gold: str | None = None


@dataclass
class PipelineResult:
    rows: list[Row]
    drops: Drops
    pending: int = 0  # inputs still waiting for an answer (budget stop, Batch API mode, failed requests)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Check:
    ok: bool
    value: Any = None
    reason: str = ""
    detail: str = ""
    repairable: bool = False
    parsed: Any = None


@dataclass
class Outcome:
    status: str  # "ok" | "drop" | "pending" | "failed"
    check: Check | None = None
    answers: list[Answer] = field(default_factory=list)  # main answer, then repairs
    first_key: str = ""
    sample: int = 0


REPAIR_MESSAGE = ("That answer could not be used: {detail}. Answer the same request again, following the "
                  "required output format exactly.")


# ------------------------------------------------------------------------------------------------------
# base
# ------------------------------------------------------------------------------------------------------
class Pipeline:
    name = "base"

    def __init__(self, cfg: GenerateConfig, resolver: Resolver, *, spec: Any = None, prompt_hash: str = "",
                 items: list[dict] | None = None, ids: list[str] | None = None, data_path: str = ""):
        self.cfg = cfg
        self.resolver = resolver
        self.spec = spec
        self.prompt_hash = prompt_hash
        self.items = items or []
        self.ids = ids or []
        self.data_path = data_path
        self.drops = Drops()
        self.repairs = 0
        self.repaired_ok = 0

    # ---------------------------------------------------------------------------------------------- helpers
    def params(self, sample: int = 0) -> dict[str, Any]:
        return self.cfg.sampling.request_params(sample, logprobs=self.cfg.wants_logprobs())

    def request(self, messages: list[dict], item: str, *, sample: int = 0, kind: str = "main") -> Request:
        params = self.params(sample)
        key = request_key(pipeline=self.name, prompt_hash=self.prompt_hash, messages=messages,
                          model=self.cfg.teacher.model, params=params, extra={"sample": sample})
        return Request(key=key, messages=messages, params=params, item=item, kind=kind, sample=sample)

    def gates(self, a: Answer) -> Check | None:
        """Checks every answer goes through before parsing."""
        q = self.cfg.quality
        if a.finish_reason == "length" and not q.allow_truncated:
            return Check(False, reason="truncated", detail="the answer was cut off at sampling.max_tokens")
        text = a.text.strip()
        if not text:
            return Check(False, reason="empty", detail="the answer was empty", repairable=True)
        if len(text) < q.min_chars:
            return Check(False, reason="too_short", detail=f"the answer is shorter than {q.min_chars} characters",
                         repairable=True)
        if q.max_chars is not None and len(text) > q.max_chars:
            return Check(False, reason="too_long", detail=f"the answer is longer than {q.max_chars} characters",
                         repairable=True)
        return None

    def repair_text(self, check: Check) -> str:
        return REPAIR_MESSAGE.format(detail=check.detail or check.reason)

    async def ask_checked(self, reqs: list[Request], check: Callable[[int, Answer], Check]) -> list[Outcome]:
        """Resolve ``reqs``; re-ask (up to quality.repair times) those whose answer fails a repairable check."""
        outcomes = [Outcome("pending", first_key=r.key, sample=r.sample) for r in reqs]
        cur = dict(enumerate(reqs))
        for attempt in range(self.cfg.quality.repair + 1):
            answers = await self.resolver.resolve(list(cur.values()))
            nxt: dict[int, Request] = {}
            for i, req in cur.items():
                a = answers.get(req.key)
                if a is None:
                    outcomes[i].status = "failed" if req.key in self.resolver.failed_keys else "pending"
                    continue
                outcomes[i].answers.append(a)
                c = check(i, a)
                outcomes[i].check = c
                if c.ok:
                    outcomes[i].status = "ok"
                    if attempt:
                        self.repaired_ok += 1
                elif c.repairable and attempt < self.cfg.quality.repair:
                    msgs = req.messages + [{"role": "assistant", "content": a.text},
                                           {"role": "user", "content": self.repair_text(c)}]
                    nxt[i] = self.request(msgs, req.item, sample=req.sample, kind="repair")
                    outcomes[i].status = "pending"
                    self.repairs += 1
                else:
                    outcomes[i].status = "drop"
            cur = nxt
            if not cur:
                break
        return outcomes

    def provenance(self, o: Outcome) -> dict[str, Any]:
        a = o.answers[-1]
        return {"pipeline": self.name, "teacher": self.cfg.teacher.model, "response_model": a.model or None,
                "endpoint": "openai-batch-api" if a.source == "batch" else (a.endpoint or self.resolver.endpoint),
                "prompt_hash": self.prompt_hash, "request_key": o.first_key, "time": a.time,
                "sampling": self.params(o.sample), "source": a.source, "repairs": len(o.answers) - 1}

    def count(self, o: Outcome, **example: Any) -> None:
        """Account for an outcome that did not give a row."""
        if o.status == "drop" and o.check is not None:
            self.drops.add(o.check.reason, detail=o.check.detail, **example)
        elif o.status == "failed":
            self.drops.add("request_failed", **example)

    def chat_mode(self) -> str:
        m = self.cfg.output.chat_prompt
        return m if m != "auto" else ("rendered" if self.name == "label" else "input")

    def input_text(self, item: dict) -> str:
        if self.spec is not None and hasattr(self.spec, "render_input"):
            try:
                return str(self.spec.render_input(item))
            except Exception:
                pass
        for k in ("text", "question", "instruction", "input", "prompt"):
            if isinstance(item.get(k), str):
                return item[k]
        return json.dumps({k: v for k, v in item.items() if not k.startswith("_")}, ensure_ascii=False)

    def chat_rows(self, rendered: list[dict], item: dict, answer: str) -> list[dict[str, str]]:
        if self.chat_mode() == "rendered":
            msgs = [{"role": m["role"], "content": m["content"]} for m in rendered]
        else:
            msgs = ([{"role": "system", "content": self.cfg.output.system_prompt}] if self.cfg.output.system_prompt
                    else []) + [{"role": "user", "content": self.input_text(item)}]
        return msgs + [{"role": "assistant", "content": answer}]

    @staticmethod
    def alpaca_row(messages: list[dict[str, str]]) -> dict[str, str]:
        """Chat -> alpaca: the last user turn is the instruction (few-shot turns before it are not carried)."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        user = [m["content"] for m in messages if m["role"] == "user"]
        row = {"instruction": user[-1] if user else "", "input": "", "output": messages[-1]["content"]}
        if system:
            row["system"] = system
        return row

    def dedup(self, rows: list[Row]) -> list[Row]:
        kind = self.cfg.quality.dedup
        if kind == "auto":
            kind = "rouge" if self.name == "self-instruct" else "exact"
        f = make_dedup(kind, self.cfg.quality.dedup_threshold)
        if f is None:
            return rows
        kept = []
        for r in rows:
            hit = f.check(r.dedup_text)
            if hit is None:
                kept.append(r)
            else:
                self.drops.add(dup_reason(hit), id=r.data.get("id"), text=r.dedup_text)
        return kept

    def clean(self, item: dict) -> dict:
        return {k: v for k, v in item.items() if not k.startswith("_")}

    def render(self, i: int) -> list[dict]:
        try:
            return [dict(m) for m in self.spec.render(self.items[i])]
        except Exception as e:  # a missing field or a template error: name the input line
            line = self.items[i].get("_line")
            where = f"{self.data_path}:{line}" if line else self.data_path
            why = e.message if isinstance(e, TunelabError) else f"{type(e).__name__}: {e}"
            raise DataError(f"cannot render this item with the prompt spec: {why}", where=where) from None

    def parse(self, text: str) -> tuple[Any, Any, str | None]:
        """(prediction, parse result, error) from the spec; a parser that raises is a parse error, not a crash."""
        try:
            p = self.spec.parse(text)
        except Exception as e:
            return None, None, f"the prompt spec's parser failed: {type(e).__name__}: {e}"
        pred = getattr(p, "prediction", None)
        return pred, p, None if pred is not None else (getattr(p, "error", None) or "no answer found")

    def gold(self, item: dict) -> Any:
        try:
            return self.spec.gold(item) if hasattr(self.spec, "gold") else None
        except Exception:
            return None

    async def run(self) -> PipelineResult:
        raise NotImplementedError

    def finalize(self, rows: list[Row]) -> tuple[list[Row], dict[str, Any]]:
        """The last step, after the runner's contamination check: rows to write and more stats."""
        return rows, {}


def spec_label_field(spec: Any, default: str = "label") -> str:
    """The field the spec reads gold answers from (``target_field``; else ``default``)."""
    v = getattr(spec, "target_field", None)
    return v if isinstance(v, str) and v else default


def target_text(spec: Any, item: dict, value: Any, field_name: str) -> str:
    """The answer text a student should learn for ``value`` (the spec's own answer format if it has one)."""
    if hasattr(spec, "target_text"):
        try:
            t = spec.target_text({**item, field_name: value})
            if isinstance(t, str) and t:
                return t
        except Exception:
            pass
    return str(value)


# ------------------------------------------------------------------------------------------------------
# label
# ------------------------------------------------------------------------------------------------------
class LabelPipeline(Pipeline):
    name = "label"

    def repair_text(self, check: Check) -> str:
        labels = list(self.spec.labels or [])
        if labels:
            return (f"That answer could not be used: {check.detail or check.reason}. Answer again with exactly one "
                    f"of: {', '.join(labels)}.")
        return super().repair_text(check)

    def check(self, _i: int, a: Answer) -> Check:
        g = self.gates(a)
        if g is not None:
            return g
        pred, p, err = self.parse(a.text)
        if pred is None:
            return Check(False, reason="parse_error", detail=err or "no label found", repairable=True, parsed=p)
        labels = list(self.spec.labels or [])
        if labels and str(pred) not in labels:
            return Check(False, reason="label_not_in_set", detail=f"{pred!r} is not one of {labels}",
                         repairable=True, parsed=p)
        return Check(True, value=str(pred), parsed=p)

    async def run(self) -> PipelineResult:
        n_samples = self.cfg.sampling.samples
        labels = list(self.spec.labels or [])
        rendered = [self.render(i) for i in range(len(self.items))]
        reqs = [self.request(rendered[i], self.ids[i], sample=s) for i in range(len(self.items))
                for s in range(n_samples)]
        outcomes = await self.ask_checked(reqs, self.check)
        # The teacher's label goes where the spec reads gold labels, so data.jsonl trains with the same spec.
        lf = spec_label_field(self.spec, self.cfg.output.label_field)
        rows: list[Row] = []
        methods: list[str | None] = []
        pending = 0
        for i, item in enumerate(self.items):
            outs = outcomes[i * n_samples:(i + 1) * n_samples]
            if any(o.status == "pending" for o in outs):
                pending += 1
                continue
            ok = [o for o in outs if o.status == "ok"]
            if not ok:
                for o in outs:
                    self.count(o, id=self.ids[i], output=o.answers[-1].text if o.answers else None)
                continue
            votes = Counter(o.check.value for o in ok)
            label = max(votes, key=lambda v: (votes[v], -[o.check.value for o in ok].index(v)))
            first = next(o for o in ok if o.check.value == label)
            if n_samples > 1:
                conf, method = votes[label] / sum(votes.values()), "votes"
            else:
                conf, method = label_confidence(first.answers[-1].logprobs, label, labels)
            conf = round(conf, 6) if conf is not None else None
            methods.append(method)
            gold = self.gold(item)
            data = self.clean(item)
            data.setdefault("id", self.ids[i])
            if lf in data:
                data[f"gold_{lf}"] = data.pop(lf)
            data[lf] = label
            data["confidence"] = conf
            if n_samples > 1:
                data["label_votes"] = dict(votes)
            answer = target_text(self.spec, self.clean(item), label, lf)
            msgs = self.chat_rows(rendered[i], item, answer)
            rows.append(Row(data=data, messages=msgs, alpaca=self.alpaca_row(msgs),
                            provenance={**self.provenance(first), "confidence": conf},
                            dedup_text=self.input_text(item), texts=[self.input_text(item)],
                            label=label, confidence=conf, gold=str(gold) if gold is not None else None))
        self.labelled = list(rows)
        self.methods = methods
        self.warning = None
        n_null = sum(r.confidence is None for r in rows)
        q = self.cfg.quality
        if n_null and (self.cfg.wants_logprobs() or q.min_confidence is not None or q.balance != "none"):
            why = ("the teacher sent no logprobs" if self.cfg.wants_logprobs()
                   else "sampling.logprobs is false")
            self.warning = (f"{n_null} of {len(rows)} teacher labels have no confidence ({why}; "
                            f"{self.resolver.endpoint})" +
                            (": dropped as no_confidence (quality.min_confidence is set)"
                             if q.min_confidence is not None else
                             "; their confidence is null" + (" and they rank last in quality.balance"
                                                            if q.balance != "none" else "")))
        if q.min_confidence is not None:
            kept = []
            for r in rows:
                if r.confidence is None:
                    self.drops.add("no_confidence", id=r.data.get("id"), label=r.label, text=r.dedup_text)
                elif r.confidence < q.min_confidence:
                    self.drops.add("low_confidence", id=r.data.get("id"), label=r.label, confidence=r.confidence,
                                   text=r.dedup_text)
                else:
                    kept.append(r)
            rows = kept
        rows = self.dedup(rows)
        return PipelineResult(rows, self.drops, pending, {"items": len(self.items)})

    def finalize(self, rows: list[Row]) -> tuple[list[Row], dict[str, Any]]:
        """quality.balance (last, so that every label keeps the same number of the rows that are written), then the
        label stats: confidences, agreement with gold of all labels and of the kept ones, keep rate."""
        labels = list(self.spec.labels or [])
        q = self.cfg.quality
        balance = None
        if q.balance == "equal":
            before = {lab: sum(r.label == lab for r in rows) for lab in labels}
            target = min(before.values()) if before else 0
            keep: set[int] = set()
            for lab in labels:
                mine = [(k, r) for k, r in enumerate(rows) if r.label == lab]
                # Most confident first; a null confidence ranks last; ties keep input order.
                mine.sort(key=lambda kr: (kr[1].confidence is None, -(kr[1].confidence or 0.0), kr[0]))
                keep.update(k for k, _ in mine[:target])
            for k, r in enumerate(rows):
                if k not in keep:
                    self.drops.add("balance", id=r.data.get("id"), label=r.label, confidence=r.confidence)
            rows = [r for k, r in enumerate(rows) if k in keep]
            balance = {"target": target, "before": before,
                       "after": {lab: sum(r.label == lab for r in rows) for lab in labels}}
        def agreement(rs: list[Row]) -> dict[str, Any] | None:
            g = [r for r in rs if r.gold is not None]
            if not g:
                return None
            agree = sum(r.gold == r.label for r in g)
            return {"n": len(g), "agree": agree, "rate": round(agree / len(g), 4)}

        n_in = len(self.items)
        info = {"inputs": n_in, "labelled": len(self.labelled), "kept": len(rows),
                "keep_rate": round(len(rows) / n_in, 4) if n_in else 0.0,
                "min_confidence": q.min_confidence, "balance": q.balance,
                "logprobs_requested": self.cfg.wants_logprobs(),
                "confidence": confidence_summary([r.confidence for r in self.labelled], self.methods),
                "confidence_kept": confidence_summary([r.confidence for r in rows]),
                "per_label": {lab: sum(r.label == lab for r in rows) for lab in labels},
                "balance_counts": balance, "agreement_all": agreement(self.labelled),
                "agreement_kept": agreement(rows), "warning": self.warning}
        return rows, {"agreement_with_gold": info["agreement_kept"], "teacher_labels": info}


# ------------------------------------------------------------------------------------------------------
# respond
# ------------------------------------------------------------------------------------------------------
class RespondPipeline(Pipeline):
    name = "respond"

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.schema = None
        js = self.cfg.quality.json_schema
        if isinstance(js, dict):
            self.schema = js
        elif isinstance(js, str):
            self.schema = json.loads(js)  # the runner has already read a schema file into a string

    def check(self, i: int, a: Answer) -> Check:
        g = self.gates(a)
        if g is not None:
            return g
        task = getattr(self.spec, "task", "free")
        pred, p, err = self.parse(a.text)
        if pred is None or (task == "free" and not str(pred).strip()):
            return Check(False, reason="parse_error", detail=err or "no answer found", repairable=True, parsed=p)
        if not getattr(p, "complied", True):
            # The teacher's text becomes the training target as it is, so it must follow the format exactly.
            return Check(False, reason="format_error", detail=getattr(p, "error", None) or "wrong output format",
                         repairable=True, parsed=p)
        if task == "label":
            labels = list(self.spec.labels or [])
            if labels and str(pred) not in labels:
                return Check(False, reason="label_not_in_set", detail=f"{pred!r} is not one of {labels}",
                             repairable=True, parsed=p)
        if task == "number" and self.cfg.quality.answer_check == "consistent":
            if not reasoning_agrees(a.text, pred, getattr(self.spec, "answer_prefix", None)):
                return Check(False, reason="answer_disagrees_with_reasoning",
                             detail=f"the final answer {pred} is not the result the reasoning reached",
                             repairable=True, parsed=p)
        if task == "json" and self.schema is not None:
            err = json_schema_errors(pred, self.schema)
            if err:
                return Check(False, reason="schema_violation", detail=f"the JSON does not match the schema: {err}",
                             repairable=True, parsed=p)
        if self.cfg.quality.require_correct:
            gold = self.gold(self.items[i // self.cfg.sampling.samples])
            if gold is not None and not self.correct(pred, gold):
                return Check(False, reason="wrong_answer", detail="the answer differs from the gold answer",
                             parsed=p)
        return Check(True, value=pred, parsed=p)

    def correct(self, pred: Any, gold: Any) -> bool:
        if hasattr(self.spec, "is_correct"):
            try:
                return bool(self.spec.is_correct(pred, gold))
            except Exception:
                pass
        if getattr(self.spec, "task", "") == "number":
            return same_number(pred, gold)
        return str(pred).strip() == str(gold).strip()

    async def run(self) -> PipelineResult:
        n_samples = self.cfg.sampling.samples
        rendered = [self.render(i) for i in range(len(self.items))]
        reqs = [self.request(rendered[i], self.ids[i], sample=s) for i in range(len(self.items))
                for s in range(n_samples)]
        outcomes = await self.ask_checked(reqs, self.check)
        rows: list[Row] = []
        pending = n_correct = n_gold = 0
        for k, o in enumerate(outcomes):
            i, s = divmod(k, n_samples)
            item = self.items[i]
            if o.status == "pending":
                pending += 1
                continue
            if o.status != "ok":
                self.count(o, id=self.ids[i], output=o.answers[-1].text if o.answers else None)
                continue
            text = o.answers[-1].text.strip()
            gold = self.gold(item)
            data = self.clean(item)
            data.setdefault("id", self.ids[i])
            if n_samples > 1:
                data["id"] = f"{data['id']}#{s}"
            data["response"] = text
            if getattr(self.spec, "task", "free") != "free":  # free text: the answer is the response
                data["teacher_answer"] = o.check.value
            if gold is not None:
                n_gold += 1
                data["correct"] = self.correct(o.check.value, gold)
                n_correct += int(data["correct"])
            msgs = self.chat_rows(rendered[i], item, text)
            inp = self.input_text(item)
            rows.append(Row(data=data, messages=msgs, alpaca={"instruction": inp, "input": "", "output": text},
                            provenance=self.provenance(o), dedup_text=f"{inp}\n{text}", texts=[inp]))
        rows = self.dedup(rows)
        extra: dict[str, Any] = {"items": len(self.items), "samples_per_item": n_samples}
        if n_gold:
            extra["teacher_accuracy"] = {"n": n_gold, "correct": n_correct, "rate": round(n_correct / n_gold, 4)}
        return PipelineResult(rows, self.drops, pending, extra)


# ------------------------------------------------------------------------------------------------------
# self-instruct
# ------------------------------------------------------------------------------------------------------
SELF_INSTRUCT_SYSTEM = "You write diverse, high-quality tasks for training a language model to follow instructions."
SELF_INSTRUCT_PROMPT = """You are asked to come up with {num_tasks} diverse task instructions. They will be given to a language model, and we will evaluate how well it completes them.

Requirements:
1. Do not repeat the same verb across instructions, to maximise diversity.
2. Vary the language: combine questions with imperative instructions.
3. Vary the type of task: open-ended generation, classification, editing, rewriting, extraction, reasoning, and so on.
4. A text-only language model must be able to do the task: do not ask for images, audio, files, or actions in the world.
5. Each instruction is one or two sentences long.
6. Where an input helps, give a realistic input of at most 100 words; otherwise leave "input" empty.
7. The output is a good answer to the instruction and input, at most 100 words.

Here are some example tasks:
{examples}

Answer with only a JSON array of {num_tasks} new objects, each with the keys "instruction", "input" and "output"."""


def parse_tasks(text: str) -> tuple[list[dict[str, Any]] | None, str]:
    """A JSON array of task objects out of an answer (tolerating code fences and prose around it)."""
    t = text.strip()
    t = re.sub(r"^```(?:json)?\s*|\s*```$", "", t)
    start, end = t.find("["), t.rfind("]")
    cands = [t[start:end + 1]] if start != -1 and end > start else []
    cands.append(t)
    for c in cands:
        try:
            obj = json.loads(c)
        except ValueError:
            continue
        if isinstance(obj, dict):
            obj = obj.get("tasks") or obj.get("instructions") or [obj]
        if isinstance(obj, list):
            return [x for x in obj if isinstance(x, dict)], ""
    return None, "the answer is not a JSON array of objects"


class SelfInstructPipeline(Pipeline):
    name = "self-instruct"

    def __init__(self, *args: Any, seeds: list[dict], **kw: Any):
        super().__init__(*args, **kw)
        self.seeds = seeds
        si = self.cfg.self_instruct
        assert si is not None
        self.si = si

    def messages(self, examples: list[dict]) -> list[dict]:
        shown = "\n".join(json.dumps(e, ensure_ascii=False) for e in examples)
        if self.spec is not None:
            return [dict(m) for m in self.spec.render({"examples": shown, "num_tasks": self.si.tasks_per_request,
                                                       "examples_list": examples})]
        return [{"role": "system", "content": SELF_INSTRUCT_SYSTEM},
                {"role": "user", "content": SELF_INSTRUCT_PROMPT.format(num_tasks=self.si.tasks_per_request,
                                                                        examples=shown)}]

    @staticmethod
    def example(task: dict) -> dict:
        inst = (task.get("instances") or [{}])[0] if "instances" in task else task
        return {"instruction": task.get("instruction", ""), "input": inst.get("input", "") or "",
                "output": inst.get("output", "") or ""}

    def check(self, _i: int, a: Answer) -> Check:
        g = self.gates(a)
        if g is not None:
            return g
        tasks, err = parse_tasks(a.text)
        if tasks is None:
            return Check(False, reason="parse_error", detail=err, repairable=True)
        return Check(True, value=tasks)

    async def run(self) -> PipelineResult:
        si = self.si
        dedup_kind = self.cfg.quality.dedup if self.cfg.quality.dedup != "auto" else "rouge"
        filt = make_dedup(dedup_kind, self.cfg.quality.dedup_threshold)
        if filt is not None:
            for s in self.seeds:  # as in self-instruct, new tasks must also differ from the seeds
                filt.check(s.get("instruction", ""))
        kept: list[Row] = []
        machine: list[dict] = []
        pending = candidates = 0
        rounds = 0
        for rnd in range(si.max_rounds):
            if len(kept) >= si.num_instructions or self.resolver.stopped:
                break
            rounds += 1
            reqs = []
            used: set[str] = set()
            for j in range(si.requests_per_round):
                rng = random.Random(stable_hash([self.cfg.seed, rnd, j]))
                for _ in range(20):  # a different set of examples for each request of the round
                    ex = rng.sample(self.seeds, min(si.seeds_per_prompt, len(self.seeds)))
                    if machine and si.machine_per_prompt:
                        ex += rng.sample(machine, min(si.machine_per_prompt, len(machine)))
                    req = self.request(self.messages([self.example(t) for t in ex]), f"round{rnd}-{j}")
                    if req.key not in used:
                        break
                used.add(req.key)
                reqs.append(req)
            outcomes = await self.ask_checked(reqs, self.check)
            for j, o in enumerate(outcomes):
                if o.status == "pending":
                    pending += 1
                    continue
                if o.status != "ok":
                    self.count(o, id=f"round{rnd}-{j}", output=o.answers[-1].text if o.answers else None)
                    continue
                for k, t in enumerate(o.check.value):
                    candidates += 1
                    ex = {"id": f"r{rnd}-{j}-{k}"}
                    instr, inp, out = (t.get("instruction"), t.get("input", ""), t.get("output"))
                    if not isinstance(instr, str) or not isinstance(out, str) or not isinstance(inp or "", str):
                        self.drops.add("malformed_task", task=json.dumps(t, ensure_ascii=False)[:300], **ex)
                        continue
                    inp = inp or ""
                    why = instruction_problem(instr, min_words=si.min_words, max_words=si.max_words,
                                              blacklist=si.blacklist)
                    if why is None and not out.strip():
                        why = "empty_output"
                    if why is not None:
                        self.drops.add(why, instruction=instr, **ex)
                        continue
                    if filt is not None:
                        hit = filt.check(instr)
                        if hit is not None:
                            self.drops.add(dup_reason(hit), instruction=instr, **ex)
                            continue
                    if len(kept) >= si.num_instructions:
                        self.drops.add("over_target", instruction=instr, **ex)
                        continue
                    user = instr.strip() + (f"\n\n{inp.strip()}" if inp.strip() else "")
                    msgs = ([{"role": "system", "content": self.cfg.output.system_prompt}]
                            if self.cfg.output.system_prompt else []) + [
                        {"role": "user", "content": user}, {"role": "assistant", "content": out.strip()}]
                    data = {"id": ex["id"], "instruction": instr.strip(), "input": inp.strip(), "output": out.strip()}
                    machine.append(data)
                    kept.append(Row(data=data, messages=msgs,
                                    alpaca={"instruction": data["instruction"], "input": data["input"],
                                            "output": data["output"]},
                                    provenance=self.provenance(o), dedup_text=instr, texts=[instr, inp]))
            if pending:
                break  # the next round depends on this one's answers
        extra = {"seed_tasks": len(self.seeds), "rounds": rounds, "candidates": candidates,
                 "target": si.num_instructions, "reached_target": len(kept) >= si.num_instructions}
        return PipelineResult(kept, self.drops, pending, extra)


PIPELINES = {"label": LabelPipeline, "respond": RespondPipeline, "self-instruct": SelfInstructPipeline}
