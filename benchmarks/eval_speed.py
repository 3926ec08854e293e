"""How much faster is tunelab's label scoring than a naive loop, and what does few-shot cost?

Measured side by side in one run on NSMC dev reviews with the bundled model:

* naive: one item at a time, ``model.generate`` (greedy, fp32, the whole prompt every time), then parse;
* tunelab: log-likelihood of each label, items batched, the shared prompt prefix's KV cache reused,
  the output projection only where a label token is predicted (``LocalModel.score_choices``).

The naive loop runs on the first ``--naive-items`` items (it is slow) and its per-item time is compared
with tunelab's per-item time on all ``--items`` items. Ends with one JSON line of figures.

    python benchmarks/eval_speed.py [--items 200] [--naive-items 40]
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--naive-items", type=int, default=40)
    ap.add_argument("--data", default=str(ROOT / "examples/data/nsmc_three_dev_300.jsonl"))
    args = ap.parse_args()

    items = read_records(args.data, limit=args.items)
    zero = load_prompt_spec(ROOT / "examples/prompts/sentiment_zeroshot.yaml")
    eight = load_prompt_spec(ROOT / "examples/prompts/sentiment_8shot.yaml")
    naive_model = load_model(None, dtype="float32")  # what a plain loop gets from from_pretrained
    model = load_model(None)  # tunelab's defaults (bf16 autocast where the CPU has native bf16)
    model.score_choices([zero.render(items[0])], zero.labels)  # warm-up

    results = {}
    for name, spec in (("zero_shot", zero), ("eight_shot", eight)):
        naive_s = naive_loop(naive_model, spec, items[:args.naive_items])
        fast_s, acc = fast(model, spec, items)
        fast32_s, _ = fast(naive_model, spec, items)
        tokens = sum(model.count_tokens(spec.render(it)) for it in items) / len(items)
        results[name] = dict(naive_ms=naive_s * 1000, fast_ms=fast_s * 1000, fast_fp32_ms=fast32_s * 1000,
                             speedup=naive_s / fast_s, speedup_fp32=naive_s / fast32_s, accuracy=acc,
                             prompt_tokens=tokens)
        print(f"{name:10s}  prompt {tokens:6.0f} tok/item  naive {naive_s * 1000:7.1f} ms/item  "
              f"tunelab {fast_s * 1000:6.1f} ms/item (fp32 {fast32_s * 1000:6.1f})  "
              f"speed-up {naive_s / fast_s:5.1f}x (fp32 {naive_s / fast32_s:4.1f}x)  accuracy {acc:.3f}", flush=True)
    fewshot_cost = results["eight_shot"]["fast_ms"] / results["zero_shot"]["fast_ms"]
    print(f"8-shot cost relative to zero-shot with tunelab: {fewshot_cost:.2f}x "
          f"(prompt {results['eight_shot']['prompt_tokens'] / results['zero_shot']['prompt_tokens']:.1f}x longer)")
    figures = {"speedup": round(results["eight_shot"]["speedup"], 2),
               "speedup_zero_shot": round(results["zero_shot"]["speedup"], 2),
               "speedup_fp32": round(results["eight_shot"]["speedup_fp32"], 2),
               "fewshot_cost": round(fewshot_cost, 3),
               "naive_ms_per_item_zero_shot": round(results["zero_shot"]["naive_ms"], 1),
               "items": len(items), "naive_items": args.naive_items}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
