"""`tunelab train` under `accelerate launch --config_file examples/accelerate/fsdp2.yaml` (FSDP2), as a user runs it:
the shipped config file with ``--num_processes 2``, 2 CPU processes over gloo (tunelab shards CPU processes itself;
accelerate 1.15 would run them unsharded), the tiny random Llama (tied embeddings) with the bundled tokenizer.

Every 2-process run is compared with one process taking the same steps (the same global batch of 8: one process
does 2 micro-batches of 4, two processes one each). In float32 (``train.dtype``) the two differ by summation
order only: measured, the loss curves agree to the printed 6 digits and the weights within 2e-7 (full) and 2e-6
(LoRA); the tolerances below are 1e-5 relative on losses, 1e-5 absolute on weights and logits. Under bf16 autocast
the same runs differ by up to ~6e-3 in the LoRA weights (Adam's normalisation of tiny gradients), so they are not
the comparison here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import EXAMPLES, ROOT
from helpers.cli import assert_clean_error, ok
from helpers.processes import free_port
from helpers.train import common, losses, run_train, train_env

CONFIGS = EXAMPLES / "accelerate"
F32 = ("--set", "train.dtype=float32")


def launch(config: str, *args: str, processes: int = 2, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file examples/accelerate/CONFIG --num_processes N -m tunelab.cli train ARGS`."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(CONFIGS / config), "--num_processes", str(processes),
           "--main_process_port", str(free_port()), *extra, "-m", "tunelab.cli", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=train_env(), cwd=ROOT, timeout=300)


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_close_tensors(a: dict, b: dict, atol: float = 1e-5) -> float:
    """Same names, every tensor within ``atol``; returns the largest difference."""
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


def test_shipped_accelerate_configs_parse_as_accelerate_reads_them():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and ddp.mixed_precision == "no"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp2.yaml"))
    assert str(fsdp.distributed_type).endswith("FSDP") and fsdp.mixed_precision == "no"
    f = fsdp.fsdp_config
    assert f["fsdp_version"] == 2 and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT" and f["fsdp_cpu_ram_efficient_loading"] is True
    assert f["fsdp_offload_params"] is False and f["fsdp_activation_checkpointing"] is False
    # the files the docs name are the ones shipped (and the ones these tests launch with)
    doc = (ROOT / "docs" / "train.md").read_text(encoding="utf-8")
    for p in sorted(CONFIGS.glob("*.yaml")):
        assert f"examples/accelerate/{p.name}" in doc, p.name


def test_fsdp2_full_fine_tuning_matches_one_process(tmp_path, tiny_model_dir, chat_file):
    args = ["--method", "full", "--lr", "1e-3", "--max-steps", "4", "--checkpoint-every", "2", "--ema-decay", "0.5",
            *F32]
    out2 = tmp_path / "fsdp"
    p = ok(launch("fsdp2.yaml", *common(tiny_model_dir, chat_file, out2, *args)))
    assert "FSDP2: 20 trainable tensors sharded over 2 processes (50% of this process's" in p.stderr
    out1 = tmp_path / "single"
    ok(run_train(*common(tiny_model_dir, chat_file, out1, *args)))
    assert json.loads((out2 / "report.json").read_text())["processes"] == 2
    assert losses(out2) == pytest.approx(losses(out1), rel=1e-5)
    import torch
    from transformers import AutoModelForCausalLM

    for d in ("model", "model-last"):  # the weight average and the last weights beside it: normal HF dirs
        m = AutoModelForCausalLM.from_pretrained(str(out2 / d), dtype=torch.float32)
        assert m.lm_head.weight is m.model.embed_tokens.weight     # still tied
        assert_close_tensors(tensors(out2 / d / "model.safetensors"), tensors(out1 / d / "model.safetensors"))
    # checkpoints hold full tensors, as one process writes them (the optimizer state included)
    ck = Path("checkpoints") / "step-000002"
    for f in ("weights.safetensors", "optimizer.safetensors"):
        assert_close_tensors(tensors(out2 / ck / f), tensors(out1 / ck / f))
    assert json.loads((out2 / ck / "optimizer.json").read_text()) == json.loads((out1 / ck / "optimizer.json")
                                                                                 .read_text())


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir, chat_file) -> tuple[Path, Path, list[str]]:
    """A LoRA run under FSDP2 (2 processes) and the same run in one process: 4 steps, a checkpoint after 2, the
    forgetting probe on 8 examples."""
    tmp = tmp_path_factory.mktemp("fsdp-lora")
    probe = EXAMPLES / "data" / "self_instruct_probe_64.jsonl"
    args = ["--max-steps", "4", "--checkpoint-every", "2", "--forgetting", str(probe), "--set", "forgetting.limit=8",
            *F32]
    ok(launch("fsdp2.yaml", *common(tiny_model_dir, chat_file, tmp / "fsdp", *args)))
    ok(run_train(*common(tiny_model_dir, chat_file, tmp / "single", *args)))
    return tmp / "fsdp", tmp / "single", args


def test_fsdp2_lora_matches_one_process_and_saves_a_plain_peft_adapter(lora_runs, tiny_model_dir):
    out2, out1, _ = lora_runs
    assert losses(out2) == pytest.approx(losses(out1), rel=1e-5)
    a2, a1 = out2 / "adapter", out1 / "adapter"
    c2, c1 = (json.loads((a / "adapter_config.json").read_text()) for a in (a2, a1))
    assert sorted(c2.pop("target_modules")) == sorted(c1.pop("target_modules")) and c2 == c1   # (a set in PEFT)
    w = tensors(a2 / "adapter_model.safetensors")
    assert w and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in w)   # PEFT's names, no adapter name
    assert_close_tensors(w, tensors(a1 / "adapter_model.safetensors"))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    logits = []
    for a in (a2, a1):  # plain PEFT on the plain base: full, unsharded tensors
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                                      str(a))
        with torch.no_grad():
            logits.append(m(ids).logits)
    assert float((logits[0] - logits[1]).abs().max()) < 1e-5
    # the forgetting probe measured the sharded model before (the base) and after, as one process does
    f2, f1 = (json.loads((o / "report.json").read_text())["forgetting"] for o in (out2, out1))
    assert f2["nll_before"] == pytest.approx(f1["nll_before"], abs=1e-5)
    assert f2["nll_after"] == pytest.approx(f1["nll_after"], abs=1e-5) and f2["nll_after"] != f2["nll_before"]


def test_fsdp2_resume_continues_the_same_curve(lora_runs, tiny_model_dir, chat_file, tmp_path):
    done, _, args = lora_runs
    out = tmp_path / "again"
    shutil.copytree(done, out)
    # --resume from the step-2 checkpoint replays steps 3 and 4: the optimizer state cut back into the shards
    p = ok(launch("fsdp2.yaml", *common(tiny_model_dir, chat_file, out, *args), "--resume"))
    assert "resumed from step-000002" in p.stderr
    assert losses(out) == pytest.approx(losses(done), rel=1e-6)
    assert_close_tensors(tensors(out / "adapter" / "adapter_model.safetensors"),
                         tensors(done / "adapter" / "adapter_model.safetensors"), atol=1e-6)


# what `accelerate launch --config_file examples/accelerate/fsdp2.yaml` sets, with one setting tunelab refuses
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


@pytest.mark.parametrize("env,extra,needle", [
    ({"FSDP_OFFLOAD_PARAMS": "true"}, (), "fsdp_offload_params: true is not supported"),
    ({"FSDP_VERSION": "1"}, (), "fsdp_version 1 is not supported by tunelab train: set fsdp_version: 2"),
    ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, (), "fsdp_state_dict_type SHARDED_STATE_DICT"),
    ({}, ("--set", "optim.optimizer=adamw8bit"), "optim.optimizer: adamw8bit (bitsandbytes) does not step"),
    ({}, ("--set", "lora.quantize=nf4"), "lora.quantize: nf4 (bitsandbytes) does not work with FSDP"),
])
def test_fsdp_settings_tunelab_cannot_honour_are_one_error_line(tmp_path, tiny_model_dir, chat_file, env, extra,
                                                                 needle):
    out = tmp_path / "o"
    p = run_train(*common(tiny_model_dir, chat_file, out, *extra), env=train_env() | FSDP_ENV | env)
    assert_clean_error(p, needle)
    assert not out.exists()


def test_fsdp_refusal_under_accelerate_launch_stops_every_process_before_loading(tmp_path, tiny_model_dir,
                                                                                 chat_file):
    out = tmp_path / "o"
    p = launch("fsdp2.yaml", *common(tiny_model_dir, chat_file, out), extra=("--fsdp_offload_params", "true"))
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 2 and all("fsdp_offload_params: true is not supported" in ln for ln in lines), p.stderr
    assert "tunelab/train" not in p.stderr  # no traceback from tunelab (torchrun reports the exits)
    assert not out.exists()
