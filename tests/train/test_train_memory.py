"""Memory levers: optim.optimizer adamw8bit (bitsandbytes, CPU backend), optim.fused, optim.offload, and the
train.max_memory_gb preflight (tunelab.train.memory): its estimate against a measured run, its ordering, and the
refusal through the CLI."""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers.cli import assert_clean_error, ok
from helpers.train import common, losses, run_train, tiny_base
from tunelab.config import validate_as
from tunelab.errors import ConfigError
from tunelab.train.checkpoint import load_checkpoint, optimizer_from_files, save_checkpoint
from tunelab.train.config import TrainConfig
from tunelab.train.optim import OffloadedAdamW, build_optimizer, state_bytes

bnb = pytest.importorskip("bitsandbytes")


def config(**sections) -> TrainConfig:
    return validate_as(TrainConfig, {"data": {"path": "x.jsonl"}, **sections}, "<test>")


def fake_run(optim: dict | None = None, method: str = "full", device: str = "cpu") -> SimpleNamespace:
    logged: list[str] = []
    return SimpleNamespace(cfg=config(method=method, optim=optim or {}), device=torch.device(device),
                           log=logged.append, logged=logged)


def two_layers(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, xs: list[torch.Tensor]) -> None:
    for x in xs:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("optim, method, needle", [
    ({"optimizer": "sgd"}, "full", "optim.optimizer"),
    ({"optimizer": "adamw8bit", "fused": True}, "full", "drop optim.fused"),
    ({"offload": True}, "lora", "optim.offload is for methods full and pretrain"),
    ({"offload": True, "optimizer": "adamw8bit"}, "full", "choose one of them"),
])
def test_bad_optimizer_settings_are_config_errors(optim, method, needle):
    with pytest.raises(ConfigError, match=needle):
        config(method=method, optim=optim)


def test_new_fields_at_their_defaults_keep_an_older_runs_config_hash():
    from tunelab.train.rundir import resolved_config

    r = resolved_config(config())
    assert not any(k in r for k in ("optim.optimizer", "optim.fused", "optim.offload", "train.max_memory_gb",
                                    "train.compile"))
    assert resolved_config(config(optim={"optimizer": "adamw8bit"}))["optim.optimizer"] == "adamw8bit"
    assert "train.max_memory_gb" not in resolved_config(config(train={"max_memory_gb": 3}))  # a free field


# ------------------------------------------------------------------------------------------------ optimizer
def test_build_optimizer_picks_the_kind_with_param_groups():
    model = two_layers()
    named = dict(model.named_parameters())
    groups = {"param_groups": [{"match": r"^0\.", "lr_scale": 4.0, "weight_decay": 0.2}], "weight_decay": 0.1}
    plain = build_optimizer(fake_run(groups), named)
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]       # auto: fused on CUDA only
    assert build_optimizer(fake_run({**groups, "fused": True}), named).defaults["fused"]
    eight = build_optimizer(fake_run({**groups, "optimizer": "adamw8bit"}), named)
    assert isinstance(eight, bnb.optim.AdamW8bit)
    got = [(len(g["params"]), g["lr_scale"], g["weight_decay"]) for g in eight.param_groups]
    assert got == [(1, 1.0, 0.1), (1, 1.0, 0.0), (1, 4.0, 0.2), (1, 4.0, 0.0)]
    run = fake_run({"offload": True})
    assert type(build_optimizer(run, named)) is torch.optim.AdamW                 # on a CPU: a no-op, said once
    assert len(run.logged) == 1 and "optim.offload" in run.logged[0] and "no-op" in run.logged[0]


def test_8bit_state_is_a_quarter_of_adamws_and_it_trains():
    xs = [torch.randn(16, 128, generator=torch.Generator().manual_seed(i)) for i in range(30)]
    sizes, final = {}, {}
    for kind in ("adamw", "adamw8bit"):
        model = two_layers()
        opt = build_optimizer(fake_run({"optimizer": kind, "lr": 1e-2}), dict(model.named_parameters()))
        before = float(model(xs[0]).pow(2).mean().detach())
        train_steps(model, opt, xs)
        final[kind] = float(model(xs[0]).pow(2).mean().detach())
        assert final[kind] < before / 2, (kind, before, final[kind])
        sizes[kind] = state_bytes(opt)
    # the 128x128 weight's moments in 8 bits (+ block scales and the two quantisation maps); the small tensors
    # keep fp32 state in both
    assert sizes["adamw8bit"] < sizes["adamw"] * 0.35, sizes


