"""SnapshotSchedule: which global steps get a snapshot, and the argument errors."""

import numpy as np
import pytest

from normx_callbacks import SnapshotSchedule


def test_log_schedule_is_powers_of_two_then_every_n():
    assert SnapshotSchedule("log", every_n_steps=10).upto(45) == [0, 1, 2, 4, 8, 10, 20, 30, 40]
    # Powers that are also multiples are listed once.
    assert SnapshotSchedule("log", every_n_steps=8).upto(24) == [0, 1, 2, 4, 8, 16, 24]


def test_log_schedule_default_is_pythia_like():
    schedule = SnapshotSchedule()
    assert schedule.upto(300) == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300]


def test_log_schedule_other_base():
    assert SnapshotSchedule("log", every_n_steps=30, base=3).upto(60) == [0, 1, 3, 9, 27, 30, 60]


def test_log_schedule_stops_powers_at_the_interval():
    # 128 and 256 are powers of two past every_n_steps: only multiples of 100 count there.
    schedule = SnapshotSchedule("log", every_n_steps=100)
    assert 128 not in schedule and 256 not in schedule and 500 in schedule


def test_interval_schedule():
    assert SnapshotSchedule("interval", every_n_steps=5).upto(17) == [0, 5, 10, 15]
    assert SnapshotSchedule("interval", every_n_steps=1).upto(3) == [0, 1, 2, 3]


def test_steps_schedule_always_includes_step_zero():
    schedule = SnapshotSchedule("steps", steps=[3, 7, 7, 50])
    assert schedule.upto(60) == [0, 3, 7, 50]
    assert schedule.upto(5) == [0, 3]


@pytest.mark.parametrize("steps", [range(2, 7, 2), (s for s in (2, 4, 6)), np.array([2, 4, 6])])
def test_steps_schedule_accepts_any_iterable_of_ints(steps):
    assert SnapshotSchedule("steps", steps=steps).upto(10) == [0, 2, 4, 6]


def test_upto_zero():
    assert SnapshotSchedule().upto(0) == [0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "cosine"}, r"schedule='cosine' is not one of \('log', 'interval', 'steps'\)"),
        ({"every_n_steps": 0}, r"every_n_steps=0 must be a positive integer"),
        ({"every_n_steps": -5}, r"every_n_steps=-5 must be a positive integer"),
        ({"every_n_steps": 2.5}, r"every_n_steps=2.5 must be a positive integer"),
        ({"every_n_steps": True}, r"every_n_steps=True must be a positive integer"),
        ({"base": 1}, r"log_base=1 must be an integer >= 2"),
        ({"base": 1.5}, r"log_base=1.5 must be an integer >= 2"),
        ({"kind": "steps"}, r"schedule='steps' needs a non-empty steps=\[...\] list"),
        ({"kind": "steps", "steps": []}, r"needs a non-empty steps"),
        ({"kind": "steps", "steps": [1, -2]}, r"steps contains \[-2\]: steps must be non-negative"),
        ({"kind": "steps", "steps": [1, 2.5]}, r"steps contains \[2.5\]"),
        ({"kind": "log", "steps": [1, 2]}, r"steps=\[...\] is only used with schedule='steps'"),
        ({"kind": "interval", "steps": [1]}, r"not 'interval'"),
    ],
)
def test_bad_arguments_name_the_value_and_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnapshotSchedule(**kwargs)
