"""Loading the policy: a named model, a local folder, or a hub id.

Named models:

    builtin, builtin-moe  tiny warm-started Qwen3 / Qwen3-MoE shipped with the package
                          (``drpo/data/models/<name>``; ``warmstart.json`` in each says how it was made and
                          ``drpo warmstart`` makes it again)
    smollm2-135m          SmolLM2-135M-Instruct, from a GGUF file in a PyPI package, converted on first use
                          into the cache (:mod:`drpo.models.packaged`)
    smollm2-135m-arith    smollm2-135m after the supervised warm start on the arithmetic task, made on
                          this machine by ``drpo warmstart --model smollm2-135m-arith`` and cached

Each resolves to a ``save_pretrained`` folder; from there the code path is the one a hub id or any local
checkpoint takes: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``.

Mistakes get one clear line (:class:`ModelLoadError`): a folder that does not exist, a folder that
is not a ``save_pretrained`` folder, a hub id when the hub cannot be reached (said at once, instead
of minutes of retries), a config.json that is not valid, a weight file that is truncated or
corrupt, weight files that are pickles (``pytorch_model.bin``: loading one could run code; only
safetensors are read), weights that do not match config.json (a changed ``hidden_size`` or layer count). The
last is checked here: transformers only warns about weights missing from the files or left unused
(and re-initialises the missing ones at random), which would train a different model than meant.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

try:
    from huggingface_hub.errors import StrictDataclassError  # how transformers 5 config validation fails
except ImportError:  # pragma: no cover -- older huggingface_hub
    StrictDataclassError = ValueError  # type: ignore[misc,assignment]

from drpo.models.errors import ModelLoadError
from drpo.models.moe import use_library_experts_
from drpo.models.packaged import PACKAGED_MODELS, WARM_STARTED_MODELS, packaged_model_dir, warm_started_model_dir
from drpo.utils.errors import first_line

BUILTIN_MODELS = ("builtin", "builtin-moe")
HUB_HOST = ("huggingface.co", 443)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # weight files torch.load would unpickle


def builtin_dir(name: str) -> Path:
    """Where the shipped built-in model ``name`` lives (package data)."""
    return Path(str(resources.files("drpo") / "data" / "models" / name))


def resolve_model(model: str) -> str:
    """The folder of ``model``: a built-in model's shipped folder, a packaged model's converted folder
    (:mod:`drpo.models.packaged`, converted on first use), a warm-started one's cached folder, else
    ``model`` itself."""
    if model in PACKAGED_MODELS:
        return str(packaged_model_dir(model))
    if model in WARM_STARTED_MODELS:
        return str(warm_started_model_dir(model))
    if model in BUILTIN_MODELS:
        path = builtin_dir(model)
        if not (path / "model.safetensors").is_file():
            raise ModelLoadError(f"the built-in model {model!r} is missing from this installation ({path}); "
                                 f"make it again with: drpo warmstart --model {model} --out {path}")
        return str(path)
    return model


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith(("/", os.sep)) or model.count("/") > 1


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when the Hugging Face hub cannot be reached: offline mode, or no connection within
    ``timeout_s`` (a machine without network fails the DNS look-up at once)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_model_source(model: str) -> None:
    """Fail fast, in one line, when ``model`` can obviously not be loaded."""
    if model in BUILTIN_MODELS or model in PACKAGED_MODELS or model in WARM_STARTED_MODELS:
        return
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model folder {model!r} has no config.json: pass a folder written by "
                                 "save_pretrained (a checkpoint of `drpo train`, or a downloaded model)")
        if not weight_files(p):
            pickles = sorted(f for pattern in PICKLE_WEIGHTS for f in p.glob(pattern))
            if pickles:
                raise ModelLoadError(f"{pickles[0]} is a pickle (torch.save), which could run code when loaded; drpo "
                                     "reads weights only from safetensors: save the model with save_pretrained "
                                     "(safe_serialization=True) where you trust it")
        if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelLoadError(f"model folder {model!r} has no tokenizer (tokenizer.json / "
                                 "tokenizer_config.json): save the tokenizer with save_pretrained too")
        return
    if p.exists():
        raise ModelLoadError(f"--model {model!r} is a file; pass the folder that holds config.json")
    if _looks_like_path(model):
        raise ModelLoadError(f"model folder not found: {model!r}")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return  # already in the local hub cache
    if not hub_reachable():
        raise ModelLoadError(
            f"model {model!r} is neither a local folder nor in the local hub cache, and the Hugging Face "
            "hub cannot be reached (offline); download it elsewhere and pass its folder with --model PATH")


def check_config(model: str, path: str) -> None:
    """Raise :class:`ModelLoadError` when the config.json of ``path`` cannot be read or is not valid."""
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, StrictDataclassError) as e:
        # transformers 5 validates configs in a dataclass: the real reason is the cause's message
        reason = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ is not None else e
        where = f"config.json in {path}" if Path(path).is_dir() else f"the config.json of {model!r}"
        raise ModelLoadError(f"{where} is not valid: {first_line(reason)}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads from ``folder``: the shards named in
    model.safetensors.index.json, else model.safetensors (other files, such as a checkpoint's
    rollout_versions.safetensors, are not the model's)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index.name} in {folder} is not a valid shard index ({first_line(e)}); "
                                 "copy or save the model again") from None
        return [folder / name for name in sorted(set(shards))]
    single = folder / "model.safetensors"
    return [single] if single.exists() else []


def check_weight_files(folder: Path) -> None:
    """Raise :class:`ModelLoadError` naming the first weight file of ``folder`` (see
    :func:`weight_files`) whose header cannot be read or does not cover the file exactly (a
    truncated or damaged copy). Reads only the headers."""
    from safetensors import safe_open

    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type, or OSError
            raise ModelLoadError(f"{file.name} in {folder} is truncated or corrupt ({first_line(e)}); "
                                 "copy or save it again") from None


class _HoldLoadReports(logging.Filter):
    """Keeps transformers' LOAD REPORT tables (missing / unexpected / mismatched weights) from the
    log while a model loads: :func:`load_policy` turns them into one line of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


