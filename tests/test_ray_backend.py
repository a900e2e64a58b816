"""``drpo compare --backend ray``: the same runs and numbers as the local pool, and the faults of a cluster
on a real local Ray cluster that the tests start and stop themselves (one per module, 2 CPUs): a worker
killed mid-run, the driver killed, a run that fails every time, one Ctrl-C."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from drpo.cli import app
from drpo.experiments import backends, compare
from drpo.experiments.grids import GRID_BASE, QUICK_BASE, Block, expand
from drpo.experiments.report import write_report
from drpo.training import run_io
from drpo.training.config import load_config
from helpers import alive, assert_one_line, cmdline

VOLATILE = ("time/", "throughput/")
SRC = Path(__file__).resolve().parents[1] / "src" / "drpo"


def tiny(model_dir: str) -> list[str]:
    """Overrides that make a grid run take about a second (as tests/test_compare.py's)."""
    return [f"model={model_dir}", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6",
            "eval.prompts=8", "eval.every=2", "save_every=2", "train.lr=1e-3", "train.stop_on_collapse=false"]


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)}
            for r in run_io.read_metrics(run_dir / "metrics.jsonl")]


def _env() -> dict[str, str]:
    # tests/ (the rewards below) and this checkout's drpo for the cluster's workers; no token authentication
    # on this throw-away local cluster (Ray enables it by default and a driver given --address does not)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAY_AUTH_MODE": "disabled"}


def _wait_for(cond, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.1)


# ---------------------------------------------------------------------------- without a cluster
def test_the_backend_is_checked_before_anything_runs(tmp_path, monkeypatch):
    out = tmp_path / "g"
    assert_one_line(CliRunner().invoke(app, ["compare", "--quick", "--out", str(out), "--backend", "slurm"]), 2,
                    "unknown --backend 'slurm': use local or ray")
    assert_one_line(CliRunner().invoke(app, ["compare", "--quick", "--out", str(out), "--address", "h:6379"]), 2,
                    "--address is the Ray cluster's address: it goes with --backend ray")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert_one_line(CliRunner().invoke(app, ["compare", "--quick", "--out", str(out), "--backend", "ray"]), 2,
                    "pip install 'drpo[ray]'")
    assert not out.exists()


def test_a_runs_resource_request():
    cfg = load_config(None, ["threads=1"])
    assert backends.resources(cfg) == {"num_cpus": 1, "num_gpus": 0}
    # a stale rollout has its own worker process, with as many threads as the trainer
    assert backends.resources(load_config(None, ["threads=3", "rollout.staleness=2"])) == {"num_cpus": 6, "num_gpus": 0}
    assert backends.resources(load_config(None, []))["num_cpus"] == 1  # threads unset: one per process
    cuda = cfg.model_copy(update={"device": "cuda"})  # (this machine has no GPU: the config check would refuse it)
    assert backends.resources(cuda) == {"num_cpus": 1, "num_gpus": 1}


def test_a_request_no_node_can_hold_is_seen():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 0.0}},
             {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]  # a dead node counts for nothing
    assert not backends.unplaceable({"num_cpus": 8, "num_gpus": 0}, nodes)
    assert not backends.unplaceable({"num_cpus": 2, "num_gpus": 1}, nodes)
    assert backends.unplaceable({"num_cpus": 4, "num_gpus": 1}, nodes)  # 4 CPUs on one node, 1 GPU on another
    assert backends.unplaceable({"num_cpus": 16, "num_gpus": 0}, nodes)


def test_ray_is_imported_inside_the_ray_backend_only():
    """``import drpo`` and the local pool never import Ray (the CLI stays fast; Ray is an extra)."""
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n == "ray" or n.startswith("ray.")], f"{path} imports ray at module level"
    lazy = [n for n in ast.walk(ast.parse((SRC / "experiments" / "backends.py").read_text()))
            if isinstance(n, ast.Import) and any(a.name.startswith("ray") for a in n.names)]
    assert lazy  # the Ray backend does import it, inside its functions


