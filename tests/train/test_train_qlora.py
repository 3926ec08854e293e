"""QLoRA (`lora.quantize: nf4 | int8`, bitsandbytes' CPU backend): the base's Linear weights really are quantised
(and counted), a tiny model trains on it, resumes, leaves a plain PEFT adapter for the fp32 base, and merges into
the dequantised base with the greedy + logit check; eval loads the adapter on that dequantised base as well."""

from __future__ import annotations

import json
import math

import pytest

from helpers import read_jsonl
from helpers.cli import assert_clean_error, ok, run_cli, tunelab_cmd
from helpers.processes import sigkill_when
from helpers.train import checkpointed, common, losses, run_train, tiny_base, train_env

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tinyq(tmp_path_factory):
    """The tiny random Llama at hidden 128: every Linear a whole number of NF4 blocks of 64, and large enough that
    the per-weight code books of double quantisation (1 KiB each) do not dominate its bytes."""
    return tiny_base(tmp_path_factory.mktemp("tinyq") / "base", hidden=128)


@pytest.mark.parametrize("quantize,max_ratio", [("nf4", 0.3), ("int8", 0.55)])
def test_base_linears_are_quantised_and_counted(tinyq, quantize, max_ratio):
    import torch

    from tunelab.models.quantize import base_linear_bytes, load_quantized, logical_numel

    model = load_quantized(tinyq, quantize, "cpu")
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(linears) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    want = torch.uint8 if quantize == "nf4" else torch.int8
    assert all(m.weight.dtype == want for m in linears)
    # The weights they stand for, at 4 or 8 bits each (the data alone, before scales).
    numel = sum(logical_numel(m.weight) for m in linears)
    data = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    assert data == numel // 2 if quantize == "nf4" else data == numel
    b = base_linear_bytes(model)
    assert b["linears"] == b["quantized"] == 14 and b["bf16_bytes"] == 2 * numel
    assert data < b["bytes"] <= max_ratio * b["bf16_bytes"], b  # the scales are counted, and still small
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_eval_forward_keeps_the_training_layout(tinyq):
    """On an AVX512-BF16 CPU a 4-bit Linear run in eval mode without gradients repacks its weight for inference;
    after that a training forward takes the inference kernel. Loaded by tunelab it does not."""
    import torch

    from tunelab.models.quantize import load_quantized

    model = load_quantized(tinyq, "nf4", "cpu")
    lin = model.model.layers[0].mlp.up_proj
    before = lin.weight.data.clone()
    x = torch.randn(3, 128)
    model.eval()
    with torch.no_grad():
        y0 = lin(x)
    assert not getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(lin.weight.data, before)
    model.train()
    xg = x.clone().requires_grad_(True)
    y1 = lin(xg)
    y1.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    torch.testing.assert_close(y0, y1.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_trains_on_the_quantised_base_and_saves_a_plain_peft_adapter(tmp_path, tinyq, chat_file, quantize):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / quantize
    p = ok(run_train(*common(tinyq, chat_file, out, "--max-steps", "4", "--quantize", quantize,
                             "--forgetting", str(chat_file))))
    assert f"base quantised ({quantize}, bitsandbytes): 14 of 14 Linear weights" in p.stderr
    loss = losses(out)
    assert len(loss) == 4 and all(math.isfinite(v) for v in loss) and loss[-1] < loss[0] - 0.05, loss
    rep = json.loads((out / "report.json").read_text())
    assert rep["forgetting"]["perplexity_after"] != rep["forgetting"]["perplexity_before"]
    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "quantiz" not in json.dumps(cfg)
    assert json.loads((adapter / "tunelab_train.json").read_text())["config"]["lora"]["quantize"] == quantize
    # Plain PEFT on the fp32 base: every tensor loads (no key left out, none unexpected) and moves the outputs.
    base = AutoModelForCausalLM.from_pretrained(str(tinyq), dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        plain = base(ids).logits
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert len(saved) == 2 * 14
    with torch.no_grad():
        tuned = model(ids).logits
    assert torch.isfinite(tuned).all() and not torch.allclose(tuned, plain)


def test_sigkill_then_resume_continues_the_same_loss_curve(tmp_path, tinyq, chat_file):
    args = ["--max-steps", "6", "--checkpoint-every", "2", "--quantize", "nf4", "--set", "train.seed=3"]
    ref = tmp_path / "ref"
    ok(run_train(*common(tinyq, chat_file, ref, *args)))
    out = tmp_path / "killed"
    env = {**train_env(), "TUNELAB_TRAIN_STEP_SLEEP": "0.5"}
    sigkill_when(tunelab_cmd("train", *common(tinyq, chat_file, out, *args)),
                 checkpointed(out / "checkpoints" / "latest", 2), env=env, timeout=180)
    assert not (out / "adapter").exists()
    p = ok(run_train(*common(tinyq, chat_file, out, *args), "--resume"))
    assert "resumed from step-0000" in p.stderr
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 7))
    assert losses(out) == pytest.approx(losses(ref), rel=2e-3, abs=1e-4)
    # A resume that reloads the base other than quantised is another config: refused.
    bad = run_train(*common(tinyq, chat_file, out, *args[:-4], "--set", "train.seed=3"), "--resume")
    assert_clean_error(bad, "holds a run with another config", "lora.quantize")


