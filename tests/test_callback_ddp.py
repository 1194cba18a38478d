"""NormXLogitCallback under real DDP: two CPU processes (gloo), launched from a subprocess.

Checks that each rank measures half of the probes and rank 0 alone writes the store,
that snapshots happen at the same steps and give the same attributions and faithfulness
as a single-process run, that token frequencies add up the batches of both ranks, and that
a rank arriving late at every collective neither deadlocks nor changes a stored value.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from launch import run_ranks, train_args
from torch.utils.data import DistributedSampler

from normx_callbacks import NormXLogitCallback, SnapshotSchedule, load_run
from normx_callbacks.catalog import find_store
from normx_callbacks.demo import LanguageModel, TextDataModule
from normx_callbacks.embeddings import TokenCounter, information_gain

MAX_STEPS = 4
EXPECTED_STEPS = [0, 1, 2, 4]  # every_n_steps=4: the log schedule, the last one final
# 128 documents, 2 ranks, batches of 16: 4 steps are exactly one epoch of each rank's half.
DATA = dict(corpus="agreement", bpe_vocab_size=512, num_train=128, num_probes=4, batch_size=16)
MODEL = dict(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0)
DELAY = 0.15  # seconds rank 1 arrives late, everywhere, in the second fit

SCRIPT = """
import json, sys, time
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from normx_callbacks import NormXLogitCallback
from normx_callbacks.demo import LanguageModel, TextDataModule
from normx_callbacks.measure import Measurement

root, cache = sys.argv[1], sys.argv[2]
DATA, MODEL, DELAY = {data!r}, {model!r}, {delay!r}
shares = []  # which probes this rank measured, at each snapshot (a spy, not a change)
attribute = Measurement.attribute
Measurement.attribute = lambda self, rows: (shares.append(list(rows)), attribute(self, rows))[1]


