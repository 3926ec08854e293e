"""Resolve a validated experiment: absolute paths, loaded prompt specs, and one checked train config per
method, so that every input error surfaces before the first stage runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tunelab.config import describe_validation_error, load_yaml
from tunelab.errors import ConfigError, TunelabError
from tunelab.run.config import (TRAIN_SECTIONS, Experiment, MethodPlan, PromptRef, ResolvedExperiment, config_error,
                                read_experiment, where)


def _abs(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


def model_spec(exp: Experiment, base: Path) -> str:
    """'bundled' stays a name; a relative model path is made absolute against the experiment file."""
    m = exp.model
    if m.lower() in ("bundled", "default", "smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        return "bundled"
    q = _abs(base, m)
    return str(q) if q.exists() else m


def _prompt(name: str, value: str | dict, path: Path, base: Path) -> PromptRef:
    from tunelab.prompts import load_prompt_spec, spec_from_dict

    if isinstance(value, str):
        f = _abs(base, value)
        if not f.is_file():
            raise config_error(path, ("prompts", name), f"no such file: {f}")
        spec = load_prompt_spec(f)
        return PromptRef(name, spec, f, spec.content_hash())
    spec = spec_from_dict(value, base_dir=base, source=f"{where(path, 'prompts', name)}: prompts.{name}")
    return PromptRef(name, spec, None, spec.content_hash())


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def train_dict(r: ResolvedExperiment, plan: MethodPlan, limit: int | None = None) -> dict[str, Any]:
    """The method's train config as a dict: its config file (if any), the experiment's overrides, the
    experiment's model and seed; data.path, data.prompt and out are filled in by the train stage."""
    from tunelab.train.config import load_train_config

    m, path, base = plan.entry, r.where_path, r.base_dir
    loc = ("train", plan.index)
    data: dict[str, Any] = {}
    if m.config is not None:
        cfg_path = _abs(base, m.config)
        if not cfg_path.is_file():
            raise config_error(path, (*loc, "config"), f"no such file: {cfg_path}")
        try:
            data = load_train_config(cfg_path).model_dump(mode="json")
        except TunelabError as e:
            raise ConfigError(f"train.{plan.index}.config: {e}", where=where(path, *loc, "config")) from None
    data.pop("eval", None)  # before/after is the eval_after stage's job (on the same items as the prompts)
    data["eval"] = None
    for sec in TRAIN_SECTIONS:
        extra = getattr(m, sec)
        if extra is None:
            continue
        if sec == "forgetting" and isinstance(extra.get("data"), str):
            extra = {**extra, "data": str(_abs(base, extra["data"]))}
        data[sec] = deep_merge(data.get(sec) or {}, extra)
    data["method"] = m.method or data.get("method") or "lora"
    data["model"] = r.model
    data["name"] = m.name
    d = dict(data.get("data") or {})
    d.setdefault("path", "<set by the train stage>")
    if data["method"] == "pretrain":  # raw text: the records' text field, no PromptSpec
        d["format"] = "text"
        d.pop("prompt", None)
    else:
        d["format"] = "prompt"
        d["prompt"] = "<set by the train stage>"
    if m.limit is not None:
        d["limit"] = m.limit
    elif r.exp.data.train_limit is not None and m.data == "gold" and m.items == "all":  # (generated: its items)
        d["limit"] = r.exp.data.train_limit
    if limit is not None:
        d["limit"] = min(limit, d.get("limit") or limit)
    if m.max_seq_len is not None:
        d["max_seq_len"] = m.max_seq_len
    data["data"] = d
    t = dict(data.get("train") or {})
    if not (m.train and "seed" in m.train):
        t["seed"] = r.exp.seed
    if limit is not None:  # a smoke run: the batch must fit the few examples
        bs = min(int(t.get("batch_size", 16)), limit)
        t["batch_size"] = bs
        if t.get("micro_batch_size", 8) not in ("auto", None):  # auto: a token budget, any batch size fits
            t["micro_batch_size"] = _largest_divisor_at_most(bs, int(t.get("micro_batch_size", 8)))
    data["train"] = t
    data["out"] = "<set by the train stage>"
    return data


def check_train_dict(r: ResolvedExperiment, plan: MethodPlan, data: dict[str, Any]):
    """Validate as a TrainConfig; an error names the experiment file, the line and the field."""
    from tunelab.train.config import TrainConfig

    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        dotted, msg = describe_validation_error(e, TrainConfig)
        loc = tuple(int(x) if x.isdigit() else x for x in dotted.split(".")) if dotted else ()
        field = ".".join(["train", str(plan.index), *map(str, loc)])
        raise ConfigError(f"{field}: {msg}", where=where(r.where_path, "train", plan.index, *loc)) from None


