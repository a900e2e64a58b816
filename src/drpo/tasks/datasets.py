"""Loading math datasets from JSON-lines files, and the shipped evaluation benchmarks.

Every loader returns a list of :class:`~drpo.tasks.base.Example`, with the prompt already
formatted by a template containing ``{question}``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from drpo.tasks.base import Example
from drpo.utils.errors import InputError

DEFAULT_TEMPLATE = (
    "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that did not decode, under errors="surrogateescape"


def _format_answer(value: Any, field: str, line_no: int) -> str:
    """Gold answer as a string: numbers are converted (``27.0`` -> ``"27.0"``); None, empty
    strings and other types are errors naming the line."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(
            f"line {line_no}: answer field {field!r} must be a string or number, "
            f"got {type(value).__name__}"
        )
    answer = str(value).strip()
    if not answer:
        raise InputError(f"line {line_no}: answer field {field!r} is empty")
    return answer


def _check_template(template: str) -> None:
    """A template is a ``str.format`` string with one field, ``{question}`` (literal braces
    doubled, as in ``\\boxed{{}}``)."""
    if not isinstance(template, str) or "{question}" not in template:
        raise InputError(f"template must contain '{{question}}', got {template!r}")
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as error:
        raise InputError(
            f"template {template!r} is not a valid format string with only {{question}} "
            f"(double literal braces: '{{{{}}}}'): {error!r}"
        ) from error


def gsm8k_final_answer(worked_answer: str) -> str:
    """The number after ``####`` at the end of a GSM8K worked answer, thousands commas removed."""
    match = _GSM8K_FINAL.search(worked_answer)
    if match is None:
        raise ValueError(f"GSM8K answer has no final '#### N' line: {worked_answer[-80:]!r}")
    return match.group(1).replace(",", "")


def load_jsonl(
    path: str | Path,
    *,
    question_field: str = "problem",
    answer_field: str = "answer",
    template: str = "{question}",
    id_field: str | None = None,
    limit: int | None = None,
    answer_fn: Callable[[str], str] | None = None,
) -> list[Example]:
    """Read one Example per JSON line of ``path``.

    question_field / answer_field: the row keys holding the question and the gold answer.
    template:  ``str.format`` prompt with a ``{question}`` field (literal braces doubled).
    id_field:  row key used as ``Example.id`` (default: the 0-based row index).
    limit:     keep only the first ``limit`` rows.
    answer_fn: maps the raw answer string to the gold answer (e.g. :func:`gsm8k_final_answer`).
    The other fields of each row (the raw answer included) go to ``Example.meta``; ``Example.source``
    is ``"<path> line <n>"`` (1-based). Blank lines are skipped. The file must be UTF-8 (a BOM is
    allowed); a byte that is not is an error naming its line.
    """
    path = Path(path)
    _check_template(template)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if not path.is_file():
        raise InputError(f"dataset file not found: {path}")
    examples: list[Example] = []
    # undecodable bytes become lone surrogates (which valid UTF-8 never gives), so that the line
    # holding one is known exactly
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as file:
        for line_no, line in enumerate(file, start=1):
            if limit is not None and len(examples) >= limit:
                break
            bad = _NOT_UTF8.search(line)
            if bad is not None:
                raise InputError(
                    f"{path}: line {line_no} is not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at "
                    f"character {bad.start() + 1}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}: line {line_no} is not valid JSON ({error})") from error
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {line_no} is a {type(row).__name__}, not an object")
            for field in (question_field, answer_field) + ((id_field,) if id_field else ()):
                if field not in row:
                    raise InputError(
                        f"{path}: line {line_no} has no field {field!r}; "
                        f"fields present: {sorted(row)}"
                    )
            question = row[question_field]
            if not isinstance(question, str) or not question.strip():
                raise InputError(
                    f"{path}: line {line_no}: question field {question_field!r} "
                    "is not a non-empty string"
                )
            try:
                answer = _format_answer(row[answer_field], answer_field, line_no)
                if answer_fn is not None:
                    answer = answer_fn(answer)
            except ValueError as error:
                raise InputError(f"{path}: {error}") from error
            meta = {k: v for k, v in row.items() if k != question_field}
            examples.append(
                Example(
                    prompt=template.format(question=question),
                    answer=answer,
                    id=str(row[id_field]) if id_field else str(len(examples)),
                    meta=meta,
                    source=f"{path} line {line_no}",
                )
            )
    if not examples:
        raise InputError(f"dataset file has no rows: {path}")
    return examples


@dataclass(frozen=True)
class Benchmark:
    """Where a shipped benchmark lives and how its rows are laid out."""

    file: str
    question_field: str
    answer_field: str = "answer"
    id_field: str | None = None
    answer_fn: Callable[[str], str] | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "aime24": Benchmark("aime24.jsonl", question_field="problem", id_field="id"),
    "aime25": Benchmark("aime25.jsonl", question_field="question"),
    "amc23": Benchmark("amc23.jsonl", question_field="problem", id_field="id"),
    "math500": Benchmark("math500.jsonl", question_field="problem", id_field="unique_id"),
    "gsm8k": Benchmark("gsm8k_test.jsonl", question_field="question", answer_fn=gsm8k_final_answer),
}


def benchmark_path(name: str) -> Path:
    """Path of a shipped benchmark file (inside the installed ``drpo`` package)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return Path(str(resources.files("drpo") / "data" / "benchmarks" / BENCHMARKS[name].file))


def load_benchmark(
    name: str, *, template: str = DEFAULT_TEMPLATE, limit: int | None = None
) -> list[Example]:
    """Load a shipped benchmark (``aime24``, ``aime25``, ``amc23``, ``math500``, ``gsm8k``)."""
    path = benchmark_path(name)
    spec = BENCHMARKS[name]
    return load_jsonl(
        path,
        question_field=spec.question_field,
        answer_field=spec.answer_field,
        template=template,
        id_field=spec.id_field,
        limit=limit,
        answer_fn=spec.answer_fn,
    )
