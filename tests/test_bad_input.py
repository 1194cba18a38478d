"""The bad-input catalogue (RELIABILITY.md): every kind of bad input a user can give, and
the one message each gets, naming the input and the fix.

Each case is triggered for real (files on disk, real Trainers, the `normx` command) and
checked the same way: the exception type, a pattern naming the input, a pattern naming
the fix. Callback cases also prove they fail in setup, before the first training step:
global_step 0, the model's weights untouched, no store written. Many of these have a
detailed test next to the module they belong to; this file proves the whole list, but for
checkpoints: every way a checkpoint fails is tests/test_checkpoints.py's.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from training import make_model, make_trainer

from normx_callbacks import NormXLogitCallback, ProbeError, ProbeSet, StoreError, load_run
from normx_callbacks.cli import main as cli_main
from normx_callbacks.demo import TextDataModule, load_corpus
from normx_callbacks.store import SnapshotStore


class CommandError(Exception):
    """What `normx` printed on stderr when it exited with status 1."""


@dataclass
class Case:
    trigger: Callable[[SimpleNamespace], object]
    error: type[BaseException]
    names: str  # regex: the message names the bad input
    fix: str  # regex: ...and says what to do
    stage: str  # where it is caught (RELIABILITY.md's column)


def probe_file(ctx, name: str, content: str | bytes) -> ProbeSet:
    path = ctx.tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return ProbeSet.from_file(path)


def command(*argv) -> None:
    """Run `normx`; a failure must be one line on stderr, no traceback."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main([str(a) for a in argv])
    lines = err.getvalue().strip().splitlines()
    if code != 0:
        assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
        raise CommandError(lines[0])


