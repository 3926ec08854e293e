"""`tunelab vocab extend` (tunelab/vocab/): new tokens learnt from Korean reviews join the tiny model's byte-level BPE
after every old id; the old ids, special tokens and chat template stay; new embedding rows are the mean of their
pieces' rows (tied and untied heads); plain transformers loads the result; reviews take fewer tokens and decode back
to themselves; bad input is one line; an adapter trained on the extended model works there and is refused, naming
both vocabulary sizes, on the original base."""

from __future__ import annotations

import json

import pytest

from helpers import EXAMPLES, read_jsonl, write_jsonl
from helpers.cli import assert_clean_error, cli_env, ok, run_cli
from helpers.train import NSMC_TRAIN, common, reviews, run_train
from helpers.vocab import ADD, extend

DEV = EXAMPLES / "data" / "nsmc_binary_dev_200.jsonl"
PROMPT = EXAMPLES / "train" / "sentiment_binary_short.yaml"
ENGLISH = ["The quick brown fox, 123.", "def f(x):\n    return x ** 2  # code", "Movie was GREAT!!! 10/10"]


def tokenizers(base, ext):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(ext))


def dev_texts(n=200):
    return [r["text"] for r in read_jsonl(DEV)[:n]]


def test_old_ids_and_special_tokens_and_chat_template_are_unchanged(tiny_model_dir, extended):
    base, ext = tokenizers(tiny_model_dir, extended)
    first = len(base)
    assert len(ext) == first + ADD
    new_vocab = ext.get_vocab()
    assert all(new_vocab.get(t) == i for t, i in base.get_vocab().items())  # every old token keeps its id
    for text in ENGLISH:  # no new token can apply to ASCII text
        assert ext(text)["input_ids"] == base(text)["input_ids"]
    unchanged = 0
    for text in dev_texts():  # any text in which no new token occurs keeps its ids
        ids = ext(text)["input_ids"]
        if max(ids) < first:
            assert ids == base(text)["input_ids"]
            unchanged += 1
    assert ext.all_special_tokens == base.all_special_tokens and ext.all_special_ids == base.all_special_ids
    assert (ext.bos_token_id, ext.eos_token_id, ext.pad_token_id) == (base.bos_token_id, base.eos_token_id,
                                                                      base.pad_token_id)
    chat = [{"role": "system", "content": "Classify."}, {"role": "user", "content": dev_texts(1)[0]}]
    assert ext.apply_chat_template(chat, tokenize=False) == base.apply_chat_template(chat, tokenize=False)
    ids = ext.apply_chat_template(chat, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == base.convert_tokens_to_ids("<|im_start|>") and base.convert_tokens_to_ids("<|im_end|>") in ids


def test_new_tokens_are_used_and_decode_back_and_reviews_take_fewer_tokens(tiny_model_dir, extended):
    from tunelab.vocab.results import VOCAB_FILE, VocabReport

    base, ext = tokenizers(tiny_model_dir, extended)
    held = dev_texts()  # reviews the vocabulary was not learnt from
    for text in held:
        assert ext.decode(ext(text)["input_ids"]) == text
    before = sum(len(base(t)["input_ids"]) for t in held)
    after = sum(len(ext(t)["input_ids"]) for t in held)
    assert after < 0.8 * before, (before, after)
    rep = VocabReport.read(extended / VOCAB_FILE)
    assert rep.added == ADD and rep.first_new_id == len(base) and rep.vocab_size == len(base) + ADD
    assert rep.tokens_per_text_after < rep.tokens_per_text_before and rep.texts == 400 and rep.tied_embeddings
    assert len(rep.data_digest) == 64 and rep.base == str(tiny_model_dir)


def new_rows_are_means(base_dir, ext_dir, weight_name):
    import torch
    from safetensors.torch import load_file

    base, ext = tokenizers(base_dir, ext_dir)
    old = load_file(str(base_dir / "model.safetensors"))[weight_name]
    new = load_file(str(ext_dir / "model.safetensors"))[weight_name]
    assert new.shape == (len(ext), old.shape[1])
    assert torch.equal(new[:old.shape[0]], old)
    vocab = {i: t for t, i in ext.get_vocab().items()}
    for i in range(old.shape[0], new.shape[0]):
        pieces = [t.id for t in base.backend_tokenizer.model.tokenize(vocab[i])]
        assert len(pieces) >= 2
        assert torch.equal(new[i], old[pieces].mean(0)), i


def test_new_rows_are_the_mean_of_their_pieces_rows_tied(tiny_model_dir, extended):
    from transformers import AutoModelForCausalLM

    new_rows_are_means(tiny_model_dir, extended, "model.embed_tokens.weight")
    model = AutoModelForCausalLM.from_pretrained(str(extended))
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49152 + ADD
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_new_rows_are_the_mean_of_their_pieces_rows_untied(untied):
    from transformers import AutoModelForCausalLM

    base, ext = untied
    new_rows_are_means(base, ext, "model.embed_tokens.weight")
    new_rows_are_means(base, ext, "lm_head.weight")  # the head's own rows, not the embedding's
    model = AutoModelForCausalLM.from_pretrained(str(ext))
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_plain_transformers_loads_the_directory_and_runs_it(extended):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(extended))
    model = AutoModelForCausalLM.from_pretrained(str(extended)).eval()
    ids = tok(dev_texts(1)[0], return_tensors="pt")["input_ids"]
    assert ids.max() >= 49152  # a new token
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    assert json.loads((extended / "config.json").read_text())["vocab_size"] == len(tok)