def test_8bit_checkpoint_resumes_bit_identically(tmp_path):
    xs = [torch.randn(8, 128, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    run = fake_run({"optimizer": "adamw8bit", "lr": 1e-2, "weight_decay": 0.1,
                    "param_groups": [{"match": r"^1\.", "lr_scale": 0.5}]})
    model = two_layers()
    opt = build_optimizer(run, dict(model.named_parameters()))
    train_steps(model, opt, xs[:3])
    path = save_checkpoint(tmp_path, 3, weights=dict(model.named_parameters()), optimizer=opt, state={})
    assert {p.suffix for p in path.iterdir()} <= {".safetensors", ".json"}
    fresh = two_layers(seed=1)
    opt2 = build_optimizer(run, dict(fresh.named_parameters()))
    ck = load_checkpoint(path)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(ck["weights"][n])
    optimizer_from_files(opt2, *ck["optimizer"])
    assert [g["lr_scale"] for g in opt2.param_groups] == [g["lr_scale"] for g in opt.param_groups]
    train_steps(model, opt, xs[3:])
    train_steps(fresh, opt2, xs[3:])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_offloaded_adamw_steps_as_adamw_and_resumes():
    xs = [torch.randn(8, 128, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ref, off = two_layers(), two_layers()
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}
    groups = lambda m: [{"params": list(m.parameters()), "weight_decay": 0.1, "lr_scale": 1.0}]  # noqa: E731
    a, b = torch.optim.AdamW(groups(ref), foreach=True, **kw), OffloadedAdamW(groups(off), **kw)
    assert all(c is not d for c, d in zip(b.cpu_params, off.parameters()))      # its own fp32 copies
    train_steps(ref, a, xs)
    train_steps(off, b, xs)
    for p, q in zip(ref.parameters(), off.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
        assert q.grad is None
    # a restored run: weights loaded into the model after the optimizer was built, then synced into its copies
    again = two_layers(seed=3)
    c = OffloadedAdamW(groups(again), **kw)
    with torch.no_grad():
        for p, q in zip(again.parameters(), off.parameters()):
            p.copy_(q)
    c.load_state_dict(copy.deepcopy(b.state_dict()))   # (torch would share b's state tensors otherwise)
    c.sync_from_device()
    train_steps(off, b, xs[:1])
    train_steps(again, c, xs[:1])
    for p, q in zip(off.parameters(), again.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("args, needle", [
    (["--set", "optim.optimizer=sgd"], "optim.optimizer"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_bad_settings_through_the_cli_are_one_line_exit_2(tmp_path, tiny_model_dir, chat_file, args, needle):
    if needle == "no CUDA device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "x"
    assert_clean_error(run_train(*common(tiny_model_dir, chat_file, out, "--max-steps", "1", *args)), needle,
                       last_line_only=True)
    assert not out.exists()


def test_lora_with_8bit_optimizer_trains_and_resumes_bit_identically(tmp_path, tiny_model_dir, chat_file):
    # embed_tokens trained beside LoRA: a tensor large enough for 8-bit state; its own lr_scale
    out = tmp_path / "run"
    args = common(tiny_model_dir, chat_file, out, "--max-steps", "4", "--checkpoint-every", "2", "--set",
                  "optim.optimizer=adamw8bit", "--set", "lora.modules_to_save=[embed_tokens]",
                  "--set", "optim.param_groups=[{match: embed_tokens, lr_scale: 0.5}]")
    ok(run_train(*args))
    first = losses(out)
    assert first[-1] < first[0]
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    opt_t = load_file(str(out / "checkpoints" / "step-000002" / "optimizer.safetensors"))
    assert any(v.dtype == torch.uint8 for v in opt_t.values())                  # 8-bit moments saved
    shutil.rmtree(out / "adapter")
    p = ok(run_train(*args, "--resume"))
    assert "resumed from step-000002" in p.stderr
    assert losses(out) == first
    again = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


def test_full_with_8bit_optimizer_trains_with_smaller_saved_state(tmp_path, tiny_model_dir, chat_file):
    sizes = {}
    for kind in ("adamw", "adamw8bit"):
        out = tmp_path / kind
        extra = ["--set", "optim.offload=true"] if kind == "adamw" else []   # a CPU run: a no-op, with a note
        p = ok(run_train(*common(tiny_model_dir, chat_file, out, "--method", "full", "--max-steps", "3", "--lr",
                                 "1e-3", "--checkpoint-every", "2", "--set", f"optim.optimizer={kind}", *extra)))
        assert (out / "model").is_dir()
        got = losses(out)
        assert got[-1] < got[0], got
        sizes[kind] = (out / "checkpoints" / "step-000002" / "optimizer.safetensors").stat().st_size
        assert ("optim.offload" in p.stderr) == (kind == "adamw")
    assert sizes["adamw8bit"] < sizes["adamw"] * 0.35, sizes


# ------------------------------------------------------------------------------------------------ memory
@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """Hidden 256, 4 layers: weights and optimizer state dominate a full run's memory."""
    return tiny_base(tmp_path_factory.mktemp("mid") / "model", hidden=256, layers=4)


def test_estimate_orders_the_levers(mid_model):
    from transformers import AutoModelForCausalLM

    from tunelab.train.memory import estimate_memory, model_shape

    shape = model_shape(mid_model)   # from config.json, on the meta device: the loaded model's parameters
    assert shape.total == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(mid_model)).parameters())
    assert shape.head_tied and shape.layers == 4 and shape.hidden == 256 and len(shape.linears) == 4 * 7
    est = lambda **s: estimate_memory(config(**s), shape, longest=200, target_share=0.1)  # noqa: E731
    full, lora, qlora = est(method="full"), est(method="lora"), est(method="lora", lora={"quantize": "nf4"})
    assert full.tensors_gb > lora.tensors_gb > qlora.tensors_gb
    assert full.weights_gb > lora.weights_gb > qlora.weights_gb
    assert full.optimizer_gb > est(method="full", optim={"optimizer": "adamw8bit"}).optimizer_gb * 3
    ckpt = est(method="full", train={"activation_checkpointing": True})
    assert ckpt.activations_gb < full.activations_gb
    small = est(method="full", train={"micro_batch_size": 2, "batch_size": 16})
    assert small.activations_gb < full.activations_gb and small.micro_batch_tokens == 400
    assert est(train={"micro_batch_tokens": 256}).micro_batch_tokens == 256
    off = estimate_memory(config(method="full", optim={"offload": True}), shape, longest=200, target_share=0.1,
                          cuda=True)
    assert off.optimizer_gb == 0 and off.offloaded_gb > full.optimizer_gb


def test_estimate_is_near_the_measured_peak_of_a_full_run(tmp_path, mid_model, chat_file):
    out = tmp_path / "full"
    args = common(mid_model, chat_file, out, "--method", "full", "--max-steps", "2", "--lr", "1e-3")
    dry = ok(run_train(*args, "--dry-run"))
    assert "memory (cpu, estimated): about" in dry.stderr
    planned = json.loads(dry.stdout)["memory"]
    ok(run_train(*args))
    rep = json.loads((out / "report.json").read_text())
    m = rep["memory"]
    assert m["tensors_gb"] == planned["tensors_gb"] and m["parameters"] > 10_000_000
    assert f"estimated {m['total_gb']:.2f} GB (cpu)" in (out / "report.html").read_text()
    grown = rep["peak_rss_gb"] - m["runtime_gb"]   # runtime: the process when the estimate was made
    assert 0.5 <= m["tensors_gb"] / grown <= 2.0, (m, rep["peak_rss_gb"])
    print(f"estimate {m['tensors_gb']:.3f} GB, measured growth {grown:.3f} GB")


def test_a_budget_the_run_cannot_fit_is_refused_before_loading(tmp_path, tiny_model_dir, chat_file):
    out = tmp_path / "x"
    line = assert_clean_error(run_train(*common(tiny_model_dir, chat_file, out, "--method", "full",
                                                "--set", "train.max_memory_gb=0.001")),
                              "train.max_memory_gb", "over the budget of 0.001 GB", "weights", "activations",
                              "try", "method lora ->", last_line_only=True)
    assert "Traceback" not in line and not out.exists()
    # a budget that fits: the run goes on (dry run: the preview names the budget)
    p = ok(run_train(*common(tiny_model_dir, chat_file, out, "--set", "train.max_memory_gb=64"), "--dry-run"))
    assert "budget 64 GB" in p.stderr


def test_suggestions_name_each_lever_with_its_estimate_those_that_fit_first(mid_model):
    import re

    from tunelab.train.memory import estimate_memory, model_shape, suggestions

    shape = model_shape(mid_model)
    kw = dict(longest=200, target_share=0.1, cuda=True)
    full = estimate_memory(config(method="full"), shape, **kw)
    lora = estimate_memory(config(method="lora"), shape, **kw)
    budget = round((full.total_gb + lora.total_gb) / 2, 3)
    cfg = config(method="full", train={"max_memory_gb": budget})
    tips = suggestions(cfg, shape, estimate_memory(cfg, shape, **kw), **kw)
    gbs = [float(re.search(r"-> ([0-9.]+) GB", t).group(1)) for t in tips]
    assert any(t.startswith(f"method lora -> {lora.total_gb:.2f} GB") for t in tips), tips
    assert {t.split(" ->")[0] for t in tips} >= {"optim.optimizer adamw8bit", "optim.offload true",
                                                  "train.activation_checkpointing true"}
    fits = [g <= budget for g in gbs]
    assert fits == sorted(fits, reverse=True) and all(g < full.total_gb for g in gbs), tips
