"""TRL plug-in: ``DRPOGRPOTrainer``, TRL's GRPOTrainer with the loss of any drpo objective.

TRL 1.16 computes the GRPO loss in one method, ``GRPOTrainer._compute_loss(model, inputs)``;
generation, rewards, group advantages, vLLM and logging stay TRL's. This subclass overrides only
that method:

- log pi: TRL's own ``_get_per_token_logps_and_entropies``;
- anchor mu (the trust region's centre), first available of:
  ``sampling_per_token_logps`` (the rollout engine's log-probs, given by TRL with vLLM),
  ``old_per_token_logps`` (recomputed by TRL when a generation batch is reused),
  ``per_token_logps.detach()`` (single step on fresh samples: mu = pi);
- aggregation: ``agg_mode`` with TRL's gradient-accumulation normalisation (``token-mean`` uses
  TRL's ``num_items_in_batch``, the tokens of the whole accumulation window, like TRL's ``dapo``);
- metrics: drpo's trust-region metrics, logged through ``self._metrics`` as ``drpo/<name>``.

With vLLM, the anchor already *is* the rollout distribution, so TRL's extra vLLM importance
sampling correction is not applied (``vllm_importance_sampling_correction`` is ignored). The
KL-to-reference term (``beta``), TRL's entropy/top-entropy options, the MoE router auxiliary loss
and vision inputs are not supported (rejected with a one-line error).

Contract with TRL (supported range: ``drpo.integrations.doctor.SUPPORTED_TRL``): the names below
are everything this module relies on; ``drpo doctor trl`` and tests/test_integration_trl.py check
the installed TRL still has them.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from trl import GRPOTrainer

import drpo
from drpo.objectives import AGG_MODES, get_objective
from drpo.objectives.api import DEFAULT_REPORT_BOUNDARY

# Keys of TRL's generation output that _compute_loss reads: always, and when TRL provides them.
INPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch")
OPTIONAL_INPUT_KEYS = ("sampling_per_token_logps", "old_per_token_logps", "tool_mask")
# Vision inputs TRL's own _compute_loss forwards to the model; we do not, so we refuse them.
VISION_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
# Parameters of GRPOTrainer._get_per_token_logps_and_entropies that we pass.
LOGPS_PARAMS = ("model", "input_ids", "attention_mask", "logits_to_keep", "compute_entropy")
# Attributes GRPOTrainer.__init__ sets that we read.
TRAINER_ATTRIBUTES = ("beta", "top_entropy_quantile", "_entropy_bonus_enabled", "aux_loss_enabled",
                      "max_completion_length", "_metrics")


class DRPOGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose policy loss is ``drpo.policy_loss(objective, ...)``.

    Args:
        objective: a drpo objective or preset (``drpo.list_objectives()``), default ``"drpo"``.
        objective_params: its parameters, e.g. ``{"delta": 12.5}`` (unknown names are an error).
        agg_mode: token aggregation (see :mod:`drpo.objectives.aggregation`).
        report_boundary: |pi - mu| threshold of the ``beyond_*`` metrics.
        *args, **kwargs: passed to :class:`trl.GRPOTrainer`.
    """

    def __init__(
        self,
        *args: Any,
        objective: str = "drpo",
        objective_params: Optional[dict[str, Any]] = None,
        agg_mode: str = "token-mean",
        report_boundary: float = DEFAULT_REPORT_BOUNDARY,
        **kwargs: Any,
    ) -> None:
        self.objective = objective
        self.objective_params = dict(objective_params or {})
        get_objective(objective).resolve_params(self.objective_params)  # fail before loading a model
        if agg_mode not in AGG_MODES:
            raise ValueError(f"unknown agg_mode {agg_mode!r}; known: {list(AGG_MODES)}")
        self.agg_mode = agg_mode
        self.report_boundary = report_boundary
        super().__init__(*args, **kwargs)
        if self.beta != 0.0:
            raise ValueError("DRPOGRPOTrainer does not support the KL-to-reference term; set beta=0.0")
        if self.top_entropy_quantile < 1.0 or self._entropy_bonus_enabled:
            raise ValueError("DRPOGRPOTrainer does not support top_entropy_quantile / entropy bonus")
        if self.aux_loss_enabled:
            raise ValueError("DRPOGRPOTrainer does not add the MoE router auxiliary loss; set router_aux_loss_coef=0.0")

    @staticmethod
    def anchor_log_probs(inputs: dict[str, Any], per_token_logps: torch.Tensor) -> torch.Tensor:
        """mu: the rollout engine's log-probs if TRL has them, else the old policy's, else pi's."""
        for key in ("sampling_per_token_logps", "old_per_token_logps"):
            if inputs.get(key) is not None:
                return inputs[key]
        return per_token_logps.detach()

    def _token_mean_count(self, inputs: dict[str, Any], train: bool) -> torch.Tensor:
        """Tokens of one accumulation window on this process (TRL's ``dapo`` normaliser)."""
        count = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            count = count * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return count

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        vision = [k for k in VISION_INPUT_KEYS if inputs.get(k) is not None]
        if vision:
            raise ValueError(f"DRPOGRPOTrainer does not support vision inputs ({vision[0]!r} in the batch)")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=False
        )
        train = self.model.training
        counts: dict[str, Any] = {}
        if self.agg_mode == "token-mean":
            counts["global_token_count"] = float(self._token_mean_count(inputs, train))
        elif self.agg_mode == "seq-mean-token-sum-norm":
            counts["horizon"] = float(self.max_completion_length)
        loss, metrics = drpo.policy_loss(
            self.objective,
            per_token_logps,
            self.anchor_log_probs(inputs, per_token_logps),
            inputs["advantages"],
            mask.bool(),
            agg_mode=self.agg_mode,
            report_boundary=self.report_boundary,
            **counts,
            **self.objective_params,
        )
        if train and self.agg_mode.startswith("seq-mean"):
            loss = loss / self.current_gradient_accumulation_steps  # mean over the window's micro-batches
        mode = "train" if train else "eval"
        for name, value in metrics.items():
            self._metrics[mode][f"drpo/{name}"].append(value)
        return loss
