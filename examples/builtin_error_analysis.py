"""Which wrong answers does a model give on the built-in task? Reads `drpo eval --out` JSON files
(benchmark builtin) and counts, among the wrong answers, those that copy one of the problem's
operands (the demonstrator's shortcut the warm start imitates) -- the behaviour RL should unlearn.

    drpo eval --model MODEL --benchmark builtin --limit 512 --k 1 --precision fp8 --out e.json
    python examples/builtin_error_analysis.py e.json [more.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from drpo.builtin.warmstart import boxed_answer
from drpo.tasks.arithmetic import ArithmeticTask


def main(paths: list[str]) -> None:
    for path in paths:
        result = json.loads(Path(path).read_text())
        examples = {e.id: e for e in ArithmeticTask().heldout(result["n"])}
        unknown = [row["id"] for row in result["per_example"] if row["id"] not in examples]
        if unknown:
            sys.exit(f"{path}: ids {unknown[:3]} are not built-in held-out problems; "
                     "pass the output of `drpo eval --benchmark builtin`")
        n = wrong = copies = 0
        for row in result["per_example"]:
            ex = examples[row["id"]]
            for response in row["responses"]:
                n += 1
                got = boxed_answer(response)
                if got != ex.answer:
                    wrong += 1
                    copies += got in {str(x) for x in ex.meta["operands"]}
        print(f"{path}: {n} answers, accuracy {1 - wrong / n:.3f}, wrong {wrong}, "
              f"of which copy an operand {copies}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
