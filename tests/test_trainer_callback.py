"""NormXLogitTrainerCallback: the engine inside real transformers `Trainer` runs on the CPU.

The demo's tiny GPT-2 (the HF model inside `training.make_model`, so the Lightning callback
can watch the same initial weights) trains on the agreement corpus; TensorBoard event files,
the store, the checkpoints' `normx replay` and a W&B offline run are read back.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Subset
from training import fit, make_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from normx_callbacks import NormXLogitCallback, NormXLogitTrainerCallback, load_run
from normx_callbacks.catalog import find_runs
from normx_callbacks.cli import main
from normx_callbacks.methods import GRADIENT_METHODS
from normx_callbacks.replay import reproduces
from normx_callbacks.report import read_losses, tensorboard_folders
from normx_callbacks.trainer_callback import STATE_FILE

STEPS = 20
SNAPSHOTS = [0, 1, 2, 4, 8, 16, 20]  # the log schedule (every_n_steps=100), then the final step
SAVED = [8, 16, 20]  # save_steps=8, and the Trainer's save at the end
# Wall-clock costs differ between any two runs; every other number must agree.
TIMINGS = ("snapshot/", "seconds_per_instance", "/seconds")  # wall times, not numbers
# Metrics that depend on the snapshots before or the batches seen; a replay has neither.


def _args(out: Path, **kwargs) -> TrainingArguments:
    options = dict(output_dir=str(out), use_cpu=True, seed=0, learning_rate=3e-3,
                   per_device_train_batch_size=8, gradient_accumulation_steps=2,
                   logging_steps=5, report_to=[], save_strategy="no", disable_tqdm=True,
                   dataloader_num_workers=0)
    return TrainingArguments(**{**options, **kwargs})


def _trainer(dm, args, callbacks, *, documents: int, model=None, eval_documents: int = 0,
             tokenizer=True):
    """A Trainer of the demo's HF GPT-2 on the first ``documents`` training documents."""
    return Trainer(
        model=model if model is not None else make_model(dm).model, args=args,
        train_dataset=Subset(dm._train, range(documents)),
        eval_dataset=Subset(dm._val, range(eval_documents)) if eval_documents else None,
        processing_class=dm.tokenizer if tokenizer else None, callbacks=callbacks)


def _every_token(dm, documents: int) -> torch.Tensor:
    """Token counts of the first ``documents`` training documents, each counted once."""
    ids = dm._train.input_ids[:documents]
    mask = dm._train.attention_mask[:documents].bool()
    return torch.bincount(ids[mask], minlength=dm.vocab_size)


def _counts(run, step: int) -> torch.Tensor:
    rows = run.embedding[run.embedding.step == step].sort_values("token_id")
    return torch.tensor(rows["count"].to_numpy(), dtype=torch.long)


# 20 optimizer steps of 2 micro-batches of 8: 320 documents, one epoch, each counted once.
MAIN = dict(max_steps=STEPS, save_strategy="steps", save_steps=8, report_to=["tensorboard"],
            activation_checkpointing=True, eval_strategy="steps", eval_steps=10,
            per_device_eval_batch_size=8)


@pytest.fixture(scope="module")
def trained(dm, tmp_path_factory):
    """One real Trainer run with the callback: gradient accumulation, gradient
    checkpointing, evaluation forwards, checkpoints every 8 steps, TensorBoard."""
    out = tmp_path_factory.mktemp("hf") / "out"
    callback = NormXLogitTrainerCallback(dm.probes, media_probes=1)
    trainer = _trainer(dm, _args(out, **MAIN), [callback], documents=320, eval_documents=8)
    trainer.train()
    return SimpleNamespace(out=out, callback=callback, trainer=trainer,
                           run=load_run(out / "normx"))


