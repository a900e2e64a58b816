"""What one publish of the policy's weights to the rollout worker costs in memory (rollout.staleness >= 1).

    python benchmarks/publish_weights.py [--params 135e6]

A state dict of ``--params`` float32 parameters (135 M: SmolLM2-135M's size, 540 MB) in 30 tensors; each way of
publishing runs in a fresh process, which prints the growth of its peak resident memory past the state dict itself:

    before   what drpo did up to b93a14e: a detached CPU copy, torch.save into a BytesIO, its getvalue(), and the
             pickle of the message holding those bytes that the multiprocessing queue's feeder thread made (the
             worker then torch.load-ed them)
    now      drpo.rollout.service.SharedWeights.write: one copy, into shared memory the worker maps

The worker side: before, it unpickled its own copy (+1 copy); now it maps the same memory (+0).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys

CHILD = """
import io, resource, sys, torch
from drpo.rollout.service import Layout, SharedWeights  # imported by both ways: its imports are not a publish's
n, way = float(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
state = {f"layer{i}.weight": torch.randn(int(n / 30), generator=g) for i in range(30)}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if way == "before":
    copy = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(copy, buf)
    data = buf.getvalue()
    from multiprocessing.reduction import ForkingPickler
    message = ForkingPickler.dumps(("weights", 1, data))  # what multiprocessing.Queue's feeder sends
else:
    shared, fd = SharedWeights.write(Layout.of(state), state)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=135e6)
    args = ap.parse_args()
    mb = args.params * 4 / 2**20
    print(f"{args.params / 1e6:.0f} M float32 parameters = {mb:.0f} MiB of weights; peak memory added by one publish:")
    for way in ("before", "now"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.params), way], capture_output=True, text=True,
                             check=True).stdout.strip()
        print(f"  {way:6s} {float(out):7.0f} MiB  ({float(out) / mb:.1f} x the weights)")


if __name__ == "__main__":
    main()
