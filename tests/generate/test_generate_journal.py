"""The journal: append-only, resumable, tolerant of a torn last line, strict about damage elsewhere."""

import json

import pytest

from tunelab.errors import DataError
from tunelab.generate.journal import Journal, request_key


def entry(i: int, status: str = "ok") -> dict:
    return {"key": f"k{i}", "status": status, "text": f"answer {i}"}


def test_roundtrip_and_last_entry_wins(tmp_path):
    p = tmp_path / "journal.jsonl"
    with Journal(p, fsync_every=2) as j:
        j.append(entry(1, "error"))
        j.append(entry(2))
        j.append(entry(1))
    j = Journal(p)
    assert j.done("k1")["text"] == "answer 1" and j.done("k2") and j.done("k3") is None
    assert "k1" in j and len(j.entries) == 2 and j.loaded == 3
    j.close()


def test_error_entries_are_not_done(tmp_path):
    with Journal(tmp_path / "j.jsonl") as j:
        j.append(entry(1, "error"))
    with Journal(tmp_path / "j.jsonl") as j:
        assert j.done("k1") is None


@pytest.mark.parametrize("tail", [b'{"key": "k9", "status": "o', b'{"key": "k9"', b"\x00\x00", b'{"broken\n'])
def test_torn_last_line_is_cut_off(tmp_path, tail):
    p = tmp_path / "j.jsonl"
    with Journal(p) as j:
        j.append(entry(1))
        j.append(entry(2))
    with p.open("ab") as f:
        f.write(tail)  # what a SIGKILL in the middle of a write leaves
    with Journal(p) as j:
        assert set(j.entries) == {"k1", "k2"} and j.torn_bytes == len(tail)
        j.append(entry(3))
    lines = p.read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["k1", "k2", "k3"]


def test_damage_in_the_middle_is_an_error_and_changes_nothing(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text(json.dumps(entry(1)) + "\nGARBAGE\n" + json.dumps(entry(2)) + "\n")
    before = p.read_bytes()
    with pytest.raises(DataError) as e:
        Journal(p)
    assert f"{p}:2" in str(e.value)
    assert p.read_bytes() == before


def test_second_writer_is_refused(tmp_path):
    p = tmp_path / "j.jsonl"
    with Journal(p):
        with pytest.raises(DataError, match="another"):
            Journal(p)


def test_request_key_is_stable_and_sensitive():
    base = dict(pipeline="label", prompt_hash="abc", messages=[{"role": "user", "content": "x"}], model="m",
                params={"temperature": 0.0, "max_tokens": 5})
    k = request_key(**base)
    assert k == request_key(**{**base, "params": {"max_tokens": 5, "temperature": 0.0}})  # key order irrelevant
    for change in [{"pipeline": "respond"}, {"prompt_hash": "abd"}, {"model": "m2"},
                   {"messages": [{"role": "user", "content": "y"}]}, {"params": {"temperature": 0.5, "max_tokens": 5}}]:
        assert request_key(**{**base, **change}) != k
