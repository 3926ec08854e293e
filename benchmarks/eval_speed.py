"""How much faster is tunelab's label scoring than a naive loop, what does few-shot cost, and what does an adapter cost?

Measured side by side in one run on NSMC dev reviews with the bundled model:

* naive: one item at a time, ``model.generate`` (greedy, fp32, the whole prompt every time), then parse;
* tunelab: log-likelihood of each label, items batched, the shared prompt prefix's KV cache reused,
  the output projection only where a label token is predicted (``LocalModel.score_choices``);
* adapter: the same zero-shot scoring with a LoRA adapter (r16, all linear layers, random non-zero weights) as
  ``tunelab eval --adapter`` loads it (merged into the base), and, for comparison, the same adapter kept as
  unmerged PEFT layers (what eval did before).

The naive loop runs on the first ``--naive-items`` items (it is slow) and its per-item time is compared
with tunelab's per-item time on all ``--items`` items. Every figure is the median over ``--repeats`` rounds, and
in each round every path runs once, one after the other (interleaved), so a busy moment of the machine touches
all of them alike. Ends with one JSON line of figures.

    python benchmarks/eval_speed.py [--items 200] [--naive-items 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tunelab.data.io import read_records  # noqa: E402
from tunelab.models import load_model  # noqa: E402
from tunelab.prompts import load_prompt_spec  # noqa: E402


def naive_loop(model, spec, items, max_new_tokens: int = 4) -> float:
    """Per-item seconds of the plain approach: generate for each item, then parse."""
    tok, hf = model.tokenizer, model.model
    t0 = time.perf_counter()
    for it in items:
        text = tok.apply_chat_template(spec.render(it), tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = hf.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        spec.parse(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return (time.perf_counter() - t0) / len(items)


def fast(model, spec, items) -> tuple[float, float]:
    msgs = [spec.render(it) for it in items]
    t0 = time.perf_counter()
    scores = model.score_choices(msgs, spec.labels)
    per_item = (time.perf_counter() - t0) / len(items)
    acc = sum(spec.labels[s.best] == spec.gold(it) for s, it in zip(scores, items)) / len(items)
    return per_item, acc


def random_adapter(model, out: Path) -> Path:
    """A LoRA adapter of the default recipe's shape (r16, all linear layers) with random non-zero weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    peft.save_pretrained(str(out))
    return out


def unmerged(adapter: Path):
    """The bundled model with ``adapter`` as unmerged PEFT layers (how ``eval --adapter`` ran before)."""
    from peft import PeftModel

    from tunelab.models.scoring import PrefixScorer

    m = load_model(None)
    m.model = PeftModel.from_pretrained(m.model, str(adapter)).eval()
    m._scorer = PrefixScorer(m.model, autocast_dtype=m.autocast_dtype)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--naive-items", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=str(ROOT / "examples/data/nsmc_three_dev_300.jsonl"))
    args = ap.parse_args()

    items = read_records(args.data, limit=args.items)
    zero = load_prompt_spec(ROOT / "examples/prompts/sentiment_zeroshot.yaml")
    eight = load_prompt_spec(ROOT / "examples/prompts/sentiment_8shot.yaml")
    naive_model = load_model(None, dtype="float32")  # what a plain loop gets from from_pretrained
    model = load_model(None)  # tunelab's defaults (bf16 autocast where the CPU has native bf16)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = random_adapter(model, Path(tmp) / "adapter")
        with_adapter = load_model(None, adapter=adapter)  # as `tunelab eval --adapter` loads it: merged
        peft_layers = unmerged(adapter)
    for m in (model, naive_model, with_adapter, peft_layers):
        m.score_choices([zero.render(items[0])], zero.labels)  # warm-up

    runs: dict[str, list[float]] = {}
    acc: dict[str, float] = {}
    few = items[:args.naive_items]
    for r in range(args.repeats):
        for name, spec in (("zero_shot", zero), ("eight_shot", eight)):
            runs.setdefault(f"{name}.naive", []).append(naive_loop(naive_model, spec, few))
            t, acc[name] = fast(model, spec, items)
            runs.setdefault(f"{name}.fast", []).append(t)
            runs.setdefault(f"{name}.fast_fp32", []).append(fast(naive_model, spec, items)[0])
        # base, merged, unmerged: each right after a short untimed call of its own (the first call after another
        # model ran is slower, whichever model it is: without this the base, timed first, looked 1.5x slower)
        for key, m, its in (("adapter.base", model, items), ("adapter.merged", with_adapter, items),
                            ("adapter.unmerged", peft_layers, few)):
            fast(m, zero, few[:4])
            runs.setdefault(key, []).append(fast(m, zero, its)[0])
        print(f"round {r + 1}/{args.repeats}: " + "  ".join(f"{k} {v[-1] * 1000:.0f}" for k, v in runs.items())
              + " ms/item", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in runs.items()}

    results = {}
    for name, spec in (("zero_shot", zero), ("eight_shot", eight)):
        naive_s, fast_s, fast32_s = med[f"{name}.naive"], med[f"{name}.fast"], med[f"{name}.fast_fp32"]
        tokens = sum(model.count_tokens(spec.render(it)) for it in items) / len(items)
        results[name] = dict(speedup=naive_s / fast_s, speedup_fp32=naive_s / fast32_s, prompt_tokens=tokens)
        print(f"{name:10s}  prompt {tokens:6.0f} tok/item  naive {naive_s * 1000:7.1f} ms/item  "
              f"tunelab {fast_s * 1000:6.1f} ms/item (fp32 {fast32_s * 1000:6.1f})  "
              f"speed-up {naive_s / fast_s:5.1f}x (fp32 {naive_s / fast32_s:4.1f}x)  accuracy {acc[name]:.3f}", flush=True)
    fewshot_cost = med["eight_shot.fast"] / med["zero_shot.fast"]
    print(f"8-shot cost relative to zero-shot with tunelab: {fewshot_cost:.2f}x "
          f"(prompt {results['eight_shot']['prompt_tokens'] / results['zero_shot']['prompt_tokens']:.1f}x longer)")
    adapter_ratio = med["adapter.base"] / med["adapter.merged"]
    unmerged_ratio = med["adapter.base"] / med["adapter.unmerged"]
    print(f"adapter (r16 all-linear) zero-shot: {med['adapter.merged'] * 1000:.1f} ms/item as eval --adapter loads it "
          f"(merged): {adapter_ratio:.2f}x the base's items/s; unmerged PEFT layers {med['adapter.unmerged'] * 1000:.1f} "
          f"ms/item: {unmerged_ratio:.2f}x")
    print("largest spread over rounds (max-min)/median: " + f"{max(spread.values()):.0%} ({max(spread, key=spread.get)})")
    figures = {"speedup": round(results["eight_shot"]["speedup"], 2),
               "speedup_zero_shot": round(results["zero_shot"]["speedup"], 2),
               "speedup_fp32": round(results["eight_shot"]["speedup_fp32"], 2),
               "fewshot_cost": round(fewshot_cost, 3),
               "adapter_vs_base": round(adapter_ratio, 3), "unmerged_adapter_vs_base": round(unmerged_ratio, 3),
               "naive_ms_per_item_zero_shot": round(med["zero_shot.naive"] * 1000, 1),
               "items": len(items), "naive_items": args.naive_items, "repeats": args.repeats,
               "max_spread": round(max(spread.values()), 3)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
