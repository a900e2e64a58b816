"""Common mistakes get one clear line and exit code 2, never a traceback; nonsense is refused, not run."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import drpo
from drpo.cli import app
from helpers import assert_one_line


def one_line_error(args: list[str], needle: str) -> str:
    return assert_one_line(CliRunner().invoke(app, args), 2, needle)


def test_the_one_line_check_can_fail():
    """assert_one_line refuses a traceback, an escaped exception, two lines, another code, a missing needle."""
    class Res:
        def __init__(self, output, exit_code=2, exception=SystemExit(2)):
            self.output, self.exit_code, self.exception = output, exit_code, exception

    assert_one_line(Res("error: bad"), 2, "bad")
    for res, needle in ((Res("Traceback (most recent call last):"), "Traceback"),
                        (Res("error: bad", exit_code=2, exception=ValueError("x")), "bad"),
                        (Res("error: bad\nmore"), "bad"), (Res("error: bad", exit_code=1), "bad"),
                        (Res("error: bad"), "good")):
        with pytest.raises(AssertionError):
            assert_one_line(res, 2, needle)


@pytest.mark.parametrize("overrides,needle", [
    (["device=foo"], "unknown device 'foo'"),
    (["threads=-1"], "config error at 'threads'"),
    (["objective.params.delta=abc"], "parameter 'delta' must be of type float"),
    (["train.betas=[1"], "override 'train.betas=[1' is not valid YAML"),
    (["train.lr=.inf"], "config error at 'train.lr'"),
    (["rollout.staleness=-1"], "config error at 'rollout.staleness'"),
])
def test_bad_overrides(tmp_path, overrides, needle):
    one_line_error(["train", "--out", str(tmp_path / "r"), *overrides], needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path):
    one_line_error(["train", "--out", str(tmp_path / "r"), "device=cuda"], "CUDA is not available")


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-4\n")
    one_line_error(["train", "--config", str(bad), "--out", str(tmp_path / "r")], "is not valid YAML (line")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 1  # caf\xe9\n".encode("latin-1"))
    one_line_error(["train", "--config", str(latin), "--out", str(tmp_path / "r")], "is not UTF-8")


def test_model_mistakes(tmp_path, monkeypatch):
    import socket

    from drpo.models import loading

    one_line_error(["train", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
                   "model folder not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = one_line_error(["train", "--model", str(empty), "--out", str(tmp_path / "r")], "has no config.json")
    assert "sentencepiece" not in out
    # said at once: one connection attempt with a short limit, and transformers (whose download retries for minutes)
    # is never asked (a count, not a stopwatch: the machine's speed does not decide it)
    tries = []

    def connect(address, timeout=None, *a, **k):
        tries.append((address, timeout))
        raise OSError("no network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # else no attempt at all (also one line)
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("transformers was asked"))
    one_line_error(["train", "--model", "Qwen/Qwen3-0.6B", "--out", str(tmp_path / "r")], "cannot be reached")
    assert tries == [(loading.HUB_HOST, 3.0)]
    monkeypatch.undo()
    one_line_error(["eval", "--model", str(tmp_path / "missing")], "model folder not found")


def test_vllm_engine_without_vllm(tmp_path):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here; tests/test_vllm_engine.py covers it")
    except ImportError:
        pass
    one_line_error(["train", "--out", str(tmp_path / "r"), "rollout.engine=vllm"], "make setup-vllm")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_output_path_mistakes_are_caught_before_any_work(tmp_path, monkeypatch):
    import drpo.evaluation.run as run_mod

    monkeypatch.setattr(run_mod, "run_eval", lambda **kw: pytest.fail("the evaluation ran"))
    one_line_error(["eval", "--out", str(tmp_path / "nope" / "e.json")], "does not exist")
    f = tmp_path / "file.png"
    f.write_text("x")
    one_line_error(["geometry", "--out", str(f)], "is a file")


@pytest.mark.parametrize("args,needle", [
    (["eval", "--limit", "0"], "--limit"),
    (["eval", "--k", "0"], "--k"),
    (["compare", "--workers", "0"], "--workers"),
])
def test_nonsense_numbers_are_refused(args, needle):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output


def test_policy_loss_refuses_nonsense_masks_and_string_parameters():
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    blp = torch.full((2, 3), -1.1)
    adv = torch.tensor([1.0, -1.0])
    for bad in (-1, 2):
        mask = torch.ones(2, 3)
        mask[0, 1] = bad
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            drpo.policy_loss("drpo", lp, blp, adv, mask)
    with pytest.raises(ValueError, match="parameter 'delta' must be of type float, got '12.5'"):
        drpo.policy_loss("drpo", lp, blp, adv, torch.ones(2, 3), delta="12.5")
    with pytest.raises(ValueError, match="'adv_weighting' must be of type bool"):
        drpo.policy_loss("drpo", lp, blp, adv, torch.ones(2, 3), adv_weighting="no")
    loss, _ = drpo.policy_loss("drpo", lp, blp, adv, torch.ones(2, 3), delta=12)  # an int is a float
    assert torch.isfinite(loss)


@pytest.mark.parametrize("command", ["train", "eval", "compare"])
def test_a_bug_keeps_its_traceback_and_only_a_user_error_is_one_line(tmp_path, monkeypatch, command):
    """The CLI turns UserError, and nothing else, into one line and exit 2: a ValueError or FileNotFoundError raised
    by a bug (here, in the trainer's set-up, the evaluation, the comparison) escapes with its traceback."""
    import drpo.evaluation.run as eval_run
    import drpo.experiments.compare as compare_mod
    from drpo.training.trainer import Trainer
    from drpo.utils.errors import UserError

    args, where = {"train": (["train", "--out", str(tmp_path / "r")], (Trainer, "_set_up")),
                   "eval": (["eval", "--limit", "1"], (eval_run, "run_eval")),
                   "compare": (["compare", "--out", str(tmp_path / "g"), "--report-only"],
                               (compare_mod, "run_compare"))}[command]
    for error in (ValueError("a bug"), FileNotFoundError("a bug"), UserError("you typed it wrong")):
        def raises(*a, **k):
            raise error

        monkeypatch.setattr(*where, raises)
        res = CliRunner().invoke(app, args)
        if isinstance(error, UserError):
            assert_one_line(res, 2, "you typed it wrong")
        else:
            assert res.exit_code == 1 and res.exception is error, (res.exit_code, res.output)  # escaped: a traceback
