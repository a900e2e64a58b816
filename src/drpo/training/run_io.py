"""A run directory, and the module for each of its files (this module gathers their public names).

    <out>/config.yaml            the resolved configuration
    <out>/metrics.jsonl          one JSON object per step, flushed and fsynced as written    drpo.training.metrics_log
    <out>/tb/                    TensorBoard event files                                     drpo.training.metrics_log
    <out>/checkpoints/step_N/    model (safetensors), tokenizer, optimizer.safetensors,      drpo.training.checkpoint
                                 state.json (and rollout_versions.safetensors)
    <out>/status.json            running / finished / interrupted / collapsed / failed /     drpo.training.status
                                 error, with the reason
    <out>/traceback.txt          a bug's traceback (status failed, cause exception)          drpo.training.lifecycle
    <out>/.lock                  held (flock) by the process running the run; holds its pid  drpo.training.lock

Resuming: drpo.training.resume says which keys may change; drpo.training.checkpoint finds the newest checkpoint
that can be read. A full disk while writing any of these files: drpo.training.disk.
"""
from drpo.training.checkpoint import (
    ROLLOUT_VERSIONS, Checkpoint, CheckpointState, UnsafeCheckpoint, checkpoint_bytes, checkpoints, latest_checkpoint,
    latest_valid_checkpoint, load_rollout_versions, read_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from drpo.training.disk import DiskFull, free_bytes, is_disk_full
from drpo.training.lock import RunLock, RunLocked
from drpo.training.metrics_log import MetricsLog, read_metrics, set_aside_metrics_after
from drpo.training.resume import RESUME_SAFE_KEYS, ResumeRefused, check_resume_config
from drpo.training.status import STATUS_BYTES, read_status, write_status

__all__ = ["ROLLOUT_VERSIONS", "Checkpoint", "CheckpointState", "UnsafeCheckpoint", "checkpoint_bytes", "checkpoints",
           "latest_checkpoint", "latest_valid_checkpoint", "load_rollout_versions", "read_checkpoint", "rng_state",
           "save_checkpoint", "set_rng_state", "DiskFull", "free_bytes", "is_disk_full", "RunLock", "RunLocked",
           "MetricsLog", "read_metrics", "set_aside_metrics_after", "RESUME_SAFE_KEYS", "ResumeRefused",
           "check_resume_config", "STATUS_BYTES", "read_status", "write_status"]
