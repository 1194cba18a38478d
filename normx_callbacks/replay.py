"""Replay: turn a series of saved checkpoints into the snapshot store a callback run writes.

Each checkpoint is loaded (one at a time) and measured by the callback's own `Engine`, so
the store, its tables and its numbers are those the callback records at the same step. The
engine's writer builds and writes one checkpoint's snapshot while the next one loads.

Past 400 lines as one module: the series loader (one model reused across checkpoints) and
the replay loop share the checkpoint-compatibility checks and the one-line error per bad
checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import (
    DEFAULT_MODEL_CLASS,
    CheckpointError,
    build_lightning,
    datamodule_hints,
    find_tokenizer,
    hf_config,
    hf_tokenizer_dir,
    hf_weights,
    import_class,
    load_hf_dir,
    load_lightning_weights,
    load_tokenizer,
    read_checkpoint,
    read_lightning,
)
from .discovery import find_model
from .embeddings import TokenCounter
from .engine import Engine
from .messages import one_line
from .probes import ProbeSet
from .settings import Settings
from .store import SnapshotStore, read_meta

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_STEP = re.compile(r"(?:checkpoint-|step)(\d+)$")
_CKPT_STEP = re.compile(r"step=(\d+)")


# What a replay cannot reproduce as the callback recorded it: what depends on the snapshots
# before (drift, stability, the first snapshot's reference) or on the training batches seen
# (token and next-token pair counts), which a replay has not seen.
NOT_REPRODUCED = ("embedding/drift", "stability/", "embedding/norm_logfreq_spearman",
                  "snapshot/", "embedding/seen_", "embedding/unseen_", "embedding/infogain",
                  "embedding/bigram_", "embedding/norm_infogain_spearman")


def reproduces(key: str) -> bool:
    """Whether a replay of a checkpoint records metric ``key`` as the callback did at its step
    (see `NOT_REPRODUCED`; keys ending in ``_reference`` compare with the first snapshot)."""
    return not key.startswith(NOT_REPRODUCED) and not key.endswith("_reference")


class ReplayError(ValueError):
    """Bad replay input; ``lines`` holds one message per bad input."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the series: where it is and the training step it was saved at."""

    path: Path
    step: int


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _expand(entry: str | os.PathLike) -> tuple[list[Path], str | None]:
    """The checkpoints an argument names (itself, a directory's children, a glob's matches)."""
    path = Path(entry).expanduser()
    if path.is_file() or _is_hf_dir(path):
        return [path], None
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if _is_hf_dir(p) or p.suffix == ".ckpt")
        if not found:
            return [], (f"{path}: a directory with no checkpoint in it (no config.json, no "
                        "*.ckpt, no checkpoint-N/ or stepN/ model directories)")
        return found, None
    matches = sorted(Path(p) for p in glob.glob(str(path)))
    if not matches:
        return [], f"{entry}: no such file, directory or glob match"
    return [p for p in matches if p.is_file() or _is_hf_dir(p)], None


def _step_of(path: Path) -> int | None:
    if path.is_dir():
        match = _HF_STEP.search(path.name)
        return int(match.group(1)) if match else None
    match = _CKPT_STEP.search(path.name)
    if match:
        return int(match.group(1))
    try:  # Lightning writes the step into the checkpoint; mmap reads only that entry
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: reported when it is loaded, with the reason
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return step if isinstance(step, int) else None


