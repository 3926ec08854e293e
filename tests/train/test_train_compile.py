"""The GPU path's parts that run on a CPU: micro-batches sized in tokens (``micro_batch_size: auto``), packed rows
padded to a bucket (what compiled layers see), flex attention's forward against varlen, ``train.compile`` against
eager (LoRA and full, varlen and mask, activation checkpointing), and the settings a machine cannot run, refused
with one line."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from helpers import write_jsonl, write_yaml
from helpers.cli import assert_clean_error, ok
from helpers.train import chat_rows, random_examples, run_train, train_env
from tunelab.train.collate import collate
from tunelab.train.data import Example
from tunelab.train.loss import SupervisedLoss, batch_loss, batch_nll


def _curve(tmp_path, tiny_model_dir, data, name: str, method: str = "lora", **train) -> list[float]:
    """The losses of a 3-step in-process run (fp32, so that only the order of the sums differs)."""
    from tunelab.train.config import TrainConfig
    from tunelab.train.loop import fit
    from tunelab.train.lora import attach_lora
    from tunelab.train.modeling import load_base_model
    from tunelab.train.session import start_session

    cfg = TrainConfig.model_validate({
        "method": method, "model": str(tiny_model_dir), "out": str(tmp_path / name), "data": {"path": str(data)},
        "optim": {"lr": 1e-2}, "lora": {"r": 4},
        "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 4, "pack_len": 256, "dtype": "float32",
                  "compile": False, **train}})
    run = start_session(cfg, log=lambda s: None)
    model = load_base_model(run)
    if method == "lora":
        model = attach_lora(model, cfg.lora, run)
    return [h["loss"] for h in fit(run, model).history]


def test_micro_batches_auto_fill_the_token_budget():
    from tunelab.train.schedule import micro_batches

    exs = [Example([1] * n, [False] + [True] * (n - 1)) for n in (100, 900, 50, 60, 700, 80, 40, 30)]
    idx = list(range(8))
    auto = micro_batches(exs, idx, 0, 1, "auto", 1000)
    assert all(sum(map(len, m)) <= 1000 for m in auto)
    assert sorted(map(id, (e for m in auto for e in m))) == sorted(map(id, exs))   # every example once
    assert len(auto) == 2                               # 1,960 tokens in budgets of 1,000: the fewest possible
    assert len(micro_batches(exs, idx, 0, 1, 8, 1000)) == 2 and len(micro_batches(exs, idx, 0, 1, 2, 1000)) == 4
    r0, r1 = (micro_batches(exs, idx, r, 2, "auto", 300) for r in (0, 1))
    assert len(r0) == len(r1)                           # DDP: the same number of backward passes
    assert sorted(map(id, (e for m in r0 for e in m))) == sorted(map(id, exs[0::2]))
    long = [Example([1] * 50, [False] + [True] * 49)] * 4
    assert [len(m) for m in micro_batches(long, list(range(4)), 0, 1, "auto", 120)] == [2, 2]


def test_token_budget_micro_batches_give_the_same_loss_curve(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    by_examples = _curve(tmp_path, tiny_model_dir, data, "ex")
    by_tokens = _curve(tmp_path, tiny_model_dir, data, "tok", micro_batch_size="auto", micro_batch_tokens=200)
    one = _curve(tmp_path, tiny_model_dir, data, "one", micro_batch_size=None, micro_batch_tokens=100_000)
    assert by_tokens == pytest.approx(by_examples, rel=1e-5) and one == pytest.approx(by_examples, rel=1e-5)


@pytest.mark.parametrize("varlen", [True, False])
def test_rows_padded_to_a_bucket_give_the_same_loss_and_gradients(tiny_llama, varlen):
    from tunelab.train.attention import use_varlen_attention

    model = copy.deepcopy(tiny_llama).train()
    if varlen:
        assert use_varlen_attention(model)
    exs = random_examples([5, 17, 9, 30, 3, 12, 2])
    lm = SupervisedLoss(model)
    out = []
    for pad_to in (None, 64):
        batch = collate(exs, packing=True, pack_len=40, varlen=varlen, pad_to=pad_to)
        assert batch.shape[1] % (pad_to or 1) == 0 and batch.n_tokens == sum(map(len, exs))
        model.zero_grad()
        loss = batch_loss(lm, batch)
        loss.backward()
        out.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, rtol=1e-5, atol=1e-7)


def _family_model(name: str):
    import transformers

    torch.manual_seed(0)
    tiny = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny))
    if name == "gemma2":  # soft-capped scores, every other layer a sliding window of 8
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **tiny, head_dim=8, query_pre_attn_scalar=8, sliding_window=8, attn_logit_softcapping=1.0,
            final_logit_softcapping=2.0))
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **tiny, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"]))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_flex_attention_forward_equals_varlen(family):
    """torch's flex attention has no backward on a CPU: its training path is CUDA's; here its loss (forward,
    eager) on one packed row padded to 128 tokens must equal varlen's, sliding windows and soft-capping kept."""
    from tunelab.train.attention import use_flex_attention, use_varlen_attention

    flex, varlen = _family_model(family), _family_model(family)
    assert use_flex_attention(flex) and use_varlen_attention(varlen)
    exs = random_examples([5, 17, 9, 30, 3, 12, 2, 40])
    with torch.no_grad():
        a = batch_nll(SupervisedLoss(varlen), collate(exs, varlen=True))
        b = batch_nll(SupervisedLoss(flex), collate(exs, varlen=True, pad_to=128))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_flex_on_a_model_without_pluggable_attention_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    from tunelab.errors import ConfigError
    from tunelab.train import modeling
    from tunelab.train.config import TrainConfig
    from tunelab.train.session import start_session

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    cfg = TrainConfig.model_validate({"model": str(tiny_model_dir), "out": str(tmp_path / "o"),
                                      "data": {"path": str(data)}, "train": {"batch_size": 8}})
    run = start_session(cfg, log=lambda s: None)
    run.attention = "flex"  # as CUDA would resolve it
    monkeypatch.setattr(modeling, "use_flex_attention", lambda model: False)
    with pytest.raises(ConfigError, match="does not take a pluggable attention function"):
        modeling.load_base_model(run)


