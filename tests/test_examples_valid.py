"""Every shipped example config loads and validates (paths resolve, prompt specs parse), so a typo in an
example cannot wait for a user to find it. Nothing here runs a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import EXAMPLES
from tunelab.evaluate.runner import load_eval_config, load_variants
from tunelab.prompts.spec import load_prompt_spec
from tunelab.run.resolve import load_experiment
from tunelab.train.config import load_train_config


@pytest.mark.parametrize("path", sorted((EXAMPLES / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_resolve(path: Path) -> None:
    r = load_experiment(path)
    assert r is not None


@pytest.mark.parametrize("path", [p for p in sorted((EXAMPLES / "train").glob("*.yaml"))
                                  if "method" in p.read_text(encoding="utf-8")], ids=lambda p: p.name)
def test_shipped_train_configs_validate(path: Path) -> None:
    cfg = load_train_config(path)
    assert Path(cfg.data.path).exists(), cfg.data.path
    if cfg.data.prompt:
        load_prompt_spec(cfg.data.prompt)


@pytest.mark.parametrize("path", sorted((EXAMPLES / "prompts").glob("*.yaml"))
                         + [p for p in sorted((EXAMPLES / "train").glob("sentiment_*.yaml"))], ids=lambda p: p.name)
def test_shipped_prompt_specs_load(path: Path) -> None:
    assert load_prompt_spec(path).output is not None


def test_shipped_eval_config_loads() -> None:
    path = EXAMPLES / "eval_nsmc.yaml"
    cfg = load_eval_config(path)
    assert len(load_variants(cfg, path.parent)) == 4


@pytest.mark.parametrize("path", [p for p in sorted((EXAMPLES / "generate").glob("*.yaml"))
                                  if not p.name.endswith(".prompt.yaml")], ids=lambda p: p.name)
def test_shipped_generate_configs_validate(path: Path) -> None:
    from tunelab.generate.config import load_generate_config

    assert load_generate_config(path) is not None
