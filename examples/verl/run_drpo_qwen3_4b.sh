#!/usr/bin/env bash
# DRPO on Qwen3-4B-Base with verl (the paper's main setting), 1 node x 8 GPUs, FSDP + vLLM.
#
#   TRAIN_JSONL=/data/dapo_math_17k.jsonl bash examples/verl/run_drpo_qwen3_4b.sh [extra hydra overrides]
#
# Needs: pip install -e '.[verl]' vllm (the extra includes TransferQueue, which verl's v1 trainer imports).
# DRY_RUN=1 prints the hydra overrides and exits (the test suite composes them with verl's config).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MODEL=${MODEL:-Qwen/Qwen3-4B-Base}
TRAIN_JSONL=${TRAIN_JSONL:-$HOME/data/dapo_math_17k.jsonl}   # DAPO-Math-17k as JSON lines
QUESTION_FIELD=${QUESTION_FIELD:-prompt}
ANSWER_FIELD=${ANSWER_FIELD:-solution}
DATA_DIR=${DATA_DIR:-$HOME/data/drpo_verl}
N_GPUS=${N_GPUS:-8}
DELTA=${DELTA:-12.5}
EXPERIMENT=${EXPERIMENT:-drpo_qwen3_4b_delta${DELTA}}

OVERRIDES=(
  # data: prompts as chat messages, gold answers under reward_model.ground_truth
  "data.train_files=$DATA_DIR/train.parquet"
  "data.val_files=[$DATA_DIR/aime24.parquet,$DATA_DIR/aime25.parquet]"
  "data.train_batch_size=64"
  "data.max_prompt_length=1024"
  "data.max_response_length=8192"
  "data.filter_overlong_prompts=True"
  "data.truncation=error"
  # GRPO group advantages, no KL anywhere
  "algorithm.adv_estimator=grpo"
  "algorithm.use_kl_in_reward=False"
  "actor_rollout_ref.actor.use_kl_loss=False"
  "actor_rollout_ref.actor.entropy_coeff=0"
  # DRPO, anchored on the rollout engine's log-probs mu at every minibatch step:
  # bypass mode sets old_log_probs := rollout_log_probs (v1 trainer), and the loss stays ours
  "actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig"
  "actor_rollout_ref.actor.policy_loss.loss_mode=drpo"
  "+actor_rollout_ref.actor.policy_loss.drpo_params.delta=$DELTA"
  "algorithm.rollout_correction.bypass_mode=True"
  "actor_rollout_ref.rollout.calculate_log_probs=True"
  "trainer.use_v1=True"
  "actor_rollout_ref.actor.loss_agg_mode=token-mean"
  # optimisation: 64 prompts x 8 samples per step, minibatches of 16 prompts (4 updates per step)
  "actor_rollout_ref.model.path=$MODEL"
  "actor_rollout_ref.actor.optim.lr=1e-6"
  "actor_rollout_ref.actor.ppo_mini_batch_size=16"
  "actor_rollout_ref.actor.ppo_epochs=1"
  "actor_rollout_ref.actor.use_dynamic_bsz=True"
  "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=18432"
  "actor_rollout_ref.actor.strategy=fsdp"
  "actor_rollout_ref.actor.fsdp_config.param_offload=False"
  "actor_rollout_ref.actor.fsdp_config.optimizer_offload=False"
  "actor_rollout_ref.model.enable_gradient_checkpointing=True"
  "actor_rollout_ref.model.use_remove_padding=True"
  # rollout: vLLM, n=8 at temperature 1; evaluation avg@16 on AIME24/25
  "actor_rollout_ref.rollout.name=vllm"
  "actor_rollout_ref.rollout.n=8"
  "actor_rollout_ref.rollout.temperature=1.0"
  "actor_rollout_ref.rollout.tensor_model_parallel_size=1"
  "actor_rollout_ref.rollout.gpu_memory_utilization=0.7"
  "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True"
  "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=18432"
  "actor_rollout_ref.rollout.val_kwargs.n=16"
  "actor_rollout_ref.rollout.val_kwargs.do_sample=True"
  "actor_rollout_ref.rollout.val_kwargs.temperature=1.0"
  # reward: drpo.verify (math-verify on the last \boxed{})
  "reward.custom_reward_function.path=$REPO/examples/verl/reward.py"
  "reward.custom_reward_function.name=compute_score"
  # trainer
  "trainer.n_gpus_per_node=$N_GPUS"
  "trainer.nnodes=1"
  "trainer.project_name=drpo"
  "trainer.experiment_name=$EXPERIMENT"
  "trainer.logger=[console,tensorboard]"
  "trainer.val_before_train=True"
  "trainer.test_freq=10"
  "trainer.save_freq=50"
  "trainer.total_epochs=1"
  "trainer.total_training_steps=500"
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
drpo_doctor --entry main_ppo "${OVERRIDES[@]}" "$@"   # stop here on a known trap
python -m verl.trainer.main_ppo "${OVERRIDES[@]}" "$@"
