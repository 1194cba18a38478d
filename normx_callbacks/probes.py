"""Probe sets: fixed short texts whose next-word (causal) or masked-word prediction is explained.

A probe names the word the model should predict (``target``), optionally a contrast word
(``foil``), the words in the text that carry the evidence (``cues``) and the words that
carry misleading evidence of the wrong number or gender (``attractors``). ``ProbeSet.encode``
turns probes into padded tensors plus the token positions the attribution is read at.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

MASK_PLACEHOLDER = "[MASK]"
OBJECTIVES = ("causal", "masked")
SUFFIXES = (".yaml", ".yml", ".jsonl", ".json")
_KEYS = ("attractors", "cues", "foil", "group", "id", "target", "text")
BLIMP_PREFIX = "blimp:"
_GROUP = re.compile(r"[\w.\-]*")
_BLIMP_KEYS = ("one_prefix_prefix", "one_prefix_word_good", "one_prefix_word_bad", "UID", "pairID")


class ProbeError(ValueError):
    """A probe or probe file is malformed; the message says which one, what is wrong and the fix."""


class _IndistinctError(ProbeError):
    """A target and foil that tokenise to the same leading pieces."""


@dataclass(frozen=True)
class Probe:
    """One probe. ``text`` is the prefix (causal) or a sentence with ``[MASK]`` once (masked)."""

    text: str
    target: str | None = None
    foil: str | None = None
    cues: tuple[str, ...] = ()
    id: str = ""
    group: str = ""  # e.g. a BLiMP paradigm; metrics are also reported per group
    # Words of the wrong number/gender (e.g. the noun between subject and verb), aligned to
    # tokens as cues are: `alignment/cue_over_attractor` asks whether the cue outscores them.
    attractors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # YAML/JSON give lists and people write a single word bare; a tuple keeps Probe hashable.
        for name in ("cues", "attractors"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, Iterable) and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))


@dataclass
class EncodedProbes:
    """Probes as tensors; N probes, T = longest probe in tokens."""

    ids: list[str]
    input_ids: torch.Tensor  # (N, T) long, right-padded
    attention_mask: torch.Tensor  # (N, T) long, 1 on real tokens
    tokens: list[list[str]]  # readable token strings per probe, unpadded
    cue_mask: torch.Tensor  # (N, T) bool, True on tokens overlapping a cue word
    positions: torch.Tensor  # (N,) long, the position whose prediction is explained
    targets: torch.Tensor  # (N,) long token id, -1 when the probe has no target
    foils: torch.Tensor  # (N,) long token id, -1 when the probe has no foil
    probes: list[Probe]
    # Every piece the target / foil word tokenises to (readable); [] when not given.
    target_tokens: list[list[str]] = field(default_factory=list)
    foil_tokens: list[list[str]] = field(default_factory=list)
    # (N, T) bool, True on tokens overlapping an attractor word; None: no probe names any.
    attractor_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> EncodedProbes:
        """Return a copy with every tensor moved to ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def select(self, rows: Sequence[int], width: int | None = None) -> EncodedProbes:
        """The probes at ``rows``, tensors cut to the first ``width`` positions (default all)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        cut = slice(None) if width is None else slice(0, width)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[index.to(value.device)]
                picked[f.name] = value[:, cut] if value.dim() == 2 else value
            elif isinstance(value, list) and len(value) == len(self):
                picked[f.name] = [value[i] for i in index.tolist()]
        return replace(self, **picked)

    def equal_length_groups(self) -> list[tuple[list[int], EncodedProbes]]:
        """``(rows, probes)`` per probe length, each without padding (probes are right-padded):
        what a model that takes no attention mask must be given."""
        lengths = self.attention_mask.sum(dim=1).tolist()
        return [(rows, self.select(rows, length))
                for length in sorted(set(lengths))
                for rows in [[i for i, n in enumerate(lengths) if n == length]]]


class ProbeSet:
    """A validated, ordered set of probes with unique ids."""

    def __init__(self, probes: Iterable[Probe | str | Mapping[str, Any]]) -> None:
        """Validate ``probes``: strings become ``Probe(text=...)``, mappings use ``Probe``'s fields."""
        self.probes: list[Probe] = _build(list(probes), None, None)
        self._wheres: list[str | None] = [None] * len(self.probes)
        # Masked-LM form per probe (BLiMP sets only); None where the pair has none.
        self._masked: list[str | None] | None = None

    @classmethod
    def _from_items(cls, items: list[Any], wheres: list[str], source: str) -> ProbeSet:
        self = cls.__new__(cls)
        self.probes = _build(items, wheres, source)
        self._wheres = list(wheres)  # file/line, so encode errors point into the file too
        self._masked = None
        return self

    @classmethod
    def from_blimp(cls, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                   ) -> ProbeSet:
        """Load BLiMP-format minimal pairs: ``.jsonl`` files, one paradigm per file.

        ``paths``: a file, a directory (its ``*.jsonl``) or a glob, or a list of them. Each
        pair with ``one_prefix_method`` becomes one probe: text = ``one_prefix_prefix``,
        target = ``one_prefix_word_good``, foil = ``one_prefix_word_bad``, group = ``UID``,
        id = ``UID-pairID``. For masked LMs (``encode(objective="masked")``) the probe is the
        good sentence with the differing word masked, for pairs whose sentences differ in
        exactly one word. Pairs without a one-prefix form, or whose two words are the same,
        are skipped and counted in one warning.
        """
        files = _blimp_files(paths)
        items: list[dict[str, Any]] = []
        wheres: list[str] = []
        masked: list[str | None] = []
        skipped: dict[str, int] = {}
        for path in files:
            text = _read_text(path)
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    pair = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ProbeError(f"BLiMP file '{path}' line {lineno}: malformed JSON "
                                     f"({err.msg} at column {err.colno}); each line must hold "
                                     "one JSON object") from None
                if not isinstance(pair, Mapping):
                    raise ProbeError(f"BLiMP file '{path}' line {lineno}: expected a JSON "
                                     f"object, got {type(pair).__name__}")
                if not pair.get("one_prefix_method"):
                    skipped["no one_prefix_method"] = skipped.get("no one_prefix_method", 0) + 1
                    continue
                missing = [k for k in _BLIMP_KEYS if pair.get(k) in (None, "")]
                if missing:
                    raise ProbeError(f"BLiMP file '{path}' line {lineno}: missing {missing}; a "
                                     f"one-prefix pair needs {', '.join(_BLIMP_KEYS)}")
                good = str(pair["one_prefix_word_good"]).strip()
                bad = str(pair["one_prefix_word_bad"]).strip()
                if good == bad:
                    skipped["same good and bad word"] = skipped.get("same good and bad word",
                                                                    0) + 1
                    continue
                uid = str(pair["UID"])
                items.append({"text": str(pair["one_prefix_prefix"]), "target": good,
                              "foil": bad, "group": uid, "id": f"{uid}-{pair['pairID']}"})
                wheres.append(where)
                masked.append(_blimp_masked(pair.get("sentence_good"), pair.get("sentence_bad")))
        if skipped:
            warnings.warn(
                f"BLiMP {', '.join(map(str, files))}: skipped "
                + ", ".join(f"{n} pair(s) with {why}" for why, n in skipped.items())
                + "; a probe needs a one-prefix pair whose good and bad words differ",
                stacklevel=2,
            )
        self = cls._from_items(items, wheres, ", ".join(map(str, files)))
        self._masked = masked
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ProbeSet:
        """Load probes from ``.yaml``/``.yml`` (a list, or a mapping with key ``probes``),
        ``.jsonl`` (one object or string per line) or ``.json`` (a list)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise ProbeError(
                f"probes file '{path}' has unsupported suffix {path.suffix!r}; "
                f"use one of {', '.join(SUFFIXES)}"
            )
        if not path.exists():
            raise FileNotFoundError(
                f"probes file '{path}' does not exist; check the path "
                f"(relative paths resolve from '{Path.cwd()}')"
            )
        try:
            # utf-8-sig: tolerate the BOM some editors write, still reject other encodings.
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ProbeError(
                f"probes file '{path}' is not valid UTF-8 (byte {err.start}: {err.reason}); "
                "re-save it with UTF-8 encoding"
            ) from None
        if suffix == ".jsonl":
            items, wheres = _parse_jsonl(text, str(path))
        elif suffix == ".json":
            items, wheres = _parse_json(text, str(path))
        else:
            items, wheres = _parse_yaml(text, str(path))
        return cls._from_items(items, wheres, str(path))

    @classmethod
    def coerce(cls, obj: ProbeSet | Sequence[Any] | str | os.PathLike[str]) -> ProbeSet:
        """Accept a ProbeSet, a list of probes, or a path to a probes file."""
        if isinstance(obj, ProbeSet):
            return obj
        if isinstance(obj, str) and obj.startswith(BLIMP_PREFIX):
            return cls.from_blimp(obj[len(BLIMP_PREFIX):])
        if isinstance(obj, (str, os.PathLike)):
            return cls.from_file(obj)
        if isinstance(obj, (list, tuple)):
            return cls(obj)
        raise ProbeError(
            f"probes must be a ProbeSet, a list of probes, a path to a "
            f"{'/'.join(SUFFIXES)} file or '{BLIMP_PREFIX}PATH', got {type(obj).__name__}"
        )

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes)

    def __getitem__(self, index: int) -> Probe:
        return self.probes[index]

    def __repr__(self) -> str:
        return f"ProbeSet({len(self.probes)} probes)"

    def encode(
        self, tokenizer: Any, *, objective: str = "causal", max_length: int | None = None
    ) -> EncodedProbes:
        """Tokenise every probe for ``objective`` ("causal" or "masked") with a fast HF tokenizer.

        Causal: the text (right-stripped) is the prefix; trailing special tokens some tokenizers
        append (EOS/SEP) are dropped so the explained position is the last text token, and the
        target id is the first token the word gets after a space in context.
        Masked: ``[MASK]`` is replaced by ``tokenizer.mask_token``; the target id is the first
        token of the word, tokenised with a leading space when the placeholder follows one.

        A target or foil of several tokens: the explained token is the first one where target
        and foil differ, and the pieces they share are appended to the prefix (causal) or put
        before the mask token (masked); without a foil, the target's first token. The pieces
        are kept in ``target_tokens`` / ``foil_tokens`` and one warning lists the probes.
        A target and foil that never differ (one is the other's leading pieces) are refused.
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(
                f"max_length must be a positive int or None, got {max_length!r}; "
                "pass the model's context length"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer must be a fast (Rust-backed) tokenizer, got {type(tokenizer).__name__}; "
                "cue alignment needs its offset mapping, so load it with AutoTokenizer "
                "(fast is the default) or wrap a tokenizers.Tokenizer in PreTrainedTokenizerFast"
            )
        if objective == "masked" and tokenizer.mask_token is None:
            raise ProbeError(
                f"objective='masked' needs a tokenizer with a mask token, but "
                f'{type(tokenizer).__name__} has none; use objective="causal" or a tokenizer '
                "with a mask token"
            )
        encode_one = _encode_causal if objective == "causal" else _encode_masked
        rows, kept = [], []
        unmaskable, indistinct = [], []
        too_long: list[tuple[str, int]] = []  # (label, tokens): all reported at once
        for index, probe in enumerate(self.probes):
            label = _label(index, probe.id, self._wheres[index])
            if self._masked is not None and objective == "masked":
                if self._masked[index] is None:
                    unmaskable.append(probe.id)
                    continue
                probe = replace(probe, text=self._masked[index])
            try:
                row = encode_one(tokenizer, probe, label)
            except _IndistinctError:
                if self._masked is None:  # a hand-written probe: the author must fix it
                    raise
                indistinct.append(probe.id)  # a BLiMP pair this tokenizer cannot tell apart
                continue
            if max_length is not None and len(row.ids) > max_length:
                too_long.append((label, len(row.ids)))
                continue
            rows.append(row)
            kept.append(probe)
        if too_long:
            raise ProbeError(_too_long_message(too_long, len(self.probes), max_length))
        _warn_skipped(unmaskable, indistinct, len(self.probes))
        if not rows:
            raise ProbeError(f"none of the {len(self.probes)} probes can be encoded for "
                             f"objective={objective!r} (see the warning); use other probes")
        split = [f"{probe.id} ({' | '.join(_split_words(tokenizer, probe, row))})"
                 for probe, row in zip(kept, rows, strict=True)
                 if len(row.target_pieces) > 1 or len(row.foil_pieces) > 1]
        if split:
            warnings.warn(
                f"{len(split)} probe(s) have a target or foil of several tokens: {'; '.join(split)}."
                " Each explains the first token where target and foil differ (shared leading "
                "tokens join the prefix), or the target's first token when there is no foil; "
                "the store's probes table lists the pieces (target_tokens, foil_tokens)",
                stacklevel=2,
            )
        return _collate(tokenizer, rows, kept)


_NAMED = 5  # over-long probes named in the error; the rest are counted


def _too_long_message(too_long: list[tuple[str, int]], total: int, max_length: int) -> str:
    """Every probe longer than the context in one message (a fix-and-retry loop would find
    them one per start): the count, the first few named, the fix."""
    if len(too_long) == 1:
        label, n = too_long[0]
        return (f"{label}: {n} tokens exceed max_length={max_length}; shorten the probe or use "
                "a model with a longer context")
    named = "; ".join(f"{label}: {n} tokens" for label, n in too_long[:_NAMED])
    more = f"; and {len(too_long) - _NAMED} more" if len(too_long) > _NAMED else ""
    longest = max(n for _, n in too_long)
    return (f"{len(too_long)} of {total} probes exceed max_length={max_length} tokens "
            f"(the longest has {longest}): {named}{more}; shorten or drop them, or use a model "
            f"with a context of at least {longest} tokens")


def _warn_skipped(unmaskable: list[str], indistinct: list[str], total: int) -> None:
    parts = []
    if unmaskable:
        parts.append(f"{len(unmaskable)} pair(s) whose sentences do not differ in exactly one "
                     f"word have no masked form (e.g. {', '.join(unmaskable[:3])})")
    if indistinct:
        parts.append(f"{len(indistinct)} pair(s) whose good and bad words this tokenizer "
                     f"cannot tell apart (e.g. {', '.join(indistinct[:3])})")
    if parts:
        warnings.warn(f"skipped {len(unmaskable) + len(indistinct)} of {total} BLiMP probes: "
                      + "; ".join(parts), stacklevel=3)


def _blimp_files(paths: Any) -> list[Path]:
    import glob

    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(
                f"BLiMP path '{entry}' matches no .jsonl file; give a file, a directory of "
                "paradigm .jsonl files or a glob (relative paths resolve from "
                f"'{Path.cwd()}')")
        files.extend(found)
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ProbeError(f"BLiMP file '{path}' is not valid UTF-8 (byte {err.start}: "
                         f"{err.reason}); re-save it with UTF-8 encoding") from None


def _blimp_masked(good: Any, bad: Any) -> str | None:
    """The good sentence with the one differing word masked; None unless exactly one differs."""
    if not isinstance(good, str) or not isinstance(bad, str):
        return None
    a, b = good.split(), bad.split()
    if len(a) != len(b):
        return None
    diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    if len(diff) != 1:
        return None
    a[diff[0]] = MASK_PLACEHOLDER
    return " ".join(a)


# --- building and validating -------------------------------------------------------------


def _label(index: int, probe_id: Any, where: str | None) -> str:
    name = f"probe {probe_id!r}" if isinstance(probe_id, str) and probe_id else "probe"
    return f"{name} (index {index}{', ' + where if where else ''})"


def _to_probe(item: Any, label: str) -> Probe:
    if isinstance(item, Probe):
        return item
    if isinstance(item, str):
        return Probe(text=item)
    if isinstance(item, Mapping):
        unknown = sorted(str(k) for k in item if k not in _KEYS)
        if unknown:
            raise ProbeError(
                f"{label}: unknown key {unknown[0]!r}; valid keys are {', '.join(_KEYS)}"
            )
        if "text" not in item:
            raise ProbeError(
                f"{label}: missing required key 'text'; add the prefix (causal) or a sentence "
                f"with {MASK_PLACEHOLDER} (masked)"
            )
        cues, attractors = item.get("cues"), item.get("attractors")
        return Probe(**{**item, "cues": () if cues is None else cues,
                        "attractors": () if attractors is None else attractors})
    raise ProbeError(
        f"{label}: got {type(item).__name__} {item!r}; a probe is a text string, a mapping "
        f"with keys {', '.join(_KEYS)}, or a Probe"
    )


def _cue_spans(text: str, cue: str) -> list[tuple[int, int]]:
    # Whole-word match: "key" must not hit inside "keys".
    pattern = r"(?<!\w)" + re.escape(cue) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, text)]


