"""`settings.Settings` and `check_options`: what every driver's options are checked against.

Checks that each closed choice refuses a value outside it and accepts every value its
`Literal` annotation lists (the annotation LightningCLI reads and the runtime check agree),
the numeric bounds (bool is not an int), the `layers` forms, the faithfulness and alignment
method names, that sequences are stored as tuples (a frozen, hashable object no caller can
change afterwards), the schedule built from the options, and the unknown-option message:
the closest valid name, or the new name of a renamed option.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from normx_callbacks.methods import FORWARD_METHODS, METHODS
from normx_callbacks.settings import RENAMED, Settings, check_options

CHOICES = {"schedule": "log", "norm": "layer0", "objective": "auto",
           "faithfulness_replacement": "auto", "writer": "process"}


def _literal_values(name: str) -> tuple:
    """The values a `Literal` field's annotation allows (LightningCLI's view of it)."""
    hint = typing.get_type_hints(Settings)[name]
    return typing.get_args(hint)


def test_defaults_are_valid_and_every_field_is_named():
    settings = Settings()
    assert settings.names() == tuple(f.name for f in dataclasses.fields(Settings))
    assert {name: getattr(settings, name) for name in CHOICES} == CHOICES
    assert settings.faithfulness_methods == FORWARD_METHODS
    assert settings.layer_list == "all"


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_each_choice_accepts_its_literal_values_and_refuses_others(name):
    allowed = _literal_values(name)
    assert CHOICES[name] in allowed
    for value in allowed:
        extra = {"steps": [5]} if (name, value) == ("schedule", "steps") else {}
        assert getattr(Settings(**{name: value}, **extra), name) == value
    with pytest.raises(ValueError, match=rf"^{name}='bogus' is not one of \(") as caught:
        Settings(**{name: "bogus"})
    # The message lists exactly the values the annotation allows.
    listed = str(caught.value).split(" is not one of ")[1]
    assert listed == repr(tuple(allowed))


@pytest.mark.parametrize(("name", "least"), [
    ("top_k", 0), ("media_probes", 0), ("history_length", 0),
    ("probe_batch_size", 1), ("faithfulness_probes", 1), ("max_pending", 1),
    ("faithfulness_every", 1),
])
def test_integer_options_have_a_lower_bound_and_refuse_bools_and_floats(name, least):
    assert getattr(Settings(**{name: least}), name) == least
    kind = "positive" if least else "non-negative"
    for bad in (least - 1, True, 2.0):
        with pytest.raises(ValueError, match=rf"^{name}={bad!r} must be a {kind} integer$"):
            Settings(**{name: bad})


def test_faithfulness_every_none_turns_it_off():
    assert Settings(faithfulness_every=None).faithfulness_every is None


@pytest.mark.parametrize(("layers", "stored", "as_list"), [
    ("all", "all", "all"),
    (None, None, None),
    ([0, -1], (0, -1), [0, -1]),
    (range(3), (0, 1, 2), [0, 1, 2]),
    ((2,), (2,), [2]),
])
def test_layers_forms_are_kept_as_a_tuple_and_given_to_normxlogit_as_a_list(layers, stored,
                                                                           as_list):
    settings = Settings(layers=layers)
    assert settings.layers == stored
    assert settings.layer_list == as_list


@pytest.mark.parametrize(("layers", "match"), [
    ("last", r"layers='last': use 'all', None or a list of layer indices"),
    ([], r"layers=\[\]: use 'all', None or a non-empty list"),
    ([0, "1"], r"layers=\[0, '1'\]"),
    ([True], r"layers=\[True\]"),
])
def test_bad_layers_are_refused(layers, match):
    with pytest.raises(ValueError, match=match):
        Settings(layers=layers)


def test_faithfulness_and_alignment_method_names_are_checked():
    assert Settings(faithfulness_methods=["random", "normxlogit"]).faithfulness_methods == (
        "random", "normxlogit")
    with pytest.raises(ValueError, match=r"unknown \['lime'\]; valid names are "
                                         + re.escape(repr(METHODS))):
        Settings(faithfulness_methods=["normxlogit", "lime"])
    with pytest.raises(ValueError, match=r"faithfulness_methods=\[\]: unknown \[\]"):
        Settings(faithfulness_methods=[])
    assert Settings(alignment_methods=None).alignment_methods is None
    assert Settings(alignment_methods=["saliency"]).alignment_methods == ["saliency"]
    with pytest.raises(ValueError, match=r"alignment_methods='all': use 'installed'"):
        Settings(alignment_methods="all")
    with pytest.raises(ValueError, match=r"\['random'\] are not gradient methods"):
        Settings(alignment_methods=["random"])


def test_count_fn_must_be_callable():
    assert Settings(count_fn=len).count_fn is len
    with pytest.raises(ValueError, match=r"count_fn='input_ids' must be a callable"):
        Settings(count_fn="input_ids")


def test_sequences_become_tuples_so_the_frozen_settings_are_hashable_and_unshared():
    steps, words, methods = [8, 2], ["is", "are"], ["normxlogit", "random"]
    settings = Settings(schedule="steps", steps=steps, track_tokens=words,
                        faithfulness_methods=methods)
    assert (settings.steps, settings.track_tokens, settings.faithfulness_methods) == (
        (8, 2), ("is", "are"), ("normxlogit", "random"))
    steps.append(99)
    words.clear()
    methods.pop()
    assert settings.steps == (8, 2) and settings.track_tokens == ("is", "are")
    assert settings.faithfulness_methods == ("normxlogit", "random")
    # Equal options give equal, hashable settings (a list field would make hash() fail).
    again = Settings(schedule="steps", steps=(8, 2), track_tokens=("is", "are"),
                     faithfulness_methods=("normxlogit", "random"))
    assert again == settings and hash(again) == hash(settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.top_k = 3  # type: ignore[misc]


def test_a_single_word_is_one_tracked_token_and_one_method():
    # A bare string is one word, not its characters (as a probe's bare cue is).
    assert Settings(track_tokens="is").track_tokens == ("is",)
    assert Settings(faithfulness_methods="random").faithfulness_methods == ("random",)


def test_the_schedule_is_built_from_the_options_and_checked_at_construction():
    assert Settings(every_n_steps=8).snapshot_schedule().upto(20) == [0, 1, 2, 4, 8, 16]
    assert Settings(schedule="interval", every_n_steps=5).snapshot_schedule().upto(12) == [
        0, 5, 10]
    assert Settings(every_n_steps=27, log_base=3).snapshot_schedule().upto(30) == [
        0, 1, 3, 9, 27]
    assert Settings(schedule="steps", steps=[7, 3]).snapshot_schedule().upto(10) == [0, 3, 7]
    with pytest.raises(ValueError, match=r"schedule='steps' needs a non-empty steps"):
        Settings(schedule="steps")
    with pytest.raises(ValueError, match=r"every_n_steps=0 must be a positive integer"):
        Settings(every_n_steps=0)


def test_check_options_accepts_known_options_and_names_the_closest_for_a_typo():
    check_options({"every_n_steps": 5, "writer": "thread"}, "Who")  # no error
    with pytest.raises(ValueError, match=r"^Who: unknown option 'every_n_step'; did you mean "
                                         r"'every_n_steps'\?$"):
        check_options({"every_n_steps": 5, "every_n_step": 5}, "Who")
    with pytest.raises(ValueError, match=r"^Who: unknown option 'xyzzy'; valid: \('schedule', "):
        check_options({"xyzzy": 1}, "Who")


def test_check_options_gives_the_new_name_of_a_renamed_option():
    assert RENAMED == {"worker": "writer"}
    with pytest.raises(ValueError, match=r"^NormXLogitMonitor: unknown option 'worker'; it is "
                                         r"now called 'writer'$"):
        check_options({"worker": "thread"}, "NormXLogitMonitor")
    # What check_options guards against: Settings itself would say less.
    with pytest.raises(TypeError, match="worker"):
        Settings(worker="thread")  # type: ignore[call-arg]
