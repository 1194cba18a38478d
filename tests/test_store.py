import copy
import errno
import json
import logging
import shutil
import threading

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from normx_callbacks import catalog
from normx_callbacks import store as store_mod
from normx_callbacks.catalog import empty_store_reason
from normx_callbacks.loading import load_run
from normx_callbacks.store import (
    SCHEMA_VERSION,
    STORE_DIRNAME,
    SnapshotStore,
    StoreError,
    write_run_record,
)


def attributions(step: int, n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "probe": ["p0"] * n,
            "position": np.arange(n, dtype="int64"),
            "token": [f"t{i}" for i in range(n)],
            "score": np.arange(n, dtype="float64") + step / 1000,
        }
    )


def metrics(step: int) -> pd.DataFrame:
    return pd.DataFrame({"name": ["loss", "emb_norm_mean"], "value": [10.0 - step, 1.0 + step]})


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_round_trip_several_tables_and_steps(tmp_path):
    store = SnapshotStore(tmp_path / STORE_DIRNAME, run_meta={"model": "tiny", "seed": 0})
    for step in (0, 100, 200):
        store.write(step, {"attributions": attributions(step), "metrics": metrics(step)})

    run = load_run(tmp_path / STORE_DIRNAME)
    assert run.steps == [0, 100, 200]
    assert store.steps() == [0, 100, 200]
    assert store.has(100) and not store.has(50)
    assert sorted(run.tables) == ["attributions", "metrics"]
    expected = pd.concat(
        [attributions(s).assign(step=s) for s in (0, 100, 200)], ignore_index=True
    )[["step", "probe", "position", "token", "score"]]
    pd.testing.assert_frame_equal(run["attributions"], expected, check_dtype=False)
    assert run.metrics["value"].tolist() == [10.0, 1.0, -90.0, 101.0, -190.0, 201.0]
    assert run.meta["run_meta"] == {"model": "tiny", "seed": 0}
    assert run.missing.empty and list(run.missing.columns) == ["step", "reason", "time"]


