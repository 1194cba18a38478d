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

Post-hoc reading without this package::

    pandas.read_parquet("normx/tokens/step=000000100.parquet")
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STORE_DIRNAME = "normx"
SCHEMA_VERSION = 1

_META = "meta.json"
RUN_FILE = "run.json"
_COMMITS = "_commits"
_MISSING = "_missing"
_STEP_FILE = re.compile(r"^step=(\d+)\.(json|parquet)$")
# Table names become directory names; "_" and "." prefixes are reserved for the store itself.
_TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
# These are RunData attributes; a table of the same name would be shadowed by them.
_RESERVED_NAMES = frozenset({"path", "meta", "steps", "tables", "missing", "run_record"})
# How far `find_runs` looks below a directory: levels, and directories looked into at most.
_SEARCH_DEPTH = 8
_SEARCH_DIRS = 10_000
# Stores a "which run?" error lists by name; the others are counted.
_LISTED = 10
# A fresh run that finds another run's store at its path writes beside it, into
# `<name>-<first 8 hex digits of its run id>` (see `sibling_root`).
_SIBLING = re.compile(r"^.+-[0-9a-f]{8}$")


class StoreError(RuntimeError):
    """The store on disk is corrupted, half-written, or not a store at all."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _step_name(step: int, suffix: str) -> str:
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
    if not isinstance(name, str) or not _TABLE_NAME.match(name) or name in _RESERVED_NAMES:
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
        if (self.root / _META).exists():
            _read_meta(self.root)

    def _ensure_root(self) -> None:
        if self._meta_written:
            return
        (self.root / _COMMITS).mkdir(parents=True, exist_ok=True)
        old = _read_meta(self.root) if (self.root / _META).exists() else {}
        now = _now()
        meta = {
            "schema_version": SCHEMA_VERSION,
            "created": old.get("created", now),
            "updated": now,
            "run_meta": {**old.get("run_meta", {}), **self.run_meta},
        }
        _atomic_write_json(self.root / _META, meta)
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
        marker = self.root / _COMMITS / _step_name(step, "json")
        try:
            old_tables = _read_json(marker).get("tables", {})
        except (OSError, ValueError, AttributeError):
            old_tables = {}  # no previous snapshot, or an unreadable marker about to be replaced
        _unlink(marker)
        entries = {}
        for name, table in arrow.items():
            rel = f"{name}/{_step_name(step, 'parquet')}"
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
            if isinstance(name, str) and _TABLE_NAME.match(name):
                _unlink(self.root / name / _step_name(step, "parquet"))
        _unlink(self.root / _MISSING / _step_name(step, "json"))

    def mark_missing(self, step: int, reason: str) -> None:
        """Record that the snapshot at ``step`` could not be taken or written, and why."""
        step = _check_step(step)
        if not isinstance(reason, str):
            raise ValueError(f"reason must be a str, got {type(reason).__name__}")
        self._ensure_root()
        (self.root / _MISSING).mkdir(exist_ok=True)
        _atomic_write_json(
            self.root / _MISSING / _step_name(step, "json"),
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
            _unlink(self.root / _COMMITS / _step_name(s, "json"))
        missing = self.root / _MISSING
        if missing.is_dir():
            for s in _list_steps(missing):
                if s > step:
                    _unlink(missing / _step_name(s, "json"))
        return removed

    def steps(self) -> list[int]:
        """Committed steps, sorted."""
        return _list_steps(self.root / _COMMITS)

    def has(self, step: int) -> bool:
        """Whether the snapshot at ``step`` is committed."""
        return (self.root / _COMMITS / _step_name(_check_step(step), "json")).is_file()

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.root)!r})"


@dataclass
class RunData:
    """A loaded store. ``run["tokens"]`` or ``run.tokens`` gives one table (all steps,
    ``step`` column first, sorted by step); ``run["missing"]`` / ``run.missing`` the
    snapshots recorded as missing (step, reason, time), and ``name in run`` says whether a
    table has rows. ``run_record``: its ``run.json`` (run id, loggers, the run it continues),
    ``{}`` if it has none."""

    path: Path
    meta: dict
    steps: list[int]
    tables: dict[str, pd.DataFrame] = field(repr=False)
    missing: pd.DataFrame = field(repr=False)
    run_record: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name == "missing":
            return self.missing
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(
                f"no table {name!r} in {self.path}; available tables: {sorted(self.tables)}"
            ) from None

    def __getattr__(self, name: str) -> pd.DataFrame:
        # Guard against recursion while copy/pickle build the object before `tables` exists.
        tables = self.__dict__.get("tables")
        if tables is None or name.startswith("_") or name not in tables:
            raise AttributeError(
                f"{type(self).__name__!r} has no attribute or table {name!r}; "
                f"available tables: {sorted(tables or {})}"
            )
        return tables[name]

    def __contains__(self, name: object) -> bool:
        """Whether the run holds rows of table ``name`` (``missing`` included)."""
        if name == "missing":
            return not self.missing.empty
        return name in self.tables

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.tables))


def _list_steps(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        int(m.group(1)) for n in names if (m := _STEP_FILE.match(n)) and m.group(2) == "json"
    )


def _read_json(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_meta(root: Path) -> dict:
    path = root / _META
    try:
        meta = _read_json(path)
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


def _is_store(path: Path) -> bool:
    return (path / _META).is_file() or (path / _COMMITS).is_dir() or (path / RUN_FILE).is_file()


def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir() and e.name[0] not in "._"]
    except OSError:  # unreadable directories cannot hold the store we are looking for
        return []


@dataclass(frozen=True)
class RunInfo:
    """One store found on disk and the run it belongs to (``run_id`` None: written before
    stores recorded their run)."""

    path: Path
    run_id: str | None
    created: str | None
    loggers: str
    continues: str | None
    steps: int
    last_write: float  # POSIX time of the last commit or missing record (0.0: none)

    def describe(self) -> str:
        when = (datetime.fromtimestamp(self.last_write, timezone.utc).isoformat(timespec="seconds")
                if self.last_write else "never")
        parts = [f"run {self.run_id or '(no run id)'}", self.loggers or "no logger",
                 f"{self.steps} step(s)", f"last write {when}"]
        if self.continues:
            parts.append(f"continues run {self.continues}")
        return f"{', '.join(parts)}: {self.path}"


def read_run_record(root: str | os.PathLike) -> dict | None:
    """The ``run.json`` of the store at ``root``; None if it has none (or it is unreadable)."""
    try:
        record = _read_json(Path(root) / RUN_FILE)
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
    return bool(_list_steps(root / _COMMITS) or _list_steps(root / _MISSING))


def sibling_root(root: str | os.PathLike, run_id: str) -> Path:
    """Where a fresh run writes when ``root`` holds another run: ``<root>-<run_id[:8]>``."""
    root = Path(root)
    return root.with_name(f"{root.name}-{run_id[:8]}")


def _last_write(root: Path) -> float:
    times = []
    for sub in (_COMMITS, _MISSING):
        try:
            times.append((root / sub).stat().st_mtime)  # a directory's mtime: its last add/remove
        except OSError:
            pass
    return max(times, default=0.0)


def run_info(root: str | os.PathLike) -> RunInfo:
    """What ``root`` (a store directory) holds: its run record, step count, last write."""
    root = Path(root)
    record = read_run_record(root) or {}
    loggers = "; ".join(
        " ".join(str(x) for x in (entry.get("type"), entry.get("version")) if x is not None)
        for entry in record.get("loggers", []) if isinstance(entry, dict))
    return RunInfo(root, record.get("run_id"), record.get("created"), loggers,
                   record.get("continues"), len(_list_steps(root / _COMMITS)), _last_write(root))


def _is_run_store(path: Path) -> bool:
    # A store under another name (a `store_dir`) is known by the run record the callback wrote.
    return (path.name == STORE_DIRNAME or (path / RUN_FILE).is_file()) and _is_store(path)


def empty_store_reason(root: str | os.PathLike) -> str | None:
    """Why the store directory ``root`` shows no snapshot: no commit marker beside its table
    files (half-written), or nothing but its own bookkeeping files (empty). None when it
    holds a committed snapshot (an intact store is never called half-written) or something
    else."""
    root = Path(root)
    if any((root / _COMMITS).glob("step=*.json")):
        return None
    tables = [p for p in root.glob("*/step=*.parquet") if not p.parent.name.startswith("_")]
    if tables:
        return (f"{root} is a half-written store: {len(tables)} table file(s) but no "
                f"commit marker ({_COMMITS}/step=*.json), so no snapshot is complete; the run "
                "crashed during its first snapshot or is still writing it")
    try:
        names = {p.name for p in root.iterdir()}
    except OSError:
        return None
    if names <= {_META, RUN_FILE, _COMMITS}:
        return (f"{root} is an empty store: the run has not written a snapshot yet "
                "(wait for the first one, or check the callback's store_dir)")
    return None


def find_runs(path: str | os.PathLike) -> list[RunInfo]:
    """Every store at ``path``: ``path`` itself with the stores written beside it by later
    fresh runs (``<name>-<8 hex>``), or the stores below ``path`` (named ``normx`` or
    holding a run record). Sorted by path, numbers by value (``version_9`` before
    ``version_10``). When there is none, the ``StoreError`` says why
    a ``normx/`` directory seen on the way holds no store (empty or half-written).

    The search below ``path`` is breadth first and bounded: at most 8 levels down
    (``runs/<name>/lightning_logs/version_N/normx`` is 5 below a repository) and at most
    10,000 directories looked into, shallower ones first (a warning says when that bound
    stopped it); it never enters a store (its table directories hold a file per snapshot),
    a hidden or ``_``-prefixed directory, or a directory it already saw through a symlink.
    """
    path = Path(path)
    if not path.is_dir():
        raise StoreError(
            f"{path} is not a normx run directory: it does not exist or is not a directory"
        )
    if _is_store(path):
        beside = [p for p in _subdirs(path.parent)
                  if p.name.startswith(f"{path.name}-") and _SIBLING.match(p.name)
                  and _is_store(p)]
        return [run_info(p) for p in [path, *sorted(beside, key=_natural)]]
    found, seen, stopped = _search(path)
    if stopped and found:
        log.warning("the search for normx stores below %s stopped after looking into %d "
                    "directories; stores further down are not listed: pass a directory "
                    "nearer the run", path, _SEARCH_DIRS)
    if not found:
        note = next((reason for p in seen if p.name == STORE_DIRNAME
                     and (reason := empty_store_reason(p))), None)
        bound = (f"up to {_SEARCH_DEPTH} levels below" if not stopped else
                 f"in the first {_SEARCH_DIRS} directories below it")
        raise StoreError(
            f"{path} is not a normx run directory: no {STORE_DIRNAME}/ store found in it or "
            f"{bound}; pass the directory the callback wrote (its `store_dir`)"
            + (f"; note: {note}" if note else "")
        )
    return [run_info(p) for p in sorted(found, key=_natural)]


def _natural(path: Path) -> tuple:
    """Sort key of a path with its numbers compared by value (version_9 < version_10)."""
    parts = re.split(r"(\d+)", str(path))  # text, number, text, ...: same types line up
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def _identity(path: Path) -> tuple[int, int] | Path:
    """What a directory is, whatever path reached it (device and inode)."""
    try:
        st = path.stat()
    except OSError:
        return path
    return st.st_dev, st.st_ino


def _search(path: Path) -> tuple[list[Path], list[Path], bool]:
    """(the stores below ``path``, every directory seen, whether the directory bound stopped
    the search): `find_runs`'s bounded breadth-first search."""
    found: list[Path] = []
    seen = [path]
    known = {_identity(path)}
    queue = deque([(path, 0)])  # (a directory to look into, its level below path)
    looked = 0
    while queue:
        if looked == _SEARCH_DIRS:
            return found, seen, True
        directory, depth = queue.popleft()
        looked += 1
        for sub in sorted(_subdirs(directory)):
            if (key := _identity(sub)) in known:  # reached again through a symlink
                continue
            known.add(key)
            seen.append(sub)
            if _is_run_store(sub):
                found.append(sub)
            # A store's table directories hold a file per snapshot: never descend into them.
            if depth + 1 < _SEARCH_DEPTH and not _is_store(sub):
                queue.append((sub, depth + 1))
    return found, seen, False


