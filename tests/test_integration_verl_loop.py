"""verl in the loop: a tiny HF model trained on CPU through verl's own worker, engine and loss.

Everything below verl's Ray layer is verl 0.9.1's code:

- config: Hydra compose of verl's ``ppo_trainer.yaml`` with the overrides printed in
  docs/integrations.md (parsed from the doc: a typo there fails here), turned into verl's
  ``ActorConfig`` by ``omega_conf_to_dataclass`` inside the worker, as ``main_ppo`` does;
- worker: ``ActorRolloutRefWorker(role="actor").init_model()`` (HFModelConfig, TrainingWorker,
  the FSDP2 engine ``FSDPEngineWithLMHead``, verl's AdamW) and its ``compute_log_prob`` /
  ``update_actor`` (mini-batches, micro-batches, ``global_batch_info``, optimizer step);
- driver: ``RayPPOTrainer._compute_old_log_prob`` and ``_update_actor`` (verl's batch preparation:
  ``left_right_2_no_padding``, ``global_batch_size``, ``mini_batch_size``);
- per micro-batch: ``forward_step`` -> ``verl.workers.utils.losses.ppo_loss`` -> our loss.

Swapped for CPU, since verl 0.9.1 has no CPU backend: a CPU platform registered through verl's
platform plug-in API, ``FSDPEngineWithLMHead`` registered for device ``cpu`` (verl registers it for
cuda/npu only), a one-process gloo group instead of Ray, ``strategy=fsdp2`` (FSDP1 refuses CPU
parameters), fp32 mixed precision, eager attention, gradient clipping off (so the optimizer sees
the raw gradient the test compares).
"""
from __future__ import annotations

import importlib.util
import socket
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl")
_missing = [m for m in ("uvicorn", "fastapi", "cachetools") if importlib.util.find_spec(m) is None]
if _missing:  # tests/test_integration_verl_stack.py fails loudly on this; skip here
    pytest.skip(f"verl's worker stack needs {_missing}: pip install -e '.[verl]'", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402

import drpo  # noqa: E402
from drpo.integrations.doctor import compose_verl_config  # noqa: E402
from test_doctor import documented_overrides  # noqa: E402

# The loop's settings that are not in the docs: a tiny local model on CPU, one mini-batch of 4
# sequences per step (rollout.n=1), verl's AdamW with a large lr so that 2 steps move the weights.
CPU_OVERRIDES = [
    "actor_rollout_ref.actor.strategy=fsdp2",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
    "+actor_rollout_ref.model.override_config.attn_implementation=eager",
    "actor_rollout_ref.model.use_remove_padding=True",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.rollout.n=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.actor.optim.lr=1e-2",
    "actor_rollout_ref.actor.optim.clip_grad=1e9",
    "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
]


class _CPUDeviceModule:
    """``torch.cpu`` plus the memory statistics verl logs (zero on CPU)."""

    def get_device_name(self, *args) -> str:
        return "CPU"

    def __getattr__(self, name: str):
        if name == "mem_get_info":
            return lambda *a, **k: (0, 0)
        if "memory" in name:
            return lambda *a, **k: 0
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        return lambda *a, **k: None  # empty_cache, reset_peak_memory_stats, ...


class CPUPlatform(PlatformBase):
    """verl platform for a CPU-only machine (verl 0.9.1 ships cuda, npu and rocm)."""

    device_name = "cpu"
    vendor_name = "cpu"

    @property
    def device_module(self):
        return _CPUDeviceModule()

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


@pytest.fixture
def verl_cpu(monkeypatch):
    """verl on this CPU in one process: CPU platform, CPU FSDP engine, a one-rank gloo group."""
    import verl.models.transformers.monkey_patch as verl_patch
    from verl.plugin.platform import platform_manager
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    monkeypatch.setattr(platform_manager, "_current_platform", CPUPlatform())
    # what EngineRegistry.register(model_type="language_model", backend="fsdp2", device="cpu") does,
    # undone after the test
    monkeypatch.setitem(EngineRegistry._engines["language_model"]["fsdp2"], "cpu", FSDPEngineWithLMHead)
    # make test installs TRL 1.16, which lacks the value-head class verl's model patch imports (the
    # actor needs none); `drpo doctor verl` reports this for real runs (trap trl_breaks_verl_fsdp).
    monkeypatch.setattr(verl_patch, "is_trl_available", lambda: False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def actor_worker(model_dir: str, extra: list[str]):
    """verl's actor worker, built by verl from the documented overrides plus ``extra``."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    overrides = documented_overrides("rollout-anchored") + CPU_OVERRIDES + [
        f"actor_rollout_ref.model.path={model_dir}", *extra]
    cfg = compose_verl_config("main_ppo", overrides)
    worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    return SimpleNamespace(config=cfg, actor_rollout_wg=worker)  # what RayPPOTrainer's methods read


def rollout_batch(vocab: int, seed: int) -> DataProto:
    """4 sequences as verl's rollout returns them: left-padded prompts, right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    P, R = 3, 5
    plen, rlen = torch.tensor([3, 2, 3, 1]), torch.tensor([5, 3, 1, 4])
    pmask = (torch.arange(P)[None] >= (P - plen)[:, None]).long()
    rmask = (torch.arange(R)[None] < rlen[:, None]).long()
    prompts = torch.randint(3, vocab, (4, P), generator=g) * pmask
    responses = torch.randint(3, vocab, (4, R), generator=g) * rmask
    attention_mask = torch.cat([pmask, rmask], 1)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])[:, None] * rmask
    batch = DataProto.from_dict(tensors=dict(
        prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
        attention_mask=attention_mask, position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
        response_mask=rmask, advantages=advantages.float()))
    # set by verl's generation step before these stages
    batch.meta_info.update(temperature=1.0, global_token_num=attention_mask.sum(-1).tolist())
    return batch


