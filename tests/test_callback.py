"""NormXLogitCallback in real Lightning runs: what each logger receives, the store, the
schedule under gradient accumulation, resume, setup errors, failing snapshots, that the
training run itself is unchanged by being watched, and two instances in one Trainer (each
with its own `state_key_suffix`, store and resume state; without one Lightning refuses).

Every test trains a 2-layer, 32-wide GPT-2 on the synthetic agreement corpus for a few
steps on CPU; what was logged is read back with each backend's own reader.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from training import MAX_STEPS, TABLES, counts_at, fit, make_model, make_trainer

from normx_callbacks import NormXLogitCallback, ProbeError, SnapshotSchedule, images, load_run
from normx_callbacks.demo import TextDataModule, build_model
from normx_callbacks.store import SnapshotStore

EVERY = 4
# The log schedule up to MAX_STEPS, then the final step.
EXPECTED_STEPS = [0, 1, 2, 4, 8, 10]
HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


# --------------------------------------------------------------------------- fixtures


def real_token_counts(dm: TextDataModule, num_batches: int) -> torch.Tensor:
    """Token counts of the first `num_batches` training batches (one epoch at most)."""
    counts = torch.zeros(dm.vocab_size, dtype=torch.long)
    for i, batch in enumerate(dm.train_dataloader()):
        if i == num_batches:
            break
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        counts += torch.bincount(ids, minlength=dm.vocab_size)
    else:
        assert num_batches <= i + 1, "asked for more batches than one epoch holds"
    return counts


def hook_counts(module: nn.Module) -> dict:
    counts = {name: tuple(len(getattr(m, attr)) for attr in HOOK_ATTRS)
              for name, m in module.named_modules()}
    mod = torch.nn.modules.module
    counts["<global>"] = (len(mod._global_forward_hooks), len(mod._global_forward_pre_hooks),
                          len(mod._global_backward_hooks), len(mod._global_backward_pre_hooks))
    return counts


def train_flags(module: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules()}


class FlagRecorder(Callback):
    """Records each submodule's train flag at train start and checks it before every batch.

    Listed before NormXLogitCallback, so its on_train_start runs before the step-0 snapshot.
    """

    def __init__(self):
        self.reference: dict[str, bool] | None = None
        self.changed_at: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.reference = train_flags(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if train_flags(pl_module) != self.reference:
            self.changed_at.append(trainer.global_step)


# --------------------------------------------------------------------------- TensorBoard


@pytest.fixture(scope="module")
def tb_run(dm, tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    logger = TensorBoardLogger(str(root), name="tb", default_hp_metric=False)
    callback = NormXLogitCallback(dm.probes, every_n_steps=EVERY, media_probes=1,
                                  track_tokens=["is"])
    trainer = fit(make_model(dm), dm, root, [callback], logger=logger)
    return trainer, logger, callback


def test_tensorboard_receives_scalars_histograms_images_and_markdown(tb_run, dm):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    _, logger, callback = tb_run
    guidance = {kind: 0 for kind in (ea.SCALARS, ea.HISTOGRAMS, ea.IMAGES, ea.TENSORS,
                                     ea.COMPRESSED_HISTOGRAMS, ea.AUDIO)}
    acc = ea.EventAccumulator(logger.log_dir, size_guidance=guidance)
    acc.Reload()
    tags = acc.Tags()

    for tag in ("normx/alignment/ap", "normx/embedding/mean", "normx/probe/target_prob",
                "normx/embedding/track/is", "normx/snapshot/train_seconds", "normx/snapshot/worker_seconds"):
        assert [e.step for e in acc.Scalars(tag)] == EXPECTED_STEPS, tag
    # Drift and stability need a previous snapshot.
    assert [e.step for e in acc.Scalars("normx/stability/spearman")] == EXPECTED_STEPS[1:]
    # The value logged is the value stored (TensorBoard keeps float32).
    metrics = load_run(callback.store.root)["metrics"]
    stored = metrics[metrics.key == "embedding/mean"].sort_values("step")["value"].to_numpy()
    logged = np.array([e.value for e in acc.Scalars("normx/embedding/mean")])
    np.testing.assert_allclose(logged, stored, rtol=1e-6)

    assert "normx/embedding/norms" in tags["histograms"]
    hist = acc.Histograms("normx/embedding/norms")
    assert [e.step for e in hist] == EXPECTED_STEPS
    assert all(e.histogram_value.num == dm.vocab_size for e in hist)

    probe_ids = [dm.probes[0].id]  # media_probes=1
    images = sorted(t for t in tags["images"] if t.startswith("normx/heatmap/"))
    assert images == sorted(f"normx/heatmap/{p}/{kind}" for p in probe_ids
                            for kind in ("history", "layers"))
    for tag in images:
        events = acc.Images(tag)
        assert [e.step for e in events] == EXPECTED_STEPS, tag
        assert all(e.encoded_image_string.startswith(b"\x89PNG") for e in events)

    # torch's SummaryWriter.add_text files text under "<tag>/text_summary".
    text_tags = set(acc.PluginTagToContent("text"))
    assert text_tags == {f"normx/tokens/{p}/text_summary" for p in probe_ids} | {
        "normx/embedding/top/text_summary", "normx/embedding/top_never_seen/text_summary"}
    # HTML is W&B only: TensorBoard would strip it.
    assert not any("html" in t for tag_list in tags.values() if isinstance(tag_list, list)
                   for t in tag_list)
    for probe in probe_ids:
        events = acc.Tensors(f"normx/tokens/{probe}/text_summary")
        assert [e.step for e in events] == EXPECTED_STEPS
        text = tensor_util.make_ndarray(events[-1].tensor_proto).item().decode()
        lines = text.splitlines()
        assert lines[0] == "| position | token | is\\_cue | norm | logat | score |"
        assert lines[1] == "|---|---|---|---|---|---|"
        encoded = dm.probes.encode(dm.tokenizer, objective="causal")
        assert len(lines) == 2 + int(encoded.attention_mask[probe_ids.index(probe)].sum())


# --------------------------------------------------------------------------- the store


def test_store_holds_one_snapshot_per_scheduled_step(tb_run, dm):
    trainer, _, callback = tb_run
    assert trainer.global_step == MAX_STEPS
    schedule = SnapshotSchedule("log", every_n_steps=EVERY)
    assert EXPECTED_STEPS == schedule.upto(MAX_STEPS) + [MAX_STEPS]
    assert callback.snapshot_steps == EXPECTED_STEPS

    run = load_run(callback.store.root)
    assert run.steps == EXPECTED_STEPS
    assert run.missing.empty
    assert set(TABLES) <= set(run.tables)
    for name in TABLES:
        assert sorted(run[name].step.unique()) == EXPECTED_STEPS, name

    encoded = dm.probes.encode(dm.tokenizer, objective="causal")
    num_probes, layers = len(dm.probes), [0, 1, 2]
    tokens = run["tokens"]
    assert not tokens.duplicated(["step", "probe_id", "layer", "position"]).any()
    assert (tokens.groupby("step").size() == int(encoded.attention_mask.sum()) * len(layers)).all()
    assert not run["probes"].duplicated(["step", "probe_id"]).any()
    assert (run["probes"].groupby("step").size() == num_probes).all()
    assert not run["metrics"].duplicated(["step", "key"]).any()
    embedding = run["embedding"]
    assert not embedding.duplicated(["step", "token_id"]).any()
    assert (embedding.groupby("step").size() == dm.vocab_size).all()

    # Cue flags and explained positions are the probes' own.
    first = tokens[(tokens.step == 0) & (tokens.layer == 2)]
    for b, probe in enumerate(dm.probes):
        rows = first[first.probe_id == probe.id].sort_values("position")
        n = int(encoded.attention_mask[b].sum())
        assert rows.position.tolist() == list(range(n))
        assert rows.is_cue.tolist() == encoded.cue_mask[b, :n].tolist()
        assert "".join(rows.token[rows.is_cue]).strip() == probe.cues[0]
        assert rows.is_explained.tolist() == [t == int(encoded.positions[b]) for t in range(n)]

    # Frequencies: exactly the real tokens of the batches trained on before each snapshot.
    for step in EXPECTED_STEPS:
        assert torch.equal(counts_at(run, step), real_token_counts(dm, step)), step


# --------------------------------------------------------------------------- W&B


def _wandb_records(wandb_file: Path) -> list[dict] | None:
    """The run's transaction log, read by the W&B client's own reader (`wandb leet inspect`)."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
        capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        return None
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run_holds_scalars_tables_html_images_histograms(dm, tmp_path,
                                                                       monkeypatch):
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR",
                "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    steps = [0, 1, 2, 4]  # max_steps=4 is itself scheduled: no extra final snapshot
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="normx-test")
    callback = NormXLogitCallback(dm.probes, every_n_steps=EVERY, media_probes=1)
    try:
        fit(make_model(dm), dm, tmp_path, [callback], logger=logger, max_steps=4)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    probe = dm.probes[0].id

    assert load_run(tmp_path).steps == steps  # default store: <save_dir>/normx
    # The media files W&B wrote for the run.
    tables = sorted((run_dir / "files" / "media" / "table").rglob("*.table.json"))
    token_tables = [t for t in tables if probe in t.name]
    assert len(token_tables) == len(steps)
    table = json.loads(token_tables[-1].read_text())
    assert table["columns"] == ["position", "token", "is_cue", "norm", "logat", "score"]
    assert len(list((run_dir / "files" / "media" / "html").rglob("*.html"))) == len(steps)

    wandb_files = list(run_dir.glob("*.wandb"))
    assert len(wandb_files) == 1
    records = _wandb_records(wandb_files[0])
    if records is None:
        pytest.skip("this wandb has no `wandb leet inspect` to read the .wandb log back")
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert history

    def steps_of(key, value=None):
        return [row["trainer/global_step"] for row in history
                if key in row and (value is None or row[key] == value)]

    assert steps_of("normx/embedding/mean") == steps
    assert steps_of("normx/alignment/ap") == steps
    assert steps_of(f"normx/tokens/{probe}._type", "table-file") == steps
    assert steps_of(f"normx/html/{probe}._type", "html-file") == steps
    assert steps_of("normx/embedding/norms._type", "histogram") == steps
    assert steps_of(f"normx/heatmap/{probe}/layers._type", "image-file") == steps
    assert steps_of(f"normx/heatmap/{probe}/history._type", "image-file") == steps
    assert steps_of("normx/embedding/top._type", "table-file") == steps
    # Only media_probes=1 probe gets media.
    assert not steps_of(f"normx/html/{dm.probes[1].id}._type")


