"""Checkpoints load without running code (safetensors and JSON; earlier checkpoints' pickles only through torch's
restricted unpickler, which refuses a pickle that would run code), an earlier checkpoint resumes exactly, and so
does one whose model was saved in shards. (Crafted checkpoints through the command line: test_crafted_checkpoints.)"""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from drpo.training import checkpoint, run_io
from drpo.training.trainer import Trainer
from helpers import interrupt_at, small_config
from test_crafted_checkpoints import RunsACommand

VOLATILE = ("time/", "throughput/")


def _rows(out) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in run_io.read_metrics(out / "metrics.jsonl")]


def test_the_safe_loader_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"step": 1, "rng": RunsACommand(marker)}, tmp_path / "state.pt")
    with pytest.raises(checkpoint.UnsafeCheckpoint, match=r"state.pt would run code if loaded \(.*system"):
        checkpoint.safe_torch_load(tmp_path / "state.pt")
    assert not marker.exists()
    torch.save({"step": 1, "rng": np.random.get_state(), "t": torch.ones(2)}, tmp_path / "plain.pt")
    assert checkpoint.safe_torch_load(tmp_path / "plain.pt")["step"] == 1  # tensors, numbers, numpy's RNG state


def _as_earlier_drpo_wrote_it(ckpt) -> None:
    """Rewrite a checkpoint in the format drpo wrote before state.json (torch pickles; b93a14e's save_checkpoint)."""
    found = checkpoint.read_checkpoint(ckpt)
    s = found.state
    version, internal, gauss = s.rng["python"]
    key = np.asarray(s.rng["numpy"]["state"]["key"], dtype=np.uint32)
    rng = {"python": (version, tuple(internal), gauss),
           "numpy": ("MT19937", key, s.rng["numpy"]["state"]["pos"], s.rng["numpy"]["has_gauss"],
                     s.rng["numpy"]["gauss"]),
           "torch": torch.frombuffer(bytearray(base64.b64decode(s.rng["torch"])), dtype=torch.uint8)}
    torch.save({"optimizer": found.optimizer, "scheduler": found.scheduler}, ckpt / checkpoint.LEGACY_OPTIMIZER)
    torch.save({"step": s.step, "rng": rng, "config": s.config, "threads": s.environment.threads,
                "cpu_capability": s.environment.cpu_capability, "delta": s.delta}, ckpt / checkpoint.LEGACY_STATE)
    (ckpt / checkpoint.STATE).unlink()
    (ckpt / checkpoint.OPTIMIZER).unlink()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["earlier_format", "sharded_model"])
def test_an_earlier_or_sharded_checkpoint_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch, kind):
    full = tmp_path / "full"
    Trainer(small_config(tiny_model_dir, full)).train()
    part = tmp_path / "part"
    interrupt_at(monkeypatch, 3)  # after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        Trainer(small_config(tiny_model_dir, part)).train()
    monkeypatch.undo()
    step_2 = part / "checkpoints" / "step_2"
    if kind == "earlier_format":
        _as_earlier_drpo_wrote_it(step_2)
    else:  # the layout of a model above the shard size: shards and their index
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(step_2)
        (step_2 / "model.safetensors").unlink()
        model.save_pretrained(step_2, max_shard_size="100KB")
        assert len(list(step_2.glob("model-*.safetensors"))) > 1
    notes = []
    tr = Trainer(small_config(tiny_model_dir, part), resume=True, notify=notes.append)
    assert tr.start_step == 2 and not any("cannot be read" in n for n in notes), notes
    tr.train()
    assert _rows(part) == _rows(full)
