"""The RL trainer: the whole algorithm of one step reads top to bottom in :meth:`Trainer.step`.

    prompts -> rollout engine (samples + its own log mu) -> rewards -> group advantages
            -> K minibatch optimiser steps on drpo.policy_loss(objective)  -> sync engine weights
            -> metrics (JSONL, TensorBoard, progress bar) -> periodic evaluation -> checkpoint

All randomness is derived from (seed, step), and checkpoints hold model, optimiser, scheduler and
RNG states, so a run resumed from a checkpoint logs the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from drpo.evaluation.metrics import evaluate
from drpo.evaluation.run import encoder, make_generate_fn
from drpo.objectives import RolloutCorrection, policy_loss
from drpo.objectives.metrics import MU_TAIL
from drpo.rewards.base import math_reward, score_batch
from drpo.rollout.engine import RolloutBatch, SamplingParams, decode_responses
from drpo.rollout.factory import make_engine
from drpo.rollout.precision import use_bf16_compute_
from drpo.tasks.base import Example
from drpo.training import run_io
from drpo.training.advantages import group_advantages
from drpo.training.config import RunConfig, dump_config
from drpo.training.logprobs import response_logprobs
from drpo.training.models import load_policy
from drpo.training.prompts import make_prompts, step_seed


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf: the run stops after saving what was logged."""


@dataclass
class EvalSummary:
    accuracy: float
    n: int
    mean_length: float  # characters of the decoded responses