def resolve_checkpoints(
    checkpoints: Sequence[str | os.PathLike] | str | os.PathLike,
    steps: Sequence[int] | None = None,
) -> list[Checkpoint]:
    """The checkpoint series in step order.

    Args:
        checkpoints: HF ``save_pretrained`` directories, Lightning ``.ckpt`` files, directories
            holding them, or globs.
        steps: the step of each checkpoint, in the order found; default from the name
            (``checkpoint-N``, ``stepN``, ``step=N``) or the ``.ckpt``'s ``global_step``.

    Raises:
        ReplayError: one line per bad input (missing path, no step, duplicate step).
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    paths: list[Path] = []
    errors: list[str] = []
    for entry in checkpoints:
        found, error = _expand(entry)
        paths += found
        if error:
            errors.append(error)
    if not paths and not errors:
        errors.append("no checkpoints given")
    if steps is not None:
        steps = list(steps)
        if len(steps) != len(paths):
            errors.append(f"--steps gives {len(steps)} steps for {len(paths)} checkpoints "
                          f"({', '.join(map(str, paths[:3]))}{' ...' if len(paths) > 3 else ''})"
                          "; give one step per checkpoint, in the order listed")
            steps = None
        elif any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in steps):
            errors.append(f"--steps {steps}: steps must be non-negative integers")
            steps = None
    series: dict[int, Path] = {}
    for i, path in enumerate(paths):
        step = steps[i] if steps is not None else _step_of(path)
        if step is None:
            errors.append(f"{path}: cannot tell its training step (name it checkpoint-N or "
                          "stepN, or pass --steps)")
        elif step in series:
            errors.append(f"{path}: step {step} is also the step of {series[step]}; each "
                          "checkpoint needs its own step (pass --steps)")
        else:
            series[step] = path
    if errors:
        raise ReplayError(errors)
    return [Checkpoint(path, step) for step, path in sorted(series.items())]


class _EncodedOnce(ProbeSet):
    """A probe set encoded once per tokenizer, objective and length: every checkpoint of a
    series shares them, so the work (and its warnings about skipped probes) happens once."""

    def __init__(self, probes: ProbeSet) -> None:
        self.__dict__.update(probes.__dict__)
        self._cache: dict[tuple, Any] = {}

    def encode(self, tokenizer: Any, *, objective: str = "causal",
               max_length: int | None = None):
        key = (id(tokenizer), objective, max_length)
        if key not in self._cache:
            self._cache = {key: super().encode(tokenizer, objective=objective,
                                               max_length=max_length)}
        return self._cache[key]


class _SeriesLoader:
    """Loads the checkpoints of a series one at a time, into one model while they share a
    recipe.

    A checkpoint with the recipe of the model already built (the same HF config and Auto
    class, or the same LightningModule class and hyper-parameters) has its weights loaded
    into that model, already placed, cast and read (its adapter verified): every weight must
    fit by name and shape, an HF weight missing from the files only when it is tied to one
    present. Otherwise the model is rebuilt as a first load would (``from_pretrained``,
    ``load_from_checkpoint``), which also covers what only the rebuild knows (renamed
    keys, migrations, non-strict modules). Rebuilding initialises every weight and re-verifies
    the adapter with forward passes: for a small model that costs more than the load.
    """

    def __init__(self, model_class: type | None, device: str, dtype: torch.dtype) -> None:
        self.model_class = model_class
        self.device, self.dtype = device, dtype
        self.recipe: tuple | None = None
        self.module: nn.Module | None = None
        self.converts = True  # whether the HF model kept needs from_pretrained's conversions

    def load(self, path: Path) -> nn.Module:
        """The module to watch, in eval mode on the device in the dtype."""
        if path.is_dir():
            return self._hf(path)
        if self.model_class is not None:
            return self._lightning_class(path)
        ckpt, hp = read_lightning(path)
        recipe = ("demo", hp)
        arch = hp.get("arch", DEFAULT_MODEL_CLASS)
        if self._same(recipe):
            load_lightning_weights(path, self.module, ckpt, arch)
        else:
            self._drop()
            model = build_lightning(path, DEFAULT_MODEL_CLASS, hp)
            load_lightning_weights(path, model, ckpt, arch)
            self._keep(model, recipe)
        return self.module

    def _hf(self, path: Path) -> nn.Module:
        config, auto = hf_config(path)
        recipe = ("hf", auto.__name__, {k: v for k, v in config.to_dict().items()
                                        if not k.startswith("_") and k != "transformers_version"})
        if self._same(recipe) and not self.converts:
            try:
                state = hf_weights(path)
            except Exception:  # noqa: BLE001 - unreadable: the rebuild below says why
                state = None
            if state is not None and _load_fitting(self.module, state):
                return self.module
        self._drop()
        module = self._keep(load_hf_dir(path), recipe)
        self.converts = _converts_weights(module)
        return module

    def _lightning_class(self, path: Path) -> nn.Module:
        from lightning.pytorch.core.hooks import CheckpointHooks

        cls = self.model_class
        recipe = None
        # A class's own on_load_checkpoint may change the module beyond its state dict (a
        # rescaled buffer, an attribute): on a module already loaded that would compound, so
        # such a class is always rebuilt (and its checkpoints read once, by Lightning).
        if cls.on_load_checkpoint is CheckpointHooks.on_load_checkpoint:
            ckpt = read_checkpoint(path)
            recipe = ("class", cls, ckpt.get("hyper_parameters"))
            if self._same(recipe):
                try:  # what load_from_checkpoint does with the weights of a built module
                    self.module.load_state_dict(ckpt["state_dict"], strict=True)
                    return self.module
                except Exception:  # noqa: BLE001 - rebuilt below, as a first load is
                    pass
        self._drop()
        try:
            module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any way the user's class can fail to rebuild
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(f"{path}: {cls.__name__}.load_from_checkpoint failed "
                                  f"({type(error).__name__}: {first})") from error
        return self._keep(module, recipe)

    def _same(self, recipe: tuple) -> bool:
        try:
            return self.module is not None and bool(recipe == self.recipe)
        except Exception:  # values that do not compare (tensors in hyper-parameters)
            return False

    def _drop(self) -> None:
        self.module = self.recipe = None  # one model in memory at a time

    def _keep(self, module: nn.Module, recipe: tuple | None) -> nn.Module:
        module.to(device=self.device, dtype=self.dtype)
        module.eval()
        self.module, self.recipe = module, recipe
        return module


def _converts_weights(model: nn.Module) -> bool:
    """Whether transformers changes this model's weights on load beyond their names (a
    `WeightConverter`: fused experts, transposes): then only `from_pretrained` loads it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4: renames only, which the name check refuses
        return False
    try:
        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # noqa: BLE001 - cannot tell: the safe answer
        return True
    return any(not isinstance(t, WeightRenaming) for t in transforms)