def _check(probe: Probe, label: str) -> None:
    if not isinstance(probe.text, str) or not probe.text.strip():
        raise ProbeError(
            f"{label}: text must be a non-empty string, got {probe.text!r}; give the prefix "
            f"(causal) or a sentence with {MASK_PLACEHOLDER} (masked)"
        )
    for name in ("target", "foil"):
        word = getattr(probe, name)
        if word is None:
            continue
        if not isinstance(word, str) or not word.strip():
            raise ProbeError(
                f"{label}: {name} must be a non-empty string or left out, got {word!r}; "
                "quote numbers in YAML"
            )
        if word != word.strip():
            raise ProbeError(
                f"{label}: {name} {word!r} has surrounding whitespace; write {word.strip()!r} "
                "(the separating space is added when encoding)"
            )
    if not isinstance(probe.group, str) or not _GROUP.fullmatch(probe.group):
        raise ProbeError(
            f"{label}: group {probe.group!r} must be a string of letters, digits, '_', '-' or "
            "'.' (it becomes part of metric names such as probe/accuracy/<group>)"
        )
    if probe.foil is not None and probe.target is None:
        raise ProbeError(
            f"{label}: foil {probe.foil!r} is given without a target; a foil is a contrast to "
            "the target, so add the target word or drop the foil"
        )
    if not isinstance(probe.cues, tuple):
        raise ProbeError(
            f"{label}: cues must be a list of words, got {probe.cues!r}; write e.g. [keys]"
        )
    if not isinstance(probe.attractors, tuple):
        raise ProbeError(
            f"{label}: attractors must be a list of words, got {probe.attractors!r}; write "
            "e.g. [cabinets]"
        )
    for kind, words in (("cue", probe.cues), ("attractor", probe.attractors)):
        for word in words:
            if not isinstance(word, str) or not word.strip() or word != word.strip():
                raise ProbeError(
                    f"{label}: {kind} {word!r} must be a non-empty word without surrounding "
                    f"whitespace; list {kind}s as words copied from the text"
                )
            if not _cue_spans(probe.text, word):
                raise ProbeError(
                    f"{label}: {kind} {word!r} does not occur as a whole word in text "
                    f"{probe.text!r} (case-sensitive); copy the {kind} from the text exactly "
                    "or remove it"
                )
    both = sorted(set(probe.cues) & set(probe.attractors))
    if both:
        raise ProbeError(
            f"{label}: {both[0]!r} is listed as a cue and as an attractor; a word either "
            "carries the evidence (cues) or misleads (attractors): keep it in one list"
        )


