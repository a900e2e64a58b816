"""Keys added to the configuration after runs were made without them (drpo.training.config.LEGACY_DEFAULTS): a run
saved before a key existed resumes with the value that computes as it did, and only with that value."""
from __future__ import annotations

import pytest
import yaml

from drpo.training.config import LEGACY_DEFAULTS, RunConfig, load_config
from drpo.training.resume import ResumeRefused, check_resume_config


def _saved_before_the_keys() -> dict:
    data = RunConfig().model_dump(mode="json")
    for key in LEGACY_DEFAULTS:
        section, name = key.split(".")
        del data[section][name]
    return data


def test_the_legacy_values_are_the_old_behaviour_and_the_defaults_are_not():
    cfg = RunConfig()
    assert LEGACY_DEFAULTS == {"train.share_prompts": False, "train.fused_optimizer": False}
    assert cfg.train.share_prompts and cfg.train.fused_optimizer  # new runs: on


def test_a_run_saved_before_the_keys_resumes_with_their_legacy_values_only():
    saved = _saved_before_the_keys()
    legacy = load_config(None, ["train.share_prompts=false", "train.fused_optimizer=false"]).model_dump(mode="json")
    check_resume_config(saved, legacy, resumed_step=10)  # the same computation: allowed
    with pytest.raises(ResumeRefused, match=r"train.share_prompts: False -> True"):
        check_resume_config(saved, RunConfig().model_dump(mode="json"), resumed_step=10)


def test_a_saved_config_file_without_the_keys_loads_with_their_legacy_values(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_saved_before_the_keys()))
    resumed = load_config(path, [], saved_run=True)
    assert not resumed.train.share_prompts and not resumed.train.fused_optimizer
    fresh = load_config(path, [])  # the same file as a config for a new run: today's defaults
    assert fresh.train.share_prompts and fresh.train.fused_optimizer


def test_a_grid_run_saved_before_the_keys_is_the_grids_run(tmp_path):
    """drpo compare's plan: a run made before the keys existed (its config.yaml lacks them) is the run the named
    grid asks for (the grids pin their legacy values); the same folder holding the new defaults is another run."""
    from drpo.experiments.grids import build_grid
    from drpo.experiments.runner import plan, run_config
    from drpo.training import run_io
    from drpo.utils.errors import InputError

    run = build_grid("quick").runs[0]
    run_dir = tmp_path / run.slug
    run_dir.mkdir(parents=True)
    data = run_config(run, tmp_path).model_dump(mode="json")
    for key in LEGACY_DEFAULTS:
        section, name = key.split(".")
        del data[section][name]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data))
    run_io.write_status(run_dir, "finished", step=12)
    assert plan(run, tmp_path) == "skip"
    for key in LEGACY_DEFAULTS:
        section, name = key.split(".")
        data[section][name] = True
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="another configuration"):
        plan(run, tmp_path)
