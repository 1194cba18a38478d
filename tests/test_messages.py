"""messages.py: one line per message, and which errors are the user's to fix."""

import warnings

import numpy as np
import pytest

from normx_callbacks import Settings, StoreError
from normx_callbacks.messages import anticipated, one_line, terminal_safe, warning_lines
from normx_callbacks.probes import ProbeSet


def _caught(make) -> BaseException:
    try:
        make()
    except BaseException as error:  # noqa: BLE001 - the error itself is what is tested
        return error
    raise AssertionError("nothing was raised")


def test_one_line_joins_a_message_and_names_an_empty_one():
    assert one_line(ValueError("a file\nwith  lines\n")) == "a file with lines"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("already\tone") == "already one"


def test_errors_raised_on_purpose_by_the_package_are_anticipated(tmp_path):
    assert anticipated(_caught(lambda: Settings(every_n_steps=0)))
    assert anticipated(_caught(lambda: ProbeSet.from_file(tmp_path / "none.yaml")))
    assert anticipated(_caught(lambda: open(tmp_path / "missing")))  # the system's, about a file

    def ours_but_outside_the_package():
        raise StoreError("raised by a test, not by the package")

    assert not anticipated(_caught(ours_but_outside_the_package))


def test_a_missing_optional_dependency_is_anticipated(monkeypatch):
    import sys

    from normx_callbacks import methods

    monkeypatch.setitem(sys.modules, "captum", None)  # as if Captum were not installed
    error = _caught(lambda: methods.require_captum("integrated_gradients"))
    assert isinstance(error, ImportError) and "needs Captum" in str(error)
    assert anticipated(error)
    assert not anticipated(_caught(lambda: __import__("no_such_module_anywhere")))


def test_bugs_are_not_anticipated():
    assert not anticipated(_caught(lambda: np.zeros(2).reshape(3)))  # numpy's ValueError
    assert not anticipated(_caught(lambda: int("x")))  # a builtin's, in a caller's frame
    assert not anticipated(_caught(lambda: {}["key"]))
    assert not anticipated(ValueError("never raised"))  # no traceback to judge by


def test_warning_lines_show_each_distinct_warning_once_and_restore_the_filters():
    lines: list[str] = []
    before = list(warnings.filters)
    with warning_lines(lines.append):
        for _ in range(3):
            warnings.warn("probe a\nskipped", UserWarning, stacklevel=1)
        warnings.warn("probe b skipped", UserWarning, stacklevel=1)
    assert lines == ["warning: probe a skipped", "warning: probe b skipped"]
    assert warnings.filters == before
    with pytest.warns(UserWarning, match="outside"):  # shown as usual after the block
        warnings.warn("outside", UserWarning, stacklevel=1)


def test_terminal_safe_text_cannot_drive_the_terminal():
    assert terminal_safe("red\x1b[31m token") == "red\\x1b[31m token"  # the escape is shown
    assert terminal_safe("a\nb\tc") == "a\u21b5b\u2192c"
    assert terminal_safe("caf\u00e9 \u2603") == "caf\u00e9 \u2603"  # printable text unchanged
