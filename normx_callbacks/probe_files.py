"""Reading probe files: YAML/JSON/JSONL probe lists and BLiMP minimal-pair files.

Each reader returns the raw items with where each came from (file and line), so that
`ProbeSet` validates them in one place and every error points into the file. Nothing is
executed: YAML is read with the safe loader (a ``!!python/object`` tag is refused).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .probes import MASK_PLACEHOLDER, SUFFIXES, ProbeError

_BLIMP_KEYS = ("one_prefix_prefix", "one_prefix_word_good", "one_prefix_word_bad", "UID", "pairID")


def read_probe_file(path: str | os.PathLike[str]) -> tuple[list[Any], list[str]]:
    """Load probes from ``.yaml``/``.yml`` (a list, or a mapping with key ``probes``),
    ``.jsonl`` (one object or string per line) or ``.json`` (a list).

    Returns the items and, per item, where it is (file and line).
    """
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
    return items, wheres


def read_blimp(paths: Any) -> tuple[list[dict[str, Any]], list[str], list[str | None], str]:
    """The probes of BLiMP-format files (`ProbeSet.from_blimp` documents the mapping):
    items, where each is, each pair's masked-LM form (None when it has none) and the source
    name."""
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
            stacklevel=3,
        )
    return items, wheres, masked, ", ".join(map(str, files))


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
