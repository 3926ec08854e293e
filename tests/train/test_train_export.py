"""`tunelab export`: the GGUF file read back by an independent reader (gguf's GGUFReader for the metadata and tensor
layout, transformers' GGUF loader for the tokenizer and the model) against the HF model it came from; the Ollama
Modelfile's Go template against the Jinja chat template; the HF directory; bad input refused before anything is
written; llama.cpp itself where llama_cpp is importable."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers.cli import assert_clean_error, ok, run_cli
from helpers.train import train_env

TEXTS = ["Hello, world!", "1234567 + 89", "이 영화 정말 재미있어요!", "  spaces\tand\nlines", "<|im_start|>user\nhi<|im_end|>"]
SHARPEN = 25.0
PROBES = [[{"role": "user", "content": "What is the capital of France?"}],
          [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "List three colours."}]]


def export(source, out, **kw):
    from tunelab.train.export import export_model

    return export_model(str(source), out, log=lambda s: None, max_new_tokens=8, **kw)


def read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


def hf(model_dir: Path):
    from transformers import AutoModelForCausalLM

    from tunelab.train.tokenizer import load_tokenizer

    return load_tokenizer(model_dir), AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def compare(model_dir: Path, gguf_file: Path) -> dict:
    """Tokenizer ids, greedy tokens and logits of the GGUF (read by transformers) against the HF directory."""
    from tunelab.train.merge import greedy

    tok, model = hf(model_dir)
    gtok, gmodel = read_back(gguf_file)
    diff = 0.0
    for p in PROBES:
        ids = torch.tensor([tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                            ["input_ids"]])
        diff = max(diff, float((model(ids).logits - gmodel(ids).logits).abs().max()))
    return {"ids": [tok(t)["input_ids"] == gtok(t)["input_ids"] for t in TEXTS],
            "greedy": greedy(model, tok, PROBES, 8) == greedy(gmodel, tok, PROBES, 8), "diff": diff,
            "template": gtok.chat_template == tok.chat_template}


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny random Qwen2 (q/k/v with random biases, untied output head) with the bundled tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory, tiny_model_dir) -> Path:
    """``tiny_model_dir`` with its Q and K projections scaled up: at init scale its attention is nearly uniform, so
    RoPE (and a Q/K layout gone wrong) would hardly change its outputs; here they decide them."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharp-llama")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(SHARPEN)
    model.save_pretrained(str(out))
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, sharp_llama) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny.gguf"
    export(sharp_llama, out)
    return out


