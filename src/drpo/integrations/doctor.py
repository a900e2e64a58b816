"""``drpo doctor``: catch the verl and TRL set-ups that silently defeat drpo's plug-ins.

    drpo doctor verl [--entry main_ppo|fully_async|one_step_off] [HYDRA_OVERRIDES...]
    drpo doctor trl

``doctor verl`` prints the installed versions and the drpo losses that verl's registry holds in a
*fresh* Python process (what a verl worker sees: verl imports plug-ins itself and logs a failed
import only at DEBUG level), composes the overrides with the entry point's own Hydra config as
``python -m <entry module> OVERRIDES`` does, and checks the result against :data:`VERL_TRAPS`.
``doctor trl`` checks the installed TRL against what :class:`drpo.integrations.trl.DRPOGRPOTrainer`
overrides and reads (:data:`TRL_TRAPS`).

Every trap found prints one line ``TRAP <id>: <reason>``; the exit status is 1 if any fired.
Traps are data, ``Trap(id, applies, message)``: ``applies`` is a pure function of facts gathered
once (:class:`VerlFacts`, :class:`TrlFacts`) and ``message`` a template formatted with them. A fact
that could not be gathered is None (unknown), and no trap fires on an unknown fact: when the
overrides do not compose, the doctor says so and reasons about nothing the configuration would have
said (which trainer, which strategy, ...). The environment's facts come from
:mod:`drpo.integrations.doctor_probe`, run in a fresh process; TRL's from its compiled code (names
and constants its methods use, attributes they set), not its source text.
verl and TRL are imported lazily, inside the commands.
"""
from __future__ import annotations

import dataclasses
import dis
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import typer

from drpo.utils.errors import first_line

# The versions drpo's plug-ins are written and tested against (pyproject.toml's extras pin the same;
# tests/test_doctor.py checks they agree).
SUPPORTED_VERL = "==0.9.1"
SUPPORTED_TRL = ">=1.16.0,<1.17"
# What `pip install -e '.[verl]'` adds to verl 0.9.1 so its trainers can start (verl ships them only
# in its `verl-core` extra): the v1 trainer imports transfer_queue; the workers import uvicorn and
# fastapi (through verl.checkpoint_engine); the trainers import cachetools (rollout router).
VERL_STACK_EXTRAS = ("TransferQueue==0.1.10", "cachetools", "fastapi", "uvicorn")
FSDP_STRATEGIES = ("fsdp", "fsdp2")


@dataclass(frozen=True)
class Trap:
    """A known way a configuration defeats drpo: ``applies(facts)`` decides, ``message`` explains."""

    id: str
    applies: Callable[[Any], bool]
    message: str

    def reason(self, facts: Any) -> str:
        """The one-line reason, ``message`` formatted with the facts' fields."""
        return self.message.format(**dataclasses.asdict(facts))


def fired(traps: Sequence[Trap], facts: Any) -> list[tuple[str, str]]:
    """(id, one-line reason) of every trap in ``traps`` that applies to ``facts``, in order."""
    return [(t.id, t.reason(facts)) for t in traps if t.applies(facts)]


