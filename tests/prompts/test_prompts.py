"""PromptSpec: loading and errors, every layout's exact text, example drawing, parsers, scoring, hashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import EXAMPLES, write_jsonl
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.prompts import (PromptSpec, load_prompt_spec, parse_free, parse_json, parse_label, parse_number,
                             parse_sections, spec_from_dict)

PROMPTS = EXAMPLES / "prompts"
LABELS = ["Positive", "Negative", "Neutral"]


def spec(**kw) -> PromptSpec:
    return PromptSpec.model_validate({"instruction": "Classify the review.", **kw})


def label_spec(**kw) -> PromptSpec:
    return spec(output={"type": "label", "labels": LABELS}, **kw)


SHOTS = [{"input": "좋다", "output": "Positive"}, {"input": "별로", "output": "Negative"}]


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------
def test_chat_layout_role_context_and_turns():
    s = label_spec(role="너는 전문가야", context="NSMC reviews.", examples=SHOTS, layout="chat")
    assert s.render({"text": "그저 그렇다"}) == [
        {"role": "system", "content": "너는 전문가야\n\nNSMC reviews."},
        {"role": "user", "content": "좋다"},
        {"role": "assistant", "content": "Positive"},
        {"role": "user", "content": "별로"},
        {"role": "assistant", "content": "Negative"},
        {"role": "user", "content": "Classify the review.\nAnswer with exactly one of: Positive, Negative, Neutral."
                                    "\n\n그저 그렇다"},
    ]


def test_chat_layout_without_role_has_no_system_message():
    assert spec().render({"text": "hi"}) == [{"role": "user", "content": "Classify the review.\n\nhi"}]


def test_markdown_layout():
    s = label_spec(role="R", context="C", examples=SHOTS, layout="markdown", format_instruction="")
    assert s.render({"text": "x"}) == [
        {"role": "system", "content": "R"},
        {"role": "user", "content": "# Instruction\nClassify the review.\n\n# Context\nC\n\n# Examples\n"
                                    "## Example 1\nInput: 좋다\nOutput: Positive\n\n"
                                    "## Example 2\nInput: 별로\nOutput: Negative\n\n# Input\nx"},
    ]


def test_xml_layout():
    s = label_spec(examples=SHOTS[:1], layout="xml", format_instruction="")
    assert s.render({"text": "x"}) == [{"role": "user", "content":
        "Classify the review.\n\n<examples>\n<example>\n<input>좋다</input>\n<output>Positive</output>\n"
        "</example>\n</examples>\n\n<input>x</input>"}]


def test_bracket_layout():
    s = label_spec(role="너는 감정 분류 전문가야.", instruction="감정을 분류해.", context="영화 리뷰다.",
                   examples=SHOTS, layout="bracket", format_instruction="")
    assert s.render({"text": "그럭저럭"}) == [{"role": "user", "content":
        "[역할] 너는 감정 분류 전문가야.\n[지시] 감정을 분류해.\n[배경] 영화 리뷰다.\n[예시]\n"
        "[입력] 좋다\n[답변] Positive\n\n[입력] 별로\n[답변] Negative\n\n[입력] 그럭저럭\n[답변]"}]
    # empty parts are left out
    bare = label_spec(instruction="감정을 분류해.", layout="bracket", format_instruction="")
    assert bare.render({"text": "t"})[0]["content"] == "[지시] 감정을 분류해.\n[입력] t\n[답변]"


def test_plain_layout_is_the_seed_prompt():
    s = load_prompt_spec(PROMPTS / "sentiment_fewshot.yaml")
    assert s.render({"text": "그냥 그랬다"}) == [{"role": "user", "content":
        "Classify the sentiment of the text as Positive, Negative, or Neutral.\n\n"
        "Text: 배우들 연기가 정말 좋았고 마지막 장면에서 눈물이 났다.\nSentiment: Positive\n\n"
        "Text: 스토리가 너무 뻔하고 지루해서 중간에 나왔다.\nSentiment: Negative\n\n"
        "Text: 배터리는 평범하지만 디자인은 마음에 든다.\nSentiment: Neutral\n\n"
        "Text: 그냥 그랬다\nSentiment:"}]


def test_plain_layout_role_first_and_default_labels():
    s = spec(role="R", layout="plain", examples=[{"input": "a", "output": "b"}])
    assert s.render({"text": "c"})[0]["content"] == (
        "R\n\nClassify the review.\n\nText: a\nAnswer: b\n\nText: c\nAnswer:")


def test_system_prompt_overrides_role_placement():
    chat = spec(role="R", context="C", system_prompt="S")
    assert chat.render({"text": "x"}) == [{"role": "system", "content": "S"},
                                          {"role": "user", "content": "R\n\nC\n\nClassify the review.\n\nx"}]
    md = spec(role="R", system_prompt="S", layout="markdown")
    assert md.render({"text": "x"}) == [{"role": "system", "content": "S"}, {"role": "user", "content":
                                         "# Role\nR\n\n# Instruction\nClassify the review.\n\n# Input\nx"}]
    assert spec(role="R", layout="xml").render({"text": "x"})[0] == {"role": "system", "content": "R"}
    assert spec(system_prompt="S", layout="plain").render({"text": "x"})[0] == {"role": "system", "content": "S"}


def test_cot_trigger_and_final_line_instruction():
    cot = {"type": "cot", "trigger": "단계적으로 생각해봐", "answer_prefix": "정답:"}
    s = spec(instruction="풀어라.", output={"type": "number"}, reasoning=cot, input_template="{{ question }}")
    assert s.render({"question": "5-2+3?"})[-1]["content"] == (
        '풀어라.\nThe answer is a single number.\nEnd your response with a final line of the form "정답: <answer>".'
        "\n\n5-2+3?\n\n단계적으로 생각해봐")
    plain = spec(instruction="풀어라.", output={"type": "number"}, reasoning=cot, layout="plain", format_instruction="")
    assert plain.render({"text": "q"})[0]["content"].endswith("Text: q\n단계적으로 생각해봐\nAnswer:")


def test_format_instructions_per_output_type():
    assert spec(output={"type": "sections", "sections": ["문제점", "원인", "해결책"]}).directions() == (
        "Classify the review.\nAnswer in exactly these numbered sections: 1) 문제점 2) 원인 3) 해결책")
    assert spec(output={"type": "sections", "sections": ["A", "B"], "numbering": "1."}).directions().endswith(
        "1. A 2. B")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert spec(output={"type": "json", "schema": schema}).directions().endswith(
        'Respond with only a JSON object that matches this JSON schema: '
        '{"type": "object", "properties": {"a": {"type": "integer"}}}')
    assert spec(output={"type": "number"}).directions().endswith("Answer with only the final number.")
    assert spec(output={"type": "free"}).directions() == "Classify the review."
    assert label_spec(format_instruction="하나만 답해.").directions() == "Classify the review.\n하나만 답해."
    assert label_spec(format_instruction="").directions() == "Classify the review."


def test_input_template_and_dict_examples():
    s = spec(input_template="제목: {{ title }}\n본문: {{ body }}",
             examples=[{"input": {"title": "t1", "body": "b1"}, "output": "o1"}])
    msgs = s.render({"title": "T", "body": "B"})
    assert msgs[0]["content"] == "제목: t1\n본문: b1" and msgs[-1]["content"].endswith("제목: T\n본문: B")
    assert s.render_input({"title": "T", "body": "B", "extra": 1}) == "제목: T\n본문: B"


def test_missing_template_field_names_it():
    s = spec(input_template="{{ question }}")
    with pytest.raises(TunelabError, match=r"'question'.*its fields: text, label"):
        s.render({"text": "x", "label": "y", "_line": 3})


def test_romanize_filter_writes_hangul_in_latin_letters():
    s = spec(input_template="{{ text | romanize }}", examples=[{"input": {"text": "재미없다 ㅠㅠ"}, "output": "o1"},
                                                               {"input": "재미 (as written)", "output": "o2"}])
    msgs = s.render({"text": "괜히 머리 밀고, 망작... ㅋㅋㅋ 10점 OK"})
    assert msgs[0]["content"] == "jaemieobsda yuyu"  # a dict example goes through the same template
    assert msgs[2]["content"] == "재미 (as written)"  # a string example is the rendered input itself
    assert msgs[-1]["content"].endswith("gwaenhi meori milgo, mangjag... kkk 10jeom OK")
    from tunelab.prompts.filters import romanize
    assert romanize("맛 없 닭 읽 쌍 꽃 뷁") == "mas eobs dalg ilg ssang kkoch bwelg"  # finals as written
    every = "".join(chr(c) for c in range(0xAC00, 0xD7A4)) + "".join(chr(c) for c in range(0x3131, 0x3164))
    out = romanize(every)
    assert out.isascii() and out.isalpha() and len(out) > 2 * len(every)


def test_unknown_template_filter_is_a_spec_error():
    with pytest.raises(ValueError, match="invalid Jinja2 template: No filter named 'romanise'"):
        spec(input_template="{{ text | romanise }}")


def test_template_sandbox_blocks_unsafe_attributes():
    s = spec(input_template="{{ text.__class__.__mro__ }}")
    with pytest.raises(DataError, match="access to attribute '__class__' of 'str' object is unsafe"):
        s.render_input({"text": "x"})


# --------------------------------------------------------------------------------------------------
# loading errors
# --------------------------------------------------------------------------------------------------
def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_unknown_field_names_file_and_field(tmp_path):
    p = write(tmp_path, "typo.yaml", "instruction: x\nexampels: []\n")
    with pytest.raises(ConfigError) as e:
        load_prompt_spec(p)
    assert str(e.value).startswith(f"{p}: exampels: unknown field (did you mean 'examples'?)")
    p = write(tmp_path, "nested.yaml", "instruction: x\noutput: {type: label, labels: [A], lables: [B]}\n")
    with pytest.raises(ConfigError, match=r"nested\.yaml: output\.lables: unknown field \(did you mean 'labels'"):
        load_prompt_spec(p)


def test_validation_errors_carry_the_field_path(tmp_path):
    cases = {
        "output: {type: label, labels: []}": "output.labels",
        "output: {type: label, labels: [A, a]}": "output.labels",
        "output: {type: json, schema: {type: 5}}": "output.schema",
        "output: {type: sections, sections: [A], numbering: '1-'}": "output.numbering",
        "examples: {path: d.jsonl, k: 0}": "examples.k",
        "examples: [{input: a}]": "examples.0.output",
        "layout: table": "layout",
        "input_template: '{{ text '": "input_template",
        "output: {type: label, labels: [A, B]}\nexamples: [{input: hi, output: C}]": "examples.0.output",
        "examples: {path: missing.jsonl, k: 2}": "examples.path",
    }
    for body, where in cases.items():
        p = write(tmp_path, "s.yaml", f"instruction: x\n{body}\n")
        with pytest.raises(ConfigError) as e:
            load_prompt_spec(p)
        assert e.value.where == f"{p}: {where}", body


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, "bad.yaml", "instruction: x\n  layout: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: invalid YAML"):
        load_prompt_spec(p)


def test_inline_spec_from_dict_names_its_source():
    with pytest.raises(ConfigError, match=r"^variants\.a: instruction: required field is missing"):
        spec_from_dict({"layout": "chat"}, source="variants.a")


# --------------------------------------------------------------------------------------------------
# drawn examples
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def pool(tmp_path) -> Path:
    rows = [{"id": i, "text": f"review {i}", "label": LABELS[i % 3] if i < 24 else "Positive"} for i in range(40)]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "pool.jsonl", rows)
    return tmp_path


def drawn(base: Path, **src) -> PromptSpec:
    s = label_spec(examples={"path": "data/pool.jsonl", **src})
    s.resolve_examples(base)
    return s


def test_drawn_examples_are_deterministic(pool):
    a, b = drawn(pool, k=6, seed=1).shots(), drawn(pool, k=6, seed=1).shots()
    assert a == b and len(a) == 6
    assert drawn(pool, k=6, seed=2).shots() != a
    assert all(x.startswith("review ") and y in LABELS for x, y in a)


def test_balanced_draw_round_robins_labels(pool):
    counts = Counter(y for _, y in drawn(pool, k=6, seed=3).shots())
    assert counts == {"Positive": 2, "Negative": 2, "Neutral": 2}
    counts = Counter(y for _, y in drawn(pool, k=12, seed=3, balanced=False).shots())
    assert sum(counts.values()) == 12  # 22 of 40 rows are Positive: an unbalanced draw follows the data


def test_draw_too_few_rows_and_relative_path(pool):
    yaml_path = write(pool, "s.yaml", "instruction: x\noutput: {type: label, labels: [Positive, Negative, Neutral]}\n"
                                      "examples: {path: data/pool.jsonl, k: 41}\n")
    with pytest.raises(ConfigError, match="only 40 usable examples"):
        load_prompt_spec(yaml_path)
    yaml_path.write_text(yaml_path.read_text().replace("k: 41", "k: 3"))
    cwd = os.getcwd()
    try:
        os.chdir("/")  # the path resolves against the YAML file, not the working directory
        s = load_prompt_spec(yaml_path)
    finally:
        os.chdir(cwd)
    assert len(s.shots()) == 3 and s.resolve_examples() is s.resolve_examples()


def test_drawn_cot_examples_use_solution(tmp_path):
    row = {"question": "q?", "solution": "2 * 3 = <<2*3=6>>6 apples\n#### 6", "answer": "6"}
    (tmp_path / "g.jsonl").write_text(json.dumps(row) + "\n")
    s = spec(output={"type": "number"}, input_template="{{ question }}",
             reasoning={"type": "cot", "answer_prefix": "정답:"}, examples={"path": "g.jsonl", "k": 1})
    s.resolve_examples(tmp_path)
    assert s.shots() == [("q?", "2 * 3 = 6 apples\n정답: 6")]


# --------------------------------------------------------------------------------------------------
# gold answers and training targets
# --------------------------------------------------------------------------------------------------
def test_gold_and_target_text():
    s = label_spec()
    assert s.gold({"text": "x", "label": "Positive"}) == "Positive"
    assert s.gold({"answer": 72, "output": "no"}) == "72"
    assert s.gold({"text": "x"}) is None
    assert spec(target_field="rating").gold({"rating": 9, "label": "Positive"}) == "9"
    assert spec(output={"type": "json", "schema": {}}).gold({"output": {"a": 1}}) == '{"a": 1}'
    assert s.target_text({"label": "Negative"}) == "Negative"
    cot = spec(output={"type": "number"}, reasoning={"type": "cot", "answer_prefix": "정답:"})
    solution = "5-2=<<5-2=3>>3, 3+3=<<3+3=6>>6\n#### 6"
    assert cot.target_text({"answer": "6", "solution": solution}) == "5-2=3, 3+3=6\n정답: 6"
    assert cot.target_text({"answer": "6"}) == "정답: 6"
    assert cot.target_text({"question": "q"}) is None


# --------------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------------
def test_parse_label():
    assert parse_label("Positive", LABELS).complied
    r = parse_label('  "neutral."\n', LABELS)
    assert (r.prediction, r.complied) == ("Neutral", True)
    r = parse_label("The sentiment is negative overall.", LABELS)
    assert (r.prediction, r.complied) == ("Negative", False)
    r = parse_label("Positive or Negative", LABELS)
    assert r.prediction is None and not r.complied and "several labels" in r.error
    assert parse_label("unpositively", LABELS).prediction is None  # a word, not a substring
    assert parse_label("", LABELS).prediction is None


def test_parse_label_with_cot_reads_after_the_last_prefix():
    text = "It says Negative things but ends well.\nAnswer: Positive"
    r = parse_label(text, LABELS, "Answer:")
    assert (r.prediction, r.complied, r.answer_text) == ("Positive", True, "Positive")
    r = parse_label("Looks Negative to me.", LABELS, "Answer:")  # no answer line: recovered, not complied
    assert (r.prediction, r.complied) == ("Negative", False)
    s = label_spec(reasoning={"type": "cot"})
    assert s.parse("Answer: Neutral").prediction == "Neutral"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_parse_json():
    r = parse_json('{"name": "Kim", "age": 3}', SCHEMA)
    assert (r.prediction, r.complied, r.error) == ({"name": "Kim", "age": 3}, True, None)
    r = parse_json('Here you go:\n```json\n{"name": "Lee", "age": 40}\n```\nDone.', SCHEMA)
    assert (r.prediction, r.complied) == ({"name": "Lee", "age": 40}, True)
    r = parse_json('The result is {"name": "a {b}", "age": 1} as requested {x}', SCHEMA)
    assert r.prediction == {"name": "a {b}", "age": 1} and r.complied
    r = parse_json('{"name": "Kim", "age": "three"}', SCHEMA)
    assert r.prediction == {"name": "Kim", "age": "three"} and not r.complied
    assert "age" in r.error and "integer" in r.error
    r = parse_json('{"name": "Kim"}', SCHEMA)
    assert not r.complied and "'age' is a required property" in r.error
    r = parse_json("{name: Kim}", SCHEMA)
    assert r.prediction is None and r.error == "no JSON object found"


SECTIONS = ["문제점", "원인", "해결책"]


def test_parse_sections():
    r = parse_sections("1) 문제점: 느리다\n2) 원인: 캐시 없음\n3) 해결책: 캐시 추가", SECTIONS)
    assert r.complied and r.prediction == {"문제점": "느리다", "원인": "캐시 없음", "해결책": "캐시 추가"}
    r = parse_sections("분석:\n1. 느리다\n2. 캐시 없음\n   1. 세부\n3. 캐시 추가\n", SECTIONS)  # titles optional
    assert r.complied and r.prediction["원인"] == "캐시 없음\n   1. 세부"
    r = parse_sections("**1) 문제점**\n느리다\n**2) 원인**\n캐시\n**3) 해결책**\n추가", SECTIONS)
    assert r.complied and r.prediction == {"문제점": "느리다", "원인": "캐시", "해결책": "추가"}


def test_parse_sections_out_of_order_or_missing():
    r = parse_sections("2) 원인: b\n1) 문제점: a\n3) 해결책: c", SECTIONS)
    assert not r.complied and "found 1 in sequence" in r.error
    r = parse_sections("1) 원인: b\n2) 문제점: a\n3) 해결책: c", SECTIONS)
    assert not r.complied and "out of order" in r.error
    r = parse_sections("1) 문제점: a\n2) 원인: b", SECTIONS)
    assert not r.complied and r.prediction == {"문제점": "a", "원인": "b"}
    assert parse_sections("no sections", SECTIONS).prediction is None


@pytest.mark.parametrize("text,prefix,value,complied", [
    ("42", None, 42, True),
    ("$1,234", None, 1234, True),
    ("-7.5", None, -7.5, True),
    ("The total is 1,000,000 dollars.", None, 1000000, False),
    ("She owes -$15 now", None, -15, False),
    ("5 - 2 = 3, 3 + 3 = 6\n#### 6", None, 6, True),
    ("3.0", None, 3, True),
    ("먼저 5 - 2 = 3개. 3 + 3 = 6.\n정답: 6개", "정답:", 6, True),
    ("정답: 3 이고 ... 다시 보면\n정답: $1,250.50", "정답:", 1250.5, True),
    ("5 - 2 = 3. So 6 apples.", "정답:", 6, False),  # no prefix: the last number, not complied
    ("reasoning 12\n#### 8", "정답:", 8, False),
])
def test_parse_number(text, prefix, value, complied):
    r = parse_number(text, prefix)
    assert r.prediction == value and type(r.prediction) is type(value) and r.complied is complied


def test_parse_number_none_and_free():
    assert parse_number("여섯 개").prediction is None
    assert parse_free("  요약입니다.  ").prediction == "요약입니다."
    assert not parse_free("   ").complied
    r = parse_free("thinking...\nAnswer: done", "Answer:")
    assert (r.prediction, r.complied) == ("done", True)


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------
def test_is_correct():
    lab = label_spec()
    assert lab.is_correct(" positive ", "Positive") is True
    assert lab.is_correct("Negative", "Positive") is False
    assert lab.is_correct(None, "Positive") is False
    assert lab.is_correct("Positive", None) is None
    num = spec(output={"type": "number"})
    assert num.is_correct(1234, "1,234") and num.is_correct(2.0000001, "$2") and not num.is_correct(3, "4")
    js = spec(output={"type": "json", "schema": {}})
    assert js.is_correct({"a": 1}, '{"a": 1}') and js.is_correct({"a": 1}, {"a": 1})
    assert not js.is_correct({"a": 2}, '{"a": 1}') and not js.is_correct({"a": 1}, "not json")
    free = spec()
    assert free.is_correct("Hello  World", "hello world") is True and free.is_correct("x", None) is None
    sec = spec(output={"type": "sections", "sections": ["A", "B"]})
    assert sec.is_correct({"A": "one", "B": "two"}, "1) A: one\n2) B: two") is True
    assert sec.is_correct({"A": "one", "B": "2"}, "1) A: one\n2) B: two") is False
    assert sec.is_correct({"A": "x"}, None) is None


def test_spec_parse_dispatches_on_output_type():
    assert label_spec().parse("Neutral").prediction == "Neutral"
    assert spec(output={"type": "number"}).parse("#### 1,024").prediction == 1024
    assert spec(output={"type": "sections", "sections": ["A"]}).parse("1) A: x").prediction == {"A": "x"}
    assert spec(output={"type": "json", "schema": {"type": "object"}}).parse("{}").complied
    assert label_spec().task == "label" and label_spec().labels == LABELS and spec().labels is None


# --------------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------------
HASH_SCRIPT = ("import sys; from tunelab.prompts import load_prompt_spec; "
               "print(load_prompt_spec(sys.argv[1]).content_hash())")


def test_content_hash_is_stable_and_sensitive():
    path = PROMPTS / "sentiment_8shot.yaml"
    h = load_prompt_spec(path).content_hash()
    assert len(h) == 64 and h == load_prompt_spec(path).content_hash()
    out = subprocess.run([sys.executable, "-c", HASH_SCRIPT, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}, cwd="/")
    assert out.stdout.strip() == h  # another process, another hash seed, another working directory
    assert label_spec(name="a").content_hash() == label_spec(name="b").content_hash()
    assert label_spec().content_hash() != label_spec(layout="xml").content_hash()
    assert label_spec().content_hash() != spec(output={"type": "label", "labels": ["A", "B"]}).content_hash()


# --------------------------------------------------------------------------------------------------
# the shipped examples
# --------------------------------------------------------------------------------------------------
EXAMPLE_FILES = sorted(PROMPTS.glob("*.yaml"))


def test_all_documented_examples_exist():
    names = {p.name for p in EXAMPLE_FILES}
    assert {"sentiment_fewshot.yaml", "sentiment_binary.yaml", "sentiment_zeroshot.yaml",
            "sentiment_role_format.yaml", "sentiment_8shot.yaml", "summarize_plain.yaml", "summarize_3points.yaml",
            "scientist_persona.yaml", "problem_cause_solution.yaml", "json_extract.yaml", "apples_direct.yaml",
            "apples_cot.yaml", "bracket_korean.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_spec_loads_and_renders(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#") and "tunelab prompt render" in text
    s = load_prompt_spec(path)
    item = {"text": "사과가 맛있다", "question": "사과가 5개 있었는데 2개를 먹고 3개를 더 샀다. 지금 사과는 몇 개인가?"}
    msgs = s.render(item)
    assert msgs[-1]["role"] == "user" and s.render_input(item) in msgs[-1]["content"]
    assert all(m["role"] in ("system", "user", "assistant") and m["content"] for m in msgs)


def test_example_specs_behave_as_described():
    assert load_prompt_spec(PROMPTS / "sentiment_binary.yaml").labels == ["Positive", "Negative"]
    role = load_prompt_spec(PROMPTS / "sentiment_role_format.yaml").render({"text": "t"})
    assert role[0] == {"role": "system", "content": "너는 영화 리뷰의 감정을 정확하게 분류하는 전문가야."}
    eight = load_prompt_spec(PROMPTS / "sentiment_8shot.yaml")
    assert len(eight.shots()) == 8 and set(Counter(y for _, y in eight.shots()).values()) <= {2, 3}
    cot = load_prompt_spec(PROMPTS / "apples_cot.yaml")
    assert cot.parse("5-2=3, 3+3=6\n정답: 6").prediction == 6
    assert cot.is_correct(cot.parse("정답: 6개").prediction, "6")
    assert load_prompt_spec(PROMPTS / "apples_direct.yaml").render_input({"question": "q"}) == "q"
    js = load_prompt_spec(PROMPTS / "json_extract.yaml")
    assert js.parse('{"name": "이서연", "age": 28, "city": "대전"}').complied
    assert not js.parse('{"name": "이서연", "age": "28", "city": "대전"}').complied
    pcs = load_prompt_spec(PROMPTS / "problem_cause_solution.yaml")
    assert pcs.task == "sections" and pcs.parse("1) 문제점: a\n2) 원인: b\n3) 해결책: c").complied


def test_resolved_dict_is_a_self_contained_copy(tmp_path):
    import yaml

    s = load_prompt_spec(PROMPTS / "sentiment_8shot.yaml")
    copy = tmp_path / "prompt_spec.yaml"  # elsewhere: the relative examples path would no longer resolve
    copy.write_text(yaml.safe_dump(s.resolved_dict(), allow_unicode=True), encoding="utf-8")
    c = load_prompt_spec(copy)
    assert c.render({"text": "t"}) == s.render({"text": "t"}) and c.content_hash() == s.content_hash()


def test_input_fields_are_what_the_template_reads():
    """What a teacher may be sent of an item (generate.inputs: train): the fields the input template reads."""
    from tunelab.prompts import spec_from_dict

    spec = spec_from_dict({"instruction": "x", "input_template": "{{ title }}: {{ text | romanize }} {% if n %}{{ n }}"
                                                                 "{% endif %}",
                           "output": {"type": "label", "labels": ["a", "b"]}}, base_dir=Path("."), source="t")
    assert spec.input_fields() == ["n", "text", "title"]
    assert load_prompt_spec(PROMPTS / "sentiment_binary.yaml").input_fields() == ["text"]