def select_runs(runs: list[RunInfo], run: str) -> list[RunInfo]:
    """The runs a selector picks: ``all``, ``latest`` (the run written last), a full run id
    or a unique prefix of one. Raises ``StoreError`` listing the runs if it picks none or
    (a prefix) several."""
    if not isinstance(run, str) or not run:
        raise ValueError(f"run={run!r} must be a run id, a unique prefix of one, 'latest' or "
                         "'all'")
    if run == "all":
        return list(runs)
    if run == "latest":
        return [max(runs, key=lambda r: (r.last_write, str(r.path)))]
    exact = [r for r in runs if r.run_id == run]
    picked = exact or [r for r in runs if r.run_id and r.run_id.startswith(run.lower())]
    if len(picked) != 1:
        how = "matches no run" if not picked else f"matches {len(picked)} runs"
        raise StoreError(f"run {run!r} {how}; the runs are: " + _listing(runs)
                         + "; pass a full run id, a unique prefix, 'latest' or 'all'")
    return picked


def _listing(runs: list[RunInfo]) -> str:
    """The runs of a "which run?" error: all of them up to ten, else the ten written last
    and how many more (one line either way)."""
    if len(runs) <= _LISTED:
        return "; ".join(f"({i}) {r.describe()}" for i, r in enumerate(runs, 1))
    newest = sorted(runs, key=lambda r: (r.last_write, str(r.path)), reverse=True)[:_LISTED]
    return (f"the {_LISTED} written last: "
            + "; ".join(f"({i}) {r.describe()}" for i, r in enumerate(newest, 1))
            + f"; and {len(runs) - _LISTED} more, not listed")


