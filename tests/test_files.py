"""Files as Korean users have them: CP949/EUC-KR (Windows, Excel in Korea), UTF-8 with a byte-order mark (Excel's
"CSV UTF-8", Notepad), duplicate YAML keys. Every reader goes through tunelab/textfiles.py: a BOM is read as UTF-8,
anything else that is not UTF-8 is one error line with file:line and the fix, never a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers.cli import assert_clean_error, cli_env, ok, run_cli
from helpers.run import DEV, SHORT, TRAIN

ROWS = [{"id": "1", "text": "정말 재미있는 영화", "label": "Positive"},
        {"id": "2", "text": "최악의 영화였다", "label": "Negative"}]
SPEC = "instruction: 영화 리뷰의 감정을 분류하세요.\noutput: {type: label, labels: [Positive, Negative]}\nlayout: plain\n"
CP949_HINT = "this looks like CP949/EUC-KR"


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def csv_text(rows: list[dict]) -> str:
    return "id,text,label\r\n" + "".join(f"{r['id']},{r['text']},{r['label']}\r\n" for r in rows)


def spec_file(tmp: Path) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(SPEC, encoding="utf-8")
    return p


def eval_dry_run(tmp: Path, data: Path, *extra: str):
    return run_cli("eval", "-p", spec_file(tmp), "-d", data, "--dry-run", "--out", tmp / "out", *extra,
                   env=cli_env(NO_COLOR="1", COLUMNS="200"))


def test_cp949_jsonl_is_one_line_with_its_line_and_the_fix(tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(b'{"id": "0", "text": "plain ascii", "label": "Positive"}\n' + jsonl_text(ROWS).encode("cp949"))
    assert_clean_error(eval_dry_run(tmp_path, data), f"{data}:2: not UTF-8", CP949_HINT, "re-save it as UTF-8",
                       "or read it as it is with --encoding cp949")


def test_cp949_csv_is_one_line_with_its_line_and_the_fix(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_bytes(csv_text(ROWS).encode("cp949"))
    assert_clean_error(eval_dry_run(tmp_path, data), f"{data}:2: not UTF-8", CP949_HINT, "CSV UTF-8")


def test_eval_encoding_option_reads_cp949(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_bytes(csv_text(ROWS).encode("cp949"))
    p = ok(eval_dry_run(tmp_path, data, "--encoding", "cp949"))
    assert re.search(r"loglik\s*│\s*2\s*│", p.stdout), p.stdout
    assert_clean_error(eval_dry_run(tmp_path, data, "--encoding", "klingon"), "data.encoding",
                       "unknown encoding 'klingon'")


def test_train_encoding_option_reads_cp949(tmp_path, tiny_model_dir):
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_text(ROWS).encode("cp949"))
    args = ["train", "--model", tiny_model_dir, "--data", data, "--prompt", spec_file(tmp_path), "--dry-run",
            "--out", tmp_path / "train"]
    assert_clean_error(run_cli(*args, env=cli_env()), f"{data}:1: not UTF-8", CP949_HINT, "--encoding cp949")
    ok(run_cli(*args, "--encoding", "cp949", "--batch-size", "2", "--micro-batch-size", "2", env=cli_env()))


def test_bom_csv_from_excel_reads_its_first_column(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the first header is 'id', not '\\ufeffid' (before, the eval said the
    item lacked its id or text field while listing it)."""
    data = tmp_path / "reviews.csv"
    data.write_bytes(("text,id,label\r\n" + "".join(f"{r['text']},{r['id']},{r['label']}\r\n" for r in ROWS))
                     .encode("utf-8-sig"))
    p = ok(eval_dry_run(tmp_path, data))
    assert re.search(r"loglik\s*│\s*2\s*│", p.stdout), p.stdout


def test_bom_files_read_as_utf8(tmp_path):
    from tunelab.data.io import read_records
    from tunelab.config import load_yaml

    j = tmp_path / "a.jsonl"
    j.write_bytes(jsonl_text(ROWS).encode("utf-8-sig"))
    assert [r["text"] for r in read_records(j)] == [r["text"] for r in ROWS]
    c = tmp_path / "a.csv"
    c.write_bytes(csv_text(ROWS).encode("utf-8-sig"))
    assert list(read_records(c)[0]) == ["id", "text", "label", "_line"]
    y = tmp_path / "a.yaml"
    y.write_bytes(SPEC.encode("utf-8-sig"))
    assert load_yaml(y)["instruction"].startswith("영화")
    u = tmp_path / "u.jsonl"  # Excel's / Notepad's "Unicode": UTF-16 with its BOM
    u.write_bytes(jsonl_text(ROWS).encode("utf-16"))
    assert [r["text"] for r in read_records(u)] == [r["text"] for r in ROWS]


