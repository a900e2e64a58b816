"""Stand-alone math-verify worker, run as a child process by :mod:`drpo.rewards.verify`.

It is started as ``python -c <this file's source>`` so that it imports only the standard
library and math-verify (not ``drpo``, hence not torch). Because it runs on its own main
thread, math-verify's signal-based timeouts work here; they cut ordinary slow sympy work
without a restart. Work that a signal cannot interrupt (C-level big-integer arithmetic such
as ``9^{9^{9^{9}}}``) is cut by the parent, which kills this process at its deadline.

Protocol, one JSON object per line:
    out: "ready" once math-verify is imported;
    in:  {"pred": <boxed content>, "gold": <gold answer>, "timeout": <int seconds>}
    out: {"ok": true | false}
The loop ends when stdin closes (the parent exited or dropped the worker).
"""
import json
import logging
import sys

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def parse_boxed(answer: str, timeout: int) -> list:
    """Parse one answer as if it were the content of ``\\boxed{}``."""
    return parse("\\boxed{" + answer + "}", extraction_config=CONFIG, parsing_timeout=timeout)


GOLD_CACHE: dict = {}  # (gold, timeout) -> parsed gold, oldest first
GOLD_CACHE_SIZE = 4096


def parse_gold(gold: str, timeout: int) -> tuple:
    """Gold answers repeat across the n samples of a prompt: parse each once. An empty parse
    is not kept: math-verify also returns one on a timeout, which a busy machine can cause,
    and keeping it would fail every later check on that gold in this worker."""
    key = (gold, timeout)
    if key in GOLD_CACHE:
        return GOLD_CACHE[key]
    parsed = tuple(parse_boxed(gold, timeout))
    if parsed:
        if len(GOLD_CACHE) >= GOLD_CACHE_SIZE:
            del GOLD_CACHE[next(iter(GOLD_CACHE))]
        GOLD_CACHE[key] = parsed
    return parsed


def check(pred: str, gold: str, timeout: int) -> bool:
    """math-verify equivalence of a predicted answer and a gold answer."""
    gold_parsed = list(parse_gold(gold, timeout))
    pred_parsed = parse_boxed(pred, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are expected here
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ok = check(request["pred"], request["gold"], request["timeout"])
        except (Exception, TimeoutException):  # TimeoutException derives from BaseException
            ok = False
        out.write(json.dumps({"ok": ok}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
