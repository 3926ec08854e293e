"""Teacher labels vs gold labels on NSMC: label training reviews with a teacher, train one LoRA adapter on the
teacher's labels and one on the gold labels (same texts, same prompt, same recipe and seed), and compare
both on the same dev reviews. See docs/generate.md, "Teacher labels vs gold labels".

    # plumbing: the bundled SmolLM2-135M served in-process by `tunelab serve` is the teacher
    python examples/teacher_vs_gold.py --n 64 --epochs 1 --out runs/teacher_vs_gold/plumbing

    # a GPT-4-class teacher (any OpenAI-compatible endpoint; the key only in the named variable)
    OPENAI_API_KEY=... python examples/teacher_vs_gold.py --base-url https://api.openai.com/v1 \\
        --teacher-model gpt-4o-mini --n 4000 --train-data examples/data/nsmc_binary_train_4000.jsonl \\
        --dev-data examples/data/nsmc_binary_dev_600.jsonl --dev-limit 600 --out runs/teacher_vs_gold/gpt4o-mini

Rerunning the same command reuses the teacher's answers (journal in OUT/teacher) and retrains the students.
Prints a table and writes OUT/summary.json. Exit code 2 with one `error: ...` line on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--label-config", type=Path, default=HERE / "generate" / "nsmc_teacher_label.yaml",
                   help="tunelab generate label config: the prompt, teacher settings, sampling, quality, budget "
                        "(default: %(default)s)")
    g.add_argument("--train-data", type=Path, default=None,
                   help="labelled training items (default: the config's data.path, nsmc_binary_train_512.jsonl)")
    g.add_argument("--dev-data", type=Path, default=HERE / "data" / "nsmc_binary_dev_200.jsonl")
    g.add_argument("--n", type=int, default=64, help="training texts sent to the teacher (the first N)")
    g.add_argument("--dev-limit", type=int, default=200, help="dev items scored (the first N)")
    g.add_argument("--out", type=Path, default=Path("runs/teacher_vs_gold"))
    t = ap.add_argument_group("teacher")
    t.add_argument("--base-url", default=None,
                   help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1; "
                        "default: serve the bundled model in-process on 127.0.0.1 (plumbing)")
    t.add_argument("--teacher-model", default=None, help="model name at the endpoint (default: the config's)")
    t.add_argument("--api-key-env", default=None,
                   help="name of the environment variable that holds the key (default: the config's, "
                        "OPENAI_API_KEY); never the key itself")
    t.add_argument("--concurrency", type=int, default=None)
    t.add_argument("--max-cost-usd", type=float, default=None, help="teacher budget (default: the config's)")
    t.add_argument("--no-cache", action="store_true", help="neither read nor fill tunelab's response caches")
    s = ap.add_argument_group("students (one recipe for both)")
    s.add_argument("--train-config", type=Path, default=HERE / "train" / "nsmc_lora.yaml",
                   help="tunelab train config for the recipe; its data, eval and forgetting are replaced "
                        "(default: %(default)s)")
    s.add_argument("--student-model", default=None, help="default: the train config's (bundled)")
    s.add_argument("--student-prompt", type=Path, default=None,
                   help="PromptSpec the students are trained and evaluated with (default: the teacher's, so they "
                        "train on generate's chat.jsonl); e.g. examples/train/sentiment_binary_short.yaml: about "
                        "100 instead of 250 tokens a review")
    s.add_argument("--epochs", type=float, default=None)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--micro-batch-size", type=int, default=None)
    s.add_argument("--lora-r", type=int, default=None)
    s.add_argument("--lora-alpha", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="any train config field, e.g. --set optim.warmup_ratio=0.1 (repeatable)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tunelab.errors import TunelabError
    from tunelab.generate.compare import CompareOptions, format_table, run_teacher_vs_gold
    from tunelab.train.command import parse_set

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        opts = CompareOptions(
            label_config=a.label_config, dev_data=a.dev_data, out=a.out, train_data=a.train_data, n=a.n,
            dev_limit=a.dev_limit, student_prompt=a.student_prompt, teacher_model=a.teacher_model,
            base_url=a.base_url, api_key_env=a.api_key_env,
            concurrency=a.concurrency, max_cost_usd=a.max_cost_usd, use_cache=not a.no_cache,
            train_config=a.train_config, student_model=a.student_model, epochs=a.epochs, max_steps=a.max_steps,
            lr=a.lr, batch_size=a.batch_size, micro_batch_size=a.micro_batch_size, lora_r=a.lora_r,
            lora_alpha=a.lora_alpha, seed=a.seed, threads=a.threads, device=a.device, sets=parse_set(a.sets))
        summary = run_teacher_vs_gold(opts, log=log)
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"summary: {summary['outputs']['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
