"""The ``drpo`` command line: train, eval, compare, warmstart, geometry, objectives, doctor.

Exit codes and what is printed:

    2    a mistake in what the user typed or pointed at (a config key, a model folder, a device, an
         output path, a dataset, a checkpoint that would run code), found before training starts: one
         red line, no traceback. These are the :class:`~drpo.utils.errors.UserError` exceptions, and
         only they: any other exception is a bug and keeps its traceback
    1    the run stopped and says why in one line (it diverged, collapsed with train.stop_on_collapse,
         the rollout worker died, the reward function is broken, the disk is full); or an unexpected
         error during the run: its traceback is printed and kept in <out>/traceback.txt (a bug)
    130  Ctrl-C; 143 SIGTERM (after the current step and its checkpoint): both say where the run
         stopped and how to resume
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

from drpo.integrations.doctor import app as doctor_app
from drpo.utils.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Trust-region objectives (DRPO, DPPO, SPO, PPO, ...) and a compact RL trainer for LLMs.")
app.add_typer(doctor_app, name="doctor")  # `drpo doctor verl|trl`; imports verl/TRL only inside its commands


def _fail(msg: str, code: int = 2) -> NoReturn:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file"),
    model: Optional[str] = typer.Option(None, "--model", help="a named model (builtin, builtin-moe, smollm2-135m, "
                                                          "smollm2-135m-arith), a local folder, or a hub id"),
    out: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<objective>-<time>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=1e-4"),
) -> None:
    """Run RL training (default: DRPO on the built-in arithmetic task with the built-in model)."""
    from drpo.training.config import load_config
    from drpo.training.lifecycle import ONE_LINE_STOPS, Terminated, default_out
    from drpo.training.trainer import Trainer

    items = list(overrides or [])
    if model is not None:
        items.append(f"model={model}")
    if out is not None:
        items.append(f"out={out}")
    if resume and out is None:
        _fail("--resume needs --out (the run directory to continue)")
    saved_run = resume and config is None and (Path(out) / "config.yaml").is_file()
    if saved_run:
        config = Path(out) / "config.yaml"  # resume what was run; overrides may change only safe keys
    try:
        cfg = load_config(config, items, saved_run=saved_run)
    except UserError as e:
        _fail(str(e))
    if cfg.out is None:
        cfg.out = default_out(cfg.objective.name)
    try:
        trainer = Trainer(cfg, resume=resume, notify=lambda msg: typer.secho(msg, fg=typer.colors.YELLOW, err=True))
    except UserError as e:
        _fail(f"error: {e}")
    try:
        summary = trainer.train()
    except KeyboardInterrupt as e:
        step, ckpt = trainer.life.last_step, trainer.life.last_checkpoint
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        where = f"after step {step}" if step else "before the first step"
        resume_from = f"the checkpoint of step {ckpt}" if ckpt is not None else "step 0 (no checkpoint yet)"
        _fail(f"{how} {where}; resume with: drpo train --out {cfg.out} --resume  (restarts from {resume_from})",
              code=143 if isinstance(e, Terminated) else 130)
    except ONE_LINE_STOPS as e:
        _fail(f"training stopped: {e}. Metrics logged so far are in {cfg.out}/metrics.jsonl", code=1)
    except Exception as e:  # a bug: keep the traceback for whoever fixes it
        import traceback

        traceback.print_exc()
        _fail(f"the run failed at step {trainer.life.last_step + 1} with an unexpected {type(e).__name__} "
              f"(traceback above and in {cfg.out}/traceback.txt; status: failed)", code=1)
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    typer.echo(f"run directory: {summary['out']}")
    if before is not None and after is not None and before == before and after == after:  # not NaN
        typer.echo(f"held-out accuracy: before {before:.3f} -> after {after:.3f} "
                   f"({100 * (after - before):+.1f} points)")
    else:
        typer.echo("held-out accuracy: not measured (no held-out set: set task.eval_path, or eval.every=0)")
    if summary["collapse"].collapsed:
        typer.secho(f"warning: {summary['collapse'].describe()}", fg=typer.colors.YELLOW)


@app.command()
def warmstart(
    model: str = typer.Option("builtin", "--model",
                              help="the model to make: builtin, builtin-moe, or smollm2-135m-arith (cached)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder to write (default runs/warmstart-<model>; "
                                                           "smollm2-135m-arith: its cache folder)"),
    seed: int = typer.Option(0, "--seed", help="the seed of the initialisation and the demonstrations"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="stop after this many steps at most"),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="learning rate (default: the model's recipe)"),
    demo_accuracy: Optional[float] = typer.Option(None, "--demo-accuracy", min=0.0, max=1.0,
                                                  help="share of demonstrations that box the right result"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="torch threads (default torch's; the result depends on it)"),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="do nothing when --out holds a warm start"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Make a warm-started model: a built-in one again (the supervised warm start its shipped weights came
    from), or SmolLM2-135M-Instruct's start on the arithmetic task (written into the cache)."""
    from dataclasses import replace

    from drpo.builtin.warmstart import REAL_HPARAMS, WarmStartHParams, warm_start
    from drpo.models import BUILTIN_MODELS, WARM_STARTED_MODELS, warm_started_dir

    if model not in (*BUILTIN_MODELS, *WARM_STARTED_MODELS):
        _fail(f"--model {model!r}: the warm-started models are {', '.join((*BUILTIN_MODELS, *WARM_STARTED_MODELS))}")
    init = WARM_STARTED_MODELS.get(model)  # the pretrained model it starts from (None: a random tiny one)
    out = out or (warm_started_dir(model) if init else Path(f"runs/warmstart-{model}"))
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; give a folder")
    if skip_existing and (out / "warmstart.json").is_file():
        typer.echo(f"{out}: already made (warmstart.json); nothing to do")
        return
    import torch

    if threads:
        torch.set_num_threads(threads)
    given = {"max_steps": max_steps, "lr": lr, "demo_accuracy": demo_accuracy}
    hp = replace(REAL_HPARAMS if init else WarmStartHParams(), **{k: v for k, v in given.items() if v is not None})
    command = (f"drpo warmstart --model {model} --seed {seed}"
               + "".join(f" --{k.replace('_', '-')} {v}" for k, v in given.items() if v is not None)
               + f" --threads {torch.get_num_threads()}")
    try:
        path = warm_start(out, arch="moe" if model == "builtin-moe" else "dense", init=init, seed=seed, hparams=hp,
                          progress=progress, command=command)
    except UserError as e:
        _fail(f"error: {e}")
    record = json.loads((path / "warmstart.json").read_text())
    typer.echo(f"{path}: {record['steps']} steps, held-out sampled accuracy {record['heldout_sampled_accuracy']:.3f} "
               f"({'in' if record['in_band'] else 'NOT in'} the band), {record['wall_time_s']:.0f} s")


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("builtin", "--model", help="a named model (builtin, smollm2-135m, ...), a folder "
                                                         "(e.g. a checkpoint), or a hub id"),
    benchmark: str = typer.Option("builtin", "--benchmark", "-b",
                                  help="builtin, aime24, aime25, amc23, math500, gsm8k, or a .jsonl path"),
    k: int = typer.Option(4, "--k", min=1, help="samples per problem (avg@k, pass@k)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N problems only"),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-6),
    top_p: float = typer.Option(1.0, "--top-p", min=1e-6, max=1.0),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1),
    precision: str = typer.Option("fp32", "--precision",
                                  help="rollout precision: fp32, bf16, fp8, fp4 (NVFP4), int4 (weight-only)"),
    chat_template: bool = typer.Option(False, "--chat-template/--no-chat-template"),
    question_field: str = typer.Option("problem", "--question-field"),
    answer_field: str = typer.Option("answer", "--answer-field"),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the result JSON here"),
) -> None:
    """avg@k and pass@k of a model on a benchmark."""
    from drpo.evaluation.run import run_eval

    if out is not None:  # checked before the evaluation runs, so that its result cannot be lost
        if out.is_dir():
            _fail(f"--out {out} is a folder; give a file path, e.g. {out / 'eval.json'}")
        if not out.parent.is_dir():
            _fail(f"--out {out}: the folder {out.parent} does not exist")
    try:
        res = run_eval(model=model, benchmark=benchmark, k=k, limit=limit, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, precision=precision, chat_template=chat_template,
                       question_field=question_field, answer_field=answer_field, seed=seed)
    except UserError as e:
        _fail(f"error: {e}")
    d = res.to_dict()
    d.pop("per_example", None)
    typer.echo(json.dumps(d, indent=1))
    if out:
        out.write_text(json.dumps(res.to_dict(), indent=1))


