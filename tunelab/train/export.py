"""`tunelab export`: a model (or a run's adapter, merged on the way by `tunelab merge`'s code) as one GGUF file for
llama.cpp and Ollama, with a ``Modelfile`` beside it, or as a plain HF directory.

The GGUF follows llama.cpp's ``convert_hf_to_gguf.py``: its tensor names (``gguf.get_tensor_name_map``), the Q and K
projections of a llama model permuted into llama.cpp's RoPE layout, norms and other 1-D tensors in F32, the output
head left out when it is tied to the token embedding, the architecture's hyperparameters under
``<arch>.*``, and the tokenizer as ``tokenizer.ggml.model = gpt2`` (tokens, token types, merges, the
pre-tokenizer's name found as llama.cpp finds it, special token ids, the chat template).

After writing, the file is read back by an independent reader, transformers' GGUF loader (which undoes the Q/K
permutation), and compared with the HF model: the tokenizer must give the same ids on probe texts, and the model the
same greedy tokens on probe prompts, its logits within the dtype's tolerance (``TOLERANCE``). Only a file that passes
gets its final name; one that fails stays beside it as ``.FILE.gguf.failed`` and the export exits with code 1.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Callable

import torch

from tunelab.errors import ModelError, TunelabError
from tunelab.models.base import adapter_dir
from tunelab.train.merge import base_model_of, greedy, merge_adapter, probe_prompts

FORMATS = ("gguf", "hf")
DTYPES = ("f16", "q8_0")
# HF architecture -> llama.cpp architecture. Other architectures are refused before anything is loaded.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# Largest logit difference allowed between the HF model (fp32) and the GGUF read back, over every position of the
# probe prompts, relative to the largest |logit| of the HF model. Measured: bundled model f16 0.10%, q8_0 3.8%; a tiny
# random llama f16 0.03%, q8_0 0.73% (docs/train.md, "Export"). Greedy tokens must also be equal on every probe for
# f16; for q8_0 they are reported (q8_0 moves near-tied logits, so a probe may diverge after a few tokens).
TOLERANCE = {"f16": 0.005, "q8_0": 0.10}

# llama.cpp names a BPE pre-tokenizer by the hash of the ids a tokenizer gives for this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the few vocabularies tunelab's architectures use.
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
          "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
          "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}
PROBE_TEXTS = ["Hello, world!", "  two spaces, a\ttab and\nnew lines\n\n", "1234567 + 89 = 1234656",
               "이 영화 정말 재미있어요!", "emoji 🦙 and accents: café naïve", "<|im_start|>user\nhi<|im_end|>"]

Progress = Callable[[str, int], Callable[[int], None]]


class ExportCheckError(TunelabError):
    """The file read back does not behave like the model it was written from."""

    exit_code = 1


@dataclass
class ExportResult:
    out: Path
    format: str
    dtype: str | None = None
    modelfile: Path | None = None
    check: dict = field(default_factory=dict)


def check_out(out: Path, fmt: str) -> Path | None:
    """Refuse an --out that holds something (and, for a GGUF, a Modelfile beside it); returns the Modelfile path."""
    if fmt == "hf":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TunelabError(f"{out} exists and is not empty; choose a new --out")
        return None
    if out.is_dir():
        raise TunelabError(f"{out} is a directory; --out names the .gguf file to write")
    if out.exists() and out.stat().st_size > 0:
        raise TunelabError(f"{out} exists and is not empty; choose a new --out")
    modelfile = out.parent / "Modelfile"
    if modelfile.exists():
        raise TunelabError(f"{modelfile} exists (the export writes its Modelfile beside {out.name}); "
                           "choose another folder for --out")
    return modelfile


def gguf_architecture(model_dir: Path) -> str:
    """llama.cpp's name of the model's architecture, or one line saying it is not supported."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if archs[0] not in ARCHITECTURES:
        raise ModelError(f"{model_dir}: architecture {archs[0]} is not supported by tunelab export --format gguf "
                         f"(supported: {', '.join(ARCHITECTURES)}); --format hf writes any model")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelError(f"{model_dir}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported by "
                         "tunelab export --format gguf (only the default RoPE)")
    return ARCHITECTURES[archs[0]]


def pre_tokenizer_name(tok, where: Path) -> str:
    """The name llama.cpp gives this tokenizer's pre-tokenizer (``tokenizer.ggml.pre``): found as its converter finds
    it, by the hash of the ids of ``CHKTXT``, else by the expression the pre-tokenizer splits text with (GPT-2's, or
    Qwen2's on another vocabulary)."""
    backend = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "backend_tokenizer", None) else {}
    pre = backend.get("pre_tokenizer") or {}
    if backend.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise ModelError(f"{where}: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2, Llama 3, Qwen2 use) can be "
                         "exported to GGUF; this one is not")
    digest = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if splits == [PRETOKENIZE_REGEX]:
        return "qwen2"
    raise ModelError(f"{where}: llama.cpp does not know this tokenizer's pre-tokenizer (hash {digest[:12]}); "
                     f"known: {', '.join(sorted(PRE_TOKENIZERS.values()))}")


