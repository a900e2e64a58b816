"""The unit of data every stage passes around: one prompt with its gold answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One task instance.

    prompt: the text given to the policy (already formatted with its template).
    answer: the gold answer the verifier compares against (e.g. "25", "\\frac{1}{2}").
    id:     a stable identifier (dataset row, or generator index).
    meta:   anything else the source carries (difficulty, subject, ...).
    source: where it was read from, for error messages (``data.jsonl line 7``, 1-based); "" for
            generated examples. Not part of equality.
    """

    prompt: str
    answer: str
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = field(default="", compare=False)
