"""NormXLogitMonitor: the engine under Lightning Fabric and in a plain PyTorch loop.

The Fabric loop trains the same non-HF model (a nanoGPT-shaped GPT, `lm_shapes.py`) on the
same batches as a Lightning Trainer run with the callback; both write a store, and the stores
must hold the same snapshots with the same numbers.
"""

from __future__ import annotations

import itertools
import logging

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from lm_shapes import Config, GPTModule, NanoGPT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training import fit

from normx_callbacks import NormXLogitCallback, NormXLogitMonitor, load_run

STEPS = 10
SNAPSHOTS = [0, 1, 2, 4, 8, 10]  # the log schedule, then the final step
# Wall-clock costs differ between any two runs; every other number must agree.
TIMINGS = ("snapshot/", "seconds_per_instance", "/seconds")


def _module(dm) -> GPTModule:
    torch.manual_seed(0)
    return GPTModule(NanoGPT(Config(vocab_size=dm.vocab_size, block_size=64)),
                     tokenizer=dm.tokenizer)


def _fabric_run(dm, root, **settings) -> tuple[GPTModule, NormXLogitMonitor]:
    fabric = Fabric(accelerator="cpu", devices=1, loggers=FabricTensorBoardLogger(root / "tb"))
    module = _module(dm)
    optimizer = module.configure_optimizers()
    model, optimizer = fabric.setup(module, optimizer)
    monitor = NormXLogitMonitor(dm.probes, store_dir=root / "normx", loggers=fabric.loggers,
                                **settings)
    monitor.setup(model, dm.tokenizer, max_steps=STEPS, autocast=fabric.autocast)
    batches = itertools.islice(dm.train_dataloader(), STEPS)
    for step, batch in enumerate(batches, start=1):
        optimizer.zero_grad()
        loss = module.training_step(batch, step - 1)
        fabric.backward(loss)
        optimizer.step()
        monitor.step(step, model, batch)
    monitor.end(STEPS)
    return module, monitor


def _same_numbers(a, b) -> None:
    assert a.steps == b.steps == SNAPSHOTS
    # Faithfulness runs on the helper's copy of the weights under the Trainer (float32) and
    # on the model itself under Fabric (autocast given): the same float32 forwards, whose
    # probability drops may differ in the last bits (seen: 3e-7), hence its wider atol.
    for table in ("tokens", "probes", "embedding", "faithfulness"):
        left, right = a[table], b[table]
        atol = 1e-7
        if table == "faithfulness":
            left, right = (t.drop(columns=["seconds"], errors="ignore") for t in (left, right))
            atol = 2e-6
        pd.testing.assert_frame_equal(left.reset_index(drop=True), right.reset_index(drop=True),
                                      check_exact=False, rtol=1e-6, atol=atol, obj=table)
    for faith in (False, True):
        pick = [m.metrics[~m.metrics.key.str.contains("|".join(TIMINGS))
                          & (m.metrics.key.str.startswith("faithfulness/") == faith)]
                .set_index(["step", "key"]).sort_index() for m in (a, b)]
        pd.testing.assert_frame_equal(*pick, check_exact=False, rtol=1e-6,
                                      atol=2e-6 if faith else 1e-7)


