"""`tunelab merge`: fold a LoRA adapter into its base and write a plain HF model directory (safetensors).

After writing, the merged directory is loaded back from disk and its greedy outputs on probe prompts are
compared with the base + adapter (unmerged, fp32). Any difference is an error (exit code 1): a merged model
that does not behave like the adapter it came from must not be shipped silently.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models.adapters import BaseInfo, adapter_load_error, check_adapter_fits
from tunelab.models.base import find_adapter_dir

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

    def adapted():
        base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
        try:
            return PeftModel.from_pretrained(base, str(adapter)).eval()
        except (RuntimeError, ValueError, KeyError) as e:
            raise adapter_load_error(adapter, e) from None

    check_adapter_fits(BaseInfo.of(AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32),
                                   base_path), adapter, allow_other_base=allow_other_base,
                       allow_hint="or --allow-other-base to merge it anyway", warn=log)
    log(f"merging {adapter} into {base_path}")
    merged = adapted().merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.config.use_cache = True
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    for extra in ("prompt_spec.yaml", "tunelab_train.json"):
        if (adapter / extra).is_file():
            shutil.copyfile(adapter / extra, out / extra)
    del merged
    # The check: the directory as written, loaded fresh, against the unmerged adapter.
    want = greedy(adapted(), tok, prompts, max_new_tokens)
    got = greedy(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), tok, prompts,
                 max_new_tokens)
    bad = [{"prompt": p[-1]["content"], "adapter": tok.decode(w), "merged": tok.decode(g)}
           for p, w, g in zip(prompts, want, got) if w != g]
    result = MergeResult(out, len(prompts), max_new_tokens, bad)
    (out / "merge_check.json").write_text(json.dumps(
        {"adapter": str(adapter), "base": str(base_path), "probes": len(prompts), "max_new_tokens": max_new_tokens,
         "identical": not bad, "mismatches": bad}, ensure_ascii=False, indent=2), encoding="utf-8")
    if bad:
        raise MergeCheckError(f"merge check FAILED: greedy outputs of the merged model differ from the adapter's on "
                              f"{len(bad)} of {len(prompts)} probe prompts (first: {bad[0]['prompt']!r}: adapter "
                              f"{bad[0]['adapter']!r} vs merged {bad[0]['merged']!r}); see {out / 'merge_check.json'}")
    log(f"merge check passed: greedy outputs identical on {len(prompts)} probe prompts ({max_new_tokens} tokens)")
    return result
