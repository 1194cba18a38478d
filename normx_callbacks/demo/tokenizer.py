"""A byte-level BPE tokenizer trained on the demo corpus, cached on disk.

Byte-level so that any text round-trips and a word after a space is one token
(" is") once the vocabulary has room for it: attributions then land on words.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

OBJECTIVES = ("causal", "masked")
FINGERPRINT_FILE = "fingerprint.txt"
_FORMAT = 1  # bump when the training recipe changes, to invalidate old caches
_BYTES = len(pre_tokenizers.ByteLevel.alphabet())  # 256: every byte is a base token


def _special_tokens(objective: str) -> dict[str, str | AddedToken]:
    """The tokenizer's special tokens by role; their order fixes their ids (0, 1, ...)."""
    if objective == "causal":  # GPT-2 style: one token separates documents
        return {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    # RoBERTa style. lstrip: "word <mask>" absorbs the space, as " word" tokens carry theirs.
    return {
        "bos_token": "<s>",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "mask_token": AddedToken("<mask>", lstrip=True, rstrip=False, special=True),
        "cls_token": "<s>",
        "sep_token": "</s>",
    }


def fingerprint(texts: Sequence[str], *, vocab_size: int, objective: str) -> str:
    """A hash of everything the trained tokenizer depends on."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(f"{len(data)}:".encode())  # length prefix: ["ab", "c"] != ["a", "bc"]
        h.update(data)
    spec = {
        "format": _FORMAT,
        "vocab_size": vocab_size,
        "objective": objective,
        "texts": h.hexdigest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def train_tokenizer(
    texts: Sequence[str],
    *,
    vocab_size: int,
    objective: str = "causal",
    cache_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (or load it from ``cache_dir``).

    objective: "causal" (``<|endoftext|>`` as bos/eos, ``<|pad|>``, nothing added
        around a text) or "masked" (RoBERTa's ``<s> $A </s>``, ``<pad>``, ``<unk>``,
        ``<mask>``).
    cache_dir: a directory for the tokenizer; reused when it was trained with the
        same texts, vocab_size and objective, else retrained and replaced.
    Offsets exclude the space a token carries: " is" in "it is" maps to (3, 5).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    specials = _special_tokens(objective)
    unique = list(dict.fromkeys(str(t) for t in specials.values()))
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or vocab_size <= _BYTES + len(unique)
    ):
        raise ValueError(
            f"vocab_size must be an int above {_BYTES + len(unique)} "
            f"({_BYTES} bytes + {len(unique)} special tokens), got {vocab_size!r}"
        )
    if len(texts) == 0:
        raise ValueError("texts is empty: a tokenizer needs text to train on")

    fp = fingerprint(texts, vocab_size=vocab_size, objective=objective)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        if _cached_fingerprint(cache_dir) == fp:
            logger.info("loading cached tokenizer from %s", cache_dir)
            return load_tokenizer(cache_dir)

    tokenizer = _train(texts, vocab_size=vocab_size, objective=objective, specials=specials)
    if cache_dir is not None:
        _save_atomic(tokenizer, cache_dir, fp)
    return tokenizer


def _train(
    texts: Sequence[str], *, vocab_size: int, objective: str, specials: dict
) -> PreTrainedTokenizerFast:
    special_tokens = [
        t if isinstance(t, AddedToken) else AddedToken(t, special=True)
        for t in dict.fromkeys(specials.values())  # bos and eos may be one token
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # so unseen bytes still encode
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    trim = processors.ByteLevel(trim_offsets=True)
    if objective == "causal":
        tok.post_processor = trim
    else:
        bos, eos = specials["bos_token"], specials["eos_token"]
        template = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} {eos} $B {eos}",
            special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
        )
        tok.post_processor = processors.Sequence([trim, template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory written by ``save_pretrained`` (no network)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer at {str(path)!r}: expected a directory with tokenizer.json, "
            "as written by train_tokenizer(cache_dir=...) or save_pretrained"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _cached_fingerprint(cache_dir: Path) -> str | None:
    try:
        return (cache_dir / FINGERPRINT_FILE).read_text().strip()
    except OSError:
        return None


def _save_atomic(tokenizer: PreTrainedTokenizerFast, cache_dir: Path, fp: str) -> None:
    """Write to a sibling temp dir, then swap it in: readers never see a half-written cache."""
    if cache_dir.exists() and _cached_fingerprint(cache_dir) is None and any(cache_dir.iterdir()):
        raise ValueError(
            f"cache_dir {str(cache_dir)!r} is a non-empty directory without {FINGERPRINT_FILE}; "
            "refusing to replace it: pass an empty or new directory"
        )
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        tokenizer.save_pretrained(str(tmp))
        # Written last: a directory whose fingerprint matches is complete.
        (tmp / FINGERPRINT_FILE).write_text(fp + "\n")
        os.chmod(tmp, 0o755)
        if cache_dir.exists():
            os.replace(cache_dir, old)
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            # Another process (e.g. a second rank) swapped in first; keep its copy if it matches.
            if _cached_fingerprint(cache_dir) != fp:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved tokenizer to %s", cache_dir)