def resolve(exp: Experiment, resolved: Path, *, limit: int | None = None, shown: Path | None = None
            ) -> ResolvedExperiment:
    base = resolved.parent
    path = shown or resolved  # errors name the file as the user did
    prompts = {name: _prompt(name, v, path, base) for name, v in exp.prompts.items()}
    tasks = {p.spec.task for p in prompts.values()}
    if len(tasks) > 1:
        raise config_error(path, ("prompts",), f"the prompts must share one output type to be compared, got "
                                               f"{sorted(tasks)}")
    eval_data = _abs(base, exp.data.eval)
    if not eval_data.is_file():
        raise config_error(path, ("data", "eval"), f"no such file: {eval_data}")
    train_data = None
    if exp.data.train is not None:
        train_data = _abs(base, exp.data.train)
        if not train_data.is_file():
            raise config_error(path, ("data", "train"), f"no such file: {train_data}")
    gen: Path | dict | None = None
    if exp.generate is not None:
        c = exp.generate.config
        if isinstance(c, str):
            gen = _abs(base, c)
            if not gen.is_file():
                raise config_error(path, ("generate", "config"), f"no such file: {gen}")
        else:
            gen = dict(c)
    r = ResolvedExperiment(exp, resolved, base, prompts, eval_data, train_data, generate_config=gen,
                           model=model_spec(exp, base), limit=limit, shown=shown)
    if exp.generate is not None:
        check_generate(r)
    for i, m in enumerate(exp.train):
        if m.data not in ("gold", "generated"):
            f = _abs(base, m.data)
            if not f.is_file():
                raise config_error(path, ("train", i, "data"), f"no such file: {f}")
        prompt = m.prompt or next(iter(prompts))
        ref = None
        if prompt in prompts:
            ref = prompts[prompt]
        elif prompt != "best":
            f = _abs(base, prompt)
            if not f.is_file():
                raise config_error(path, ("train", i, "prompt"), f"no such file: {f}")
            from tunelab.prompts import load_prompt_spec

            spec = load_prompt_spec(f)
            ref = PromptRef(f.stem, spec, f, spec.content_hash())
            prompt = "@" + str(f)
        if ref is not None and ref.spec.task != next(iter(tasks)):
            raise config_error(path, ("train", i, "prompt"), f"the train prompt's output type {ref.spec.task!r} "
                                                             f"differs from the prompts' {next(iter(tasks))!r}")
        plan = MethodPlan(m, i, {}, prompt, ref)
        plan.base_data = train_dict(r, plan, limit)
        method = plan.method = plan.base_data["method"]
        plan.scored = m.score if m.score is not None else method != "pretrain"
        if m.model not in ("base", "vocab"):
            src = next(p for p in r.methods if p.entry.name == m.model)
            if src.method == "lora":
                raise config_error(path, ("train", i, "model"), f"{m.model!r} is a LoRA method: its result is an "
                                                                "adapter, not a model to start from (merge it, or "
                                                                "start from a full or pretrain method)")
        check_train_dict(r, plan, {**plan.base_data, "data": {**plan.base_data["data"]}
                                   | ({} if method == "pretrain" else {"prompt": "x.yaml"})})
        r.methods.append(plan)
    for j, pair in enumerate(exp.eval_after.compare):
        for name in pair:
            if not next(p for p in r.methods if p.entry.name == name).scored:
                raise config_error(path, ("eval_after", "compare", j), f"{name!r} is not scored (score: false, or "
                                                                       "a pretrain method)")
    if exp.vocab is not None:
        r.vocab_data = _abs(base, exp.vocab.data)
        if not r.vocab_data.is_file():
            raise config_error(path, ("vocab", "data"), f"no such file: {r.vocab_data}")
    return r


def load_experiment(path: str | Path, *, limit: int | None = None) -> ResolvedExperiment:
    """Load, validate and resolve an experiment file (paths, prompt specs, train configs): every input error
    is raised here, before anything runs."""
    p = Path(path)
    return resolve(read_experiment(p), p.resolve(), limit=limit, shown=p)


def check_generate(r: ResolvedExperiment) -> None:
    """The generate config is checked as `tunelab generate` would, before anything runs; ``inputs: train`` needs a
    label pipeline whose prompt reads fields the training items have."""
    from tunelab.generate.config import GenerateConfig, load_generate_config

    g = r.exp.generate
    assert g is not None
    if isinstance(r.generate_config, Path):
        cfg = load_generate_config(r.generate_config)
    else:
        raw = load_generate_dict(r)
        if g.inputs == "train":
            raw["data"] = {"path": str(r.train_data)}
        try:
            cfg = GenerateConfig.model_validate(raw)
        except ValidationError as e:
            dotted, msg = describe_validation_error(e, GenerateConfig)
            raise config_error(r.where_path, ("generate", "config"), f"{dotted}: {msg}" if dotted else msg) from None
    if not g.serve and cfg.budget.max_cost_usd is not None:
        from tunelab.generate.runner import price_for

        if price_for(cfg) is None:
            raise config_error(r.where_path, ("generate", "config"), f"budget.max_cost_usd needs a price for "
                                                                     f"{cfg.teacher.model}: set teacher.price in the "
                                                                     "generate config")
    if g.inputs == "train" and cfg.pipeline != "label":
        raise config_error(r.where_path, ("generate", "inputs"), f"'train' has the teacher label the training texts: "
                                                                 f"it needs a label pipeline, not {cfg.pipeline!r}")


def load_generate_dict(r: ResolvedExperiment) -> dict[str, Any]:
    """The generate config as a dict with absolute paths (written to OUT/configs/generate.yaml)."""
    g = r.generate_config
    if isinstance(g, Path):
        raw = load_yaml(g)
        base = g.parent
        if not isinstance(raw, dict):
            raise ConfigError("expected a mapping of fields (pipeline, teacher, ...)", where=str(g))
    else:
        raw, base = dict(g or {}), r.base_dir
    raw = copy.deepcopy(raw)
    for keys in (("prompt",), ("data", "path"), ("teacher", "api_key_file"), ("self_instruct", "seed_tasks"),
                 ("contamination", "eval_path"), ("quality", "json_schema")):
        cur = raw
        for k in keys[:-1]:
            cur = cur.get(k) if isinstance(cur, dict) else None
        if isinstance(cur, dict) and isinstance(cur.get(keys[-1]), str):
            v = cur[keys[-1]]
            if keys[-1] != "json_schema" or v.endswith(".json"):
                cur[keys[-1]] = str(_abs(base, v))
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("exclude"), list):
        data["exclude"] = [str(_abs(base, v)) if isinstance(v, str) else v for v in data["exclude"]]
    raw.setdefault("output", {})
    if isinstance(raw["output"], dict):
        raw["output"].pop("dir", None)
    return raw
