"""The cost of ``drpo compare --backend ray`` per run, against the local process pool, on this machine.

    python benchmarks/ray_overhead.py [--steps 2] [--workers 1] [--repeats 2] \
        [--out benchmarks/results/ray_overhead.json]

The quick grid (8 runs of the built-in model, ``--steps`` steps each) runs on both backends, ``--repeats``
times, alternating which goes first: the local pool with ``--workers`` processes, and Ray tasks (at most
``--workers`` in flight) on a local cluster that this script starts (``ray start --head``) and stops, with
``--workers`` CPUs or the largest run's request if more (a stale run asks for 2). With one run at a
time (``--workers 1``, the default) the grid's wall time is the sum of its runs' and the overhead per run is
(Ray's wall time - the local pool's) / runs; Ray's includes connecting to the cluster and disconnecting
once per grid (printed on its own too), not starting the cluster (printed apart: a cluster serves many
grids). Every run's metrics are checked equal between the backends (time/ and throughput/ aside).
Run it on an otherwise idle machine: anything else running is load too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from drpo.experiments import compare
from drpo.experiments.backends import resources
from drpo.experiments.grids import build_grid
from drpo.training.config import load_config
from drpo.training import run_io

VOLATILE = ("time/", "throughput/")


def start_cluster(cpus: int, temp: str, env: dict) -> tuple[subprocess.Popen, str, float]:
    """``ray start --head --block`` with ``cpus`` CPUs: (its process, its address, seconds until ready)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(temp) / "head.log"
    t0 = time.perf_counter()
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus",
                             str(cpus), "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", temp,
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None:
            raise RuntimeError(f"ray start failed:\n{log.read_text()}")
        time.sleep(0.1)
    return head, f"127.0.0.1:{port}", time.perf_counter() - t0


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)}
            for r in run_io.read_metrics(run_dir / "metrics.jsonl")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this script's own local cluster, and the driver that joins it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    grid = build_grid("quick", steps=a.steps)
    n = len(grid.runs)
    temp = tempfile.mkdtemp(prefix="drpo-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # the cluster holds the largest request of any run (a stale run's rollout worker is a second process: twice
    # its threads), else that run would wait in Ray's queue forever; --workers still caps the runs in flight
    cpus = max([a.workers] + [int(resources(load_config(None, list(r.overrides)))["num_cpus"]) for r in grid.runs])
    head, address, start_s = start_cluster(cpus, temp, env)
    print(f"cluster of {cpus} CPU(s) started in {start_s:.1f} s; {n} runs of {a.steps} steps per grid", flush=True)
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    connect: list[float] = []
    try:
        import ray

        for i in range(a.repeats):
            for backend in (("local", "ray") if i % 2 == 0 else ("ray", "local")):
                out = Path(temp) / f"{backend}{i}"
                t0 = time.perf_counter()
                entries = compare.run_grid(grid, out, workers=a.workers, backend=backend,
                                           address=address if backend == "ray" else None)
                walls[backend].append(time.perf_counter() - t0)
                assert all(e["state"] == "finished" for e in entries.values()), entries
                print(f"repeat {i}: {backend:5s} {walls[backend][-1]:7.1f} s ({walls[backend][-1] / n:.2f} s/run)",
                      flush=True)
            t0 = time.perf_counter()
            ray.init(address=address, include_dashboard=False)
            ray.shutdown()
            connect.append(time.perf_counter() - t0)
        same = all(rows(Path(temp) / f"local{i}" / r.slug) == rows(Path(temp) / f"ray{i}" / r.slug)
                   for i in range(a.repeats) for r in grid.runs)
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    local, ray_s = statistics.median(walls["local"]), statistics.median(walls["ray"])
    result = {"runs": n, "steps": a.steps, "workers": a.workers, "cluster_cpus": cpus, "repeats": a.repeats, "wall_s": walls,
              "cluster_start_s": round(start_s, 2), "connect_disconnect_s": [round(c, 2) for c in connect],
              "overhead_s_per_run": round((ray_s - local) / n, 2), "same_numbers": same,
              "load_average_1min_at_end": os.getloadavg()[0]}
    print(f"median wall: local {local:.1f} s, ray {ray_s:.1f} s -> Ray's overhead {(ray_s - local) / n:+.2f} s per "
          f"run ({100 * (ray_s - local) / local:+.0f} %), connect+disconnect {statistics.median(connect):.1f} s per "
          f"grid, cluster start {start_s:.1f} s; same numbers on both: {same}; load average {os.getloadavg()[0]:.1f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
