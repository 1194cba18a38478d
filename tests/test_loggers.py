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
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from normx_callbacks import NormXLogitCallback, load_run, plots
from normx_callbacks.demo import LanguageModel
from normx_callbacks.loggers import LoggerSink

STEPS = [0, 1, 2, 4]  # the log schedule up to max_steps=4


def _fit(dm, root: Path, logger) -> NormXLogitCallback:
    torch.set_num_threads(1)
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
            cue_pixels = (pixels == plots.CUE_RGB).all(axis=2).sum()
            assert (cue_pixels > 0) == bool(last.is_cue.any())
            assert not (pixels == plots.NAN_RGB).all(axis=2).any()
    history = acc.Images(f"normx/heatmap/{probe}/history")
    # One row per snapshot so far: the last image is taller than the first.
    assert history[-1].height > history[0].height
    assert history[-1].width == history[0].width


def _columns(image: np.ndarray, colour) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the heatmap cells that have exactly ``colour``: runs of at least 3
    pixels (the legend's colour bar gives each colour a pixel at most)."""
    exact = (image == np.asarray(colour, dtype=np.uint8)).all(axis=2)
    runs = exact[:, :-2] & exact[:, 1:-1] & exact[:, 2:]
    ys, xs = np.nonzero(runs)
    return np.unique(ys), np.unique(np.concatenate([xs, xs + 1, xs + 2]))


BLUE, RED = (tuple(int(v) for v in c) for c in plots.score_rgb(np.array([-1.0, 1.0])))


def test_heatmap_image_shape_colours_and_row_labels():
    rng = np.random.default_rng(0)
    tokens = [" the", " keys", " to", " the", " cabinet", " are"] * 2
    layers = plots.layer_heatmap(rng.normal(size=(3, 12)), tokens, [0, 1, 2], title="p at 4")
    history = plots.history_heatmap(rng.normal(size=(14, 12)), tokens, list(range(14)))
    for image in (layers, history):
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3
    assert history.shape[0] > layers.shape[0]  # 14 rows are taller than 3
    # Zero-centred: the largest |score| is full red or full blue, a zero score the centre.
    assert plots.score_rgb(np.array([0.0]))[0].tolist() == [247, 247, 247]
    assert RED[0] > RED[2] and BLUE[2] > BLUE[0]
    values = np.array([[2.0, -1.0, 0.5]])
    image = plots.layer_heatmap(values, ["a", "b", "c"], [5])
    assert _columns(image, RED)[1].size and not _columns(image, BLUE)[1].size  # -1 of +-2


def test_history_rows_are_scaled_per_step_unless_asked_not_to():
    values = np.array([[0.001, -0.002], [10.0, 5.0]])  # step 0 is 5000x smaller than step 8
    scaled = plots.history_heatmap(values, ["a", "b"], [0, 8])
    shared = plots.history_heatmap(values, ["a", "b"], [0, 8], per_step=False)
    assert _columns(scaled, BLUE)[1].size and _columns(scaled, RED)[1].size
    assert not _columns(shared, BLUE)[1].size and _columns(shared, RED)[1].size


def test_cue_column_is_marked_and_missing_score_is_grey():
    values = np.array([[1.0, 0.0, -1.0], [1.0, np.nan, -1.0]])
    image = plots.layer_heatmap(values, ["a", "cue", "c"], [0, 1], cues=[False, True, False])
    red_rows, red_x = _columns(image, RED)
    blue_rows, blue_x = _columns(image, BLUE)
    middle = np.arange(red_x.max() + 1, blue_x.min())  # the cue token's column
    assert middle.size > 2
    grid_bottom = red_rows.max()
    below = image[grid_bottom + 1:]
    cue = (below == plots.CUE_RGB).all(axis=2)
    assert cue[:, middle].any()
    assert not cue[:, red_x].any() and not cue[:, blue_x].any()
    # Row 1's middle cell has no score: grey, where row 0's zero is the white centre.
    x = int(middle.mean())
    rows = red_rows[red_rows <= grid_bottom]
    top_half, bottom_half = rows[: rows.size // 2], rows[rows.size // 2:]
    assert image[int(top_half.mean()), x].tolist() == [247, 247, 247]
    assert image[int(bottom_half.mean()), x].tolist() == list(plots.NAN_RGB)
    unmarked = plots.layer_heatmap(values, ["a", "cue", "c"], [0, 1])
    assert not (unmarked == plots.CUE_RGB).all(axis=2).any()


def test_one_token_one_row_long_and_odd_tokens_render():
    one = plots.history_heatmap(np.array([[0.3]]), ["x"], [0], title="one snapshot")
    assert one.ndim == 3 and _columns(one, RED)[1].size  # row-scaled: 0.3 is its own maximum
    long = "supercalifragilistic" * 10
    cut = plots.layer_heatmap(np.array([[1.0, -1.0]]), [long, "b"], [0])
    # Long tokens are cut to the same label, so the image does not grow with them.
    assert np.array_equal(cut, plots.layer_heatmap(np.array([[1.0, -1.0]]), [long[:40], "b"],
                                                   [0]))
    assert cut.shape[0] < 250 and cut.shape[1] < 800
    odd = plots.layer_heatmap(np.array([[1.0, -0.5, 0.2, 0.1]]), ["\n", " ", "caf\u00e9", "$x$"],
                              [0], title="a title " * 40)
    assert odd.shape[1] <= 800  # the long title is cut, not the image widened without bound


def test_heatmap_inputs_that_do_not_fit_say_which(tmp_path):
    with pytest.raises(ValueError, match="2 tokens for 3 score columns"):
        plots.layer_heatmap(np.zeros((1, 3)), ["a", "b"], [0])
    with pytest.raises(ValueError, match="cues has 1 entries for 2 tokens"):
        plots.history_heatmap(np.zeros((1, 2)), ["a", "b"], [0], cues=[True])
    with pytest.raises(ValueError, match="1 step labels for 2 score rows"):
        plots.history_heatmap(np.zeros((2, 2)), ["a", "b"], [0])
    sink = LoggerSink([TensorBoardLogger(str(tmp_path), name="tb")])
    with pytest.raises(TypeError, match=r"expected an \(H, W, 3\) uint8 image array"):
        sink.figure("normx/heatmap/x", np.zeros((4, 4)), 0)
