"""`tunelab merge`: fold a LoRA adapter into its base and write a plain HF model directory (safetensors).

After writing, the merged directory is loaded back from disk and its greedy outputs on probe prompts are
compared with the base + adapter (unmerged, fp32). Any difference is an error (exit code 1): a merged model
that does not behave like the adapter it came from must not be shipped silently. So is a logit of the merged model
that differs from the adapter's, on the probes (prompt + the adapter's answer), by more than ``LOGIT_TOLERANCE``
times the largest |logit| of the adapter.

A QLoRA adapter (trained with ``lora.quantize``, recorded in its ``tunelab_train.json``) learnt its update against
the quantised base. It is folded into that base dequantised to fp32 (the QLoRA way: each Linear weight becomes
dequant(quant(W)) + scale * B @ A, as PEFT's merge of a 4-bit layer does before it re-quantises), so the merged
model is a plain fp32 HF model that computes what the adapter did in training; the check compares it with the
adapter on the quantised base (compute dtype fp32).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models.adapters import BaseInfo, adapter_load_error, adapter_quantize, check_adapter_fits
from tunelab.models.base import find_adapter_dir
from tunelab.models.quantize import load_dequantized, load_quantized

# Largest |logit difference| between the merged model and the unmerged adapter on the probes, as a share of the
# adapter's largest |logit| (fp32 logits). Folding B @ A into the weight changes only the order of fp32 sums: observed
# below 1e-6 on the tiny test models, for the fp32 base and the dequantised nf4 one alike. int8 (LLM.int8) also
# quantises each matmul's input rows to 8 bits, which a merged fp32 model does not: observed 5e-3, allowed 2e-2.
LOGIT_TOLERANCE = {"none": 1e-4, "nf4": 1e-4, "int8": 2e-2}

DEFAULT_PROBES = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "이 영화 정말 재미있어요!",
    "Explain what a neural network is in simple words.",
]


class MergeCheckError(TunelabError):
    """The merged model's greedy outputs differ from the adapter's."""

    exit_code = 1


@dataclass
class MergeResult:
    out: Path
    probes: int
    max_new_tokens: int
    mismatches: list[dict]
    max_logit_diff: float | None = None  # relative to the adapter's largest |logit|


def base_model_of(adapter: Path) -> str | None:
    meta = adapter / "tunelab_train.json"
    if meta.is_file():
        m = json.loads(meta.read_text(encoding="utf-8"))
        if m.get("base_model_path") and Path(m["base_model_path"]).is_dir():
            return m["base_model_path"]
        return m.get("base_model")
    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return cfg.get("base_model_name_or_path")


def probe_prompts(adapter: Path, probe_file: Path | None, n: int = 8) -> list[list[dict]]:
    """Probe conversations: the first ``n`` records of a JSONL file (chat messages, items rendered with the
    adapter's PromptSpec, or a ``prompt``/``text`` field), else a few built-in general prompts."""
    if probe_file is not None:
        from tunelab.data.io import read_records

        from tunelab.errors import DataError

        rows = read_records(probe_file, limit=n)
        if not rows:
            raise DataError("no probe records (JSONL of messages, items or prompt/text fields)", where=str(probe_file))
        for i, r in enumerate(rows):
            msgs = r.get("messages", [])
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                      for m in msgs):
                raise DataError("messages must be a list of {role, content} objects",
                                where=f"{probe_file}:{r.get('_line', i + 1)}")
        spec = None
        if (adapter / "prompt_spec.yaml").is_file() and not any("messages" in r or "prompt" in r for r in rows):
            from tunelab.prompts import load_prompt_spec

            spec = load_prompt_spec(adapter / "prompt_spec.yaml")
        out = []
        for r in rows:
            if "messages" in r:
                out.append([m for m in r["messages"] if m.get("role") != "assistant"] or r["messages"])
            elif spec is not None:
                out.append(spec.render(r))
            else:
                out.append([{"role": "user", "content": str(r.get("prompt") or r.get("text") or r)}])
        return out
    return [[{"role": "user", "content": p}] for p in DEFAULT_PROBES]


@torch.no_grad()
def greedy(model, tok, prompts: list[list[dict]], max_new_tokens: int) -> list[list[int]]:
    outs = []
    for msgs in prompts:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id)
        outs.append(seq[0, ids.shape[1]:].tolist())
    return outs


@torch.no_grad()
def probe_logits(model, tok, prompts: list[list[dict]], answers: list[list[int]]) -> list[torch.Tensor]:
    """The fp32 logits of ``model`` at every position of each prompt followed by its answer tokens."""
    out = []
    for msgs, answer in zip(prompts, answers):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] + list(answer)])
        out.append(model(input_ids=ids).logits[0].float())
    return out


