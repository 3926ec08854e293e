"""lora.init_adapter / --init-adapter: a LoRA run that starts from a saved adapter (continue it, or carry it to a
related task) instead of fresh A, B; the adapter's shape is the setting, a config that contradicts it is refused."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from helpers.cli import assert_clean_error, ok
from helpers.train import run_train


def base(tiny, data, out, *extra: str) -> list[str]:
    return ["--model", str(tiny), "--data", str(data), "--out", str(out), "--batch-size", "8",
            "--micro-batch-size", "4", "--set", "train.dtype=float32", *extra]


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_model_dir, chat_file):
    out = tmp_path_factory.mktemp("init") / "first"
    ok(run_train(*base(tiny_model_dir, chat_file, out, "--max-steps", "3", "--lr", "5e-3", "--lora-r", "4",
                       "--lora-alpha", "8", "--set", "lora.modules_to_save=[embed_tokens]")))
    return out


def tensors(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_training_starts_from_the_saved_adapter(tmp_path, tiny_model_dir, chat_file, first):
    a = tensors(first)
    assert any("embed_tokens" in k for k in a) and all(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    # near-zero lr: the continued adapter is the first one, embeddings included (a fresh one would have B = 0)
    out = tmp_path / "cont"
    p = ok(run_train(*base(tiny_model_dir, chat_file, out, "--max-steps", "1", "--lr", "1e-12",
                           "--init-adapter", str(first))))          # a train --out dir: its adapter/ is used
    assert "LoRA initialised from" in p.stderr and "r=4 alpha=8.0" in p.stderr
    b = tensors(out)
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["modules_to_save"]) == (4, 8, ["embed_tokens"])
    # and it trains on from there: the first loss is the trained adapter's, below the fresh start's
    fresh = json.loads((first / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    cont = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert cont < fresh


@pytest.mark.parametrize("extra, message", [
    (["--lora-r", "8"], "lora.init_adapter: lora.r is 8 but the adapter in"),
    (["--set", "lora.modules_to_save=null"], "lora.modules_to_save is None but the adapter in"),
    (["--method", "full"], "lora.init_adapter is for method lora"),
])
def test_a_contradicting_config_is_one_line_exit_2(tmp_path, tiny_model_dir, chat_file, first, extra,
                                                   message):
    assert_clean_error(run_train(*base(tiny_model_dir, chat_file, tmp_path / "x", "--init-adapter",
                                       str(first / "adapter"), *extra)), message)
    assert not (tmp_path / "x").exists()


def test_a_missing_adapter_is_one_line_exit_2(tmp_path, tiny_model_dir, chat_file):
    assert_clean_error(run_train(*base(tiny_model_dir, chat_file, tmp_path / "x", "--init-adapter",
                                       str(tmp_path / "nope"))),
                       "lora.init_adapter: cannot read", "adapter_config.json")
    assert not (tmp_path / "x").exists()


def test_an_adapter_of_another_base_model_is_one_line_exit_2(tmp_path, tiny_model_dir, chat_file):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))  # hidden 48, not 32
    get_peft_model(other, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).save_pretrained(
        str(tmp_path / "other"))
    p = run_train(*base(tiny_model_dir, chat_file, tmp_path / "x", "--max-steps", "1",
                        "--init-adapter", str(tmp_path / "other")))
    assert_clean_error(p, f"adapter {tmp_path / 'other'} does not fit the base model: size mismatch for",
                       last_line_only=True)  # after the run's preview
    assert not (tmp_path / "x").exists()


def test_an_adapter_of_a_same_shaped_other_base_trains_on_with_a_warning(tmp_path, tiny_adapter, tiny_model_dir,
                                                                        other_bases, chat_file):
    p = ok(run_train(*base(other_bases["weights"], chat_file, tmp_path / "x", "--max-steps", "1",
                           "--init-adapter", str(tiny_adapter))))
    assert f"warning: adapter {tiny_adapter} was trained on another base model, {tiny_model_dir}" in p.stderr
    assert "(other weights); applied anyway" in p.stderr
