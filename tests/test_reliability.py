"""Reliability: a training process killed mid-snapshot, a full disk, a logger that raises,
NaN/Inf, reduced precision and hostile text (a slow DDP rank: test_callback_ddp.py). See
RELIABILITY.md.

Faults are real: the process is SIGKILLed inside the store's write path, `os.replace`
fails with ENOSPC, a logger raises. Runs use the 2-layer, 32-wide GPT-2 of test_callback.py
on the agreement corpus for a few steps on CPU.
"""

from __future__ import annotations

import errno
import html.parser
import json
import logging
import os
import re
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from launch import run_ranks
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import build, random_ids
from scipy.stats import spearmanr
from training import TABLES, counts_at, fit, make_model

from normx_callbacks import NormXLogitCallback, ProbeError, ProbeSet, load_run, normxlogit
from normx_callbacks.checkpoints import CheckpointError, load_model_and_tokenizer
from normx_callbacks.cli import main as cli_main
from normx_callbacks.demo import TextDataModule
from normx_callbacks.embeddings import TokenCounter, information_gain
from normx_callbacks.loggers import markdown_table, token_html
from normx_callbacks.report import write_report

ROOT = Path(__file__).resolve().parents[1]
# 80 documents in batches of 16: an epoch is exactly 5 steps, so a checkpoint at step 5
# resumes at an epoch boundary and every document is counted exactly twice by step 10.
DATA = dict(corpus="agreement", bpe_vocab_size=512, num_train=80, num_probes=4, batch_size=16)
MODEL = dict(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0)
KILL_STEP = 8  # every_n_steps=8: snapshots 0, 1, 2, 4, 8, then the final one at 10
KILL_POINTS = ("inside_table_file", "after_first_table", "before_marker", "after_marker")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    # Our own: the shared session cache is retrained whenever another module's corpus size
    # differs, which would orphan the checkpoints written here.
    return str(tmp_path_factory.mktemp("reliability_tokenizer"))


@pytest.fixture(scope="module")
def dm(cache_dir) -> TextDataModule:
    data = TextDataModule(cache_dir=cache_dir, **DATA)
    data.setup("fit")
    return data


def every_document_twice(dm: TextDataModule) -> torch.Tensor:
    ids, mask = dm._train.input_ids, dm._train.attention_mask.bool()
    return 2 * torch.bincount(ids[mask], minlength=dm.vocab_size)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("normx_callbacks") and r.levelno >= logging.WARNING]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                        "NODE_RANK", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                        "HF_DATASETS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_script(script: Path, args: list[str], cwd: Path, timeout: float) -> tuple[str, str]:
    """Run a driver script in its own session; a hang kills every process it started."""
    return run_ranks(script, *args, cwd=cwd, timeout=timeout, what=script.name,
                     env=clean_env())


# =========================================================================== 1. faults

