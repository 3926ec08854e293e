"""Teacher labels vs gold labels, end to end: label training texts with a teacher, train one LoRA adapter on the
teacher's labels and one on the gold labels (same texts, same prompt tokens, same recipe and seed), and
compare both students (and the base model) on the same dev items.

    texts only (id, text) -> `tunelab generate` label pipeline -> chat.jsonl (teacher labels, provenance)
                                                               -> agreement with the hidden gold labels
    the same kept texts + gold labels, rendered with the same PromptSpec -> gold.jsonl
    LoRA(teacher) and LoRA(gold), one recipe, one seed -> eval on dev: base, teacher-trained, gold-trained
    -> accuracies with 95% Wilson intervals, paired McNemar (teacher-trained vs gold-trained) -> summary.json

The teacher is any OpenAI-compatible endpoint (``base_url`` + ``model``, key from the named environment
variable); without a ``base_url`` the bundled model is served in-process on 127.0.0.1 by `tunelab serve`
(a plumbing run: a 135M model is a poor teacher). Example: ``python examples/teacher_vs_gold.py --help``.

Output folder::

    texts.jsonl        what the teacher is given: id and text of the first N training reviews
    generate.yaml      the label config that was run (the base config with this run's teacher and paths)
    teacher/           the `tunelab generate` output: journal, data.jsonl, chat.jsonl, stats.json
    gold.jsonl         the kept texts with their gold labels, chat format, the same prompt messages
    teacher.jsonl      only with a student prompt other than the teacher's: the teacher's labels in that prompt
    train/teacher/ train/gold/    `tunelab train` outputs (adapter/, report.json, report.html)
    eval/              per-item results of the three models on the dev items
    summary.json       the numbers of every step, the recipe, the wall times and the paths above
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from tunelab.data.io import read_records, write_jsonl
from tunelab.errors import ConfigError, DataError
from tunelab.generate.results import GenerateStats

Log = Callable[[str], None]


@dataclass
class CompareOptions:
    """One teacher-vs-gold run. Paths may be relative to the current directory."""

    label_config: Path  # a `tunelab generate` label config: prompt, teacher settings, sampling, quality, budget
    dev_data: Path  # labelled dev items, scored with the same prompt
    out: Path
    train_data: Path | None = None  # labelled training items; default: the config's data.path
    n: int = 64  # training texts sent to the teacher (the first N)
    dev_limit: int | None = 200
    text_field: str = "text"
    student_prompt: Path | None = None  # the students' PromptSpec (train + eval); default: the teacher's (config's)
    # teacher
    teacher_model: str | None = None  # default: the config's teacher.model ("tunelab-bundled" when serving locally)
    base_url: str | None = None  # None: serve the bundled model in-process on 127.0.0.1
    api_key_env: str | None = None  # the variable that holds the key (never the key itself)
    concurrency: int | None = None
    max_cost_usd: float | None = None
    use_cache: bool = True
    # student: one recipe for both adapters
    train_config: Path | None = None  # a `tunelab train` config for the recipe (its data, eval, forgetting ignored)
    student_model: str | None = None  # default: the train config's model, else bundled
    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    seed: int = 0
    threads: int | None = None
    device: str | None = None
    sets: dict[str, Any] = field(default_factory=dict)  # any train field: {"optim.warmup_ratio": 0.1}


# ------------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------------
def agreement(gold: list[str], teacher: list[str], labels: list[str]) -> dict[str, Any]:
    """Teacher-vs-gold agreement: accuracy (Wilson 95% interval), Cohen's kappa and the confusion matrix
    (rows: gold label, columns: teacher label)."""
    from tunelab.stats import proportion

    n = len(gold)
    if n != len(teacher):
        raise ValueError("gold and teacher labels differ in length")
    agree = sum(g == t for g, t in zip(gold, teacher))
    idx = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for g, t in zip(gold, teacher):
        if g in idx and t in idx:
            m[idx[g]][idx[t]] += 1
    po = agree / n if n else 0.0
    pe = sum((sum(m[i]) / n) * (sum(r[i] for r in m) / n) for i in range(len(labels))) if n else 0.0
    kappa = (po - pe) / (1 - pe) if pe < 1 else (1.0 if po == 1 else 0.0)
    ci = proportion(agree, n)
    return {"n": n, "agree": agree, "accuracy": round(po, 4), "accuracy_ci": [round(ci.low, 4), round(ci.high, 4)],
            "kappa": round(kappa, 4), "expected_agreement": round(pe, 4),
            "confusion": {"rows": "gold", "columns": "teacher", "labels": list(labels), "matrix": m}}


def compare_students(correct: dict[str, dict[str, bool]], a: str, b: str) -> dict[str, Any]:
    """Accuracy of ``a`` minus ``b`` on the same items (tunelab.stats.paired_comparison of ``a`` against ``b``):
    paired bootstrap 95% interval and exact McNemar."""
    from tunelab.stats import paired_comparison

    c = paired_comparison(correct[b], correct[a])
    d = c.diff
    return {"a": a, "b": b, "n": c.n, "diff": round(d.value, 4) if d else None,
            "diff_ci": [round(d.low, 4), round(d.high, 4)] if d else None,
            "a_right_b_wrong": c.gained, "a_wrong_b_right": c.lost, "mcnemar_p": round(c.p_value, 6),
            "significant": c.significant}


# ------------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------------
def _abs(base: Path, p: str | Path) -> Path:
    q = Path(p).expanduser()
    return (q if q.is_absolute() else base / q).resolve()


def _load_label_config(path: Path) -> dict[str, Any]:
    from tunelab.generate.config import load_generate_config

    cfg = load_generate_config(path)  # checked as `tunelab generate` would
    if cfg.pipeline != "label":
        raise ConfigError(f"the teacher-vs-gold comparison needs a label config, this one is {cfg.pipeline!r}",
                          where=str(path))
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _serve_bundled(model_name: str, log: Log):
    from tunelab.serve.app import ServerThread, build_app
    from tunelab.serve.config import ServeConfig

    log(f"teacher: starting `tunelab serve` over the bundled model as {model_name!r} on 127.0.0.1")
    srv = ServerThread(build_app(ServeConfig(served_model_name=model_name, max_batch=32)))
    return srv.start(timeout=300)


def label_with_teacher(opts: CompareOptions, raw: dict[str, Any], config_path: Path, texts_path: Path,
                       log: Log) -> GenerateStats:
    """Run the label pipeline on ``texts_path``; returns generate's stats (written to out/teacher/stats.json)."""
    from tunelab.generate.client import redact_url
    from tunelab.generate.config import GenerateConfig
    from tunelab.generate.runner import RunOptions, price_for, run_generate

    base = config_path.parent
    cfg = json.loads(json.dumps(raw))  # a deep copy
    cfg["prompt"] = str(_abs(base, cfg["prompt"]))
    cfg["data"] = {"path": str(texts_path), "id_field": "id"}
    teacher = cfg.setdefault("teacher", {})
    if opts.api_key_env:
        teacher["api_key_env"] = opts.api_key_env
        teacher.pop("api_key_file", None)
    elif teacher.get("api_key_file"):
        teacher["api_key_file"] = str(_abs(base, teacher["api_key_file"]))
    if opts.concurrency:
        teacher["concurrency"] = opts.concurrency
    budget = cfg.setdefault("budget", {}) or {}
    cfg["budget"] = budget
    if opts.max_cost_usd is not None:
        budget["max_cost_usd"] = opts.max_cost_usd
    if cfg.get("contamination"):
        cfg["contamination"]["eval_path"] = str(opts.dev_data.resolve())
    cfg.setdefault("output", {})
    cfg["output"]["formats"] = sorted(set(cfg["output"].get("formats") or []) | {"chat"})
    cfg["output"].pop("dir", None)

    srv = None
    try:
        if opts.base_url is None:
            model = opts.teacher_model or "tunelab-bundled"
            srv = _serve_bundled(model, log)
            teacher.update(model=model, base_url=srv.url + "/v1", price={"input": 0.0, "output": 0.0})
            teacher["timeout_s"] = max(float(teacher.get("timeout_s") or 0), 300.0)  # a CPU model is slow
        else:
            teacher["base_url"] = opts.base_url
            if opts.teacher_model:
                teacher["model"] = opts.teacher_model
        gcfg = GenerateConfig.model_validate(cfg)
        if budget.get("max_cost_usd") is not None and price_for(gcfg) is None:
            log(f"note: no price known for teacher {gcfg.teacher.model!r}: no cost budget (set teacher.price in "
                f"{config_path.name} for one); budget.max_requests still applies")
            budget["max_cost_usd"] = None
        gen_yaml = opts.out / "generate.yaml"
        gen_yaml.write_text("# written by tunelab.generate.compare from " + str(config_path) + "\n"
                            + yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
        log(f"teacher: labelling the texts in {texts_path.name} with {gcfg.teacher.model} at "
            f"{redact_url(gcfg.teacher.base_url or 'https://api.openai.com/v1')}")
        return run_generate(gen_yaml, RunOptions(out=opts.out / "teacher", use_cache=opts.use_cache))
    finally:
        if srv is not None:
            srv.stop()
            from tunelab.models import release_models

            release_models()


def train_student(opts: CompareOptions, data: Path, prompt: Path, out: Path, log: Log) -> dict[str, Any]:
    """One LoRA adapter with the comparison's recipe on a chat JSONL file; returns the train report."""
    import importlib

    from tunelab.train.config import LoopConfig, load_train_config

    overrides = {"method": "lora", "model": opts.student_model, "out": str(out), "data.path": str(data),
                 "data.format": "chat", "data.prompt": str(prompt), "train.epochs": opts.epochs,
                 "train.max_steps": opts.max_steps, "optim.lr": opts.lr, "train.batch_size": opts.batch_size,
                 "train.micro_batch_size": opts.micro_batch_size, "lora.r": opts.lora_r,
                 "lora.alpha": opts.lora_alpha, "train.seed": opts.seed, "train.threads": opts.threads,
                 "train.device": opts.device}
    if opts.batch_size is not None and opts.micro_batch_size is None:
        overrides["train.micro_batch_size"] = min(opts.batch_size, LoopConfig().micro_batch_size)
    sets = {"eval": None, "forgetting": None, "checkpoint.every_steps": None, "data.limit": None, **opts.sets}
    cfg = load_train_config(opts.train_config, overrides, sets)
    if cfg.method != "lora":
        raise ConfigError("the comparison trains LoRA adapters", where=str(opts.train_config or "<options>"))
    recipe = importlib.import_module("tunelab.train.lora")
    from tunelab.console import err_console

    return recipe.run(cfg, log=log, console=err_console)


def evaluate_students(opts: CompareOptions, prompt: Path, model: str, adapters: dict[str, Path], log: Log
                      ) -> tuple[dict[str, Any], dict[str, dict[str, bool]]]:
    """Base and trained models on the same dev items (one EvalRunner); accuracy with Wilson 95% intervals."""
    from tunelab.config import EvalConfig, validate_as
    from tunelab.evaluate.runner import EvalRunner
    from tunelab.stats import proportion
    from tunelab.models import release_models

    models = [{"name": "base", "model": model}] + [{"name": k, "model": model, "adapter": str(v)}
                                                   for k, v in adapters.items()]
    cfg = validate_as(EvalConfig, {"name": "teacher-vs-gold", "data": {"path": str(opts.dev_data.resolve())},
                                   "variants": {"student": str(prompt)}, "models": models}, "teacher-vs-gold")
    runner = EvalRunner(cfg, Path.cwd(), opts.out / "eval", limit=opts.dev_limit, use_cache=opts.use_cache, log=log)
    summary, rows = runner.run()
    release_models()
    summary.write(opts.out / "eval" / "summary.json")
    correct: dict[str, dict[str, bool]] = {}
    out: dict[str, Any] = {}
    for m in [x["name"] for x in models]:
        c = {r.item_id: bool(r.correct) for r in rows if r.model == m and r.sample == 0}
        correct[m] = c
        k, n = sum(c.values()), len(c)
        ci = proportion(k, n)
        out[m] = {"n": n, "correct": k, "accuracy": round(k / n, 4) if n else None,
                  "ci": [round(ci.low, 4), round(ci.high, 4)]}
    return out, correct


def training_files(out: Path, spec: Any, student_spec: Any, texts: list[dict], data_rows: list[dict],
                   gold_labels: list[str], *, chat_path: Path, where: str = "") -> tuple[Path, Path]:
    """The two training files (chat JSONL, one row per text the teacher labelled, in the same order): the
    teacher's labels and the gold labels, each text rendered by the students' PromptSpec, so the two files
    differ only in the answers. When the students use the teacher's prompt (the default), the teacher's file
    is generate's ``chat.jsonl`` itself (checked to match the gold rendering token for token); otherwise the
    teacher's labels from ``data.jsonl`` are rendered into ``out/teacher.jsonl``. Returns (teacher, gold)."""
    from tunelab.generate.pipelines import spec_label_field, target_text

    labels = list(spec.labels or [])
    if list(student_spec.labels or []) != labels:
        raise ConfigError(f"the student prompt's labels {student_spec.labels} differ from the teacher prompt's "
                          f"{labels}", where=where)
    lf, slf = spec_label_field(spec), spec_label_field(student_spec)
    text_by_id = {str(t["id"]): t for t in texts}
    ids = [str(r["id"]) for r in data_rows]

    def chat_row(i: str, label: str) -> list[dict[str, str]]:
        item = {**text_by_id[i], slf: label}
        msgs = [{"role": m["role"], "content": m["content"]} for m in student_spec.render(item)]
        return msgs + [{"role": "assistant", "content": target_text(student_spec, item, label, slf)}]

    gold_rows = [{"messages": chat_row(i, g), "id": i} for i, g in zip(ids, gold_labels)]
    if student_spec.content_hash() == spec.content_hash():
        teacher_path = chat_path
        chat_rows = read_records(chat_path)
        if len(chat_rows) != len(gold_rows):
            raise DataError(f"{len(chat_rows)} chat rows for {len(gold_rows)} labelled texts", where=str(chat_path))
        for i, crow, grow in zip(ids, chat_rows, gold_rows):
            if [{"role": m["role"], "content": m["content"]} for m in crow["messages"][:-1]] != grow["messages"][:-1]:
                raise DataError(f"item {i}: the teacher's chat row and the gold rendering differ before the answer",
                                where=str(chat_path))
    else:
        teacher_path = out / "teacher.jsonl"
        write_jsonl(teacher_path, [{"messages": chat_row(i, str(r[lf])), "id": i, "provenance": r.get("provenance")}
                                   for i, r in zip(ids, data_rows)])
    gold_path = out / "gold.jsonl"
    write_jsonl(gold_path, gold_rows)
    return teacher_path, gold_path


# ------------------------------------------------------------------------------------------------------
# the whole comparison
# ------------------------------------------------------------------------------------------------------
def run_teacher_vs_gold(opts: CompareOptions, log: Log = print) -> dict[str, Any]:
    """Run every step; returns the summary (also written to ``out/summary.json``)."""
    from tunelab.generate.client import redact_url
    from tunelab.generate.pipelines import spec_label_field
    from tunelab.prompts import load_prompt_spec

    t_start = time.perf_counter()
    opts = dataclasses.replace(opts, out=Path(opts.out).resolve(), dev_data=Path(opts.dev_data).resolve())
    config_path = Path(opts.label_config).resolve()
    if not config_path.is_file():
        raise ConfigError(f"no such file: {config_path}")
    raw = _load_label_config(config_path)
    prompt = _abs(config_path.parent, raw["prompt"])
    spec = load_prompt_spec(prompt)
    labels = list(spec.labels or [])
    student_prompt = Path(opts.student_prompt).resolve() if opts.student_prompt else prompt
    student_spec = load_prompt_spec(student_prompt) if student_prompt != prompt else spec
    train_path = Path(opts.train_data).resolve() if opts.train_data else _abs(config_path.parent, raw["data"]["path"])
    for p in (train_path, opts.dev_data):
        if not p.is_file():
            raise DataError(f"no such file: {p}")
    opts.out.mkdir(parents=True, exist_ok=True)

    # 1. The texts, without their labels: the teacher cannot see the gold answer.
    items = read_records(train_path, limit=opts.n)
    if len(items) < opts.n:
        log(f"note: {train_path.name} has only {len(items)} items (asked for {opts.n})")
    lf = spec_label_field(spec)
    gold_by_id: dict[str, dict] = {}
    texts = []
    for k, it in enumerate(items):
        iid = str(it.get("id", f"line{it.get('_line', k + 1)}"))
        if iid in gold_by_id:
            raise DataError(f"duplicate id {iid!r}", where=f"{train_path}:{it.get('_line')}")
        if not isinstance(it.get(opts.text_field), str):
            raise DataError(f"no text field {opts.text_field!r}", where=f"{train_path}:{it.get('_line')}")
        g = spec.gold(it)
        if g is None or (labels and g not in labels):
            raise DataError(f"gold label {g!r} is not one of {labels}", where=f"{train_path}:{it.get('_line')}")
        gold_by_id[iid] = {k2: v for k2, v in it.items() if not k2.startswith("_")}
        texts.append({"id": iid, opts.text_field: it[opts.text_field]})
    texts_path = opts.out / "texts.jsonl"
    write_jsonl(texts_path, texts)

    # 2. The teacher labels them (resumable: rerunning reuses the journal in out/teacher).
    t0 = time.perf_counter()
    gstats = label_with_teacher(opts, raw, config_path, texts_path, log)
    t_label = time.perf_counter() - t0
    if gstats.pending:
        why = gstats.stopped or "failed requests"
        raise DataError(f"{gstats.pending} texts still wait for the teacher ({why}); rerun the same command to "
                        "finish them", where=str(opts.out / "teacher"))
    tdir = opts.out / "teacher"
    data_rows = read_records(tdir / "data.jsonl")
    if not data_rows:
        raise DataError("the teacher gave no usable label", where=str(tdir / "stats.json"))

    # 3. Agreement with the hidden gold labels, on the texts the teacher labelled.
    ids = [str(r["id"]) for r in data_rows]
    gold_labels = [str(spec.gold(gold_by_id[i])) for i in ids]
    teacher_labels = [str(r[lf]) for r in data_rows]
    agree = agreement(gold_labels, teacher_labels, labels)
    log(f"teacher vs gold on {agree['n']} texts: accuracy {agree['accuracy']:.1%}, kappa {agree['kappa']:.3f}")

    # 4. The training files: the kept texts with the teacher's and with the gold labels, the same prompt messages.
    teacher_path, gold_path = training_files(opts.out, spec, student_spec, texts, data_rows, gold_labels,
                                             chat_path=tdir / "chat.jsonl", where=str(student_prompt))
    n_train = len(data_rows)

    # 5. Two students, one recipe.
    reports = {}
    t_train = {}
    adapters = {}
    for name, data in (("teacher-trained", teacher_path), ("gold-trained", gold_path)):
        log(f"train {name}: {n_train} examples from {data}")
        t0 = time.perf_counter()
        reports[name] = train_student(opts, data, student_prompt, opts.out / "train" / name.split("-")[0], log)
        t_train[name] = round(time.perf_counter() - t0, 1)
        adapters[name] = Path(reports[name]["artifact"])

    # 6. Base, teacher-trained and gold-trained on the same dev items.
    t0 = time.perf_counter()
    student = reports["teacher-trained"]["config"].get("model") or "bundled"
    accs, correct = evaluate_students(opts, student_prompt, student, adapters, log)
    t_eval = time.perf_counter() - t0
    paired = compare_students(correct, "teacher-trained", "gold-trained")

    rep0 = reports["teacher-trained"]
    summary = {
        "teacher": {"model": gstats.teacher.model, "endpoint": redact_url(gstats.teacher.endpoint),
                    "served_bundled_model": opts.base_url is None},
        "teacher_prompt": str(prompt), "teacher_prompt_hash": str(spec.content_hash()),
        "student_prompt": str(student_prompt), "student_prompt_hash": str(student_spec.content_hash()),
        "train_data": str(train_path), "n_requested": len(items), "n_labelled": len(data_rows),
        "teacher_dropped": gstats.dropped.to_json(), "teacher_requests": gstats.requests.to_json(),
        "teacher_cost_usd": gstats.cost_usd, "contamination": gstats.contamination,
        "agreement": agree,
        "recipe": {k: v for k, v in rep0["config"].items() if k in ("method", "model", "lora", "optim", "train")},
        "train": {name: {"examples": r["data"]["examples"], "tokens": r["data"]["tokens"],
                         "target_tokens": r["data"]["target_tokens"], "steps": r["steps"],
                         "loss_first": r["loss"]["first"], "loss_last": r["loss"]["last"],
                         "adapter": r["artifact"], "wall_s": t_train[name]} for name, r in reports.items()},
        "dev": {"path": str(opts.dev_data.resolve()), "n": accs["base"]["n"]},
        "eval": accs,
        "teacher_vs_gold_students": paired,
        "wall_s": {"label": round(t_label, 1), **{f"train_{k}": v for k, v in t_train.items()},
                   "eval": round(t_eval, 1), "total": round(time.perf_counter() - t_start, 1)},
        "outputs": {"texts": str(texts_path), "teacher": str(tdir), "teacher_train": str(teacher_path),
                    "gold_train": str(gold_path), "eval": str(opts.out / "eval"),
                    "summary": str(opts.out / "summary.json")},
    }
    from tunelab.results import write_json

    write_json(opts.out / "summary.json", summary)
    return summary


def format_table(s: dict[str, Any]) -> str:
    """A small plain-text (Markdown) table of a summary."""
    a = s["agreement"]
    lines = [f"teacher {s['teacher']['model']} on {s['n_labelled']} of {s['n_requested']} training texts: "
             f"agreement with gold {a['accuracy'] * 100:.1f}% [{a['accuracy_ci'][0] * 100:.1f}, "
             f"{a['accuracy_ci'][1] * 100:.1f}], Cohen's kappa {a['kappa']:.3f}",
             "confusion (rows gold, columns teacher): " + "; ".join(
                 f"{g}: " + ", ".join(f"{t} {a['confusion']['matrix'][i][j]}" for j, t in enumerate(a["confusion"]
                                                                                                   ["labels"]))
                 for i, g in enumerate(a["confusion"]["labels"])),
             "",
             f"| model (dev, n={s['dev']['n']}) | trained on | accuracy | 95% CI |",
             "|---|---|---|---|"]
    what = {"base": "-", "teacher-trained": f"{s['n_labelled']} teacher labels",
            "gold-trained": f"{s['n_labelled']} gold labels"}
    for name, e in s["eval"].items():
        lines.append(f"| {name} | {what.get(name, '')} | {e['accuracy'] * 100:.1f}% | "
                     f"[{e['ci'][0] * 100:.1f}, {e['ci'][1] * 100:.1f}] |")
    p = s["teacher_vs_gold_students"]
    lines += ["", f"teacher-trained - gold-trained: {p['diff'] * 100:+.1f} points, 95% CI "
                  f"[{p['diff_ci'][0] * 100:+.1f}, {p['diff_ci'][1] * 100:+.1f}]; McNemar exact p = "
                  f"{p['mcnemar_p']:.3g} ({p['a_right_b_wrong']} items only teacher-trained right, "
                  f"{p['a_wrong_b_right']} only gold-trained right)"]
    return "\n".join(lines)


__all__ = ["CompareOptions", "run_teacher_vs_gold", "agreement", "compare_students", "training_files",
           "format_table"]
