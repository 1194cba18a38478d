"""Load a trained model and its tokenizer for post-hoc attribution.

Two sources:

- a Lightning ``.ckpt``: loaded with ``torch.load(weights_only=True)`` (no pickled code
  runs); its LightningModule (by default the demo's ``LanguageModel``, named by the spec
  `DEFAULT_MODEL_CLASS` and imported only when such a checkpoint is loaded) is rebuilt from
  the checkpoint's ``hyper_parameters``, its weights loaded, and the Hugging Face model it
  keeps at ``.model`` returned; the tokenizer is found from the checkpoint's
  ``datamodule_hyper_parameters`` (the DataModule's ``tokenizer_path`` or tokenizer cache);
- a Hugging Face model directory (``config.json`` + weights + tokenizer files), loaded
  offline with ``from_pretrained(local_files_only=True)``.

`import_class` resolves a ``"pkg.module:ClassName"`` spec to a LightningModule subclass
(`normx replay --model-class` and the default above).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# The demo's classes, by spec: imported when a checkpoint needs them, never at import time.
DEFAULT_MODEL_CLASS = "normx_callbacks.demo:LanguageModel"
_DEMO_TOKENIZER_DIR = "normx_callbacks.demo.data:tokenizer_cache_dir"

_HINT_TOKENIZER = "pass tokenizer=DIR (`--tokenizer DIR` on the command line), a directory " \
                  "with tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, or not one this package can rebuild a model from."""


def load_model_and_tokenizer(
    path: str | os.PathLike, tokenizer: str | os.PathLike | None = None
) -> tuple[nn.Module, Any]:
    """The HF model (eval mode, CPU) and fast tokenizer of a checkpoint or HF model directory.

    Args:
        path: a Lightning ``.ckpt`` of the demo's ``LanguageModel`` (`DEFAULT_MODEL_CLASS`),
            or a Hugging Face model directory.
        tokenizer: a tokenizer directory; default: found from the checkpoint.

    Raises:
        FileNotFoundError: ``path`` or the tokenizer does not exist / cannot be found.
        CheckpointError: truncated or corrupt file, unsafe contents, a checkpoint of another
            model or architecture (names the mismatching weights).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        model = load_hf_dir(path)
        tok_dir = Path(tokenizer) if tokenizer is not None else hf_tokenizer_dir(path)
    else:
        model, hints = _load_lightning(path)
        tok_dir = Path(tokenizer) if tokenizer is not None else find_tokenizer(path, hints)
    tok = load_tokenizer(tok_dir)
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise CheckpointError(
            f"the tokenizer at {str(tok_dir)!r} has {len(tok)} tokens but the model's embedding "
            f"has {rows} rows: it is not the tokenizer this model was trained with; "
            + _HINT_TOKENIZER
        )
    model.eval()
    return model, tok


def import_class(spec: str) -> type:
    """The LightningModule subclass ``spec`` (``"pkg.module:ClassName"``) names.

    Raises:
        CheckpointError: ``spec`` is malformed, cannot be imported, or is not a
            LightningModule subclass (the message names ``spec`` and the fix).
    """
    import lightning.pytorch as pl

    module, _, name = spec.partition(":")
    if not module or not name:
        raise CheckpointError(f"--model-class {spec!r}: write it as pkg.module:ClassName")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(f"--model-class {spec!r}: cannot import it ({error})") from None
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise CheckpointError(f"--model-class {spec!r} is not a LightningModule subclass")
    return cls


# ------------------------------------------------------------------------ Lightning checkpoints


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:  # torch's long weights_only message: keep the cause
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    elif "Weights only load failed" in text:
        # A global from a blocked module (os, subprocess, ...): torch names it on its own line.
        text = next((line for line in text.splitlines() if "GLOBAL" in line), text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_checkpoint(path: Path) -> dict:
    # torch.save writes zip archives; a truncated one loses its central directory.
    is_zip = zipfile.is_zipfile(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError, KeyError) as error:
        detail = _first_line(error)
        if is_zip and isinstance(error, pickle.UnpicklingError) and "global" in detail.lower():
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, so it cannot "
                f"be loaded safely (weights_only=True): {detail}"
            ) from error
        if not is_zip:
            raise CheckpointError(
                f"{path} is truncated, corrupt or not a PyTorch checkpoint (torch.save writes a "
                "zip archive and this is not a complete one); copy it again or use another "
                "checkpoint"
            ) from error
        raise CheckpointError(
            f"{path} is corrupt ({detail}); copy it again or use another checkpoint"
        ) from error
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no 'state_dict' mapping); for other models "
            "save them with save_pretrained() and pass the directory"
        )
    return ckpt


def _load_lightning(path: Path, model_class: str = DEFAULT_MODEL_CLASS) -> tuple[nn.Module, dict]:
    """(the Hugging Face model a ``model_class`` checkpoint keeps at ``.model``, the
    checkpoint's DataModule hyper-parameters)."""
    ckpt, hp = read_lightning(path, model_class)
    model = build_lightning(path, model_class, hp)
    load_lightning_weights(path, model, ckpt, hp.get("arch", model_class.replace(":", ".")))
    return model, datamodule_hints(ckpt)


def read_lightning(path: Path, model_class: str = DEFAULT_MODEL_CLASS) -> tuple[dict, dict]:
    """(the checkpoint, its hyper-parameters), checked to be those ``model_class`` takes."""
    accepted = inspect.signature(import_class(model_class).__init__).parameters
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, dict):  # LightningCLI records how it built the module; not an argument
        hp = {k: v for k, v in hp.items() if k != "_instantiator"}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    foreign = sorted(set(hp) - set(accepted)) if isinstance(hp, dict) and not takes_any else []
    if not isinstance(hp, dict) or not hp or foreign:
        found = f"names {', '.join(map(repr, foreign))}" if foreign else "are missing"
        raise CheckpointError(
            f"{path} is not a checkpoint of {model_class.replace(':', '.')} (its "
            f"hyper_parameters {found}); for other models save the HF model with "
            "save_pretrained() and pass the directory"
        )
    return ckpt, hp


