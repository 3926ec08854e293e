"""lm-evaluation-harness against `tunelab serve` through its `local-completions` model type.

A tiny multiple-choice task from a local JSONL file (nothing is downloaded) is scored twice: through the
server (log-likelihoods from `/v1/completions` with echo + logprobs) and with lm-eval's own in-process
`hf` model. Both must pick the same answers. Needs the optional `lm-eval` package.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[api]')")
pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra (pip install 'lm-eval[api]')")

DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "four"], "answer": 1},
    {"question": "Which color is the sky on a clear day?", "choices": ["green", "red", "blue"], "answer": 2},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "answer": 0},
]
TASK = """task: tunelab_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_matches_in_process_hf(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tunelab.models.convert import resolve_local_path
    from tunelab.serve.app import ServerThread, build_app
    from tunelab.serve.config import ServeConfig

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny.yaml").write_text(TASK.format(data=data))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "lm-eval-key")  # local-completions sends it as the bearer token
    model_dir = str(resolve_local_path(None))

    def run(model: str, model_args: dict) -> list:
        out = simple_evaluate(model=model, model_args=model_args, tasks=["tunelab_tiny_mc"],
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                              log_samples=True,
                              bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        return out["samples"]["tunelab_tiny_mc"]

    app = build_app(ServeConfig(dtype="float32", api_key="lm-eval-key"))
    with ServerThread(app) as srv:
        served = run("local-completions", {"model": "smollm2-135m", "base_url": srv.url + "/v1/completions",
                                           "tokenizer_backend": "huggingface", "tokenizer": model_dir,
                                           "max_retries": 1, "num_concurrent": 1})
    local = run("hf", {"pretrained": model_dir, "dtype": "float32", "device": "cpu", "batch_size": 4})
    assert len(served) == len(local) == len(DOCS)
    for s, h in zip(sorted(served, key=lambda x: x["doc_id"]), sorted(local, key=lambda x: x["doc_id"])):
        ll_served = [r[0][0] for r in s["resps"]]
        ll_local = [r[0][0] for r in h["resps"]]
        assert ll_served == pytest.approx(ll_local, abs=2e-3)
        assert s["acc"] == h["acc"]
