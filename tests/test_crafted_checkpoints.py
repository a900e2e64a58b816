"""A crafted checkpoint (a pickle that runs a command when loaded) is refused in one line naming the file, and none of
it runs: by ``--resume`` (the optimizer and state files of a checkpoint as earlier drpo versions wrote them) and by
``drpo eval --model`` (pickled weights). Through the command line only, so that the same file runs against an
earlier drpo: at b93a14e both tests fail (the resume test's command ran)."""
from __future__ import annotations

import os
import shutil

import torch
from typer.testing import CliRunner

import pytest
from drpo.cli import app
from helpers import assert_one_line, small_run


class RunsACommand:
    """A pickle that runs ``touch <marker>`` when loaded by a plain unpickler (torch.load(weights_only=False))."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_drpo_eval_refuses_pickled_weights_in_one_line(tiny_model_dir, tmp_path):
    crafted = tmp_path / "model"
    shutil.copytree(tiny_model_dir, crafted)
    (crafted / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": RunsACommand(marker)}, crafted / "pytorch_model.bin")
    res = CliRunner().invoke(app, ["eval", "--model", str(crafted), "--limit", "1", "--k", "1"])
    assert not marker.exists(), "the pickle ran"
    assert_one_line(res, 2, f"{crafted / 'pytorch_model.bin'} is a pickle")


@pytest.mark.slow
def test_resume_refuses_a_crafted_checkpoint_in_one_line_and_runs_none_of_it(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    assert CliRunner().invoke(app, ["train", *small_run(tiny_model_dir, out)]).exit_code == 0
    step_4 = out / "checkpoints" / "step_4"
    for name in ("state.json", "optimizer.safetensors"):  # as an earlier drpo wrote it: torch pickles
        (step_4 / name).unlink(missing_ok=True)
    markers = [tmp_path / "ran_state", tmp_path / "ran_optimizer"]
    torch.save({"step": 4, "rng": RunsACommand(markers[0])}, step_4 / "state.pt")
    torch.save({"optimizer": RunsACommand(markers[1])}, step_4 / "optimizer.pt")
    before = (out / "metrics.jsonl").read_text()
    res = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "train.steps=6"])
    assert not any(m.exists() for m in markers), "the pickle ran"
    assert_one_line(res, 2, f"{step_4 / 'state.pt'} would run code if loaded (it calls posix.system)")
    assert (out / "metrics.jsonl").read_text() == before  # not resumed from an older checkpoint, nor from step 0
