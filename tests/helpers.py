"""Rewards a randomly initialised test model can earn, so that trainer tests see real gradients.

The arithmetic task's own reward needs ``\\boxed{``, the right number and ``}`` among ~2.5k tokens:
a random model never earns it, every advantage is 0 and no weight moves. These rewards vary
between the samples of a group from the first step, and a policy can learn to raise them.
Used as ``task.reward=helpers:number_reward`` (tests/ is on sys.path under pytest).
"""
from __future__ import annotations


def number_reward(example, response: str) -> float:
    """The share of the response's words that are numbers (the built-in vocabulary holds 1000 of them)."""
    words = response.split()
    return sum(w.isdigit() for w in words) / len(words) if words else 0.0


def interrupt_at(monkeypatch, at: int) -> None:
    """Make ``Trainer.step`` raise KeyboardInterrupt at 0-based step ``at`` (a Ctrl-C there);
    ``monkeypatch.undo()`` restores it."""
    from drpo.training.trainer import Trainer

    real = Trainer.step

    def step(self, i):
        if i == at:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(Trainer, "step", step)


# A small run on the tiny test model (tests/conftest.py) that takes about a second: later overrides win (key=value,
# applied in order). It is not in collapse (drpo.training.collapse), so that a test that trains sees no warning unless
# it is about collapse: the model ends most responses with EOS right after a number, and a response cut off at
# rollout.max_new_tokens scores 0 (train.overlong_reward=0), so the policy keeps ending them (tests/test_faults.py:
# its 12- and 30-step reference runs print no warning). lr 1e-2: at 3e-2 the tiny policy swung between extremes.
# threads=1: tests compare runs number for number, and the default thread count depends on the load at start.
SMALL_RUN = ("threads=1", "train.steps=4", "rollout.prompts_per_step=4", "rollout.group_size=4", "train.minibatches=2",
             "rollout.max_new_tokens=6", "eval.every=0", "eval.prompts=8", "save_every=2", "progress=false",
             "tensorboard=false", "train.lr=1e-2", "train.overlong_reward=0", "task.reward=helpers:number_reward")


def small_run(model_dir, out, *extra: str) -> list[str]:
    """The overrides of a small run of ``model_dir`` in ``out`` (see :data:`SMALL_RUN`), then ``extra``."""
    return [f"model={model_dir}", f"out={out}", *SMALL_RUN, *extra]


def small_config(model_dir, out, *extra: str):
    """:func:`small_run` as a validated RunConfig."""
    from drpo.training.config import load_config

    return load_config(None, small_run(model_dir, out, *extra))


def assert_one_line(res, code: int, needle: str) -> str:
    """A CLI result that is one line (no traceback) containing ``needle``, exiting with ``code`` through a
    clean exit (typer.Exit / SystemExit), not an exception that escaped."""
    out = res.output.strip()
    assert res.exit_code == code, (res.exit_code, out)
    assert isinstance(res.exception, SystemExit) or (code == 0 and res.exception is None), repr(res.exception)
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert needle in out, out
    return out


def raising_reward(example, response: str) -> float:
    """A broken reward: raises on every call."""
    raise KeyError("answer_key")


def exiting_reward(example, response: str) -> float:
    """A reward that ends the process (a library calling sys.exit, say)."""
    import sys

    sys.exit(3)


def verifying_reward(example, response: str) -> float:
    """number_reward, after a check that needs the math-verify worker process (so a run has one)."""
    from drpo.rewards.verify import verify

    verify("\\boxed{1/2}", "0.5")
    return number_reward(example, response)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in __import__("os").listdir(f"/proc/{p}/task")
                    for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            kids = []
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie, dead and not yet reaped, counts as gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
