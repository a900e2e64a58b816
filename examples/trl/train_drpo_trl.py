"""DRPO with TRL on CPU: a tiny Qwen3 (built from a config) learns to answer with digits.

    python examples/trl/train_drpo_trl.py --steps 20 --objective drpo --delta 12.5

For a real run, pass a Hugging Face model id to ``DRPOGRPOTrainer(model=...)`` and a
math dataset with a ``prompt`` column; with ``use_vllm=True`` the trust region is anchored on
vLLM's sampling log-probs (see drpo.integrations.trl).
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from transformers import Qwen3Config, Qwen3ForCausalLM
from trl import GRPOConfig

from drpo.integrations.trl import DRPOGRPOTrainer
from drpo.builtin.tokenizer import char_tokenizer



def tiny_qwen3(vocab_size: int, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1))


def digit_reward(completions: list[str], **_: object) -> list[float]:
    """Fraction of digits in each completion."""
    return [sum(c.isdigit() for c in s) / max(len(s), 1) for s in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", default="drpo")
    parser.add_argument("--delta", type=float, default=12.5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    tok = char_tokenizer()
    prompts = [f"{a}+{b}=" for a in range(8) for b in range(8)]
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=8, num_generations=8,
                            max_completion_length=8, max_steps=args.steps, learning_rate=3e-3,
                            logging_steps=5, report_to="none", use_cpu=True, bf16=False,
                            save_strategy="no", seed=0,
                            steps_per_generation=4)  # reuse each generation batch: mu = old policy != pi
        trainer = DRPOGRPOTrainer(model=tiny_qwen3(len(tok)), reward_funcs=digit_reward, args=config,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  processing_class=tok, objective=args.objective,
                                  objective_params={"delta": args.delta})
        trainer.train()
    for row in trainer.state.log_history:
        if "reward" in row:
            print(f"step {row['step']:>3}  reward {row['reward']:.3f}  "
                  f"|pi-mu| mean {row['drpo/abs_shift_mean']:.4f}  penalty {row['drpo/penalty_mean']:.4f}")


if __name__ == "__main__":
    main()
