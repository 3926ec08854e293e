"""How far does a model with no language knowledge get on NSMC (binary or three-class)? The yardstick for the training recipes.

A character n-gram TF-IDF + logistic regression (scikit-learn, the `bench` extra) learns from the same
training reviews as benchmarks/nsmc_recipes.py and is scored on the same held-out reviews (movies in no
training split). Its settings (n-gram range, C) are chosen by cross-validation over training movies
(GroupKFold on movie_id, as the held-out split is by movie), never on the held-out reviews. It also prints a
learning curve (the same settings on random subsets of the training reviews).

With ``--against runs/recipes/NAME/eval/results.jsonl`` it pairs the baseline with a trained model on the same
reviews: the difference with its bootstrap interval, McNemar's exact p, the reviews each gets right alone,
and the accuracy of the two models' averaged probabilities (do they fail on different reviews?).

    python benchmarks/nsmc_baseline.py
    python benchmarks/nsmc_baseline.py --train examples/data/nsmc_three_train_6000.jsonl \\
        --dev examples/data/nsmc_three_dev_900.jsonl        # three classes
    python benchmarks/nsmc_baseline.py --extra examples/data/nsmc_binary_extra_287.jsonl \\
        --against runs/recipes/lora_emb_pl0.1_lr5e-4_e2_b8/eval/results.jsonl

Ends with one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "examples" / "data"
GRID = {"ngram_range": [(1, 3), (2, 4), (1, 4)], "C": [0.3, 1.0, 3.0]}


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit 2 (as every tunelab command)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def read_items(path: Path, need: tuple[str, ...] = ()) -> list[dict]:
    """tunelab's JSONL reader (file:line errors) plus the fields every row needs."""
    from tunelab.data.io import read_jsonl, record_location
    from tunelab.errors import DataError

    rows = read_jsonl(path)
    for row in rows:
        missing = [f for f in need if f not in row]
        if missing:
            raise DataError(f"expected the fields {', '.join(need)}; missing {', '.join(missing)}",
                            where=record_location(row, path))
    return rows


def make_model(ngram_range: tuple[int, int], C: float):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=ngram_range, sublinear_tf=True),
                         LogisticRegression(C=C, max_iter=3000))