def test_cp949_prompt_spec(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(SPEC.encode("cp949"))
    assert_clean_error(run_cli("prompt", "render", spec, "-i", "좋아요"), f"{spec}:1: not UTF-8", CP949_HINT,
                       "re-save it as UTF-8")


def test_cp949_experiment_file(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_bytes(f"name: 감정 분류\nmodel: bundled\ndata: {{eval: {DEV}, train: {TRAIN}}}\n"
                    f"prompts: {{short: {SHORT}}}\n".encode("cp949"))
    assert_clean_error(run_cli("run", exp, "--out", tmp_path / "run"), f"{exp}:1: not UTF-8", CP949_HINT)
    assert not (tmp_path / "run" / "run.json").exists()


def test_latin1_file_is_not_called_cp949(tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_bytes('{"id": "1", "text": "café", "label": "Positive"}\n'.encode("latin-1"))
    line = assert_clean_error(eval_dry_run(tmp_path, data), f"{data}:1: not UTF-8 (byte 0xe9)", "re-save it as UTF-8")
    assert "CP949" not in line


@pytest.mark.parametrize("name, text, needles", [
    ("spec.yaml", SPEC + "instruction: again\n",
     [":4: invalid YAML: duplicate key 'instruction' (first given on line 1)"]),
    ("spec.yaml", "instruction: x\noutput:\n  type: label\n  labels: [A, B]\n  type: free\n",
     [":5: invalid YAML: duplicate key 'type' (first given on line 3)"]),
])
def test_duplicate_yaml_key_is_an_error_with_its_line(tmp_path, name, text, needles):
    spec = tmp_path / name
    spec.write_text(text, encoding="utf-8")
    assert_clean_error(run_cli("prompt", "render", spec, "-i", "x"), f"{spec}", *needles)


def test_duplicate_key_in_an_experiment_file(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: x\nmodel: bundled\ndata: {{eval: {DEV}, train: {TRAIN}}}\nprompts: {{short: {SHORT}}}\n"
                   "seed: 1\nseed: 2\n", encoding="utf-8")
    assert_clean_error(run_cli("run", exp, "--out", tmp_path / "run"), f"{exp}:6", "duplicate key 'seed'")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from tunelab.config import load_yaml

    y = tmp_path / "m.yaml"
    y.write_text("base: &b {lr: 1, r: 4}\nrun: {<<: *b, lr: 2}\n", encoding="utf-8")
    assert load_yaml(y)["run"] == {"lr": 2, "r": 4}


def test_malformed_json_says_at_column_once(tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text('{"id": "1", "text": "unterminated\n', encoding="utf-8")
    line = assert_clean_error(eval_dry_run(tmp_path, data), f"{data}:1: malformed JSON", "at column")
    assert "at at" not in line



def test_generate_inputs_encoding(tmp_path):
    """generate reads its inputs before anything is sent: a CP949 file is refused naming data.encoding, and read
    with it (a dry run: the teacher is never called)."""
    from helpers import write_yaml
    from helpers.generate import env_for, run_generate

    data = tmp_path / "inputs.jsonl"
    data.write_bytes(jsonl_text(ROWS).encode("cp949"))
    cfg = {"name": "enc", "pipeline": "label", "prompt": str(spec_file(tmp_path)), "data": {"path": str(data)},
           "teacher": {"model": "gpt-4o-mini", "base_url": "http://127.0.0.1:9/v1"}, "sampling": {"max_tokens": 8}}
    bad = write_yaml(tmp_path / "bad.yaml", cfg)
    assert_clean_error(run_generate(bad, "--dry-run", "--out", str(tmp_path / "o1"), env=env_for(tmp_path)),
                       f"{data}:1: not UTF-8", CP949_HINT, "data.encoding: cp949")
    good = write_yaml(tmp_path / "good.yaml", {**cfg, "data": {"path": str(data), "encoding": "cp949"}})
    p = ok(run_generate(good, "--dry-run", "--out", str(tmp_path / "o2"), env=env_for(tmp_path)))
    assert "requests to send: 2" in p.stdout, p.stdout
