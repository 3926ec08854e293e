"""The fast label scorer must equal plain per-(prompt, choice) forward passes."""

import os

import pytest
import torch

from tunelab.models.scoring import PrefixScorer, common_prefix_len


def naive_scores(model, prompts, choices):
    out = []
    for p in prompts:
        row = []
        for c in choices:
            ids = torch.tensor([p + c])
            with torch.no_grad():
                lp = model(ids).logits.log_softmax(-1)[0]
            row.append(sum(lp[len(p) - 1 + j, c[j]].item() for j in range(len(c))))
        out.append(row)
    return out


def assert_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5, 6], [7]]) == 0
    assert common_prefix_len([[1, 2, 3]]) == 3
    assert common_prefix_len([]) == 0


@pytest.mark.parametrize("max_batch_tokens", [4096, 40])
def test_prefix_scorer_matches_naive(tiny_llama, max_batch_tokens):
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 97, (11,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 97, (n,), generator=g).tolist() for n in (1, 5, 9, 3, 7)]
    choices = [[4], [5, 6], [7, 8, 9]]
    scorer = PrefixScorer(tiny_llama, max_batch_tokens=max_batch_tokens, max_batch_size=2)
    got = scorer.score(prompts, choices)
    want = naive_scores(tiny_llama, prompts, choices)
    assert_close(got, want)


def test_prefix_scorer_without_shared_prefix(tiny_llama):
    prompts = [[3, 4, 5], [9, 8], [10]]
    choices = [[1, 2], [6]]
    got = PrefixScorer(tiny_llama).score(prompts, choices)
    assert_close(got, naive_scores(tiny_llama, prompts, choices))


def test_identical_prompts_keep_one_token_of_their_own(tiny_llama):
    prompts = [[3, 4, 5, 6]] * 3
    choices = [[7], [8, 9]]
    got = PrefixScorer(tiny_llama).score(prompts, choices)
    want = naive_scores(tiny_llama, prompts[:1], choices)[0]
    for row in got:
        assert row == pytest.approx(want, abs=1e-4)


def test_empty_choice_rejected(tiny_llama):
    with pytest.raises(ValueError, match="every choice needs at least one token"):
        PrefixScorer(tiny_llama).score([[1, 2]], [[3], []])


def test_grouped_key_value_heads_are_not_copied_on_a_cpu(tiny_llama, monkeypatch):
    """tiny_llama has 4 query heads over 2 key/value heads: the scorer's forward passes SDPA the grouped heads
    (enable_gqa) instead of repeating each key/value head (repeat_kv), with the same scores, and leaves the switch
    as it found it."""
    from transformers.integrations import sdpa_attention

    assert tiny_llama.config._attn_implementation == "sdpa"
    repeats = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda h, n: repeats.append(n) or real(h, n))
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 97, (9,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 97, (n,), generator=g).tolist() for n in (2, 6, 4)]
    choices = [[4], [5, 6]]
    got = PrefixScorer(tiny_llama).score(prompts, choices)
    assert repeats == []
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    assert_close(got, naive_scores(tiny_llama, prompts, choices))
    mask = torch.ones(1, 1, 1, len(prompts[0]), dtype=torch.bool)
    tiny_llama(torch.tensor([prompts[0]]), attention_mask=mask)
    assert repeats  # outside the scorer a masked forward still repeats them (transformers' own choice)
