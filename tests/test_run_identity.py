"""Run identity (issue 11, cases 1-3): every store records its run; a fresh run never writes
into another run's store; a resume writes into the store of the run it continues; several
runs in one directory are listed and selected, by `load_run` and every `normx` command.

Real Trainer runs of a 2-layer, 32-wide GPT-2; W&B runs in offline mode.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from training import make_model

from normx_callbacks import NormXLogitCallback, StoreError, load_run, plots
from normx_callbacks.catalog import find_runs
from normx_callbacks.cli import main
from normx_callbacks.demo import TextDataModule
from normx_callbacks.loading import load_store
from normx_callbacks.store import RUN_FILE
from normx_callbacks.summary import next_commands

CALLBACK_LOG = "normx_callbacks"  # the package: its messages come from several modules


@pytest.fixture(scope="module")
def dm(cache_dir) -> TextDataModule:
    # 160 documents in batches of 16: an epoch is exactly 10 steps.
    data = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=160, num_probes=3,
                          batch_size=16, cache_dir=cache_dir)
    data.setup("fit")
    return data


def callback(**kwargs) -> NormXLogitCallback:
    return NormXLogitCallback(every_n_steps=4, media_probes=0, faithfulness_every=None,
                              **kwargs)


def fit(dm, root, callbacks, *, max_steps, logger=False, ckpt_path=None, seed=0):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, callbacks=callbacks,
        default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(make_model(dm, seed=seed), dm, ckpt_path=ckpt_path)
    return trainer


def record(store: Path) -> dict:
    return json.loads((store / RUN_FILE).read_text())


def markers(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "_commits").iterdir())}


def beside_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith(CALLBACK_LOG) and "writes its store beside it" in r.getMessage()]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------- case 1: two fresh runs


@pytest.mark.parametrize("where", ["logger=False", "store_dir"])
def test_a_second_fresh_run_writes_beside_the_first_never_into_it(dm, tmp_path, caplog,
                                                                  capsys, where):
    store_dir = tmp_path / "mystore" if where == "store_dir" else None
    first_store = store_dir or tmp_path / "normx"
    fit(dm, tmp_path, [callback(store_dir=store_dir)], max_steps=5)
    first = record(first_store)
    before = markers(first_store)
    assert sorted(before) == [f"step={s:09d}.json" for s in (0, 1, 2, 4, 5)]

    # The second run is shorter and differently seeded: mixed into the first store, its
    # steps 0-3 would replace the first run's and leave the first run's step 4 and 5.
    with caplog.at_level(logging.WARNING, logger=CALLBACK_LOG):
        fit(dm, tmp_path, [callback(store_dir=store_dir)], max_steps=3, seed=1)
    second_store = first_store.with_name(f"{first_store.name}-{_second_id(first_store)[:8]}")
    second = record(second_store)
    assert second["run_id"] != first["run_id"] and second["continues"] is None
    assert markers(first_store) == before  # not one byte of the first run touched
    assert load_run(second_store).steps == [0, 1, 2, 3]
    [message] = beside_messages(caplog)
    assert str(first_store) in message and str(second_store) in message

    # Several runs: listed, never merged; the selector picks one.
    for path in {tmp_path, first_store}:
        with pytest.raises(StoreError, match="holds 2 normx stores") as error:
            load_run(path)
        assert first["run_id"] in str(error.value) and second["run_id"] in str(error.value)
        assert "run=" in str(error.value) and "5 step(s)" in str(error.value)
    assert load_run(tmp_path, run="latest").steps == [0, 1, 2, 3]
    assert load_run(tmp_path, run=first["run_id"][:6]).steps == [0, 1, 2, 4, 5]
    assert load_run(tmp_path, run=second["run_id"]).run_record == second

    code, out, err = run_cli(capsys, "summary", tmp_path)
    assert code == 1 and "holds 2 normx stores" in err and "--run" in err
    assert "half-written" not in err  # case 3: the real cause, without --debug
    code, out, err = run_cli(capsys, "summary", tmp_path, "--run", first["run_id"][:8])
    assert code == 0 and f"run:       {first['run_id']}" in out and "steps 0..5" in out
    # The end-of-run message's next commands work as printed for either run.
    for store, steps in ((first_store, "steps 0..5"), (second_store, "steps 0..3")):
        [summary] = [c for c in next_commands(store, cwd=Path.cwd()) if " summary " in c]
        code, out, err = run_cli(capsys, "summary", *shlex.split(summary.split(" summary ")[1]))
        assert code == 0 and steps in out, (summary, err)


def _second_id(first_store: Path) -> str:
    [other] = [p for p in first_store.parent.iterdir()
               if p.name.startswith(f"{first_store.name}-")]
    return record(other)["run_id"]


def test_wandb_offline_twice_keeps_two_runs_with_their_wandb_ids(dm, tmp_path, monkeypatch,
                                                                  caplog):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR",
                "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    ids = []
    # configs/wandb.yaml's layout: a fixed save_dir, so both runs default to <save_dir>/normx.
    for max_steps in (5, 3):
        logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="normx-test")
        try:
            with caplog.at_level(logging.WARNING, logger=CALLBACK_LOG):
                fit(dm, tmp_path, [callback()], max_steps=max_steps, logger=logger)
            ids.append(logger.experiment.id)
        finally:
            wandb.finish()
    runs = {info.steps: info for info in find_runs(tmp_path)}
    assert sorted(runs) == [4, 5]
    assert runs[5].path == tmp_path / "normx"
    assert [record(runs[n].path)["wandb_run_id"] for n in (5, 4)] == ids
    assert ids[0] != ids[1]
    assert [e["type"] for e in record(runs[4].path)["loggers"]] == ["WandbLogger"]
    assert len(beside_messages(caplog)) == 1
    assert load_run(tmp_path, run="latest").steps == [0, 1, 2, 3]


# ----------------------------------------------------------------- case 2: resume


def test_resume_under_the_default_logger_continues_the_run_in_its_store(dm, tmp_path, capsys):
    ckpt_dir = tmp_path / "ckpt"
    # Run A saves a checkpoint at step 6 and dies at 9: its store holds snapshots 8 and 9
    # after the checkpoint, which the resumed run re-takes.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1)
    fit(dm, tmp_path, [callback(), checkpoint], max_steps=9, logger=True)
    store = tmp_path / "lightning_logs" / "version_0" / "normx"
    first = record(store)
    assert first["loggers"] == [{"type": "TensorBoardLogger", "name": "lightning_logs",
                                 "version": 0}]
    before = markers(store)
    assert sorted(before) == [f"step={s:09d}.json" for s in (0, 1, 2, 4, 8, 9)]

    resumed = callback()
    fit(dm, tmp_path, [resumed], max_steps=12, logger=True,
        ckpt_path=str(ckpt_dir / "epoch=0-step=6.ckpt"))
    assert (tmp_path / "lightning_logs" / "version_1").is_dir()  # the new logger version
    assert not (tmp_path / "lightning_logs" / "version_1" / "normx").exists()
    assert resumed.store.root == store and record(store) == first

    run = load_run(tmp_path)  # one run, every step once
    assert run.path == store and run.steps == [0, 1, 2, 4, 8, 12]
    assert not run["probes"].duplicated(["step", "probe_id"]).any()
    after = markers(store)
    assert all(after[name] == before[name] for name in
               [f"step={s:09d}.json" for s in (0, 1, 2, 4)])  # before the checkpoint: kept
    assert after["step=000000008.json"] != before["step=000000008.json"]  # re-taken
    code, out, err = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "r.html", "-q")
    assert code == 0 and "1 run(s)" in out, err


def test_resume_whose_store_is_gone_starts_a_store_that_says_which_run_it_continues(
        dm, tmp_path, caplog):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                 save_top_k=-1)
    fit(dm, tmp_path / "a", [callback(), checkpoint], max_steps=4)
    first = record(tmp_path / "a" / "normx")
    shutil.rmtree(tmp_path / "a")  # the run directory is gone; the checkpoint was kept

    resumed = callback()
    with caplog.at_level(logging.WARNING, logger=CALLBACK_LOG):
        fit(dm, tmp_path / "b", [resumed], max_steps=6,
            ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    store = tmp_path / "b" / "normx"
    second = record(store)
    assert second["continues"] == first["run_id"] and second["run_id"] != first["run_id"]
    assert load_run(store).steps == [6]
    [message] = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert first["run_id"] in message and str(store) in message


# ----------------------------------------------------------------- several runs, the CLI


def test_report_compares_runs_of_one_directory_and_refuses_an_unknown_selector(
        dm, tmp_path, capsys):
    for seed in (0, 1):
        fit(dm, tmp_path, [callback()], max_steps=2, seed=seed)
    ids = sorted(info.run_id for info in find_runs(tmp_path))
    code, out, err = run_cli(capsys, "report", tmp_path, "--run", "all", "-o",
                             tmp_path / "r.html", "-q", "--max-probes", "0")
    assert code == 0 and "2 run(s)" in out, err
    html = (tmp_path / "r.html").read_text()
    assert str(tmp_path / "normx") in html
    assert all(str(info.path) in html for info in find_runs(tmp_path))
    second = next(info for info in find_runs(tmp_path) if info.path.name != "normx")
    labels = plots.run_labels([load_store(info.path) for info in find_runs(tmp_path)])
    assert labels == [tmp_path.name, second.path.name]  # the runs are told apart by name

    code, _, err = run_cli(capsys, "export", tmp_path, "--run", "f" * 40, "-o", tmp_path / "x")
    assert code == 1 and "matches no run" in err and ids[0] in err and ids[1] in err
    assert not (tmp_path / "x").exists()


def test_the_cli_never_calls_an_intact_store_half_written(dm, tmp_path, capsys):
    fit(dm, tmp_path / "a", [callback()], max_steps=1)
    intact = tmp_path / "a" / "normx"
    # A second run that crashed during its first snapshot: a table file, no commit marker.
    crashed = tmp_path / "b" / "normx"
    (crashed / "tokens").mkdir(parents=True)
    (crashed / "_commits").mkdir()
    shutil.copy(intact / "tokens" / "step=000000000.parquet", crashed / "tokens")
    (crashed / RUN_FILE).write_text(json.dumps({"run_id": "c" * 32}))

    code, _, err = run_cli(capsys, "summary", tmp_path)
    assert code == 1 and "holds 2 normx stores" in err and "half-written" not in err
    assert str(intact) in err and str(crashed) in err
    code, _, err = run_cli(capsys, "summary", tmp_path, "--run", "ccc")
    assert code == 1 and f"{crashed} is a half-written store" in err
    code, out, err = run_cli(capsys, "summary", tmp_path, "--run", record(intact)["run_id"])
    assert code == 0 and "steps 0..1" in out, err
