"""JSON-lines loading with named errors, and the benchmarks shipped in the package."""
import hashlib
import json
import re
from importlib import resources

import pytest

from drpo.tasks.base import Example
from drpo.tasks.datasets import (
    BENCHMARKS,
    DEFAULT_TEMPLATE,
    benchmark_path,
    gsm8k_final_answer,
    load_benchmark,
    load_jsonl,
)

EXPECTED_ROWS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "gsm8k": 1319}


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_benchmark_loads(name):
    examples = load_benchmark(name)
    assert len(examples) == EXPECTED_ROWS[name]
    assert all(isinstance(ex, Example) and ex.answer.strip() for ex in examples)
    assert all(ex.prompt.endswith("within \\boxed{}.") for ex in examples)
    assert len({ex.id for ex in examples}) == len(examples)


def test_benchmark_answers_per_source():
    aime24 = load_benchmark("aime24")
    assert aime24[7].answer == "025" and aime24[0].id == "60"
    assert load_benchmark("amc23")[0].answer == "27.0"  # a float in the file
    assert load_benchmark("aime25")[0].prompt.startswith("Find the sum of all integer bases")
    math500 = load_benchmark("math500")
    assert math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert math500[0].id == "test/precalculus/807.json" and math500[0].meta["level"] == 2


def test_gsm8k_answers_are_plain_numbers():
    examples = load_benchmark("gsm8k")
    assert examples[0].answer == "18"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", ex.answer) for ex in examples)
    assert examples[0].meta["answer"].endswith("#### 18")  # the worked solution is kept


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("3 + 4 = 7\n#### 1,450,000") == "1450000"
    with pytest.raises(ValueError, match="no final '#### N'"):
        gsm8k_final_answer("the answer is 7")


def test_custom_template_and_limit():
    examples = load_benchmark("aime25", template="Q: {question}\nA:", limit=3)
    assert len(examples) == 3 and examples[0].prompt.startswith("Q: Find") and examples[0].prompt.endswith("A:")


def test_default_template_asks_for_boxed():
    assert DEFAULT_TEMPLATE.format(question="1+1?").endswith("put your final answer within \\boxed{}.")


def test_unknown_benchmark_lists_known():
    with pytest.raises(ValueError, match="unknown benchmark 'aime26'.*aime24.*gsm8k"):
        load_benchmark("aime26")


def test_shipped_files_are_package_data_and_match_provenance():
    folder = resources.files("drpo") / "data" / "benchmarks"
    provenance = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
    for spec in BENCHMARKS.values():
        digest = hashlib.sha256((folder / spec.file).read_bytes()).hexdigest()
        assert f"| {spec.file} | {digest} |" in provenance, spec.file
    assert benchmark_path("math500").is_file()


def test_load_jsonl_fields_ids_and_meta(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps({"q": "one?", "a": 27.0, "key": "x1", "level": 3}),
            "",
            json.dumps({"q": "two?", "a": 5, "key": "x2"}),
        ],
    )
    examples = load_jsonl(path, question_field="q", answer_field="a", id_field="key", template="{question} Go.")
    assert [(e.prompt, e.answer, e.id) for e in examples] == [("one? Go.", "27.0", "x1"), ("two? Go.", "5", "x2")]
    assert examples[0].meta == {"a": 27.0, "key": "x1", "level": 3}
    assert [e.id for e in load_jsonl(path, question_field="q", answer_field="a")] == ["0", "1"]


def test_question_with_braces_is_not_formatted(tmp_path):
    path = _write(tmp_path, [json.dumps({"problem": "Find {x} in $\\{1\\}$", "answer": "1"})])
    assert load_jsonl(path)[0].prompt == "Find {x} in $\\{1\\}$"


@pytest.mark.parametrize(
    ("lines", "kwargs", "message"),
    [
        ([], {}, "has no rows"),
        (["", "  "], {}, "has no rows"),
        ([json.dumps({"problem": "p", "answer": "1"}), "{not json"], {}, "line 2 is not valid JSON"),
        ([json.dumps({"question": "p", "answer": "1"})], {}, r"line 1 has no field 'problem'; fields present: \['answer', 'question'\]"),
        ([json.dumps({"problem": "p", "answer": "1"})], {"id_field": "uid"}, "line 1 has no field 'uid'"),
        ([json.dumps({"problem": "p", "answer": None})], {}, "line 1: answer field 'answer' must be a string or number, got NoneType"),
        ([json.dumps({"problem": "p", "answer": " "})], {}, "line 1: answer field 'answer' is empty"),
        ([json.dumps({"problem": "p", "answer": ["1"]})], {}, "got list"),
        ([json.dumps({"problem": 3, "answer": "1"})], {}, "question field 'problem' is not a non-empty string"),
        (["[1, 2]"], {}, "line 1 is a list, not an object"),
        ([json.dumps({"problem": "p", "answer": "1"})], {"template": "no field"}, "must contain '{question}'"),
        ([json.dumps({"problem": "p", "answer": "1"})], {"template": "{question} {other}"}, "not a valid format string"),
        ([json.dumps({"problem": "p", "answer": "1"})], {"limit": 0}, "limit must be a positive int"),
    ],
)
def test_load_jsonl_errors_are_named(tmp_path, lines, kwargs, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path, **kwargs)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="dataset file not found: .*nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