def anchor_on_rollout(trainer, batch: DataProto, seed: int) -> None:
    """old_log_probs := rollout log-probs (bypass mode), mu = pi + U(0, 0.4): many tokens lie
    beyond a 0.15 trust region, none beyond 12.5. pi is verl's compute_log_prob of the batch."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    old, _ = RayPPOTrainer._compute_old_log_prob(trainer, batch)
    pi = old.batch["old_log_probs"]
    shift = 0.4 * torch.rand(pi.shape, generator=torch.Generator().manual_seed(seed))
    mu = torch.log((pi.exp() + shift).clamp(max=1.0))
    batch.batch["old_log_probs"] = mu * batch.batch["response_mask"]


def verl_update(trainer, batch: DataProto) -> tuple[dict[str, torch.Tensor], dict]:
    """One verl update step; returns the gradient the optimizer stepped with, and verl's metrics."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    engine = trainer.actor_rollout_wg.actor.engine
    grads: dict[str, torch.Tensor] = {}

    def record(optimizer, args, kwargs):
        for name, p in engine.module.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().clone()

    handle = engine.optimizer.register_step_pre_hook(record)
    try:
        out = RayPPOTrainer._update_actor(trainer, batch)
    finally:
        handle.remove()
    return grads, out.meta_info["metrics"]


def full_weights(trainer) -> dict[str, torch.Tensor]:
    module = trainer.actor_rollout_wg.actor.engine.module
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.named_parameters()}


