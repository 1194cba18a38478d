"""One-line command-line errors for the LightningCLI of `train.py`.

jsonargparse answers a misspelled option with the whole usage text and a nested report of
every type it tried, and an invalid value that a class refuses with a double traceback.
`OneLineParser` turns both into one line: the unknown name with the closest valid one, or
the refused value with the class's own message (which lists the choices). `--debug` (read
by `train.py`) keeps jsonargparse's full output.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Iterable
from typing import NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

DEBUG = {"on": False}  # set by train.py from --debug


def _class_parameters(message: str) -> set[str]:
    """Constructor parameter names of every `class_path` the message mentions."""
    names: set[str] = set()
    paths = re.findall(r"class_path['\"]?(?:[:=]\s*|\s+)['\"]([\w.]+)['\"]", message)
    for path in set(paths):
        module, _, attr = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
            names |= set(inspect.signature(cls).parameters)
            # Options a class takes through **kwargs (NormXLogitCallback's settings), as the
            # config parser itself resolves them.
            parser = ArgumentParser(exit_on_error=False)
            parser.add_class_arguments(cls, "x")
            names |= {o[4:] for a in parser._actions for o in a.option_strings
                      if o.startswith("--x.")}
        except (ImportError, AttributeError, TypeError, ValueError):
            continue
    return names


def _option_names(parser) -> set[str]:
    names = set()
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                names.add(option[2:])
    subcommands = getattr(parser, "_subcommands_action", None)
    if subcommands is not None:
        for sub in subcommands.choices.values():
            names |= _option_names(sub)
    return names


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The valid name nearest to ``name`` (by the last dotted part when that is closer)."""
    candidates = sorted(set(candidates))
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    tail = name.rsplit(".", 1)[-1]
    tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
    match = difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.6)
    return tails[match[0]] if match else None


_UNKNOWN = (
    re.compile(r"[Uu]nrecognized arguments:\s*(--?[\w.\-]+)"),
    re.compile(r"[Kk]ey ['\"]([\w.\-]+)['\"] is not expected"),
    re.compile(r"[Nn]o action for key ['\"]([\w.\-]+)['\"]"),
    re.compile(r"[Uu]nexpected keyword argument ['\"]([\w.\-]+)['\"]"),
    re.compile(r"[Oo]ption ['\"]([\w.\-]+)['\"] is not accepted"),
)


def _settings_refusal(message: str) -> str | None:
    """Our own message for a value of a `Settings` option that the parser refused by type
    (a `Literal` choice): jsonargparse names the key and the value (``NestedArg(key=...)``
    from the command line, the ``init_args`` from a config) but not the choices."""
    from normx_callbacks.settings import Settings

    given: list[dict] = []
    for m in re.finditer(r"NestedArg\(key='(\w+)', val=(.+?)\)\s*$", message, re.M):
        try:
            given.append({m.group(1): ast.literal_eval(m.group(2))})
        except (ValueError, SyntaxError):
            continue
    for m in re.finditer(r"'init_args': (\{[^{}]*\})", message):
        try:
            given.append(ast.literal_eval(m.group(1)))
        except (ValueError, SyntaxError):
            continue
    for options in given:
        try:
            Settings(**{k: v for k, v in options.items() if k in Settings.names()})
        except ValueError as error:
            return str(error)
    return None


def one_line(message: str, parser) -> str:
    """The one line that matters in a jsonargparse error message."""
    refused = _settings_refusal(message)  # before the unknown-key patterns, which match it
    if refused:
        return refused
    for pattern in _UNKNOWN:
        found = pattern.search(message)
        if found:
            name = found.group(1).lstrip("-")
            candidates = _option_names(parser) | _class_parameters(message)
            near = closest(name, candidates)
            hint = f"; did you mean {near!r}?" if near else ""
            return f"unknown option {name!r}{hint}"
    # A value a class refused: its own message, usually the last line naming the choices.
    for line in reversed(message.splitlines()):
        line = line.strip()
        if re.match(r"^(ValueError|TypeError|Expected|Does not|Not a|invalid)", line) or (
                "not one of" in line or "choices" in line):
            return line
    return " ".join(message.split())[:300]


class OneLineParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if DEBUG["on"] or not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"{self.prog.split()[0]}: error: {one_line(message, self)}\n"
                         "(--debug shows the full message)\n")
        sys.exit(2)


def innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of a chain of `raise ... from` (the class's own message)."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def refuse(error: BaseException, prog: str = "train.py") -> NoReturn:
    """Exit with the one line of a value a class refused while the CLI built it."""
    cause = innermost(error)
    text = " ".join(str(cause).split()) or type(cause).__name__
    sys.stderr.write(f"{prog}: error: {text}\n(--debug shows the traceback)\n")
    sys.exit(2)