# --------------------------------------------------------------------------- other loggers


def test_other_logger_gets_scalars_and_one_media_warning(dm, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    logger = CSVLogger(str(tmp_path), name="csv")
    # probes=None: the DataModule's `probes` are used.
    callback = NormXLogitCallback(every_n_steps=EVERY, media_probes=2)
    fit(make_model(dm), dm, tmp_path, [callback], logger=logger)
    assert [p.id for p in callback.probes] == [p.id for p in dm.probes]

    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    rows = metrics.dropna(subset=["normx/probe/target_prob"])
    assert rows.step.tolist() == EXPECTED_STEPS
    run = load_run(Path(logger.log_dir) / "normx")  # default store: <log_dir>/normx
    stored = run["metrics"][run["metrics"].key == "probe/target_prob"].sort_values("step")
    np.testing.assert_allclose(rows["normx/probe/target_prob"], stored["value"], rtol=1e-6)

    ours = [r for r in caplog.records if r.name.startswith("normx_callbacks")]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    assert "CSVLogger receives scalars only" in ours[0].getMessage()


def test_without_any_logger_the_store_is_still_written(dm, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    rendered = []
    for name in ("layer_heatmap", "history_heatmap"):
        monkeypatch.setattr(images, name, lambda *a, _name=name, **k: rendered.append(_name))
    # Spied on in this process: the snapshots are built here (writer="thread").
    callback = NormXLogitCallback(dm.probes, every_n_steps=EVERY, media_probes=2,
                                  store_dir=tmp_path / "store", writer="thread")
    trainer = fit(make_model(dm), dm, tmp_path, [callback], logger=False)
    assert trainer.loggers == []
    assert rendered == []  # no logger shows images: no figure is rendered
    run = load_run(tmp_path / "store")
    assert run.steps == EXPECTED_STEPS
    assert set(TABLES) <= set(run.tables)
    assert callback.last_metrics["probe/target_prob"] > 0
    assert not [r for r in caplog.records if r.name.startswith("normx_callbacks")]


# --------------------------------------------------------------------------- schedule


def test_gradient_accumulation_takes_one_snapshot_per_optimizer_step(dm, tmp_path):
    callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=0,
                                  store_dir=tmp_path / "store")
    trainer = fit(make_model(dm), dm, tmp_path, [callback], max_steps=5,
                  accumulate_grad_batches=2)
    assert trainer.global_step == 5
    expected = SnapshotSchedule("log", every_n_steps=100).upto(5) + [5]
    assert expected == [0, 1, 2, 4, 5]
    assert callback.snapshot_steps == expected
    run = load_run(tmp_path / "store")
    assert run.steps == expected
    # Both micro-batches of each step are counted, once.
    for step in expected:
        assert torch.equal(counts_at(run, step), real_token_counts(dm, 2 * step)), step


# --------------------------------------------------------------------------- not noticed


def test_training_is_bit_identical_with_and_without_the_callback(dm, tmp_path):
    def run(with_callback: bool):
        model = make_model(dm, dropout=0.1)
        # A submodule the user froze in eval mode must stay there (no blanket .train()).
        model.model.transformer.drop.eval()
        hooks_before = hook_counts(model)
        recorder = FlagRecorder()
        callbacks = [recorder]
        if with_callback:
            callbacks.append(NormXLogitCallback(dm.probes, every_n_steps=EVERY, media_probes=1,
                                                store_dir=tmp_path / "store"))
        trainer = fit(model, dm, tmp_path, callbacks, max_steps=12, deterministic=True)
        assert trainer.global_step == 12
        return model, hooks_before, recorder, callbacks[-1]

    plain, _, _, _ = run(False)
    watched, hooks_before, recorder, callback = run(True)

    assert callback.snapshot_steps == [0, 1, 2, 4, 8, 12]
    plain_params = dict(plain.named_parameters())
    for name, param in watched.named_parameters():
        assert torch.equal(param, plain_params[name]), name
    # No hooks left behind, and every submodule's own train flag kept throughout.
    assert hook_counts(watched) == hooks_before
    assert recorder.reference["model.transformer.h.0.attn"] is True
    assert recorder.reference["model.transformer.drop"] is False
    assert recorder.changed_at == []
    assert train_flags(watched) == recorder.reference


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def dm_epoch10(cache_dir) -> TextDataModule:
    # 160 documents in batches of 16: an epoch is exactly 10 steps.
    data = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=160, num_probes=4,
                          batch_size=16, cache_dir=cache_dir)
    data.setup("fit")
    return data


