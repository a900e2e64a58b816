"""drpo.tasks: the built-in arithmetic task, jsonl datasets and benchmarks, prompt sources."""
from drpo.tasks.base import Example
from drpo.tasks.sources import PromptSource, make_prompts

__all__ = ["Example", "PromptSource", "make_prompts"]