# Runs in a fresh process. The network is cut before anything is imported, then one child
# per kill point is forked; each trains with the callback and SIGKILLs itself inside the
# store's write path during the snapshot at KILL_STEP.
DRIVER = r'''
import io, json, os, signal, socket, sys, time, traceback
from pathlib import Path

root, cache, config = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
NETWORK_LOG = root / "network.log"


def _record(what):
    with open(NETWORK_LOG, "a") as f:
        f.write(what + "\n")


def _refuse(self, address, *args, **kwargs):
    _record(f"connect {address!r}")
    raise OSError("network disabled by test_reliability.py")


def _no_lookup(host, *args, **kwargs):
    _record(f"getaddrinfo {host!r}")
    raise socket.gaierror("network disabled by test_reliability.py")


socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.getaddrinfo = _no_lookup

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

import normx_callbacks.store as store
from normx_callbacks import NormXLogitCallback, normxlogit
from normx_callbacks.demo import LanguageModel, TextDataModule

torch.set_num_threads(1)
KILL_STEP = config["kill_step"]
dm = TextDataModule(cache_dir=cache, **config["data"])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point):
    real = store._atomic_write

    def spy(path, write):
        mine = path.name.startswith(f"step={KILL_STEP:09d}.")
        table = mine and path.suffix == ".parquet"
        marker = mine and path.parent.name == "_commits"
        if point == "inside_table_file" and table:
            def half(f):  # half of the file reaches the disk, then the process dies
                buffer = io.BytesIO()
                write(buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return real(path, half)
        if point == "before_marker" and marker:
            die()
        real(path, write)
        if (point == "after_first_table" and table) or (point == "after_marker" and marker):
            die()

    store._atomic_write = spy


def train(point, out):
    arm(point)
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer, **config["model"])
    # The kill is armed in this process's store code: the pipeline thread writes here.
    callback = NormXLogitCallback(dm.probes, every_n_steps=8, media_probes=0,
                                  store_dir=out / "store", writer="thread")
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=10, logger=TensorBoardLogger(str(out)),
        callbacks=[callback, checkpoint], default_root_dir=str(out),
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0)
    trainer.fit(model, dm)


children = {}
for point in config["points"]:
    out = root / point
    out.mkdir()
    pid = os.fork()
    if pid == 0:
        try:
            train(point, out)
        except BaseException:
            traceback.print_exc()
        os._exit(3)  # reached only if the kill did not happen
    children[pid] = point

results = {}
deadline = time.monotonic() + 200
while children:
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
        if time.monotonic() > deadline:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
        continue
    point = children.pop(pid)
    results[point] = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}

# A direct attribution as well, still without a network.
pl.seed_everything(0, verbose=False)
model = LanguageModel(vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                      tokenizer=dm.tokenizer, **config["model"])
enc = dm.probes.encode(dm.tokenizer, objective="causal")
attr = normxlogit(model.model, enc.input_ids, enc.attention_mask, targets=enc.targets)
network = NETWORK_LOG.read_text().splitlines() if NETWORK_LOG.exists() else []
# The guard itself works: this attempt must be refused and recorded.
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
    guard = "connected"
except OSError:
    guard = "refused"
print(json.dumps({"children": results, "network": network, "guard": guard,
                  "guard_recorded": NETWORK_LOG.exists(),
                  "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
                  "normxlogit_finite": bool(torch.isfinite(attr.scores[attr.valid]).all())}))
'''


