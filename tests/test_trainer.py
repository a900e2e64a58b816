"""End-to-end: short RL runs on a tiny model that can earn its reward (tests/helpers.py), so weights,
optimiser state and metrics really move; resume is exact in weights and optimiser state; every
option the loop has (micro-batches, epochs, schedules, chunked engine, old-policy anchor) is run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from drpo.cli import app
from drpo.training import checkpoint, optim, run_io, trainer as trainer_mod
from drpo.training.config import RunConfig, load_config
from drpo.training.trainer import Trainer, TrainingDiverged
from helpers import interrupt_at, small_config

VOLATILE = ("time/", "throughput/")
LEARNABLE = "task.reward=helpers:number_reward"


def small(tiny_model_dir, out, *extra):
    return small_config(tiny_model_dir, out, "eval.every=2", "rollout.precision=fp8", *extra)


def stable_rows(path):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in run_io.read_metrics(path)]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_short_run_writes_metrics_checkpoints_and_tensorboard(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = Trainer(small(tiny_model_dir, out, "tensorboard=true")).train()
    rows = run_io.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    r = rows[1]
    for key in ("reward/mean", "obj/loss", "obj/ratio_max", "obj/mu<0.01/token_frac", "obj/entropy",
                "mismatch/abs_shift_mean", "train/grad_norm", "adv/zero_adv_group_frac",
                "rollout/mu_lt_0.01_frac", "rollout/staleness", "time/rollout", "time/logprob",
                "time/backward", "time/optimizer", "throughput/tokens_per_s"):
        assert key in r, key
    assert r["mismatch/abs_shift_mean"] > 0  # fp8 rollout vs fp32 trainer
    assert r["rollout/staleness"] == 0
    assert "eval/accuracy" in rows[2] and "eval/accuracy" in rows[4]
    assert (out / "checkpoints" / "step_2" / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints" / "step_4").glob("*.*")) == [  # nothing pickled
        "config.json", "generation_config.json", "model.safetensors", "optimizer.safetensors", "state.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert list((out / "tb").glob("events.*"))
    status = run_io.read_status(out)
    assert status["state"] == "finished"
    # what the numbers depend on besides the config: the thread count and the CPU kernels torch dispatched to
    assert status["threads"] == 1 and status["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert yaml.safe_load((out / "config.yaml").read_text())["task"]["reward"] == "helpers:number_reward"
    assert summary["accuracy_before"] == rows[0]["eval/accuracy"]


@pytest.mark.slow
def test_the_test_model_learns_and_its_weights_move(random_tiny_dir, tmp_path):
    """The reward rises within a few steps: a broken optimiser, objective or advantage fails this. The model as
    initialised (it never ends a response in 6 tokens, so a cut response keeps its reward here): the tiny model
    that ends its responses after numbers starts at a reward of 0.6-0.7 and, at learning rates that move it in 10
    steps, as often falls to 0 (empty responses) as it climbs."""
    tr = Trainer(small(random_tiny_dir, tmp_path / "l", "train.lr=6e-2", "train.steps=15", "eval.every=0",
                       "save_every=0", "train.overlong_reward=null"))
    before = weights(tr.model)
    rewards = [tr.step(i)["reward/mean"] for i in range(15)]
    tr.rollout.close()
    after = weights(tr.model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before), f"weights that never moved: {sorted(set(before) - set(moved))}"
    # measured (seeds 0-3, train.fused_optimizer on and off, shared prompts): 0.53-0.65 over steps 1-3, 0.94-1.0
    # over steps 13-15 in all 8 runs; at 10 steps, with the fused optimizer, seed 0 had only reached 0.72 (0.60,
    # 0.75, 0.80 at steps 8-10), so 15 steps: this one, seed 0, 0.65 -> 0.94
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards


@pytest.mark.slow
def test_fp32_rollout_matches_trainer_at_first_minibatch(tiny_model_dir, tmp_path):
    cfg = small(tiny_model_dir, tmp_path / "r", "rollout.precision=fp32", "train.steps=1", "eval.every=0")
    Trainer(cfg).train()
    row = run_io.read_metrics(tmp_path / "r" / "metrics.jsonl")[-1]
    assert row["mismatch/abs_shift_max"] < 1e-5
    assert abs(row["mismatch/ratio_max"] - 1.0) < 1e-3


@pytest.mark.slow
def test_engine_batch_chunking_gives_the_same_pi_mu_agreement(tiny_model_dir, tmp_path):
    """rollout.max_batch=3 < 16 sequences: the engine generates in chunks and the batch still lines up."""
    cfg = small(tiny_model_dir, tmp_path / "c", "rollout.precision=fp32", "rollout.max_batch=3", "train.steps=2",
                "eval.every=0", "save_every=0")
    tr = Trainer(cfg)
    got = tr.rollout.collect(0)
    assert len(got.batch) == 16 and got.batch.prompt_index.tolist() == [i // 4 for i in range(16)]
    m = tr.step(1)
    tr.rollout.close()
    assert m["mismatch/abs_shift_max"] < 1e-5 and m["train/optimizer_steps"] == 2


@pytest.mark.slow
def test_resume_is_exact_in_metrics_weights_and_optimizer_state(tiny_model_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    Trainer(small(tiny_model_dir, full)).train()

    part = tmp_path / "part"
    interrupt_at(monkeypatch, 3)  # 0-based: the 4th step, after the step-2 checkpoint and the step-3 row
    with pytest.raises(KeyboardInterrupt):
        Trainer(small(tiny_model_dir, part)).train()
    monkeypatch.undo()
    assert [r["step"] for r in run_io.read_metrics(part / "metrics.jsonl")] == [0, 1, 2, 3]
    assert run_io.read_status(part)["state"] == "interrupted"
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(small(tiny_model_dir, part))
    Trainer(small(tiny_model_dir, part), resume=True).train()
    assert stable_rows(part / "metrics.jsonl") == stable_rows(full / "metrics.jsonl")
    replaced = run_io.read_metrics(part / "metrics.replaced.jsonl")
    assert [r["step"] for r in replaced] == [3]  # the row logged after the checkpoint is kept aside
    a, b = full / "checkpoints" / "step_4", part / "checkpoints" / "step_4"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    (oa, sched_a), (ob, sched_b) = checkpoint.read_optimizer(a / checkpoint.OPTIMIZER), \
        checkpoint.read_optimizer(b / checkpoint.OPTIMIZER)
    assert sched_a == sched_b and oa["param_groups"] == ob["param_groups"]
    sa, sb = oa["state"], ob["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    # and the weights moved between the two checkpoints (a frozen model would pass the checks above)
    assert any(not torch.equal(wa[k], load_file(str(full / "checkpoints" / "step_2" / "model.safetensors"))[k])
               for k in wa)


@pytest.mark.slow
def test_staleness_lags_exactly_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    """rollout.staleness=2: batch t comes from the policy of step t - 2 (lag logged), generated in a
    worker process; an interrupted stale run resumes to the same numbers."""
    extra = ("rollout.staleness=2", "train.steps=5", "save_every=2", "rollout.precision=fp32")
    full = tmp_path / "full"
    Trainer(small(tiny_model_dir, full, *extra)).train()
    rows = run_io.read_metrics(full / "metrics.jsonl")
    assert [r.get("rollout/staleness") for r in rows[1:]] == [0, 1, 2, 2, 2]
    # fp32 engine: at lag 0 mu equals pi; at lag >= 1 the batch came from older weights
    assert rows[1]["mismatch/abs_shift_max"] < 1e-5
    assert all(r["mismatch/abs_shift_max"] > 1e-4 for r in rows[3:])

    part = tmp_path / "part"
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(small(tiny_model_dir, part, *extra)).train()
    monkeypatch.undo()
    assert (part / "checkpoints" / "step_2" / run_io.ROLLOUT_VERSIONS).exists()
    Trainer(small(tiny_model_dir, part, *extra), resume=True).train()
    assert stable_rows(part / "metrics.jsonl") == stable_rows(full / "metrics.jsonl")


@pytest.mark.slow
def test_staleness_zero_is_the_synchronous_loop_and_one_lags_a_step(tiny_model_dir, tmp_path):
    """With an fp32 engine, staleness 0 samples every batch from the weights being trained (mu == pi at the first
    minibatch of every step: the synchronous loop); staleness 1 from the step before (mu != pi from step 2 on).
    Step 1 is the same batch in both (version 0 generates it)."""
    rows = {}
    for n in (0, 1):
        out = tmp_path / f"s{n}"
        Trainer(small(tiny_model_dir, out, f"rollout.staleness={n}", "train.steps=3", "eval.every=0",
                      "rollout.precision=fp32")).train()
        rows[n] = stable_rows(out / "metrics.jsonl")
    assert [r["rollout/staleness"] for r in rows[0]] == [0, 0, 0]
    assert all(r["mismatch/abs_shift_max"] < 1e-5 for r in rows[0])
    assert [r["rollout/staleness"] for r in rows[1]] == [0, 1, 1]
    assert rows[1][0]["mismatch/abs_shift_max"] < 1e-5 and all(r["mismatch/abs_shift_max"] > 1e-4 for r in rows[1][1:])
    assert rows[0][0] == rows[1][0]


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real = trainer_mod.policy_loss
    calls = {"n": 0}

    def bad(*a, **k):
        loss, m = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), m

    monkeypatch.setattr(trainer_mod, "policy_loss", bad)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        Trainer(small(tiny_model_dir, out, "eval.every=0")).train()
    assert run_io.read_status(out)["state"] == "failed"
    assert [r["step"] for r in run_io.read_metrics(out / "metrics.jsonl")] == [1]


@pytest.mark.slow
def test_old_policy_anchor_with_rollout_correction_and_bf16_trainer(tiny_model_dir, tmp_path):
    cfg = small(tiny_model_dir, tmp_path / "rc", "train.steps=2", "eval.every=0", "train.anchor=old_policy",
                "train.rollout_correction={level: token, mode: truncate, upper: 2.0}", "train.precision=bf16",
                "objective.name=ppo", "train.filter_zero_adv_groups=true", "train.advantage=rloo")
    tr = Trainer(cfg)
    before = weights(tr.model)
    tr.train()
    rows = run_io.read_metrics(tmp_path / "rc" / "metrics.jsonl")
    assert all("train/skipped" not in r for r in rows)
    r = rows[-1]
    # anchored on the recomputed old policy: pi == anchor at the first minibatch (up to bf16 rounding)
    assert r["mismatch/abs_shift_max"] < 1e-3
    # the rollout's fp8 mu differs from the old policy: the correction weights are not all 1
    assert 0 < abs(r["obj/rollout_corr/rho_mean"] - 1.0) < 0.5
    assert any(not torch.equal(before[k], v) for k, v in weights(tr.model).items())


@pytest.mark.slow
def test_metrics_do_not_depend_on_the_micro_batch_split(sharp_model_dir, tmp_path):
    """obj/loss and the per-bucket metrics of a step are the same with 1 or 3 micro-batches per minibatch."""
    got = {}
    for mbs in (128, 3):
        out = tmp_path / f"m{mbs}"
        Trainer(small(sharp_model_dir, out, f"train.micro_batch_size={mbs}", "train.steps=1", "eval.every=0",
                      "rollout.precision=bf16", "train.overlong_reward=null")).train()  # it never ends a response
        got[mbs] = run_io.read_metrics(out / "metrics.jsonl")[-1]
    keys = [k for k in got[128] if k.startswith(("obj/", "mismatch/"))]
    assert "obj/loss" in keys and "obj/mu<0.1/abs_shift_mean" in keys and "obj/mu>=0.5/weight_mean" in keys
    for k in keys:
        assert got[3][k] == pytest.approx(got[128][k], rel=1e-4, abs=1e-7), k


@pytest.mark.slow
def test_epochs_and_schedules(tiny_model_dir, tmp_path):
    cfg = small(tiny_model_dir, tmp_path / "e", "train.epochs=2", "train.steps=3", "eval.every=0",
                "train.schedule=cosine", "train.warmup_steps=2", "train.lr=1e-2")
    Trainer(cfg).train()
    rows = run_io.read_metrics(tmp_path / "e" / "metrics.jsonl")
    assert [r["train/optimizer_steps"] for r in rows] == [4, 4, 4]  # 2 minibatches x 2 epochs
    total = 3 * 2 * 2
    sched = optim.schedule("cosine", 2, total)
    # "lr" is logged after the step's 4 optimiser steps: the schedule at index 4 * step
    for r in rows:
        assert r["lr"] == pytest.approx(1e-2 * sched(4 * r["step"]))
    assert rows[-1]["lr"] < rows[0]["lr"]
    warm = optim.schedule("warmup", 4, 100)
    assert [warm(i) for i in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert optim.schedule("constant", 0, 10)(5) == 1.0
    cos = optim.schedule("cosine", 0, 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0, abs=1e-12)


def test_the_shipped_default_config_is_the_embedded_default():
    """Key for key (a key missing from the file would load as its default and hide a stale file)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert yaml.safe_load(path.read_text()) == RunConfig().model_dump(mode="json")