def _build(items: list[Any], wheres: list[str] | None, source: str | None) -> list[Probe]:
    probes: list[Probe] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        where = wheres[index] if wheres else None
        raw_id = item.get("id") if isinstance(item, Mapping) else getattr(item, "id", None)
        probe = _to_probe(item, _label(index, raw_id, where))
        if not isinstance(probe.id, str):
            raise ProbeError(
                f"{_label(index, None, where)}: id must be a string, got {probe.id!r}; "
                "quote it in YAML/JSON"
            )
        if not probe.id:
            probe = replace(probe, id=f"probe-{index}")
        label = _label(index, probe.id, where)
        _check(probe, label)
        if probe.id in seen:
            raise ProbeError(
                f"{label}: duplicate id {probe.id!r}, already used by the probe at index "
                f"{seen[probe.id]}; give each probe a unique id or leave id empty for "
                "'probe-<index>'"
            )
        seen[probe.id] = index
        probes.append(probe)
    if not probes:
        where = f"probes file '{source}'" if source else "probes"
        raise ProbeError(
            f"{where}: the probe set is empty; give at least one probe (a text string or a "
            "mapping with key 'text')"
        )
    return probes


# --- file formats --------------------------------------------------------------------------


def _parse_yaml(text: str, name: str) -> tuple[list[Any], list[str]]:
    try:
        data = yaml.safe_load(text)
        # The node tree keeps line numbers, so item errors can point into the file.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        if isinstance(err, yaml.constructor.ConstructorError):
            # safe_load builds plain data only: a tag such as !!python/object is refused, never run.
            raise ProbeError(
                f"probes file '{name}'{at}: YAML tag not allowed ({problem}); probes are read "
                "with a safe loader that builds only lists, mappings and strings: remove the tag"
            ) from None
        raise ProbeError(
            f"probes file '{name}'{at}: malformed YAML ({problem}); fix the syntax, e.g. "
            "'- {text: ..., target: ...}' per probe"
        ) from None
    if data is None:
        return [], []
    if isinstance(data, Mapping):
        if set(data) != {"probes"}:
            raise ProbeError(
                f"probes file '{name}': top-level mapping has keys {sorted(map(str, data))}; "
                "use a list of probes or a mapping with the single key 'probes'"
            )
        data = data["probes"]
        root = next(value for key, value in root.value if key.value == "probes")
    if not isinstance(data, list):
        raise ProbeError(
            f"probes file '{name}': expected a list of probes, got {type(data).__name__}; "
            "write one '- ...' entry per probe"
        )
    return data, [f"{name} line {node.start_mark.line + 1}" for node in root.value]