def test_a_fabric_loop_writes_the_store_the_callback_writes(dm, tmp_path):
    callback = NormXLogitCallback(dm.probes, media_probes=1, store_dir=tmp_path / "trainer")
    trained = _module(dm)
    fit(trained, dm, tmp_path, [callback], max_steps=STEPS)

    module, monitor = _fabric_run(dm, tmp_path / "fabric", media_probes=1)

    # The same training (bit-identical weights), so the same snapshots and numbers.
    for (name, p), q in zip(trained.state_dict().items(), module.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    _same_numbers(load_run(tmp_path / "trainer"), load_run(tmp_path / "fabric" / "normx"))
    assert load_run(tmp_path / "fabric" / "normx").faithfulness.step.unique().tolist() == [0, 8, 10]
    assert monitor.snapshot_steps == SNAPSHOTS
    # Counted tokens: every token of the 10 batches, as the callback counts them.
    embedding = load_run(tmp_path / "fabric" / "normx").embedding
    assert int(embedding[embedding.step == 10]["count"].sum()) == sum(
        int(b["attention_mask"].sum()) for b in itertools.islice(dm.train_dataloader(), STEPS))

    # Fabric's TensorBoard logger got the scalars, stepped by training step, and the images.
    [version] = (tmp_path / "fabric" / "tb").glob("*/version_*")
    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0}).Reload()
    steps = [e.step for e in events.Scalars("normx/probe/target_prob")]
    assert steps == SNAPSHOTS
    assert f"normx/heatmap/{dm.probes[0].id}/layers" in events.Tags()["images"]


