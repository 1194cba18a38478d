"""`catalog`: which stores exist at a path, which one a selector picks, and which store a
run writes.

Checks what `find_runs` reports of a store (run id, loggers, steps, the run it continues)
and of the stores later fresh runs wrote beside it; `select_runs` / `find_store` by
``all``, ``latest``, a full id or a unique prefix, and the "which run?" errors listing the
runs (at most ten by name); `claim_store`: of two runs claiming one directory at the same
moment exactly one gets it and the other writes beside it, and an old store without a run
record is never taken over; `choose_store` for a fresh run, a driver fitting on, a resume
into its own store and a resume whose store is gone; `new_run_record`; `empty_store_reason`.
(The bounded search below a run directory is tested in test_store.py, fresh runs side by
side in real Trainer runs in test_run_identity.py.)
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pandas as pd
import pytest

from normx_callbacks.catalog import (
    RunInfo,
    choose_store,
    claim_store,
    empty_store_reason,
    find_runs,
    find_store,
    new_run_record,
    run_info,
    select_runs,
)
from normx_callbacks.store import (
    RUN_FILE,
    SnapshotStore,
    StoreError,
    read_run_record,
    sibling_root,
    write_run_record,
)

TABLE = {"metrics": pd.DataFrame({"key": ["a"], "value": [1.0]})}


def make_store(root, run_id: str | None, steps=(0,), mtime: float | None = None,
               **record) -> None:
    """A store at ``root`` with a run record (unless ``run_id`` is None) and ``steps``."""
    if run_id is not None:
        write_run_record(root, {"run_id": run_id, "created": "2024-01-01T00:00:00+00:00",
                                "loggers": [], "continues": None, **record})
    store = SnapshotStore(root)
    for step in steps:
        store.write(step, TABLE)
    if mtime is not None:
        os.utime(root / "_commits", (mtime, mtime))


class NamedLogger:
    def __init__(self, name, version):
        self.name, self.version = name, version


class WandbLogger(NamedLogger):
    """Named as Lightning's: its version is the W&B run id."""


class BrokenLogger:
    name = "broken"

    @property
    def version(self):
        raise OSError("no experiment yet")


# --------------------------------------------------------------------------- find_runs


def test_a_store_is_listed_with_its_record_and_the_stores_written_beside_it(tmp_path):
    root = tmp_path / "normx"
    first, second = "a" * 32, "b" * 32
    make_store(root, first, steps=(0, 1, 2), mtime=86400.0,
               loggers=[{"type": "TensorBoardLogger", "version": 3}])
    make_store(sibling_root(root, second), second, steps=(5,), continues=first)
    (tmp_path / "normx-notarun").mkdir()  # not `<name>-<8 hex>`: not a sibling
    make_store(tmp_path / "normx-old", "c" * 32)  # a store, but not named as a sibling

    runs = find_runs(root)
    assert [r.path for r in runs] == [root, tmp_path / f"normx-{second[:8]}"]
    mine, beside = runs
    assert (mine.run_id, mine.steps, mine.loggers, mine.continues) == (
        first, 3, "TensorBoardLogger 3", None)
    assert (beside.run_id, beside.steps, beside.continues) == (second, 1, first)
    assert mine.last_write == 86400.0  # the last commit
    assert mine.describe() == (f"run {first}, TensorBoardLogger 3, 3 step(s), last write "
                               f"1970-01-02T00:00:00+00:00: {root}")
    assert beside.describe().endswith(f"continues run {first}: {beside.path}")


def test_run_info_of_a_store_without_a_record_or_a_write():
    info = RunInfo(path=Path("/x"), run_id=None, created=None, loggers="",
                   continues=None, steps=0, last_write=0.0)
    assert info.describe() == "run (no run id), no logger, 0 step(s), last write never: /x"


def test_run_info_reads_a_store_written_before_run_records(tmp_path):
    make_store(tmp_path / "normx", None, steps=(0, 4))
    info = run_info(tmp_path / "normx")
    assert (info.run_id, info.steps, info.loggers) == (None, 2, "")


# --------------------------------------------------------------------------- selecting


@pytest.fixture
def three_runs(tmp_path) -> list[RunInfo]:
    ids = ["0123aaaa" + "0" * 24, "0123bbbb" + "0" * 24, "ffff0000" + "0" * 24]
    for i, (run_id, mtime) in enumerate(zip(ids, (1000.0, 3000.0, 2000.0), strict=True)):
        make_store(tmp_path / f"version_{i}" / "normx", run_id, mtime=mtime)
    runs = find_runs(tmp_path)
    assert [r.run_id for r in runs] == ids
    return runs