@app.command()
def geometry(out: Path = typer.Option(Path("docs/figures"), "--out", help="folder for the PNG")) -> None:
    """Plot the per-token gradient weight of PPO, DPPO, SPO and DRPO; print the table."""
    from drpo.experiments.geometry import run_geometry

    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; give the folder to write geometry.png and geometry.json into")
    run_geometry(out)


@app.command()
def objectives() -> None:
    """List the registered objectives with their parameters."""
    from drpo.objectives import get_objective, list_objectives

    for name in list_objectives():
        obj = get_objective(name)
        params = ", ".join(f"{k}={v!r}" for k, v in obj.param_defaults.items())
        typer.echo(f"{name:18s} {params}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def compare(
    ctx: typer.Context,
    grid: str = typer.Option("map", "--grid", help="map (stage 1), map-ext, decide (stage 2, with --map), sequential "
                                                   "(seeds added at cell A by a fixed plan), quick, or a YAML grid file"),
    out: Path = typer.Option(Path("runs/compare"), "--out"),
    quick: bool = typer.Option(False, "--quick", help="the small smoke-test grid (a few minutes)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="runs in parallel (each uses 1 thread); default 1, with --backend "
                                               "ray as many as the cluster's CPUs hold"),
    backend: str = typer.Option("local", "--backend", help="local (processes on this machine) or ray (tasks on a "
                                                           "Ray cluster; --out on a folder every node reaches)"),
    address: Optional[str] = typer.Option(None, "--address", help="--backend ray: the cluster's address (default: "
                                                                  "RAY_ADDRESS, else a cluster `ray start` began "
                                                                  "here, else a new one on this machine)"),
    report: Optional[Path] = typer.Option(None, "--report", help="report folder (default <out>/report)"),
    report_only: bool = typer.Option(False, "--report-only", help="only rebuild the report from the runs on disk"),
    map_dir: Optional[Path] = typer.Option(None, "--map", help="--grid decide: the finished stability map's --out"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="the first N seeds of each block"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="train.steps of every run"),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="comma-separated blocks to keep, e.g. calm,stressed"),
    model: Optional[str] = typer.Option(None, "--model", help="'builtin', a local folder, or a hub id"),
    estimate: Optional[float] = typer.Option(None, "--estimate", min=0.0,
                                             help="seconds per run: print run counts and the wall-clock estimate, run nothing"),
) -> None:
    """Run a methods x settings x seeds grid (resumable) and write the report.

    Extra key.sub=value arguments are base overrides for every run, e.g. train.lr=2e-4.
    """
    from drpo.experiments.compare import GridInterrupted, run_compare

    items = list(ctx.args) + ([f"model={model}"] if model is not None else [])
    try:
        res = run_compare(grid="quick" if quick else grid, out=out, workers=workers, report=report,
                          report_only=report_only, seeds=seeds, steps=steps,
                          blocks=blocks.split(",") if blocks else None, overrides=items, estimate=estimate,
                          map_dir=map_dir, backend=backend, address=address)
    except GridInterrupted as e:
        again = " ".join(a for a in sys.argv[1:])
        _fail(f"{e or 'interrupted'}; resume with: drpo {again}", code=130)
    except UserError as e:
        _fail(f"error: {e}")
    if res["report"] is not None:
        typer.echo(f"report: {res['report']}")
    from drpo.experiments.results import ended

    if any(not ended(e) for e in res["entries"].values()):
        raise typer.Exit(code=1)  # some runs did not end (each was named above): run the command again


def main() -> None:
    # A shell that starts a command in the background (``cmd &`` in a script, CI) leaves SIGINT ignored, and
    # Python then keeps it ignored: ``kill -INT`` and Ctrl-C would do nothing. They stop a run or a grid.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
