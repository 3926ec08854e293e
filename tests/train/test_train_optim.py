"""optim.param_groups: per-parameter learning-rate multipliers and weight decay, by name."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers.cli import assert_clean_error, ok
from helpers.train import common, run_train
from tunelab.config import validate_as
from tunelab.errors import ConfigError
from tunelab.train.config import OptimConfig
from tunelab.train.optim import param_groups


def named() -> dict[str, torch.nn.Parameter]:
    shapes = {"model.embed_tokens.modules_to_save.default.weight": (10, 4), "model.layers.0.q.lora_A.weight": (2, 4),
              "model.layers.0.q.lora_B.weight": (4, 2), "model.norm.weight": (4,)}
    return {n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}


def optim(groups: list[dict], **kw) -> OptimConfig:
    return validate_as(OptimConfig, {"lr": 1e-3, "weight_decay": 0.1, "param_groups": groups, **kw}, "<test>")


def test_groups_split_by_first_match_with_their_scale_and_decay():
    params = named()
    groups = param_groups(optim([{"match": "lora_B", "lr_scale": 16},
                                 {"match": "embed_tokens|lora_B", "lr_scale": 0.1, "weight_decay": 0.0}]), params)
    by_id = {id(p): n for n, p in params.items()}
    got = sorted((sorted(by_id[id(p)].split(".")[-2] for p in g["params"]), g["lr_scale"], g["weight_decay"])
                 for g in groups)
    assert got == [(["default"], 0.1, 0.0), (["lora_A"], 1.0, 0.1), (["lora_B"], 16, 0.1), (["norm"], 1.0, 0.0)]
    # every trainable parameter in exactly one group
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in params.values())


def test_no_groups_is_decay_on_matrices_only():
    groups = param_groups(optim([]), named())
    assert [(len(g["params"]), g["weight_decay"], g["lr_scale"]) for g in groups] == [(3, 0.1, 1.0), (1, 0.0, 1.0)]


def test_a_group_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.match 'embed_token\$' matches no trainable"):
        param_groups(optim([{"match": "embed_token$"}]), named())


def test_a_bad_regular_expression_is_a_config_error():
    with pytest.raises(ConfigError, match="not a regular expression"):
        optim([{"match": "lora_(B"}])


def lora_b_max(out) -> float:
    w = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return max(v.abs().max().item() for k, v in w.items() if "lora_B" in k)


def test_lr_scale_reaches_the_optimizer_through_the_cli(tmp_path, tiny_model_dir, chat_file):
    # lora_B starts at zero: with a vanishing lr it stays (almost) zero, with the plain lr it moves
    plain, frozen = tmp_path / "plain", tmp_path / "frozen"
    ok(run_train(*common(tiny_model_dir, chat_file, plain, "--max-steps", "3")))
    ok(run_train(*common(tiny_model_dir, chat_file, frozen, "--max-steps", "3",
                         "--set", "optim.param_groups=[{match: lora_B, lr_scale: 1.0e-9}]")))
    assert lora_b_max(plain) > 1e-3
    assert lora_b_max(frozen) < 1e-7


def test_unmatched_group_through_the_cli_is_one_line_exit_2(tmp_path, tiny_model_dir, chat_file):
    assert_clean_error(run_train(*common(tiny_model_dir, chat_file, tmp_path / "x", "--max-steps", "1",
                                         "--set", "optim.param_groups=[{match: no_such_param}]")),
                       "matches no trainable parameter", last_line_only=True)  # after the run's preview


def test_resume_refuses_other_param_groups_or_lr_scales_and_resumes_with_the_same(tmp_path, tiny_model_dir,
                                                                                   chat_file):
    out = tmp_path / "run"
    first = ["--max-steps", "2", "--checkpoint-every", "1"]
    groups = "optim.param_groups=[{match: lora_B, lr_scale: 1.0e-9}]"
    ok(run_train(*common(tiny_model_dir, chat_file, out, *first, "--set", groups)))
    shutil.rmtree(out / "adapter")
    # a different split of the parameters, or the same split with another lr_scale: a run's config is fixed
    # (train/rundir.py), one clear line naming the field, exit 2, the checkpoint kept
    for other in ("optim.param_groups=[]", "optim.param_groups=[{match: lora_B, lr_scale: 1.0}]"):
        assert_clean_error(run_train(*common(tiny_model_dir, chat_file, out, *first, "--set", other), "--resume"),
                           "optim.param_groups", last_line_only=True)
        assert (out / "checkpoints" / "latest").is_file()
    # the same config resumes, and its lr_scale holds: lora_B (initialised to zero) barely moves
    p = ok(run_train(*common(tiny_model_dir, chat_file, out, *first, "--set", groups), "--resume"))
    assert "resumed from step-000001" in p.stderr
    assert lora_b_max(out) < 1e-4


def test_weight_ema_follows_its_formula_restores_and_swaps_in():
    from tunelab.train.ema import WeightEMA

    p = {"w": torch.nn.Parameter(torch.zeros(3))}
    ema = WeightEMA(p, 0.9)
    want = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            p["w"].fill_(value)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))        # a short warm-up of the decay: 2/11, 3/12, ...
        want = d * want + (1 - d) * value
    assert torch.allclose(ema.avg["w"], want) and not torch.allclose(want, p["w"].detach())
    # a checkpoint's tensors restore it; one without the average leaves it as it is
    other = WeightEMA({"w": torch.nn.Parameter(torch.full((3,), 5.0))}, 0.9)
    assert other.load(ema.tensors(), ema.updates) and torch.equal(other.avg["w"], want) and other.updates == 4
    assert not other.load({"w": torch.ones(3)}, 9) and other.updates == 4
    last = ema.swap_in()
    assert torch.equal(last["w"], torch.full((3,), 8.0)) and torch.allclose(p["w"].detach(), want)