def test_kill_and_resume_keeps_each_snapshot_once_and_counts_continue(dm_epoch10, tmp_path):
    dm, store_dir, ckpt_dir = dm_epoch10, tmp_path / "store", tmp_path / "ckpt"

    def callback():
        return NormXLogitCallback(dm.probes, every_n_steps=8, media_probes=0,
                                  store_dir=store_dir)

    # Run A checkpoints at step 10 and then dies at 12: the store holds snapshots after the
    # checkpoint (the final one at 12, and a fake 11 with a missing-record), as a killed
    # run leaves them.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=10, save_top_k=-1)
    fit(make_model(dm), dm, tmp_path, [callback(), checkpoint], max_steps=12)
    store = SnapshotStore(store_dir)
    assert store.steps() == [0, 1, 2, 4, 8, 12]
    run = load_run(store_dir)
    store.write(11, {n: run[n][run[n].step == 8].drop(columns="step") for n in TABLES})
    store.mark_missing(13, "killed")
    kept_marker = (store_dir / "_commits" / "step=000000008.json").read_bytes()
    ckpt = ckpt_dir / "epoch=0-step=10.ckpt"
    assert ckpt.is_file()

    resumed = callback()
    trainer = fit(make_model(dm), dm, tmp_path, [resumed], max_steps=20, ckpt_path=str(ckpt))
    assert trainer.global_step == 20

    expected = SnapshotSchedule("log", every_n_steps=8).upto(20) + [20]
    assert expected == [0, 1, 2, 4, 8, 16, 20]
    run = load_run(store_dir)
    assert run.steps == expected
    assert run.missing.empty
    assert resumed.snapshot_steps == expected
    for name in TABLES:
        assert sorted(run[name].step.unique()) == expected, name
    assert not run["tokens"].duplicated(["step", "probe_id", "layer", "position"]).any()
    # Snapshots before the checkpoint are kept as they were, not re-taken.
    assert (store_dir / "_commits" / "step=000000008.json").read_bytes() == kept_marker
    # The resumed run compares with its pre-kill snapshot (state restored).
    metrics = run["metrics"]
    assert "stability/spearman" in set(metrics[metrics.step == 16].key)

    # Two whole epochs at step 20: every document counted exactly twice, including the
    # batches between the last snapshot (8) and the checkpoint (10).
    ids, mask = dm._train.input_ids, dm._train.attention_mask.bool()
    twice = 2 * torch.bincount(ids[mask], minlength=dm.vocab_size)
    assert torch.equal(counts_at(run, 20), twice)
    uninterrupted = NormXLogitCallback(dm.probes, every_n_steps=8, media_probes=0,
                                       store_dir=tmp_path / "uninterrupted")
    fit(make_model(dm), dm, tmp_path, [uninterrupted], max_steps=20)
    reference = load_run(tmp_path / "uninterrupted")
    assert reference.steps == expected
    assert torch.equal(counts_at(reference, 20), counts_at(run, 20))
    totals = [int(counts_at(run, s).sum()) for s in expected]
    assert totals == sorted(totals) and totals[0] == 0


