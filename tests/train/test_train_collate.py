"""Packed (padding-free) and padded batches give the same loss and gradients, equal to plain per-example
forward passes; the loss only meets the lm_head at target positions."""

from __future__ import annotations

import pytest
import torch

from helpers import write_jsonl
from helpers.train import chat_rows, naive_loss, random_examples
from tunelab.train.collate import collate, plan_rows
from tunelab.train.data import Example
from tunelab.train.loss import SupervisedLoss, batch_loss
from tunelab.train.schedule import lr_factor


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_padded_equals_naive(tiny_llama):
    exs = random_examples([5, 17, 9, 30, 3, 12, 1 + 1])
    lm = SupervisedLoss(tiny_llama)
    packed = collate(exs, packing=True, pack_len=32)
    padded = collate(exs, packing=False)
    assert packed.shape[0] < padded.shape[0]                      # fewer rows ...
    assert packed.n_tokens == padded.n_tokens == sum(map(len, exs))  # ... same real tokens
    assert packed.n_targets == padded.n_targets == sum(e.n_targets for e in exs)
    results = []
    for batch in (packed, padded, None):
        tiny_llama.zero_grad()
        loss = batch_loss(lm, batch) if batch is not None else naive_loss(tiny_llama, exs)
        loss.backward()
        results.append((float(loss.detach()), grads(tiny_llama)))
    (lp, gp), (ld, gd), (ln, gn) = results
    assert lp == pytest.approx(ln, rel=1e-5) and ld == pytest.approx(ln, rel=1e-5)
    for name in gn:
        torch.testing.assert_close(gp[name], gn[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gd[name], gn[name], rtol=1e-4, atol=1e-6)
    tiny_llama.zero_grad()


def test_varlen_attention_equals_naive(tiny_llama):
    import copy

    from tunelab.train.attention import use_varlen_attention

    model = copy.deepcopy(tiny_llama)  # the session fixture keeps its own attention
    assert use_varlen_attention(model)
    exs = random_examples([5, 17, 9, 30, 3, 12, 2])
    batch = collate(exs, packing=True, varlen=True)
    assert batch.shape == (1, sum(map(len, exs))) and batch.attention_mask is None  # one row, no padding
    assert batch.segments[-1] == batch.n_tokens and len(batch.segments) == len(exs) + 1
    model.zero_grad()
    loss = batch_loss(SupervisedLoss(model), batch)
    loss.backward()
    got = grads(model)
    model.zero_grad()
    ref = naive_loss(model, exs)  # without segments: plain SDPA
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for name, g in grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6)


def test_chunked_head_equals_single_pass(tiny_llama):
    exs = random_examples([40, 33, 25], seed=3)
    batch = collate(exs, packing=True, pack_len=128)
    a = batch_loss(SupervisedLoss(tiny_llama), batch)
    b = batch_loss(SupervisedLoss(tiny_llama, head_chunk=7), batch)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6)


def test_mask_blocks_attention_across_sequences():
    exs = random_examples([3, 2, 4])
    b = collate(exs, packing=True, pack_len=5)
    assert b.shape == (2, 5)                                           # rows: [4 + pad], [3 | 2]
    m0, m1 = b.attention_mask[0, 0], b.attention_mask[1, 0]
    assert b.position_ids[1].tolist() == [0, 1, 2, 0, 1]
    assert not m1[3, :3].any() and m1[3, 3] and m1[4, 3] and m1[4, 4]  # the 2nd sequence sees only itself
    assert m1[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert not m0[:4, 4].any() and m0[4].tolist() == [False] * 4 + [True]  # padding: invisible, sees itself


def test_plan_rows_first_fit_decreasing():
    rows = plan_rows([10, 3, 7, 5, 2, 12], 12)
    lengths = [10, 3, 7, 5, 2, 12]
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)
    assert len(rows) == 4  # 39 tokens in rows of 12: at least 4


def test_micro_batches_cap_tokens_and_match_across_processes():
    from tunelab.train.schedule import micro_batches

    exs = [Example([1] * n, [False] + [True] * (n - 1)) for n in (100, 900, 50, 60, 700, 80, 40, 30)]
    idx = list(range(8))
    one = micro_batches(exs, idx, 0, 1, 8, 1000)
    assert [len(m) for m in one] == [2, 6] and all(sum(map(len, m)) <= 1000 for m in one)
    assert [e for m in one for e in m] == exs                       # every example once, in order
    r0, r1 = (micro_batches(exs, idx, r, 2, 8, 1000) for r in (0, 1))
    assert len(r0) == len(r1)                                       # DDP: the same number of backward passes
    assert [e for m in r0 for e in m] == exs[0::2] and [e for m in r1 for e in m] == exs[1::2]
    assert [len(m) for m in micro_batches(exs, idx, 0, 1, 3, None)] == [3, 3, 2]


def test_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[1:], f[2:])) and f[-1] > 0.1
    assert lr_factor(5, 10, 0, "constant", 0.0) == 1.0


def test_packed_padded_and_checkpointed_runs_give_the_same_loss_curve(tmp_path, tiny_model_dir):
    from tunelab.train.config import TrainConfig
    from tunelab.train.lora import attach_lora
    from tunelab.train.attention import resolve_attention
    from tunelab.train.loop import fit
    from tunelab.train.modeling import load_base_model
    from tunelab.train.session import start_session

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    curves = []
    for packing, ac, attn in ((True, False, "auto"), (False, False, "varlen"), (True, True, "varlen"),
                              (True, False, "mask")):
        cfg = TrainConfig.model_validate({
            "model": str(tiny_model_dir), "out": str(tmp_path / f"out-{packing}-{ac}-{attn}"),
            "data": {"path": str(data)},
            "optim": {"lr": 1e-2}, "lora": {"r": 4},
            "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 4, "packing": packing, "pack_len": 256,
                      "dtype": "float32", "activation_checkpointing": ac, "attention": attn}})
        run = start_session(cfg, log=lambda s: None)
        model = attach_lora(load_base_model(run), cfg.lora, run)
        assert run.varlen == (packing and resolve_attention(attn, run.device) == "varlen")
        curves.append([h["loss"] for h in fit(run, model).history])
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)   # packed == padded
    assert curves[0] == pytest.approx(curves[2], rel=1e-4)   # activation checkpointing changes nothing
    assert curves[0] == pytest.approx(curves[3], rel=1e-4)   # varlen attention == block-diagonal 4D mask
    assert len(curves[0]) == 3


def test_attention_auto_is_varlen_on_a_cpu_and_flex_or_mask_on_cuda(monkeypatch):
    from tunelab.train import attention
    from tunelab.train.attention import resolve_attention

    assert resolve_attention("auto", torch.device("cpu")) == "varlen"
    monkeypatch.setattr(attention, "flex_available", lambda: None)
    assert resolve_attention("auto", torch.device("cuda")) == "flex"   # launch-bound there: one fused kernel
    monkeypatch.setattr(attention, "flex_available", lambda: "no triton")
    assert resolve_attention("auto", torch.device("cuda")) == "mask"
    assert resolve_attention("varlen", torch.device("cuda")) == "varlen"
    assert resolve_attention("mask", torch.device("cpu")) == "mask"
