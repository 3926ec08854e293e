"""Checkpoints without pickles: optimizer, RNG and weights round-trip through safetensors + JSON."""

from __future__ import annotations

import random

import torch

from tunelab.train.checkpoint import latest_checkpoint, load_checkpoint, optimizer_from_files, rng_from_files, \
    save_checkpoint


def test_roundtrip_restores_optimizer_rng_and_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    path = save_checkpoint(tmp_path, 2, weights=dict(model.named_parameters()), optimizer=opt,
                           state={"tokens": 10, "target_tokens": 4, "train_seconds": 1.5}, keep=1)
    random.seed(3)
    save_checkpoint(tmp_path, 4, weights=dict(model.named_parameters()), optimizer=opt,
                    state={"tokens": 20, "target_tokens": 8, "train_seconds": 3.0}, keep=1)
    want = (random.random(), torch.rand(3))  # the draws that follow the checkpoint
    assert not path.exists() and latest_checkpoint(tmp_path).name == "step-000004"  # keep=1 pruned step 2
    assert {p.suffix for p in latest_checkpoint(tmp_path).iterdir()} <= {".safetensors", ".json"}
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck["state"]["step"] == 4 and ck["state"]["tokens"] == 20
    fresh = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2, betas=(0.8, 0.9))
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(ck["weights"][n])
    optimizer_from_files(opt2, *ck["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            torch.testing.assert_close(b["state"][pid][k], v)
    assert b["param_groups"][0]["betas"] == (0.8, 0.9)
    # the RNG states saved at step 4 reproduce the draws made after it
    rng_from_files(*ck["rng"])
    assert random.random() == want[0] and torch.equal(torch.rand(3), want[1])
    # and the restored optimizer takes the same next step
    x = torch.randn(2, 4)
    model(x).sum().backward()
    fresh(x).sum().backward()
    opt.step()
    opt2.step()
    torch.testing.assert_close(model.weight, fresh.weight)


def test_killed_write_leaves_the_previous_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, weights=dict(model.named_parameters()), optimizer=opt,
                    state={"tokens": 1, "target_tokens": 1, "train_seconds": 0.1})
    (tmp_path / "checkpoints" / ".tmp-step-000002").mkdir()  # a write that never finished
    assert latest_checkpoint(tmp_path).name == "step-000001"
