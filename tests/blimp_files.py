"""BLiMP-format files the tests write themselves (BLiMP's own sentences are not shipped):
`PARADIGMS` and `write_blimp(root)`, one .jsonl per paradigm (our own code)."""

from __future__ import annotations

import json

# (prefix, good word, bad word, rest of the sentence) per paradigm.
PARADIGMS = {
    "sv_agreement": [("the key near the cabinets", "is", "are", "red"),
                     ("the keys near the cabinet", "are", "is", "red"),
                     ("the boy with the books", "is", "are", "happy")],
    "det_noun": [("the girl saw these", "books", "book", "again"),
                 ("the man found this", "box", "boxes", "today")],
}


def pair(uid: str, i: int, prefix: str, good: str, bad: str, rest: str, **extra) -> dict:
    return {"sentence_good": f"{prefix} {good} {rest}.", "sentence_bad": f"{prefix} {bad} {rest}.",
            "one_prefix_method": True, "one_prefix_prefix": prefix, "one_prefix_word_good": good,
            "one_prefix_word_bad": bad, "field": "syntax", "linguistics_term": "agreement",
            "UID": uid, "pairID": str(i), **extra}


def write_blimp(root, *, extras: bool = False):
    """One .jsonl per paradigm; with `extras`, one pair without a one-prefix form and one
    whose words are the same (both skipped)."""
    root.mkdir(parents=True, exist_ok=True)
    for uid, pairs in PARADIGMS.items():
        rows = [pair(uid, i, *p) for i, p in enumerate(pairs)]
        if extras and uid == "det_noun":
            rows.append({**pair(uid, 90, "the girl", "is", "is", "here")})
            rows.append({**pair(uid, 91, "the girl", "is", "are", "here"),
                         "one_prefix_method": False})
        (root / f"{uid}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return root
