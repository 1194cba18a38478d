"""Text corpora for the demo pre-training run, each with a held-out probe suite.

A probe is a dict ``{"id", "text", "target", "foil", "cues", "attractors"}`` in causal
form (what ``normx_callbacks.probes.ProbeSet`` accepts): ``text`` is a prefix whose
next word is ``target``; ``cues`` are whole words of ``text`` that carry the
evidence for it; ``attractors`` (agreement only) the words of ``text`` whose number is the
cue's opposite, which a model reading the wrong word would follow. What else is known
about a probe is in ``Corpus.meta``.

Built-in corpora:
- ``agreement``: synthetic English with number agreement across distractors,
  small enough in vocabulary that a tiny model learns it in a few hundred steps.
- ``docs``: the documentation topics shipped with CPython (``pydoc_data``).
Also a local ``.txt`` file or directory of ``.txt``/``.md`` files, and
``hf:<dataset>[:<config>]`` through the optional ``datasets`` package.
"""

from __future__ import annotations

import logging
import os
import random
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CORPORA = ("agreement", "docs")
MASK = "[MASK]"


@dataclass(frozen=True)
class Corpus:
    name: str
    train: list[str]  # training documents (sentences or paragraphs)
    val: list[str]  # held-out text for validation loss
    probes: list[dict]  # held-out probe suite, causal form
    # Per probe id: "rest" (the sentence after the target, for the masked form); for
    # agreement also "construction", "number" (of the cue: "sg"/"pl") and "attractor".
    meta: dict[str, dict] = field(default_factory=dict)

    def masked_probes(self) -> list[dict]:
        """The probes in masked form: the sentence with ``[MASK]`` once, where the target was."""
        return [
            {**p, "text": f"{p['text']} {MASK}{self.meta.get(p['id'], {}).get('rest', '')}"}
            for p in self.probes
        ]


def load_corpus(
    name_or_path: str | os.PathLike,
    *,
    seed: int = 0,
    num_train: int | None = None,
    num_probes: int | None = None,
    val_fraction: float = 0.05,
) -> Corpus:
    """Load a built-in corpus, a local text file/directory, or ``hf:<dataset>[:<config>]``.

    num_train: training documents (agreement: sentences, default 20000; text
        corpora: paragraphs, default all). num_probes: default 64.
    val_fraction: share of the documents held out for validation loss.
    Same arguments give the same corpus; the probes never occur in ``train``.
    """
    if num_train is not None and num_train < 1:
        raise ValueError(f"num_train must be a positive integer or None, got {num_train!r}")
    if num_probes is not None and num_probes < 0:
        raise ValueError(f"num_probes must be >= 0 or None, got {num_probes!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    name_or_path = os.fspath(name_or_path)
    num_probes = 64 if num_probes is None else num_probes
    split = dict(seed=seed, num_train=num_train, num_probes=num_probes, val_fraction=val_fraction)

    if name_or_path == "agreement":
        return _agreement(**split)
    if name_or_path == "docs":
        return _text_corpus("docs", _pydoc_paragraphs(), id_prefix="docs", **split)
    if name_or_path.startswith("hf:"):
        return _text_corpus(name_or_path, _hf_paragraphs(name_or_path), id_prefix="hf", **split)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _text_corpus(name_or_path, _local_paragraphs(path), id_prefix="text", **split)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"corpus path {name_or_path!r} does not exist (built-in corpora: {', '.join(CORPORA)})"
        )
    raise ValueError(
        f"unknown corpus {name_or_path!r}: choose one of {', '.join(CORPORA)}, "
        "a local .txt file or directory, or hf:<dataset>[:<config>]"
    )


def _looks_like_path(name: str) -> bool:
    return (
        "/" in name or "\\" in name or name.startswith((".", "~")) or name.endswith((".txt", ".md"))
    )


# --------------------------------------------------------------------------------------
# agreement: a synthetic grammar. Each (singular, plural) pair differs only in number,
# so a probe's foil is its target with the number flipped.

# Small on purpose: at vocab_size 512 every word below is one byte-level BPE token
# (" laughs" vs " laugh"), so target and foil differ in their first token.
_NEUTRAL = (("author", "authors"), ("guard", "guards"), ("teacher", "teachers"),
            ("doctor", "doctors"), ("pilot", "pilots"), ("farmer", "farmers"))  # fmt: skip