# --------------------------------------------------------------------------- setup errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "cosine"}, r"schedule='cosine' is not one of"),
        ({"every_n_steps": 0}, r"every_n_steps=0 must be a positive integer"),
        ({"schedule": "steps"}, r"schedule='steps' needs a non-empty steps"),
        ({"steps": [5]}, r"steps=\[...\] is only used with schedule='steps'"),
        ({"log_base": 1}, r"log_base=1 must be an integer >= 2"),
        ({"norm": "l2"}, r"norm='l2' is not one of \('layer0', 'word'\)"),
        ({"layers": "first"}, r"layers='first': use 'all', None or a list"),
        ({"layers": []}, r"layers=\[\]: use 'all', None or a non-empty list"),
        ({"layers": [1.5]}, r"layers=\[1.5\]"),
        ({"objective": "mlm"}, r"objective='mlm' is not one of"),
        ({"top_k": -1}, r"top_k=-1 must be a non-negative integer"),
        ({"probe_batch_size": 0}, r"probe_batch_size=0 must be a positive integer"),
    ],
)
def test_bad_arguments_fail_at_construction(dm, kwargs, match):
    kwargs = {"probes": dm.probes, **kwargs}
    with pytest.raises(ValueError, match=match):
        NormXLogitCallback(**kwargs)


