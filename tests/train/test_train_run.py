"""`tunelab train` / `tunelab merge` end to end, as a user runs them (subprocesses, a tiny random Llama with
the bundled tokenizer): LoRA adapter dir, SIGKILL + --resume, 2-process accelerate, merge check, full and
pretrain outputs, bad input. One smoke test trains the bundled model on a handful of reviews."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import EXAMPLES, ROOT, read_jsonl, write_jsonl
from helpers.cli import assert_clean_error, ok, run_cli, tunelab_cmd
from helpers.pages import assert_self_contained, needs_chromium, screenshot
from helpers.processes import free_port, sigkill_when
from helpers.train import chat_rows, checkpointed, common, losses, reviews, run_train, train_env


def test_lora_quick_form_leaves_a_peft_adapter_and_a_report(tmp_path, tiny_model_dir, chat_file):
    out = tmp_path / "run"
    probe = EXAMPLES / "data" / "self_instruct_probe_64.jsonl"
    p = ok(run_train(*common(tiny_model_dir, chat_file, out, "--max-steps", "3", "--forgetting", str(probe))))
    first = reviews(1)[0]  # the preview: the first example with its supervised tokens marked
    assert f"{first['text']}<|im_end|>" in p.stderr and f"⟦{first['label']}<|im_end|>⟧" in p.stderr
    assert "end-of-turn '<|im_end|>' is supervised: ok" in p.stderr
    adapter = out / "adapter"
    for f in ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tunelab_train.json"):
        assert (adapter / f).is_file(), f
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # never pickles
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"] == 3 and rep["parameters"]["trainable"] > 0 and rep["tok_s"] > 0
    assert rep["peak_rss_gb"] > 0 and rep["mfu"]["flops_per_token"] > 0
    assert rep["forgetting"]["perplexity_before"] > 1 and "perplexity_after" in rep["forgetting"]
    assert (out / "report.html").read_text().count("<svg") == 1
    # Several adapters over one base: a second copy loaded beside the first answers as the first, not as the base.
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = model(ids).logits
        model.load_adapter(str(adapter), adapter_name="second")
        model.set_adapter("second")
        assert torch.equal(model(ids).logits, logits)
        with model.disable_adapter():
            assert not torch.allclose(model(ids).logits, logits)


def test_lora_with_trained_embeddings_saves_them_in_the_adapter(tmp_path, tiny_model_dir, chat_file):
    out = tmp_path / "emb"
    ok(run_train(*common(tiny_model_dir, chat_file, out, "--max-steps", "2",
                         "--set", "lora.modules_to_save=[embed_tokens]")))
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("embed_tokens" in k for k in keys), keys
    assert any("lora_A" in k for k in keys)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["embed_tokens"]


def test_dry_run_trains_nothing(tmp_path, tiny_model_dir, chat_file):
    out = tmp_path / "dry"
    p = ok(run_train(*common(tiny_model_dir, chat_file, out), "--dry-run"))
    summary = json.loads(p.stdout)
    assert summary["dry_run"] and summary["data"]["examples"] == 48 and summary["steps"] == 6
    assert summary["first_example"]["target_text"].endswith("<|im_end|>")
    assert "length mean" in p.stderr and not out.exists()


def test_dry_run_lists_mixed_in_files(tmp_path, tiny_model_dir, chat_file):
    items = write_jsonl(tmp_path / "items.jsonl", reviews(8))
    (tmp_path / "t.yaml").write_text(
        f"model: {tiny_model_dir}\ndata:\n  path: {chat_file}\n  mix:\n"
        f"    - {{path: items.jsonl, prompt: {EXAMPLES / 'train/sentiment_three_short.yaml'}}}\n"
        "train: {batch_size: 8, micro_batch_size: 4}\n", encoding="utf-8")
    p = ok(run_train(str(tmp_path / "t.yaml"), "--out", str(tmp_path / "o"), "--dry-run"))
    summary = json.loads(p.stdout)
    assert summary["data"]["examples"] == 56 and summary["steps"] == 7   # 48 + 8 examples, batch 8
    assert f"{chat_file} (chat) + {items.name} (prompt, 8), 56 examples" in p.stderr
    # a bad record in a mixed-in file: one line naming that file and line, exit 2, nothing written
    write_jsonl(items, reviews(2) + [{"text": "그냥 그래", "label": "Maybe"}])
    assert_clean_error(run_train(str(tmp_path / "t.yaml"), "--out", str(tmp_path / "o")),
                       f"{items}:3: label 'Maybe' is not in the label set")
    assert not (tmp_path / "o").exists()


def test_sigkill_then_resume_continues_the_same_loss_curve(tmp_path, tiny_model_dir, chat_file):
    args = ["--max-steps", "12", "--checkpoint-every", "3", "--set", "train.seed=7"]
    ref = tmp_path / "ref"
    p = ok(run_train(*common(tiny_model_dir, chat_file, ref, *args)))
    out = tmp_path / "killed"
    env = {**train_env(), "TUNELAB_TRAIN_STEP_SLEEP": "0.3"}
    sigkill_when(tunelab_cmd("train", *common(tiny_model_dir, chat_file, out, *args)),
                 checkpointed(out / "checkpoints" / "latest", 6), env=env, timeout=180)
    assert not (out / "adapter").exists()
    killed_at = len(losses(out))
    assert 6 <= killed_at < 12
    p = ok(run_train(*common(tiny_model_dir, chat_file, out, *args), "--resume"))
    assert "resumed from step-0000" in p.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"] == 12 and rep["resumed_from"] in (6, 9)
    got, want = losses(out), losses(ref)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 13))
    assert got == pytest.approx(want, rel=2e-3, abs=1e-4)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_weight_average_is_the_result_with_the_last_weights_beside_it_and_survives_resume(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    items = write_jsonl(tmp_path / "items.jsonl", reviews(24))
    out = tmp_path / "ema"
    args = ["--model", str(tiny_model_dir), "--prompt", str(EXAMPLES / "train/sentiment_binary_short.yaml"),
            "--data", str(items), "--out", str(out), "--batch-size", "4", "--micro-batch-size", "4", "--lr", "5e-3",
            "--lora-r", "4", "--max-steps", "6", "--checkpoint-every", "2", "--ema-decay", "0.5",
            "--eval-data", str(items), "--eval-limit", "8"]
    p = ok(run_train(*args))
    avg = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    last = load_file(str(out / "adapter-last" / "adapter_model.safetensors"))
    assert avg.keys() == last.keys() and any(not torch_equal(avg[k], last[k]) for k in avg)
    assert (out / "adapter-last" / "prompt_spec.yaml").is_file()   # a complete adapter dir: eval/serve take it
    rep = json.loads((out / "report.json").read_text())
    assert rep["ema_decay"] == 0.5 and rep["last_weights"] == str(out / "adapter-last")
    c = rep["eval"]["ema"]["trained"]
    assert c["n"] == 8 and c["b"] == rep["eval"]["variants"]["trained"]["b"]
    assert "weight average: ema_decay 0.5 (about the last 2 steps)" in p.stderr   # the preview
    assert "weight average (ema_decay 0.5) vs last weights" in p.stderr
    assert "against the last weights" in (out / "report.html").read_text()
    ck = load_file(str(out / "checkpoints" / "step-000004" / "weights.safetensors"))
    assert sum(k.startswith("ema::") for k in ck) == len(avg)
    # --resume from the step-4 checkpoint replays steps 5 and 6: the same average only if the checkpoint carried it
    p = ok(run_train(*args, "--resume"))
    assert "resumed from step-000004" in p.stderr and "no weight average" not in p.stderr
    again = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in avg:
        assert torch_close(again[k], avg[k]), k   # (without the restored average: off by ~3e-3 of max)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def torch_close(a, b) -> bool:
    import torch

    return bool(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6))


def test_two_process_accelerate_launch_matches_one_process(tmp_path, tiny_model_dir, chat_file):
    accelerate = Path(sys.executable).parent / "accelerate"
    out2 = tmp_path / "ddp"
    args = common(tiny_model_dir, chat_file, out2, "--max-steps", "3")
    # the shipped DDP config (examples/accelerate/ddp.yaml), 2 processes instead of its 4
    cmd = [str(accelerate), "launch", "--config_file", str(EXAMPLES / "accelerate" / "ddp.yaml"), "--num_processes",
           "2", "--main_process_port", str(free_port()), "-m", "tunelab.cli", "train", *args]
    ok(subprocess.run(cmd, capture_output=True, text=True, env=train_env(), cwd=ROOT, timeout=240))
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["processes"] == 2
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                              str(out2 / "adapter"))
    # One process with 2 micro-batches of 4 takes the same steps as 2 processes with one micro-batch each.
    out1 = tmp_path / "single"
    ok(run_train(*common(tiny_model_dir, chat_file, out1, "--max-steps", "3")))
    assert losses(out2) == pytest.approx(losses(out1), rel=2e-3)


def test_merge_writes_hf_dir_and_checks_greedy_equality(tmp_path, tiny_model_dir, chat_file):
    out = tmp_path / "run"
    ok(run_train(*common(tiny_model_dir, chat_file, out, "--max-steps", "4", "--lr", "5e-2")))
    merged = tmp_path / "merged"
    m = ok(run_cli("merge", out, "--out", merged, "--max-new-tokens", "8", env=train_env(), timeout=240))
    assert "merge check passed" in m.stderr
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    assert (merged / "chat_template.jinja").is_file() and not list(merged.glob("*.bin"))
    check = json.loads((merged / "merge_check.json").read_text())
    assert check["identical"] and check["probes"] >= 3
    # A merge that changed behaviour must fail loudly: merge into a different base than the adapter's.
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    save_file({k: (v * 1.5 if "mlp" in k else v) for k, v in w.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    from tunelab.train import merge as merge_mod

    calls = []
    real_greedy = merge_mod.greedy

    def flaky(model, tok, prompts, n):  # the merged model (second call) answers differently
        calls.append(1)
        outs = real_greedy(model, tok, prompts, n)
        return outs if len(calls) == 1 else [o[:-1] + [(o[-1] + 1) % 100] for o in outs]

    merge_mod.greedy = flaky
    try:
        with pytest.raises(merge_mod.MergeCheckError, match="merge check FAILED"):
            merge_mod.merge_adapter(out, tmp_path / "bad", model=str(other), max_new_tokens=4, allow_other_base=True,
                                    log=lambda s: None)
    finally:
        merge_mod.greedy = real_greedy
    assert json.loads((tmp_path / "bad" / "merge_check.json").read_text())["identical"] is False


def test_full_and_pretrain_save_complete_hf_dirs(tmp_path, tiny_model_dir, chat_file):
    out = tmp_path / "full"
    ok(run_train(*common(tiny_model_dir, chat_file, out, "--max-steps", "2", "--method", "full", "--lr", "1e-3")))
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": r["text"]} for r in reviews(40)])
    out2 = tmp_path / "pre"
    ok(run_train("--method", "pretrain", "--model", str(out / "model"), "--data", str(texts), "--out", str(out2),
                 "--max-steps", "2", "--batch-size", "8", "--max-seq-len", "32", "--set", "train.ema_decay=0.9"))
    import torch
    from transformers import AutoModelForCausalLM

    loaded = {}
    for d in (out / "model", out2 / "model", out2 / "model-last"):   # with ema_decay: the average + the last
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
        loaded[d.name] = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).state_dict()
    assert any(not torch.equal(v, loaded["model-last"][k]) for k, v in loaded["model"].items())
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["data"]["target_share"] > 0.9 and rep["parameters"]["trainable_share"] == 1.0
    assert rep["last_weights"] == str(out2 / "model-last") and rep["ema_decay"] == 0.9


@pytest.mark.parametrize("content,where", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [}\n',
     "bad.jsonl:2: malformed JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "yo"}]}\n',
     "bad.jsonl:1: no assistant answer"),
])
def test_bad_data_exits_2_with_file_and_line(tmp_path, tiny_model_dir, content, where):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    assert_clean_error(run_train("--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "o")),
                       where)


def test_bad_config_exits_2_with_field(tmp_path, tiny_model_dir, chat_file):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"method: lora\ndata: {{path: {chat_file}}}\nlora: {{rank: 8}}\n", encoding="utf-8")
    assert_clean_error(run_train(str(cfg)), "t.yaml", "lora.rank: unknown field")
    assert_clean_error(run_train(*common(tiny_model_dir, chat_file, tmp_path / "o"), "--batch-size", "100"),
                       "fewer than train.batch_size")
    assert_clean_error(run_train(*common(tiny_model_dir, chat_file, tmp_path / "o"), "--ema-decay", "1.5"),
                       "train.ema_decay: Input should be less than 1")
    assert not (tmp_path / "o").exists()


@pytest.mark.model
def test_bundled_model_smoke(tmp_path):
    """The bundled SmolLM2 trains a few steps on a handful of reviews; `tunelab eval --adapter` loads the result."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    out = tmp_path / "run"
    ok(run_train("--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--micro-batch-size", "4", env={**train_env(2)}))
    rep = json.loads((out / "report.json").read_text())
    assert rep["parameters"]["total"] > 100_000_000 and 0 < rep["parameters"]["trainable_share"] < 0.1
    assert all(h["loss"] == h["loss"] for h in rep["history"])
    from tunelab.models.local import LocalModel

    msgs = chat_rows(1)[0]["messages"][:-1]
    tuned = LocalModel(None, adapter=out / "adapter").score_choices([msgs], ["Positive", "Negative"])[0]
    base = LocalModel(None).score_choices([msgs], ["Positive", "Negative"])[0]
    assert len(tuned.logprobs) == 2 and tuned.logprobs != base.logprobs  # the adapter is applied


