#!/usr/bin/env bash
# DRPO on Qwen3-4B-Base with verl's fully-async trainer: rollout and training on separate GPUs
# (default 4 + 4 on one node), FSDP2 + vLLM. The asynchronous sibling of run_drpo_qwen3_4b.sh.
#
#   TRAIN_JSONL=/data/dapo_math_17k.jsonl bash examples/verl/run_drpo_qwen3_4b_fully_async.sh [extra overrides]
#
# Anchor. verl's fully-async trainer calls apply_bypass_mode, which would swap our loss for verl's
# (drpo doctor: trap bypass_rewrites_loss), so bypass mode stays off: old_log_probs are recomputed
# by the trainer with the weights of the current sync window (the proximal policy), and verl's
# token-level rollout-correction weights min(pi_old/mu, 2) multiply our per-token loss, mu being
# vLLM's log-probs of the (possibly stale) samples.
#
# Batches. A trainer step takes ppo_mini_batch_size x require_batches = 16 prompts x 8 samples and
# makes one update; weights go to vLLM every trigger_parameter_sync_step = 4 steps, i.e. every 64
# prompts, as in the synchronous recipe (batch 64, minibatch 16). The rollouter may run
# staleness_threshold = 0.1 of a sync window ahead.
#
# Needs: pip install -e '.[verl]' vllm. DRY_RUN=1 prints the hydra overrides and exits (the test
# suite composes them with verl's fully_async_ppo_trainer config and runs `drpo doctor` on them).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MODEL=${MODEL:-Qwen/Qwen3-4B-Base}
TRAIN_JSONL=${TRAIN_JSONL:-$HOME/data/dapo_math_17k.jsonl}   # DAPO-Math-17k as JSON lines
QUESTION_FIELD=${QUESTION_FIELD:-prompt}
ANSWER_FIELD=${ANSWER_FIELD:-solution}
DATA_DIR=${DATA_DIR:-$HOME/data/drpo_verl}
TRAIN_GPUS=${TRAIN_GPUS:-4}
ROLLOUT_GPUS=${ROLLOUT_GPUS:-4}
DELTA=${DELTA:-12.5}
EXPERIMENT=${EXPERIMENT:-drpo_qwen3_4b_fully_async_delta${DELTA}}

OVERRIDES=(
  # data: the fully-async rollouter takes one prompt at a time (train_batch_size must be 0)
  "data.train_files=$DATA_DIR/train.parquet"
  "data.val_files=[$DATA_DIR/aime24.parquet,$DATA_DIR/aime25.parquet]"
  "data.train_batch_size=0"
  "data.gen_batch_size=1"
  "data.max_prompt_length=1024"
  "data.max_response_length=8192"
  "data.filter_overlong_prompts=True"
  "data.truncation=error"
  # GRPO group advantages, no KL anywhere
  "algorithm.adv_estimator=grpo"
  "algorithm.use_kl_in_reward=False"
  "actor_rollout_ref.actor.use_kl_loss=False"
  "actor_rollout_ref.actor.entropy_coeff=0"
  # DRPO anchored on the recomputed proximal policy, with token-level rollout-correction weights
  "actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig"
  "actor_rollout_ref.actor.policy_loss.loss_mode=drpo"
  "+actor_rollout_ref.actor.policy_loss.drpo_params.delta=$DELTA"
  "algorithm.rollout_correction.bypass_mode=False"
  "algorithm.rollout_correction.rollout_is=token"
  "algorithm.rollout_correction.rollout_is_threshold=2.0"
  "actor_rollout_ref.rollout.calculate_log_probs=True"
  "actor_rollout_ref.actor.loss_agg_mode=token-mean"
  # fully async: separate trainer and rollout GPUs, weights synced every 4 trainer steps
  "actor_rollout_ref.hybrid_engine=False"
  "async_training.require_batches=1"
  "async_training.trigger_parameter_sync_step=4"
  "async_training.staleness_threshold=0.1"
  "async_training.partial_rollout=True"
  "rollout.nnodes=1"
  "rollout.n_gpus_per_node=$ROLLOUT_GPUS"
  "rollout.total_rollout_steps=32000"
  "trainer.nnodes=1"
  "trainer.n_gpus_per_node=$TRAIN_GPUS"
  # optimisation: 16 prompts x 8 samples per update, lr 1e-6
  "actor_rollout_ref.model.path=$MODEL"
  "actor_rollout_ref.actor.optim.lr=1e-6"
  "actor_rollout_ref.actor.ppo_mini_batch_size=16"
  "actor_rollout_ref.actor.ppo_epochs=1"
  "actor_rollout_ref.actor.use_dynamic_bsz=True"
  "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=18432"
  "actor_rollout_ref.actor.strategy=fsdp2"
  "actor_rollout_ref.actor.fsdp_config.param_offload=False"
  "actor_rollout_ref.actor.fsdp_config.optimizer_offload=False"
  "actor_rollout_ref.model.enable_gradient_checkpointing=True"
  "actor_rollout_ref.model.use_remove_padding=True"
  # rollout: vLLM, n=8 at temperature 1; evaluation avg@16 on AIME24/25
  "actor_rollout_ref.rollout.name=vllm"
  "actor_rollout_ref.rollout.mode=async"
  "actor_rollout_ref.rollout.n=8"
  "actor_rollout_ref.rollout.temperature=1.0"
  "actor_rollout_ref.rollout.tensor_model_parallel_size=1"
  "actor_rollout_ref.rollout.gpu_memory_utilization=0.8"
  "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True"
  "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=18432"
  "actor_rollout_ref.rollout.val_kwargs.n=16"
  "actor_rollout_ref.rollout.val_kwargs.do_sample=True"
  "actor_rollout_ref.rollout.val_kwargs.temperature=1.0"
  # reward: drpo.verify (math-verify on the last \boxed{})
  "reward.custom_reward_function.path=$REPO/examples/verl/reward.py"
  "reward.custom_reward_function.name=compute_score"
  # trainer
  "trainer.project_name=drpo"
  "trainer.experiment_name=$EXPERIMENT"
  "trainer.logger=[console,tensorboard]"
  "trainer.val_before_train=True"
  "trainer.test_freq=10"
  "trainer.save_freq=50"
  "trainer.total_epochs=2"
)

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%s\n' "${OVERRIDES[@]}" "$@"
  exit 0
fi

mkdir -p "$DATA_DIR"
python -m drpo.integrations.verl_data --input "$TRAIN_JSONL" --output "$DATA_DIR/train.parquet" \
  --question-field "$QUESTION_FIELD" --answer-field "$ANSWER_FIELD" --data-source dapo_math
for bench in aime24 aime25; do
  python -m drpo.integrations.verl_data --input "$REPO/src/drpo/data/benchmarks/$bench.jsonl" \
    --output "$DATA_DIR/$bench.parquet" --question-field question --answer-field answer \
    --data-source "$bench" --split test
done

drpo_doctor() { python -c "from drpo.integrations.doctor import app; app()" verl "$@"; }
drpo_doctor --entry fully_async "${OVERRIDES[@]}" "$@"   # stop here on a known trap
python -m verl.experimental.fully_async_policy.fully_async_main "${OVERRIDES[@]}" "$@"