def test_a_cancelled_task_stops_the_run_as_sigterm_does(tmp_path):
    """ray.cancel reaches a running task as SIGINT's handler; the task passes it to SIGTERM's handler (the
    trainer's: stop after the step). Before the trainer's loop, SIGTERM stops at once."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        backends._as_sigterm(signal.SIGINT, None)
        assert seen == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, backends._stop_now)
        with pytest.raises(KeyboardInterrupt):
            backends._as_sigterm(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_task_waits_for_a_run_folder_in_use(tmp_path):
    run_dir = tmp_path / "run"
    assert backends._folder_free(run_dir, timeout=0)  # nothing there yet
    run_dir.mkdir()
    held = run_io.RunLock(run_dir)
    t0 = time.monotonic()
    assert not backends._folder_free(run_dir, timeout=0.5) and time.monotonic() - t0 >= 0.5
    threading.Timer(0.5, held.release).start()
    assert backends._folder_free(run_dir, timeout=30)
    assert (run_dir / ".lock").read_text() == ""  # released by its holder; the probe wrote nothing


def test_a_task_off_the_shared_folder_says_so_and_the_driver_records_it(tmp_path):
    pytest.importorskip("ray")
    import ray.exceptions

    run = one_run_grid("builtin", 2).runs[0]
    with pytest.raises(FileNotFoundError, match="--out must be a folder every node reaches at the same path") as e:
        backends.run_task(run, str(tmp_path / "elsewhere"))  # the grid folder as a node without it sees it
    run_dir = tmp_path / "g" / run.slug
    backends._record_lost(run_dir, ray.exceptions.RayTaskError("run_task", "Traceback ...", e.value))
    st = run_io.read_status(run_dir)
    assert (st["state"], st["cause"]) == ("failed", "exception") and "every node reaches" in st["reason"]
    assert st["reason"].startswith("its Ray task raised FileNotFoundError: the grid folder")
    backends._record_lost(run_dir, ray.exceptions.WorkerCrashedError())
    st = run_io.read_status(run_dir)
    assert (st["state"], st["cause"]) == ("failed", "worker_lost") and "WorkerCrashedError" in st["reason"]
    run_io.write_status(run_dir, "finished", step=2)  # a run with its result keeps it
    backends._record_lost(run_dir, ray.exceptions.WorkerCrashedError())
    assert run_io.read_status(run_dir)["state"] == "finished"


# ---------------------------------------------------------------------------- a local Ray cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head --block`` with 2 CPUs, in its own session and temp folder (so that no other Ray on
    this machine finds it or is touched); its address. Stopped by SIGTERM to the process that started it."""
    pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="drpo-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--temp-dir", temp, "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        _wait_for(lambda: "Ray runtime started" in (Path(temp) / "head.log").read_text() or head.poll() is not None,
                  timeout=180)
        assert head.poll() is None, (Path(temp) / "head.log").read_text()
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()  # --block: it stops the cluster's processes, then exits
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_env(monkeypatch):
    """A driver in this process: no token authentication (as the cluster)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


def one_run_grid(model_dir: str, steps: int, **overrides: str):
    """DRPO, FP8, seed 0: one run, with a checkpoint every 2 steps."""
    return expand("one", [Block("b", "", ("drpo",), ("fp8",), (0,))],
                  GRID_BASE + QUICK_BASE + tuple(tiny(model_dir)) + (f"train.steps={steps}",)
                  + tuple(f"{k}={v}" for k, v in overrides.items()))


def grid_file(path: Path, grid) -> Path:
    """``grid`` as a YAML grid file, for a drpo compare in another process."""
    blocks = [{"name": b.name, "methods": list(b.methods), "settings": list(b.settings), "seeds": list(b.seeds)}
              for b in grid.blocks]
    path.write_text(yaml.safe_dump({"base": list(grid.base), "blocks": blocks}))
    return path


FAULT_STEPS = 16


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The metrics of :func:`one_run_grid`'s run uninterrupted, on the local backend."""
    out = tmp_path_factory.mktemp("reference")
    g = one_run_grid(tiny_model_dir, FAULT_STEPS)
    assert compare.run_grid(g, out, backend="local")[g.runs[0].slug]["state"] == "finished"
    return rows(out / g.runs[0].slug)


def _session_processes(pid: int) -> list[int]:
    """The live processes of the Ray instance that process ``pid`` started (its session folder ends in _pid)."""
    session = re.compile(rf"session_[0-9_-]+_{pid}\b")
    return [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if alive(p) and session.search(cmdline(p))]


