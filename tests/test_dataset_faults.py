"""Bad dataset files give one line naming the file and the 1-based line: a byte that is not
UTF-8, a prompt over the length limit (through the codec, as the trainer and the collector use it)."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from drpo.models.text import PromptTooLong, TextCodec
from drpo.tasks.base import Example
from drpo.tasks.config import TaskConfig
from drpo.tasks.datasets import load_jsonl
from drpo.tasks.sources import make_prompts


def _rows(n: int, long_at: int | None = None) -> list[bytes]:
    rows = []
    for i in range(n):
        question = "Q : " + ("1 + " * 100 if i == long_at else "") + f"{i} + 1 ?"
        rows.append(json.dumps({"problem": question, "answer": str(i + 1)}).encode())
    return rows


def test_a_byte_that_is_not_utf8_names_the_file_and_the_line(tmp_path):
    rows = _rows(8)
    rows[6] = b'{"problem": "caf\xe9 costs 2 + 3 ?", "answer": "5"}'  # latin-1, not UTF-8
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(rows[:3]) + b"\n\n" + b"\n".join(rows[3:]) + b"\n")  # line 8 after a blank line
    with pytest.raises(ValueError, match=rf"^{path}: line 8 is not valid UTF-8 \(byte 0xe9 at character 17\); "
                                         r"save the file as UTF-8"):
        load_jsonl(path)
    with pytest.raises(ValueError, match=r"line 8 is not valid UTF-8"):  # the trainer's way in
        make_prompts(TaskConfig(name="jsonl", path=str(path)), seed=0)


def test_a_utf8_bom_is_accepted_and_valid_utf8_is_read_as_before(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"problem": "caf\u00e9 ?", "answer": "1"}, ensure_ascii=False).encode()
                     + b"\r\n" + json.dumps({"problem": "\u00b2 ?", "answer": "2"}).encode() + b"\r\n")
    examples = load_jsonl(path)
    assert [(e.prompt, e.answer, e.id) for e in examples] == [("caf\u00e9 ?", "1", "0"), ("\u00b2 ?", "2", "1")]


def test_jsonl_examples_carry_their_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(_rows(2)) + b"\n\n" + b"\n".join(_rows(1)) + b"\n")
    assert [e.source for e in load_jsonl(path)] == [f"{path} line 1", f"{path} line 2", f"{path} line 4"]
    assert Example("p", "a").source == ""
    assert Example("p", "a", source="x line 1") == Example("p", "a")  # the source does not change equality


@pytest.fixture(scope="module")
def codec(tiny_model_dir) -> TextCodec:
    return TextCodec(AutoTokenizer.from_pretrained(tiny_model_dir), max_prompt_tokens=40)


def test_a_long_prompt_names_the_file_and_the_line(codec, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(_rows(8, long_at=6)) + b"\n")
    examples = load_jsonl(path)
    for ex in examples[:6]:
        codec.encode_example(ex)
    with pytest.raises(PromptTooLong, match=rf"^{path} line 7: prompt has \d+ tokens, over task.max_prompt_tokens=40; "
                                            r"shorten or remove that row, or raise the limit$"):
        codec.encode_example(examples[6])
    assert issubclass(PromptTooLong, ValueError)


def test_the_collector_encodes_through_the_example(codec, tmp_path):
    from drpo.rollout.collect import Collector

    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(_rows(3, long_at=2)) + b"\n")
    collector = Collector(make_prompts(TaskConfig(name="jsonl", path=str(path)), seed=0), codec, None,
                          lambda e, r: 0.0, prompts_per_step=1, seed=0)
    with pytest.raises(PromptTooLong, match=rf"^{path} line 3: prompt has"):
        collector.encode(load_jsonl(path)[2])


def test_prompts_without_a_source_are_named_as_before(codec):
    with pytest.raises(PromptTooLong, match=r"^prompt 'x1' has \d+ tokens, over task.max_prompt_tokens=40"):
        codec.encode_example(Example("1 + " * 100, "1", id="x1"))
    with pytest.raises(PromptTooLong, match=r"^prompt 'Q : 1 \+ 1 \+ 1 .*' has \d+ tokens"):
        codec.encode("Q : " + "1 + " * 100)