class SlowRank(Callback):
    \"\"\"Rank 1 arrives late at train start, before and after every batch and at train end,
    so it reaches every collective (the callback's all-reduce of token counts) late.\"\"\"

    def __init__(self, seconds):
        self.seconds, self.slept = seconds, 0.0

    def _sleep(self, trainer):
        if trainer.global_rank == 1 and self.seconds:
            time.sleep(self.seconds)
            self.slept += self.seconds

    def on_train_start(self, trainer, pl_module):
        self._sleep(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sleep(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sleep(trainer)

    def on_train_end(self, trainer, pl_module):
        self._sleep(trainer)


def run(name, seconds):
    pl.seed_everything(0, verbose=False)
    shares.clear()
    dm = TextDataModule(cache_dir=cache, **DATA)
    lm = LanguageModel(vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                       tokenizer=dm.tokenizer, **MODEL)
    # No store_dir: the default <log_dir>/normx needs `trainer.log_dir` on every rank.
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=1)
    slow = SlowRank(seconds)  # first: its sleeps delay rank 1 before the callback's all-reduce
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps={max_steps},
        logger=TensorBoardLogger(root, name=name), callbacks=[slow, callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(lm, dm)
    with open(f"{{root}}/{{name}}-rank{{trainer.global_rank}}.json", "w") as f:
        json.dump({{"steps": callback.snapshot_steps, "global_step": trainer.global_step,
                   "shares": shares, "metrics": callback.last_metrics, "slept": slow.slept,
                   "store": None if callback.store is None else str(callback.store.root),
                   "world_size": trainer.world_size}}, f)


if __name__ == "__main__":
    # Two fits in one launch (Lightning starts rank 1 once, both fits share the group):
    # steady, then with rank 1 late everywhere.
    run("ddp", 0.0)
    run("slow", DELAY)
"""


def single_process_run(cache_dir: str, root: Path):
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(cache_dir=cache_dir, **DATA)
    lm = LanguageModel(vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                       tokenizer=dm.tokenizer, **MODEL)
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=0,
                                  store_dir=root / "store")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False, callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
    )
    trainer.fit(lm, dm)
    return dm, callback


def ddp_counts(dm: TextDataModule, step: int) -> torch.Tensor:
    """Real tokens in the first `step` batches of both ranks (Lightning's DistributedSampler,
    shuffled with the seed seed_everything set)."""
    data = dm._train
    counts = torch.zeros(dm.vocab_size, dtype=torch.long)
    for rank in range(2):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0)
        index = torch.tensor(list(sampler))[: step * DATA["batch_size"]]
        ids, mask = data.input_ids[index], data.attention_mask[index].bool()
        counts += torch.bincount(ids[mask], minlength=dm.vocab_size)
    return counts


def test_ddp_two_cpu_processes(cache_dir, tmp_path):
    """One launch, two fits: the first is compared with one process; the second, with rank 1
    late everywhere, must neither deadlock nor change a stored value (`_check_slow_rank`)."""
    root = tmp_path / "ddp"
    root.mkdir()
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(data=DATA, model=MODEL, max_steps=MAX_STEPS, delay=DELAY))
    # The tokenizer is cached before the ranks start, so they never train it concurrently.
    dm, single = single_process_run(cache_dir, tmp_path / "single")

    run_ranks(script, str(root), cache_dir, cwd=tmp_path, timeout=180, what="DDP")

    ranks = [json.loads((root / f"ddp-rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [MAX_STEPS, MAX_STEPS]
    assert EXPECTED_STEPS == SnapshotSchedule("log", every_n_steps=4).upto(MAX_STEPS)
    # The probes are shared: each rank measured its half at every snapshot.
    assert ranks[0]["shares"] == [[0, 1]] * len(EXPECTED_STEPS)
    assert ranks[1]["shares"] == [[2, 3]] * len(EXPECTED_STEPS)
    # Only rank 0 writes snapshots and holds a store; exactly one store on disk.
    assert ranks[0]["steps"] == single.snapshot_steps == EXPECTED_STEPS
    assert ranks[1]["steps"] == [] and ranks[1]["store"] is None
    store = find_store(root / "ddp")  # raises if two stores were written
    assert store == Path(ranks[0]["store"])
    assert sorted(p.name for p in (root / "ddp").rglob("meta.json")) == ["meta.json"]
    run, reference = load_run(store), load_run(tmp_path / "single" / "store")
    assert run.steps == reference.steps == EXPECTED_STEPS
    for name in ("embedding", "metrics", "probes", "tokens"):
        # One file per table per step: nobody else wrote files under other names.
        assert len(list((store / name).glob("*.parquet"))) == len(EXPECTED_STEPS), name

    # Same seed, same initial weights: the step-0 attributions equal the single process's
    # (DDP pins one thread per rank, so allow for float reduction order).
    key = ["probe_id", "layer", "position"]
    ddp0 = run["tokens"][run["tokens"].step == 0].sort_values(key).reset_index(drop=True)
    one0 = reference["tokens"][reference["tokens"].step == 0].sort_values(key)
    one0 = one0.reset_index(drop=True)
    assert ddp0[key + ["token", "is_cue"]].equals(one0[key + ["token", "is_cue"]])
    for column in ("norm", "logat", "score", "each", "contrast"):
        np.testing.assert_allclose(ddp0[column], one0[column], rtol=1e-5, atol=1e-6)
    # Faithfulness (due at step 0) is shared too: per-instance means of both ranks' halves
    # equal the one-process means ("random" draws its scores per batch shape, so differs).
    # Their bootstrap intervals too: the rows are put in probe order before resampling.
    metrics = run["metrics"]
    ddp_m = metrics[metrics.step == 0].set_index("key")
    one_m = reference["metrics"][reference["metrics"].step == 0].set_index("key")
    keys = [k for k in one_m.index if k.startswith("faithfulness/") and "/random/" not in k
            and k.endswith(("comprehensiveness", "sufficiency"))]
    assert len(keys) == 6, keys
    for column in ("value", "low", "high"):
        np.testing.assert_allclose(ddp_m.loc[keys, column], one_m.loc[keys, column],
                                   rtol=1e-5, atol=1e-6)
    # The gradient reference of alignment: rank 0 attributes every probe on its own model.
    for key in ("probe/target_logit", "probe/target_prob", "alignment/ap",
                "alignment/input_x_gradient/ap"):
        np.testing.assert_allclose(ddp_m.loc[key, "value"], one_m.loc[key, "value"], rtol=1e-5,
                                   atol=1e-6)

    # Token frequencies are the sum over both ranks' batches, at every snapshot.
    embedding = run["embedding"]
    for step in EXPECTED_STEPS:
        rows = embedding[embedding.step == step].sort_values("token_id")
        counts = torch.tensor(rows["count"].to_numpy(), dtype=torch.long)
        assert torch.equal(counts, ddp_counts(dm, step)), step
    # After one epoch per rank, every document was counted exactly once.
    data = dm._train
    every_document = torch.bincount(data.input_ids[data.attention_mask.bool()],
                                     minlength=dm.vocab_size)
    assert torch.equal(ddp_counts(dm, MAX_STEPS), every_document)
    # Next-token pairs too: gathered on rank 0, each counted once, so information gain at the
    # end is that of every document.
    counter = TokenCounter(dm.vocab_size)
    counter.update({"input_ids": data.input_ids, "attention_mask": data.attention_mask})
    counter.collect()
    rows = embedding[embedding.step == MAX_STEPS].sort_values("token_id")
    expected = information_gain(counter.pair_keys, counter.pair_counts, dm.vocab_size)
    np.testing.assert_allclose(rows["infogain"].to_numpy(), expected.numpy(), rtol=1e-9)
    assert np.isfinite(expected.numpy()).sum() >= 3
    _check_slow_rank(root, run)


def _check_slow_rank(root: Path, steady) -> None:
    """The second fit: rank 1 slept DELAY s at train start, before and after each of the 4
    batches and at train end; the snapshots and every stored value equal the steady fit's."""
    ranks = [json.loads((root / f"slow-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["slept"] >= DELAY * (2 + 2 * MAX_STEPS) - 1e-9 and ranks[0]["slept"] == 0
    assert [r["global_step"] for r in ranks] == [MAX_STEPS, MAX_STEPS]
    assert ranks[0]["steps"] == EXPECTED_STEPS and ranks[1]["steps"] == []
    slow = load_run(Path(ranks[0]["store"]))
    assert slow.steps == steady.steps == EXPECTED_STEPS
    for name in ("tokens", "probes", "embedding"):
        pd.testing.assert_frame_equal(steady[name], slow[name], check_exact=True)
    a, b = (r["metrics"][~r["metrics"].key.str.contains("seconds")].reset_index(drop=True)
            for r in (steady, slow))
    pd.testing.assert_frame_equal(a, b, check_exact=True)



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_write_one_store(tmp_path, cache_dir):
    """configs/ddp-cpu.yaml on two single-process "nodes" (torchrun --nnodes 2, static
    rendezvous on 127.0.0.1), as SLURM or torchrun would start them on two machines."""
    # The tokenizer is trained before the nodes start, so they never train it concurrently.
    dm = TextDataModule(corpus="agreement", objective="causal", bpe_vocab_size=512,
                        num_train=300, seed=0, cache_dir=cache_dir)
    assert dm.vocab_size <= 512
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                        "NODE_RANK")}
    env.update(PYTHONPATH=str(Path(__file__).parents[1]), WANDB_MODE="offline")
    port = str(_free_port())
    arguments = [*train_args("ddp-cpu.yaml", tmp_path, Path(cache_dir), steps=2),
                  "--trainer.devices", "1", "--trainer.num_nodes", "2"]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
         "1", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
         str(Path(__file__).parents[1] / "train.py"), *arguments],
        env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True) for rank in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=240))
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
            node.communicate()
        pytest.fail("the two-node run hung")
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-4000:]
    # Node 1 ran rank 1 of a world of 2; rank 0 alone wrote one store, every step once.
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1][0] + outputs[1][1]
    assert len(list(tmp_path.rglob("_commits"))) == 1
    assert len(list(tmp_path.rglob("meta.json"))) == 1
    store = find_store(tmp_path)
    assert load_run(store).steps == [0, 1, 2]
    for name in ("embedding", "metrics", "probes", "tokens"):
        assert len(list((store / name).glob("*.parquet"))) == 3, name