def find_store(path: str | os.PathLike, run: str | None = None) -> Path:
    """The one store at ``path`` (see ``find_runs``), or the one ``run`` selects (a run id,
    a unique prefix of one, or ``latest``). Several stores and no ``run``: ``StoreError``
    listing them."""
    runs = find_runs(path)
    if run is not None:
        picked = select_runs(runs, run)
        if len(picked) != 1:
            raise StoreError(f"run {run!r} selects {len(picked)} runs where one is needed")
        return picked[0].path
    if len(runs) > 1:
        raise StoreError(
            f"{path} holds {len(runs)} normx stores, one run each: " + _listing(runs)
            + "; choose one: `normx ... --run ID` or load_run(path, run=ID), where ID is a run "
            "id, a unique prefix of one, or 'latest' (the run written last), or pass a store "
            "directory"
        )
    return runs[0].path


def _corrupt(msg: str, step: int, root: Path, skip: bool, cause: BaseException) -> None:
    marker = root / _COMMITS / _step_name(step, "json")
    if skip:
        log.warning("skipping step %d: %s", step, msg)
        return
    raise StoreError(
        f"{msg}. The store at {root} is corrupted at step {step}: delete {marker} to drop that "
        f"step, or call load_run(..., skip_corrupt=True) (`normx ... --skip-corrupt` on the "
        f"command line) to skip it"
    ) from cause


