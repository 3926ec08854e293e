"""`tunelab merge` checks every input before it loads or writes anything: an adapter of another base (other shapes, or
the same shapes and other weights) and a broken --probe file are one line, exit 2, and --out stays unwritten."""

from __future__ import annotations

import pytest

from helpers.cli import assert_clean_error, ok, run_cli
from helpers.train import train_env


def merge(*args) -> object:
    return run_cli("merge", *args, "--max-new-tokens", "4", env=train_env(), timeout=240)


@pytest.mark.parametrize("kind, needle", [("shape", "does not fit the base model: size mismatch for"),
                                          ("weights", "was trained on another base model")])
def test_an_adapter_of_another_base_is_refused_before_anything_is_written(tmp_path, tiny_adapter, tiny_model_dir,
                                                                         other_bases, kind, needle):
    line = assert_clean_error(merge(tiny_adapter, "--out", tmp_path / "m", "--model", other_bases[kind]), needle,
                              last_line_only=True)
    assert str(tiny_model_dir) in line
    assert not (tmp_path / "m").exists()


def test_allow_other_base_merges_into_a_same_shaped_other_base(tmp_path, tiny_adapter, other_bases):
    p = ok(merge(tiny_adapter, "--out", tmp_path / "m", "--model", other_bases["weights"], "--allow-other-base"))
    assert "(other weights); applied anyway" in p.stderr and "merge check passed" in p.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize("content, needle", [("", "no probe records"),
                                             ('{"messages": "hi"}\n', ":1: messages must be a list"),
                                             ("{not json\n", ":1:")])
def test_a_broken_probe_file_is_refused_before_the_merge_writes(tmp_path, tiny_adapter, content, needle):
    probe = tmp_path / "probe.jsonl"
    probe.write_text(content, encoding="utf-8")
    assert_clean_error(merge(tiny_adapter, "--out", tmp_path / "m", "--probe", probe), str(probe), needle)
    assert not (tmp_path / "m").exists()


def test_a_non_empty_out_is_refused_before_loading(tmp_path, tiny_adapter):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    assert_clean_error(merge(tiny_adapter, "--out", tmp_path / "m"), "exists and is not empty")
    assert [f.name for f in (tmp_path / "m").iterdir()] == ["keep.txt"]