_MALE = (("boy", "boys"), ("man", "men"), ("king", "kings"), ("father", "fathers"))
_FEMALE = (("girl", "girls"), ("woman", "women"), ("queen", "queens"), ("mother", "mothers"))
_THINGS = (("key", "keys"), ("cabinet", "cabinets"), ("book", "books"), ("box", "boxes"),
           ("table", "tables"), ("door", "doors"), ("car", "cars"), ("letter", "letters"))  # fmt: skip
_GENDERED = _MALE + _FEMALE
_PEOPLE = _NEUTRAL + _GENDERED
_NOUNS = _PEOPLE + _THINGS
_COPULA = (("is", "are"), ("was", "were"))
_INTRANSITIVE = (("laughs", "laugh"), ("sleeps", "sleep"), ("smiles", "smile"),
                 ("waits", "wait"), ("runs", "run"))  # fmt: skip
_TRANSITIVE = (("likes", "like"), ("sees", "see"), ("knows", "know"), ("helps", "help"),
               ("hates", "hate"))  # fmt: skip
# "that" is a determiner here, so relative clauses use "who" to keep it unambiguous.
_DETERMINERS = (("this", "these"), ("that", "those"), ("one", "two"))
_REFLEXIVE_PLURAL = "themselves"
_REFLEXIVE_SINGULAR = {**{sg: "himself" for sg, _ in _MALE}, **{sg: "herself" for sg, _ in _FEMALE}}
# Past tense does not agree, so these verbs leave the cue as the only evidence.
_PAST_OBJECT = ("saw", "found", "bought", "liked")
_PAST_REFLEXIVE = ("hurt", "blamed", "saw", "liked")
_PREPOSITIONS = ("near", "behind", "with", "under")
_ADJECTIVES = ("small", "old", "red", "new", "big")
_PREDICATES_PEOPLE = ("happy", "tired", "young", "busy")
_PREDICATES_THINGS = ("small", "old", "red", "broken")
_TAILS = ("", " again", " today", " here")

# Grammatical number of every word that agrees: tests check target/foil against cues with it.
NUMBER: dict[str, str] = {
    **{sg: "sg" for sg, _ in _NOUNS + _COPULA + _INTRANSITIVE + _TRANSITIVE + _DETERMINERS},
    **{pl: "pl" for _, pl in _NOUNS + _COPULA + _INTRANSITIVE + _TRANSITIVE + _DETERMINERS},
    "himself": "sg",
    "herself": "sg",
    _REFLEXIVE_PLURAL: "pl",
}
CONSTRUCTIONS = ("sv-pp", "sv-rc", "det-noun", "anaphor")
_TRAIN_WEIGHTS = (0.3, 0.25, 0.2, 0.25)  # relative clauses and anaphors are the harder ones


def _pick(rng: random.Random, pairs: tuple, unlike: tuple | None = None) -> tuple:
    """A (singular, plural) pair, different from ``unlike`` so cue and attractor never share a word."""
    while (pair := rng.choice(pairs)) == unlike:
        pass
    return pair


def _predicate(rng: random.Random, head: tuple) -> tuple[tuple[str, str], str]:
    """A verb pair (3sg, plural) and what follows it, fitting the subject ``head``."""
    if head in _THINGS or rng.random() < 0.5:
        predicates = _PREDICATES_THINGS if head in _THINGS else _PREDICATES_PEOPLE
        return rng.choice(_COPULA), f" {rng.choice(predicates)}."
    return rng.choice(_INTRANSITIVE), f"{rng.choice(_TAILS)}."


