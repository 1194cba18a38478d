"""On-disk snapshot store: the canonical record of a run, readable with plain pandas.

Schema (version 1)::

    <root>/                               default root: <log_dir>/normx
        meta.json                         {"schema_version", "created", "updated", "run_meta"}
        run.json                          the run the store belongs to (written by the callback):
                                          {"run_id", "created", "loggers", "wandb_run_id",
                                          "continues"}
        <table>/step=000000100.parquet    one file per table per snapshot
        _commits/step=000000100.json      commit marker: {"schema_version", "step", "written",
                                          "tables": {<table>: {"file", "rows"}}}
        _missing/step=000000200.json      a snapshot that could not be taken or written:
                                          {"step", "reason", "time"}

Guarantees:

- Every file is written to a hidden temp file in its target directory, fsync'd, then moved
  into place with ``os.replace``: a file is either absent, the old version or the new one.
- A snapshot is visible only once its commit marker exists. The marker is written after all
  of the snapshot's table files, so readers (``SnapshotStore.steps``, ``load_run``) see
  whole snapshots only, also while a training process is still writing. Table files without
  a marker (a crash mid-snapshot) and temp files are ignored.
- Each table file holds one step and has an int64 ``step`` column (first column).
- Writing a step again replaces it (a resumed run re-takes snapshots after its last
  checkpoint without duplicates): the old marker is removed first, then the tables are
  written, then the new marker.
- Tables may be absent at some steps, and columns may be added over time: ``load_run``
  concatenates each table over steps with the union of its columns (missing cells are null).
- A failed write raises ``OSError`` and leaves no visible half snapshot.
- A successful write of a step clears that step's ``_missing`` record.

Reading a store: `loading.load_run` / `load_store` (`RunData`); finding the stores of runs on
disk and choosing one: `catalog.py`.

Post-hoc reading without this package::

    pandas.read_parquet("normx/tokens/step=000000100.parquet")

Past 400 lines as one module: the format, its atomic writing and the run records are one
on-disk contract.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STORE_DIRNAME = "normx"
SCHEMA_VERSION = 1

META_FILE = "meta.json"
RUN_FILE = "run.json"
COMMITS = "_commits"
MISSING = "_missing"
_STEP_FILE = re.compile(r"^step=(\d+)\.(json|parquet)$")
# Table names become directory names; "_" and "." prefixes are reserved for the store itself.
TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
# These are RunData attributes; a table of the same name would be shadowed by them.
_RESERVED_NAMES = frozenset({"path", "meta", "steps", "tables", "missing", "run_record"})


class StoreError(RuntimeError):
    """The store on disk is corrupted, half-written, or not a store at all."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def step_name(step: int, suffix: str) -> str:
    return f"step={step:09d}.{suffix}"