@pytest.fixture(scope="module")
def killed(dm, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("killed")
    script = root / "driver.py"
    script.write_text(DRIVER)
    config = {"data": DATA, "model": MODEL, "kill_step": KILL_STEP, "points": KILL_POINTS}
    stdout, stderr = run_script(script, [str(root), cache_dir, json.dumps(config)], root,
                                timeout=240)
    return root, json.loads(stdout.strip().splitlines()[-1]), stderr


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_while_writing_a_snapshot_leaves_whole_snapshots_and_resume_completes(
        killed, dm, point, tmp_path):
    root, results, stderr = killed
    assert results["children"][point] == {"signal": signal.SIGKILL, "exit": None}, stderr[-3000:]
    store_dir = root / point / "store"
    name = f"step={KILL_STEP:09d}"
    # What the kill left on disk: a half temp file, some of the step's table files...
    if point == "inside_table_file":
        assert list(store_dir.glob(f"*/.{name}.parquet.*.tmp"))
    if point in ("after_first_table", "before_marker"):
        assert list(store_dir.glob(f"*/{name}.parquet"))
    assert (store_dir / "_commits" / f"{name}.json").exists() == (point == "after_marker")

    # ...and readers see whole snapshots only.
    committed = [0, 1, 2, 4] + ([KILL_STEP] if point == "after_marker" else [])
    run = load_run(store_dir)
    assert run.steps == committed
    for table in TABLES:
        assert sorted(run[table].step.unique()) == committed, table
    sizes = run["tokens"].groupby("step").size()
    assert (sizes == sizes.iloc[0]).all()
    assert cli_main(["summary", str(store_dir)]) == 0

    # Resuming from the last checkpoint (step 5) re-takes 8 and finishes, without duplicates.
    callback = NormXLogitCallback(dm.probes, every_n_steps=8, media_probes=0,
                                  store_dir=store_dir)
    ckpt = root / point / "ckpt" / "epoch=0-step=5.ckpt"
    trainer = fit(make_model(dm), dm, tmp_path, [callback], max_steps=10, ckpt_path=str(ckpt))
    assert trainer.global_step == 10
    run = load_run(store_dir)
    expected = [0, 1, 2, 4, 8, 10]
    assert run.steps == callback.snapshot_steps == expected
    assert run.missing.empty
    for table in TABLES:
        assert sorted(run[table].step.unique()) == expected, table
    assert not run["tokens"].duplicated(["step", "probe_id", "layer", "position"]).any()
    assert not run["metrics"].duplicated(["step", "key"]).any()
    # Two whole epochs by step 10: every document counted exactly twice, none lost or doubled.
    assert torch.equal(counts_at(run, 10), every_document_twice(dm))
    # The next-token pairs too (the Miller-Madow term depends on the counts, so a lost or
    # doubled pair would show in the information gain).
    counter = TokenCounter(dm.vocab_size)
    for _ in range(2):
        counter.update({"input_ids": dm._train.input_ids,
                        "attention_mask": dm._train.attention_mask})
    counter.collect()
    rows = run["embedding"][run["embedding"].step == 10].sort_values("token_id")
    expected = information_gain(counter.pair_keys, counter.pair_counts, dm.vocab_size)
    np.testing.assert_allclose(rows["infogain"].to_numpy(), expected.numpy(), rtol=1e-9)
    assert np.isfinite(expected.numpy()).sum() >= 3


def test_nothing_reaches_the_network(killed):
    _, results, _ = killed
    # HF_HUB_OFFLINE unset, the socket layer refusing and recording every attempt: the
    # imports, the training runs with TensorBoard and the snapshots made no attempt at all.
    assert results["hf_hub_offline"] is None
    assert results["network"] == []
    assert results["normxlogit_finite"]
    assert all(r["signal"] == signal.SIGKILL for r in results["children"].values())
    # The guard was live: a deliberate connection afterwards was refused and recorded.
    assert results["guard"] == "refused" and results["guard_recorded"]


class FullDisk:
    """`os.replace` that fails with a real ENOSPC OSError for files under `root` while `full`."""

    def __init__(self, root: Path, suffix: str = ""):
        self.root, self.suffix, self.full = str(root), suffix, False
        self.refused = 0
        self._replace = os.replace

    def __call__(self, src, dst, **kwargs):
        if self.full and str(dst).startswith(self.root) and str(dst).endswith(self.suffix):
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return self._replace(src, dst, **kwargs)


class DiskSwitch(Callback):
    """Fills the disk for the snapshots at `full_steps` and records what the store holds
    before each step's snapshot (listed before NormXLogitCallback, so it runs first)."""

    def __init__(self, disk: FullDisk, full_steps, callback: NormXLogitCallback, store: Path):
        self.disk, self.full_steps = disk, set(full_steps)
        self.callback, self.store = callback, store
        self.seen: dict[int, tuple[list[int], list[int]]] = {}  # step -> (committed, missing)
        self.held: list[int] = []  # snapshots the callback keeps in memory for a retry
        self.at_end: tuple[int, pd.DataFrame] | None = None

    def _look(self) -> tuple[list[int], list[int]]:
        run = load_run(self.store)
        return run.steps, run.missing.step.tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # The worker writes in the background: wait for it, so the disk is full exactly
        # while the snapshots at `full_steps` are written.
        self.callback.engine.flush()
        step = trainer.global_step
        self.seen[step] = self._look()
        self.held.append(len(self.callback.engine.held_steps))
        self.disk.full = step in self.full_steps

    def on_train_end(self, trainer, pl_module):
        self.callback.engine.flush()
        self.at_end = (len(self.callback.engine.held_steps), load_run(self.store).missing)


def test_a_full_disk_delays_snapshots_which_are_retried_and_written(dm, tmp_path, caplog,
                                                                    monkeypatch):
    caplog.set_level(logging.INFO, logger="normx_callbacks")
    store = tmp_path / "store"
    disk = FullDisk(store)
    monkeypatch.setattr(os, "replace", disk)
    # The disk fills in this process (os.replace patched): the snapshots are written here.
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=0, store_dir=store,
                                  writer="thread")
    switch = DiskSwitch(disk, {1, 2}, callback, store)  # full for the snapshots at 1 and 2
    trainer = fit(make_model(dm), dm, tmp_path, [switch, callback], max_steps=10)

    assert trainer.global_step == 10
    assert disk.refused > 0
    # While the disk was full only step 0 was on disk; nothing was lost once it had room.
    assert switch.seen[3] == ([0], [])
    run = load_run(store)
    assert run.steps == callback.snapshot_steps == [0, 1, 2, 4, 8, 10]
    assert run.missing.empty
    for table in TABLES:
        assert sorted(run[table].step.unique()) == run.steps, table
    messages = warnings_of(caplog)
    assert any("could not write snapshot 1" in m and "No space left on device" in m
               and "retried at the next snapshot" in m for m in messages)
    retried = [r.getMessage() for r in caplog.records if "written on retry" in r.getMessage()]
    assert retried == ["NormXLogitCallback: snapshot 1 written on retry",
                       "NormXLogitCallback: snapshot 2 written on retry"]


