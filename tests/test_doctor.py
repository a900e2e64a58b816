"""``drpo doctor``: every trap fires alone on the facts that define it, the verl CLI finds the
documented traps in real Hydra overrides composed with verl's own configs, and the pinned versions
agree with pyproject.toml's extras."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drpo.integrations import doctor
from drpo.integrations.doctor import (
    SUPPORTED_TRL, SUPPORTED_VERL, TRL_TRAPS, VERL_STACK_EXTRAS, VERL_TRAPS, TrlFacts, VerlEnv, VerlFacts, app,
    clip_ratio_overrides, fired,
)

REPO = Path(__file__).resolve().parents[1]
DRPO_PARAMS = ["adv_weighting", "delta", "divergence", "mask_only", "penalty_coef", "ratio_penalty"]


def documented_overrides(name: str) -> list[str]:
    """Override lines of the fenced block that follows ``<!-- drpo-overrides: NAME ...-->`` in
    docs/integrations.md (comment lines dropped)."""
    text = (REPO / "docs" / "integrations.md").read_text()
    match = re.search(rf"<!-- drpo-overrides: {re.escape(name)}\b.*?-->\s*```[^\n]*\n(.*?)```", text, re.S)
    assert match, f"docs/integrations.md has no block marked <!-- drpo-overrides: {name} -->"
    return [ln.strip() for ln in match.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]


# ------------------------------------------------------------------ traps as data, one at a time

CLEAN_VERL = VerlFacts(verl_version="0.9.1", registered=["drpo"], transfer_queue=True, trl_value_head=True,
                       trainer="v1", trainer_label=doctor.TRAINER_LABELS["v1"], loss_mode="drpo", objective="drpo",
                       drpo_params={"delta": 12.5}, known_params=DRPO_PARAMS, bypass_mode=False,
                       calculate_log_probs=True, strategy="fsdp")
VERL_CASES = {
    "plugin_not_loaded": dict(plugin_error="no 'drpo' entry point"),
    "overrides_do_not_compose": dict(compose_error="ConfigCompositionException: ..."),
    "actor_config_invalid": dict(actor_config_error="AssertionError: ..."),
    "v1_needs_transfer_queue": dict(transfer_queue=False, import_error="import transfer_queue raises ..."),
    "trainer_cannot_import": dict(import_error="import verl.workers.engine_workers raises ..."),
    "trl_breaks_verl_fsdp": dict(trl_value_head=False, trl_version="1.16.0"),
    "bypass_rewrites_loss": dict(bypass_mode=True, trainer="legacy"),
    "bypass_ignores_rollout_correction": dict(bypass_mode=True, rollout_correction=["...rollout_is=token"]),
    "rollout_correction_without_log_probs": dict(rollout_correction=["...rollout_is=token"],
                                                 calculate_log_probs=False),
    "clip_ratio_ignored": dict(clip_ratio_overrides=["actor_rollout_ref.actor.clip_ratio_high=0.28"]),
    "unknown_drpo_param": dict(unknown_params=["epsilon"]),
}
CLEAN_TRL = TrlFacts(trl_version="1.16.0", compute_loss_params=["self", "model", "inputs"])
TRL_CASES = {
    "trl_version": dict(trl_version="1.17.0", version_ok=False),
    "compute_loss_signature": dict(compute_loss_params=["self", "model", "inputs", "extra"]),
    "compute_loss_not_called": dict(dispatches_to_compute_loss=False),
    "logps_signature": dict(logps_params_missing=["logits_to_keep"]),
    "inputs_changed": dict(inputs_not_produced=["old_per_token_logps"]),
    "attributes_changed": dict(attributes_missing=["beta"]),
}


@pytest.mark.parametrize("traps, clean, cases", [(VERL_TRAPS, CLEAN_VERL, VERL_CASES),
                                                 (TRL_TRAPS, CLEAN_TRL, TRL_CASES)], ids=["verl", "trl"])
def test_each_trap_fires_alone(traps, clean, cases):
    assert fired(traps, clean) == []
    assert sorted(cases) == sorted(t.id for t in traps)  # every trap has a case
    for trap_id, change in cases.items():
        hits = fired(traps, dataclasses.replace(clean, **change))
        assert [h[0] for h in hits] == [trap_id], (trap_id, hits)
        assert "\n" not in hits[0][1] and "{" not in hits[0][1]  # one formatted line


def test_no_trap_fires_on_an_unknown_fact():
    """Overrides that do not compose leave the configuration's facts unknown (None): only that trap fires, however
    the environment looks (before, the doctor assumed the v1 trainer and FSDP and reported traps of them)."""
    env = VerlEnv(verl_version="0.9.1", registered=["drpo"], transfer_queue=False, trl_version="1.16.0",
                  trl_value_head=False)
    facts = VerlFacts(**dataclasses.asdict(env), compose_error="ConfigCompositionException: ...",
                      clip_ratio_overrides=["actor_rollout_ref.actor.clip_ratio=0.3"])
    assert [t for t, _ in fired(VERL_TRAPS, facts)] == ["overrides_do_not_compose"]
    assert fired(VERL_TRAPS, VerlFacts()) == []  # nothing known: nothing said
    assert [t for t, _ in fired(VERL_TRAPS, dataclasses.replace(facts, compose_error=None, trainer="v1",
                                                                strategy="fsdp"))] == \
        ["v1_needs_transfer_queue", "trl_breaks_verl_fsdp"]  # the same environment, once the facts are known


def test_trl_facts_come_from_compiled_code_not_source_text():
    """What a method calls, the string keys it builds and the attributes methods assign, read from code objects
    (a comment or a docstring mentioning them does not count; the source file need not exist)."""
    class Base:
        def __init__(self):
            self.beta = 0.0

    class Trainer(Base):
        def compute_loss(self, model, inputs):
            """Mentions self._compute_loss( and self.gamma = in its docstring."""
            # self._compute_loss(model, inputs)
            return self._other(model, inputs)

        def produce(self):
            def inner():
                return {"advantages": 1, "prompt_ids": 2}
            return inner()

    assert "_compute_loss" not in doctor.names_used(Trainer.compute_loss)
    assert "_other" in doctor.names_used(Trainer.compute_loss)
    assert {"advantages", "prompt_ids"} <= doctor.strings_in(Trainer.produce)
    assert "beta" in doctor.attributes_set(Trainer) and "gamma" not in doctor.attributes_set(Trainer)


def test_drpo_traps_need_a_drpo_loss():
    """verl's own losses read clip_ratio* and take bypass mode's loss swap as intended."""
    facts = dataclasses.replace(CLEAN_VERL, loss_mode="vanilla", objective=None, bypass_mode=True, trainer="legacy",
                                clip_ratio_overrides=["actor_rollout_ref.actor.clip_ratio=0.3"])
    assert fired(VERL_TRAPS, facts) == []


def test_clip_ratio_overrides():
    given = ["+actor_rollout_ref.actor.clip_ratio_c=3", "actor_rollout_ref.actor.clip_ratio=0.2",
             "actor_rollout_ref.actor.policy_loss.loss_mode=drpo", "critic.clip_ratio=0.2",
             "++actor_rollout_ref.actor.clip_ratio_high=0.3"]
    assert clip_ratio_overrides(given) == [given[0], given[1], given[4]]


def test_pins_agree_with_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    verl = {Requirement(r).name: Requirement(r) for r in extras["verl"]}
    trl = Requirement(extras["trl"][0])
    assert str(verl["verl"].specifier) == str(Requirement("verl" + SUPPORTED_VERL).specifier)
    assert trl.specifier == Requirement("trl" + SUPPORTED_TRL).specifier
    assert {Requirement(r).name for r in VERL_STACK_EXTRAS} <= set(verl)


# ------------------------------------------------------------------ the verl CLI on real overrides


def _no_env_trouble(monkeypatch) -> None:
    """Pretend the environment is complete, so only configuration traps can fire."""
    env = VerlEnv(verl_version="0.9.1", registered=["drpo"], transfer_queue=True)
    monkeypatch.setattr(doctor, "probe_verl_env", lambda modules, timeout=300.0: env)


def doctor_verl(*args: str):
    return CliRunner().invoke(app, ["verl", *args])


BATCH = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]  # verl's ActorConfig needs one


@pytest.mark.parametrize("entry, extra, trap", [
    ("main_ppo", ["trainer.use_v1=False"], "bypass_rewrites_loss"),
    ("fully_async", [], "bypass_rewrites_loss"),  # its yaml sets bypass_mode=True
    ("one_step_off", [], "bypass_rewrites_loss"),  # so does this one's
    ("main_ppo", ["++actor_rollout_ref.actor.clip_ratio_c=10"], "clip_ratio_ignored"),
    ("main_ppo", ["actor_rollout_ref.actor.clip_ratio_high=0.28"], "clip_ratio_ignored"),
    ("main_ppo", ["+actor_rollout_ref.actor.policy_loss.drpo_params.epsilon=0.2"], "unknown_drpo_param"),
    ("main_ppo", ["algorithm.rollout_correction.rollout_is=token"], "bypass_ignores_rollout_correction"),
    ("main_ppo", ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null"], "actor_config_invalid"),
    ("main_ppo", ["actor_rollout_ref.actor.no_such_key=1"], "overrides_do_not_compose"),
])
def test_doctor_verl_finds_the_trap(monkeypatch, entry, extra, trap):
    pytest.importorskip("verl")
    _no_env_trouble(monkeypatch)
    result = doctor_verl("--entry", entry, *documented_overrides("rollout-anchored"), *BATCH, *extra)
    traps = re.findall(r"^TRAP (\w+): ", result.output, re.M)
    assert result.exit_code == 1 and traps == [trap], result.output


def test_doctor_verl_passes_the_documented_overrides(monkeypatch):
    pytest.importorskip("verl")
    _no_env_trouble(monkeypatch)
    result = doctor_verl(*documented_overrides("rollout-anchored"), *BATCH)
    assert result.exit_code == 0, result.output
    assert "loss_mode=drpo: drpo objective 'drpo', drpo_params {'delta': 12.5}" in result.output
    assert result.output.rstrip().endswith("OK: no known trap")


def test_v1_without_transfer_queue(monkeypatch):
    pytest.importorskip("verl")
    def probe(modules, timeout=300.0):
        missing = "import transfer_queue raises ModuleNotFoundError: No module named 'transfer_queue'"
        return VerlEnv(verl_version="0.9.1", registered=["drpo"], transfer_queue=False,
                       import_error=missing if "transfer_queue" in modules else None)

    monkeypatch.setattr(doctor, "probe_verl_env", probe)
    result = doctor_verl(*documented_overrides("rollout-anchored"), *BATCH)
    assert re.findall(r"^TRAP (\w+): ", result.output, re.M) == ["v1_needs_transfer_queue"], result.output
    # the legacy trainer does not import it
    result = doctor_verl(*documented_overrides("rollout-anchored"), *BATCH, "trainer.use_v1=False",
                         "algorithm.rollout_correction.bypass_mode=False")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_probe_sees_what_a_fresh_verl_process_sees():
    """The real probe (a subprocess): drpo's losses registered by verl's plug-in loader, a failing
    trainer import reported, and the losses missing when VERL_USE_EXTERNAL_PLUGINS turns the
    loader off."""
    pytest.importorskip("verl")
    import importlib.util

    env = doctor.probe_verl_env(["json", "drpo_no_such_module"])
    assert env.plugin_error is None and {"drpo", "drpo_ppo", "spo"} <= set(env.registered)
    assert env.import_error == ("import drpo_no_such_module raises ModuleNotFoundError: "
                                "No module named 'drpo_no_such_module'")
    assert env.transfer_queue == (importlib.util.find_spec("transfer_queue") is not None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VERL_USE_EXTERNAL_PLUGINS", "none")
        off = doctor.probe_verl_env(["json"])
    assert off.registered == [] and "VERL_USE_EXTERNAL_PLUGINS='none' excludes" in off.plugin_error
    facts = dataclasses.replace(CLEAN_VERL, plugin_error=off.plugin_error)
    assert [t for t, _ in fired(VERL_TRAPS, facts)] == ["plugin_not_loaded"]


@pytest.mark.slow
def test_probe_reports_a_plugin_that_fails_to_import(tmp_path, monkeypatch):
    """The silent fallback: verl swallows the plug-in's ImportError (DEBUG log); the probe names it."""
    pytest.importorskip("verl")
    from importlib.metadata import entry_points

    if not [ep for ep in entry_points(group="verl.plugins") if ep.name == "drpo"]:
        pytest.skip("drpo is not pip-installed here: no verl.plugins entry point to break")
    (tmp_path / "drpo").mkdir()
    (tmp_path / "drpo" / "__init__.py").write_text("raise ImportError('drpo is broken here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # shadows the real drpo in the fresh process
    env = doctor.probe_verl_env([])
    assert env.registered == []
    assert env.plugin_error == "loading the 'drpo' plug-in raises ImportError: drpo is broken here"


@pytest.mark.slow
def test_doctor_verl_real_environment():
    """No monkeypatching: versions, the registered names, and only environment traps (if any)
    for the documented overrides."""
    pytest.importorskip("verl")
    result = doctor_verl(*documented_overrides("rollout-anchored"), *BATCH)
    print(result.output)
    assert re.search(r"^drpo .*verl 0\.9\.1", result.output, re.M)
    assert "drpo losses registered in verl (fresh process): drpo, drpo_cispo," in result.output
    env_traps = {"plugin_not_loaded", "v1_needs_transfer_queue", "trainer_cannot_import", "trl_breaks_verl_fsdp"}
    traps = set(re.findall(r"^TRAP (\w+): ", result.output, re.M))
    assert traps <= env_traps and result.exit_code == (1 if traps else 0)


@pytest.mark.slow
def test_doctor_is_a_lazy_typer_sub_app():
    """cli.py mounts it with app.add_typer(doctor_app, name="doctor"): importing it loads neither
    verl nor TRL."""
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "verl" in result.output and "trl" in result.output
    code = "import sys, drpo.integrations.doctor; print(sorted({'verl', 'trl', 'hydra'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