# int8 is left out: LLM.int8 also quantises each matmul's input rows, which the merged fp32 model does not, so on the
# near-ties of a random tiny model the greedy check can (and does) fail (docs/train.md, "QLoRA").
@pytest.mark.parametrize("quantize", ["nf4"])
def test_merge_folds_a_qlora_adapter_into_the_dequantised_base(tmp_path, tinyq, chat_file, quantize):
    import torch
    from safetensors.torch import load_file

    from tunelab.train.merge import LOGIT_TOLERANCE
    from tunelab.models.quantize import dequantized_weight, load_quantized

    out = tmp_path / "run"
    ok(run_train(*common(tinyq, chat_file, out, "--max-steps", "3", "--lr", "5e-2", "--quantize", quantize)))
    merged = tmp_path / "merged"
    m = ok(run_cli("merge", out, "--out", merged, "--max-new-tokens", "8", env=train_env(), timeout=240))
    assert "merge check passed" in m.stderr and f"dequantised from {quantize}" in m.stderr
    check = json.loads((merged / "merge_check.json").read_text())
    assert check["identical"] and check["quantize"] == quantize
    assert check["max_logit_diff_rel"] <= LOGIT_TOLERANCE[quantize] == check["logit_tolerance_rel"]
    # The merged weights are the dequantised base's plus the LoRA update, not the fp32 base's.
    w = load_file(str(merged / "model.safetensors"))
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg and all(v.dtype == torch.float32 for v in w.values())
    q = load_quantized(tinyq, quantize, "cpu").model.layers[0].mlp.up_proj
    deq = dequantized_weight(q)
    fp32 = load_file(str(tinyq / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    got = w["model.layers.0.mlp.up_proj.weight"]
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    key = next(k for k in a if "layers.0.mlp.up_proj.lora_A" in k)
    lora_a, lora_b = a[key], a[key.replace("lora_A", "lora_B")]
    scale = json.loads((out / "adapter" / "adapter_config.json").read_text())
    delta = (lora_b @ lora_a) * (scale["lora_alpha"] / scale["r"])
    assert delta.abs().max() > 0
    torch.testing.assert_close(got, deq + delta, rtol=0, atol=1e-6)
    assert not torch.allclose(got, fp32 + delta, atol=1e-4)

    # eval/serve of the adapter itself (LocalModel, as `tunelab eval --adapter` and the before/after eval load it)
    # put it on that dequantised base too: the merged model's logits, not the fp32 base's.
    from transformers import AutoModelForCausalLM

    from tunelab.models.local import LocalModel

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    local = LocalModel(str(tinyq), adapter=out / "adapter", dtype="float32")
    assert local.dequantized == quantize and f"dequantized-{quantize}" in local.identity
    with torch.no_grad():
        got_logits = local.model(ids).logits
        want = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got_logits, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    plain = LocalModel(str(merged), dtype="float32")
    assert plain.dequantized == "none" and plain.identity != local.identity


def test_bad_quantize_value_and_method_are_one_line(tmp_path, tinyq, chat_file):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"model: {tinyq}\ndata: {{path: {chat_file}}}\nlora: {{quantize: nf5}}\n")
    assert_clean_error(run_train(str(cfg), "--out", str(tmp_path / "o")), "lora.quantize", "'none', 'nf4' or 'int8'")
    assert_clean_error(run_train(*common(tinyq, chat_file, tmp_path / "o2", "--quantize", "nf5")), "lora.quantize")
    assert_clean_error(run_train(*common(tinyq, chat_file, tmp_path / "o3", "--method", "full",
                                        "--quantize", "nf4")), "lora.quantize is for method lora")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o3").exists()