def build_lightning(path: Path, model_class: str, hp: dict) -> nn.Module:
    """The Hugging Face model at ``.model`` of ``model_class`` rebuilt from ``hp`` (untrained)."""
    label = model_class.replace(":", ".")
    try:
        module = import_class(model_class)(**hp)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot rebuild {label} from its "
                              f"hyper_parameters {dict(hp)}: {error}") from error
    model = getattr(module, "model", None)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: {label} keeps no model at .model; for other models save "
                              "the HF model with save_pretrained() and pass the directory")
    return model


def load_lightning_weights(path: Path, model: nn.Module, ckpt: dict, arch: str) -> None:
    """Load the checkpoint's ``model.*`` weights into ``model``; every weight must fit."""
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    _check_state(path, model, state, arch)
    model.load_state_dict(state, strict=True)


def datamodule_hints(ckpt: dict) -> dict:
    hints = ckpt.get("datamodule_hyper_parameters")
    return hints if isinstance(hints, dict) else {}


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _check_state(path: Path, model: nn.Module, state: dict, arch: str) -> None:
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        raise CheckpointError(
            f"{path}: the weights do not fit a {arch} model built from the checkpoint's "
            f"hyper_parameters: {'; '.join(parts)}; the checkpoint was written for another "
            "architecture or LightningModule"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: weight {key} has shape {tuple(value.shape)} but the {arch} model "
                f"built from the checkpoint's hyper_parameters expects {tuple(expected[key].shape)}"
            )


def _tokenizer_candidates(ckpt_path: Path, hints: dict) -> list[Path]:
    """Where the DataModule of a checkpoint kept its tokenizer: its ``tokenizer_path``, or
    the demo DataModule's tokenizer cache (``tokenizer_cache_dir``, imported by spec)."""
    if hints.get("tokenizer_path"):
        return [Path(hints["tokenizer_path"])]
    needed = ("corpus", "objective", "bpe_vocab_size", "seed")
    if not all(k in hints for k in needed):
        return []
    module, _, name = _DEMO_TOKENIZER_DIR.partition(":")
    tokenizer_cache_dir = getattr(importlib.import_module(module), name)
    cache = Path(str(hints.get("cache_dir") or ".normx_cache"))
    leaf = tokenizer_cache_dir(".", corpus=hints["corpus"], objective=hints["objective"],
                               bpe_vocab_size=hints["bpe_vocab_size"], seed=hints["seed"],
                               num_train=hints.get("num_train")).name
    if cache.is_absolute():
        return [cache / leaf]
    # A relative cache_dir was relative to the training job's working directory: try here,
    # then the directories above the checkpoint.
    bases = [Path.cwd(), *ckpt_path.resolve().parents]
    return list(dict.fromkeys(base / cache / leaf for base in bases))


