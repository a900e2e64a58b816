"""Where one RL step's time goes, for any configuration: the trainer's own time/* metrics.

    python benchmarks/step_profile.py NAME [key=value ...]            # e.g. fp8 rollout.precision=fp8
    .venv-vllm/bin/python benchmarks/step_profile.py vllm rollout.engine=vllm rollout.precision=bf16

The embedded default with the given overrides, 1 thread, held-out evaluation and checkpoints off;
1 warm-up step, then 12 timed steps; then one held-out evaluation (256 prompts) timed.
With rollout.staleness >= 1, rollout and reward run in the worker process, overlapped: the step
then waits for the worker's batch (wait_rollout) instead.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time

from drpo.training.config import load_config
from drpo.training.trainer import Trainer

KEYS = ("time/rollout", "time/reward", "time/logprob", "time/backward", "time/optimizer", "time/update",
        "time/wait_rollout")

if __name__ == "__main__":
    name, extra = sys.argv[1], sys.argv[2:]
    out = tempfile.mkdtemp(prefix="drpo-step-profile-")
    cfg = load_config(None, [f"out={out}/run", "eval.every=0", "save_every=0", "progress=false", "tensorboard=false",
                             "threads=1", *extra])
    t0 = time.time()
    tr = Trainer(cfg)
    t_init = time.time() - t0
    tr.step(0)
    t0 = time.time()
    ms = [tr.step(i) for i in range(1, 13)]
    step = (time.time() - t0) / 12
    t0 = time.time()
    tr.evaluate()
    t_eval = time.time() - t0
    tr.rollout.close()
    tr.life.lock.release()
    shutil.rmtree(out, ignore_errors=True)
    print(name, f"set-up {t_init:.1f}s  step {step:.3f}s  eval {t_eval:.2f}s  ",
          " ".join(f"{k[5:]}={statistics.fmean(m[k] for m in ms):.3f}" for k in KEYS), flush=True)