@pytest.mark.slow
def test_quick_grid_on_ray_gives_the_local_backends_runs_and_numbers(cluster, ray_env, tiny_model_dir, tmp_path):
    """``drpo compare --quick --backend ray`` on a Ray instance of its own (``--address local``: it starts one
    here and stops it at the end) against the local pool; then again on the running cluster: nothing to run."""
    args = ["compare", "--quick", "--steps", "2", *tiny(tiny_model_dir)]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local"), "--workers", "2"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--backend", "ray", "--address", "local"])
    assert res.exit_code == 0, res.output
    _wait_for(lambda: not _session_processes(os.getpid()), timeout=60)  # the instance it started is gone
    local, ray = (json.loads((tmp_path / k / "grid.json").read_text()) for k in ("local", "ray"))
    assert local == ray and [r["state"] for r in ray["runs"]] == ["finished"] * 8
    for r in ray["runs"]:
        want = rows(tmp_path / "local" / r["slug"])
        assert len(want) == 3 and rows(tmp_path / "ray" / r["slug"]) == want, r["slug"]
    assert (tmp_path / "ray" / "report" / "README.md").exists()
    logs = {r["slug"]: (tmp_path / "ray" / r["slug"] / "metrics.jsonl").read_text() for r in ray["runs"]}
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--backend", "ray", "--address", cluster])
    assert res.exit_code == 0 and "8/8" in res.output, res.output
    assert json.loads((tmp_path / "ray" / "grid.json").read_text()) == ray
    assert {slug: (tmp_path / "ray" / slug / "metrics.jsonl").read_text() for slug in logs} == logs  # all skipped


@pytest.mark.slow
def test_a_killed_worker_is_retried_from_its_last_checkpoint(cluster, ray_env, tiny_model_dir, tmp_path, reference):
    g = one_run_grid(tiny_model_dir, FAULT_STEPS)
    run_dir = tmp_path / "g" / g.runs[0].slug
    killed = {}

    def kill_the_worker():  # as the OOM killer would, once the run has a checkpoint and steps after it
        try:
            _wait_for(lambda: run_io.latest_checkpoint(run_dir) is not None and len(rows(run_dir)) >= 6)
            pid = int((run_dir / ".lock").read_text().split()[1])
            killed.update(pid=pid, status=run_io.read_status(run_dir), rows=len(rows(run_dir)))
            os.kill(pid, signal.SIGKILL)
        except Exception as e:  # noqa: BLE001 -- reported by the assertions below
            killed["error"] = repr(e)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    entries = compare.run_grid(g, tmp_path / "g", backend="ray", address=cluster)
    killer.join(timeout=10)
    assert "error" not in killed and killed["status"]["state"] == "running", killed
    assert killed["rows"] < FAULT_STEPS + 1 and not alive(killed["pid"])  # killed mid-run
    assert entries[g.runs[0].slug]["state"] == "finished"
    assert rows(run_dir) == reference  # resumed from its checkpoint: the uninterrupted run's numbers
    assert not (run_dir.parent / (run_dir.name + ".aborted")).exists()  # resumed, not started over


def _driver(grid: Path, out: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "drpo.cli", "compare", "--grid", str(grid), "--out", str(out),
                             "--backend", "ray", "--address", address], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_next_invocation(cluster, ray_env, tiny_model_dir, tmp_path, reference):
    g = one_run_grid(tiny_model_dir, FAULT_STEPS)
    out, path = tmp_path / "g", grid_file(tmp_path / "one.yaml", g)
    run_dir = out / g.runs[0].slug
    driver = _driver(path, out, cluster)
    try:
        _wait_for(lambda: run_io.latest_checkpoint(run_dir) is not None and len(rows(run_dir)) >= 6)
        worker = int((run_dir / ".lock").read_text().split()[1])
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert run_io.read_status(run_dir)["state"] == "running" and len(rows(run_dir)) < FAULT_STEPS + 1
    _wait_for(lambda: not alive(worker), timeout=60)  # Ray ends the tasks of a driver that died
    res = CliRunner().invoke(app, ["compare", "--grid", str(path), "--out", str(out), "--backend", "ray",
                                   "--address", cluster])
    assert res.exit_code == 0, res.output
    assert run_io.read_status(run_dir)["state"] == "finished" and rows(run_dir) == reference
    assert not (run_dir.parent / (run_dir.name + ".aborted")).exists()