# --------------------------------------------------------------------------------------------
# verl
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A verl entry point: ``python -m <module>``, its Hydra config, the modules its trainer imports."""

    module: str
    config_dir: str  # relative to the verl package
    config_name: str
    compose_overrides: tuple[str, ...] = ()  # needed to compose from a pip-installed verl


# one_step_off's yaml searches `file://verl/trainer/config`, a path relative to the working
# directory that exists only in a verl source checkout; its runs need the same override.
ENTRIES = {
    "main_ppo": Entry("verl.trainer.main_ppo", "trainer/config", "ppo_trainer"),
    "fully_async": Entry("verl.experimental.fully_async_policy.fully_async_main",
                         "experimental/fully_async_policy/config", "fully_async_ppo_trainer"),
    "one_step_off": Entry("verl.experimental.one_step_off_policy.main_ppo",
                          "experimental/one_step_off_policy/config", "one_step_off_ppo_trainer",
                          compose_overrides=("hydra.searchpath=[pkg://verl.trainer.config]",)),
}

# The trainer each entry runs ("v1" or "legacy" for main_ppo, by trainer.use_v1), a label for
# messages, and the modules it imports when it starts (inside its Ray task runner).
TRAINER_LABELS = {
    "v1": "verl's v1 trainer (trainer.use_v1=True)",
    "legacy": "verl's legacy trainer (trainer.use_v1=False)",
    "fully_async": "verl's fully-async trainer",
    "one_step_off": "verl's one-step-off-policy trainer",
}
TRAINER_IMPORTS = {
    "v1": ("transfer_queue", "verl.trainer.ppo.v1", "verl.workers.engine_workers"),
    "legacy": ("verl.trainer.main_ppo_v0", "verl.workers.engine_workers"),
    "fully_async": ("verl.experimental.fully_async_policy.fully_async_main", "verl.workers.engine_workers"),
    "one_step_off": ("verl.experimental.one_step_off_policy.main_ppo", "verl.workers.engine_workers"),
}
# Trainers whose driver calls verl's apply_bypass_mode (the v1 trainer copies the rollout
# log-probs into old_log_probs and leaves loss_mode alone).
APPLY_BYPASS_TRAINERS = ("legacy", "fully_async", "one_step_off")


def trainer_of(entry: str, use_v1: bool) -> str:
    """The trainer ``python -m ENTRIES[entry].module`` runs."""
    if entry == "main_ppo":
        return "v1" if use_v1 else "legacy"
    return entry


@dataclass(frozen=True)
class VerlEnv:
    """What a fresh Python process in this environment sees (:mod:`drpo.integrations.doctor_probe`); None: unknown
    (or, for ``plugin_error`` and ``import_error``, none)."""

    verl_version: Optional[str] = None
    registered: Optional[list] = None  # drpo loss names in verl's registry
    plugin_error: Optional[str] = None  # why they are missing, None if registered
    transfer_queue: Optional[bool] = None
    import_error: Optional[str] = None  # first trainer import that fails
    trl_version: Optional[str] = None
    trl_value_head: Optional[bool] = None  # False: TRL present without the class verl's FSDP engine imports


@dataclass(frozen=True)
class VerlFacts(VerlEnv):
    """Environment plus the composed configuration; the configuration's facts are None (unknown) when the overrides
    did not compose."""

    entry: str = "main_ppo"
    config_name: str = "ppo_trainer"
    trainer: Optional[str] = None
    trainer_label: Optional[str] = None
    compose_error: Optional[str] = None
    actor_config_error: Optional[str] = None
    loss_mode: Optional[str] = None
    objective: Optional[str] = None  # the drpo objective behind loss_mode, None if not a drpo loss (or unknown)
    drpo_params: dict = field(default_factory=dict)
    known_params: list = field(default_factory=list)
    unknown_params: list = field(default_factory=list)
    clip_ratio_overrides: list = field(default_factory=list)
    bypass_mode: Optional[bool] = None
    rollout_correction: list = field(default_factory=list)  # rollout_is / rollout_rs settings in use
    calculate_log_probs: Optional[bool] = None
    strategy: Optional[str] = None


VERL_TRAPS: list[Trap] = [
    Trap("plugin_not_loaded", lambda f: f.plugin_error is not None,
         "verl does not register drpo's losses in a fresh process ({plugin_error}); verl logs a failed "
         "plug-in import only at DEBUG level, so a drpo loss_mode fails later, inside the workers"),
    Trap("overrides_do_not_compose", lambda f: f.compose_error is not None,
         "the overrides do not compose with verl's {config_name} config: {compose_error}"),
    Trap("actor_config_invalid", lambda f: f.actor_config_error is not None,
         "verl cannot build the actor config from these overrides: {actor_config_error}"),
    Trap("v1_needs_transfer_queue", lambda f: f.trainer == "v1" and f.transfer_queue is False,
         "trainer.use_v1=True (verl's default) imports transfer_queue, which a plain verl==0.9.1 install "
         "lacks: pip install -e '.[verl]' (adds TransferQueue==0.1.10), or set trainer.use_v1=False"),
    Trap("trainer_cannot_import",
         lambda f: f.import_error is not None and not (f.trainer == "v1" and f.transfer_queue is False),
         "{trainer_label} cannot start here: {import_error}; pip install -e '.[verl]' adds what a plain "
         "verl==0.9.1 install leaves out"),
    Trap("trl_breaks_verl_fsdp", lambda f: f.trl_value_head is False and f.strategy in FSDP_STRATEGIES,
         "TRL {trl_version} is installed next to verl: verl's FSDP engine imports "
         "AutoModelForCausalLMWithValueHead from trl, which this TRL lacks, so building the actor fails; "
         "run verl in an environment without drpo[trl]"),
    Trap("bypass_rewrites_loss",
         lambda f: f.objective is not None and f.bypass_mode is True and f.trainer in APPLY_BYPASS_TRAINERS,
         "algorithm.rollout_correction.bypass_mode=True with {trainer_label}: verl's apply_bypass_mode "
         "swaps loss_mode={loss_mode} for its own 'bypass_mode' loss in the driver's config (verl 0.9.1's "
         "Ray workers happen to keep {loss_mode}, so the loss that runs hinges on verl internals); use the "
         "v1 trainer (python -m verl.trainer.main_ppo trainer.use_v1=True) or bypass_mode=False with "
         "algorithm.rollout_correction.rollout_is=token"),
    Trap("bypass_ignores_rollout_correction",
         lambda f: f.objective is not None and f.bypass_mode is True and bool(f.rollout_correction),
         "{rollout_correction} with bypass_mode=True: verl computes rollout-correction weights only when "
         "bypass_mode=False (or inside its own bypass_mode loss), so {loss_mode} gets none; drop them "
         "(bypass already anchors on the rollout log-probs) or set bypass_mode=False"),
    Trap("rollout_correction_without_log_probs",
         lambda f: bool(f.rollout_correction) and f.bypass_mode is False and f.calculate_log_probs is False,
         "{rollout_correction} needs the rollout's log-probs, but actor_rollout_ref.rollout."
         "calculate_log_probs=False: verl then skips rollout correction without a warning"),
    Trap("clip_ratio_ignored", lambda f: f.objective is not None and bool(f.clip_ratio_overrides),
         "{clip_ratio_overrides} set, but drpo loss {loss_mode} ignores verl's clip_ratio*: set the "
         "objective's parameters as +actor_rollout_ref.actor.policy_loss.drpo_params.<name>=... "
         "(objective {objective!r} has {known_params})"),
    Trap("unknown_drpo_param", lambda f: f.objective is not None and bool(f.unknown_params),
         "drpo_params {unknown_params} are not parameters of objective {objective!r} (it has "
         "{known_params}); its first actor update would fail"),
]


PROBE = Path(__file__).with_name("doctor_probe.py")
# runs the probe by path (no import of drpo before verl's registry is read), as the script it is
RUN_BY_PATH = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def probe_verl_env(modules: Sequence[str], timeout: float = 300.0) -> VerlEnv:
    """The environment's facts, from :mod:`drpo.integrations.doctor_probe` in a fresh interpreter of this environment
    (``modules``: the trainer's imports to try)."""
    proc = subprocess.run([sys.executable, "-c", RUN_BY_PATH, str(PROBE), *modules], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")), None)
    if line is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return VerlEnv(plugin_error=f"a fresh `import verl` fails: {last}")
    return VerlEnv(**json.loads(line[len("PROBE"):]))


def compose_verl_config(entry: str, overrides: Sequence[str]):
    """verl's config for ``python -m ENTRIES[entry].module OVERRIDES`` (Hydra compose of its yaml)."""
    from hydra import compose, initialize_config_dir
    import verl

    spec = ENTRIES[entry]
    config_dir = os.path.join(os.path.dirname(verl.__file__), spec.config_dir)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name=spec.config_name, overrides=[*spec.compose_overrides, *overrides])


def override_key(override: str) -> str:
    """``+a.b.c=1`` -> ``a.b.c`` (Hydra's +, ++ and ~ prefixes dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def clip_ratio_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that set one of the actor's ``clip_ratio*`` options."""
    return [o for o in overrides
            if override_key(o).startswith("actor_rollout_ref.actor.")
            and override_key(o).rsplit(".", 1)[-1].startswith("clip_ratio")]


def _typed_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    return f"{type(error).__name__}: {first_line(error)}"


def config_facts(cfg: Any, entry: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The configuration half of :class:`VerlFacts` from a composed verl config."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from drpo.integrations.verl import objective_for_loss_mode
    from drpo.objectives import get_objective

    actor = cfg.actor_rollout_ref.actor
    rc = cfg.algorithm.get("rollout_correction", None) or {}
    loss_mode = str(actor.policy_loss.get("loss_mode", "vanilla"))
    objective = objective_for_loss_mode(loss_mode)
    params = OmegaConf.to_container(actor.policy_loss.get("drpo_params", None) or {}, resolve=True)
    known = sorted(get_objective(objective).param_defaults) if objective else []
    try:
        omega_conf_to_dataclass(actor)
        actor_error = None
    except Exception as e:  # verl raises assertion, type and instantiation errors alike
        actor_error = _typed_line(e.__cause__ or e)
    trainer = trainer_of(entry, bool(cfg.trainer.get("use_v1", False)))
    return dict(
        entry=entry, config_name=ENTRIES[entry].config_name, trainer=trainer, trainer_label=TRAINER_LABELS[trainer],
        actor_config_error=actor_error, loss_mode=loss_mode, objective=objective, drpo_params=dict(params),
        known_params=known, unknown_params=sorted(set(params) - set(known)) if objective else [],
        clip_ratio_overrides=clip_ratio_overrides(overrides), bypass_mode=bool(rc.get("bypass_mode", False)),
        rollout_correction=[f"algorithm.rollout_correction.{k}={rc.get(k)}" for k in ("rollout_is", "rollout_rs")
                            if rc.get(k, None) is not None],
        calculate_log_probs=bool(cfg.actor_rollout_ref.rollout.get("calculate_log_probs", False)),
        strategy=str(actor.get("strategy", "fsdp")),
    )


def verl_facts(entry: str, overrides: Sequence[str], env: Optional[VerlEnv] = None) -> VerlFacts:
    """Compose ``overrides`` for ``entry`` and gather every fact the traps read.

    ``env`` defaults to :func:`probe_verl_env` for the modules the entry's trainer imports.
    """
    if entry not in ENTRIES:
        raise ValueError(f"unknown verl entry {entry!r}; known: {sorted(ENTRIES)}")
    try:
        cfg = compose_verl_config(entry, overrides)
    except Exception as e:  # noqa: BLE001 -- Hydra and OmegaConf raise many types; each is the user's overrides
        env = env or probe_verl_env([])  # which trainer would run is unknown: none of its imports is tried
        return VerlFacts(**dataclasses.asdict(env), entry=entry, config_name=ENTRIES[entry].config_name,
                         clip_ratio_overrides=clip_ratio_overrides(overrides), compose_error=_typed_line(e))
    conf = config_facts(cfg, entry, overrides)
    env = env or probe_verl_env(TRAINER_IMPORTS[conf["trainer"]])
    return VerlFacts(**dataclasses.asdict(env), **conf)


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrlFacts:
    """What DRPOGRPOTrainer relies on, read from the installed TRL."""

    trl_version: str = ""
    supported: str = SUPPORTED_TRL
    version_ok: bool = True
    compute_loss_params: list = field(default_factory=list)
    dispatches_to_compute_loss: bool = True  # GRPOTrainer.compute_loss calls self._compute_loss
    logps_params_missing: list = field(default_factory=list)
    inputs_not_produced: list = field(default_factory=list)  # keys we read that TRL no longer builds
    attributes_missing: list = field(default_factory=list)


EXPECTED_COMPUTE_LOSS_PARAMS = ["self", "model", "inputs"]

TRL_TRAPS: list[Trap] = [
    Trap("trl_version", lambda f: not f.version_ok,
         "TRL {trl_version} is outside the range DRPOGRPOTrainer is tested with ({supported})"),
    Trap("compute_loss_signature", lambda f: f.compute_loss_params != EXPECTED_COMPUTE_LOSS_PARAMS,
         "GRPOTrainer._compute_loss{compute_loss_params} is no longer (self, model, inputs): "
         "DRPOGRPOTrainer's override no longer matches"),
    Trap("compute_loss_not_called", lambda f: not f.dispatches_to_compute_loss,
         "GRPOTrainer.compute_loss no longer calls self._compute_loss: the drpo loss would be skipped"),
    Trap("logps_signature", lambda f: bool(f.logps_params_missing),
         "GRPOTrainer._get_per_token_logps_and_entropies lacks {logps_params_missing}"),
    Trap("inputs_changed", lambda f: bool(f.inputs_not_produced),
         "GRPOTrainer._generate_and_score_completions no longer builds {inputs_not_produced}, "
         "which DRPOGRPOTrainer._compute_loss reads"),
    Trap("attributes_changed", lambda f: bool(f.attributes_missing),
         "GRPOTrainer no longer sets {attributes_missing}, which DRPOGRPOTrainer reads"),
]


def _codes(fn: Callable) -> Iterator[types.CodeType]:
    """The compiled code of ``fn`` (past its decorators) and of every function defined inside it."""
    stack = [inspect.unwrap(fn).__code__]
    while stack:
        code = stack.pop()
        yield code
        stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]


def names_used(fn: Callable) -> set[str]:
    """The global and attribute names ``fn``'s code refers to (``self._compute_loss(...)``: ``_compute_loss``)."""
    return {name for code in _codes(fn) for name in code.co_names}


def strings_in(fn: Callable) -> set[str]:
    """The string constants of ``fn``'s code (a dict literal's keys among them)."""
    out: set[str] = set()
    for code in _codes(fn):
        todo = list(code.co_consts)
        while todo:
            c = todo.pop()
            if isinstance(c, str):
                out.add(c)
            elif isinstance(c, (tuple, frozenset)):
                todo += list(c)
    return out


def attributes_set(cls: type) -> set[str]:
    """The attributes the methods of ``cls`` and of its bases from the same package assign (``self.x = ...``)."""
    package = cls.__module__.split(".")[0]
    methods = [f for klass in cls.__mro__ if klass.__module__.split(".")[0] == package
               for f in vars(klass).values() if inspect.isfunction(f)]
    return {ins.argval for f in methods for code in _codes(f) for ins in dis.get_instructions(code)
            if ins.opname == "STORE_ATTR"}


def trl_facts() -> TrlFacts:
    """Inspect the installed TRL's GRPOTrainer against :mod:`drpo.integrations.trl`'s contract, from its compiled
    code (what its methods call, the keys they build, the attributes they set)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    from trl import GRPOTrainer

    from drpo.integrations import trl as ours

    version = importlib.metadata.version("trl")
    logps = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    produced = strings_in(GRPOTrainer._generate_and_score_completions)
    assigned = attributes_set(GRPOTrainer)
    return TrlFacts(
        trl_version=version,
        version_ok=Version(version) in SpecifierSet(SUPPORTED_TRL),
        compute_loss_params=list(inspect.signature(GRPOTrainer._compute_loss).parameters),
        dispatches_to_compute_loss="_compute_loss" in names_used(GRPOTrainer.compute_loss),
        logps_params_missing=[p for p in ours.LOGPS_PARAMS if p not in logps],
        inputs_not_produced=[k for k in ours.INPUT_KEYS + ours.OPTIONAL_INPUT_KEYS if k not in produced],
        attributes_missing=[a for a in ours.TRAINER_ATTRIBUTES if a not in assigned],
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

app = typer.Typer(help="Check a verl or TRL set-up for configurations that silently defeat drpo's plug-ins.",
                  no_args_is_help=True, add_completion=False)


def _versions(names: Sequence[str]) -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{n} {version(n)}" for n in names)


def _report(traps: list[tuple[str, str]]) -> None:
    for trap_id, reason in traps:
        typer.echo(f"TRAP {trap_id}: {reason}")
    if traps:
        typer.echo(f"{len(traps)} trap(s) found")
        raise typer.Exit(code=1)
    typer.echo("OK: no known trap")


@app.command("verl")
def doctor_verl(
    overrides: Optional[list[str]] = typer.Argument(None, help="Hydra overrides, as given to verl"),
    entry: str = typer.Option("main_ppo", help=f"verl entry point: {', '.join(ENTRIES)}"),
) -> None:
    """Versions, drpo losses registered in verl, and known traps in OVERRIDES."""
    if entry not in ENTRIES:
        raise typer.BadParameter(f"unknown entry {entry!r}; known: {', '.join(ENTRIES)}", param_hint="--entry")
    overrides = list(overrides or [])
    facts = verl_facts(entry, overrides)
    typer.echo(_versions(["drpo", "verl", "torch", "transformers", "ray", "TransferQueue", "vllm", "trl"]))
    typer.echo(f"drpo losses registered in verl (fresh process): {', '.join(facts.registered or []) or 'none'}")
    typer.echo(f"entry: python -m {ENTRIES[entry].module} -> "
               f"{facts.trainer_label or 'unknown (the overrides do not compose)'}")
    if facts.compose_error is None:
        objective = f"drpo objective {facts.objective!r}, drpo_params {facts.drpo_params}" if facts.objective \
            else "not a drpo loss: drpo's config checks skipped"
        typer.echo(f"loss_mode={facts.loss_mode}: {objective}")
    _report(fired(VERL_TRAPS, facts))


@app.command("trl")
def doctor_trl() -> None:
    """TRL version and the GRPOTrainer internals DRPOGRPOTrainer overrides and reads."""
    facts = trl_facts()
    typer.echo(_versions(["drpo", "trl", "transformers", "torch", "accelerate"]) + f" (supported trl{SUPPORTED_TRL})")
    _report(fired(TRL_TRAPS, facts))