def _read_markers(root: Path, skip_corrupt: bool) -> dict[int, tuple[bytes, dict]]:
    commits = root / _COMMITS
    markers = {}
    for step in _list_steps(commits):
        path = commits / _step_name(step, "json")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue  # being rewritten: not committed right now
        try:
            marker = json.loads(raw)
            names = list(marker["tables"])
            if not all(isinstance(n, str) and _TABLE_NAME.match(n) for n in names):
                raise ValueError(f"invalid table names {names!r}")
        except (ValueError, KeyError, TypeError) as e:
            _corrupt(f"commit marker {path} is unreadable ({e})", step, root, skip_corrupt, e)
            continue
        markers[step] = (raw, marker)
    return markers


def _marker_bytes(root: Path, step: int) -> bytes | None:
    try:
        return (root / _COMMITS / _step_name(step, "json")).read_bytes()
    except FileNotFoundError:
        return None


def _file_error(
    root: Path, step: int, raw: bytes, file: Path, e: BaseException, skip_corrupt: bool
) -> None:
    """Report an unreadable file, unless its step is being rewritten (then it just drops)."""
    if _marker_bytes(root, step) == raw:
        _corrupt(f"table file {file} is missing or unreadable ({e})", step, root, skip_corrupt, e)


def _read_fast(entries: list[tuple[int, Path, pa.Schema]]) -> pa.Table | None:
    """All files of one table in one scan; None if they need the file-by-file path."""
    try:
        schema = pa.unify_schemas([s for *_, s in entries], promote_options="permissive")
        dataset = ds.dataset([str(f) for _, f, _ in entries], schema=schema, format="parquet")
        return dataset.to_table()
    except (OSError, pa.ArrowException, TypeError, ValueError):
        return None


def _concat(name: str, parts: list[pa.Table]) -> pd.DataFrame:
    try:
        table = pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowException, TypeError, ValueError):
        # A column changed type across steps (e.g. int -> str): let pandas fall back to object.
        log.warning("table %r changed column types across steps; concatenating in pandas", name)
        df = pd.concat([t.to_pandas() for t in parts], ignore_index=True)
        return df.sort_values("step", kind="stable", ignore_index=True)
    # Stable sort: rows keep their order within a step.
    return table.sort_by("step").to_pandas()