class PlainLM(pl.LightningModule):
    """A LightningModule with no Hugging Face model inside."""

    def __init__(self, tokenizer, vocab_size: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, vocab_size)

    def training_step(self, batch, batch_idx):
        logits = self.head(self.embed(batch["input_ids"]))
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TwoModelLM(PlainLM):
    """Two Hugging Face models side by side (e.g. student and teacher)."""

    def __init__(self, tokenizer, vocab_size: int):
        super().__init__(tokenizer, vocab_size)
        options = dict(vocab_size=vocab_size, d_model=16, n_layers=1, n_heads=2, context=64,
                       dropout=0.0)
        self.student = build_model("gpt2", **options)
        self.teacher = build_model("gpt2", **options)


def _setup_error_cases(dm):
    v, tok = dm.vocab_size, dm.tokenizer
    return {
        "no tokenizer": (lambda: make_model(dm, tokenizer=None), {}, "dataloader",
                         RuntimeError, r"needs a tokenizer: pass tokenizer=\.\.\."),
        "no probes": (lambda: make_model(dm), {"probes": None}, "dataloader",
                      RuntimeError, r"has no probes: pass probes=\[\.\.\.\]"),
        "no HF model": (lambda: PlainLM(tok, v), {}, "datamodule",
                        RuntimeError, r"found no language model in PlainLM: no Hugging Face "
                                      r"model and no module holding an nn.Embedding .* pass "
                                      r"model_attr="),
        "two HF models": (lambda: TwoModelLM(tok, v), {}, "datamodule",
                          RuntimeError, r"found 2 Hugging Face models in TwoModelLM "
                                        r"\(\['student', 'teacher'\]\)"),
        "bad model_attr": (lambda: make_model(dm), {"model_attr": "encoder"}, "datamodule",
                           RuntimeError, r"model_attr='encoder'\): LanguageModel has no such"),
        "model_attr not a model": (lambda: make_model(dm), {"model_attr": "model.lm_head"},
                                   "datamodule", RuntimeError, r"cannot read the model: Linear"),
        "probe longer than context": (lambda: make_model(dm, context=10), {"probes": [
            "the table near the authors",
            "the farmer near the tables behind the old red houses near the kings",
        ]}, "datamodule", ProbeError, r"probe 'probe-1' \(index 1\): \d+ tokens exceed max_length=10"),
        "tokenizer larger than vocab": (lambda: make_model(dm, vocab_size=100), {}, "datamodule",
                                        RuntimeError, rf"the tokenizer has {v} tokens but the "
                                                      r"model's embedding has 100 rows"),
        "layer out of range": (lambda: make_model(dm), {"layers": [0, 5]}, "datamodule",
                               ValueError, r"layers contains 5: valid indices are 0\.\.2"),
        "tracked word not one token": (lambda: make_model(dm),
                                       {"track_tokens": ["is", "xylophonequark"]}, "datamodule",
                                       RuntimeError, r"track_tokens: 'xylophonequark' is not a "
                                                     r"single token"),
    }