def find_tokenizer(ckpt_path: Path, hints: dict) -> Path:
    candidates = _tokenizer_candidates(ckpt_path, hints)
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file():
            return candidate
    if not candidates:
        where = "the checkpoint names no DataModule tokenizer"
    else:
        where = f"looked in {str(candidates[0])!r}"
        if len(candidates) > 1:
            where += f" and {len(candidates) - 1} more places above the checkpoint"
    raise FileNotFoundError(f"no tokenizer found for {ckpt_path} ({where}); {_HINT_TOKENIZER}")


# ------------------------------------------------------------------------ HF model directories


def load_hf_dir(path: Path) -> nn.Module:
    """The model of an HF directory; a weight missing from its files or of another shape is
    refused (``from_pretrained`` would initialise it at random and only log it)."""
    from safetensors import SafetensorError

    _, auto = hf_config(path)
    try:
        model, info = auto.from_pretrained(str(path), local_files_only=True,
                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError,
            EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(_hf_load_error(path, error)) from error
    missing, mismatched = info.get("missing_keys") or (), info.get("mismatched_keys") or ()
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing from its files ({_few(missing)})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape "
                         f"({_few(str(m[0] if isinstance(m, tuple) else m) for m in mismatched)})")
        raise CheckpointError(
            f"{path}: the weights do not fit the {type(model).__name__} its config.json "
            f"describes: {'; '.join(parts)}; they would be random, so the directory is refused "
            "(copy it again, or save it with save_pretrained())")
    if info.get("unexpected_keys"):
        log.warning("%s: %d weights in its files are not used by %s (%s)", path,
                    len(info["unexpected_keys"]), type(model).__name__,
                    _few(info["unexpected_keys"]))
    return model


def _bin_files(path: Path) -> list[Path]:
    """The pickled weight files of an HF directory (``pytorch_model.bin`` or its shards)."""
    index = path / "pytorch_model.bin.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = ["pytorch_model.bin"]
    return [path / name for name in shards if (path / name).is_file()]


def _hf_load_error(path: Path, error: BaseException) -> str:
    """One line for an HF directory ``from_pretrained`` could not load: the weight file that
    ``torch.load(weights_only=True)`` refused or that is cut short, else the cause."""
    detail = _first_line(error).rstrip(".")
    if isinstance(error, pickle.UnpicklingError) and "global" in detail.lower():
        files = _bin_files(path)
        where = files[0] if len(files) == 1 else f"a pytorch_model*.bin file in {path}"
        return (f"{where} holds objects other than tensors and plain containers, so it cannot "
                f"be loaded safely (weights_only=True; nothing in it was run): {detail}; use a "
                "copy saved with save_pretrained() (safetensors) from a source you trust")
    for file in _bin_files(path):
        with open(file, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if zip_start and not zipfile.is_zipfile(file):
            return (f"{file} is truncated or corrupt (torch.save writes a zip archive and this "
                    "is not a complete one); copy it again or use another checkpoint")
    return f"cannot load the model in {path}: {detail}"


def hf_config(path: Path) -> tuple[Any, type]:
    """(the directory's config, the Auto class that loads its model)."""
    import transformers

    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is a directory but not a Hugging Face model directory (no config.json); "
            "pass a Lightning .ckpt file or a directory written by save_pretrained()"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}/config.json is unreadable: {error}") from error
    names = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in names:
        return config, transformers.AutoModelForMaskedLM
    if "SequenceClassification" in names:
        return config, transformers.AutoModelForSequenceClassification
    return config, transformers.AutoModelForCausalLM


def hf_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of an HF directory's weight files as saved (one file or an index of
    shards; safetensors, else ``pytorch_model.bin`` read with ``weights_only``); None when it
    holds neither."""
    for name, read in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_bin)):
        if (path / name).is_file():
            return read(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read(path / shard))
            return state
    return None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file), device="cpu")


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def hf_tokenizer_dir(path: Path) -> Path:
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return path
    raise FileNotFoundError(f"{path} holds no tokenizer files (tokenizer.json); {_HINT_TOKENIZER}")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot load the tokenizer in {path}: {detail}") from error
