"""Every model family people fine-tune goes through tunelab: a tiny random Llama, Qwen2, Qwen3, Gemma 2, Gemma 3
(text), Mistral and Phi-3 (tests/helpers/families.py: the bundled vocabulary, the family's config and chat
template) each

- trains with method lora, is evaluated with ``tunelab eval --adapter``, merged (``tunelab merge``: its greedy
  check passes) and served (``tunelab serve``'s app with the adapter given at startup, on 127.0.0.1): one chat
  completion through the official ``openai`` client;
- trains with method full, and ``tunelab eval`` scores the saved model dir;
- renders a chat (system, user, assistant) to the same token ids in training, in ``tunelab eval`` (prompt and
  scored answer) and in ``tunelab serve`` (the ids the server hands its engine);
- computes the same training loss on packed rows (varlen attention and the 4D mask) and on padded rows as plain
  per-example forward passes of the model (Gemma 2's soft-capping and Gemma 2/3's sliding window included).

Each family's model is built once per module (a parametrized module-scoped fixture) and its LoRA run once."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from helpers import EXAMPLES, read_jsonl, write_jsonl
from helpers.cli import cli_env, ok, run_cli
from helpers.families import FAMILIES, build_family
from helpers.train import chat_rows, naive_loss, reviews, run_train

PROMPT = EXAMPLES / "train" / "sentiment_binary_short.yaml"
CHAT = chat_rows(1)[0]["messages"]  # system, user (a review), assistant (its label)


@pytest.fixture(scope="module", params=[f.name for f in FAMILIES])
def family(request, tmp_path_factory):
    """(family, its tiny model dir); skipped where this transformers lacks the family's classes."""
    fam = next(f for f in FAMILIES if f.name == request.param)
    if not fam.available():
        pytest.skip(f"this transformers has no {fam.model}")
    return fam, build_family(fam, tmp_path_factory.mktemp(f"fam-{fam.name}") / "model")


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("fam-items") / "items.jsonl", reviews(8))


@pytest.fixture(scope="module")
def lora_run(family, items, tmp_path_factory) -> Path:
    """`tunelab train` method lora, 2 steps on 8 labelled reviews with the short sentiment prompt."""
    out = tmp_path_factory.mktemp("fam-lora") / "run"
    ok(run_train("--model", str(family[1]), "--data", str(items), "--out", str(out), "--prompt", str(PROMPT),
                 "--batch-size", "4", "--micro-batch-size", "4", "--lr", "5e-2", "--lora-r", "4",
                 "--max-steps", "2"))
    return out


def run_eval(model: Path, items: Path, out: Path, *extra) -> dict:
    """`tunelab eval` of ``model`` on ``items`` with the training prompt; its summary."""
    ok(run_cli("eval", "--prompt", PROMPT, "--data", items, "--model", model, "--out", out, "--no-report",
               "--no-cache", *extra, env=cli_env(), timeout=240))
    return json.loads((out / "summary.json").read_text())


def test_lora_trains_and_eval_scores_the_adapter(family, lora_run, items, tmp_path):
    steps = read_jsonl(lora_run / "metrics.jsonl")
    assert len(steps) == 2 and all(0 < s["loss"] < 100 for s in steps)
    summary = run_eval(family[1], items, tmp_path / "ev", "--adapter", str(lora_run / "adapter"))
    assert summary["n_items"] == 8
    rows = read_jsonl(tmp_path / "ev" / "results.jsonl")
    assert len(rows) == 8 and all(r["prediction"] in ("Positive", "Negative") for r in rows)


def test_merge_check_passes(family, lora_run, tmp_path):
    merged = tmp_path / "merged"
    m = ok(run_cli("merge", lora_run, "--out", merged, "--max-new-tokens", "6", env=cli_env(), timeout=240))
    assert "merge check passed" in m.stderr
    assert json.loads((merged / "merge_check.json").read_text())["identical"]
    assert (merged / "model.safetensors").is_file()


def test_full_trains_and_eval_scores_the_saved_model(family, items, tmp_path):
    out = tmp_path / "full"
    ok(run_train("--model", str(family[1]), "--data", str(items), "--out", str(out), "--prompt", str(PROMPT),
                 "--method", "full", "--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e-3",
                 "--max-steps", "2"))
    assert (out / "model" / "model.safetensors").is_file()
    summary = run_eval(out / "model", items, tmp_path / "ev")
    assert summary["n_items"] == 8
    assert len(read_jsonl(tmp_path / "ev" / "results.jsonl")) == 8