def test_select_by_all_latest_full_id_and_unique_prefix(three_runs):
    a, b, c = three_runs
    assert select_runs(three_runs, "all") == three_runs
    assert select_runs(three_runs, "latest") == [b]  # written last, whatever its path
    assert select_runs(three_runs, c.run_id) == [c]
    assert select_runs(three_runs, "0123b") == [b]
    assert select_runs(three_runs, "FFFF") == [c]  # ids are lowercase hex: case-insensitive


@pytest.mark.parametrize(("selector", "match"), [
    ("0123", r"run '0123' matches 2 runs; the runs are: \(1\) run 0123aaaa"),
    ("9999", r"run '9999' matches no run; the runs are: \(1\) .*\(3\) run ffff0000"),
], ids=["several", "none"])
def test_a_selector_that_picks_none_or_several_lists_the_runs(three_runs, selector, match):
    with pytest.raises(StoreError, match=match) as caught:
        select_runs(three_runs, selector)
    assert str(caught.value).endswith("pass a full run id, a unique prefix, 'latest' or 'all'")


@pytest.mark.parametrize("selector", ["", None, 3])
def test_a_selector_that_is_not_a_string_is_a_value_error(three_runs, selector):
    with pytest.raises(ValueError, match=r"must be a run id, a unique prefix of one, 'latest'"):
        select_runs(three_runs, selector)


def test_find_store_needs_a_selector_when_several_runs_are_there(three_runs, tmp_path):
    with pytest.raises(StoreError, match=r"holds 3 normx stores, one run each: \(1\) .*; choose "
                                         r"one: `normx \.\.\. --run ID`"):
        find_store(tmp_path)
    assert find_store(tmp_path, "latest") == three_runs[1].path
    assert find_store(tmp_path / "version_2") == three_runs[2].path  # one store: no selector
    with pytest.raises(StoreError, match=r"run 'all' selects 3 runs where one is needed"):
        find_store(tmp_path, "all")


def test_more_than_ten_runs_list_the_ten_written_last_and_count_the_rest(tmp_path):
    for i in range(12):
        make_store(tmp_path / f"version_{i}" / "normx", f"{i:08x}" + "0" * 24,
                   mtime=1000.0 + i)
    with pytest.raises(StoreError) as caught:
        find_store(tmp_path)
    message = str(caught.value)
    assert "the 10 written last: (1) run 0000000b" in message  # the newest first
    assert "(10) run 00000002" in message and "run 00000001" not in message
    assert "; and 2 more, not listed" in message


# --------------------------------------------------------------------------- claiming


def test_two_runs_claiming_one_directory_at_once_get_one_store_each(tmp_path):
    for attempt in range(10):
        root = tmp_path / f"attempt{attempt}" / "normx"
        runs = [new_run_record(), new_run_record()]
        start = threading.Barrier(2)
        got: dict[int, object] = {}

        def claim(i: int, runs=runs, start=start, got=got, root=root) -> None:
            start.wait()
            got[i] = claim_store(root, runs[i], "test", quiet=True)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winner = read_run_record(root)["run_id"]
        assert winner in (runs[0]["run_id"], runs[1]["run_id"])
        loser = 1 if winner == runs[0]["run_id"] else 0
        assert got[1 - loser] == root
        assert got[loser] == sibling_root(root, runs[loser]["run_id"])
        assert read_run_record(got[loser]) == json.loads(json.dumps(runs[loser]))
        # No temp file is left behind by either claim.
        assert sorted(p.name for p in root.iterdir()) == [RUN_FILE]


def test_an_old_store_without_a_record_is_never_taken_over(tmp_path, caplog):
    root = tmp_path / "normx"
    make_store(root, None, steps=(0, 1))
    run = new_run_record()
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        got = claim_store(root, run, "Who")
    assert got == sibling_root(root, run["run_id"])
    assert read_run_record(root) is None and read_run_record(got)["run_id"] == run["run_id"]
    assert f"Who: {root} holds another run's store (run without a run id)" in caplog.text
    # A directory no run has claimed is claimed in place; another run's record, or an old
    # store's missing record, makes it taken.
    assert claim_store(tmp_path / "fresh", new_run_record(), "Who") == tmp_path / "fresh"
    SnapshotStore(tmp_path / "missing").mark_missing(0, "the probe forward failed")
    write_run_record(tmp_path / "other", new_run_record())
    for name in ("missing", "other"):
        run = new_run_record()
        assert claim_store(tmp_path / name, run, "Who") == sibling_root(tmp_path / name,
                                                                        run["run_id"])