def test_compiled_layers_give_the_eager_loss_curve(tmp_path, tiny_model_dir, monkeypatch):
    """train.compile true on a CPU (inductor, C++): LoRA with varlen and activation checkpointing, and full
    fine-tuning with the 4D mask, each equal to its eager run within rel 1e-4 (fp32; the compiled kernels sum in
    another order). Rows are padded to 512 tokens, so that each run compiles one shape."""
    from tunelab.train import compile as compile_mod

    monkeypatch.setattr(compile_mod, "ROW_MULTIPLE", 512)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    from torch._dynamo.utils import counters

    for method, attention, ac in (("lora", "varlen", True), ("full", "mask", False)):
        kw = dict(method=method, attention=attention, activation_checkpointing=ac)
        eager = _curve(tmp_path, tiny_model_dir, data, f"{method}-eager", **kw)
        graphs = counters["stats"]["unique_graphs"]
        compiled = _curve(tmp_path, tiny_model_dir, data, f"{method}-compiled", compile=True, **kw)
        made = counters["stats"]["unique_graphs"] - graphs
        print(method, attention, "graphs", made, "eager", eager, "compiled", compiled)
        assert 0 < made <= 12, made           # compiled, once: the layers share their graphs, one row shape
        assert compiled == pytest.approx(eager, rel=1e-4), (method, compiled, eager)


def test_dry_run_shows_the_attention_and_compile(tmp_path, tiny_model_dir, chat_file):
    import json

    p = ok(run_train("--model", str(tiny_model_dir), "--data", str(chat_file), "--out", str(tmp_path / "o"),
                     "--batch-size", "8", "--micro-batch-size", "auto", "--dry-run"))
    assert "attention varlen (train.attention auto), compile off (train.compile auto)" in p.stderr
    assert "micro-batches filled to 2048 tokens" in p.stderr
    out = json.loads(p.stdout)
    assert out["attention"] == "varlen" and out["compile"] is False


def test_settings_this_machine_cannot_run_exit_2(tmp_path, tiny_model_dir, chat_file):
    base = ["--model", str(tiny_model_dir), "--data", str(chat_file), "--out", str(tmp_path / "o"),
            "--batch-size", "8", "--dry-run"]
    assert_clean_error(run_train(*base, "--set", "train.attention=flex"),
                       "train.attention: train.attention flex trains on CUDA only")
    assert_clean_error(run_train(*base, "--set", "train.compile=sometimes"), "train.compile")
    assert_clean_error(run_train(*base, "--set", "train.micro_batch_size=auto", "--set",
                                 "train.micro_batch_tokens=null"), "micro_batch_size auto fills")
    # no C++ compiler on PATH (inductor looks for g++): compile true is refused, auto is off
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**train_env(), "PATH": str(bare)}
    assert_clean_error(run_train(*base, "--set", "train.compile=true", env=env),
                       "train.compile: train.compile is true but torch.compile on a CPU builds C++")
    cfg = write_yaml(tmp_path / "t.yaml", {"method": "lora", "model": str(tiny_model_dir),
                                           "data": {"path": str(chat_file)}, "train": {"compile": "auto"}})
    ok(run_train(str(cfg), "--batch-size", "8", "--out", str(tmp_path / "o2"), "--dry-run", env=env))
    assert not (tmp_path / "o").exists()
    assert os.environ.get("PATH")  # this process's PATH untouched


def test_a_lora_base_cast_before_peft_trains_fp32_masters_and_the_same_adapter(tiny_model_dir):
    """CUDA's LoRA load (tunelab.train.modeling): the frozen Linears cast to bf16 before PEFT wraps them (so an 8B
    base never sits on the GPU in fp32). Every trainable tensor comes out fp32 (LoRA A/B, a modules_to_save copy of
    Linear, kept out of the early cast), every weight is the one the usual order (PEFT first, then the cast)
    stores, but A is the usual A rounded to bf16 (PEFT initialises it in fp32, then gives it the base layer's
    dtype)."""
    from transformers import AutoModelForCausalLM

    from tunelab.train.config import LoraSettings
    from tunelab.train.lora import attach_lora
    from tunelab.train.precision import cast_frozen_linears

    settings = LoraSettings(r=4, modules_to_save=["gate_proj"], frozen_dtype="bfloat16")

    def lora(before: bool):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        if before:
            assert cast_frozen_linears(model, torch.bfloat16, before_lora=True, keep=["gate_proj"]) > 0
        torch.manual_seed(0)
        return dict(attach_lora(model, settings).named_parameters())

    usual, early = lora(False), lora(True)
    assert usual.keys() == early.keys()
    trained = [n for n, p in early.items() if p.requires_grad]
    assert any("gate_proj.modules_to_save" in n for n in trained) and any("lora_A" in n for n in trained)
    for n, p in early.items():
        assert p.dtype == usual[n].dtype, n
        assert p.dtype == (torch.float32 if p.requires_grad else usual[n].dtype), n
        want = usual[n].detach()
        if "lora_A" in n:
            want = want.to(torch.bfloat16).float()
        assert torch.equal(p.detach(), want), n