def train_ids(model_dir: Path, messages: list[dict]):
    """The training example of a chat (system, user, assistant) as the trainer encodes it."""
    from tunelab.train.data import ChatEncoder, chat_messages
    from tunelab.train.tokenizer import load_tokenizer

    return ChatEncoder(load_tokenizer(model_dir)).encode(*chat_messages({"messages": messages}, "chat"), "chat")


def test_train_eval_and_serve_render_a_chat_to_the_same_ids(family, lora_run):
    """The ids before the first target are the prompt eval and serve render; the targets are the answer that eval
    scores (the answer and the end-of-turn marker)."""
    from openai import OpenAI

    from tunelab.models.base import GenerationParams
    from tunelab.models.local import LocalModel
    from tunelab.serve.app import ServerThread, build_app
    from tunelab.serve.config import ServeConfig

    fam, model_dir = family
    adapter = lora_run / "adapter"
    ex = train_ids(model_dir, CHAT)
    first, end = ex.targets.index(True), len(ex.targets) - ex.targets[::-1].index(True)
    prompt, answer = ex.input_ids[:first], ex.input_ids[first:end]  # after the answer: the template's newline
    lm = LocalModel(str(model_dir), adapter=adapter, device="cpu", dtype="float32")
    assert lm.encode(CHAT[:2]) == prompt                    # tunelab eval's prompt
    assert lm.choice_token_ids(lm.render(CHAT[:2]), CHAT[2]["content"]) == answer  # and the answer it scores
    assert lm.tokenizer.decode(answer).startswith(CHAT[2]["content"])
    app = build_app(ServeConfig(model=str(model_dir), dtype="float32", adapters={"tuned": str(adapter)},
                                max_tokens_limit=16))
    engine, seen = app.state.engine, []
    submit = engine.submit
    engine.submit = lambda ids, *a, **k: (seen.append(list(ids)), submit(ids, *a, **k))[1]
    with ServerThread(app) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tuned", messages=CHAT[:2], max_tokens=6, temperature=0)
    assert seen == [prompt]                                  # tunelab serve's prompt
    assert r.usage.prompt_tokens == len(prompt) and 1 <= r.usage.completion_tokens <= 6
    # The engine's own KV cache and masks decode what transformers' generate does (a sliding window included).
    want = lm.generate([CHAT[:2]], GenerationParams(max_new_tokens=6))[0]
    assert (r.choices[0].message.content, r.usage.completion_tokens) == (want.text, want.completion_tokens)


def test_packed_and_padded_losses_equal_per_example_forward_passes(family):
    """The trainer's loss (packed rows with varlen attention or a 4D mask, padded rows) is the model's own."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.train.attention import use_varlen_attention
    from tunelab.train.collate import collate
    from tunelab.train.loss import SupervisedLoss, batch_loss

    fam, model_dir = family
    exs = [train_ids(model_dir, r["messages"]) for r in chat_rows(4)]
    assert max(map(len, exs)) > 16  # longer than the sliding windows (8)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = float(naive_loss(model, exs))
        varlen = copy.deepcopy(model)
        assert use_varlen_attention(varlen)
        got = {"varlen": batch_loss(SupervisedLoss(varlen), collate(exs, packing=True, varlen=True)),
               "mask": batch_loss(SupervisedLoss(model), collate(exs, packing=True, pack_len=4096, pad_id=2)),
               "padded": batch_loss(SupervisedLoss(model), collate(exs, packing=False, pad_id=2)),
               "varlen model, plain forward": naive_loss(varlen, exs)}  # no segments: inference, probes
    for how, loss in got.items():
        assert float(loss) == pytest.approx(ref, rel=1e-5), (fam.name, how)


def test_eval_label_scores_equal_plain_forward_passes(family):
    """`tunelab eval`'s label scorer (shared prefix cache, a tree mask over the choices, the head at the choice
    positions only) gives each choice the log-likelihood of a plain forward pass over prompt + choice."""
    import torch

    from tunelab.models.local import LocalModel

    fam, model_dir = family
    lm = LocalModel(str(model_dir), device="cpu", dtype="float32")
    prompts = [r["messages"][:2] for r in chat_rows(3)]
    choices = ["Positive", "Negative"]
    got = lm.score_choices(prompts, choices)
    for msgs, scores in zip(prompts, got):
        text = lm.render(msgs)
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        for choice, lp in zip(choices, scores.logprobs):
            cid = lm.choice_token_ids(text, choice)
            with torch.no_grad():
                logp = lm.model(torch.tensor([ids + cid])).logits[0].log_softmax(-1)
            ref = sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(cid))
            assert lp == pytest.approx(ref, abs=1e-4), (fam.name, choice)