def _load_tables(root: Path, skip_corrupt: bool) -> tuple[list[int], dict[str, pd.DataFrame]]:
    """Read the snapshots committed now; steps rewritten meanwhile are left out whole."""
    markers = _read_markers(root, skip_corrupt)
    # Footers first: cheap, and pins a missing or truncated file to its step.
    files: dict[str, list[tuple[int, Path, pa.Schema]]] = {}
    bad: set[int] = set()
    for step, (raw, marker) in markers.items():
        found = []
        for name in marker["tables"]:
            file = root / name / _step_name(step, "parquet")
            try:
                found.append((name, file, pq.read_schema(file)))
            except (OSError, pa.ArrowException) as e:
                _file_error(root, step, raw, file, e, skip_corrupt)
                bad.add(step)
                break
        else:
            for name, file, schema in found:
                files.setdefault(name, []).append((step, file, schema))

    tables = {}
    for name, entries in sorted(files.items()):
        table = _read_fast(entries)
        parts = [table] if table is not None else []
        if table is None:
            for step, file, _ in entries:
                if step in bad:
                    continue
                try:
                    parts.append(pq.read_table(file))
                except (OSError, pa.ArrowException) as e:
                    _file_error(root, step, markers[step][0], file, e, skip_corrupt)
                    bad.add(step)
        if parts:  # else every step holding this table was bad
            tables[name] = _concat(name, parts)
    # A rewrite removes the marker first, and its new marker has a new id: an unchanged marker
    # proves that the files read for its step are the ones it committed.
    bad |= {s for s, (raw, _) in markers.items() if _marker_bytes(root, s) != raw}
    if bad:  # a step found bad late may have rows in tables read before
        tables = {n: df[~df["step"].isin(bad)].reset_index(drop=True) for n, df in tables.items()}
    return [s for s in markers if s not in bad], tables


def _load_missing(root: Path) -> pd.DataFrame:
    rows = []
    for step in _list_steps(root / _MISSING):
        path = root / _MISSING / _step_name(step, "json")
        try:
            rec = _read_json(path)
        except FileNotFoundError:
            continue
        except ValueError as e:
            rec = {"reason": f"unreadable missing-record {path}: {e}"}
        rows.append(
            {"step": step, "reason": str(rec.get("reason", "")), "time": str(rec.get("time", ""))}
        )
    df = pd.DataFrame(rows, columns=["step", "reason", "time"])
    return df.astype({"step": "int64"})


def load_run(path: str | os.PathLike, *, run: str | None = None,
             skip_corrupt: bool = False) -> RunData:
    """Load every committed snapshot of a run.

    Args:
        path: the store directory, or a run/log directory with a ``normx/`` store below
            it (e.g. ``lightning_logs/version_0/normx``; see `find_runs` for how far).
        run: which run, when ``path`` holds several (``StoreError`` lists them otherwise):
            a run id, a unique prefix of one, or ``latest`` (the run written last).
        skip_corrupt: log a warning and skip steps whose files are missing or unreadable,
            instead of raising ``StoreError``.

    Returns:
        ``RunData`` with one DataFrame per table (all steps, sorted by step), the committed
        steps, ``meta.json`` and the ``missing`` table (step, reason, time). A callback's ``metrics``
        table always has ``low`` and ``high`` (95% interval; NaN where none was stored).
    """
    return load_store(find_store(path, run), skip_corrupt=skip_corrupt)


def load_store(root: str | os.PathLike, *, skip_corrupt: bool = False) -> RunData:
    """``load_run`` of exactly the store directory ``root``, without discovery."""
    root = Path(root)
    if not _is_store(root):
        raise StoreError(f"{root} is not a normx store: it holds no {_META}, {RUN_FILE} or "
                         f"{_COMMITS}/")
    meta = _read_meta(root) if (root / _META).exists() else {}
    steps, tables = _load_tables(root, skip_corrupt)
    if "metrics" in tables and {"key", "value"} <= set(tables["metrics"].columns):
        tables["metrics"] = _current_metrics(tables["metrics"])
    return RunData(root, meta, steps, tables, _load_missing(root), read_run_record(root) or {})


# Keys renamed since older stores were written: old name -> current name.
_RENAMED_METRICS = {"alignment/dp": "alignment/dp_raw"}


def _current_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """A callback's metrics table from an older store under today's names, with ``low`` and
    ``high`` columns (NaN there). Tables of another shape are left alone."""
    if "key" not in frame:  # not the callback's metrics table: leave it as written
        return frame
    frame = frame.copy()
    frame["key"] = frame["key"].replace(_RENAMED_METRICS)
    for column in ("low", "high"):
        if column not in frame:
            frame[column] = float("nan")
    return frame