@contextmanager
def _held_load_reports() -> Iterator[_HoldLoadReports]:
    log = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReports()
    log.addFilter(hold)
    try:
        yield hold
    finally:
        log.removeFilter(hold)


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _listed(keys: list[str], at_most: int = 3) -> str:
    return ", ".join(keys[:at_most]) + (", ..." if len(keys) > at_most else "")


def weights_mismatch(info: dict[str, Any]) -> str | None:
    """What does not match between the weight files and the model config.json describes, in a few
    words, from ``from_pretrained(..., output_loading_info=True)``'s info; None when all match."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda k: k[0])
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if mismatched:
        key, in_file, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        return f"{key} has shape {_shape(in_file)}, config.json expects {_shape(expected)}{more}"
    if missing:
        return f"{len(missing)} weights it needs are not in the files ({_listed(missing)})"
    if unexpected:
        return f"{len(unexpected)} weights in the files are not in the model it describes ({_listed(unexpected)})"
    return None


def model_from_config(config) -> torch.nn.Module:
    """A float32 causal LM of ``config`` with fresh weights, set up as :func:`load_policy` sets up a loaded one (the
    MoE experts implementation): what a process that receives the policy's weights builds them into."""
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    use_library_experts_(net)
    return net


def load_policy(model: str):
    """(tokenizer, float32 causal LM) for ``model`` = a built-in name, a folder, or a hub id.

    Raises :class:`ModelLoadError` (one line) when it cannot be loaded as it is: see the module
    docstring."""
    check_model_source(model)
    path = resolve_model(model)
    check_config(model, path)
    if Path(path).is_dir():
        check_weight_files(Path(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {model!r} (from {path!r}): "
                             f"{str(e).splitlines()[0]}") from None
    from safetensors import SafetensorError

    try:
        # ignore_mismatched_sizes: report a shape mismatch in loading_info (checked below) instead
        # of raising a RuntimeError that points at the table
        with _held_load_reports() as held:
            net, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, ignore_mismatched_sizes=True,
                                                             output_loading_info=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model {model!r} (from {path!r}): {str(e).splitlines()[0]}") from None
    except SafetensorError as e:  # a hub model's file (a local folder's files are checked above)
        raise ModelLoadError(f"a weight file of {model!r} (from {path!r}) is truncated or corrupt "
                             f"({first_line(e)}); download it again") from None
    problem = weights_mismatch(info)
    if problem is not None:
        raise ModelLoadError(f"{path}: weights do not match config.json: {problem}; use the config.json the "
                             "weights were saved with")
    for record in held.held:  # nothing this check refuses: let transformers' report through
        logging.getLogger(record.name).handle(record)
    use_library_experts_(net)  # MoE: transformers' grouped experts (drpo.models.moe); dense: no-op
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer of {model!r} has no EOS token; responses could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, net


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a ``save_pretrained`` folder (one safetensors file or its shards), read fully: a missing,
    truncated or corrupt file is a :class:`ModelLoadError` naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"{folder} holds no model.safetensors (nor a shard index)")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            out.update(load_file(str(file)))
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type, or OSError
            raise ModelLoadError(f"{file.name} in {folder} is missing, truncated or corrupt ({first_line(e)})") from None
    return out


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``, every key accounted for (tied weights may be absent); a mismatch
    is an error naming ``where`` the state came from."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    keys = getattr(model, "_tied_weights_keys", None) or []
    tied = set(keys if not isinstance(keys, dict) else list(keys))
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise ModelLoadError(f"{where} does not match the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}")


def max_positions(model) -> int | None:
    """The number of positions the model was built for (None when its config does not say)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)