def test_a_disk_that_stays_full_records_every_lost_snapshot_as_missing(dm, tmp_path, caplog,
                                                                       monkeypatch):
    from normx_callbacks.writer import MAX_UNWRITTEN

    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    store = tmp_path / "store"
    # Table files no longer fit; the small JSON records still do (a nearly full disk).
    disk = FullDisk(store, suffix=".parquet")
    monkeypatch.setattr(os, "replace", disk)
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=0, store_dir=store,
                                  writer="thread")
    switch = DiskSwitch(disk, range(2, 14), callback, store)
    # Snapshots 0, 1, 2, 4, 8, 12 and the final one at 13; the disk fills before 2.
    trainer = fit(make_model(dm), dm, tmp_path, [switch, callback], max_steps=13)

    assert trainer.global_step == 13
    # A failed snapshot is recorded as missing at once (a crash before the retry keeps
    # that record), and memory holds at most MAX_UNWRITTEN of them: the 4th failure (12)
    # pushed the oldest (2) out, given up on at once.
    assert switch.seen[3] == ([0, 1], [2])
    assert switch.seen[12] == ([0, 1], [2, 4, 8])
    assert max(switch.held) == MAX_UNWRITTEN == 3
    held, missing = switch.at_end
    reasons = dict(zip(missing.step, missing.reason, strict=True))
    assert held == MAX_UNWRITTEN
    assert "after retries" in reasons[2]
    assert reasons[4].endswith("kept in memory for a retry at the next snapshot and at the end "
                               "of training (a successful retry removes this record)")
    # At the end of training every snapshot still unwritten is given up on, each recorded.
    run = load_run(store)
    assert run.steps == [0, 1]
    assert run.missing.step.tolist() == [2, 4, 8, 12, 13]
    assert all("write failed after retries" in r and "No space left on device" in r
               for r in run.missing.reason)
    gave_up = [m for m in warnings_of(caplog) if "could not be written after retries" in m]
    assert [int(re.search(r"snapshot (\d+)", m).group(1)) for m in gave_up] == [2, 4, 8, 12, 13]


class BrokenCSVLogger(CSVLogger):
    """A logger whose backend breaks on our metrics (the run's own loss still logs)."""

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("normx/") for k in metrics):
            raise OSError(errno.EROFS, "read-only file system")
        super().log_metrics(metrics, step)