def _load_fitting(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Load ``state`` into ``module`` if every tensor fits by name and shape and every weight
    it lacks is tied to one it has (HF saves a tied head once); False, untouched, if not."""
    expected = module.state_dict()
    if not set(state) <= set(expected):
        return False
    if any(tuple(state[k].shape) != tuple(expected[k].shape) for k in state):
        return False
    # Weights the model ties share one storage: the file must give them one value (a head
    # saved apart from the embedding it is tied to here means another tie layout).
    first_of: dict[int, str] = {}
    for key in state:
        other = first_of.setdefault(expected[key].data_ptr(), key)
        if other != key and not torch.equal(state[key], state[other]):
            return False
    if any(expected[k].data_ptr() not in first_of for k in set(expected) - set(state)):
        return False
    module.load_state_dict(state, strict=False)
    return True


def _series_shape(adapter) -> tuple[str, int | None, int]:
    """What every checkpoint of one series must share: model class, layers, vocabulary."""
    return (type(adapter.module).__name__ if adapter.module is not None else "?",
            adapter.num_layers, adapter.embedding.num_embeddings)


def replay(
    checkpoints: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    probes: ProbeSet | Sequence | str | os.PathLike,
    store_dir: str | os.PathLike,
    tokenizer: Any = None,
    layers: str | Sequence[int] | None = "all",
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 32,
    model_class: str | type | None = None,
    steps: Sequence[int] | None = None,
    faithfulness: bool = False,
    norm: str = "layer0",
    count_corpus: str | os.PathLike | None = None,
    progress: bool = True,
    settings: Settings | None = None,
) -> list[int]:
    """Measure every checkpoint of a series into a snapshot store, in step order.

    The store is the one ``NormXLogitCallback`` writes (``load_run``, ``normx report`` read it
    unchanged); its numbers are the callback's at the same step. Differences, by nature of a
    replay: ``embedding/drift`` and ``stability/spearman`` compare with the previous replayed
    checkpoint; token counts are 0 (no training batches are seen), so
    ``embedding/norm_logfreq_spearman`` is NaN, unless ``count_corpus`` gives a text;
    faithfulness, when asked, runs at every step.
    Steps already committed in the store are skipped (resume).

    Args:
        checkpoints: see `resolve_checkpoints`.
        probes: what the callback accepts (a ProbeSet, a list, a file, ``"blimp:PATH"``).
        store_dir: the snapshot store to write (created or appended to).
        tokenizer: a fast tokenizer or a tokenizer directory; default the first one the
            checkpoints to replay name, in step order (an HF directory's tokenizer files, the
            tokenizer a ``.ckpt``'s DataModule hyper-parameters name), for the whole series.
            Looked up before anything is measured: none found is one error, at once.
        layers, norm: as for the callback.
        device: "cpu", "cuda", "cuda:1", ...; default cuda when available.
        dtype: "float32" (default), "bfloat16" or "float16": the model's weights are cast.
        batch_size: probes per forward pass.
        model_class: ``"pkg.mod:Class"`` (or the class), a LightningModule rebuilt from each
            ``.ckpt`` with ``load_from_checkpoint(weights_only=True)``; default the demo's
            ``LanguageModel``.
        steps: the step of each checkpoint (see `resolve_checkpoints`).
        faithfulness: also compute the AOPC faithfulness metrics at each step.
        count_corpus: a UTF-8 text file whose token counts (each line tokenised without
            special tokens) fill the ``count`` column and ``embedding/norm_logfreq_spearman``
            at every step; the same counts at every step, not the batches seen up to it.
        progress: a progress bar with ETA on stderr.
        settings: the options of the callback run being replayed (`Settings`), for its
            layers, norm, probe batch size and the rest; the replay's own schedule (every
            checkpoint's step) and media (none) take their place, and ``layers``, ``norm``
            and ``batch_size`` are then not used.

    Returns:
        The steps written by this call.

    Raises:
        ReplayError: bad inputs, one line each. Checkpoints that fail to load are reported
            together after the others were replayed.
    """
    if dtype not in DTYPES:
        raise ReplayError([f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}"])
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ReplayError([f"--batch-size {batch_size!r}: use a positive integer"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ReplayError([f"--device {device!r} is not usable here ({error})"]) from None
    if isinstance(model_class, str):
        try:
            model_class = import_class(model_class)
        except CheckpointError as error:
            raise ReplayError([str(error)]) from None
    if count_corpus is not None and not Path(count_corpus).expanduser().is_file():
        raise ReplayError([f"--count-corpus {str(count_corpus)!r}: no such file; give a UTF-8 "
                           "text file (e.g. the training text)"])
    try:
        probe_set = _EncodedOnce(ProbeSet.coerce(probes))
    except (ValueError, OSError) as error:
        raise ReplayError([f"--probes: {error}"]) from None
    series = resolve_checkpoints(checkpoints, steps)
    store = SnapshotStore(store_dir)
    done = set(store.steps())
    todo = [c for c in series if c.step not in done]
    if done & {c.step for c in series}:
        log.warning("replay: %d step(s) already in %s are skipped", len(series) - len(todo),
                    store.root)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(Path(tokenizer).expanduser())
    elif tokenizer is None and todo:
        tokenizer = _series_tokenizer(todo)
    # A replay measures every checkpoint of its series and draws no media (no loggers).
    base = settings if settings is not None else Settings(layers=layers, norm=norm)
    engine = Engine(probe_set, dataclasses.replace(
        base, schedule="steps", steps=tuple(c.step for c in series), media_probes=0,
        probe_batch_size=batch_size if settings is None else base.probe_batch_size,
        faithfulness_every=1 if faithfulness else None), owner="normx replay")
    try:
        with _no_hf_progress():  # one bar: ours, not one per checkpoint load
            return _replay_series(engine, tokenizer, Path(store_dir), series, todo, model_class,
                                  device, dtype, progress, count_corpus, _stored_shape(store))
    finally:
        engine.close()


def _tokenizer_dir(path: Path) -> Path:
    """The tokenizer directory a checkpoint names. Raises FileNotFoundError (why: where it
    looked) when it names none, CheckpointError when the ``.ckpt`` cannot be read."""
    if path.is_dir():
        return hf_tokenizer_dir(path)
    try:  # the DataModule's hyper-parameters; mmap reads only what is used
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - unreadable: reported when it is loaded
        raise CheckpointError(str(path)) from error
    return find_tokenizer(path, datamodule_hints(ckpt) if isinstance(ckpt, dict) else {})


def _series_tokenizer(todo: list[Checkpoint]) -> Any:
    """The tokenizer of the first checkpoint that names one, before anything is measured.

    Raises:
        ReplayError: one line when none of them names a tokenizer (not one per checkpoint
            at the end of a full progress bar). None when no checkpoint can be read: each is
            then reported when it is loaded.
    """
    why = None
    for checkpoint in todo:
        try:
            found = _tokenizer_dir(checkpoint.path)
        except CheckpointError:
            continue
        except FileNotFoundError as error:
            why = why or str(error).split("; pass tokenizer=", 1)[0]
            continue
        try:
            return load_tokenizer(found)
        except (CheckpointError, FileNotFoundError) as error:
            raise ReplayError([f"{error}; or pass --tokenizer DIR (tokenizer= in Python)"]) from None
    if why is None:
        return None
    others = ("" if len(todo) == 1 else ", nor does the other" if len(todo) == 2
              else f", nor do the {len(todo) - 1} others")
    raise ReplayError([f"no tokenizer found with the checkpoints: {why}{others}; pass "
                       "--tokenizer DIR (tokenizer= in Python), a directory with tokenizer.json"])


def _stored_shape(store: SnapshotStore) -> tuple[str, tuple] | None:
    """The architecture a store already holds snapshots of, as `_series_shape` gives it; None if new."""
    if not store.steps():
        return None
    meta = read_meta(store.root).get("run_meta", {})
    shape = (meta.get("model"), meta.get("num_layers"), meta.get("vocab_size"))
    return (f"the store {store.root}", shape) if None not in shape else None


@contextmanager
def _no_hf_progress():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _replay_series(engine: Engine, tokenizer: Any, root: Path, series: list[Checkpoint],
                   todo: list[Checkpoint], model_class: type | None, device: str, dtype: str,
                   progress: bool, count_corpus: str | os.PathLike | None = None,
                   first: tuple[Any, tuple] | None = None) -> list[int]:
    """Load, check and measure each checkpoint of ``todo``; the steps written."""
    from tqdm.auto import tqdm

    errors: list[str] = []
    taken: list[Checkpoint] = []
    counts: tuple | None = None
    loader = _SeriesLoader(model_class, device, DTYPES[dtype])
    bar = tqdm(todo, desc="replay", unit="ckpt", disable=not progress, file=sys.stderr)
    for checkpoint in bar:
        bar.set_postfix(step=checkpoint.step)
        try:
            module = loader.load(checkpoint.path)
        except (CheckpointError, FileNotFoundError, OSError) as error:
            errors.append(_line(checkpoint.path, error))
            continue
        if tokenizer is None:  # only when no checkpoint could be read before the series
            errors.append(f"{checkpoint.path}: no tokenizer found with it; pass "
                          "--tokenizer DIR (tokenizer= in Python)")
            continue
        try:
            adapter = find_model(module, who="normx replay")
            shape = _series_shape(adapter)
            if first is not None and shape != first[1]:
                raise ValueError(
                    f"another architecture ({shape[0]}, {shape[1]} layers, {shape[2]} embedding "
                    f"rows) than {first[0]} ({first[1][0]}, {first[1][1]} layers, "
                    f"{first[1][2]} embedding rows)")
            if engine.prepared:
                engine.use_model(adapter)  # the probes stay encoded; the writer goes on
            else:
                engine.prepare(adapter, tokenizer)
        except (RuntimeError, ValueError) as error:
            errors.append(_line(checkpoint.path, error))
            continue
        if first is None:
            first = (checkpoint.path, shape)
        if engine.store is None:  # a replay appends to its store: the run there goes on
            engine.append_to(root)
        if counts is None:
            counts = (_count(count_corpus, tokenizer, shape[2]) if count_corpus
                      else TokenCounter(shape[2]))  # no batches in a replay: zeros
        engine.set_counts(counts.counts, counts.pairs())
        engine.snapshot(checkpoint.step, final=checkpoint is series[-1])
        taken.append(checkpoint)
        del module, adapter  # the loader keeps the one model of the series
        engine.release_model()
    bar.close()
    engine.flush()
    written = []
    for checkpoint in taken:
        if checkpoint.step in engine.failed_steps:
            errors.append(f"{checkpoint.path}: the snapshot failed "
                          f"({engine.failed_steps[checkpoint.step]}; the store records the step "
                          "as missing)")
        else:
            written.append(checkpoint.step)
    if errors:
        raise ReplayError(errors)
    return written


def _count(path: str | os.PathLike, tokenizer: Any, vocab: int) -> TokenCounter:
    """The token and next-token pair counts of a text file, each line tokenised without
    special tokens (a line is a row: no pair spans two lines)."""
    try:
        lines = Path(path).expanduser().read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ReplayError([f"--count-corpus {str(path)!r}: cannot read it ({error})"]) from None
    counter = TokenCounter(vocab)
    for ids in tokenizer([line for line in lines if line.strip()],
                         add_special_tokens=False)["input_ids"]:
        if ids:
            counter.update(torch.tensor(ids, dtype=torch.long)[None])
    counter.collect()
    return counter


def _line(path: Path, error: BaseException) -> str:
    """One line for a bad checkpoint, naming it once."""
    text = one_line(error)
    return text if text.startswith(str(path)) else f"{path}: {text}"