def default_out(cfg: RunConfig) -> str:
    return f"runs/{cfg.objective.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = False) -> None:
        if cfg.out is None:
            cfg.out = default_out(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        if (self.out / "metrics.jsonl").exists() and not resume:
            raise FileExistsError(
                f"{self.out} already holds a run; pass --resume to continue it or choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)

        self.tokenizer, self.model = load_policy(cfg.model, seed=cfg.seed, progress=cfg.progress)
        self.model.to(self.device)
        self.pad_id = self.tokenizer.pad_token_id
        self.engine = make_engine(cfg.rollout, self.model, eos_id=self.tokenizer.eos_token_id,
                                  pad_id=self.pad_id)  # built before the trainer's own precision
        self.autocast_dtype: Optional[torch.dtype] = None
        if cfg.train.precision == "bf16":
            if self.device.type == "cuda":  # real bf16 compute, fp32 master weights
                self.autocast_dtype = torch.bfloat16
            else:  # no fast bf16 on CPU: simulated by rounding (see drpo.rollout.precision)
                use_bf16_compute_(self.model, round_weights=True)
        self.model.train()

        self.prompts = make_prompts(cfg.task, cfg.seed)
        self._encode_text = encoder(self.tokenizer, cfg.task.chat_template)
        for ex in getattr(self.prompts, "train", []):  # a dataset: check every prompt's length up front
            self.encode(ex)
        self.reward_fn = math_reward
        self.sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                       top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                                       n=cfg.rollout.group_size, logprobs_topk=cfg.rollout.logprobs_topk)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.betas,
                                           weight_decay=t.weight_decay)
        total = max(cfg.train.steps * t.minibatches * t.epochs, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(t.schedule, t.warmup_steps, total))
        self.rc = RolloutCorrection(**t.rollout_correction) if t.rollout_correction else None
        self._heldout_cache: Optional[list[Example]] = None

        self.start_step = 0
        if resume:
            self._resume()
        (self.out / "config.yaml").write_text(dump_config(cfg))

    # ------------------------------------------------------------------ data helpers
    def encode(self, ex: Example) -> list[int]:
        ids = self._encode_text(ex.prompt)
        limit = self.cfg.task.max_prompt_tokens
        if len(ids) > limit:
            raise ValueError(f"prompt of example {ex.id or ex.prompt[:40]!r} has {len(ids)} tokens, "
                             f"over task.max_prompt_tokens={limit}")
        if not ids:
            raise ValueError(f"prompt of example {ex.id!r} is empty after tokenisation")
        return ids

    # ------------------------------------------------------------------ one RL step
    def step(self, step: int) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        examples = self.prompts.train_batch(step, cfg.rollout.prompts_per_step)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, salt=3))
        batch = self.engine.generate([self.encode(e) for e in examples], self.sampling, gen)
        timing["time/rollout"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        texts = decode_responses(batch, self.tokenizer)
        rewards, rstats = score_batch(self.reward_fn, [examples[i] for i in batch.prompt_index.tolist()], texts)
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        finished = (batch.response_ids == self.tokenizer.eos_token_id).any(-1)
        if t.overlong_reward is not None:
            rewards_t = torch.where(finished, rewards_t, torch.tensor(float(t.overlong_reward)))
        ga = group_advantages(rewards_t, cfg.rollout.group_size, t.advantage, t.std_normalize)
        timing["time/reward"] = time.perf_counter() - t1

        m: dict[str, Any] = {
            "reward/mean": float(rewards_t.mean()),
            "reward/errors": rstats.to_dict().get("n_errors", 0),
            "adv/zero_adv_group_frac": ga.zero_adv_frac,
            "response/length_mean": float(batch.response_mask.sum(-1).float().mean()),
            "response/eos_frac": float(finished.float().mean()),
        }
        mu = batch.behavior_log_prob.exp()[batch.response_mask.bool()]
        m["rollout/mu_lt_0.01_frac"] = float((mu < MU_TAIL).float().mean())

        rows = torch.arange(len(batch))
        if t.filter_zero_adv_groups:
            rows = rows[ga.keep]
        m["train/sequences"] = int(rows.numel())
        t2 = time.perf_counter()
        if rows.numel() >= t.minibatches:
            m.update(self._update(step, batch, ga.advantages, rows))
        else:
            m["train/skipped"] = 1
        timing["time/update"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        self.engine.sync(self.model)
        timing["time/sync"] = time.perf_counter() - t3
        total = time.perf_counter() - t0
        timing["time/step"] = total
        m.update(timing)
        m["throughput/tokens_per_s"] = float(batch.response_mask.sum()) / total
        m["lr"] = self.scheduler.get_last_lr()[0]
        return m

    def _anchor(self, batch: RolloutBatch) -> torch.Tensor:
        """log of the trust region's anchor: the rollout's mu, or a recomputed old policy."""
        if self.cfg.train.anchor == "rollout":
            return batch.behavior_log_prob
        out = []
        with torch.no_grad():
            for idx in torch.arange(len(batch)).split(self.cfg.train.micro_batch_size):
                mb = batch.select(idx)
                lp, _, _ = self._logprobs(mb, with_entropy=False)
                out.append(lp.float())
        return torch.cat(out)

    def _logprobs(self, mb: RolloutBatch, with_entropy: bool):
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            return response_logprobs(
                self.model, mb.prompt_ids.to(self.device), mb.prompt_mask.to(self.device),
                mb.response_ids.to(self.device), mb.response_mask.to(self.device),
                temperature=self.cfg.rollout.temperature, chunk_size=self.cfg.train.chunk_size,
                with_entropy=with_entropy,
                topk_ids=mb.topk_ids.to(self.device) if mb.topk_ids is not None else None,
            )

    def _update(self, step: int, batch: RolloutBatch, advantages: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        anchor = self._anchor(batch)
        obj = cfg.objective
        acc: dict[str, list[tuple[float, float]]] = defaultdict(list)
        out: dict[str, Any] = {}
        grad_norms = []
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, salt=4))
        first = True
        for _ in range(t.epochs):
            perm = rows[torch.randperm(rows.numel(), generator=gen)]
            for mb_rows in perm.chunk(t.minibatches):
                mask_mb = batch.response_mask[mb_rows]
                n_tok = float(mask_mb.sum())
                n_seq = float((mask_mb.sum(-1) > 0).sum())
                self.optimizer.zero_grad(set_to_none=True)
                for micro in mb_rows.split(t.micro_batch_size):
                    mb = batch.select(micro)
                    logp, ent, tk = self._logprobs(mb, with_entropy=True)
                    kwargs = {}
                    if self.rc is not None:
                        kwargs.update(rollout_log_prob=mb.behavior_log_prob, rollout_correction=self.rc)
                    if mb.topk_ids is not None:
                        kwargs.update(topk_log_prob=tk, behavior_topk_log_prob=mb.topk_log_prob,
                                      topk_ids=mb.topk_ids, sampled_ids=mb.response_ids)
                    try:
                        loss, lm = policy_loss(
                            obj.name, logp, anchor[micro].to(logp.device), advantages[micro].to(logp.device),
                            mb.response_mask.to(logp.device), agg_mode=obj.agg_mode,
                            global_token_count=n_tok, global_seq_count=n_seq,
                            horizon=cfg.rollout.max_new_tokens, **kwargs, **obj.params)
                    except ValueError as e:
                        if "NaN or inf" in str(e):
                            raise TrainingDiverged(f"step {step}: {e}") from None
                        raise
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"step {step}: the loss is {float(loss.detach())}")
                    loss.backward()
                    w = float(mb.response_mask.sum())
                    lm["entropy"] = float((ent.detach() * mb.response_mask).sum() / max(w, 1.0))
                    for k, v in lm.items():
                        acc[k].append((v, w))
                    if first:  # before any update on this batch: the rollout/trainer mismatch
                        for k in ("abs_shift_mean", "abs_shift_max", "ratio_max", "kl_k3"):
                            acc["mismatch/" + k].append((lm[k], w))
                first = False
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                if not torch.isfinite(gn):
                    raise TrainingDiverged(f"step {step}: the gradient norm is {float(gn)}")
                grad_norms.append(float(gn))
                self.optimizer.step()
                self.scheduler.step()
        for k, vals in acc.items():
            if k.endswith("_max"):
                out_v = max(v for v, _ in vals)
            elif k.endswith("_min"):
                out_v = min(v for v, _ in vals)
            else:
                W = sum(w for _, w in vals)
                out_v = sum(v * w for v, w in vals) / max(W, 1e-12)
            out[k if k.startswith("mismatch/") else "obj/" + k] = out_v
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train/grad_norm_max"] = max(grad_norms)
        out["train/optimizer_steps"] = len(grad_norms)
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> EvalSummary:
        """Held-out accuracy (avg@samples) of the deployed policy: the rollout engine, at its precision,
        with a fixed sampling seed so that successive evaluations differ only by the weights."""
        e = self.cfg.eval
        if self._heldout_cache is None:
            self._heldout_cache = self.prompts.heldout(e.prompts)
        if not self._heldout_cache:
            return EvalSummary(float("nan"), 0, float("nan"))
        params = SamplingParams(temperature=e.temperature,
                                max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens)
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, 0, salt=5))
        generate = make_generate_fn(self.engine, self.tokenizer, lambda p: self.encode(Example(p, "")), params, gen)
        res = evaluate(generate, self._heldout_cache, k=e.samples, reward_fn=self.reward_fn,
                       batch_size=max(1, self.cfg.rollout.max_batch // e.samples), progress=False)
        lengths = [len(r) for row in res.per_example for r in row["responses"]]
        return EvalSummary(res.avg_at_k, res.n, sum(lengths) / max(len(lengths), 1))

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> Path:
        return run_io.save_checkpoint(self.out, step, self.model, self.tokenizer, self.optimizer,
                                      self.scheduler, {"config": self.cfg.model_dump(mode="json")})

    def _resume(self) -> None:
        ckpt = run_io.latest_checkpoint(self.out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.out / 'checkpoints'}")
        from safetensors.torch import load_file

        state = load_file(str(ckpt / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if k not in _tied_keys(self.model)]
        if real_missing or unexpected:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {real_missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        st = torch.load(ckpt / "state.pt", weights_only=False)
        run_io.set_rng_state(st["rng"])
        self.start_step = int(st["step"])
        run_io.set_aside_metrics_after(self.out, self.start_step)
        self.engine.sync(self.model)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        log = run_io.MetricsLog(self.out, tensorboard=cfg.tensorboard)
        run_io.write_status(self.out, "running", step=self.start_step)
        summary: dict[str, Any] = {"out": str(self.out)}
        try:
            if self.start_step == 0 and cfg.eval.every:
                ev = self.evaluate()
                log.write(0, {"eval/accuracy": ev.accuracy, "eval/length_mean": ev.mean_length})
            bar = tqdm(range(self.start_step + 1, cfg.train.steps + 1), initial=self.start_step,
                       total=cfg.train.steps, desc=f"{cfg.objective.name}", disable=not cfg.progress,
                       dynamic_ncols=True)
            for step in bar:
                m = self.step(step - 1)
                if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                    t0 = time.perf_counter()
                    ev = self.evaluate()
                    m.update({"eval/accuracy": ev.accuracy, "eval/length_mean": ev.mean_length,
                              "time/eval": time.perf_counter() - t0})
                log.write(step, m)
                post = {"reward": f"{m['reward/mean']:.3f}"}
                if "eval/accuracy" in m:
                    post["acc"] = f"{m['eval/accuracy']:.3f}"
                bar.set_postfix(post)
                if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.train.steps):
                    self.save(step)
                run_io.write_status(self.out, "running", step=step)
        except TrainingDiverged as e:
            run_io.write_status(self.out, "failed", reason=str(e))
            raise
        finally:
            log.close()
        run_io.write_status(self.out, "finished", step=cfg.train.steps)
        rows = run_io.read_metrics(self.out / "metrics.jsonl")
        accs = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        if accs:
            summary.update(accuracy_before=accs[0][1], accuracy_after=accs[-1][1])
        return summary


def _tied_keys(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        keys = list(keys)
    return set(keys)


def _schedule(kind: str, warmup: int, total: int):
    def f(i: int) -> float:
        if kind == "constant":
            return 1.0
        w = min(1.0, (i + 1) / warmup) if warmup else 1.0
        if kind == "warmup":
            return w
        progress = min(1.0, max(0, i - warmup) / max(1, total - warmup))
        return w * 0.5 * (1 + math.cos(math.pi * progress))

    return f
