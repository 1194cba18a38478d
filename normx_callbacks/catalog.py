"""Which stores exist on disk, and which one a run means: the catalog of runs.

`find_runs` finds every store at a path (the store itself and the stores later fresh runs
wrote beside it, or the stores below a run directory, searched breadth-first to a bound);
`select_runs` / `find_store` pick by run id, a unique prefix of one, ``latest`` or ``all``,
and a "which run?" error lists them. `empty_store_reason` says why a store shows no
snapshot. `choose_store` decides which store a run writes (a resume its own, a fresh run
one it claims atomically, `claim_store`), with the run record it holds (`run.json`, the
store's own file: `store.read_run_record`).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .store import (
    COMMITS,
    META_FILE,
    MISSING,
    RUN_FILE,
    STORE_DIRNAME,
    StoreError,
    claim_run_record,
    holds_snapshots,
    is_store,
    list_steps,
    read_run_record,
    sibling_root,
)

log = logging.getLogger(__name__)

def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir() and e.name[0] not in "._"]
    except OSError:  # unreadable directories cannot hold the store we are looking for
        return []


# How far `find_runs` looks below a directory: levels, and directories looked into at most.
_SEARCH_DEPTH = 8
_SEARCH_DIRS = 10_000
# Stores a "which run?" error lists by name; the others are counted.
_LISTED = 10
# A fresh run that finds another run's store at its path writes beside it, into
# `<name>-<first 8 hex digits of its run id>` (see `sibling_root`).
_SIBLING = re.compile(r"^.+-[0-9a-f]{8}$")


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


def _last_write(root: Path) -> float:
    times = []
    for sub in (COMMITS, MISSING):
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
                   record.get("continues"), len(list_steps(root / COMMITS)), _last_write(root))


def _is_run_store(path: Path) -> bool:
    # A store under another name (a `store_dir`) is known by the run record the callback wrote.
    return (path.name == STORE_DIRNAME or (path / RUN_FILE).is_file()) and is_store(path)


def empty_store_reason(root: str | os.PathLike) -> str | None:
    """Why the store directory ``root`` shows no snapshot: no commit marker beside its table
    files (half-written), or nothing but its own bookkeeping files (empty). None when it
    holds a committed snapshot (an intact store is never called half-written) or something
    else."""
    root = Path(root)
    if any((root / COMMITS).glob("step=*.json")):
        return None
    tables = [p for p in root.glob("*/step=*.parquet") if not p.parent.name.startswith("_")]
    if tables:
        return (f"{root} is a half-written store: {len(tables)} table file(s) but no "
                f"commit marker ({COMMITS}/step=*.json), so no snapshot is complete; the run "
                "crashed during its first snapshot or is still writing it")
    try:
        names = {p.name for p in root.iterdir()}
    except OSError:
        return None
    if names <= {META_FILE, RUN_FILE, COMMITS}:
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
    if is_store(path):
        beside = [p for p in _subdirs(path.parent)
                  if p.name.startswith(f"{path.name}-") and _SIBLING.match(p.name)
                  and is_store(p)]
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
            if depth + 1 < _SEARCH_DEPTH and not is_store(sub):
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


# ----------------------------------------------------------------------------- a run's store

# Logger types whose `version` is a W&B run id (a run record names the W&B run).
WANDB_LOGGER_TYPES = ("WandbLogger", "WandbRunLogger")


def new_run_record(loggers: Sequence = (), *, continues: str | None = None) -> dict:
    """A fresh run's record (`run.json`): a new run id, when, its loggers, the run it
    continues (a resume whose store is gone)."""
    described = [{"type": type(lg).__name__, "name": _attr_or_none(lg, "name"),
                  "version": _attr_or_none(lg, "version")} for lg in loggers]
    wandb = [lg["version"] for lg in described if lg["type"] in WANDB_LOGGER_TYPES]
    return {"run_id": uuid.uuid4().hex,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loggers": described, "wandb_run_id": wandb[0] if wandb else None,
            "continues": continues}


def choose_store(root: Path, *, restored: dict | None, current: dict | None,
                 going_on: bool, loggers: Sequence = (),
                 owner: str = "NormXLogitCallback") -> tuple[Path, dict, bool] | None:
    """The store a run writes and its record: ``(root, record, claimed)`` (``claimed``: the
    record is on disk already), or None to keep the store in use.

    A resume (``restored``: the run id and store a checkpoint recorded) writes into the store
    of the run it came from; ``going_on`` (the same driver fitting on from steps it already
    took, ``current`` its record) keeps its store; a fresh run gets a new run id and claims a
    store (`claim_store`): ``root``, or the store beside it when another run has it.
    """
    if restored is None and current is not None and going_on:
        return None  # fitting on in memory: the same run, the same store
    if restored is not None and restored.get("run_id"):
        old = Path(restored["store"]) if restored.get("store") else None
        record = read_run_record(old) if old is not None else None
        if record is not None and record["run_id"] == restored["run_id"]:
            return old, record, False
        run = new_run_record(loggers, continues=restored["run_id"])
        root = claim_store(root, run, owner, quiet=True)
        log.warning("%s: the store of run %s (%s) is gone; this resumed run writes a new store "
                    "at %s that records which run it continues", owner, restored["run_id"], old,
                    root)
        return root, run, True
    run = new_run_record(loggers)
    if restored is not None and read_run_record(root) is None:
        return root, run, False  # a checkpoint from before stores recorded their run
    return claim_store(root, run, owner), run, True


def claim_store(root: Path, run: dict, owner: str, *, quiet: bool = False) -> Path:
    """Claim ``root`` for the new ``run`` (`store.claim_run_record`: atomic), or the store
    beside it (``<root>-<8 hex>``) when another run has it already: one that ran before, one
    started at the same moment, or an old store without a run record."""
    taken = read_run_record(root) is None and holds_snapshots(root)  # before run records
    if not taken and claim_run_record(root, run):
        return root
    record = read_run_record(root)
    other = record["run_id"] if record else "without a run id"
    beside = sibling_root(root, run["run_id"])
    if not claim_run_record(beside, run):  # a run id is unique: this cannot happen twice
        raise RuntimeError(f"{owner}: {beside} already holds a run record")
    if not quiet:
        log.warning("%s: %s holds another run's store (run %s); this run (%s) writes its store "
                    "beside it at %s", owner, root, other, run["run_id"], beside)
    return beside


def _attr_or_none(obj, name: str):
    """A logger property for the run record; a logger whose property raises is not fatal."""
    try:
        return getattr(obj, name)
    except Exception as error:  # noqa: BLE001 - third-party loggers: anything may raise
        log.warning("%s.%s raised %s: %s; not recorded in run.json", type(obj).__name__, name,
                    type(error).__name__, error)
        return None
