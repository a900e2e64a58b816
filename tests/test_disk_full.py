"""A full disk while a run writes its files: one DiskFull line naming the path and the free space,
no partial file left behind, the last good checkpoint intact, and status.json can still say
``error`` (it is overwritten in place when a new file cannot be written).

Injected: an OSError(ENOSPC) from the writers. Real: a small tmpfs filled up (needs root to mount;
skipped otherwise)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpo.training import checkpoint, disk, metrics_log, run_io, status as status_file
from drpo.training.checkpoint import CheckpointState, rng_state
from drpo.training.environment import RunEnvironment
from drpo.training.run_io import DiskFull


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()  # optimizer state to save
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir), opt, sched


def _save(run_dir: Path, step: int, policy) -> Path:
    state = CheckpointState(step=step, config={}, environment=RunEnvironment(1, None, None), delta=None, rng=rng_state())
    return run_io.save_checkpoint(run_dir, *policy, state)


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert len(message.splitlines()) == 1, message
    return message


# ---------------------------------------------------------------- injected ENOSPC

def test_a_checkpoint_on_a_full_disk(tmp_path, policy, monkeypatch):
    good = _save(tmp_path, 1, policy)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    def write_then_fail(path, text):  # a partial file, then the disk is full
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_text", write_then_fail)
    with pytest.raises(DiskFull) as info:
        _save(tmp_path, 2, policy)
    message = _one_line(info.value)
    root = tmp_path / "checkpoints"
    assert message.startswith(f"disk full: could not write checkpoint step_2 in {root} (")
    assert " free, about " in message and " needed); the partial checkpoint was removed and step_1 is intact; " in message
    assert message.endswith("free some space (or move the run), then continue it with --resume")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError) and info.value.free > 0
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]  # no .tmp_step_2 left
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    monkeypatch.undo()
    found = run_io.latest_valid_checkpoint(tmp_path)
    assert found.path == good and found.state.step == 1


def test_safetensors_errors_of_a_full_disk_are_recognised(tmp_path, policy, monkeypatch):
    from safetensors import SafetensorError

    def safetensors_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(type(policy[0]), "save_pretrained", safetensors_full)
    with pytest.raises(DiskFull, match="could not write checkpoint step_3"):
        _save(tmp_path, 3, policy)
    assert not (tmp_path / "checkpoints" / ".tmp_step_3").exists()


def test_other_errors_while_saving_stay_as_they_are_and_clean_up(tmp_path, policy, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("not a disk problem")

    monkeypatch.setattr(checkpoint, "save_optimizer", broken)
    with pytest.raises(ValueError, match="not a disk problem"):
        _save(tmp_path, 4, policy)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, policy, monkeypatch):
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFull, match=r"\(1000 B free, about [\d.]+ [KM]iB needed\); nothing was written; "):
        _save(tmp_path, 5, policy)
    assert list((tmp_path / "checkpoints").glob("*")) == []


def test_status_can_say_error_on_a_full_disk(tmp_path, monkeypatch):
    run_io.write_status(tmp_path, "running", step=7)
    monkeypatch.setattr(status_file, "_write_new_file", lambda path, data: (path.write_bytes(b""), enospc()))
    long_reason = "DiskFull: " + "x" * 10_000  # longer than the file: shortened to fit
    run_io.write_status(tmp_path, "error", step=7, reason=long_reason)
    status = run_io.read_status(tmp_path)
    assert status["state"] == "error" and status["step"] == 7
    assert status["reason"].startswith("DiskFull: xxx") and status["reason"].endswith("...")
    assert not (tmp_path / "status.json.tmp").exists()
    assert (tmp_path / "status.json").stat().st_size == run_io.STATUS_BYTES  # never grown in place


def test_status_without_a_file_to_overwrite_is_a_disk_full_error(tmp_path, monkeypatch):
    monkeypatch.setattr(status_file, "_write_new_file", enospc)
    with pytest.raises(DiskFull, match=rf"^disk full: could not write {tmp_path / 'status.json'} \("):
        run_io.write_status(tmp_path, "running", step=0)
    assert not (tmp_path / "status.json.tmp").exists()


def test_healthy_status_files_read_as_before(tmp_path):
    run_io.write_status(tmp_path, "finished", step=3)
    assert run_io.read_status(tmp_path)["state"] == "finished"
    assert (tmp_path / "status.json").stat().st_size == run_io.STATUS_BYTES
    text = (tmp_path / "status.json").read_text()
    assert json.loads(text)["step"] == 3 and text.startswith('{\n "state": "finished"')


def test_a_metrics_row_on_a_full_disk_leaves_no_torn_line(tmp_path, monkeypatch):
    log = run_io.MetricsLog(tmp_path, tensorboard=False)
    log.write(1, {"reward/mean": 0.5})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_log.os, "write", half_then_full)
    with pytest.raises(DiskFull, match=rf"^disk full: could not write the metrics of step 2 to {tmp_path / 'metrics.jsonl'} \("):
        log.write(2, {"reward/mean": 0.25})
    monkeypatch.undo()
    log.write(3, {"reward/mean": 1.0})  # once there is space again
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 3]


# ---------------------------------------------------------------- a real full disk (tmpfs)

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(res.stderr or res.stdout).strip() or res.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert run_io.free_bytes(disk) < 4096


@pytest.mark.slow
def test_a_real_full_disk(small_disk, policy, monkeypatch):
    run = small_disk / "run"
    run.mkdir()
    run_io.write_status(run, "running", step=0)
    log = run_io.MetricsLog(run, tensorboard=False)
    log.write(1, {"reward/mean": 0.5})
    _fill(small_disk)

    with pytest.raises(DiskFull, match="could not write the metrics of step 2"):
        log.write(2, {"reward/mean": 0.5, "pad": "x" * 8000})
    with pytest.raises(DiskFull, match=r"could not write checkpoint step_2 .*nothing was written"):
        _save(run, 2, policy)  # refused up front: the model alone is larger than what is free
    monkeypatch.setattr(checkpoint, "checkpoint_bytes", lambda *a: 0)  # so that the writers themselves hit the full disk
    with pytest.raises(DiskFull, match=r"could not write checkpoint step_2 .*the partial checkpoint was removed"):
        _save(run, 2, policy)
    assert list((run / "checkpoints").iterdir()) == []
    run_io.write_status(run, "error", step=1, reason="DiskFull: " + "y" * 300)
    assert run_io.read_status(run)["state"] == "error"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl", "status.json"]
    log.close()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
