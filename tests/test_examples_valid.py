"""Every shipped example config loads and validates (paths resolve, prompt specs parse), so a typo in an
example cannot wait for a user to find it. Nothing here runs a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import EXAMPLES, read_jsonl
from tunelab.evaluate.runner import load_eval_config, load_variants
from tunelab.prompts.spec import load_prompt_spec
from tunelab.run.resolve import load_experiment
from tunelab.train.config import TrainConfig, load_train_config


EXPERIMENTS = sorted((EXAMPLES / "experiments").glob("*.yaml"))
TRAIN_CONFIGS = [p for p in sorted((EXAMPLES / "train").glob("*.yaml")) if "method" in p.read_text(encoding="utf-8")]
PROMPT_SPECS = sorted((EXAMPLES / "prompts").glob("*.yaml")) + sorted((EXAMPLES / "train").glob("sentiment_*.yaml"))
GENERATE_CONFIGS = [p for p in sorted((EXAMPLES / "generate").glob("*.yaml")) if not p.name.endswith(".prompt.yaml")]


def raw(path: Path) -> dict:
    """The YAML file as written."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def is_file(p: Path | str) -> bool:
    """An absolute path to a file that is there."""
    return Path(p).is_absolute() and Path(p).is_file()


def test_the_examples_are_there() -> None:
    """The tests below run over what the folders hold: a renamed or emptied folder must not leave them nothing."""
    assert {p.name for p in EXPERIMENTS} >= {"nsmc.yaml", "teacher_vs_gold.yaml", "gsm8k_cot.yaml"}
    assert len(TRAIN_CONFIGS) >= 4 and len(PROMPT_SPECS) >= 13 and len(GENERATE_CONFIGS) >= 3


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_resolve(path: Path) -> None:
    """Resolved as `tunelab run` resolves it before any stage: every prompt loaded from its file (or inline), the
    data files absolute and there, one checked train config per train entry on the experiment's model and seed."""
    exp = raw(path)
    r = load_experiment(path)
    assert r.name == exp["name"] and list(r.prompts) == list(exp["prompts"])
    tasks = set()
    for name, ref in r.prompts.items():
        inline = isinstance(exp["prompts"][name], dict)
        assert (ref.path is None) if inline else is_file(ref.path), (name, ref.path)
        assert ref.hash == ref.spec.content_hash() and len(ref.hash) == 64
        tasks.add(ref.spec.task)
        item = {f: f"<{f}>" for f in ref.spec.input_fields()}
        assert ref.spec.render_input(item) in ref.spec.render(item)[-1]["content"]
    assert len(tasks) == 1  # the prompts are compared on one output type
    assert is_file(r.eval_data) and (r.train_data is None or is_file(r.train_data))
    fields = set().union(*(ref.spec.input_fields() for ref in r.prompts.values()))
    for data in filter(None, (r.eval_data, r.train_data)):
        assert fields <= set(read_jsonl(data)[0]), (data, fields)
    assert [m.entry.name for m in r.methods] == [t["name"] for t in exp.get("train", [])]
    for plan, entry in zip(r.methods, exp.get("train", [])):
        cfg = TrainConfig.model_validate({**plan.base_data, "data": {**plan.base_data["data"], "prompt": "x.yaml"}})
        assert cfg.model == r.model and cfg.method == entry.get("method", "lora") and cfg.name == entry["name"]
        assert cfg.train.seed == entry.get("train", {}).get("seed", exp.get("seed", 0))
        assert plan.prompt == entry.get("prompt", next(iter(r.prompts)))
        assert plan.prompt_ref is r.prompts.get(plan.prompt)
    if "generate" in exp and isinstance(exp["generate"]["config"], str):
        assert is_file(r.generate_config) and r.generate_config.samefile(path.parent / exp["generate"]["config"])
    elif "generate" in exp:  # inline: checked as `tunelab generate` would (resolve.check_generate), paths there
        assert r.generate_config == exp["generate"]["config"]
        assert is_file(path.parent / exp["generate"]["config"]["data"]["path"])


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_train_configs_validate(path: Path) -> None:
    cfg = load_train_config(path)
    assert Path(cfg.data.path).exists(), cfg.data.path
    if cfg.data.prompt:
        load_prompt_spec(cfg.data.prompt)


@pytest.mark.parametrize("path", PROMPT_SPECS, ids=lambda p: p.name)
def test_shipped_prompt_specs_load(path: Path) -> None:
    """The output the file declares is the spec's (type, labels), and an item renders with its input last."""
    spec, output = load_prompt_spec(path), raw(path).get("output", {"type": "free"})
    assert spec.task == output["type"] and spec.labels == output.get("labels")
    item = {f: f"<{f}>" for f in spec.input_fields()}
    assert spec.input_fields() and spec.render_input(item) in spec.render(item)[-1]["content"]


def test_shipped_eval_config_loads() -> None:
    path = EXAMPLES / "eval_nsmc.yaml"
    cfg = load_eval_config(path)
    assert len(load_variants(cfg, path.parent)) == 4


@pytest.mark.parametrize("path", GENERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_generate_configs_validate(path: Path) -> None:
    """The config validates as written; its prompt spec loads and its inputs are there with the fields the prompt
    reads (self-instruct: its seed tasks)."""
    from tunelab.generate.config import load_generate_config

    cfg, written = load_generate_config(path), raw(path)
    assert (cfg.pipeline, cfg.teacher.model) == (written["pipeline"], written["teacher"]["model"])
    if cfg.pipeline == "self-instruct":
        assert read_jsonl(path.parent / cfg.self_instruct.seed_tasks)[0]["instruction"]
        return
    spec = load_prompt_spec(path.parent / cfg.prompt)
    first = read_jsonl(path.parent / cfg.data.path)[0]
    assert spec.input_fields() and set(spec.input_fields()) <= set(first), (spec.input_fields(), sorted(first))