def train(ctx, *, model=None, strategy="auto", **kwargs) -> None:
    """Fit with the callback; the error must come from setup, before any training step."""
    model = model or make_model(ctx.dm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    store = kwargs.pop("store_dir", ctx.tmp / "store")
    options = {"probes": ctx.dm.probes, "media_probes": 0, "store_dir": store, **kwargs}
    trainer = make_trainer(ctx.tmp, [NormXLogitCallback(**options)], strategy=strategy)
    environ = dict(os.environ)
    try:
        trainer.fit(model, ctx.dm)
    finally:
        # ModelParallelStrategy starts a one-process gloo group: tear it down.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            os.environ.clear()
            os.environ.update(environ)
        assert trainer.global_step == 0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not Path(store).exists()


def small_store(ctx) -> Path:
    store = SnapshotStore(ctx.tmp / "normx")
    for step in (0, 1, 2):
        store.write(step, {"metrics": pd.DataFrame({"key": ["a"], "value": [1.0]})})
    return store.root


def corrupt_table(ctx) -> None:
    root = small_store(ctx)
    (root / "metrics" / "step=000000001.parquet").write_bytes(b"not parquet")
    load_run(root)


def corrupt_meta(ctx) -> None:
    root = small_store(ctx)
    (root / "meta.json").write_text("{ not json")
    load_run(root)


def without_captum(ctx) -> None:
    ctx.monkeypatch.setitem(sys.modules, "captum", None)
    ctx.monkeypatch.setitem(sys.modules, "captum.attr", None)
    train(ctx, faithfulness_methods=["normxlogit", "integrated_gradients"])


def store_under_a_file(ctx) -> None:
    (ctx.tmp / "notes.txt").write_text("a file, not a directory\n")
    train(ctx, store_dir=ctx.tmp / "notes.txt" / "normx")


LONG = "the farmer near the tables behind the old red houses near the kings"

CASES = {
    # ---------------------------------------------------------------- probe files
    "malformed YAML": Case(
        lambda c: probe_file(c, "p.yaml", "- {text: 'the keys'\n- text: b\n"),
        ProbeError, r"probes file '.*p\.yaml' line \d+: malformed YAML", r"fix the syntax",
        "ProbeSet.from_file"),
    "malformed JSONL": Case(
        lambda c: probe_file(c, "p.jsonl", '{"text": "the keys"}\n{"text": \n'),
        ProbeError, r"probes file '.*p\.jsonl' line 2: malformed JSON",
        r"each line must hold one JSON object", "ProbeSet.from_file"),
    "empty probe file": Case(
        lambda c: probe_file(c, "p.yaml", "# nothing yet\n"),
        ProbeError, r"probes file '.*p\.yaml': the probe set is empty",
        r"give at least one probe", "ProbeSet.from_file"),
    "empty probe list": Case(
        lambda c: NormXLogitCallback(probes=[]),
        ProbeError, r"probes: the probe set is empty", r"give at least one probe",
        "NormXLogitCallback()"),
    "duplicate probe ids": Case(
        lambda c: ProbeSet([{"id": "a", "text": "the key"}, {"id": "a", "text": "the keys"}]),
        ProbeError, r"probe 'a' \(index 1\): duplicate id 'a'",
        r"give each probe a unique id", "ProbeSet()"),
    "cue not in the text": Case(
        lambda c: ProbeSet([{"text": "the key near the cabinets", "cues": ["keys"]}]),
        ProbeError, r"cue 'keys' does not occur as a whole word in text 'the key near",
        r"copy the cue from the text exactly or remove it", "ProbeSet()"),
    "unknown probe key": Case(
        lambda c: ProbeSet([{"text": "the key", "label": "x"}]),
        ProbeError, r"unknown key 'label'", r"valid keys are attractors, cues, foil, group, id, target, text",
        "ProbeSet()"),
    "non-UTF-8 probe file": Case(
        lambda c: probe_file(c, "p.yaml", b"- text: caf\xe9 near\n"),
        ProbeError, r"probes file '.*p\.yaml' is not valid UTF-8 \(byte \d+",
        r"re-save it with UTF-8 encoding", "ProbeSet.from_file"),
    "YAML tag that would run code": Case(
        lambda c: probe_file(c, "p.yaml", '- !!python/object/apply:os.system ["echo pwned"]\n'),
        ProbeError, r"probes file '.*p\.yaml' line 1: YAML tag not allowed .*os\.system",
        r"remove the tag", "ProbeSet.from_file"),
    "probe file of unknown format": Case(
        lambda c: probe_file(c, "p.txt", "the key\n"),
        ProbeError, r"probes file '.*p\.txt' has unsupported suffix '\.txt'",
        r"use one of \.yaml, \.yml, \.jsonl, \.json", "ProbeSet.from_file"),
    "probe file that does not exist": Case(
        lambda c: ProbeSet.from_file(c.tmp / "missing.yaml"),
        FileNotFoundError, r"probes file '.*missing\.yaml' does not exist",
        r"check the path \(relative paths resolve from", "ProbeSet.from_file"),
    # ---------------------------------------------------------------- callback setup
    "probe longer than the context": Case(
        lambda c: train(c, model=make_model(c.dm, context=10),
                        probes=[{"id": "long", "text": LONG}]),
        ProbeError, r"probe 'long' \(index 0\): \d+ tokens exceed max_length=10",
        r"shorten the probe or use a model with a longer context", "setup"),
    "many probes longer than the context": Case(
        lambda c: train(c, model=make_model(c.dm, context=10),
                        probes=[{"id": f"long-{i}", "text": LONG} for i in range(30)]
                        + ["the table near the authors"]),
        ProbeError, r"30 of 31 probes exceed max_length=10 tokens \(the longest has \d+\): "
                    r"probe 'long-0' \(index 0\): \d+ tokens; (probe 'long-\d' \(index \d\): \d+ "
                    r"tokens; ){4}and 25 more",
        r"shorten or drop them, or use a model with a context of at least \d+ tokens", "setup"),
    "unknown layer index": Case(
        lambda c: train(c, layers=[0, 5]),
        ValueError, r"NormXLogitCallback: layers contains 5",
        r"valid indices are 0\.\.2 \(0 = embedding output, 2 = last layer\)", "setup"),
    "tokenizer/model vocabulary mismatch": Case(
        lambda c: train(c, model=make_model(c.dm, vocab_size=100)),
        RuntimeError, r"the tokenizer has \d+ tokens but the model's embedding has 100 rows",
        r"pass the tokenizer the model was built for", "setup"),
    "unsupported strategy": Case(
        lambda c: train(c, strategy=ModelParallelStrategy()),
        RuntimeError, r"NormXLogitCallback does not support ModelParallelStrategy: sharded "
                      r"parameters must come from fully_shard in LightningModule.configure_model",
        r"which LanguageModel does not override; use strategy='ddp' otherwise", "setup"),
    "missing optional backend (Captum)": Case(
        without_captum,
        ImportError, r"method='integrated_gradients' needs Captum, which is not installed",
        r"pip install 'normx-callbacks\[baselines\]'", "setup"),
    "store_dir under a file": Case(
        store_under_a_file,
        ValueError, r"store root '.*notes\.txt/normx' lies under '.*notes\.txt', which is a file",
        r"choose another store_dir", "setup"),
    # ---------------------------------------------------------------- arguments
    "unknown schedule": Case(
        lambda c: NormXLogitCallback(schedule="cosine"),
        ValueError, r"schedule='cosine'", r"is not one of", "NormXLogitCallback()"),
    "unknown attribution method": Case(
        lambda c: NormXLogitCallback(faithfulness_methods=["normxlogit", "lime"]),
        ValueError, r"faithfulness_methods=\['normxlogit', 'lime'\]: unknown \['lime'\]",
        r"valid names are \('normxlogit'", "NormXLogitCallback()"),
    # ---------------------------------------------------------------- corpora and suites
    "unknown corpus": Case(
        lambda c: TextDataModule(corpus="wikitext103", cache_dir=str(c.tmp)),
        ValueError, r"unknown corpus 'wikitext103'",
        r"choose one of agreement, docs, a local \.txt file or directory, or hf:", "TextDataModule()"),
    "corpus path that does not exist": Case(
        lambda c: load_corpus("data/missing.txt"),
        FileNotFoundError, r"corpus path 'data/missing\.txt' does not exist",
        r"built-in corpora: agreement, docs", "load_corpus"),
    "unknown built-in probe suite": Case(
        lambda c: command("faithfulness", c.ckpt, "--suite", "glue",
                          "--methods", "normxlogit"),
        CommandError, r"normx faithfulness: error: unknown corpus 'glue'",
        r"choose one of agreement, docs", "normx faithfulness"),
    # ---------------------------------------------------------------- stores and checkpoints
    "corrupted store (table file)": Case(
        corrupt_table,
        StoreError, r"table file .*metrics/step=000000001\.parquet is missing or unreadable",
        r"delete .*_commits/step=000000001\.json to drop that step, or call "
        r"load_run\(\.\.\., skip_corrupt=True\)", "load_run"),
    "corrupted store (meta.json)": Case(
        corrupt_meta,
        StoreError, r".*normx/meta\.json is unreadable",
        r"restore it from a backup or delete .*meta\.json", "load_run"),
    "report on a directory that is not a run": Case(
        lambda c: command("report", c.tmp, "-o", c.tmp / "report.html"),
        CommandError, r"normx report: error: .* is not a normx run directory",
        r"pass the directory the callback wrote \(its `store_dir`\)", "normx report"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_message(name, dm, tiny_ckpt, tmp_path, monkeypatch):
    case = CASES[name]
    ctx = SimpleNamespace(tmp=tmp_path, dm=dm, ckpt=tiny_ckpt, monkeypatch=monkeypatch)
    with pytest.raises(case.error) as caught:
        case.trigger(ctx)
    message = " ".join(str(caught.value).split())
    assert message, name
    assert re.search(case.names, message), f"{name}: input not named in: {message}"
    assert re.search(case.fix, message), f"{name}: no fix given in: {message}"