def choose(train: list[dict], folds: int) -> tuple[dict, list[dict]]:
    """The grid point with the best mean accuracy over GroupKFold(movie_id) folds of the training reviews
    (the pipeline refits TF-IDF in every fold: no fold sees another's text)."""
    from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedKFold

    grid = {"tfidfvectorizer__ngram_range": GRID["ngram_range"], "logisticregression__C": GRID["C"]}
    by_movie = all("movie_id" in r for r in train)
    if not by_movie:
        print("  (no movie_id on every training row: folds are stratified by label instead of split by movie)")
    cv = GroupKFold(n_splits=folds) if by_movie else StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    search = GridSearchCV(make_model((2, 4), 1.0), grid, cv=cv, scoring="accuracy")
    search.fit([r["text"] for r in train], [r["label"] for r in train],
               groups=[r["movie_id"] for r in train] if by_movie else None)
    table = [{"ngram_range": list(p["tfidfvectorizer__ngram_range"]), "C": p["logisticregression__C"],
              "cv_accuracy": round(float(s) * 100, 2)}
             for p, s in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"])]
    best = max(table, key=lambda r: r["cv_accuracy"])
    return {"ngram_range": best["ngram_range"], "C": best["C"]}, table


def model_rows(dev: list[dict], classes: list[str], results: Path, evaluated: list[dict], model: str) -> list[dict]:
    """A trained model's eval rows (``evaluated``, tunelab eval's results.jsonl of ``results``: item_id,
    correct, scores) in the order of the held-out reviews; exits 2 unless every review has one, label-scored
    over ``classes``. Called before any fitting."""
    rows = {str(r["item_id"]): r for r in evaluated if r.get("model") == model}
    if not rows:
        fail(f"error: {results}: no rows of model {model!r} (the trained model is 'after')")
    ids = [str(r["id"]) for r in dev]
    missing = [i for i in ids if i not in rows]
    if missing:
        fail(f"error: {results}: {len(missing)} of the {len(ids)} held-out reviews have no row (first: {missing[0]})")
    first = rows[ids[0]].get("scores") or {}
    if sorted(first) != classes:
        fail(f"error: {results}: label scores {sorted(first)} are not the training labels {classes} "
                 "(scored with another prompt, or generated instead of label-scored)")
    return [rows[i] for i in ids]


def against(classes: list[str], gold: np.ndarray, probs: np.ndarray, results: Path, rows: list[dict]) -> dict:
    """Pair the baseline with a trained model's rows (from ``model_rows``, in held-out order)."""
    from tunelab.stats import mcnemar_exact, paired_bootstrap_diff

    lm_ok = np.array([bool(r["correct"]) for r in rows])
    base_ok = probs.argmax(1) == gold
    # the trained model's label log-likelihoods -> probabilities over the labels (a softmax)
    lm = np.array([[r["scores"][c] for c in classes] for r in rows])
    lm = np.exp(lm - lm.max(1, keepdims=True))
    lm /= lm.sum(1, keepdims=True)
    avg_ok = ((lm + probs) / 2).argmax(1) == gold
    diff = paired_bootstrap_diff(lm_ok.astype(float), base_ok.astype(float), seed=0)
    mc = mcnemar_exact(lm_ok, base_ok)
    return {"results": str(results), "model_accuracy": round(lm_ok.mean() * 100, 2),
            "baseline_accuracy": round(base_ok.mean() * 100, 2),
            "diff": round(diff.value * 100, 2), "diff_ci": [round(diff.low * 100, 2), round(diff.high * 100, 2)],
            "mcnemar_p": round(mc.p_value, 4), "only_model": int((lm_ok & ~base_ok).sum()),
            "only_baseline": int((base_ok & ~lm_ok).sum()), "both_wrong": int((~lm_ok & ~base_ok).sum()),
            "averaged_accuracy": round(avg_ok.mean() * 100, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=DATA / "nsmc_binary_train_4000.jsonl")
    ap.add_argument("--extra", type=Path, action="append", default=[], help="more training reviews (repeatable)")
    ap.add_argument("--dev", type=Path, default=DATA / "nsmc_binary_dev_600.jsonl")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--curve", type=int, nargs="*", default=[1000, 2000, 3000])
    ap.add_argument("--against", type=Path, action="append", default=[],
                    help="a trained model's eval results.jsonl (repeatable)")
    ap.add_argument("--model", default="after", help="which model's rows in --against files")
    args = ap.parse_args()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        fail("error: scikit-learn is needed: pip install -e '.[bench]'")
    from tunelab.errors import TunelabError
    from tunelab.stats import wilson_interval

    t0 = time.perf_counter()
    try:  # every file read (and checked) before any fitting
        train = [r for p in [args.train, *args.extra] for r in read_items(p, ("text", "label"))]
        dev = read_items(args.dev, ("id", "text", "label"))
        evaluated = [read_items(p) for p in args.against]
    except TunelabError as e:
        fail(f"error: {e}")
    classes = sorted({r["label"] for r in train})
    unknown = sorted({r["label"] for r in dev} - set(classes))
    if unknown:
        fail(f"error: {args.dev}: labels {unknown} are in no training review")
    gold = np.array([classes.index(r["label"]) for r in dev])
    paired = [model_rows(dev, classes, p, rows, args.model) for p, rows in zip(args.against, evaluated)]
    best, table = choose(train, args.folds)
    for row in sorted(table, key=lambda r: -r["cv_accuracy"]):
        print(f"  cv over training movies: ngram {tuple(row['ngram_range'])} C {row['C']:<4}  {row['cv_accuracy']:.2f}%")

    def fit_score(items: list[dict]) -> tuple[float, np.ndarray]:
        """Accuracy on the held-out reviews and their probabilities, columns in ``classes`` order."""
        m = make_model(tuple(best["ngram_range"]), best["C"]).fit([r["text"] for r in items],
                                                                   [r["label"] for r in items])
        p = m.predict_proba([r["text"] for r in dev])[:, [list(m.classes_).index(c) for c in classes]]
        return float((p.argmax(1) == gold).mean()), p

    acc, probs = fit_score(train)
    lo, hi = wilson_interval(int(round(acc * len(dev))), len(dev))
    print(f"baseline (char n-gram {tuple(best['ngram_range'])} TF-IDF + logistic regression, C {best['C']}), "
          f"{len(train)} training reviews -> {acc * 100:.1f}% [{lo * 100:.1f}, {hi * 100:.1f}] on {len(dev)} held-out")
    rng = np.random.default_rng(0)
    curve = []
    for n in [n for n in args.curve if n < len(train)]:
        a, _ = fit_score([train[i] for i in rng.permutation(len(train))[:n]])
        curve.append({"train": n, "accuracy": round(a * 100, 2)})
        print(f"  learning curve: {n:>5} training reviews -> {a * 100:.1f}%")
    curve.append({"train": len(train), "accuracy": round(acc * 100, 2)})
    pairs = []
    for path, rows in zip(args.against, paired):
        c = against(classes, gold, probs, path, rows)
        pairs.append(c)
        print(f"{path}: model {c['model_accuracy']:.1f}% vs baseline {c['baseline_accuracy']:.1f}%: "
              f"{c['diff']:+.1f} [{c['diff_ci'][0]:+.1f}, {c['diff_ci'][1]:+.1f}], McNemar p = {c['mcnemar_p']:.3g} "
              f"({c['only_model']} right only with the model, {c['only_baseline']} only with the baseline, "
              f"{c['both_wrong']} wrong in both); probabilities averaged: {c['averaged_accuracy']:.1f}%")
    print(json.dumps({"baseline_accuracy": round(acc * 100, 2), "ci": [round(lo * 100, 2), round(hi * 100, 2)],
                      "n_train": len(train), "n_dev": len(dev), "ngram_range": list(best["ngram_range"]),
                      "C": best["C"], "curve": curve, "against": pairs,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
