"""drpo inside TRL: DRPOGRPOTrainer trains, and drpo's ppo/dapo/cispo equal TRL's own losses.

The cross-check runs TRL's real ``GRPOTrainer._compute_loss`` (on a tiny Qwen3 built from a
config) and ``DRPOGRPOTrainer._compute_loss`` on the same inputs, and compares the loss and the
gradient of every parameter.
"""
from __future__ import annotations

import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from drpo.integrations.trl import DRPOGRPOTrainer
from drpo.builtin.tokenizer import char_tokenizer  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_model(vocab_size: int) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    return Qwen3ForCausalLM(cfg)


def reward_digits(completions: list[str], **_: object) -> list[float]:
    """Toy reward: fraction of digits in the completion."""
    return [sum(c.isdigit() for c in s) / max(len(s), 1) for s in completions]


def make_trainer(cls: type, tmp_path, **kwargs) -> GRPOTrainer:
    tok = char_tokenizer()
    data = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "9+1="]})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1,
                      report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
                      **kwargs.pop("config", {}))
    model = tiny_model(len(tok))
    for name, value in kwargs.pop("model_config", {}).items():
        setattr(model.config, name, value)
    return cls(model=model, reward_funcs=reward_digits, args=args, train_dataset=data,
               processing_class=tok, **kwargs)


@pytest.mark.slow
def test_drpo_trainer_trains_and_logs(tmp_path):
    trainer = make_trainer(DRPOGRPOTrainer, tmp_path, objective="drpo", objective_params={"delta": 12.5})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.model.parameters()))
    assert changed > 0
    logged = {k for row in trainer.state.log_history for k in row}
    assert {"drpo/loss", "drpo/ratio_mean", "drpo/penalty_mean", "drpo/kl_k3"} <= logged


def test_unknown_objective_param_fails_early(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter"):
        DRPOGRPOTrainer(model=None, objective="drpo", objective_params={"epsilon": 1.0})


def _inputs(trainer: GRPOTrainer, generator: torch.Generator) -> dict:
    """One micro-batch as TRL's _generate_and_score_completions shapes it, with an old policy."""
    B, P, T = 4, 3, 5
    vocab = trainer.model.config.vocab_size
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[3, 1:] = 0
    inputs = {
        "prompt_ids": torch.randint(3, vocab, (B, P), generator=generator),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (B, T), generator=generator),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=generator),
        "num_items_in_batch": completion_mask.sum(),
    }
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, T)
    # an old policy within and beyond the clip ranges
    inputs["old_per_token_logps"] = (logps + 0.4 * torch.randn(B, T, generator=generator)).clamp(max=0.0)
    return inputs


def _loss_and_grad(trainer: GRPOTrainer, inputs: dict) -> tuple[float, torch.Tensor]:
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return float(loss.detach()), grad