def _sentence(rng: random.Random, construction: str, plural: bool, attractor: bool | None) -> dict:
    """One sentence cut before its agreeing word: probe keys (no id) plus its meta keys.

    attractor: the distractor noun's number (True = plural); None drops the
    distractor phrase (sv-pp, anaphor) or picks its number at random (others).
    """
    n = int(plural)
    a = int(rng.random() < 0.5) if attractor is None else int(attractor)
    prep = rng.choice(_PREPOSITIONS)
    if construction == "sv-pp":  # the key near the cabinets | is
        head = _pick(rng, _NOUNS)
        other = _pick(rng, _NOUNS, head)
        verb, rest = _predicate(rng, head)
        pp = "" if attractor is None else f" {prep} the {other[a]}"
        prefix, target, cue = f"the {head[n]}{pp}", verb, head[n]
    elif construction == "sv-rc":  # the author who the guards like | laughs
        head = _pick(rng, _PEOPLE)
        other = _pick(rng, _PEOPLE, head)
        verb, rest = _predicate(rng, head)
        rc_verb = rng.choice(_TRANSITIVE)[a]
        prefix, target, cue = f"the {head[n]} who the {other[a]} {rc_verb}", verb, head[n]
    elif construction == "det-noun":  # the boys bought this old | book
        other = _pick(rng, _PEOPLE)
        det = rng.choice(_DETERMINERS)
        adjectives = "".join(f" {w}" for w in rng.sample(_ADJECTIVES, rng.randint(0, 2)))
        prefix = f"the {other[a]} {rng.choice(_PAST_OBJECT)} {det[n]}{adjectives}"
        target, rest, cue = _pick(rng, _THINGS), ".", det[n]
    elif construction == "anaphor":  # the boys near the king hurt | themselves
        head = _pick(rng, _GENDERED)
        other = _pick(rng, _GENDERED, head)
        pp = "" if attractor is None else f" {prep} the {other[a]}"
        prefix = f"the {head[n]}{pp} {rng.choice(_PAST_REFLEXIVE)}"
        target, rest, cue = (_REFLEXIVE_SINGULAR[head[0]], _REFLEXIVE_PLURAL), ".", head[n]
    else:
        raise ValueError(
            f"construction must be one of {', '.join(CONSTRUCTIONS)}, got {construction!r}"
        )
    number = "pl" if plural else "sg"
    return {
        "text": prefix,
        "target": target[n],
        "foil": target[1 - n],
        "cues": [cue],
        # Every other word that agrees in number, with the cue's opposite number: the
        # distractor noun, and in a relative clause its verb too ("who the guards like").
        "attractors": [w for w in prefix.split()
                       if w != cue and NUMBER.get(w, number) != number],
        "rest": rest,
        "construction": construction,
        "number": "pl" if plural else "sg",
        "attractor": None if attractor is None else other[a],
    }


def _full(probe: dict) -> str:
    return f"{probe['text']} {probe['target']}{probe['rest']}"


