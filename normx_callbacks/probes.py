"""Probe sets: fixed short texts whose next-word (causal) or masked-word prediction is explained.

A probe names the word the model should predict (``target``), optionally a contrast word
(``foil``), the words in the text that carry the evidence (``cues``) and the words that
carry misleading evidence of the wrong number or gender (``attractors``).

This module holds the types and their validation. Reading files is `probe_files.py` and
encoding for a model is `encoding.py` (`EncodedProbes`); `ProbeSet.from_file`, `from_blimp`
and `encode` call them (imported inside the methods: those modules build on this one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .encoding import EncodedProbes

MASK_PLACEHOLDER = "[MASK]"
OBJECTIVES = ("causal", "masked")
SUFFIXES = (".yaml", ".yml", ".jsonl", ".json")
_KEYS = ("attractors", "cues", "foil", "group", "id", "target", "text")
BLIMP_PREFIX = "blimp:"
_GROUP = re.compile(r"[\w.\-]*")


class ProbeError(ValueError):
    """A probe or probe file is malformed; the message says which one, what is wrong and the fix."""


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
        from .probe_files import read_blimp

        items, wheres, masked, source = read_blimp(paths)
        self = cls._from_items(items, wheres, source)
        self._masked = masked
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ProbeSet:
        """Load probes from ``.yaml``/``.yml`` (a list, or a mapping with key ``probes``),
        ``.jsonl`` (one object or string per line) or ``.json`` (a list)."""
        from .probe_files import read_probe_file

        items, wheres = read_probe_file(path)
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
        from .encoding import encode_probes

        return encode_probes(self.probes, self._wheres, self._masked, tokenizer,
                             objective=objective, max_length=max_length)


# --- building and validating -------------------------------------------------------------


def probe_label(index: int, probe_id: Any, where: str | None) -> str:
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


def cue_spans(text: str, cue: str) -> list[tuple[int, int]]:
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
            if not cue_spans(probe.text, word):
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
        probe = _to_probe(item, probe_label(index, raw_id, where))
        if not isinstance(probe.id, str):
            raise ProbeError(
                f"{probe_label(index, None, where)}: id must be a string, got {probe.id!r}; "
                "quote it in YAML/JSON"
            )
        if not probe.id:
            probe = replace(probe, id=f"probe-{index}")
        label = probe_label(index, probe.id, where)
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