@pytest.mark.parametrize("case", [
    "no tokenizer", "no probes", "no HF model", "two HF models", "bad model_attr", "model_attr not a model",
    "probe longer than context", "tokenizer larger than vocab", "layer out of range",
    "tracked word not one token",
])
def test_setup_errors_fail_before_the_first_step(dm, tmp_path, case):
    build, kwargs, data, error, match = _setup_error_cases(dm)[case]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = NormXLogitCallback(**{"probes": dm.probes, "media_probes": 0,
                                     "store_dir": tmp_path / "store", **kwargs})
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(error, match=match):
        if data == "dataloader":  # no DataModule: nowhere else to find a tokenizer or probes
            trainer.fit(model, train_dataloaders=dm.train_dataloader())
        else:
            trainer.fit(model, dm)
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "store").exists()


def test_unsupported_strategy_fails_before_the_first_step(dm, tmp_path):
    # A real ModelParallelStrategy (FSDP refuses to construct without a GPU); it starts a
    # one-process gloo group, which is torn down so later tests run undistributed.
    environ = dict(os.environ)
    model = make_model(dm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = NormXLogitCallback(dm.probes, media_probes=0, store_dir=tmp_path / "store")
    trainer = make_trainer(tmp_path, [callback], strategy=ModelParallelStrategy())
    try:
        with pytest.raises(RuntimeError, match=r"does not support ModelParallelStrategy: "
                                               r"sharded parameters"):
            trainer.fit(model, dm)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- failures


class Saboteur(Callback):
    """Makes the probe forward (eval mode) raise once, at `step`; training is untouched."""

    def __init__(self, module: nn.Module, step: int):
        self.module, self.step = module, step
        self.armed, self.fired, self.handle = False, 0, None

    def _hook(self, module, args, output):
        if self.armed and not module.training:
            self.armed = False
            self.fired += 1
            raise RuntimeError("sabotaged probe forward")

    def on_train_start(self, trainer, pl_module):
        self.handle = self.module.register_forward_hook(self._hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Runs before NormXLogitCallback's hook (listed first).
        self.armed = trainer.global_step == self.step

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()


def test_failed_snapshot_is_recorded_as_missing_and_training_continues(dm, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    model = make_model(dm)
    hooks_before = hook_counts(model)
    saboteur = Saboteur(model.model.transformer.h[1], step=2)
    recorder = FlagRecorder()
    callback = NormXLogitCallback(dm.probes, every_n_steps=EVERY, media_probes=0,
                                  store_dir=tmp_path / "store")
    trainer = fit(model, dm, tmp_path, [recorder, saboteur, callback])

    assert saboteur.fired == 1
    assert trainer.global_step == MAX_STEPS
    expected = [s for s in EXPECTED_STEPS if s != 2]
    assert callback.snapshot_steps == expected
    run = load_run(tmp_path / "store")
    assert run.steps == expected
    assert run.missing.step.tolist() == [2]
    assert "RuntimeError: sabotaged probe forward" in run.missing.reason[0]
    assert any("snapshot at step 2 failed" in r.getMessage() for r in caplog.records)
    # The failed probe left no hooks and no module in eval mode.
    assert recorder.changed_at == []
    assert all(train_flags(model).values())
    assert hook_counts(model) == hooks_before
    # The next snapshot still counts every token seen.
    assert torch.equal(counts_at(run, 4), real_token_counts(dm, 4))


def test_a_figure_that_cannot_be_drawn_does_not_stop_training(dm, tmp_path, caplog,
                                                              monkeypatch):
    caplog.set_level(logging.WARNING, logger="normx_callbacks")

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(images, "history_heatmap", broken)
    # The fault is injected in this process: the snapshots are built here (writer="thread").
    callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=1,
                                  store_dir=tmp_path / "store", writer="thread")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = fit(make_model(dm), dm, tmp_path, [callback], logger=logger, max_steps=2)
    assert trainer.global_step == 2
    assert load_run(tmp_path / "store").steps == [0, 1, 2]
    failed = [r.getMessage() for r in caplog.records if "the media of the snapshot" in r.getMessage()]
    assert len(failed) == 3 and "ValueError: cannot draw" in failed[0]
    # The scalars still reached TensorBoard.
    from tensorboard.backend.event_processing import event_accumulator as ea

    events = ea.EventAccumulator(str(logger.log_dir)).Reload()
    assert [e.step for e in events.Scalars("normx/probe/target_prob")] == [0, 1, 2]


def test_a_reused_callback_watches_the_model_it_is_given(dm, tmp_path):
    callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=0,
                                  store_dir=tmp_path / "store")
    first, second = make_model(dm), make_model(dm)
    fit(first, dm, tmp_path, [callback], max_steps=1)
    assert callback.adapter.module is first.model
    fit(second, dm, tmp_path, [callback], max_steps=1)
    assert callback.adapter.module is second.model


# --------------------------------------------------------------------------- faithfulness


def test_faithfulness_is_logged_at_its_cadence_and_the_final_step(dm, tmp_path):
    callback = NormXLogitCallback(every_n_steps=4, store_dir=tmp_path / "store",
                                  faithfulness_every=2, faithfulness_probes=3,
                                  faithfulness_methods=["normxlogit", "random", "saliency"])
    fit(make_model(dm), dm, tmp_path, [callback], max_steps=12)
    # 12 is on the schedule: it is both a scheduled and the final snapshot.
    assert callback.snapshot_steps == [0, 1, 2, 4, 8, 12]
    metrics = load_run(tmp_path / "store").metrics
    keys = set(metrics.key)
    for method in ("normxlogit", "random", "saliency"):
        for part in ("comprehensiveness", "sufficiency", "seconds_per_instance"):
            assert f"faithfulness/{method}/{part}" in keys
    rows = metrics[metrics.key == "faithfulness/normxlogit/comprehensiveness"]
    # Every 2nd snapshot (0, 2, 8) and the final one (12).
    assert sorted(rows.step) == [0, 2, 8, 12]
    assert rows.value.between(-1, 1).all()


def test_faithfulness_can_be_switched_off_and_rejects_unknown_methods(dm, tmp_path):
    with pytest.raises(ValueError, match="faithfulness_methods=.*'lime'.*valid names"):
        NormXLogitCallback(faithfulness_methods=["normxlogit", "lime"])
    callback = NormXLogitCallback(store_dir=tmp_path / "store", faithfulness_every=None)
    fit(make_model(dm), dm, tmp_path, [callback], max_steps=2)
    keys = set(load_run(tmp_path / "store").metrics.key)
    assert not any(k.startswith("faithfulness/") for k in keys)


# --------------------------------------------------------------------------- two instances


def test_two_instances_with_their_own_suffix_write_and_resume_their_own_stores(dm, tmp_path):
    def pair():
        # Different schedules, so that states swapped on resume would show.
        return (NormXLogitCallback(dm.probes, media_probes=0, faithfulness_every=None,
                                   writer="thread", store_dir=tmp_path / "a",
                                   state_key_suffix="a"),
                NormXLogitCallback(dm.probes, media_probes=0, faithfulness_every=None,
                                   writer="thread", store_dir=tmp_path / "b",
                                   state_key_suffix="b", schedule="steps", steps=[2]))

    first_a, first_b = pair()
    assert first_a.state_key != first_b.state_key
    trainer = fit(make_model(dm), dm, tmp_path, [first_a, first_b], max_steps=2)
    assert first_a.snapshot_steps == [0, 1, 2] and first_b.snapshot_steps == [0, 2]
    assert load_run(tmp_path / "a").steps == [0, 1, 2]
    assert load_run(tmp_path / "b").steps == [0, 2]
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(str(ckpt))
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert sorted(k for k in saved if k.startswith("NormXLogitCallback")) == [
        "NormXLogitCallback{'suffix': 'a'}", "NormXLogitCallback{'suffix': 'b'}"]
    states = {key: saved[key] for key in (first_a.state_key, first_b.state_key)}
    assert states[first_a.state_key]["store"] == str((tmp_path / "a").resolve())
    assert states[first_b.state_key]["store"] == str((tmp_path / "b").resolve())
    assert states[first_a.state_key]["snapshot_steps"] == [0, 1, 2]
    assert states[first_b.state_key]["snapshot_steps"] == [0, 2]

    # Resumed in new instances (a new process), listed in the other order: each restores
    # the state saved under its own key, and goes on in its own store.
    again_a, again_b = pair()
    fit(make_model(dm), dm, tmp_path, [again_b, again_a], max_steps=3, ckpt_path=str(ckpt))
    assert again_a.snapshot_steps == [0, 1, 2, 3] and again_b.snapshot_steps == [0, 2, 3]
    for callback, first, store in ((again_a, first_a, "a"), (again_b, first_b, "b")):
        assert callback.engine.run["run_id"] == first.engine.run["run_id"], store
        assert callback.store.root == tmp_path / store
    assert load_run(tmp_path / "a").steps == [0, 1, 2, 3]
    assert load_run(tmp_path / "b").steps == [0, 2, 3]


def test_two_instances_without_a_suffix_are_refused_by_lightning(dm, tmp_path):
    callbacks = [NormXLogitCallback(dm.probes, store_dir=tmp_path / name) for name in "ab"]
    assert callbacks[0].state_key == callbacks[1].state_key
    # Lightning checks the state keys when the Trainer is built, before anything runs.
    with pytest.raises(RuntimeError, match=r"Found more than one stateful callback of type "
                                           r"`NormXLogitCallback`.* The `callback.state_key` must "
                                           r"be unique"):
        make_trainer(tmp_path, callbacks)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