def test_loggers_that_raise_are_warned_about_once_and_the_store_is_complete(
        dm, tmp_path, caplog, monkeypatch):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from torch.utils.tensorboard import SummaryWriter

    caplog.set_level(logging.WARNING, logger="normx_callbacks")

    def no_histograms(self, *args, **kwargs):
        raise RuntimeError("histogram backend broken")

    monkeypatch.setattr(SummaryWriter, "add_histogram", no_histograms)
    broken = BrokenCSVLogger(str(tmp_path), name="csv")
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=1,
                                  store_dir=tmp_path / "store")
    trainer = fit(make_model(dm), dm, tmp_path, [callback], logger=[broken, tensorboard],
                  max_steps=10)
    assert trainer.global_step == 10
    steps = [0, 1, 2, 4, 8, 10]
    assert load_run(tmp_path / "store").steps == steps

    raised = [m for m in warnings_of(caplog) if "raised while logging" in m]
    assert len(raised) == 2, raised
    assert "BrokenCSVLogger raised while logging scalars (OSError" in raised[0]
    assert "TensorBoardLogger raised while logging normx/embedding/norms" in raised[1]
    assert "media for this logger are skipped" in raised[1]
    # TensorBoard's media broke, its scalars did not.
    acc = ea.EventAccumulator(tensorboard.log_dir, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("normx/probe/target_prob")] == steps
    assert not acc.Tags()["images"]


# =========================================================================== 2. numerics


class Poison(Callback):
    """Sets input-embedding rows to inf / NaN right after the optimizer step `step`."""

    def __init__(self, step: int, rows: dict[int, float]):
        self.step, self.rows = step, rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            weight = pl_module.model.get_input_embeddings().weight
            with torch.no_grad():
                for row, value in self.rows.items():
                    weight[row] = value


def test_nonfinite_embeddings_are_recorded_by_token_id_and_training_continues(dm, tmp_path,
                                                                             caplog):
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=1,
                                  store_dir=tmp_path / "store")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    poison = Poison(2, {5: float("inf"), 7: float("nan")})
    trainer = fit(make_model(dm), dm, tmp_path, [poison, callback], logger=logger, max_steps=4)

    assert trainer.global_step == 4
    run = load_run(tmp_path / "store")
    assert run.steps == [0, 1, 2, 4] and run.missing.empty  # recorded, not lost
    metrics = run["metrics"].pivot_table(index="step", columns="key", values="value")
    assert metrics["nonfinite/embedding"].tolist()[:3] == [0.0, 0.0, 2.0]
    bad = run["nonfinite"]
    at2 = bad[(bad.step == 2) & (bad.source == "embedding")]
    assert at2.token_id.tolist() == [5, 7]
    assert np.isinf(at2.value.iloc[0]) and np.isnan(at2.value.iloc[1])
    assert at2.token.tolist() == dm.tokenizer.convert_ids_to_tokens([5, 7])
    # The NaN then spreads through training: by step 4 the scores and logits are hit too,
    # and the table says which probe, position and token.
    at4 = bad[bad.step == 4]
    assert {"embedding", "score", "target_logit"} <= set(at4.source)
    assert set(at4[at4.source == "score"].probe_id) <= {p.id for p in dm.probes}
    assert metrics.loc[4, "nonfinite/scores"] == (at4.source == "score").sum() > 0
    assert any("token ids [5, 7]" in m for m in warnings_of(caplog))