def test_schema_on_disk(tmp_path):
    root = tmp_path / "normx"
    store = SnapshotStore(root, run_meta={"model": "tiny"})
    assert not root.exists()  # created lazily
    store.write(7, {"attributions": attributions(7)})

    assert files_under(root) == [
        "_commits/step=000000007.json",
        "attributions/step=000000007.parquet",
        "meta.json",
    ]
    meta = json.loads((root / "meta.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION == 1
    assert meta["run_meta"] == {"model": "tiny"} and meta["created"]
    marker = json.loads((root / "_commits/step=000000007.json").read_text())
    assert marker["step"] == 7
    assert marker["tables"] == {
        "attributions": {"file": "attributions/step=000000007.parquet", "rows": 3}
    }
    schema = pq.read_schema(root / "attributions/step=000000007.parquet")
    assert schema.names[0] == "step" and str(schema.field("step").type) == "int64"


def test_readable_by_plain_pandas(tmp_path):
    SnapshotStore(tmp_path).write(5, {"attributions": attributions(5)})
    df = pd.read_parquet(tmp_path / "attributions" / "step=000000005.parquet")
    assert df["step"].dtype == "int64" and df["step"].tolist() == [5, 5, 5]
    assert df["token"].tolist() == ["t0", "t1", "t2"]
    np.testing.assert_allclose(df["score"], [0.005, 1.005, 2.005])


def test_step_column_validated(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(3, {"m": metrics(3).assign(step=3)})
    assert load_run(tmp_path)["m"]["step"].tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"'step' column that disagrees with step=4 \(found 3\)"):
        store.write(4, {"m": metrics(4).assign(step=3)})
    with pytest.raises(ValueError, match="found dtype float64"):
        store.write(4, {"m": metrics(4).assign(step=4.0)})
    assert store.steps() == [3]


@pytest.mark.parametrize(
    "step, tables, match",
    [
        (-1, {"m": pd.DataFrame()}, "step must be a non-negative int"),
        (1.5, {"m": pd.DataFrame()}, "step must be a non-negative int"),
        (True, {"m": pd.DataFrame()}, "step must be a non-negative int"),
        (1, {"_commits": pd.DataFrame()}, "table name '_commits' is invalid"),
        (1, {"a/b": pd.DataFrame()}, "table name 'a/b' is invalid"),
        (1, {"missing": pd.DataFrame()}, "table name 'missing' is invalid"),
        (1, {"m": [1, 2]}, "must be a pandas.DataFrame, got list"),
        (1, {"m": pd.DataFrame({"x": [1, "a"]})}, "table 'm' cannot be stored as Parquet"),
    ],
)
def test_bad_arguments_raise_value_error_and_touch_nothing(tmp_path, step, tables, match):
    root = tmp_path / "normx"
    with pytest.raises(ValueError, match=match):
        SnapshotStore(root).write(step, tables)
    assert not root.exists()


def test_numpy_step_and_named_index(tmp_path):
    df = pd.DataFrame({"score": [0.5, 0.25]}, index=pd.Index([3, 4], name="position"))
    SnapshotStore(tmp_path).write(np.int64(2), {"a": df})
    got = load_run(tmp_path)["a"]
    assert got.columns.tolist() == ["step", "position", "score"]
    assert got["position"].tolist() == [3, 4]


def test_rewrite_replaces_step_without_duplicates(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(10, {"attributions": attributions(10), "metrics": metrics(10)})
    store.write(20, {"attributions": attributions(20), "metrics": metrics(20)})
    # A resumed run re-takes step 20 with different data and without the metrics table.
    store.write(20, {"attributions": attributions(20, n=5).assign(score=-1.0)})

    run = load_run(tmp_path)
    assert run.steps == [10, 20]
    a = run["attributions"]
    assert len(a) == 3 + 5
    assert a[a.step == 20]["score"].tolist() == [-1.0] * 5
    assert run["metrics"]["step"].tolist() == [10, 10]
    assert not (tmp_path / "metrics" / "step=000000020.parquet").exists()


def test_uncommitted_and_temp_files_are_ignored(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(1, {"attributions": attributions(1)})
    # A crash mid-snapshot: a complete table file whose commit marker was never written,
    # a half-written temp file, and a table directory without any committed step.
    pq.write_table(
        pq.read_table(tmp_path / "attributions" / "step=000000001.parquet"),
        tmp_path / "attributions" / "step=000000002.parquet",
    )
    (tmp_path / "attributions" / ".step=000000003.parquet.abc.tmp").write_bytes(b"PAR1\x00")
    (tmp_path / "_commits" / ".step=000000003.json.abc.tmp").write_text('{"tab')
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "step=000000002.parquet").write_bytes(b"garbage")

    assert store.steps() == [1]
    run = load_run(tmp_path)
    assert run.steps == [1]
    assert list(run.tables) == ["attributions"]
    assert run["attributions"]["step"].unique().tolist() == [1]


def test_load_run_finds_store_below_run_dir(tmp_path):
    root = tmp_path / "lightning_logs" / "version_0" / STORE_DIRNAME
    SnapshotStore(root).write(1, {"m": metrics(1)})
    (tmp_path / "lightning_logs" / "version_0" / "checkpoints").mkdir()

    for path in (tmp_path, tmp_path / "lightning_logs", root.parent, root):
        run = load_run(path)
        assert run.path == root and run.steps == [1]

    SnapshotStore(tmp_path / "lightning_logs" / "version_1" / STORE_DIRNAME).write(1, {})
    with pytest.raises(StoreError, match="holds 2 normx stores.*version_0.*version_1"):
        load_run(tmp_path)


def test_stores_are_found_up_to_eight_levels_below_and_never_inside_a_store(tmp_path):
    logs = tmp_path / "runs" / "exp" / "lightning_logs"
    deep = logs / "version_9" / STORE_DIRNAME  # 5 below
    SnapshotStore(deep).write(1, {"m": metrics(1)})
    # Inside the store (its table directory): never looked into, so not a second run.
    SnapshotStore(deep / "m" / "copy" / STORE_DIRNAME).write(1, {"m": metrics(1)})
    (tmp_path / "runs" / "exp" / "again").symlink_to(tmp_path / "runs")  # a loop: seen once
    too_deep = tmp_path.joinpath("a", "b", "c", "d", "e", "f", "g", "h", STORE_DIRNAME)  # 9
    SnapshotStore(too_deep).write(1, {"m": metrics(1)})
    assert [info.path for info in catalog.find_runs(tmp_path)] == [deep]
    assert load_run(tmp_path).path == deep
    SnapshotStore(logs / "version_10" / STORE_DIRNAME).write(1, {"m": metrics(1)})
    assert [info.path.parent.name for info in catalog.find_runs(tmp_path)] == [
        "version_9", "version_10"]  # numbers by value
    assert load_run(tmp_path / "a").path == too_deep  # 8 below
    shutil.rmtree(too_deep)
    with pytest.raises(StoreError, match="no normx/ store found in it or up to 8 levels below"):
        load_run(tmp_path / "a")


def test_the_search_stops_after_ten_thousand_directories_and_says_so(tmp_path, caplog):
    """Shallower directories first: a store near the top is found, one 3 levels down behind
    10,100 directories is not, and a warning says the search stopped."""
    for i in range(101):
        for j in range(100):
            (tmp_path / "wide" / f"d{i:03d}" / f"e{j:03d}").mkdir(parents=True)
    SnapshotStore(tmp_path / "wide" / "normx").write(1, {"m": metrics(1)})
    far = tmp_path / "wide" / "d100" / "e099" / STORE_DIRNAME
    SnapshotStore(far).write(1, {"m": metrics(1)})
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        runs = catalog.find_runs(tmp_path)
    assert [info.path for info in runs] == [tmp_path / "wide" / "normx"]
    assert (f"the search for normx stores below {tmp_path} stopped after looking into 10000 "
            "directories; stores further down are not listed") in caplog.text
    assert catalog.find_runs(tmp_path / "wide" / "d100")[0].path == far


def test_not_a_run_directory(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "other" / "normx").mkdir(parents=True)  # right name, but no store inside
    with pytest.raises(StoreError, match=r"is not a normx run directory.*`store_dir`") as e:
        load_run(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(StoreError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_a_normx_directory_without_a_snapshot_says_why(tmp_path):
    empty = tmp_path / "empty" / "run" / STORE_DIRNAME
    empty.mkdir(parents=True)
    with pytest.raises(StoreError, match=r"not a normx run directory.*; note: .*run/normx is an "
                       r"empty store: the run has not written a snapshot yet"):
        load_run(tmp_path / "empty")
    half = tmp_path / "half" / STORE_DIRNAME
    (half / "tokens").mkdir(parents=True)
    (half / "tokens" / "step=000000000.parquet").write_bytes(b"PAR1")
    assert empty_store_reason(half).startswith(f"{half} is a half-written store: 1 table file")
    with pytest.raises(StoreError, match=r"; note: .* half-written store.*commit marker"):
        load_run(half)
    write_run_record(tmp_path / "whole", {"run_id": "0123abcd"})  # a run that just started
    assert "is an empty store" in empty_store_reason(tmp_path / "whole")
    store = SnapshotStore(tmp_path / "whole")
    store.write(1, {"metrics": metrics(1)})
    assert empty_store_reason(store.root) is None  # a committed snapshot: never half-written


def _three_steps(root):
    store = SnapshotStore(root)
    for step in (1, 2, 3):
        store.write(step, {"attributions": attributions(step), "metrics": metrics(step)})
    return store


def test_corrupted_table_file_raises_naming_file_and_step(tmp_path):
    _three_steps(tmp_path)
    bad = tmp_path / "metrics" / "step=000000002.parquet"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated, e.g. by a full disk outside our writes
    with pytest.raises(StoreError) as e:
        load_run(tmp_path)
    msg = str(e.value)
    assert str(bad) in msg and "corrupted at step 2" in msg
    assert "step=000000002.json" in msg and "skip_corrupt=True" in msg


def test_skip_corrupt_warns_and_skips_the_whole_step(tmp_path, caplog):
    _three_steps(tmp_path)
    (tmp_path / "metrics" / "step=000000002.parquet").unlink()
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        run = load_run(tmp_path, skip_corrupt=True)
    assert run.steps == [1, 3]
    assert run["attributions"]["step"].unique().tolist() == [1, 3]
    assert run["metrics"]["step"].unique().tolist() == [1, 3]
    assert "skipping step 2" in caplog.text and "metrics" in caplog.text


def test_corrupted_commit_marker(tmp_path):
    _three_steps(tmp_path)
    (tmp_path / "_commits" / "step=000000003.json").write_text("{not json")
    with pytest.raises(StoreError, match="commit marker .*step=000000003.json is unreadable"):
        load_run(tmp_path)
    assert load_run(tmp_path, skip_corrupt=True).steps == [1, 2]


def test_corrupted_meta_and_newer_schema(tmp_path):
    _three_steps(tmp_path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(StoreError, match="meta.json is unreadable"):
        load_run(tmp_path)
    with pytest.raises(StoreError, match="meta.json is unreadable"):
        SnapshotStore(tmp_path)  # fails before training starts, not at the first snapshot
    (tmp_path / "meta.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(StoreError, match="upgrade normx-callbacks"):
        load_run(tmp_path)


def test_mark_missing_is_listed_and_cleared_by_a_later_write(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(1, {"m": metrics(1)})
    store.mark_missing(2, "OSError: No space left on device")
    store.mark_missing(3, "probe forward ran out of memory")

    run = load_run(tmp_path)
    assert run.steps == [1]
    assert run.missing["step"].tolist() == [2, 3]
    assert run.missing["step"].dtype == "int64"
    assert run.missing["reason"].tolist() == [
        "OSError: No space left on device",
        "probe forward ran out of memory",
    ]
    assert all(run.missing["time"])

    store.write(2, {"m": metrics(2)})  # the retry succeeded
    run = load_run(tmp_path)
    assert run.steps == [1, 2] and run.missing["step"].tolist() == [3]


def test_columns_grow_and_tables_come_and_go(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(1, {"m": pd.DataFrame({"loss": [3.0]})})
    store.write(2, {"m": pd.DataFrame({"loss": [2.0], "grad_norm": [0.5]}), "extra": metrics(2)})
    store.write(3, {"m": pd.DataFrame({"loss": [1.0], "note": ["x"]})})

    run = load_run(tmp_path)
    m = run["m"]
    assert m.columns.tolist() == ["step", "loss", "grad_norm", "note"]
    assert m["loss"].tolist() == [3.0, 2.0, 1.0]
    assert m["grad_norm"].isna().tolist() == [True, False, True]
    assert m["note"].isna().tolist() == [True, True, False]
    assert run["extra"]["step"].tolist() == [2, 2]


def test_column_type_changes_across_steps_still_load(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(1, {"m": pd.DataFrame({"v": [1]})})
    store.write(2, {"m": pd.DataFrame({"v": ["a"]})})
    assert load_run(tmp_path)["m"]["v"].tolist() == [1, "a"]


def test_run_data_lookup_by_name(tmp_path):
    SnapshotStore(tmp_path).write(1, {"attributions": attributions(1), "metrics": metrics(1)})
    run = load_run(tmp_path)
    assert run.attributions is run["attributions"] and "metrics" in run
    with pytest.raises(KeyError, match=r"no table 'norms'.*\['attributions', 'metrics'\]"):
        run["norms"]
    with pytest.raises(AttributeError, match="available tables"):
        run.norms  # noqa: B018
    assert "attributions" in dir(run)
    assert copy.deepcopy(run).steps == [1]


def test_resumed_store_merges_meta(tmp_path):
    SnapshotStore(tmp_path, run_meta={"model": "tiny", "lr": 1e-3}).write(1, {})
    created = json.loads((tmp_path / "meta.json").read_text())["created"]
    store = SnapshotStore(tmp_path, run_meta={"lr": 5e-4, "resumed": True})
    store.mark_missing(2, "skipped")
    meta = load_run(tmp_path).meta
    assert meta["created"] == created
    assert meta["run_meta"] == {"model": "tiny", "lr": 5e-4, "resumed": True}


def test_steps_sort_numerically_past_nine_digits(tmp_path):
    store = SnapshotStore(tmp_path)
    for step in (2_000_000_000, 5, 999_999_999):
        store.write(step, {"m": metrics(0)})
    assert store.steps() == [5, 999_999_999, 2_000_000_000]
    assert load_run(tmp_path)["m"]["step"].unique().tolist() == store.steps()


def test_write_failure_raises_oserror_and_leaves_no_visible_step(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(1, {"attributions": attributions(1)})
    # A file where the "metrics" table directory should be: the directory cannot be made.
    (tmp_path / "metrics").write_text("in the way")
    with pytest.raises(OSError):
        store.write(2, {"attributions": attributions(2), "metrics": metrics(2)})
    assert store.steps() == [1] and not store.has(2)
    assert load_run(tmp_path).steps == [1]
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_failure_inside_a_file_write_removes_the_temp_file(tmp_path, monkeypatch):
    store = SnapshotStore(tmp_path)
    store.write(1, {"m": metrics(1)})
    store.write(2, {"m": metrics(2)})

    def disk_full(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.write(3, {"m": metrics(3)})
    with pytest.raises(OSError, match="No space left"):
        store.write(2, {"m": metrics(2)})  # a failed rewrite un-commits the step, never half
    monkeypatch.undo()

    assert store.steps() == [1]
    assert files_under(tmp_path) == [
        "_commits/step=000000001.json",
        "m/step=000000001.parquet",
        "m/step=000000002.parquet",  # the old file: invisible without its marker
        "meta.json",
    ]
    store.write(2, {"m": metrics(2)})  # the caller's retry
    assert load_run(tmp_path).steps == [1, 2]


def test_readable_while_another_thread_writes(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(0, {"attributions": attributions(0, n=4), "metrics": metrics(0)})
    done = threading.Event()

    def writer():
        for step in range(1, 25):
            store.write(step, {"attributions": attributions(step, n=4), "metrics": metrics(step)})
            # Re-take the previous step as another version: no metrics, scores of -1.
            store.write(step - 1, {"attributions": attributions(step - 1, n=4).assign(score=-1.0)})
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    loads = 0
    try:
        while not done.is_set():
            run = load_run(tmp_path)
            loads += 1
            a = run["attributions"]
            assert a.groupby("step").size().to_dict() == {s: 4 for s in run.steps}
            with_metrics = set(run["metrics"]["step"]) if "metrics" in run else set()
            for step, scores in a.groupby("step")["score"]:
                # Both tables of a step come from the same write, never a mix of versions.
                assert (step in with_metrics) == (scores != -1.0).all(), step
    finally:
        thread.join()
    assert loads > 1
    run = load_run(tmp_path)
    assert run.steps == list(range(25)) and run["metrics"]["step"].unique().tolist() == [24]


def test_five_hundred_snapshots_load(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: None)  # durability is not tested here
    store = SnapshotStore(tmp_path)
    score = pd.DataFrame({"position": np.arange(8), "score": np.linspace(0, 1, 8)})
    for step in range(500):
        store.write(step * 10, {"attributions": score, "metrics": metrics(step)})
    run = load_run(tmp_path)
    assert len(run.steps) == 500 and run.steps[-1] == 4990
    assert len(run["attributions"]) == 500 * 8
    assert run["attributions"]["step"].is_monotonic_increasing
    assert run["metrics"]["value"].iloc[-1] == 1.0 + 499