@pytest.mark.slow
def test_jsonl_task_and_bad_data(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"Q : compute {i} + 1 . A :", "a": str(i + 1)}) for i in range(6)))
    base = [f"model={tiny_model_dir}", "train.steps=1", "rollout.prompts_per_step=2", "rollout.group_size=2",
            "train.minibatches=1", "rollout.max_new_tokens=4", "eval.every=0", "progress=false",
            "task.name=jsonl", f"task.path={data}", "task.question_field=q", "task.answer_field=a"]
    Trainer(load_config(None, base + [f"out={tmp_path / 'ok'}"])).train()
    with pytest.raises(ValueError, match="max_prompt_tokens=3"):  # checked for every row up front
        Trainer(load_config(None, base + [f"out={tmp_path / 'long'}", "task.max_prompt_tokens=3"]))
    with pytest.raises(ValueError, match="no field 'missing'"):
        Trainer(load_config(None, base + [f"out={tmp_path / 'f'}", "task.answer_field=missing"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        Trainer(load_config(None, base + [f"out={tmp_path / 'e'}", f"task.path={empty}"]))


def test_chat_template_prompts_are_token_ids(tiny_model_dir):
    """apply_chat_template returns a BatchEncoding in transformers 5: the codec must take its ids."""
    from transformers import AutoTokenizer

    from drpo.models.text import TextCodec

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}Q : {{ m['content'] }} A :{% endfor %}"
    ids = TextCodec(tok, chat_template=True).encode("compute 2 + 3 .")
    assert ids == tok("Q : compute 2 + 3 . A :", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_cli_reports_config_errors_by_key(tmp_path):
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "train.minibatches=7"])
    assert res.exit_code == 2
    assert "train.minibatches" in res.output


@pytest.mark.slow
def test_cli_train_runs_on_a_local_model(tiny_model_dir, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["train", "--model", tiny_model_dir, "--out", str(out), "train.steps=1",
                                   "rollout.prompts_per_step=2", "rollout.group_size=2", "train.minibatches=1",
                                   "rollout.max_new_tokens=4", "eval.every=1", "eval.prompts=4", "progress=false"])
    assert res.exit_code == 0, res.output
    assert "held-out accuracy: before" in res.output


def test_eval_command_on_a_local_model(tiny_model_dir, tmp_path):
    """A shipped benchmark loads and is laid out (the tiny model scores 0 on AIME), and the built-in model's scores
    on the built-in task -- some right, some wrong -- are the verifier's, aggregated into avg@k and pass@k."""
    from drpo.rewards.verify import verify

    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "--model", tiny_model_dir, "--benchmark", "aime24", "--k", "2",
                                   "--limit", "3", "--max-new-tokens", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["n"] == 3 and d["k"] == 2 and len(d["per_example"]) == 3
    res = CliRunner().invoke(app, ["eval", "--benchmark", "builtin", "--k", "2", "--limit", "12", "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    for row in d["per_example"]:
        assert row["rewards"] == [float(verify(r, row["answer"])) for r in row["responses"]]
    correct = [sum(r > 0 for r in row["rewards"]) for row in d["per_example"]]
    assert 0 < sum(correct) < 24, correct  # some right, some wrong: the sums below can tell a wrong aggregation
    assert d["avg_at_k"] == pytest.approx(sum(correct) / 24)
    assert d["pass_at_k"] == pytest.approx(sum(c > 0 for c in correct) / 12)
    res = CliRunner().invoke(app, ["eval", "--model", tiny_model_dir, "--benchmark", "nope"])
    assert res.exit_code == 2 and "unknown benchmark" in res.output


@pytest.mark.slow
def test_overlong_reward_replaces_the_reward_of_truncated_responses(tiny_model_dir, tmp_path):
    cfg = small(tiny_model_dir, tmp_path / "ol", "train.steps=1", "eval.every=0", "rollout.max_new_tokens=1",
                "train.overlong_reward=-1.0", "task.reward=math")
    tr = Trainer(cfg)
    m = tr.step(0)
    tr.rollout.close()
    # one new token: only a response whose single token is EOS is not truncated
    assert m["reward/mean"] == pytest.approx(-1.0 * (1 - m["response/eos_frac"]))
    assert m["response/eos_frac"] < 1.0


@pytest.mark.slow
def test_registered_reward_and_advantage(tiny_model_dir, tmp_path):
    from drpo.rewards import REWARDS, register_reward
    from drpo.training.advantages import ADVANTAGES, register_advantage

    @register_reward("test_len")
    def length(example, response):
        return float(len(response.split()))

    @register_advantage("test_sign")
    def sign(R, *, std_normalize, eps):
        return torch.sign(R - R.mean(-1, keepdim=True))

    try:
        tr = Trainer(small(tiny_model_dir, tmp_path / "reg", "task.reward=test_len", "train.advantage=test_sign",
                           "train.steps=1", "eval.every=0", "train.overlong_reward=null"))
        m = tr.step(0)
        tr.rollout.close()
        assert m["reward/mean"] == pytest.approx(m["response/length_mean"], rel=0.5)  # words ~ tokens
        with pytest.raises(Exception, match="unknown advantage estimator 'nope'"):
            load_config(None, ["train.advantage=nope"])
        with pytest.raises(Exception, match="unknown reward 'nope'"):
            load_config(None, ["task.reward=nope"])
    finally:
        REWARDS.pop("test_len"), ADVANTAGES.pop("test_sign")
    assert math.isfinite(m["obj/loss"])
