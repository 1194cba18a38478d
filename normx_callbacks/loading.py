"""Reading a store: every committed snapshot of a run as one DataFrame per table.

`load_run` finds the run's store (`catalog.find_store`: a store directory, or a run
directory with stores below it; ``run=`` picks one of several) and `load_store` reads
exactly one: only committed snapshots, a step rewritten while it is read left out whole,
a corrupt step named (or skipped with ``skip_corrupt``). `RunData` holds the tables.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .catalog import find_store
from .store import (
    COMMITS,
    META_FILE,
    MISSING,
    RUN_FILE,
    TABLE_NAME,
    StoreError,
    is_store,
    list_steps,
    read_json,
    read_meta,
    read_run_record,
    step_name,
)

log = logging.getLogger(__name__)

# Keys renamed since older stores were written: old name -> current name.
_RENAMED_METRICS = {"alignment/dp": "alignment/dp_raw"}


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


def _corrupt(msg: str, step: int, root: Path, skip: bool, cause: BaseException) -> None:
    marker = root / COMMITS / step_name(step, "json")
    if skip:
        log.warning("skipping step %d: %s", step, msg)
        return
    raise StoreError(
        f"{msg}. The store at {root} is corrupted at step {step}: delete {marker} to drop that "
        f"step, or call load_run(..., skip_corrupt=True) (`normx ... --skip-corrupt` on the "
        f"command line) to skip it"
    ) from cause


def _read_markers(root: Path, skip_corrupt: bool) -> dict[int, tuple[bytes, dict]]:
    commits = root / COMMITS
    markers = {}
    for step in list_steps(commits):
        path = commits / step_name(step, "json")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue  # being rewritten: not committed right now
        try:
            marker = json.loads(raw)
            names = list(marker["tables"])
            if not all(isinstance(n, str) and TABLE_NAME.match(n) for n in names):
                raise ValueError(f"invalid table names {names!r}")
        except (ValueError, KeyError, TypeError) as e:
            _corrupt(f"commit marker {path} is unreadable ({e})", step, root, skip_corrupt, e)
            continue
        markers[step] = (raw, marker)
    return markers


def _marker_bytes(root: Path, step: int) -> bytes | None:
    try:
        return (root / COMMITS / step_name(step, "json")).read_bytes()
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
            file = root / name / step_name(step, "parquet")
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
    for step in list_steps(root / MISSING):
        path = root / MISSING / step_name(step, "json")
        try:
            rec = read_json(path)
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
    if not is_store(root):
        raise StoreError(f"{root} is not a normx store: it holds no {META_FILE}, {RUN_FILE} or "
                         f"{COMMITS}/")
    meta = read_meta(root) if (root / META_FILE).exists() else {}
    steps, tables = _load_tables(root, skip_corrupt)
    if "metrics" in tables and {"key", "value"} <= set(tables["metrics"].columns):
        tables["metrics"] = _current_metrics(tables["metrics"])
    return RunData(root, meta, steps, tables, _load_missing(root), read_run_record(root) or {})


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