def _check_step(step: Any) -> int:
    if isinstance(step, bool):
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    try:
        step = int(step.__index__())
    except (AttributeError, TypeError):
        raise ValueError(f"step must be a non-negative int, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return step


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened for fsync on Windows.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` via a temp file in the same directory, fsync, ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            log.warning("could not remove temp file %s", tmp)
        raise
    _fsync_dir(path.parent)


def _atomic_write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=1, default=str).encode()
    _atomic_write(path, lambda f: f.write(data))


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def _to_arrow(name: str, df: pd.DataFrame, step: int) -> pa.Table:
    if not isinstance(name, str) or not TABLE_NAME.match(name) or name in _RESERVED_NAMES:
        raise ValueError(
            f"table name {name!r} is invalid: use letters, digits, '_' and '-', not starting "
            f"with '_' or '-', and none of {sorted(_RESERVED_NAMES)}"
        )
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"table {name!r} must be a pandas.DataFrame, got {type(df).__name__}")
    # The index is not stored; named index levels are data, so keep them as columns.
    if any(level is not None for level in df.index.names):
        df = df.reset_index()
    if "step" in df.columns:
        col = df["step"]
        if not pd.api.types.is_integer_dtype(col) and len(col):
            found = f"dtype {col.dtype}"
        else:
            found = ", ".join(str(v) for v in sorted(set(col.tolist()) - {step})[:3])
        if found:
            raise ValueError(
                f"table {name!r} has a 'step' column that disagrees with step={step} "
                f"(found {found}); drop the column or set it to the snapshot's step"
            )
        df = df.drop(columns="step")
    df = df.copy(deep=False)
    df.insert(0, "step", pd.Series(step, index=df.index, dtype="int64"))
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise ValueError(f"table {name!r} cannot be stored as Parquet: {e}") from e


def _parquet_bytes(table: pa.Table) -> pa.Buffer:
    """The Parquet file of ``table``, encoded in memory: one write to disk, not Arrow's many
    small writes through a Python file object."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue()


class SnapshotStore:
    """Writes snapshots (dicts of DataFrames keyed by training step) under ``root``.

    Args:
        root: store directory, created on the first write (usually ``<log_dir>/normx``).
        run_meta: JSON-able facts about the run (model, probes, config), merged into
            ``meta.json``; values that are not JSON are stored as ``str``.
    """

    def __init__(self, root: str | os.PathLike, *, run_meta: Mapping | None = None) -> None:
        if run_meta is not None and not isinstance(run_meta, Mapping):
            raise ValueError(f"run_meta must be a mapping or None, got {type(run_meta).__name__}")
        self.root = Path(root)
        self.run_meta: dict = dict(run_meta or {})
        self._meta_written = False
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"store root {str(self.root)!r} exists and is not a directory")
        # A path under a file can never be created: say so now, not at the first snapshot.
        existing = next((p for p in self.root.parents if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ValueError(f"store root {str(self.root)!r} lies under {str(existing)!r}, which "
                             "is a file, not a directory: choose another store_dir")
        # Fail at construction, not hours later: a resumed run must be able to append.
        if (self.root / META_FILE).exists():
            read_meta(self.root)

    def _ensure_root(self) -> None:
        if self._meta_written:
            return
        (self.root / COMMITS).mkdir(parents=True, exist_ok=True)
        old = read_meta(self.root) if (self.root / META_FILE).exists() else {}
        now = _now()
        meta = {
            "schema_version": SCHEMA_VERSION,
            "created": old.get("created", now),
            "updated": now,
            "run_meta": {**old.get("run_meta", {}), **self.run_meta},
        }
        _atomic_write_json(self.root / META_FILE, meta)
        self._meta_written = True

    def write(self, step: int, tables: Mapping[str, pd.DataFrame]) -> None:
        """Write (or replace) the snapshot at ``step``; visible only once complete.

        Raises:
            ValueError: bad step, table name or DataFrame (nothing is touched on disk).
            OSError: the disk refused; no half snapshot is visible, temp files are removed.
        """
        step = _check_step(step)
        if not isinstance(tables, Mapping):
            raise ValueError(f"tables must be a mapping name -> DataFrame, got {type(tables)}")
        arrow = {name: _to_arrow(name, df, step) for name, df in tables.items()}
        self._ensure_root()
        marker = self.root / COMMITS / step_name(step, "json")
        try:
            old_tables = read_json(marker).get("tables", {})
        except (OSError, ValueError, AttributeError):
            old_tables = {}  # no previous snapshot, or an unreadable marker about to be replaced
        _unlink(marker)
        entries = {}
        for name, table in arrow.items():
            rel = f"{name}/{step_name(step, 'parquet')}"
            (self.root / name).mkdir(exist_ok=True)
            _atomic_write(self.root / rel, lambda f, t=table: f.write(_parquet_bytes(t)))
            entries[name] = {"file": rel, "rows": table.num_rows}
        _atomic_write_json(
            marker,
            {
                "schema_version": SCHEMA_VERSION,
                "step": step,
                "written": _now(),
                # Unique per write, so a reader can tell a rewrite from the marker it first saw.
                "id": uuid.uuid4().hex,
                "tables": entries,
            },
        )
        # Tidying only: files of tables dropped by a rewrite are already invisible.
        for name in set(old_tables) - set(entries):
            if isinstance(name, str) and TABLE_NAME.match(name):
                _unlink(self.root / name / step_name(step, "parquet"))
        _unlink(self.root / MISSING / step_name(step, "json"))

    def mark_missing(self, step: int, reason: str) -> None:
        """Record that the snapshot at ``step`` could not be taken or written, and why."""
        step = _check_step(step)
        if not isinstance(reason, str):
            raise ValueError(f"reason must be a str, got {type(reason).__name__}")
        self._ensure_root()
        (self.root / MISSING).mkdir(exist_ok=True)
        _atomic_write_json(
            self.root / MISSING / step_name(step, "json"),
            {"step": step, "reason": reason, "time": _now()},
        )

    def truncate_after(self, step: int) -> list[int]:
        """Un-commit every snapshot after ``step`` (a resumed run re-takes them).

        Only the commit markers and missing records are removed, so a crash here
        leaves whole snapshots or none; the orphaned table files are overwritten
        when those steps are written again. Returns the steps removed.
        """
        step = _check_step(step)
        removed = [s for s in self.steps() if s > step]
        for s in removed:
            _unlink(self.root / COMMITS / step_name(s, "json"))
        missing = self.root / MISSING
        if missing.is_dir():
            for s in list_steps(missing):
                if s > step:
                    _unlink(missing / step_name(s, "json"))
        return removed

    def steps(self) -> list[int]:
        """Committed steps, sorted."""
        return list_steps(self.root / COMMITS)

    def has(self, step: int) -> bool:
        """Whether the snapshot at ``step`` is committed."""
        return (self.root / COMMITS / step_name(_check_step(step), "json")).is_file()

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.root)!r})"


def list_steps(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        int(m.group(1)) for n in names if (m := _STEP_FILE.match(n)) and m.group(2) == "json"
    )


def read_json(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_meta(root: Path) -> dict:
    path = root / META_FILE
    try:
        meta = read_json(path)
    except (OSError, ValueError) as e:
        raise StoreError(
            f"{path} is unreadable ({e}); the store is corrupted: restore it from a backup "
            f"or delete {path} (its run_meta is lost, the snapshots are kept)"
        ) from e
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema_version {version!r}; this normx-callbacks reads versions "
            f"<= {SCHEMA_VERSION}: upgrade normx-callbacks"
        )
    return meta


def is_store(path: Path) -> bool:
    return (path / META_FILE).is_file() or (path / COMMITS).is_dir() or (path / RUN_FILE).is_file()


def read_run_record(root: str | os.PathLike) -> dict | None:
    """The ``run.json`` of the store at ``root``; None if it has none (or it is unreadable)."""
    try:
        record = read_json(Path(root) / RUN_FILE)
    except (OSError, ValueError):
        return None
    return record if isinstance(record.get("run_id"), str) else None


def write_run_record(root: str | os.PathLike, record: Mapping) -> None:
    """Write (atomically) ``run.json`` into the store at ``root``, creating the directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(root / RUN_FILE, dict(record))


def claim_run_record(root: str | os.PathLike, record: Mapping) -> bool:
    """Make the store at ``root`` this run's, atomically: create ``run.json`` only if no run
    has claimed the store yet. True if this call created it; False if a record (of any run)
    is there already. Two runs started together with one store directory thus never both
    take it. The record is written whole to a temp file first and then linked into place, so
    no reader ever sees a partial one (an exclusive create where links are not supported)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / RUN_FILE
    data = json.dumps(dict(record), indent=1, default=str).encode()
    tmp = path.with_name(f".{RUN_FILE}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(root)
    return True


def holds_snapshots(root: str | os.PathLike) -> bool:
    """Whether the store at ``root`` holds any committed snapshot or missing record."""
    root = Path(root)
    return bool(list_steps(root / COMMITS) or list_steps(root / MISSING))


def sibling_root(root: str | os.PathLike, run_id: str) -> Path:
    """Where a fresh run writes when ``root`` holds another run: ``<root>-<run_id[:8]>``."""
    root = Path(root)
    return root.with_name(f"{root.name}-{run_id[:8]}")