def test_a_trainer_run_stores_each_step_once_and_logs_into_its_tensorboard_run(trained, dm):
    run, out = trained.run, trained.out
    assert run.steps == trained.callback.snapshot_steps == SNAPSHOTS
    assert trained.callback.missing_steps == {}
    for table in ("tokens", "probes", "embedding", "metrics"):
        assert len(list((out / "normx" / table).glob("*.parquet"))) == len(SNAPSHOTS), table
    assert not run.metrics.duplicated(["step", "key"]).any()
    assert run.run_record["loggers"][0]["type"] == "TensorBoardDirLogger"
    # The resume state went into every checkpoint folder the Trainer saved.
    assert sorted(int(p.parent.name.split("-")[1]) for p in out.glob(f"*/{STATE_FILE}")) == SAVED

    # The normx curves sit in the Trainer's own TensorBoard run (its loss beside them), on
    # the Trainer's global steps, with the images.
    [run_dir] = (out / "runs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("normx/probe/target_prob")] == SNAPSHOTS
    assert [e.step for e in events.Scalars("normx/alignment/ap")] == SNAPSHOTS
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, STEPS + 1, 5))
    assert [e.step for e in events.Images(f"normx/heatmap/{dm.probes[0].id}/layers")
            ] == SNAPSHOTS
    # `normx report` finds that run (our event file carries the run id) for the loss curve.
    assert tensorboard_folders(run) == [run_dir]
    losses, note = read_losses(run)
    assert note is None and losses["train/loss"][0] == list(range(5, STEPS + 1, 5))

    # Counting: the forward pre-hook saw every micro-batch of gradient accumulation once,
    # not gradient checkpointing's recomputation, not the evaluation forwards.
    assert trained.trainer.model.is_activation_checkpointing
    assert [h["step"] for h in trained.trainer.state.log_history if "eval_loss" in h] == [10, 20]
    assert torch.equal(_counts(run, STEPS), _every_token(dm, 320))
    assert _counts(run, 0).sum() == 0


def test_step_zero_equals_the_lightning_callback_on_the_same_weights(trained, dm, tmp_path):
    callback = NormXLogitCallback(dm.probes, media_probes=1, store_dir=tmp_path / "lightning")
    fit(make_model(dm), dm, tmp_path, [callback], max_steps=1)
    lightning, ours = load_run(tmp_path / "lightning"), trained.run
    for table in ("tokens", "probes", "embedding", "faithfulness"):
        left, right = (t[t.step == 0].drop(columns=["seconds"], errors="ignore")
                       .reset_index(drop=True) for t in (ours[table], lightning[table]))
        assert len(left) > 0, table
        pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=0, atol=1e-6,
                                      obj=table)
    left, right = (m.metrics[(m.metrics.step == 0) & ~m.metrics.key.str.contains("|".join(
        TIMINGS))].set_index("key").sort_index() for m in (ours, lightning))
    assert {"probe/accuracy", "alignment/ap", "faithfulness/normxlogit/comprehensiveness"
            } <= set(left.index)
    pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=0, atol=1e-6)


def test_replay_of_the_runs_own_checkpoints_gives_the_callbacks_numbers(trained, dm, tmp_path):
    probes = tmp_path / "probes.json"
    probes.write_text(json.dumps([{k: v for k, v in p.__dict__.items() if v not in ((), "", None)}
                                  for p in dm.probes]), "utf-8")
    assert main(["replay", str(trained.out), "-o", str(tmp_path / "replayed"), "--probes",
                 str(probes), "--device", "cpu", "-q"]) == 0
    replayed, recorded = load_run(tmp_path / "replayed"), trained.run
    assert replayed.steps == SAVED
    for step in SAVED:
        a, b = (r.tokens[r.tokens.step == step].reset_index(drop=True)
                for r in (replayed, recorded))
        assert len(a) == len(b) > 0
        for column in ("norm", "logat", "score", "contrast"):
            assert (a[column] - b[column]).abs().max() <= 1e-5, (step, column)
        ma, mb = (r.metrics[r.metrics.step == step].set_index("key")["value"]
                  for r in (replayed, recorded))
        # The replay measures no faithfulness by default, nor the gradient reference beside it.
        same = [k for k in mb.index if reproduces(k) and not k.startswith(
            ("faithfulness/", *(f"alignment/{m}/" for m in GRADIENT_METHODS)))]
        assert {"probe/accuracy", "probe/contrast", "alignment/ap"} <= set(same)
        for key in same:
            assert ma[key] == pytest.approx(mb[key], abs=1e-5, nan_ok=True), (step, key)


def test_weights_are_bit_identical_with_and_without_the_callback(trained, dm, tmp_path):
    plain = _trainer(dm, _args(tmp_path / "out", **MAIN), [], documents=320, eval_documents=8)
    plain.train()
    assert plain.state.global_step == STEPS
    ours = trained.trainer.model.state_dict()
    for name, weight in plain.model.state_dict().items():
        assert torch.equal(weight, ours[name]), name