@pytest.mark.slow
@pytest.mark.parametrize(
    "trl_config, ours",
    [
        ({"loss_type": "grpo"}, dict(objective="grpo", agg_mode="seq-mean-token-mean")),
        ({"loss_type": "dapo", "epsilon_high": 0.28}, dict(objective="dapo", agg_mode="token-mean")),
        ({"loss_type": "cispo", "epsilon_high": 5.0}, dict(objective="cispo", agg_mode="token-mean")),
    ],
    ids=["grpo", "dapo", "cispo"],
)
def test_matches_trl_losses(tmp_path, trl_config, ours):
    theirs = make_trainer(GRPOTrainer, tmp_path / "trl", config=trl_config)
    mine = make_trainer(DRPOGRPOTrainer, tmp_path / "drpo", config=trl_config, **ours)
    mine.model.load_state_dict(theirs.model.state_dict())
    for tr in (theirs, mine):
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1  # set by Trainer.train(); one micro-batch per step
    inputs = _inputs(theirs, torch.Generator().manual_seed(1))
    loss_t, grad_t = _loss_and_grad(theirs, inputs)
    loss_m, grad_m = _loss_and_grad(mine, inputs)
    loss_err, grad_err = abs(loss_t - loss_m), float((grad_t - grad_m).abs().max())
    print(f"XCHECK trl:{trl_config['loss_type']} vs drpo:{ours['objective']} "
          f"loss_err={loss_err:.3e} grad_err={grad_err:.3e} (|grad|max={float(grad_t.abs().max()):.3e})")
    assert grad_t.abs().max() > 0
    assert loss_err <= 1e-6 * max(1.0, abs(loss_t))
    torch.testing.assert_close(grad_m, grad_t, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ the contract with TRL
# DRPOGRPOTrainer overrides GRPOTrainer._compute_loss (TRL removed its own DPPOTrainer, PR 6402,
# because overriding private methods was costly to follow). These fail with a one-line reason
# when the TRL internals we rely on change.


class _RecordingDict(dict):
    """A dict that records which keys were read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


@pytest.mark.slow
def test_trl_generation_builds_what_compute_loss_reads(tmp_path):
    """TRL's real _generate_and_score_completions (tiny model, CPU) builds every key
    DRPOGRPOTrainer._compute_loss needs, including the old policy's log-probs when a generation
    batch spans two optimizer steps; _compute_loss reads no key outside the declared contract."""
    from drpo.integrations import trl as ours

    trainer = make_trainer(DRPOGRPOTrainer, tmp_path, config={"steps_per_generation": 2})
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    prompts = [{"prompt": p} for p in ("1+1=", "2+3=") for _ in range(4)]  # RepeatSampler's layout
    out = trainer._generate_and_score_completions(prompts)
    missing = [k for k in ours.INPUT_KEYS + ("old_per_token_logps",) if k not in out]
    assert not missing, f"TRL {trl.__version__}'s generation output lacks {missing}, read by DRPOGRPOTrainer"
    inputs = _RecordingDict({k: (v[:4] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in out.items()})
    loss = trainer._compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss)
    declared = set(ours.INPUT_KEYS + ours.OPTIONAL_INPUT_KEYS + ours.VISION_INPUT_KEYS)
    assert inputs.read <= declared, f"_compute_loss reads undeclared keys {sorted(inputs.read - declared)}"
    assert set(ours.INPUT_KEYS) <= inputs.read


def _doctor_trl():
    from typer.testing import CliRunner

    from drpo.integrations.doctor import app

    return CliRunner().invoke(app, ["trl"])


def test_doctor_trl_passes_on_the_supported_trl():
    result = _doctor_trl()
    assert result.exit_code == 0 and result.output.rstrip().endswith("OK: no known trap"), result.output


def test_doctor_trl_catches_a_changed_compute_loss(monkeypatch):
    """If TRL changes _compute_loss's signature, or stops calling it, the doctor says so in one line."""
    def _compute_loss(self, model, inputs, num_items_in_batch):
        raise AssertionError

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", _compute_loss)
    result = _doctor_trl()
    assert result.exit_code == 1
    assert ("TRAP compute_loss_signature: GRPOTrainer._compute_loss['self', 'model', 'inputs', "
            "'num_items_in_batch'] is no longer (self, model, inputs): DRPOGRPOTrainer's override no longer "
            "matches") in result.output
    monkeypatch.undo()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return self._compute_grpo_loss(model, inputs)

    monkeypatch.setattr(GRPOTrainer, "compute_loss", compute_loss)
    result = _doctor_trl()
    assert result.exit_code == 1 and "TRAP compute_loss_not_called: " in result.output


def test_vision_inputs_and_router_aux_loss_are_refused(tmp_path):
    trainer = make_trainer(DRPOGRPOTrainer, tmp_path)
    with pytest.raises(ValueError, match="does not support vision inputs \\('pixel_values'"):
        trainer._compute_loss(trainer.model, {"pixel_values": torch.zeros(1)})
    with pytest.raises(ValueError, match="router auxiliary loss"):
        make_trainer(DRPOGRPOTrainer, tmp_path / "moe", config={"router_aux_loss_coef": 0.1},
                     model_config={"output_router_logits": True})