def reference_step(model_dir: str, weights: dict, batch: DataProto, delta: float, agg: str):
    """The same step without verl: plain HF forward on the padded batch + drpo.policy_loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.load_state_dict(weights, strict=False)
    b = batch.batch
    P, R = b["prompts"].shape[1], b["responses"].shape[1]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   position_ids=b["position_ids"]).logits[:, P - 1:P - 1 + R]
    log_prob = torch.log_softmax(logits.float(), -1).gather(-1, b["responses"][..., None])[..., 0]
    mask = b["response_mask"].bool()
    loss, _ = drpo.policy_loss("drpo", log_prob, b["old_log_probs"], b["advantages"], mask, agg_mode=agg,
                               global_seq_count=mask.shape[0], delta=delta)
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_equal(verl_grads: dict, ref_grads: dict) -> float:
    """Every parameter's gradient equal; returns the largest abs error."""
    assert set(ref_grads) <= set(verl_grads)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    assert scale > 0
    worst = 0.0
    for name, ref in ref_grads.items():
        torch.testing.assert_close(verl_grads[name], ref, rtol=1e-4, atol=1e-5 * scale, msg=name)
        worst = max(worst, float((verl_grads[name] - ref).abs().max()))
    return worst


@pytest.mark.slow
def test_two_verl_steps_follow_drpo_and_delta(verl_cpu, tiny_model_dir):
    """2 verl training steps with delta 12.5 (the documented value) and 1 with delta 0.15: each
    gradient verl steps with equals drpo.policy_loss's on the same batch, and delta changes it."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    grads_by_delta = {}
    for delta, steps in ((12.5, 2), (0.15, 1)):
        extra = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]
        if delta != 12.5:
            extra.append(f"++actor_rollout_ref.actor.policy_loss.drpo_params.delta={delta}")
        trainer = actor_worker(tiny_model_dir, extra)
        for step in range(steps):
            batch = rollout_batch(vocab, seed=step)
            anchor_on_rollout(trainer, batch, seed=step)
            before = full_weights(trainer)
            grads, metrics = verl_update(trainer, batch)
            ref_loss, ref_grads = reference_step(tiny_model_dir, before, batch, delta, "token-mean")
            err = assert_grads_equal(grads, ref_grads)
            after = full_weights(trainer)
            moved = max(float((after[n] - before[n]).abs().max()) for n in before)
            print(f"VERL_LOOP delta={delta} step={step + 1} grad_max_abs_err={err:.2e} "
                  f"pg_loss={metrics['actor/pg_loss'][0]:.6f} ref_loss={ref_loss:.6f} weight_change={moved:.2e}")
            assert moved > 1e-4  # the optimizer stepped
            assert metrics["actor/pg_loss"][0] == pytest.approx(ref_loss, rel=1e-5)  # summed over 2 micro-batches
            assert "actor/drpo/penalty_mean" in metrics and "actor/drpo/loss" not in metrics
            if step == 0:
                grads_by_delta[delta] = grads
    small, big = grads_by_delta[0.15], grads_by_delta[12.5]
    diff = max(float((small[n] - big[n]).abs().max() / big[n].abs().max().clamp(min=1e-12)) for n in big)
    print(f"VERL_LOOP delta 0.15 vs 12.5: max relative gradient difference {diff:.3f}")
    assert diff > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_equal_one_full_batch(verl_cpu, tiny_model_dir, agg):
    """verl's global_batch_info normalisation: 4 micro-batches of 1 sequence and 1 of 4 step with
    the same gradient, the full-batch drpo.policy_loss gradient."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    grads = {}
    for micro in (1, 4):
        trainer = actor_worker(tiny_model_dir, [f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
                                                f"actor_rollout_ref.actor.loss_agg_mode={agg}"])
        batch = rollout_batch(vocab, seed=7)
        anchor_on_rollout(trainer, batch, seed=7)
        before = full_weights(trainer)
        grads[micro], _ = verl_update(trainer, batch)
        _, ref_grads = reference_step(tiny_model_dir, before, batch, 12.5, agg)
        err = assert_grads_equal(grads[micro], ref_grads)
        print(f"VERL_LOOP {agg} micro_batch={micro} grad_max_abs_err={err:.2e}")
    for name in grads[4]:
        torch.testing.assert_close(grads[1][name], grads[4][name], rtol=1e-4, atol=1e-7)
