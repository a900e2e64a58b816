"""Supervised warm start: how the shipped built-in models were made, and the real model's arithmetic start.

RL needs a policy that already succeeds sometimes. :func:`warm_start` trains a tiny Qwen3 (or
Qwen3-MoE) from a seeded random initialisation (AdamW, loss on response tokens) to imitate the
arithmetic task's reference responses and stops as soon as its held-out *sampled* (temperature 1)
exact-match accuracy reaches ``stop_at`` inside ``target_band``. The demonstrations are imperfect
on purpose: each boxed number is the result with probability ``hparams.demo_accuracy`` and
otherwise one of the problem's operands (the demonstrator takes a shortcut). The imitating model
therefore holds two behaviours, computing and copying, and samples between them, as a base LLM
samples between a right and a shallow strategy; a verifier reward can teach it to prefer computing.
That preference is the headroom RL recovers in the default run: it selects and sharpens a behaviour
the model has, it does not teach new arithmetic.

The result (model + tokenizer via ``save_pretrained``, plus ``warmstart.json`` with the command,
seed, steps and held-out accuracies) is what ships as ``model=builtin`` / ``model=builtin-moe``
(``src/drpo/data/models/``); ``drpo warmstart --model NAME --out DIR`` makes it again. The folder
is written to a temporary name and renamed into place, so an interrupted run leaves nothing.

The same recipe starts a pretrained model on the task (``init=``: a model name or folder, loaded by
:func:`drpo.models.load_policy`, instead of a random tiny one): ``smollm2-135m-arith`` is
SmolLM2-135M-Instruct warm-started with :data:`REAL_HPARAMS` (the pretrained model scores 0 on the task
out of the box: it does not write the boxed answer, and its sums are often wrong). It is 540 MB, so it
is not shipped: ``drpo warmstart --model smollm2-135m-arith`` writes it into the cache directory
(:func:`drpo.models.warm_started_dir`), where ``model=smollm2-135m-arith`` finds it.

Determinism: given the seed the run is reproducible on one machine with one torch thread count;
CPU reductions are ordered differently with other thread counts and CPU types, so results (and the
stopping step) can differ slightly between machines -- which is why the weights ship.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from drpo.builtin.tokenizer import build_tokenizer
from drpo.models import build_tiny_model, load_policy, tiny_config
from drpo.rewards.verify import extract_boxed
from drpo.tasks.arithmetic import DEFAULT_DIFFICULTY, ArithmeticTask
from drpo.tasks.base import Example
from drpo.utils.constants import MU_TAIL


@dataclass(frozen=True)
class WarmStartHParams:
    """Training and evaluation settings (recorded in ``warmstart.json``)."""

    difficulty: int = DEFAULT_DIFFICULTY
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    max_steps: int = 1500
    eval_every: int = 20
    n_eval: int = 128
    n_final_eval: int = 512
    max_new_tokens: int = 16
    demo_accuracy: float = 0.35


# SmolLM2-135M-Instruct: its steps cost about 100x the tiny model's, hence smaller batches and evaluations (the
# stopping rule is the same). Its demonstrations are all right (demo_accuracy 1): the pretrained model's own
# sums are often wrong, so it needs no shortcut to hold a wrong behaviour beside the right one. Measured
# (docs/real-model.md): lr 3e-5 with the built-in recipe's 0.35 stayed at 0.00-0.08 for 50 steps; lr 1e-4 with
# 1.0 reached 0.17 at step 10 (kept: in the band) and 0.42 at step 20 (past it: stopped)
REAL_HPARAMS = WarmStartHParams(batch_size=16, lr=1e-4, warmup_steps=10, max_steps=400, eval_every=10, n_eval=64,
                                n_final_eval=256, demo_accuracy=1.0)


def boxed_answer(text: str) -> str | None:
    """The stripped content of the last ``\\boxed{...}`` in ``text`` (None when there is none);
    the verifier's own extractor, compared by exact string match (fast, for integer answers)."""
    found = extract_boxed(text)
    return None if found is None else found.strip()