@needs_chromium
def test_train_page_is_self_contained_and_renders_in_headless_chromium(tmp_path, tiny_model_dir):
    """The train page (report.html) from a real run: read back through TrainReport, the before/after and
    weight-average tables there, nothing external, and headless Chromium draws it."""
    from tunelab.train.results import TrainReport

    items = write_jsonl(tmp_path / "items.jsonl", reviews(16))
    out = tmp_path / "run"
    ok(run_train("--model", str(tiny_model_dir), "--prompt", str(EXAMPLES / "train/sentiment_binary_short.yaml"),
                 "--data", str(items), "--out", str(out), "--batch-size", "4", "--micro-batch-size", "4",
                 "--lora-r", "4", "--max-steps", "2", "--ema-decay", "0.5", "--eval-data", str(items),
                 "--eval-limit", "8"))
    rep = TrainReport.read(out / "report.json")
    assert rep.version == 2 and rep.eval.variants["trained"].n == 8 and rep.history[-1].step == 2
    html = (out / "report.html").read_text(encoding="utf-8")
    assert_self_contained(html)
    for section in ('id="verdict"', 'id="run"', 'id="data"', 'id="chart-loss"', 'id="before-after"',
                    'id="weight-average"', 'id="cost"'):
        assert section in html, section
    assert len(screenshot(out / "report.html", tmp_path / "train.png", tmp_path / "profile")) > 20_000