def _agreement(*, seed: int, num_train: int | None, num_probes: int, val_fraction: float) -> Corpus:
    num_train = 20_000 if num_train is None else num_train
    num_val = max(1, round(num_train * val_fraction / (1.0 - val_fraction)))

    # Probes: a balanced round-robin over constructions and numbers, always with an
    # attractor of the opposite number (the case where a heuristic fails).
    probe_rng = random.Random(f"agreement-probes-{seed}")
    probes, seen, counts = [], set(), dict.fromkeys(CONSTRUCTIONS, 0)
    for i in range(num_probes):
        construction, plural = CONSTRUCTIONS[i % 4], (i // 4) % 2 == 1
        for _ in range(1000):
            probe = _sentence(probe_rng, construction, plural, attractor=not plural)
            if (key := f"{probe['text']} {probe['target']}") not in seen:
                break
        else:
            raise ValueError(
                f"num_probes={num_probes} is more than the grammar has distinct probes"
            )
        seen.add(key)
        probes.append({"id": f"{construction}-{counts[construction]:03d}", **probe})
        counts[construction] += 1
    probes, meta = _split_meta(probes)

    # Training text: numbers and attractors at random; a sentence that would contain
    # a probe's prefix + target is redrawn, so the probes stay held out.
    rng = random.Random(f"agreement-train-{seed}")
    sentences = []
    while len(sentences) < num_train + num_val:
        construction = rng.choices(CONSTRUCTIONS, _TRAIN_WEIGHTS)[0]
        attractor = None if rng.random() < 0.2 else rng.random() < 0.5
        s = _sentence(rng, construction, rng.random() < 0.5, attractor)
        if f"{s['text']} {s['target']}" not in seen:
            sentences.append(_full(s))
    return Corpus("agreement", sentences[:num_train], sentences[num_train:], probes, meta)


def _split_meta(probes: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """Probe dicts with only the probe keys, and the other keys by probe id."""
    keys = ("id", "text", "target", "foil", "cues", "attractors")
    return (
        [{k: p[k] for k in keys} for p in probes],
        {p["id"]: {k: v for k, v in p.items() if k not in keys} for p in probes},
    )


# --------------------------------------------------------------------------------------
# Text corpora: paragraphs are the documents; probes are held-out sentences whose last
# word is the target.

_RULE = re.compile(r"([*=\-~^#_+])\1{2,}")  # heading underlines in reST and plain text
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_LAST_WORD = re.compile(r"([A-Za-z]+)([.!?]+)")
_PROBE_WORDS = (8, 40)  # moderate length: enough context, short enough to read


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs; prose is joined into one line, indented blocks kept."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln.rstrip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln.strip() and not _RULE.fullmatch(ln.strip())]
        if not lines:
            continue
        if lines[0][:1].isspace():  # code or grammar: its layout is its meaning
            out.append(textwrap.dedent("\n".join(lines)))
        else:
            out.append(" ".join(" ".join(lines).split()))
    return out


def _probe_candidates(paragraph: str) -> list[dict]:
    if "\n" in paragraph:  # only prose paragraphs hold sentences
        return []
    out = []
    for sentence in _SENTENCE_END.split(paragraph):
        words = sentence.split()
        m = _LAST_WORD.fullmatch(words[-1]) if words else None
        if m and _PROBE_WORDS[0] <= len(words) <= _PROBE_WORDS[1]:
            out.append(
                {
                    "text": " ".join(words[:-1]),
                    "target": m[1],
                    "foil": None,
                    "cues": [],
                    "attractors": [],
                    "rest": m[2],
                }
            )
    return out


def _text_corpus(
    name: str,
    paragraphs: list[str],
    *,
    id_prefix: str,
    seed: int,
    num_train: int | None,
    num_probes: int,
    val_fraction: float,
) -> Corpus:
    if len(paragraphs) < 2:
        raise ValueError(f"corpus {name!r} needs at least 2 paragraphs, found {len(paragraphs)}")
    rng = random.Random(seed)
    paragraphs = list(paragraphs)
    rng.shuffle(paragraphs)

    # Probes come from the validation paragraphs; grow that share when it holds too few
    # candidate sentences, up to half of the text. Text repeats across documents
    # (boilerplate), so a candidate must occur exactly once in the whole corpus.
    corpus_text = "\n".join(" ".join(p.split()) for p in paragraphs)
    num_val = min(max(1, round(len(paragraphs) * val_fraction)), len(paragraphs) - 1)
    unique, i = {}, 0
    while i < num_val or (len(unique) < num_probes and num_val < len(paragraphs) // 2):
        for c in _probe_candidates(paragraphs[i]):
            key = f"{c['text']} {c['target']}"
            if key not in unique and corpus_text.count(key) == 1:
                unique[key] = c
        i += 1
        num_val = max(num_val, i)
    val, train = paragraphs[:num_val], paragraphs[num_val:]
    train = train if num_train is None else train[:num_train]
    chosen = rng.sample(list(unique.values()), min(num_probes, len(unique)))
    if len(chosen) < num_probes:
        logger.warning(
            "corpus %r has %d probe sentences, fewer than num_probes=%d",
            name,
            len(chosen),
            num_probes,
        )
    probes, meta = _split_meta([{"id": f"{id_prefix}-{i:03d}", **c} for i, c in enumerate(chosen)])
    return Corpus(name, train, val, probes, meta)


def _pydoc_paragraphs() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise RuntimeError(
            "corpus 'docs' needs pydoc_data, which this Python build lacks "
            "(some distributions strip it); pass a local .txt file or directory instead"
        ) from e
    return [p for topic in sorted(topics) for p in _paragraphs(topics[topic])]


def _local_paragraphs(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
        if not files:
            raise ValueError(f"corpus directory {str(path)!r} holds no .txt or .md files")
    else:
        files = [path]
    return [p for f in files for p in _paragraphs(f.read_text(encoding="utf-8", errors="replace"))]


def _hf_paragraphs(spec: str) -> list[str]:
    dataset, _, config = spec.removeprefix("hf:").partition(":")
    if not dataset:
        raise ValueError(f"corpus {spec!r} must name a dataset: hf:<dataset>[:<config>]")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"corpus {spec!r} needs the Hugging Face datasets package: pip install datasets"
        ) from e
    try:
        data = datasets.load_dataset(dataset, config or None, split="train")
    except Exception as e:
        raise RuntimeError(
            f"could not load Hugging Face dataset {dataset!r}: if it is not in the local cache, "
            f"loading it needs a network ({type(e).__name__}: {e})"
        ) from e
    if "text" not in data.column_names:
        raise ValueError(f"dataset {dataset!r} has no 'text' column, only {data.column_names}")
    return [p for row in data["text"] if row for p in _paragraphs(row)]
