"""An adapter on the wrong base (tunelab.models.adapters): a trained adapter records its base; `tunelab eval --adapter`
refuses, with one line, an adapter whose shapes do not fit the base and one trained on a same-shaped other base; an
adapter folder given as the model says it is an adapter."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import EXAMPLES, write_jsonl
from helpers.cli import assert_clean_error, cli_env, ok, run_cli
from helpers.train import reviews

PROMPT = EXAMPLES / "train" / "sentiment_binary_short.yaml"


def run_eval(tmp_path, model, *extra):
    data = write_jsonl(tmp_path / "dev.jsonl", reviews(4))
    return run_cli("eval", "--prompt", PROMPT, "--data", data, "--model", model, "--out", tmp_path / "ev",
                   "--no-report", "--no-cache", *extra, env=cli_env(), timeout=240)


def test_a_trained_adapter_records_its_base_beside_the_plain_peft_files(tiny_adapter, tiny_model_dir):
    from tunelab.models.adapters import recorded_base

    ident = recorded_base(tiny_adapter)
    assert ident["path"] == str(tiny_model_dir) and ident["config"]["hidden_size"] == 32 and ident["weights"]
    peft_cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert not any("tunelab" in k or "identity" in k for k in peft_cfg)   # PEFT and vLLM read it as ever


def test_the_weights_fingerprint_is_the_bases_own(tmp_path, tiny_model_dir, other_bases):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.adapters import weights_fingerprint

    half = tmp_path / "bf16"   # the same base saved in bf16 is the same base
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).save_pretrained(str(half))
    assert weights_fingerprint(half) == weights_fingerprint(tiny_model_dir)
    assert weights_fingerprint(other_bases["weights"]) != weights_fingerprint(tiny_model_dir)


@pytest.mark.parametrize("kind, needle", [
    ("shape", "does not fit the base model: size mismatch for model.layers.0.mlp.down_proj.lora_A.weight: [4, 64] "
              "in the adapter, the base's model.layers.0.mlp.down_proj has weight [48, 96]"),
    ("weights", "was trained on another base model"),
])
def test_eval_refuses_an_adapter_of_another_base_with_one_line(tmp_path, tiny_adapter, tiny_model_dir, other_bases,
                                                              kind, needle):
    p = run_eval(tmp_path, other_bases[kind], "--adapter", tiny_adapter)
    line = assert_clean_error(p, needle, f"adapter {tiny_adapter}")
    assert str(tiny_model_dir) in line and "--model" in line
    assert not (tmp_path / "ev" / "results.jsonl").exists()


def test_the_same_base_elsewhere_takes_the_adapter_and_another_one_only_when_allowed(tmp_path, tiny_adapter,
                                                                                     tiny_model_dir, other_bases,
                                                                                     capsys):
    from tunelab.errors import ModelError
    from tunelab.models.local import LocalModel

    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved-base")
    LocalModel(str(moved), adapter=tiny_adapter, dtype="float32")     # same config and weights: the same base
    with pytest.raises(ModelError, match=r"was trained on another base model, .*, not .* \(other weights\); give its "
                                         "base as --model, or --allow-other-base to apply it anyway"):
        LocalModel(str(other_bases["weights"]), adapter=tiny_adapter, dtype="float32")
    lm = LocalModel(str(other_bases["weights"]), adapter=tiny_adapter, dtype="float32", allow_other_base=True)
    assert lm.adapter_path == tiny_adapter
    assert "(other weights); applied anyway" in capsys.readouterr().err


def test_an_adapter_without_a_recorded_base_gets_the_shape_check_only(tmp_path, tiny_adapter, other_bases):
    from tunelab.errors import ModelError
    from tunelab.models.local import LocalModel

    old = shutil.copytree(tiny_adapter, tmp_path / "old-adapter")
    (old / "tunelab_train.json").unlink()                              # as PEFT itself writes an adapter
    LocalModel(str(other_bases["weights"]), adapter=old, dtype="float32")
    with pytest.raises(ModelError, match="does not fit the base model: size mismatch"):
        LocalModel(str(other_bases["shape"]), adapter=old, dtype="float32")


@pytest.mark.parametrize("which", ["adapter", "run"])
def test_an_adapter_given_as_the_model_says_it_is_one(tmp_path, tiny_adapter, tiny_model_dir, which):
    folder = tiny_adapter if which == "adapter" else tiny_adapter.parent   # a train --out dir holds adapter/
    assert_clean_error(run_eval(tmp_path, folder),
                       f"{folder} is a LoRA adapter, not a base model: give it as --adapter {folder}, with its base "
                       f"as --model ({tiny_model_dir})")


def test_the_adapter_on_its_own_base_still_evaluates(tmp_path, tiny_adapter, tiny_model_dir):
    ok(run_eval(tmp_path, tiny_model_dir, "--adapter", tiny_adapter))
    assert (tmp_path / "ev" / "results.jsonl").is_file()


def test_eval_allow_other_base_applies_it_with_a_warning(tmp_path, tiny_adapter, other_bases):
    p = ok(run_eval(tmp_path, other_bases["weights"], "--adapter", tiny_adapter, "--allow-other-base"))
    assert "(other weights); applied anyway" in p.stderr
    assert (tmp_path / "ev" / "results.jsonl").is_file()