def resolve_source(source: str) -> tuple[str, Path]:
    """``("adapter", dir)`` for a LoRA adapter or a train run holding one, ``("model", dir)`` for a full fine-tuning
    run (its model/), the bundled model, an HF directory or a .gguf file (converted once)."""
    from tunelab.models.convert import resolve_local_path

    p = Path(source).expanduser()
    if (adapter_dir(p) / "adapter_config.json").is_file():
        return "adapter", adapter_dir(p)
    if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file():
        return "model", p / "model"
    return "model", resolve_local_path(source)


# ---- the GGUF file -------------------------------------------------------------------------------------------------

def permute(weights: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """Q/K rows from HF's rotate-half RoPE layout to llama.cpp's interleaved one (convert_hf_to_gguf.py's permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model, arch: str) -> list[tuple[str, str, torch.Tensor]]:
    """``(gguf name, hf name, tensor)`` in llama.cpp's layout, the tied output head left out."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    out = []
    for name, t in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"tensor {name} has no llama.cpp name for architecture {arch}")
        t = t.detach().to(torch.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute(t, n_head, n_head)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute(t, n_head, n_kv)
        out.append((new, name, t))
    return out


def tensor_type(name: str, shape: tuple, dtype: str):
    """The GGML type of a tensor as convert_hf_to_gguf.py picks it: 1-D tensors and norms F32, the rest ``dtype``
    (q8_0 falls back to F16 where a row is not a whole number of 32-value blocks)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if dtype == "q8_0":
        return Q.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16
    return Q.F16


def write_gguf(model, tok, model_dir: Path, path: Path, arch: str, dtype: str, *, name: str,
               progress: Progress | None = None) -> dict:
    """Write ``model`` and ``tok`` as a GGUF file at ``path``; returns a summary (tensors, types, pre-tokenizer)."""
    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)

    # The tokenizer: gpt2 (byte-level BPE), as convert_hf_to_gguf.py's _set_vocab_gpt2 writes it.
    pre = pre_tokenizer_name(tok, model_dir)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            special = tok.added_tokens_decoder[i].special or (t.startswith("<|") and t.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    special.chat_template = tok.chat_template
    special.add_special_token = {}
    special.add_to_gguf(w, quiet=True)
    ids = tok("a")["input_ids"]
    w.add_add_bos_token(bool(ids) and ids[0] == tok.bos_token_id and tok.bos_token_id is not None)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tensors = gguf_tensors(model, arch)
    planned = []
    for new, _, t in tensors:
        qtype = tensor_type(new, tuple(t.shape), dtype)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype)))
        w.add_tensor_info(new, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        planned.append(qtype)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    advance = progress("writing GGUF tensors", len(tensors)) if progress else (lambda n: None)
    for (new, _, t), qtype in zip(tensors, planned):
        w.write_tensor_data(gguf.quants.quantize(t.numpy(), qtype))
        advance(1)
    w.close()
    counts: dict[str, int] = {}
    for q in planned:
        counts[q.name] = counts.get(q.name, 0) + 1
    return {"tensors": len(tensors), "types": counts, "pre_tokenizer": pre}


# ---- the check -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def prompt_logits(model, tok, prompts: list[list[dict]]) -> list[torch.Tensor]:
    out = []
    for msgs in prompts:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        out.append(model(input_ids=ids).logits[0].float())
    return out


def check_gguf(model, tok, path: Path, prompts: list[list[dict]], dtype: str, max_new_tokens: int) -> dict:
    """Read ``path`` back through transformers' GGUF loader and compare it with ``model``/``tok``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = PROBE_TEXTS + [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    token_mismatch = next((t for t in texts if tok(t, add_special_tokens=False)["input_ids"]
                           != gtok(t, add_special_tokens=False)["input_ids"]), None)
    special = {k: (getattr(tok, k), getattr(gtok, k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gmodel = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    want, got = greedy(model, tok, prompts, max_new_tokens), greedy(gmodel, tok, prompts, max_new_tokens)
    pairs = list(zip(prompt_logits(model, tok, prompts), prompt_logits(gmodel, tok, prompts)))
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    scale = max(float(a.abs().max()) for a, _ in pairs)
    top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in pairs) / sum(len(a) for a, _ in pairs)
    same = [w == g for w, g in zip(want, got)]
    agree = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
             for w, g in zip(want, got)]
    return {"dtype": dtype, "probes": len(prompts), "max_new_tokens": max_new_tokens,
            "tokenizer_identical": token_mismatch is None, "tokenizer_first_mismatch": token_mismatch,
            "chat_template_identical": gtok.chat_template == tok.chat_template,
            "special_tokens": {k: list(v) for k, v in special.items()},
            "greedy_identical": sum(same), "greedy_first_divergence": agree,
            "max_abs_logit_diff": diff, "max_abs_logit": scale, "relative_logit_diff": diff / max(scale, 1e-12),
            "tolerance": TOLERANCE[dtype], "top1_agreement": top1,
            "mismatches": [{"prompt": p[-1]["content"], "hf": tok.decode(w), "gguf": tok.decode(g)}
                           for p, w, g, s in zip(prompts, want, got, same) if not s]}


def check_failure(check: dict) -> str | None:
    """Why the file fails its check, or None."""
    if not check["tokenizer_identical"]:
        return f"the tokenizer read back gives other ids for {check['tokenizer_first_mismatch']!r}"
    if not check["chat_template_identical"]:
        return "the chat template read back differs"
    if any(a != b for a, b in check["special_tokens"].values()):
        return f"special token ids differ: {check['special_tokens']}"
    if check["relative_logit_diff"] > check["tolerance"]:
        return (f"logits differ by up to {check['max_abs_logit_diff']:.4g}, {check['relative_logit_diff']:.2%} of the "
                f"largest |logit| (tolerance for {check['dtype']}: {check['tolerance']:.1%})")
    if check["dtype"] == "f16" and check["mismatches"]:
        m = check["mismatches"][0]
        return (f"greedy outputs differ on {len(check['mismatches'])} of {check['probes']} probe prompts (first: "
                f"{m['prompt']!r}: HF {m['hf']!r} vs GGUF {m['gguf']!r})")
    return None


# ---- the Modelfile -------------------------------------------------------------------------------------------------

CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""


def chatml_default_system(tok) -> tuple[bool, str | None]:
    """Whether the chat template is ChatML (checked by rendering it), and the system prompt it adds by itself."""
    convo = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    want = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n")
    try:
        if tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True) != want:
            return False, None
        alone = tok.apply_chat_template(convo[1:2], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render these is not ChatML
        return False, None
    tail = "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n"
    head = alone[:-len(tail)] if alone.endswith(tail) else None
    if head == "":
        return True, None
    if head and head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        return True, head[len("<|im_start|>system\n"):-len("<|im_end|>\n")]
    return False, None


def modelfile_text(gguf_name: str, tok, model_dir: Path, context_length: int) -> tuple[str, bool]:
    """An Ollama Modelfile for the GGUF beside it: FROM, TEMPLATE (Go template form of a ChatML chat template), SYSTEM
    (the template's own default), stop tokens and the generation defaults. Returns (text, has_template)."""
    chatml, system = chatml_default_system(tok)
    lines = [f"FROM ./{gguf_name}", ""]
    if chatml:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
        if system:
            lines += [f'SYSTEM """{system}"""', ""]
    stops = ["<|im_start|>", "<|im_end|>"] if chatml else []
    if tok.eos_token and tok.eos_token not in stops:
        stops.append(tok.eos_token)
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {min(int(context_length), 8192)}")
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        g = json.loads(gen.read_text(encoding="utf-8"))
        for k in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if g.get(k) is not None and g.get("do_sample", k == "repetition_penalty"):
                lines.append(f"PARAMETER {'repeat_penalty' if k == 'repetition_penalty' else k} {g[k]}")
    return "\n".join(lines) + "\n", chatml


# ---- the command ---------------------------------------------------------------------------------------------------

def export_model(source: str, out: Path, *, fmt: str = "gguf", dtype: str | None = None, model: str | None = None,
                 probe_file: Path | None = None, max_new_tokens: int = 16, allow_other_base: bool = False,
                 log=print, progress: Progress | None = None) -> ExportResult:
    from transformers import AutoModelForCausalLM

    from tunelab.models.convert import resolve_local_path
    from tunelab.train.tokenizer import load_tokenizer

    # Every input is checked before anything is loaded or written.
    if fmt not in FORMATS:
        raise TunelabError(f"unknown --format {fmt!r}; choose {' or '.join(FORMATS)}")
    if fmt == "hf" and dtype is not None:
        raise TunelabError("--dtype applies to --format gguf only (--format hf writes the model's fp32 weights)")
    dtype = dtype or "f16"
    if dtype not in DTYPES:
        raise TunelabError(f"unknown --dtype {dtype!r}; choose {' or '.join(DTYPES)}")
    out = Path(out)
    modelfile = check_out(out, fmt)
    kind, path = resolve_source(source)
    if kind == "model" and model is not None:
        raise TunelabError("--model names the base of an adapter; the source is a model already")
    base = resolve_local_path(model or base_model_of(path)) if kind == "adapter" else path
    prompts = probe_prompts(path, probe_file)
    if fmt == "hf":
        return export_hf(kind, path, out, model=model, probe_file=probe_file, prompts=prompts,
                         max_new_tokens=max_new_tokens, allow_other_base=allow_other_base, log=log)
    arch = gguf_architecture(base)
    pre_tokenizer_name(load_tokenizer(base), base)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if kind == "adapter":  # merged (and checked) by tunelab merge's code, into a scratch folder
            merge_adapter(path, work / "merged", model=model, probe_file=probe_file, max_new_tokens=max_new_tokens,
                          allow_other_base=allow_other_base, log=log)
            path = work / "merged"
        tok = load_tokenizer(path)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        log(f"writing {out} ({arch}, {dtype}) from {path if kind == 'model' else source}")
        summary = write_gguf(hf, tok, path, work / out.name, arch, dtype, name=model_name(source, path),
                             progress=progress)
        check = check_gguf(hf, tok, work / out.name, prompts, dtype, max_new_tokens) | summary
        text, templated = modelfile_text(out.name, tok, path, hf.config.max_position_embeddings)
        if (why := check_failure(check)) is not None:
            failed = out.with_name(f".{out.name}.failed")
            os.replace(work / out.name, failed)
            raise ExportCheckError(f"export check FAILED: {why}; the file is kept as {failed}")
        os.replace(work / out.name, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    modelfile.write_text(text, encoding="utf-8")
    diverged = "" if check["greedy_identical"] == len(prompts) else \
        f", the others diverging from token {min(check['greedy_first_divergence']) + 1}"
    log(f"export check passed: tokenizer ids identical on {len(PROBE_TEXTS) + len(prompts)} texts, greedy outputs "
        f"identical on {check['greedy_identical']} of {len(prompts)} probe prompts ({max_new_tokens} tokens{diverged}), "
        f"logits within "
        f"{check['max_abs_logit_diff']:.3g} = {check['relative_logit_diff']:.2%} of the largest (tolerance "
        f"{TOLERANCE[dtype]:.1%}), next-token top-1 agreement {check['top1_agreement']:.1%}")
    if not templated:
        log(f"note: the chat template is not ChatML; {modelfile.name} has no TEMPLATE (Ollama reads the one in the "
            "GGUF)")
    return ExportResult(out, fmt, dtype, modelfile, check)


def model_name(source: str, path: Path) -> str:
    p = Path(source)
    return (p.parent.name if p.name in ("adapter", "model") else p.name) or path.name


def export_hf(kind: str, path: Path, out: Path, *, model, probe_file, prompts, max_new_tokens, allow_other_base,
              log) -> ExportResult:
    """A plain HF directory: the adapter merged (tunelab merge, its check included), or the model saved as
    safetensors and checked the same way (greedy outputs of the directory as written equal the source's)."""
    from transformers import AutoModelForCausalLM

    from tunelab.train.tokenizer import load_tokenizer

    if kind == "adapter":
        res = merge_adapter(path, out, model=model, probe_file=probe_file, max_new_tokens=max_new_tokens,
                            allow_other_base=allow_other_base, log=log)
        return ExportResult(res.out, "hf", check={"probes": res.probes, "mismatches": res.mismatches})
    tok = load_tokenizer(path)
    src = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    log(f"writing {out} (HF safetensors) from {path}")
    out.mkdir(parents=True, exist_ok=True)
    src.config.use_cache = True
    src.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    for extra in ("prompt_spec.yaml", "tunelab_train.json", "generation_config.json"):
        if (path / extra).is_file() and not (out / extra).exists():
            shutil.copyfile(path / extra, out / extra)
    want = greedy(src, tok, prompts, max_new_tokens)
    got = greedy(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), tok, prompts,
                 max_new_tokens)
    bad = [p[-1]["content"] for p, w, g in zip(prompts, want, got) if w != g]
    if bad:
        raise ExportCheckError(f"export check FAILED: {out} gives other greedy outputs than {path} on {len(bad)} of "
                               f"{len(prompts)} probe prompts (first: {bad[0]!r})")
    log(f"export check passed: greedy outputs identical on {len(prompts)} probe prompts ({max_new_tokens} tokens)")
    return ExportResult(out, "hf", check={"probes": len(prompts), "mismatches": []})
