"""The built-in task, tokenizer, tiny model and (a miniature) warm start."""
from __future__ import annotations

import json
import random

import math_verify
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpo.builtin import warmstart
from drpo.builtin.tokenizer import build_tokenizer
from drpo.tasks.arithmetic import LEVELS, ArithmeticTask, boxed, in_heldout


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _evaluate(ex) -> int:
    """Recompute the gold answer with Python arithmetic from the recorded operands."""
    ops, xs = ex.meta["ops"], ex.meta["operands"]
    total = xs[0]
    for op, x in zip(ops, xs[1:]):
        total = total + x if op == "+" else total - x
    return total


def test_task_is_deterministic():
    a = ArithmeticTask(seed=3).train_examples(50)
    b = ArithmeticTask(seed=3).train_examples(50)
    c = ArithmeticTask(seed=4).train_examples(50)
    assert a == b
    assert a != c
    assert ArithmeticTask(seed=3).heldout(20) == ArithmeticTask(seed=9).heldout(20)


def test_heldout_is_disjoint_from_training():
    task = ArithmeticTask()
    held = task.heldout(200)
    assert len({e.prompt for e in held}) == 200
    assert all(in_heldout(e.prompt) for e in held)
    train = {e.prompt for e in task.train_examples(5000)}
    assert train.isdisjoint(e.prompt for e in held)


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_answers_are_correct(difficulty):
    task = ArithmeticTask(difficulty=difficulty)
    for ex in task.train_examples(300) + task.heldout(50):
        assert int(ex.answer) == _evaluate(ex)
        assert 0 <= int(ex.answer) <= 999
        assert all(str(x) in ex.prompt.split() for x in ex.meta["operands"])
        assert len(ex.meta["operands"]) == LEVELS[difficulty].n_operands


def test_demonstrations_are_correct_or_copy_an_operand():
    task, rng = ArithmeticTask(), random.Random(0)
    examples = task.train_examples(2000)
    exact = [warmstart.boxed_answer(task.reference_response(e, rng)) == e.answer for e in examples]
    assert all(exact)
    hits = 0
    for ex in examples:
        got = int(warmstart.boxed_answer(task.reference_response(ex, rng, p_correct=0.35)))
        assert got == int(ex.answer) or got in ex.meta["operands"]
        hits += got == int(ex.answer)
    # the right answer 35% of the time, plus the copies that happen to be right (an operand of 0)
    zero = sum(0 in ex.meta["operands"] for ex in examples) / len(examples)
    assert 0.31 < hits / len(examples) < 0.39 + zero


def test_difficulty_changes_the_numbers():
    easy = ArithmeticTask(difficulty=1).train_examples(300)
    hard = ArithmeticTask(difficulty=5).train_examples(300)
    assert max(x for e in easy for x in e.meta["operands"]) <= 20
    assert max(x for e in hard for x in e.meta["operands"]) > 100
    assert {len(e.meta["operands"]) for e in hard} == {3}


def test_prompts_have_varied_wording(tok):
    prompts = [e.prompt for e in ArithmeticTask().train_examples(500)]
    words = {w for p in prompts for w in p.split() if not w.isdigit()}
    assert len(words) > 300
    assert len(set(p.split(" ", 1)[0] for p in prompts)) > 3


def test_vocabulary_and_full_coverage(tok):
    assert len(tok) >= 2000
    task, rng = ArithmeticTask(difficulty=5), random.Random(0)
    for ex in task.train_examples(300):
        text = ex.prompt + " " + task.reference_response(ex, rng)
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert tok(ex.prompt)["input_ids"] + tok(text[len(ex.prompt) + 1:])["input_ids"] == ids


def test_numbers_are_single_tokens_and_long_numbers_round_trip(tok):
    assert len(tok("357")["input_ids"]) == 1
    ids = tok("12345 and 10005")["input_ids"]
    assert len(ids) == 5
    assert tok.decode(ids) == "12345 and 10005"


def test_round_trip_and_decoded_response_verifies(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.eos_token == tok.eos_token and loaded.pad_token == tok.pad_token
    ids = loaded("so the answer is " + boxed(357))["input_ids"] + [loaded.eos_token_id]
    decoded = loaded.decode(ids, skip_special_tokens=True)
    assert decoded == "so the answer is \\boxed{ 357 }"
    assert math_verify.verify(math_verify.parse("357"), math_verify.parse(decoded))
    assert not math_verify.verify(math_verify.parse("358"), math_verify.parse(decoded))
    assert loaded.decode(loaded("\\boxed{357}")["input_ids"]) == "\\boxed{ 357 }"


@pytest.mark.slow
def test_tiny_warm_start_writes_a_loadable_model_with_its_record(tmp_path):
    hp = warmstart.WarmStartHParams(batch_size=4, max_steps=3, eval_every=1, n_eval=4,
                                    n_final_eval=4, max_new_tokens=4)
    path = warmstart.warm_start(tmp_path / "ws", target_band=(0.0, 1.0), stop_at=0.0, progress=False, hparams=hp,
                                model_overrides={"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
                                                 "head_dim": 8}, command="test")
    record = json.loads((path / "warmstart.json").read_text())
    assert record["steps"] == 1 and record["in_band"] and record["command"] == "test" and record["seed"] == 0
    assert record["n_heldout"] == 4 and record["hparams"]["max_steps"] == 3 and record["torch_threads"] >= 1
    assert record["heldout_sampled_accuracy"] * 4 == round(record["heldout_sampled_accuracy"] * 4)  # hits / 4
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]  # no temp folder left behind
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.top_k == 0 and model.generation_config.do_sample
    batch = tok(["Q : what is 2 + 3 ? A :"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 3


@pytest.mark.parametrize("name,arch", [("builtin", "dense"), ("builtin-moe", "moe")])
def test_the_built_in_models_ship_as_weights_with_their_provenance(name, arch):
    """Both load from the package (no training), and their record says how they were made and that
    they landed in the warm start's accuracy band."""
    from drpo.models import builtin_dir, load_policy

    folder = builtin_dir(name)
    record = json.loads((folder / "warmstart.json").read_text())
    assert record["command"].startswith(f"drpo warmstart --model {name}") and record["arch"] == arch
    # the warm start's rule: it stopped at the first evaluation (128 prompts) in [stop_at, band top] = [0.20, 0.40]
    step, _, acc = record["history"][-1]
    assert record["in_band"] and step == record["steps"] and 0.20 <= acc <= 0.40
    assert record["n_heldout"] == 512 and 0 < record["heldout_sampled_accuracy"] < 0.40  # measured on 512 prompts
    assert (folder / "model.safetensors").stat().st_size < 10 * 2 ** 20  # a few MB
    tok, model = load_policy(name)
    assert model.config.model_type == ("qwen3_moe" if arch == "moe" else "qwen3")
    assert model.config.vocab_size == len(tok) == 2555


@pytest.mark.slow
def test_drpo_warmstart_regenerates_the_dense_model_into_the_band(tmp_path):
    """The command the shipped dense model came from, run again: it lands in the accuracy band (on the
    machine that made the shipped one, with the same thread count, it is the same file)."""
    from typer.testing import CliRunner

    from drpo.cli import app

    res = CliRunner().invoke(app, ["warmstart", "--model", "builtin", "--out", str(tmp_path / "ws"), "--no-progress"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "ws" / "warmstart.json").read_text())
    assert record["in_band"] and 0.15 <= record["heldout_sampled_accuracy"] <= 0.40, record
    assert "in the band" in res.output
