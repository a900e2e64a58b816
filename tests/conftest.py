"""Shared fixtures: a tiny Qwen3 built from a config and saved with save_pretrained, so the
trainer loads it by path through the same code a hub id takes (no download)."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

try:  # matplotlib builds its font cache on first use, running fc-list: do it here, once, not inside a fast test
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401,E402
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _slow_work_needs_the_slow_mark(request, monkeypatch):
    """A test that trains or starts a process must be marked ``slow``, so that ``make test-fast`` (``-m "not
    slow"``) stays fast: outside such tests, a training step or a new process is recorded (and allowed, so
    nothing waits on a refused start) and fails the test at its end, saying what to do."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import multiprocessing.process
    import subprocess

    from drpo.training.trainer import Trainer

    seen: list[str] = []

    def record(what, real):
        def wrapper(*args, **kwargs):
            seen.append(what)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(subprocess.Popen, "__init__", record("starts a process", subprocess.Popen.__init__))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        record("starts a process", multiprocessing.process.BaseProcess.start))
    monkeypatch.setattr(Trainer, "step", record("trains (Trainer.step)", Trainer.step))
    yield
    if seen:
        pytest.fail(f"{request.node.nodeid} {' and '.join(sorted(set(seen)))}: mark it @pytest.mark.slow", pytrace=False)


def _save_tiny(tmp_path_factory, name: str, config_fn, edit=None, **sizes) -> str:
    """Build a tiny model from ``config_fn(vocab, **sizes)`` with the built-in tokenizer, apply
    ``edit(model, tokenizer)`` if given, save both."""
    from drpo.models.tiny import build_tiny_model
    from drpo.builtin.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp(name)
    tok = build_tokenizer()
    cfg = config_fn(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                    **sizes)
    model = build_tiny_model(cfg, seed=0)
    if edit is not None:
        with torch.no_grad():
            edit(model, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


TINY_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  intermediate_size=64)
NUMBER_FEATURE, EOS_AFTER_NUMBER = 1.0, 2.2


def ends_after_numbers(model, tok) -> None:
    """Make a tiny model end its responses: the 1,000 number tokens share a feature (+1 on dimension 0 of their
    tied embedding rows) and EOS reads it (+2.2 on its row): measured on held-out prompts, EOS has 45% of the
    probability right after a number and under 0.1% elsewhere (so responses are rarely empty). A randomly initialised model never samples EOS in 6 tokens: every run of it would be the
    no_eos collapse the trainer warns about (drpo.training.collapse)."""
    numbers = tok.convert_tokens_to_ids([str(i) for i in range(1000)])
    emb = model.get_input_embeddings().weight  # tied with the output embeddings
    emb[numbers, 0] += NUMBER_FEATURE
    emb[tok.eos_token_id, 0] += EOS_AFTER_NUMBER


@pytest.fixture(scope="session")
def random_tiny_dir(tmp_path_factory):
    """The tiny Qwen3 as initialised (before :func:`ends_after_numbers`): it never samples EOS in a few tokens."""
    from drpo.models.tiny import tiny_qwen3_config

    return _save_tiny(tmp_path_factory, "random_qwen3", tiny_qwen3_config, **TINY_SIZES)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen3 (about 100k parameters) that ends most of its responses (:func:`ends_after_numbers`)."""
    from drpo.models.tiny import tiny_qwen3_config

    return _save_tiny(tmp_path_factory, "tiny_qwen3", tiny_qwen3_config, edit=ends_after_numbers, **TINY_SIZES)


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory):
    """The tiny model before :func:`ends_after_numbers`, with its (tied) embeddings scaled x20: its next-token
    distributions are peaked, so sampled tokens fall in every mu bucket (measured: 15/4/13/64 of 96 tokens), as a
    trained model's do; the random tiny model puts ~all of them below mu = 0.01."""
    from drpo.models.tiny import tiny_qwen3_config

    def sharpen(model, tok):
        model.get_input_embeddings().weight.mul_(20.0)

    return _save_tiny(tmp_path_factory, "sharp_qwen3", tiny_qwen3_config, edit=sharpen, **TINY_SIZES)


@pytest.fixture(scope="session")
def moe_model_dir(tmp_path_factory):
    """A tiny Qwen3-MoE (8 experts, top-2) built from a config and saved with save_pretrained."""
    from drpo.models.tiny import tiny_qwen3_moe_config

    return _save_tiny(tmp_path_factory, "tiny_qwen3_moe", tiny_qwen3_moe_config, hidden_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      moe_intermediate_size=32)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """A tiny Qwen3 that vLLM's CPU attention accepts (head_dim 32: it rejects 16) with peaked
    next-token distributions (initializer_range 0.3: entropy about 5 nats instead of log V = 7.8,
    so temperature and top-k/top-p visibly change the log-probs) and an EOS row scaled by 2.5 in
    the tied embedding (about half the responses of 16 tokens stop at EOS)."""
    from drpo.models.tiny import tiny_qwen3_config

    def eos_boost(model, tok):
        model.get_output_embeddings().weight[tok.eos_token_id] *= 2.5

    return _save_tiny(tmp_path_factory, "tiny_qwen3_vllm", tiny_qwen3_config, edit=eos_boost, hidden_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      intermediate_size=128, initializer_range=0.3)