FAMILIES = ("gpt2", "llama", "gemma2")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_rankings_agree_with_fp32(family):
    ids = random_ids(16, 24)
    full = normxlogit(build(family), ids, layers="all")
    half = normxlogit(build(family).to(torch.bfloat16), ids, layers="all",
                      targets=full.targets)
    plain = normxlogit(build(family).to(torch.bfloat16), ids)
    rhos, top1 = [], 0
    for row in range(len(ids)):
        valid = full.valid[row]
        for k in range(full.layer_scores.shape[1]):
            a, b = full.layer_scores[row, k][valid], half.layer_scores[row, k][valid]
            assert torch.isfinite(b).all()
            rhos.append(spearmanr(a, b).statistic)
        a, b = full.scores[row][valid], half.scores[row][valid]
        top1 += int(a.abs().argmax() == b.abs().argmax())
    # Documented in RELIABILITY.md: observed min Spearman 0.997, top-1 15/16 or 16/16.
    assert min(rhos) >= 0.98, min(rhos)
    assert top1 >= 14
    assert (plain.targets == full.targets).float().mean() >= 0.9


class DtypeSpy(Callback):
    """Records (dtype, autocast on) of an MLP output in each eval-mode (probe) forward.

    Hooked at train start, i.e. after setup's adapter discovery; listed before
    NormXLogitCallback so the step-0 snapshot is seen too."""

    def __init__(self):
        self.seen: set[tuple[torch.dtype, bool]] = set()

    def on_train_start(self, trainer, pl_module):
        def record(module, args, output):
            if not module.training:  # training batches run in train mode
                self.seen.add((output.dtype, torch.is_autocast_enabled("cpu")))

        pl_module.model.transformer.h[0].mlp.c_fc.register_forward_hook(record)


@pytest.mark.parametrize(("precision", "expected", "diverges"), [
    ("bf16-mixed", (torch.bfloat16, True), False),
    # Lightning runs "16-mixed" on CPU as "bf16-mixed" (it warns so).
    ("16-mixed", (torch.bfloat16, True), False),
    ("bf16-true", (torch.bfloat16, False), False),
    # AdamW's eps=1e-8 is 0 in float16: the run itself diverges at its first step.
    ("16-true", (torch.float16, False), True),
])
def test_reduced_precision_trainer_probes_inside_the_precision_context(dm, tmp_path, precision,
                                                                      expected, diverges):
    spy = DtypeSpy()
    callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=0,
                                  store_dir=tmp_path / "store", faithfulness_every=None)
    trainer = fit(make_model(dm), dm, tmp_path, [spy, callback], max_steps=2,
                  precision=precision)
    assert trainer.global_step == 2
    assert spy.seen == {expected}
    run = load_run(tmp_path / "store")
    assert run.steps == [0, 1, 2] and run.missing.empty
    if diverges:  # recorded, snapshot by snapshot, and training went on
        assert sorted(run["nonfinite"].step.unique()) == [1, 2]
        assert np.isfinite(run["tokens"].query("step == 0")["score"]).all()
    else:
        assert "nonfinite" not in run
        assert np.isfinite(run["tokens"]["score"]).all()  # norms and dot products in float32


# =========================================================================== 3. security

MARKUP_TEXT = "<script>alert(1)</script> the key | *near* the cabinets"
MARKUP_ID = "xss<b>|*"
RUN_NAME = "run<img src=x onerror=alert(1)>|*"


