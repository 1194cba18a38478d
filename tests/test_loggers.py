"""What a person sees in TensorBoard and W&B, read back from the real files the loggers wrote."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from normx_callbacks import NormXLogitCallback, images, load_run
from normx_callbacks.demo import LanguageModel
from normx_callbacks.loggers import LoggerSink

STEPS = [0, 1, 2, 4]  # the log schedule up to max_steps=4


def _fit(dm, root: Path, logger) -> NormXLogitCallback:
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer)
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=1, top_k=5)
    trainer = pl.Trainer(max_steps=4, logger=logger, callbacks=[callback],
                         default_root_dir=str(root), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, log_every_n_steps=1, accelerator="cpu")
    trainer.fit(model, dm)
    return callback


@pytest.fixture(scope="module")
def tensorboard(dm, tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    logger = TensorBoardLogger(str(root), name="tb", default_hp_metric=False)
    callback = _fit(dm, root, logger)
    guidance = {kind: 0 for kind in (ea.SCALARS, ea.TENSORS, ea.HISTOGRAMS, ea.IMAGES)}
    acc = ea.EventAccumulator(logger.log_dir, size_guidance=guidance)
    acc.Reload()
    return acc, load_run(callback.store.root)


def _text(acc, tag: str) -> list[str]:
    event = acc.Tensors(f"{tag}/text_summary")[-1]
    return tensor_util.make_ndarray(event.tensor_proto).item().decode().splitlines()


def _rows(lines: list[str]) -> list[list[str]]:
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))),
                     strict=True)) for line in lines[2:]]


def test_custom_scalars_put_each_metric_with_its_baseline(tensorboard):
    acc, _ = tensorboard
    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(event.tensor_proto).item())
    scalars = acc.Tags()["scalars"]
    charts = {chart.title: sorted(t for t in scalars if any(
        re.search(r, t) for r in chart.multiline.tag)) for category in layout.category
        for chart in category.chart}
    assert charts["AP: NormXLogit, LogAt and random"] == [
        "normx/alignment/ap", "normx/alignment/ap_logat", "normx/alignment/ap_random"]
    assert charts["DP: standardised (dp_z), paper's (dp_raw) and random"] == [
        "normx/alignment/dp_random", "normx/alignment/dp_raw", "normx/alignment/dp_z"]
    assert charts["probe accuracy and target probability"] == [
        "normx/probe/accuracy", "normx/probe/target_prob"]
    assert charts["AP per layer"] == [f"normx/alignment/ap_layer{i}" for i in range(3)]
    controls = charts["AP controls: first snapshot, target - foil score, gradient references"]
    assert {"normx/alignment/ap_reference", "normx/alignment/ap_contrast",
            "normx/alignment/ap_contrast_random"} <= set(controls)
    assert charts["cue over attractor, random and first snapshot"] == [
        "normx/alignment/cue_over_attractor", "normx/alignment/cue_over_attractor_random",
        "normx/alignment/cue_over_attractor_reference"]
    paired = charts["paired differences over probes (0 = none): vs random, vs first snapshot"]
    assert "normx/alignment/ap_vs_random" in paired and "normx/alignment/ap_vs_reference" in paired
    assert all(tag.startswith("normx/") for tags in charts.values() for tag in tags)
    assert layout.category[0].title.startswith("normx")


def test_norm_tables_separate_seen_tokens_with_counts_from_never_seen(tensorboard, dm):
    acc, run = tensorboard
    stored = run.embedding[run.embedding.step == STEPS[-1]].set_index("token_id")
    seen = _rows(_text(acc, "normx/embedding/top"))
    never = _rows(_text(acc, "normx/embedding/top_never_seen"))
    assert [r["list"] for r in seen] == ["top"] * 5 + ["bottom"] * 5
    for row in seen:
        assert int(row["count"]) == stored.loc[int(row["token\\_id"]), "count"] > 0
    assert never and "count" not in never[0]
    assert all(stored.loc[int(r["token\\_id"]), "count"] == 0 for r in never)
    top_seen = [float(r["norm"]) for r in seen[:5]]
    assert top_seen == sorted(top_seen, reverse=True)
    # Readable text: decoded, not the byte-level piece (Ġ marks a leading space).
    for row in seen + never:
        piece = dm.tokenizer.convert_ids_to_tokens(int(row["token\\_id"]))
        text = dm.tokenizer.decode([int(row["token\\_id"])])
        assert row["token"] == (piece if "\ufffd" in text or not text else text.strip()), row


def _wandb_records(wandb_file: Path) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                             str(wandb_file)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_wandb_media_of_a_snapshot_in_one_row_stepped_on_global_step(dm, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR",
                "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="normx-test")
    try:
        _fit(dm, tmp_path, logger)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    records = _wandb_records(next(run_dir.glob("*.wandb")))
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    probe = dm.probes[0].id
    media = [f"normx/tokens/{probe}", f"normx/html/{probe}", "normx/embedding/norms",
             f"normx/heatmap/{probe}/layers", f"normx/heatmap/{probe}/history",
             "normx/embedding/top", "normx/embedding/top_never_seen"]
    rows = [row for row in history if any(f"{m}._type" in row for m in media)]
    # One history row per snapshot holds every media item, at trainer/global_step.
    assert [row["trainer/global_step"] for row in rows] == STEPS
    assert all(f"{m}._type" in row for row in rows for m in media)
    # The W&B step axis of every normx/* key is trainer/global_step.
    globs = {m["metric"].get("glob_name"): m["metric"].get("step_metric")
             for m in records if m.get("type") == "metric"}
    assert globs["normx/*"] == "trainer/global_step"
    # The heatmaps are PNG files W&B wrote from the image arrays: 2 per snapshot.
    pngs = sorted((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(pngs) == 2 * len(STEPS)
    for png in pngs:
        pixels = np.asarray(Image.open(png).convert("RGB"))
        assert 80 < pixels.shape[0] < 1000 and 150 < pixels.shape[1] < 1000
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


# --------------------------------------------------------------------------- heatmap images


def test_tensorboard_heatmaps_are_images_that_grow_with_the_history(tensorboard, dm):
    acc, run = tensorboard
    probe = dm.probes[0].id
    tokens = run["tokens"]
    last = tokens[(tokens.probe_id == probe) & (tokens.step == STEPS[-1])
                  & (tokens.layer == tokens.layer.max())]
    for kind in ("layers", "history"):
        events = acc.Images(f"normx/heatmap/{probe}/{kind}")
        assert [e.step for e in events] == STEPS
        for event in events:
            pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
            assert pixels.shape == (event.height, event.width, 3)
            assert 80 < event.height < 1000 and 150 < event.width < 1000
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # cells, text, legend
            # The probe's cue words are marked; grey only where a score is missing.
            cue_pixels = (pixels == images.CUE_RGB).all(axis=2).sum()
            assert (cue_pixels > 0) == bool(last.is_cue.any())
            assert not (pixels == images.NAN_RGB).all(axis=2).any()
    history = acc.Images(f"normx/heatmap/{probe}/history")
    # One row per snapshot so far: the last image is taller than the first.
    assert history[-1].height > history[0].height
    assert history[-1].width == history[0].width


def test_sink_refuses_a_figure_that_is_not_an_image(tmp_path):
    sink = LoggerSink([TensorBoardLogger(str(tmp_path), name="tb")])
    with pytest.raises(TypeError, match=r"expected an \(H, W, 3\) uint8 image array"):
        sink.figure("normx/heatmap/x", np.zeros((4, 4)), 0)