class Kill(TrainerCallback):
    """Stops the run with an error after optimizer step ``at`` (a crash)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"killed at step {state.global_step}")


def test_a_resumed_run_continues_its_store_and_a_second_run_gets_its_own(dm, tmp_path, caplog):
    out = tmp_path / "out"
    settings = dict(every_n_steps=4, media_probes=0, faithfulness_every=None)
    # 12 steps of 16 documents: one epoch of 192. Checkpoints at 6 and 12.
    args = dict(max_steps=12, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                save_strategy="steps", save_steps=6, report_to=["tensorboard"])
    first = NormXLogitTrainerCallback(dm.probes, **settings)
    with pytest.raises(KeyboardInterrupt):
        _trainer(dm, _args(out, **args), [first, Kill(10)], documents=192).train()
    first.close()  # what the killed process had measured (at exit otherwise)
    assert load_run(out / "normx").steps == [0, 1, 2, 4, 8]  # 8: after checkpoint-6
    run_id = json.loads((out / "normx" / "run.json").read_text())["run_id"]

    # resume_from_checkpoint=True: the latest checkpoint (6); step 8 is re-taken.
    resumed = NormXLogitTrainerCallback(dm.probes, **settings)
    torch.manual_seed(1)  # the weights come from the checkpoint, not from this seed
    _trainer(dm, _args(out, **args), [resumed], documents=192).train(resume_from_checkpoint=True)
    run = load_run(out / "normx")
    assert run.steps == [0, 1, 2, 4, 8, 12] and resumed.snapshot_steps[-2:] == [8, 12]
    assert not run.metrics.duplicated(["step", "key"]).any()
    assert json.loads((out / "normx" / "run.json").read_text())["run_id"] == run_id
    # Counts go on from the checkpoint's: one epoch, nothing lost or counted twice.
    assert torch.equal(_counts(run, 12), _every_token(dm, 192))

    # (An explicit path to an earlier checkpoint: the DDP test below resumes that way.)

    # A fresh run in the same output_dir: its own store beside the first, which is kept.
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    fresh = NormXLogitTrainerCallback(dm.probes, **settings)
    _trainer(dm, _args(out, max_steps=1, report_to=["tensorboard"]), [fresh],
             documents=16).train()
    assert fresh.store.root.parent == out and fresh.store.root.name.startswith("normx-")
    assert "holds another run's store" in caplog.text
    assert load_run(fresh.store.root).steps == [0, 1]
    assert load_run(out, run=run_id).steps == [0, 1, 2, 4, 8, 12]
    assert len(find_runs(out)) == 2
    # The report's loss curve of the first run joins its two TensorBoard runs (the
    # resumed part replaces the steps it logged again), not the fresh run's.
    first = load_run(out, run=run_id)
    folders = tensorboard_folders(first)
    assert len(folders) == 2 and not set(folders) & set(tensorboard_folders(
        load_run(fresh.store.root)))
    losses, _ = read_losses(first)
    assert losses["train/loss"][0] == [5, 10] and losses["train/train_loss"][0] == [12]


def test_wandb_offline_gets_the_normx_metrics_in_the_trainers_own_run(dm, tmp_path,
                                                                      monkeypatch):
    import wandb  # a dev dependency: the test always runs
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR",
                "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "normx-test")
    callback = NormXLogitTrainerCallback(dm.probes, media_probes=1, faithfulness_every=None)
    args = _args(tmp_path / "out", max_steps=2, report_to=["wandb"], logging_steps=1)
    try:
        _trainer(dm, args, [callback], documents=32).train()
        run_dir = Path(wandb.run.dir).parent
        run_id = wandb.run.id
    finally:
        wandb.finish()
    assert json.loads((tmp_path / "out" / "normx" / "run.json").read_text()
                      )["wandb_run_id"] == run_id
    [wandb_file] = run_dir.glob("*.wandb")
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                             str(wandb_file)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]

    def steps_of(key):
        return [row["train/global_step"] for row in history if key in row]

    # One run: the Trainer's loss and our metrics and media, on the Trainer's step metric.
    assert steps_of("train/loss") == [1, 2]
    assert steps_of("normx/alignment/ap") == [0, 1, 2]
    assert steps_of(f"normx/heatmap/{dm.probes[0].id}/layers._type") == [0, 1, 2]
    globs = {m["metric"].get("glob_name"): m["metric"].get("step_metric")
             for m in records if m.get("type") == "metric"}
    assert globs["normx/*"] == "train/global_step"


def test_bad_input_is_refused_before_the_first_step_and_accelerate_is_named(dm, tmp_path,
                                                                             monkeypatch):
    with pytest.raises(ValueError, match="NormXLogitTrainerCallback: unknown option "
                                         "'every_n_step'; did you mean 'every_n_steps'"):
        NormXLogitTrainerCallback(dm.probes, every_n_step=3)
    # No tokenizer anywhere: one message naming both places, before any step.
    callback = NormXLogitTrainerCallback(dm.probes)
    trainer = _trainer(dm, _args(tmp_path / "out", max_steps=1), [callback], documents=16,
                       tokenizer=False)
    with pytest.raises(RuntimeError, match=r"processing_class=tokenizer\) or .*tokenizer="):
        trainer.train()
    assert trainer.state.global_step == 0
    # Too old an accelerate, then none: the version and the install command are named.
    import accelerate

    monkeypatch.setattr(accelerate, "__version__", "1.2.0")
    with pytest.raises(ImportError, match=r"accelerate>=1.3.0, found 1.2.0: pip install "):
        NormXLogitTrainerCallback(dm.probes)
    # The module imports without it (the package exports the callback lazily).
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.delitem(sys.modules, "normx_callbacks.trainer_callback")
    import normx_callbacks

    with pytest.raises(ImportError) as error:
        normx_callbacks.NormXLogitTrainerCallback(dm.probes)
    assert str(error.value) == ("NormXLogitTrainerCallback needs accelerate, which the "
                                "transformers Trainer runs on: pip install "
                                "'normx-callbacks[transformers-trainer]'")


def test_a_sharded_model_is_refused_at_train_begin(dm, tmp_path):
    """accelerate shards only on GPUs; a model sharded with FSDP2 (here by hand, on a
    one-process gloo group) is refused before the first step, naming what works."""
    from torch.distributed.fsdp import fully_shard

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = make_model(dm).model
        fully_shard(model)
        callback = NormXLogitTrainerCallback(dm.probes)
        trainer = _trainer(dm, _args(tmp_path / "out", max_steps=1), [callback], documents=16,
                           model=model)
        with pytest.raises(RuntimeError, match="sharded model .* Use DDP"):
            trainer.train()
        assert trainer.state.global_step == 0
    finally:
        torch.distributed.destroy_process_group()



# --------------------------------------------------------------------------- DDP

DDP_SCRIPT = '''
import json, os, sys

out, cache = sys.argv[1], sys.argv[2]


def run(resume):
    # Imported here: the launcher process (below) needs none of it.
    import lightning.pytorch as pl
    from torch.utils.data import Subset
    from transformers import Trainer, TrainingArguments
    from normx_callbacks import NormXLogitTrainerCallback
    from normx_callbacks.demo import LanguageModel, TextDataModule
    from normx_callbacks.measure import Measurement

    dm = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=400, num_probes=4,
                        batch_size=16, cache_dir=cache)
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)  # the initial weights of tests/training.make_model
    model = LanguageModel(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id).model
    callback = NormXLogitTrainerCallback(dm.probes, every_n_steps=4, media_probes=0,
                                         faithfulness_every=None)
    shares = []  # which probes this rank measured, at each snapshot (a spy, not a change)
    attribute = Measurement.attribute  # a spy on what each rank measures, not a change
    Measurement.attribute = lambda self, rows: (shares.append(list(rows)),
                                                attribute(self, rows))[1]
    # 2 ranks x 8 documents x 4 steps: one epoch of 64 documents.
    args = TrainingArguments(
        output_dir=out, use_cpu=True, ddp_backend="gloo", seed=0, learning_rate=3e-3,
        max_steps=4, per_device_train_batch_size=8, save_strategy="steps", save_steps=2,
        report_to=[], logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Subset(dm._train, range(64)),
                      processing_class=dm.tokenizer, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    rank = int(os.environ["RANK"])
    with open(f"{out}/rank{rank}-{'resumed' if resume else 'first'}.json", "w") as f:
        json.dump({"steps": callback.snapshot_steps, "shares": shares,
                   "global_step": trainer.state.global_step,
                   "store": None if callback.store is None else str(callback.store.root),
                   "world": int(os.environ["WORLD_SIZE"])}, f)


if __name__ == "__main__":
    if "RANK" not in os.environ:  # the launcher: torchrun on this file, two CPU processes
        from torch.distributed.run import main
        main(["--standalone", "--nproc-per-node", "2", __file__, *sys.argv[1:]])
    else:
        run(None)
        run(f"{out}/checkpoint-2")  # an explicit, earlier checkpoint: step 4 is re-taken
'''


def test_ddp_under_torchrun_writes_one_store_equal_to_one_process_and_resumes(dm, cache_dir,
                                                                             tmp_path):
    from launch import run_ranks

    out = tmp_path / "ddp"
    script = tmp_path / "ddp_trainer.py"
    script.write_text(DDP_SCRIPT)
    run_ranks(script, str(out), cache_dir, cwd=tmp_path, timeout=240, what="Trainer DDP")

    # The same initial weights in one process: the reference for step 0.
    single = NormXLogitTrainerCallback(dm.probes, every_n_steps=4, media_probes=0,
                                       faithfulness_every=None)
    _trainer(dm, _args(tmp_path / "single", max_steps=1), [single], documents=16).train()

    ranks = {(r, kind): json.loads((out / f"rank{r}-{kind}.json").read_text())
             for r in (0, 1) for kind in ("first", "resumed")}
    assert {v["world"] for v in ranks.values()} == {2}
    assert {v["global_step"] for v in ranks.values()} == {4}
    # Each rank measured its half of the probes; rank 0 alone wrote, one store.
    assert ranks[0, "first"]["shares"] == [[0, 1]] * 4
    assert ranks[1, "first"]["shares"] == [[2, 3]] * 4
    assert ranks[0, "first"]["steps"] == [0, 1, 2, 4]
    assert ranks[1, "first"]["steps"] == [] and ranks[1, "first"]["store"] is None
    # The resume from checkpoint-2 took step 4 again, on both ranks together.
    assert ranks[0, "resumed"]["shares"] == [[0, 1]] and ranks[1, "resumed"]["shares"] == [[2, 3]]
    assert ranks[0, "resumed"]["steps"] == [0, 1, 2, 4]
    assert ranks[0, "resumed"]["store"] == ranks[0, "first"]["store"]
    [found] = find_runs(out)
    store = found.path
    run = load_run(store)
    assert run.steps == [0, 1, 2, 4]
    for table in ("tokens", "probes", "embedding", "metrics"):
        assert len(list((store / table).glob("*.parquet"))) == 4, table
    assert not run.metrics.duplicated(["step", "key"]).any()
    # Token counts: both ranks' batches, one epoch of 64 documents, also across the resume.
    assert torch.equal(_counts(run, 4), _every_token(dm, 64))

    # Step 0 equals the one-process run (gathered in probe order).
    reference = load_run(tmp_path / "single" / "normx")
    for table in ("tokens", "probes", "embedding"):
        left, right = (t[t.step == 0].reset_index(drop=True) for t in (run[table],
                                                                       reference[table]))
        pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=1e-5, atol=1e-6,
                                      obj=table)
    left, right = (m.metrics[(m.metrics.step == 0) & m.metrics.key.str.startswith(
        ("probe/", "alignment/", "embedding/"))].set_index("key").sort_index()
        for m in (run, reference))
    pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=1e-5, atol=1e-6)


def test_the_demo_script_pre_trains_with_the_trainer_and_refuses_bad_input(cache_dir, tmp_path,
                                                                          capsys):
    from normx_callbacks.demo.hf_trainer import main as demo

    out = tmp_path / "hf-tiny"
    common = ["--output-dir", str(out), "--num-train", "400", "--cache-dir", cache_dir,
              "--batch-size", "8"]
    assert demo([*common, "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert f"Run finished: {out}" in err and "cue AP:" in err and "Next:" in err
    assert load_run(out).steps == [0, 1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "normx", "runs"]
    # Bad input before the first step: one line, exit 1 (a setting, a missing checkpoint).
    assert demo([*common, "--max-steps", "2", "--every-n-steps", "0"]) == 1
    assert demo([*common, "--output-dir", str(tmp_path / "empty"), "--resume"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["hf_trainer", "(--debug shows the "
                                                      "traceback)"] * 2