def test_a_plain_loop_with_tuple_batches_resumes_in_its_store(dm, tmp_path, caplog):
    """No Fabric, no Lightning: a hand-written loop over (x, y) tuples, stopped at step 6
    after a checkpoint at step 4 and resumed from it."""
    store = tmp_path / "normx"

    def batches():
        for batch in dm.train_dataloader():
            ids = batch["input_ids"]
            yield ids[:, :-1], ids[:, 1:]

    def train(model, optimizer, monitor, start, stop, saved=None):
        for step, (x, y) in enumerate(itertools.islice(batches(), start, stop), start=start + 1):
            logits, _ = model(x, y)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(step, model, (x, y))
            if saved is not None and step == 4:
                saved.update(model=model.state_dict(), opt=optimizer.state_dict(),
                             monitor=monitor.state_dict())

    torch.manual_seed(0)
    model = NanoGPT(Config(vocab_size=dm.vocab_size, block_size=64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved: dict = {}
    with NormXLogitMonitor(dm.probes, store_dir=store, every_n_steps=3,
                           faithfulness_every=None) as monitor:
        monitor.setup(model, dm.tokenizer)
        train(model, optimizer, monitor, 0, 6, saved)  # then "killed" at step 6
    first_run = load_run(store)
    assert first_run.steps == [0, 1, 2, 3, 6]
    counts_at_3 = first_run.embedding.query("step == 3")["count"].to_numpy()

    torch.manual_seed(1)  # the resumed process starts from the checkpoint, not this seed
    model = NanoGPT(Config(vocab_size=dm.vocab_size, block_size=64))
    model.load_state_dict(saved["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.load_state_dict(saved["opt"])
    monitor = NormXLogitMonitor(dm.probes, store_dir=tmp_path / "elsewhere", every_n_steps=3,
                                faithfulness_every=None)
    monitor.load_state_dict(saved["monitor"])
    monitor.setup(model, dm.tokenizer, step=4)
    train(model, optimizer, monitor, 4, 9)
    monitor.end(9)

    run = load_run(store)  # the resume wrote into the first store, not store_dir
    assert not (tmp_path / "elsewhere").exists()
    assert run.steps == [0, 1, 2, 3, 6, 9]
    assert run.metrics.groupby("step").key.apply(lambda k: k.duplicated().any()).sum() == 0
    # Step 6 was re-taken after the resume. Its counts go on from the checkpoint's, which
    # held batch 4 (counted after the snapshot at 3, before the checkpoint): batches 4-6.
    counts_at_6 = run.embedding.query("step == 6")["count"].to_numpy()
    later = sum(x.numel() for x, _ in itertools.islice(batches(), 3, 6))
    assert int(counts_at_6.sum() - counts_at_3.sum()) == later
    # The tuple batches were counted (no "no tokens were counted" warning).
    assert not [r for r in caplog.records if "no tokens were counted" in r.getMessage()]


def test_the_monitor_refuses_misuse_by_name(dm, tmp_path):
    with pytest.raises(ValueError, match="NormXLogitMonitor: unknown option 'every_n_step'; "
                                         "did you mean 'every_n_steps'"):
        NormXLogitMonitor(dm.probes, store_dir=tmp_path, every_n_step=3)
    with pytest.raises(ValueError, match="media_probes"):
        NormXLogitMonitor(dm.probes, store_dir=tmp_path, media_probes=-1)
    monitor = NormXLogitMonitor(dm.probes)
    with pytest.raises(RuntimeError, match=r"call setup\(model, tokenizer\)"):
        monitor.step(1)
    torch.manual_seed(0)
    model = NanoGPT(Config(vocab_size=dm.vocab_size, block_size=64))
    with pytest.raises(ValueError, match="store_dir"):
        monitor.setup(model, dm.tokenizer)  # no store_dir and no logger with a log_dir
    monitor = NormXLogitMonitor(dm.probes, store_dir=tmp_path / "s", faithfulness_every=None)
    monitor.setup(model, dm.tokenizer)
    other = NanoGPT(Config(vocab_size=dm.vocab_size, block_size=64))
    with pytest.raises(ValueError, match="not the module given to setup"):
        monitor.step(1, other, None)
    monitor.close()


def test_an_exception_in_the_loop_still_writes_what_was_measured(dm, tmp_path, caplog):
    torch.manual_seed(0)
    model = NanoGPT(Config(vocab_size=dm.vocab_size, block_size=64))
    caplog.set_level(logging.WARNING)
    with pytest.raises(KeyboardInterrupt):
        with NormXLogitMonitor(dm.probes, store_dir=tmp_path / "normx", schedule="interval",
                               every_n_steps=1, faithfulness_every=None) as monitor:
            monitor.setup(model, dm.tokenizer)
            for step in range(1, 4):
                monitor.step(step, model, None)
            raise KeyboardInterrupt
    # Every snapshot taken before the interruption is in the store, none missing.
    run = load_run(tmp_path / "normx")
    assert run.steps == [0, 1, 2, 3] and run.missing.empty


def test_a_hugging_face_model_passed_itself_is_watched(dm, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=dm.vocab_size, n_embd=32, n_layer=2,
                                       n_head=2, n_positions=64))
    with NormXLogitMonitor(dm.probes, store_dir=tmp_path / "normx",
                           faithfulness_every=None) as monitor:
        monitor.setup(model, dm.tokenizer)
        batch = next(iter(dm.train_dataloader()))
        monitor.step(1, model, batch)
    assert monitor.engine.adapter.module is model  # not its base model, not refused
    assert load_run(tmp_path / "normx").steps == [0, 1]


def test_what_the_shared_engine_logs_names_the_monitor(dm, tmp_path, caplog):
    """Warnings from the engine's shared parts (the snapshot builder, the logger sink) name
    the driver the user wrote, not the Lightning callback."""
    from lightning.fabric.loggers import CSVLogger

    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    torch.manual_seed(0)
    model = NanoGPT(Config(vocab_size=dm.vocab_size, block_size=64))
    # The cue is the word before the target: the explained position, which alignment never
    # ranks.
    probe = {"id": "cue-at-target", "text": "the keys to the cabinet", "target": "are",
             "cues": ["cabinet"]}
    with NormXLogitMonitor([probe], store_dir=tmp_path / "normx", loggers=[
            CSVLogger(tmp_path / "csv")], every_n_steps=1, faithfulness_every=None,
            writer="thread") as monitor:
        monitor.setup(model, dm.tokenizer)
        monitor.step(1, model, None)
    messages = [r.getMessage() for r in caplog.records]
    cue = [m for m in messages if "have cue words only at the explained position" in m]
    media = [m for m in messages if "receives scalars only" in m]
    assert cue and media, messages
    assert all(m.startswith("NormXLogitMonitor: ") for m in cue + media), cue + media
    assert not [m for m in messages if "NormXLogitCallback" in m]
    assert load_run(tmp_path / "normx").steps == [0, 1]