def test_the_cli_writes_the_model_and_reports_tokens_per_text(tmp_path, tiny_model_dir, texts):
    p = ok(run_cli("vocab", "extend", "--data", texts, "--add", "50", "--model", tiny_model_dir, "--out",
                   tmp_path / "m", env=cli_env()))
    assert p.stdout.strip() == str(tmp_path / "m")
    assert "tokens per text:" in p.stderr and "50 tokens added" in p.stderr
    rep = json.loads((tmp_path / "m" / "tunelab_vocab.json").read_text())
    assert rep["added"] == 50 and rep["tokens_per_text_after"] < rep["tokens_per_text_before"]


@pytest.mark.parametrize("case, needle", [
    ("empty", "no text in"),
    ("too_many", "--add 100000: this text gives only"),
    ("no_field", "no field 'review' in this record"),
    ("out_not_empty", "exists and is not empty"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, texts, case, needle):
    data, out, extra = texts, tmp_path / "out", []
    if case == "empty":
        data = tmp_path / "empty.jsonl"
        data.write_text("")
    elif case == "too_many":
        extra = ["--add", "100000"]
    elif case == "no_field":
        extra = ["--field", "review"]
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    p = run_cli("vocab", "extend", "--data", data, "--model", tiny_model_dir, "--out", out, *extra, env=cli_env())
    line = assert_clean_error(p, needle, last_line_only=True)
    if case == "too_many":
        could = int(line.split("gives only ")[1].split()[0])
        assert 0 < could < 100000 and f"--add {could} or less" in line
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith((".out", "out"))) == \
        (["out"] if case == "out_not_empty" else [])
    if case == "out_not_empty":
        assert [x.name for x in out.iterdir()] == ["keep.txt"]


def test_an_adapter_of_the_extended_model_works_there_and_is_refused_on_the_original(tmp_path, tiny_model_dir,
                                                                                     extended):
    items = write_jsonl(tmp_path / "items.jsonl", reviews(16))
    ok(run_train(*common(extended, items, tmp_path / "run", "--max-steps", "2", "--prompt", str(PROMPT))))
    adapter = tmp_path / "run" / "adapter"
    from tunelab.models.adapters import recorded_base

    assert recorded_base(adapter)["config"]["vocab_size"] == 49152 + ADD
    dev = write_jsonl(tmp_path / "dev.jsonl", reviews(4))

    def run_eval(model, *extra):
        return run_cli("eval", "--prompt", PROMPT, "--data", dev, "--model", model, "--out", tmp_path / "ev",
                       "--no-report", "--no-cache", "--adapter", adapter, *extra, env=cli_env(), timeout=240)

    ok(run_eval(extended))
    for extra in ([], ["--allow-other-base"]):  # a LoRA of the same shapes: the recorded vocabulary refuses it
        line = assert_clean_error(run_eval(tiny_model_dir, *extra), f"vocabulary of {49152 + ADD} tokens",
                                  "has 49152", "give the expanded model it was trained on as --model")
        assert str(extended) in line
    p = run_cli("merge", adapter, "--model", tiny_model_dir, "--out", tmp_path / "merged", env=cli_env(),
                timeout=240)
    assert_clean_error(p, f"vocabulary of {49152 + ADD} tokens", "has 49152", last_line_only=True)
    assert not (tmp_path / "merged").exists()
