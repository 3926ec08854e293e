"""`tunelab vocab align` (tunelab/vocab/align.py): the base's tokenizer rebuilt from the extended one gives the base's
ids; every new token ends on an old token boundary; aligning trains the new rows only (every other weight and every
old row bit-identical), lowers the held-out alignment loss, and writes a directory transformers loads; bad input is
one line and exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from helpers.cli import assert_clean_error, cli_env, ok, run_cli


def _tokenizers(base_dir, extended):
    from tokenizers import Tokenizer

    from tunelab.vocab.align import old_tokenizer
    from tunelab.vocab.results import VOCAB_FILE

    meta = json.loads((extended / VOCAB_FILE).read_text())
    new_json = json.loads((extended / "tokenizer.json").read_text())
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    return base, Tokenizer.from_str(json.dumps(new_json)), old_tokenizer(new_json, meta["first_new_id"],
                                                                         meta["added"]), new_json


def test_the_rebuilt_base_tokenizer_gives_the_base_ids_and_new_tokens_end_on_old_boundaries(tiny_model_dir,
                                                                                           extended, texts):
    from tunelab.vocab.align import byte_lengths, common_boundaries
    from tunelab.vocab.extend import read_texts

    base, new, old, new_json = _tokenizers(tiny_model_dir, extended)
    nbytes = byte_lengths(new_json, new.get_vocab_size())
    some = read_texts(texts, "text")[:200] + ["plain English stays the same.", "혼합 mixed 텍스트 123"]
    coarser = 0
    for t in some:
        b, o, n = (x.encode(t, add_special_tokens=False).ids for x in (base, old, new))
        assert o == b
        bounds = common_boundaries(n, o, nbytes)
        assert bounds is not None and [i for i, _ in bounds] == list(range(len(n)))  # every new token ends on one
        assert sum(nbytes[x] for x in n) == len(t.encode("utf-8"))
        coarser += len(n) < len(o)
    assert coarser > 100


def test_align_trains_the_new_rows_only_and_lowers_the_held_out_loss(tmp_path, extended, texts):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.vocab.align import align_vocab
    from tunelab.vocab.config import AlignConfig
    from tunelab.vocab.results import VOCAB_FILE

    meta = json.loads((extended / VOCAB_FILE).read_text())
    first = meta["first_new_id"]
    out = tmp_path / "aligned"
    rep = align_vocab(extended, texts, out, AlignConfig(limit=160, eval_texts=32, batch_size=16, epochs=2, lr=1e-2),
                      threads=1)
    assert rep.steps == 16 and rep.texts == 128 and rep.eval_texts == 32
    assert rep.loss_after < 0.8 * rep.loss_before
    before, after = load_file(str(extended / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        if k == "model.embed_tokens.weight":
            assert torch.equal(before[k][:first], after[k][:first])
            assert not torch.equal(before[k][first:], after[k][first:])
        else:
            assert torch.equal(before[k], after[k]), k
    written = json.loads((out / VOCAB_FILE).read_text())
    assert written["first_new_id"] == first and written["align"]["loss_after"] == rep.loss_after
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(extended)))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


@pytest.mark.parametrize("case, needle", [
    ("not_extended", "has no tunelab_vocab.json"),
    ("too_few", "are held out"),
    ("out_exists", "is not empty"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, extended, texts, case, needle):
    model, data, out = extended, texts, tmp_path / "out"
    if case == "not_extended":
        model = tiny_model_dir
    elif case == "too_few":
        data = write_jsonl(tmp_path / "few.jsonl", [{"text": "좋은 영화"}] * 10)
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    p = run_cli("vocab", "align", "--model", model, "--data", data, "--out", out, "--threads", "1", env=cli_env())
    assert_clean_error(p, needle)
    if case == "out_exists":
        assert [f.name for f in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()


def test_the_cli_aligns_and_reports(tmp_path, extended, texts):
    out = tmp_path / "aligned"
    p = ok(run_cli("vocab", "align", "--model", extended, "--data", texts, "--limit", "48", "--eval-texts", "16",
                   "--batch-size", "16", "--out", out, "--threads", "1", env=cli_env()))
    assert p.stdout.strip().splitlines()[-1] == str(out)
    assert "alignment loss" in p.stderr and "bits per byte" in p.stderr
