"""Encoding probes for a model: padded token tensors, the explained position, target and foil
ids, cue and attractor masks aligned through the tokenizer's character offsets.

`ProbeSet.encode` calls `encode_probes`; `EncodedProbes` is what every measurement reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .probes import MASK_PLACEHOLDER, OBJECTIVES, Probe, ProbeError, cue_spans, probe_label


class _IndistinctError(ProbeError):
    """A target and foil that tokenise to the same leading pieces."""


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


def encode_probes(probes: Sequence[Probe], wheres: Sequence[str | None],
                  masked: Sequence[str | None] | None, tokenizer: Any, *, objective: str,
                  max_length: int | None) -> EncodedProbes:
    """`ProbeSet.encode`: ``wheres`` label errors with file and line; ``masked`` holds a
    BLiMP set's masked-LM forms (None for other sets)."""
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
    for index, probe in enumerate(probes):
        label = probe_label(index, probe.id, wheres[index])
        if masked is not None and objective == "masked":
            if masked[index] is None:
                unmaskable.append(probe.id)
                continue
            probe = replace(probe, text=masked[index])
        try:
            row = encode_one(tokenizer, probe, label)
        except _IndistinctError:
            if masked is None:  # a hand-written probe: the author must fix it
                raise
            indistinct.append(probe.id)  # a BLiMP pair this tokenizer cannot tell apart
            continue
        if max_length is not None and len(row.ids) > max_length:
            too_long.append((label, len(row.ids)))
            continue
        rows.append(row)
        kept.append(probe)
    if too_long:
        raise ProbeError(_too_long_message(too_long, len(probes), max_length))
    _warn_skipped(unmaskable, indistinct, len(probes))
    if not rows:
        raise ProbeError(f"none of the {len(probes)} probes can be encoded for "
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
            stacklevel=3,
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
                      + "; ".join(parts), stacklevel=4)


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
    for cue, where in spans.items():
        hit = False
        for i, (start, end) in enumerate(offsets):
            # Special tokens carry (0, 0) offsets; an empty span overlaps nothing anyway.
            if special[i] or start >= end:
                continue
            if any(start < c_end and c_start < end for c_start, c_end in where):
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
    spans = {cue: cue_spans(text, cue) for cue in probe.cues}
    cue_mask = _cue_mask(label, offsets, special, spans)
    attractor_mask = _cue_mask(label, offsets, special,
                               {w: cue_spans(text, w) for w in probe.attractors}, "attractor")
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
            outside = [(s, e) for s, e in cue_spans(probe.text, word)
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