def merge_adapter(adapter: Path, out: Path, *, model: str | None = None, probe_file: Path | None = None,
                  max_new_tokens: int = 24, allow_other_base: bool = False, log=print) -> MergeResult:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models.convert import resolve_local_path
    from tunelab.train.tokenizer import load_tokenizer

    # Every input is checked before anything is loaded or written: the adapter, --out, the probe file, the base.
    adapter = find_adapter_dir(Path(adapter))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunelabError(f"{out} exists and is not empty; choose a new --out")
    prompts = probe_prompts(adapter, probe_file)
    base_path = resolve_local_path(model or base_model_of(adapter))
    tok = load_tokenizer(base_path)
    tmpl = adapter / "chat_template.jinja"
    if tmpl.is_file():
        tok.chat_template = tmpl.read_text(encoding="utf-8")

    quantize = adapter_quantize(adapter)

    def base_model(dequantized: bool = False):
        """The fp32 base; for a QLoRA adapter the quantised base (``dequantized``: turned back into fp32 Linears)."""
        if quantize == "none":
            return AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
        if dequantized:
            return load_dequantized(base_path, quantize)
        return load_quantized(base_path, quantize, "cpu", compute_dtype=torch.float32)

    def adapted(dequantized: bool = False):
        try:
            return PeftModel.from_pretrained(base_model(dequantized), str(adapter)).eval()
        except (RuntimeError, ValueError, KeyError) as e:
            raise adapter_load_error(adapter, e) from None

    check_adapter_fits(BaseInfo.of(AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32),
                                   base_path), adapter, allow_other_base=allow_other_base,
                       allow_hint="or --allow-other-base to merge it anyway", warn=log)
    if quantize == "none":
        log(f"merging {adapter} into {base_path}")
    else:
        log(f"merging {adapter} (QLoRA, trained on the {quantize} base) into {base_path} dequantised from {quantize} "
            f"to fp32")
    merged = adapted(dequantized=True).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.config.use_cache = True
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    for extra in ("prompt_spec.yaml", "tunelab_train.json"):
        if (adapter / extra).is_file():
            shutil.copyfile(adapter / extra, out / extra)
    del merged
    # The check: the directory as written, loaded fresh, against the unmerged adapter (on the quantised base for a
    # QLoRA adapter).
    reference = adapted()
    want = greedy(reference, tok, prompts, max_new_tokens)
    fresh = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    got = greedy(fresh, tok, prompts, max_new_tokens)
    ref_logits, got_logits = probe_logits(reference, tok, prompts, want), probe_logits(fresh, tok, prompts, want)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref_logits, got_logits)) \
        / max(float(a.abs().max()) for a in ref_logits)
    tolerance = LOGIT_TOLERANCE.get(quantize, LOGIT_TOLERANCE["none"])
    bad = [{"prompt": p[-1]["content"], "adapter": tok.decode(w), "merged": tok.decode(g)}
           for p, w, g in zip(prompts, want, got) if w != g]
    result = MergeResult(out, len(prompts), max_new_tokens, bad, max_logit_diff=diff)
    (out / "merge_check.json").write_text(json.dumps(
        {"adapter": str(adapter), "base": str(base_path), "quantize": quantize,
         "reference": "adapter on the base" if quantize == "none" else f"adapter on the {quantize} base (bitsandbytes)",
         "probes": len(prompts), "max_new_tokens": max_new_tokens, "identical": not bad, "mismatches": bad,
         "max_logit_diff_rel": diff, "logit_tolerance_rel": tolerance}, ensure_ascii=False, indent=2),
        encoding="utf-8")
    if bad:
        raise MergeCheckError(f"merge check FAILED: greedy outputs of the merged model differ from the adapter's on "
                              f"{len(bad)} of {len(prompts)} probe prompts (first: {bad[0]['prompt']!r}: adapter "
                              f"{bad[0]['adapter']!r} vs merged {bad[0]['merged']!r}); see {out / 'merge_check.json'}")
    if diff > tolerance:
        raise MergeCheckError(f"merge check FAILED: the merged model's logits differ from the adapter's by up to "
                              f"{diff:.2e} of the largest logit on the probe prompts (tolerance {tolerance:.0e}); see "
                              f"{out / 'merge_check.json'}")
    log(f"merge check passed: greedy outputs identical on {len(prompts)} probe prompts ({max_new_tokens} tokens), "
        f"logits within {diff:.1e} of the largest (tolerance {tolerance:.0e})")
    return result