def _parse_jsonl(text: str, name: str) -> tuple[list[Any], list[str]]:
    items: list[Any] = []
    wheres: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ProbeError(
                f"probes file '{name}' line {lineno}: malformed JSON ({err.msg} at column "
                f"{err.colno}); each line must hold one JSON object or one JSON string"
            ) from None
        wheres.append(f"{name} line {lineno}")
    return items, wheres


def _parse_json(text: str, name: str) -> tuple[list[Any], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ProbeError(
            f"probes file '{name}' line {err.lineno}: malformed JSON ({err.msg} at column "
            f"{err.colno}); fix the syntax"
        ) from None
    if not isinstance(data, list):
        raise ProbeError(
            f"probes file '{name}': expected a JSON list of probes, got {type(data).__name__}; "
            "wrap the probes in [...]"
        )
    return data, [name] * len(data)


# --- encoding ------------------------------------------------------------------------------


@dataclass
class _Row:
    ids: list[int]
    cue_mask: list[bool]
    position: int
    target: int
    foil: int
    target_pieces: list[int] = field(default_factory=list)
    foil_pieces: list[int] = field(default_factory=list)
    attractor_mask: list[bool] = field(default_factory=list)


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    return list(enc["input_ids"]), list(enc["offset_mapping"]), list(enc["special_tokens_mask"])


def _strip_trailing_special(ids: list[int], special: list[int]) -> int:
    end = len(ids)
    while end > 0 and special[end - 1]:
        end -= 1
    return end


def _cue_mask(
    label: str,
    offsets: list[tuple[int, int]],
    special: list[int],
    spans: dict[str, list[tuple[int, int]]],
    kind: str = "cue",
) -> list[bool]:
    mask = [False] * len(offsets)
    for cue, cue_spans in spans.items():
        hit = False
        for i, (start, end) in enumerate(offsets):
            # Special tokens carry (0, 0) offsets; an empty span overlaps nothing anyway.
            if special[i] or start >= end:
                continue
            if any(start < c_end and c_start < end for c_start, c_end in cue_spans):
                mask[i] = hit = True
        if not hit:
            raise ProbeError(
                f"{label}: {kind} {cue!r} does not line up with any token (the tokenizer's "
                f"normalizer may have changed it); pick a {kind} that survives tokenisation"
            )
    return mask


def _word_pieces(tokenizer: Any, word: str, label: str, name: str) -> list[int]:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ProbeError(
            f"{label}: {name} {word.strip()!r} tokenises to nothing; pick another word"
        )
    return list(ids)


def _causal_word_pieces(
    tokenizer: Any, text: str, text_ids: list[int], word: str, label: str, name: str
) -> list[int]:
    # In context, so byte-level BPE gives the word its leading-space form ("Ġare").
    ids, _, special = _tokenize(tokenizer, text + " " + word)
    ids = ids[: _strip_trailing_special(ids, special)]
    n = len(text_ids)
    if len(ids) > n and ids[:n] == text_ids:
        return ids[n:]
    return _word_pieces(tokenizer, " " + word, label, name)


def _explained(
    tokenizer: Any, probe: Probe, label: str, target: list[int], foil: list[int]
) -> tuple[list[int], int, int]:
    """(shared leading pieces, explained target id, explained foil id); -1 for absent words."""
    if not target:
        return [], -1, -1
    if not foil:
        return [], target[0], -1
    k = 0
    while k < min(len(target), len(foil)) and target[k] == foil[k]:
        k += 1
    if k == min(len(target), len(foil)):
        pieces = tokenizer.convert_ids_to_tokens(target[:k])
        raise _IndistinctError(
            f"{label}: target {probe.target!r} and foil {probe.foil!r} never differ token by "
            f"token (shared pieces {pieces}, then one of them ends), so the contrast between "
            "them would be meaningless; pick a foil that differs from the target in some token"
        )
    return target[:k], target[k], foil[k]


def _split_words(tokenizer: Any, probe: Probe, row: _Row) -> list[str]:
    out = []
    for name, word, pieces in (("target", probe.target, row.target_pieces),
                               ("foil", probe.foil, row.foil_pieces)):
        if word is not None:
            out.append(f"{name} {word!r} -> {readable_tokens(tokenizer, pieces)}")
    return out


def _encode_causal(tokenizer: Any, probe: Probe, label: str) -> _Row:
    # A trailing space would become its own byte-level token and shift the next word's form.
    text = probe.text.rstrip()
    ids, offsets, special = _tokenize(tokenizer, text)
    end = _strip_trailing_special(ids, special)
    if end == 0:
        raise ProbeError(f"{label}: text {text!r} has no ordinary tokens; give a real prefix")
    ids, offsets, special = ids[:end], offsets[:end], special[:end]
    spans = {cue: _cue_spans(text, cue) for cue in probe.cues}
    cue_mask = _cue_mask(label, offsets, special, spans)
    attractor_mask = _cue_mask(label, offsets, special,
                               {w: _cue_spans(text, w) for w in probe.attractors}, "attractor")
    target_pieces = foil_pieces = []
    if probe.target is not None:
        target_pieces = _causal_word_pieces(tokenizer, text, ids, probe.target, label, "target")
    if probe.foil is not None:
        foil_pieces = _causal_word_pieces(tokenizer, text, ids, probe.foil, label, "foil")
    shared, target, foil = _explained(tokenizer, probe, label, target_pieces, foil_pieces)
    ids = ids + shared
    cue_mask = cue_mask + [False] * len(shared)
    attractor_mask = attractor_mask + [False] * len(shared)
    return _Row(ids, cue_mask, len(ids) - 1, target, foil, target_pieces, foil_pieces,
                attractor_mask)


def _encode_masked(tokenizer: Any, probe: Probe, label: str) -> _Row:
    count = probe.text.count(MASK_PLACEHOLDER)
    if count != 1:
        raise ProbeError(
            f"{label}: masked probes need the placeholder {MASK_PLACEHOLDER} exactly once, found "
            f"{count} in {probe.text!r}; mark the one word to predict with {MASK_PLACEHOLDER}"
        )
    start = probe.text.index(MASK_PLACEHOLDER)
    end = start + len(MASK_PLACEHOLDER)
    mask_token = tokenizer.mask_token
    text = probe.text[:start] + mask_token + probe.text[end:]
    shift = len(mask_token) - len(MASK_PLACEHOLDER)
    spans: dict[str, dict[str, list[tuple[int, int]]]] = {"cue": {}, "attractor": {}}
    for kind, words in (("cue", probe.cues), ("attractor", probe.attractors)):
        for word in words:
            # Spans come from the original text, then move with the swapped-in mask token.
            outside = [(s, e) for s, e in _cue_spans(probe.text, word)
                       if e <= start or s >= end]
            if not outside:
                raise ProbeError(
                    f"{label}: {kind} {word!r} only occurs inside the {MASK_PLACEHOLDER} "
                    f"placeholder; {kind}s must be visible words of the text"
                )
            spans[kind][word] = [(s + shift, e + shift) if s >= end else (s, e)
                                 for s, e in outside]
    ids, offsets, special = _tokenize(tokenizer, text)
    hits = [i for i, token_id in enumerate(ids) if token_id == tokenizer.mask_token_id]
    if len(hits) != 1:
        raise ProbeError(
            f"{label}: expected one mask token {mask_token!r} after tokenising, found "
            f"{len(hits)}; the tokenizer must keep its mask token whole (register it as special)"
        )
    cue_mask = _cue_mask(label, offsets, special, spans["cue"])
    attractor_mask = _cue_mask(label, offsets, special, spans["attractor"], "attractor")
    # The word form depends on whether a space precedes it (byte-level BPE: "Ġare" vs "are").
    spaced = start > 0 and probe.text[start - 1].isspace()
    target_pieces = foil_pieces = []
    if probe.target is not None:
        target_pieces = _word_pieces(tokenizer, " " * spaced + probe.target, label, "target")
    if probe.foil is not None:
        foil_pieces = _word_pieces(tokenizer, " " * spaced + probe.foil, label, "foil")
    shared, target, foil = _explained(tokenizer, probe, label, target_pieces, foil_pieces)
    # Shared leading pieces go before the mask token, which then stands for the first
    # piece where target and foil differ.
    position = hits[0]
    ids = ids[:position] + shared + ids[position:]
    cue_mask = cue_mask[:position] + [False] * len(shared) + cue_mask[position:]
    attractor_mask = (attractor_mask[:position] + [False] * len(shared)
                      + attractor_mask[position:])
    return _Row(ids, cue_mask, position + len(shared), target, foil, target_pieces,
                foil_pieces, attractor_mask)


def readable_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    out = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        text = tokenizer.convert_tokens_to_string([token])
        # A lone byte of a multi-byte character decodes to U+FFFD; the raw token says more.
        out.append(token if not text or "\ufffd" in text else text)
    return out


def _collate(tokenizer: Any, rows: list[_Row], probes: list[Probe]) -> EncodedProbes:
    n, t = len(rows), max(len(row.ids) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((n, t), pad, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((n, t), dtype=torch.long)  # (N, T)
    cue_mask = torch.zeros((n, t), dtype=torch.bool)  # (N, T)
    attractor_mask = torch.zeros((n, t), dtype=torch.bool)  # (N, T)
    for i, row in enumerate(rows):
        length = len(row.ids)
        input_ids[i, :length] = torch.tensor(row.ids, dtype=torch.long)
        attention_mask[i, :length] = 1
        cue_mask[i, :length] = torch.tensor(row.cue_mask, dtype=torch.bool)
        attractor_mask[i, :length] = torch.tensor(row.attractor_mask, dtype=torch.bool)
    return EncodedProbes(
        ids=[p.id for p in probes],
        input_ids=input_ids,
        attention_mask=attention_mask,
        tokens=[readable_tokens(tokenizer, row.ids) for row in rows],
        cue_mask=cue_mask,
        positions=torch.tensor([row.position for row in rows], dtype=torch.long),
        targets=torch.tensor([row.target for row in rows], dtype=torch.long),
        foils=torch.tensor([row.foil for row in rows], dtype=torch.long),
        probes=list(probes),
        target_tokens=[readable_tokens(tokenizer, row.target_pieces) for row in rows],
        foil_tokens=[readable_tokens(tokenizer, row.foil_pieces) for row in rows],
        attractor_mask=attractor_mask if any(p.attractors for p in probes) else None,
    )
