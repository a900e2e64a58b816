"""Convert drpo's JSON-lines math data into verl's RL parquet format.

verl's RLHFDataset reads one row per prompt with the columns

    data_source   str: names the reward function's branch (our reward ignores it)
    prompt        list of chat messages [{"role": "user", "content": ...}]
    ability       str ("math")
    reward_model  {"style": "rule", "ground_truth": <gold answer>}
    extra_info    {"split": ..., "index": ..., "id": ...}

Usage::

    python -m drpo.integrations.verl_data --input dapo_math.jsonl --output train.parquet \\
        --question-field prompt --answer-field solution --data-source dapo_math
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from drpo.tasks.datasets import DEFAULT_TEMPLATE, load_jsonl


def verl_rows(
    path: str | Path,
    *,
    data_source: str,
    question_field: str = "problem",
    answer_field: str = "answer",
    template: str = DEFAULT_TEMPLATE,
    split: str = "train",
    limit: Optional[int] = None,
) -> list[dict[str, Any]]:
    """One verl row per JSON line of ``path`` (see the module docstring for the columns)."""
    examples = load_jsonl(path, question_field=question_field, answer_field=answer_field,
                          template=template, limit=limit)
    return [
        {
            "data_source": data_source,
            "prompt": [{"role": "user", "content": ex.prompt}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": ex.answer},
            "extra_info": {"split": split, "index": index, "id": ex.id},
        }
        for index, ex in enumerate(examples)
    ]


def write_parquet(rows: list[dict[str, Any]], output: str | Path) -> Path:
    """Write ``rows`` to ``output`` (parent folders created); returns the path."""
    import pandas as pd  # installed with verl

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(output, index=False)
    return output


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="JSON-lines file, one problem per line")
    parser.add_argument("--output", required=True, help="parquet file to write")
    parser.add_argument("--data-source", default=None, help="data_source column (default: input file stem)")
    parser.add_argument("--question-field", default="problem")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template with {question}")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    rows = verl_rows(args.input, data_source=args.data_source or Path(args.input).stem,
                     question_field=args.question_field, answer_field=args.answer_field,
                     template=args.template, split=args.split, limit=args.limit)
    out = write_parquet(rows, args.output)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