def test_the_file_holds_llama_cpp_names_metadata_and_the_tokenizer(tiny_gguf, sharp_llama):
    import gguf

    r = gguf.GGUFReader(str(tiny_gguf))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or
         k.endswith(("model", "pre", "_id", "_token"))}
    cfg = json.loads((sharp_llama / "config.json").read_text())
    assert f["general.architecture"] == "llama" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.vocab_size"], f["llama.rope.dimension_count"]) == (2048, 32, 2, 64, 4, 2, cfg["vocab_size"], 8)
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (1, 2, 2)
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == cfg["vocab_size"] and tokens.contents(2) == "<|im_end|>"
    assert r.fields["tokenizer.ggml.token_type"].contents(2) == gguf.TokenType.CONTROL
    assert len(r.fields["tokenizer.ggml.merges"].data) > 40000
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in types  # tied to token_embd, as llama.cpp writes SmolLM2
    assert types["token_embd.weight"] == "F16" and types["blk.1.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == types["blk.0.ffn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert len(types) == 1 + 2 * 9 + 1


def test_f16_reads_back_as_the_same_tokenizer_and_model(tiny_gguf, sharp_llama):
    got = compare(sharp_llama, tiny_gguf)
    assert all(got["ids"]) and got["template"] and got["greedy"], got
    assert got["diff"] < 0.01, got  # measured 1.3e-3 (f16 weights, fp32 compute)


def test_without_the_q_k_permutation_the_check_fails_and_nothing_is_shipped(tmp_path, sharp_llama, monkeypatch):
    from tunelab.train import export as ex

    monkeypatch.setattr(ex, "permute", lambda w, n_head, n_kv: w)
    with pytest.raises(ex.ExportCheckError, match="export check FAILED"):
        export(sharp_llama, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.gguf.failed"]


def test_q8_0_reads_back_within_its_tolerance(tmp_path, sharp_llama, tiny_gguf):
    import gguf

    res = export(sharp_llama, tmp_path / "q8.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    assert types["token_embd.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    size = {p: sum(int(t.n_bytes) for t in gguf.GGUFReader(str(p)).tensors) for p in (tmp_path / "q8.gguf", tiny_gguf)}
    assert size[tmp_path / "q8.gguf"] < 0.6 * size[tiny_gguf]
    got = compare(sharp_llama, tmp_path / "q8.gguf")
    assert all(got["ids"]) and got["template"], got
    assert got["diff"] < 0.05, got  # q8_0, dequantised by transformers on load
    assert res.check["relative_logit_diff"] <= res.check["tolerance"]


def test_qwen2_biases_and_an_untied_head(tmp_path, tiny_qwen2):
    import gguf

    export(tiny_qwen2, tmp_path / "q.gguf")
    r = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    names = {t.name for t in r.tensors}
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= names
    got = compare(tiny_qwen2, tmp_path / "q.gguf")
    assert all(got["ids"]) and got["greedy"] and got["diff"] < 1e-3, got


def test_format_hf_writes_a_directory_transformers_loads_as_is(tmp_path, sharp_llama):
    from transformers import AutoModelForCausalLM

    export(sharp_llama, tmp_path / "hf", fmt="hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    ids = torch.tensor([[1, 2, 3, 400, 5000]])
    a = AutoModelForCausalLM.from_pretrained(str(sharp_llama)).eval()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


# ---- the Modelfile: its Go template renders what the Jinja chat template renders ---------------------------------

def go_template(src: str, data: dict) -> str:
    """The part of Go's text/template the Modelfile uses: {{- -}} trimming, if / else if / else / end with `.X` or
    `eq .X "s"`, range over a list, and fields of the current value."""
    parts = re.split(r"({{-?\s*.*?\s*-?}})", src)
    for i, p in enumerate(parts):  # trim markers eat the whitespace of the text beside them
        if p.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if p.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()
    nodes = [("text", p) if not p.startswith("{{") else ("act", p.strip("{}-").strip()) for p in parts]

    def value(expr, dot):
        if expr.startswith("eq "):
            a, b = re.match(r'eq (\S+) "(.*)"', expr).groups()
            return value(a, dot) == b
        return dot.get(expr[1:], "") if expr.startswith(".") else expr

    def block(i, dot, out):  # runs nodes from i to the matching end/else; returns (index, stop word)
        while i < len(nodes):
            kind, s = nodes[i]
            if kind == "text":
                out.append(s)
            elif s == "end" or s.startswith("else"):
                return i, s
            elif s.startswith("if "):
                taken, cond = False, s[3:]
                while True:
                    go = not taken and bool(value(cond, dot))
                    i, stop = block(i + 1, dot, out if go else [])
                    taken = taken or go
                    if stop == "end":
                        break
                    cond = stop[8:] if stop.startswith("else if ") else ".__true__"
                    dot = dict(dot, __true__=True)
            elif s.startswith("range "):
                start = i
                for item in value(s[6:], dot):
                    i, _ = block(start + 1, item, out)
                if not value(s[6:], dot):
                    i, _ = block(start + 1, {}, [])
            else:
                out.append(str(value(s, dot)))
            i += 1
        return i, ""

    out: list[str] = []
    block(0, data, out)
    return "".join(out)


def test_the_modelfile_template_renders_as_the_chat_template(tiny_gguf, sharp_llama):
    text = (tiny_gguf.parent / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{tiny_gguf.name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    default_system = re.search(r'SYSTEM """(.*?)"""', text, re.S).group(1)
    tok, _ = hf(sharp_llama)
    convos = [PROBES[0], PROBES[1],
              [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "again"}]]
    for msgs in convos:
        system = next((m["content"] for m in msgs if m["role"] == "system"), default_system)  # as Ollama fills it
        ollama = [{"Role": m["role"], "Content": m["content"]} for m in msgs]
        got = go_template(template, {"System": system, "Messages": ollama})
        assert got == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), msgs


# ---- the command line -------------------------------------------------------------------------------------------

def cli_export(*args):
    return run_cli("export", *args, "--max-new-tokens", "4", env=train_env(), timeout=300)


def test_a_runs_adapter_is_merged_checked_and_exported(tmp_path, tiny_adapter):
    p = ok(cli_export(tiny_adapter.parent, "--dtype", "q8_0", "--out", tmp_path / "out" / "run.gguf"))
    assert "merge check passed" in p.stderr and "export check passed" in p.stderr
    assert p.stdout.split() == [str(tmp_path / "out" / "run.gguf"), str(tmp_path / "out" / "Modelfile")]
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["Modelfile", "run.gguf"]


@pytest.mark.parametrize("case, needle", [
    ("missing", "model not found"), ("format", "unknown --format 'onnx'"), ("dtype", "unknown --dtype 'q4_0'"),
    ("out", "exists and is not empty"), ("arch", "architecture GPT2LMHeadModel is not supported"),
    ("modelfile", "Modelfile exists")])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, sharp_llama, case, needle):
    out = tmp_path / "o" / "m.gguf"
    args = [sharp_llama, "--out", out]
    if case == "missing":
        args[0] = tmp_path / "nope"
    elif case == "format":
        args += ["--format", "onnx"]
    elif case == "dtype":
        args += ["--dtype", "q4_0"]
    elif case in ("out", "modelfile"):
        out.parent.mkdir()
        (out if case == "out" else out.parent / "Modelfile").write_text("mine")
    elif case == "arch":
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                                    "model_type": "gpt2"}))
        args[0] = tmp_path / "gpt2"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert_clean_error(cli_export(*args), needle)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ---- llama.cpp itself, where it is installed ---------------------------------------------------------------------

def test_llama_cpp_runs_the_file(tiny_gguf, sharp_llama):
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    tok, model = hf(sharp_llama)
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, logits_all=True, verbose=False)
    for t in TEXTS[:4]:
        assert llm.tokenize(t.encode(), add_bos=False, special=True) == tok(t)["input_ids"], t
    ids = tok.apply_chat_template(PROBES[0], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    llm.eval(ids)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[:len(ids)])
    assert np.abs(got - want).max() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).all()