def dying_reward(example, response: str) -> float:
    """Ends its process at once, every time (as a segfault in a library or the OOM killer would)."""
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_run_that_fails_every_time_is_recorded_and_the_grid_goes_on(cluster, ray_env, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """One run whose reward raises on every call (the run stops, failed: its status says so), one whose worker
    dies in every try (Ray gives up: the driver records it), one that is fine."""
    monkeypatch.setattr(backends, "RAY_RETRIES", 1)  # two tries, to keep the test short
    g = expand("faults", [Block("ok", "", ("drpo",), ("fp8",), (0,)), Block("broken", "", ("dapo",), ("fp8",), (0, 1))],
               GRID_BASE + QUICK_BASE + tuple(tiny(tiny_model_dir)) + ("train.steps=4",))
    reward = {"fp8/dapo/seed0": "helpers:raising_reward", "fp8/dapo/seed1": "test_ray_backend:dying_reward"}
    g.runs_by_block["broken"] = [replace(r, overrides=r.overrides + (f"task.reward={reward[r.slug]}",))
                                 for r in g.runs_by_block["broken"]]
    out = tmp_path / "g"
    entries = compare.run_grid(g, out, backend="ray", address=cluster)
    assert entries["fp8/drpo/seed0"]["state"] == "finished"
    assert entries["fp8/dapo/seed0"]["state"] == "failed" and entries["fp8/dapo/seed0"]["cause"] == "reward"
    lost = entries["fp8/dapo/seed1"]
    assert lost["state"] == "failed" and lost["cause"] == "worker_lost", lost
    assert "lost in each of 2 tries" in lost["reason"] and "WorkerCrashedError" in lost["reason"], lost
    assert (out / "fp8/dapo/seed1.aborted").exists()  # the second try started it over (no checkpoint yet)
    manifest = json.loads((out / "grid.json").read_text())
    assert {r["slug"]: r["state"] for r in manifest["runs"]} == {
        "fp8/drpo/seed0": "finished", "fp8/dapo/seed0": "failed", "fp8/dapo/seed1": "failed"}
    text = write_report(out, tmp_path / "report", "CMD").read_text()
    left_out = re.search(r"Runs not ended \(left out\): (.*)", text).group(1)
    assert "`fp8/dapo/seed0`" in left_out and "`fp8/dapo/seed1`" in left_out and "drpo" not in left_out
    # the next drpo compare tries them again: a failed run that did not diverge is resumed, not skipped
    assert "skip" not in [compare.plan(r, out) for r in g.runs_by_block["broken"]]


@pytest.mark.slow
def test_one_ctrl_c_stops_the_grid(cluster, tiny_model_dir, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the driver's process group) while 2 runs train and 1 waits in Ray's
    queue (the cluster has 2 CPUs): the queued run is cancelled, those in flight stop after their current step
    with a checkpoint, the command to resume is printed, exit 130."""
    g = expand("three", [Block("b", "", ("drpo",), ("fp8",), (0, 1, 2))],
               GRID_BASE + QUICK_BASE + tuple(tiny(tiny_model_dir)) + ("train.steps=2000",))
    out, path = tmp_path / "g", grid_file(tmp_path / "three.yaml", g)
    driver = _driver(path, out, cluster)
    try:
        _wait_for(lambda: sum(len(rows(out / r.slug)) >= 3 for r in g.runs) == 2)
        os.killpg(driver.pid, signal.SIGINT)
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, stderr
    assert ("stopped: 1 queued runs cancelled, 2 in flight stopped after their current step; resume with: drpo "
            f"compare --grid {path} --out {out} --backend ray --address {cluster}") in stderr, stderr
    states = {r["slug"]: r["state"] for r in json.loads((out / "grid.json").read_text())["runs"]}
    assert sorted(states.values()) == ["interrupted", "interrupted", "pending"], states
    for slug, state in states.items():  # grid.json agrees with the runs on disk
        st = run_io.read_status(out / slug)
        assert st.get("state", "pending") == state
        if state == "interrupted":  # after its current step, with a checkpoint of it
            assert st["signal"] == "SIGTERM" and st["checkpoint"] == st["step"] >= 2, st
            assert run_io.latest_checkpoint(out / slug).name == f"step_{st['step']}"
    assert "Traceback" not in stderr + stdout