# --------------------------------------------------------------------------- choose_store


def test_a_driver_fitting_on_keeps_its_store(tmp_path):
    current = new_run_record()
    assert choose_store(tmp_path, restored=None, current=current, going_on=True) is None
    root, record, claimed = choose_store(tmp_path / "normx", restored=None, current=current,
                                         going_on=False)  # a new fit: a new run
    assert claimed and record["run_id"] != current["run_id"]
    assert read_run_record(root) == record


def test_a_resume_writes_into_the_store_of_the_run_it_came_from(tmp_path):
    old = tmp_path / "first" / "normx"
    make_store(old, "d" * 32)
    restored = {"run_id": "d" * 32, "store": str(old)}
    # The resumed run's logger writes elsewhere: the store follows the run, not the logger.
    root, record, claimed = choose_store(tmp_path / "second" / "normx", restored=restored,
                                         current=None, going_on=False)
    assert (root, record["run_id"], claimed) == (old, "d" * 32, False)
    assert not (tmp_path / "second").exists()


def test_a_resume_whose_store_is_gone_writes_a_store_that_names_the_run_it_continues(
        tmp_path, caplog):
    restored = {"run_id": "e" * 32, "store": str(tmp_path / "deleted" / "normx")}
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        root, record, claimed = choose_store(tmp_path / "normx", restored=restored,
                                             current=None, going_on=False, owner="Who")
    assert root == tmp_path / "normx" and claimed
    assert record["continues"] == "e" * 32 and record["run_id"] != "e" * 32
    assert read_run_record(root) == record
    assert f"Who: the store of run {'e' * 32}" in caplog.text and "is gone" in caplog.text


def test_a_checkpoint_from_before_run_records_keeps_writing_its_store(tmp_path):
    make_store(tmp_path / "normx", None, steps=(0, 2))
    old_checkpoint = {"run_id": None, "store": None}
    root, record, claimed = choose_store(tmp_path / "normx", restored=old_checkpoint,
                                         current=None, going_on=False)
    assert root == tmp_path / "normx" and not claimed  # the engine writes the record itself
    assert read_run_record(root) is None and record["continues"] is None


# --------------------------------------------------------------------------- records


def test_new_run_record_describes_the_loggers_and_the_wandb_run(caplog):
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        record = new_run_record([NamedLogger("tb", 0), WandbLogger("proj", "w4nd8id"),
                                 BrokenLogger()], continues="f" * 32)
    assert len(record["run_id"]) == 32 and int(record["run_id"], 16) >= 0
    assert record["loggers"] == [
        {"type": "NamedLogger", "name": "tb", "version": 0},
        {"type": "WandbLogger", "name": "proj", "version": "w4nd8id"},
        {"type": "BrokenLogger", "name": "broken", "version": None},
    ]
    assert record["wandb_run_id"] == "w4nd8id" and record["continues"] == "f" * 32
    assert "BrokenLogger.version raised OSError: no experiment yet" in caplog.text
    assert new_run_record()["run_id"] != new_run_record()["run_id"]
    assert new_run_record()["wandb_run_id"] is None


def test_empty_store_reason_tells_empty_from_half_written(tmp_path):
    empty = tmp_path / "empty"
    write_run_record(empty, new_run_record())
    assert empty_store_reason(empty) == (
        f"{empty} is an empty store: the run has not written a snapshot yet (wait for the "
        "first one, or check the callback's store_dir)")
    half = tmp_path / "half"
    for table in ("tokens", "metrics"):
        (half / table).mkdir(parents=True)
        (half / table / "step=000000000.parquet").write_bytes(b"PAR1")
    assert empty_store_reason(half).startswith(
        f"{half} is a half-written store: 2 table file(s) but no commit marker")
    whole = tmp_path / "whole"
    make_store(whole, "1" * 32)
    assert empty_store_reason(whole) is None
    (tmp_path / "other" / "notes").mkdir(parents=True)  # something else: no reason given
    assert empty_store_reason(tmp_path / "other") is None