def encode_pairs(tok: PreTrainedTokenizerFast, prompts: list[str], responses: list[str]
                 ) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + response + EOS`` with labels on the response and EOS only."""
    rows = []
    for p, r in zip(prompts, responses):
        p_ids, r_ids = tok(p)["input_ids"], tok(r)["input_ids"] + [tok.eos_token_id]
        rows.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(ids, tok.pad_token_id) for ids, _ in rows]),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),
        "labels": torch.tensor([pad(lab, -100) for _, lab in rows]),
    }


@torch.no_grad()
def sample_responses(model: PreTrainedModel, tok: PreTrainedTokenizerFast, prompts: list[str],
                     *, greedy: bool = False, max_new_tokens: int = 16
                     ) -> tuple[list[str], torch.Tensor]:
    """Decoded responses, and the probabilities of every sampled token (EOS included)."""
    model.eval()
    ids = [tok(p)["input_ids"] for p in prompts]  # left-padded: generation continues each prompt where it ends
    width = max(len(x) for x in ids)
    batch = {"input_ids": torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids]),
             "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])}
    sampling = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    out = model.generate(**batch, **sampling, max_new_tokens=max_new_tokens, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    probs = torch.stack(out.scores, dim=1).softmax(-1).gather(-1, new[..., None])[..., 0]
    ended = (new == tok.eos_token_id).int().cumsum(1)
    valid = (ended == 0) | ((ended == 1) & (new == tok.eos_token_id))
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return texts, probs[valid]


def heldout_accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerFast,
                     examples: list[Example], *, greedy: bool = False, max_new_tokens: int = 16,
                     batch_size: int = 128) -> tuple[float, float]:
    """Exact-match accuracy of the last boxed answer, and the share of tokens with mu < 0.01."""
    hits, tail, n_tokens = 0, 0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        texts, probs = sample_responses(model, tok, [e.prompt for e in chunk], greedy=greedy,
                                        max_new_tokens=max_new_tokens)
        hits += sum(boxed_answer(t) == e.answer for t, e in zip(texts, chunk))
        tail, n_tokens = tail + int((probs < MU_TAIL).sum()), n_tokens + probs.numel()
    return hits / len(examples), tail / max(n_tokens, 1)


def warm_start(out: Path, *, target_band: tuple[float, float] = (0.15, 0.40), stop_at: float = 0.20,
               seed: int = 0, progress: bool = True, hparams: WarmStartHParams = WarmStartHParams(),
               model_overrides: dict | None = None, arch: str = "dense", init: str | None = None,
               command: str = "") -> Path:
    """Train the warm-started tiny model (``arch`` 'dense' Qwen3 or 'moe' Qwen3-MoE), or the pretrained
    model ``init`` (a name or folder for :func:`drpo.models.load_policy`), into the folder ``out`` (replaced
    if it exists); returns it. ``command`` is recorded in ``warmstart.json``.

    The MoE model trains with its router load-balancing loss (``router_aux_loss_coef``), as MoE
    models are pre-trained, so that its experts are used.

    Evaluates held-out sampled accuracy every ``hparams.eval_every`` steps and stops at the first
    evaluation with accuracy in ``[stop_at, target_band[1]]``. If an evaluation jumps past the band,
    or ``max_steps`` runs out, the last in-band checkpoint is kept (else the final one).
    ``warmstart.json`` records whether the saved model was in band, and its accuracies.
    """
    lo, hi = target_band
    task = ArithmeticTask(difficulty=hparams.difficulty, seed=seed)
    start = time.time()
    random.seed(seed)
    if init is None:
        tok = build_tokenizer()
        config = tiny_config(arch, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=None, **(model_overrides or {}))
        model = build_tiny_model(config, seed)
    else:
        torch.manual_seed(seed)
        tok, model = load_policy(init)
    opt = torch.optim.AdamW(model.parameters(), lr=hparams.lr, weight_decay=hparams.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / hparams.warmup_steps))
    stream, rng = iter(task), random.Random(seed + 1)
    evalset = task.heldout(hparams.n_eval)
    kept, kept_step, step, history = None, 0, 0, []
    bar = tqdm(total=hparams.max_steps, desc="warm start", disable=not progress)
    for step in range(1, hparams.max_steps + 1):
        model.train()
        examples = [next(stream) for _ in range(hparams.batch_size)]
        batch = encode_pairs(tok, [e.prompt for e in examples],
                             [task.reference_response(e, rng, hparams.demo_accuracy) for e in examples])
        loss = model(**batch, **({"output_router_logits": True} if arch == "moe" else {})).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if step % hparams.eval_every:
            continue
        acc, _ = heldout_accuracy(model, tok, evalset, max_new_tokens=hparams.max_new_tokens)
        history.append([step, round(loss.item(), 4), acc])
        bar.set_postfix(loss=f"{loss.item():.3f}", sampled_acc=f"{acc:.2f}")
        if lo <= acc <= hi:
            kept, kept_step = copy.deepcopy(model.state_dict()), step
        if acc >= stop_at:
            break
    bar.close()
    if kept is not None:
        model.load_state_dict(kept)
        step = kept_step

    final_set = task.heldout(hparams.n_final_eval)
    sampled, tail = heldout_accuracy(model, tok, final_set, max_new_tokens=hparams.max_new_tokens)
    greedy, _ = heldout_accuracy(model, tok, final_set, greedy=True,
                                 max_new_tokens=hparams.max_new_tokens)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=hparams.max_new_tokens,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    record = {"command": command, "arch": arch if init is None else type(model).__name__, "init": init, "seed": seed, "steps": step, "in_band": kept is not None,
              "heldout_sampled_accuracy": sampled, "heldout_greedy_accuracy": greedy,
              "n_heldout": len(final_set), "frac_sampled_tokens_mu_below_0.01": tail,
              "wall_time_s": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__, "cpu": _cpu_name(),
              "task": task.settings, "hparams": asdict(hparams), "history": history}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "warmstart.json").write_text(json.dumps(record, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), for the provenance record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