class _Tags(html.parser.HTMLParser):
    """Every tag and attribute of a page: what a browser would build from it."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def assert_inert(page: str, allowed: set[str]) -> str:
    """No script, no event handler, no foreign element; images only as inline data."""
    parser = _Tags()
    parser.feed(page)
    names = {tag for tag, _ in parser.tags}
    assert names <= allowed, names - allowed
    for tag, attrs in parser.tags:
        assert not any(a.lower().startswith("on") for a in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
    return "".join(parser.text)


@pytest.fixture(scope="module")
def markup_run(dm, tmp_path_factory):
    root = tmp_path_factory.mktemp("markup") / RUN_NAME
    probes = [{"id": MARKUP_ID, "text": MARKUP_TEXT, "target": "is", "foil": "are",
               "cues": ["key"]}, *dm.probes[:1]]
    callback = NormXLogitCallback(probes, every_n_steps=100, media_probes=1,
                                  store_dir=root / "normx")
    logger = TensorBoardLogger(str(root), name="", version="", default_hp_metric=False)
    trainer = fit(make_model(dm), dm, root, [callback], logger=logger, max_steps=2)
    trainer.save_checkpoint(str(root / "markup.ckpt"))
    return root, logger


def test_markup_in_probes_tokens_and_run_names_is_escaped_in_html(markup_run, tmp_path,
                                                                 capsys):
    root, _ = markup_run
    run = load_run(root / "normx")
    tokens = run["tokens"]
    mine = tokens[(tokens.probe_id == MARKUP_ID) & (tokens.step == 2)
                  & (tokens.layer == tokens.layer.max())].sort_values("position")
    assert "<" in "".join(mine.token)  # the tokenizer keeps the markup characters

    report = write_report([root / "normx"], tmp_path / "report.html", probes=[MARKUP_ID])
    page = report.read_text(encoding="utf-8")
    text = assert_inert(page, allowed={"html", "head", "meta", "title", "style", "body", "h1",
                                       "h2", "h3", "p", "nav", "a", "section", "div", "span",
                                       "b", "table", "tr", "th", "td", "figure", "img",
                                       "figcaption", "article"})
    assert MARKUP_TEXT in text and RUN_NAME in text and MARKUP_ID in text  # shown as text

    # The W&B token heatmap (wandb.Html) and `normx attribute -o page.html`.
    strip = token_html(mine.token.tolist(), mine.score.tolist(), title=MARKUP_ID)
    assert assert_inert(strip, allowed={"div", "b", "span"}) == MARKUP_ID + "".join(mine.token)
    out = tmp_path / "attribute.html"
    assert cli_main(["attribute", str(root / "markup.ckpt"), "--text", MARKUP_TEXT,
                     "--layers", "all", "-o", str(out)]) == 0
    capsys.readouterr()
    assert MARKUP_TEXT in assert_inert(out.read_text(encoding="utf-8"),
                                       allowed={"html", "head", "meta", "title", "style",
                                                "body", "h1", "p", "div", "span", "b",
                                                "figure", "img", "figcaption"})


def test_markup_in_tokens_is_escaped_in_markdown(markup_run):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    _, logger = markup_run
    acc = ea.EventAccumulator(logger.log_dir, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    events = acc.Tensors(f"normx/tokens/{MARKUP_ID}/text_summary")
    table = tensor_util.make_ndarray(events[-1].tensor_proto).item().decode()
    frame = pd.DataFrame({"token": ["<script>", "a|b", "*x*", "_y_", "`z`"], "v": [1.0] * 5})
    for text, columns in ((table, 6), (markdown_table(frame), 2)):
        for line in text.splitlines():
            cells = re.split(r"(?<!\\)\|", line)  # only unescaped pipes separate cells
            assert len(cells) == columns + 2, line
            assert not re.search(r"(?<!\\)[*_`]", line), line
            assert "<" not in line and ">" not in line, line
    assert "&lt;script&gt;" in markdown_table(frame)


def test_yaml_probes_are_read_with_a_safe_loader(tmp_path):
    marker = tmp_path / "pwned"
    for body in (f'- !!python/object/apply:os.mkdir ["{marker}"]\n',
                 f'- text: !!python/object/apply:os.mkdir ["{marker}"]\n',
                 f'probes: !!python/object/new:os.mkdir ["{marker}"]\n'):
        path = tmp_path / "probes.yaml"
        path.write_text(body)
        with pytest.raises(ProbeError, match=r"probes\.yaml' line 1: YAML tag not allowed .*"
                                             r"remove the tag"):
            ProbeSet.from_file(path)
    assert not marker.exists()


class _Payload:
    """Pickles to `os.mkdir(marker)`: what a malicious checkpoint would run on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoints_load_with_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": "gpt2"},
                "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt holds objects other than tensors.*"
                                              r"weights_only=True.*mkdir"):
        load_model_and_tokenizer(path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.is_dir()
