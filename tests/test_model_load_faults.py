"""A model folder whose files are damaged, or whose config.json does not describe its weights, is
one ModelLoadError line naming the file and what does not match -- never a traceback, and never a
model with silently re-initialised weights (transformers only warns about missing/unexpected keys)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from drpo.models.loading import ModelLoadError, load_policy


@pytest.fixture
def load_reports():
    """The LOAD REPORT tables transformers logs (its logger does not propagate to pytest's caplog)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "LOAD REPORT" in record.getMessage():
                seen.append(record.getMessage())

    log, handler = logging.getLogger("transformers.modeling_utils"), Keep()
    log.addHandler(handler)
    yield seen
    log.removeHandler(handler)


def _copy(src: str, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        if "num_hidden_layers" in config_changes and "layer_types" in cfg:
            cfg["layer_types"] = [cfg["layer_types"][0]] * config_changes["num_hidden_layers"]
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _fails(folder: Path, pattern: str) -> str:
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_policy(str(folder))
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


def test_a_truncated_weight_file(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    _fails(folder, rf"^model.safetensors in {folder} is truncated or corrupt \(.*\); copy or save it again$")
    weights.write_bytes(b"")
    _fails(folder, rf"^model.safetensors in {folder} is truncated or corrupt")


def test_a_truncated_shard_is_named(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _copy(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    load_policy(str(folder))  # sharded and whole: loads
    shards[1].write_bytes(shards[1].read_bytes()[:-10])
    _fails(folder, rf"^{shards[1].name} in {folder} is truncated or corrupt")


def test_other_safetensors_files_in_the_folder_are_not_checked(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    (folder / "rollout_versions.safetensors").write_bytes(b"\x00" * 7)  # as a training checkpoint folder may hold
    load_policy(str(folder))


def test_config_hidden_size_changed(tiny_model_dir, tmp_path, load_reports):
    folder = _copy(tiny_model_dir, tmp_path / "m", hidden_size=64)
    _fails(folder, rf"^{folder}: weights do not match config.json: model.embed_tokens.weight has shape "
                   r"\(2555, 32\), config.json expects \(2555, 64\) \(and \d+ more\); use the config.json the "
                   r"weights were saved with$")
    assert load_reports == []  # transformers' table is not printed on top of the one line


def test_config_with_more_layers_than_the_weights(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "m", num_hidden_layers=3)
    _fails(folder, rf"^{folder}: weights do not match config.json: \d+ weights it needs are not in the files "
                   r"\(model.layers.2.input_layernorm.weight, .*\); use the config.json the weights were saved with$")


def test_config_with_fewer_layers_than_the_weights(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "m", num_hidden_layers=1)
    _fails(folder, rf"^{folder}: weights do not match config.json: \d+ weights in the files are not in the model "
                   r"it describes \(model.layers.1.input_layernorm.weight, .*\)")


def test_an_invalid_config(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # layer_types still lists 2
    (folder / "config.json").write_text(json.dumps(cfg))
    _fails(folder, rf"^config.json in {folder} is not valid: .*num_hidden_layers.* \(3\) must be equal to the number "
                   r"of .*layer_types.* \(2\)")
    (folder / "config.json").write_text("{not json")
    _fails(folder, rf"^config.json in {folder} is not valid: ")


def test_healthy_folders_still_load(tiny_model_dir, moe_model_dir, load_reports):
    for folder in (tiny_model_dir, moe_model_dir):
        tok, net = load_policy(folder)
        assert tok.eos_token_id is not None and net.training is False
    assert load_reports == []
