"""`loading`: reading a store back as one DataFrame per table (`load_run`, `load_store`,
`RunData`).

Checks what `RunData` holds for a written store (tables over all steps sorted by step, rows
kept in order within a step, meta, run record, the missing table, ``in``), that an older
store's metrics come back under today's names with interval columns, that a table named
outside the store in a commit marker is refused as corruption, that a step rewritten
while it is read is left out whole, that a missing table file is named with its step (or
skipped), and which directories `load_store` and `load_run(run=...)` accept. (Corrupt
files, meta and the search for stores are tested in test_store.py.)
"""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import pytest

from normx_callbacks import loading
from normx_callbacks.loading import RunData, load_run, load_store
from normx_callbacks.store import (
    MISSING,
    SnapshotStore,
    StoreError,
    sibling_root,
    write_run_record,
)


def tokens(step: int) -> pd.DataFrame:
    # Rows in a deliberate, unsorted order: it must survive the load.
    return pd.DataFrame({"probe_id": ["b", "a", "c"], "score": [3.0, 1.0, 2.0 + step]})


def written(root, steps=(4, 0, 2)) -> SnapshotStore:
    store = SnapshotStore(root, run_meta={"model": "tiny"})
    for step in steps:  # written out of order: loading sorts by step
        store.write(step, {"tokens": tokens(step)})
    return store


def test_a_written_store_loads_as_one_table_per_name_sorted_by_step(tmp_path):
    written(tmp_path)
    write_run_record(tmp_path, {"run_id": "ab" * 16, "loggers": []})
    run = load_run(tmp_path)
    assert isinstance(run, RunData) and run.path == tmp_path
    assert run.steps == [0, 2, 4]
    assert run.meta["run_meta"] == {"model": "tiny"}
    assert run.run_record["run_id"] == "ab" * 16
    frame = run.tokens
    assert list(frame.columns) == ["step", "probe_id", "score"]
    assert frame["step"].dtype == "int64"
    assert frame["step"].tolist() == [0] * 3 + [2] * 3 + [4] * 3
    assert frame["probe_id"].tolist() == ["b", "a", "c"] * 3  # order within a step kept
    assert frame["score"].tolist()[2::3] == [2.0, 4.0, 6.0]
    assert "tokens" in run and "metrics" not in run and "missing" not in run
    assert run.missing.empty and list(run.missing.columns) == ["step", "reason", "time"]


def test_missing_snapshots_are_a_table_and_an_unreadable_record_says_so(tmp_path):
    store = written(tmp_path, steps=(0,))
    store.mark_missing(3, "the probe forward failed")
    store.mark_missing(5, "disk full")
    (tmp_path / MISSING / "step=000000005.json").write_text("[not an object]")
    run = load_run(tmp_path)
    assert "missing" in run and run["missing"] is run.missing
    assert run.missing["step"].tolist() == [3, 5]
    assert run.missing["reason"][0] == "the probe forward failed"
    assert run.missing["reason"][1].startswith("unreadable missing-record ")
    assert run.steps == [0]  # a missing record is not a snapshot


def test_an_older_stores_metrics_come_back_under_todays_names_with_intervals(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(0, {"metrics": pd.DataFrame({"key": ["alignment/dp", "probe/accuracy"],
                                             "value": [0.5, 0.75]}),
                    "scores": pd.DataFrame({"key": ["x"], "value": [1.0]}),
                    "other": pd.DataFrame({"name": ["loss"], "value": [2.0]})})
    run = load_run(tmp_path)
    metrics = run["metrics"]
    assert metrics["key"].tolist() == ["alignment/dp_raw", "probe/accuracy"]
    assert all(math.isnan(v) for v in metrics["low"]) and all(math.isnan(v) for v in
                                                              metrics["high"])
    # Only the metrics table is read as the callback's: others are left as written.
    assert list(run["scores"].columns) == ["step", "key", "value"]
    assert list(run["other"].columns) == ["step", "name", "value"]


def test_a_marker_naming_a_table_outside_the_store_is_corruption(tmp_path, caplog):
    written(tmp_path, steps=(0, 1))
    marker = tmp_path / "_commits" / "step=000000001.json"
    content = json.loads(marker.read_text())
    content["tables"] = {"../elsewhere": content["tables"]["tokens"]}
    marker.write_text(json.dumps(content))
    with pytest.raises(StoreError, match=r"commit marker .*step=000000001\.json is unreadable "
                                         r"\(invalid table names \['\.\./elsewhere'\]\)"):
        load_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        assert load_run(tmp_path, skip_corrupt=True).steps == [0]
    assert "skipping step 1" in caplog.text


def test_a_missing_table_file_names_the_file_and_its_step(tmp_path):
    written(tmp_path)
    (tmp_path / "tokens" / "step=000000002.parquet").unlink()
    with pytest.raises(StoreError, match=r"table file .*step=000000002\.parquet is missing or "
                                         r"unreadable .*corrupted at step 2: delete "):
        load_store(tmp_path)
    run = load_store(tmp_path, skip_corrupt=True)
    assert run.steps == [0, 4] and sorted(run.tokens["step"].unique()) == [0, 4]


def test_a_step_rewritten_while_it_is_read_is_left_out_whole(tmp_path, monkeypatch):
    store = written(tmp_path)
    concat = loading._concat

    def rewrite_then_concat(name, parts):
        # Another process rewrites step 2 after its files were read: a new marker.
        store.write(2, {"tokens": tokens(20)})
        return concat(name, parts)

    monkeypatch.setattr(loading, "_concat", rewrite_then_concat)
    run = load_store(tmp_path)
    assert run.steps == [0, 4]
    assert sorted(run.tokens["step"].unique()) == [0, 4]
    monkeypatch.undo()
    assert load_store(tmp_path).tokens.query("step == 2")["score"].tolist()[2] == 22.0


def test_load_store_reads_exactly_one_store_and_load_run_finds_and_selects(tmp_path):
    root = tmp_path / "version_0" / "normx"
    written(root, steps=(0,))
    with pytest.raises(StoreError, match=r"is not a normx store: it holds no meta\.json, run\.json "
                                         r"or _commits/"):
        load_store(tmp_path)
    assert load_run(tmp_path).path == root  # the search below a run directory
    first, second = "12345678" + "0" * 24, "9abcdef0" + "0" * 24
    write_run_record(root, {"run_id": first})
    beside = sibling_root(root, second)
    written(beside, steps=(0, 1))
    write_run_record(beside, {"run_id": second})
    with pytest.raises(StoreError, match="holds 2 normx stores"):
        load_run(root)
    assert load_run(root, run="9abc").path == beside
    assert load_run(root, run="9abc").steps == [0, 1]
    assert load_run(root, run=first).path == root
