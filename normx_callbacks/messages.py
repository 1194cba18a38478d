"""What the package tells a person at a terminal: one line per error or warning, and which
errors are theirs to fix.

`normx` (cli.py) and `normx replay`'s list of bad checkpoints (replay.py) word every message
here. An *anticipated* error is one the package raised on purpose about its input (a store,
a probe file, a checkpoint, a model it cannot read, an option) or one the operating system
raised about a file: the CLI prints it as one line and exits 1. Anything else is a bug,
ours or a library's, and keeps its traceback (exit 2), so it is never mistaken for a
message about the user's input.
"""

from __future__ import annotations

import linecache
import traceback
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

PACKAGE = Path(__file__).resolve().parent


def one_line(error: BaseException | str) -> str:
    """``error``'s message on one line (a message may quote a file's newlines)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def terminal_safe(text: str) -> str:
    """``text`` with no control characters: an ANSI escape in a token or a stored reason
    must not drive the terminal (newlines and tabs shown as arrows, others escaped)."""
    text = str(text).replace("\n", "\u21b5").replace("\t", "\u2192")
    return "".join(c if unicodedata.category(c)[0] != "C" else repr(c)[1:-1] for c in text)


def anticipated(error: BaseException) -> bool:
    """Whether ``error`` is a message about the input rather than a bug.

    True for an `OSError` (a missing file, a full disk, a permission), and for a
    `ValueError` or `RuntimeError` (our error classes derive from them) or an `ImportError`
    (an optional dependency to install) raised by a ``raise`` statement in this package, the
    demo's corpora included. A `ValueError` numpy or torch raises inside our code, or any
    other exception type, is not: its traceback is what a bug report needs.
    """
    if isinstance(error, OSError):
        return True
    if not isinstance(error, (ValueError, RuntimeError, ImportError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    path = Path(last.filename).resolve()
    if not path.is_relative_to(PACKAGE):
        return False
    return linecache.getline(last.filename, last.lineno).lstrip().startswith("raise")


@contextmanager
def warning_lines(write: Callable[[str], object]) -> Iterator[None]:
    """Within the block, each distinct warning is written once as ``warning: <one line>``.

    Python's default filters still apply (third-party deprecation notices stay hidden); what
    the package warns about (skipped probe pairs, multi-token targets, a corrupt snapshot) is
    shown, never silenced.
    """
    seen: set[tuple[type, str]] = set()

    def show(message, category, filename, lineno, file: TextIO | None = None, line=None):
        text = one_line(message)
        if (category, text) not in seen:
            seen.add((category, text))
            write(f"warning: {text}")

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
