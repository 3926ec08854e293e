"""Bad input: one clear line on stderr, exit code 2, no traceback."""

import pytest

from helpers import EXAMPLES, write_jsonl
from helpers.cli import assert_clean_error, run_cli


def test_missing_config_file(tmp_path):
    r = run_cli("eval", str(tmp_path / "nope.yaml"))
    assert_clean_error(r, "nope.yaml")


def test_unknown_config_field(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("name: x\ndata:\n  path: d.jsonl\n  limt: 3\nvariants:\n  a: p.yaml\n")
    r = run_cli("eval", str(cfg))
    assert_clean_error(r, "e.yaml", "data.limt", "unknown field")


def test_yaml_syntax_error_names_line(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("name: x\ndata: [\n  path: 1\n")
    r = run_cli("eval", str(cfg))
    assert_clean_error(r, "e.yaml:")


def test_malformed_jsonl_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "좋다", "label": "Positive"}\n{"text": oops}\n')
    r = run_cli("eval", "--prompt", str(EXAMPLES / "prompts/sentiment_fewshot.yaml"), "--data", str(data),
                "--out", str(tmp_path / "out"))
    assert_clean_error(r, f"{data}:2", "malformed JSON")


def test_missing_data_file(tmp_path):
    r = run_cli("eval", "--prompt", str(EXAMPLES / "prompts/sentiment_fewshot.yaml"), "--data",
                str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "out"))
    assert_clean_error(r, "none.jsonl")


def test_label_outside_label_set(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "좋다", "label": "Positive"},
                                              {"id": "b", "text": "별로", "label": "Bad"}])
    r = run_cli("eval", "--prompt", str(EXAMPLES / "prompts/sentiment_fewshot.yaml"), "--data", str(data),
                "--out", str(tmp_path / "out"))
    assert_clean_error(r, f"{data}:2", "'Bad'", "label set")


def test_unreachable_endpoint(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "text": "좋다", "label": "Positive"}\n')
    r = run_cli("eval", "--prompt", str(EXAMPLES / "prompts/sentiment_fewshot.yaml"), "--data", str(data),
                "--model", "openai:some-model", "--out", str(tmp_path / "out"), "--no-cache",
                env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-SENTINEL-KEY"})
    assert_clean_error(r, "cannot reach")
    assert "SENTINEL" not in r.stderr + r.stdout


def test_quick_form_needs_prompt_and_data():
    r = run_cli("eval")
    assert_clean_error(r, "--prompt")


@pytest.mark.parametrize("cmd", [["--help"], ["eval", "--help"], ["prompt", "render", "--help"]])
def test_help_everywhere(cmd):
    r = run_cli(*cmd)
    assert r.returncode == 0 and "Usage" in r.stdout


@pytest.mark.parametrize("args, needles", [
    (("eval", "--samples", "1000", "--prompt", "p.yaml", "--data", "d.jsonl"), ("eval:", "--samples", "100")),
    (("serve", "--port", "-5"), ("serve:", "--port", "greater than or equal to 0")),
    (("train", "--lr", "5", "--data", "d.jsonl"), ("train:", "--lr")),
    (("prompt", "render", "--bogus"), ("prompt render:", "No such option: --bogus", "tunelab prompt render --help")),
    (("nosuch",), ("No such command 'nosuch'", "tunelab --help")),
])
def test_command_line_mistakes_are_one_line(args, needles):
    """typer's own usage errors (an unknown command or option, a value outside the config field's bounds) are one
    `error:` line too, naming the command and where its help is, not a framed box."""
    assert_clean_error(run_cli(*args), *needles)
