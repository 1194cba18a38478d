"""What the callback's metrics mean, in real Lightning runs: alignment from the model's last
layer whatever `layers` lists, probe counts and named left-out probes, intervals stored with
every probe-averaged metric, and the per-probe faithfulness record."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from normx_callbacks import NormXLogitCallback, load_run, plots
from normx_callbacks.demo import LanguageModel, TextDataModule


@pytest.fixture(scope="module")
def dm(cache_dir) -> TextDataModule:
    data = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=400, num_probes=8,
                          batch_size=16, cache_dir=cache_dir)
    data.setup("fit")
    return data


def _fit(dm, root, probes=None, max_steps=4, **options) -> NormXLogitCallback:
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer)
    options = {"every_n_steps": 4, "media_probes": 0, "faithfulness_every": None,
               "store_dir": root / "store", **options}
    callback = NormXLogitCallback(probes, **options)
    pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
               callbacks=[callback], default_root_dir=str(root), enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
               num_sanity_val_steps=0).fit(model, dm)
    return callback


def _alignment(root) -> dict[tuple[int, str], float]:
    metrics = load_run(root / "store").metrics
    rows = metrics[metrics.key.str.startswith("alignment/")
                   & ~metrics.key.str.startswith("alignment/ap_layer")]
    return {(int(s), k): float(v) for s, k, v in zip(rows.step, rows.key, rows.value,
                                                     strict=True)}


def test_alignment_is_the_last_layers_whatever_layers_lists(dm, tmp_path):
    every = _fit(dm, tmp_path / "all", layers="all")
    lower = _fit(dm, tmp_path / "low", layers=[0, 1])
    reversed_ = _fit(dm, tmp_path / "rev", layers=[1, 0])
    a, b, c = (_alignment(tmp_path / name) for name in ("all", "low", "rev"))
    assert a.keys() == b.keys() == c.keys()
    assert {k for _, k in a} >= {"alignment/ap", "alignment/dp_raw", "alignment/dp_z",
                                 "alignment/ap_random", "alignment/dp_random",
                                 "alignment/probes", "alignment/ap_logat"}
    for key, value in a.items():
        assert b[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
        assert c[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    # `layers` changes only the per-layer keys: AP at layer L is the headline AP.
    assert every.last_metrics["alignment/ap_layer2"] == pytest.approx(
        every.last_metrics["alignment/ap"], abs=1e-6)
    assert "alignment/ap_layer2" not in lower.last_metrics
    assert reversed_.last_metrics["alignment/ap_layer0"] == pytest.approx(
        every.last_metrics["alignment/ap_layer0"], abs=1e-6)


def test_intervals_are_stored_with_every_probe_averaged_metric(dm, tmp_path):
    callback = _fit(dm, tmp_path, faithfulness_every=1, faithfulness_probes=6,
                    faithfulness_methods=("normxlogit", "random"))
    run = load_run(tmp_path / "store")
    metrics = run.metrics
    last = metrics[metrics.step == metrics.step.max()].set_index("key")
    averaged = ["probe/target_prob", "probe/accuracy", "alignment/ap", "alignment/dp_raw",
                "alignment/dp_z", "alignment/ap_logat", "faithfulness/normxlogit/sufficiency",
                "faithfulness/normxlogit/comprehensiveness"]
    for key in averaged:
        low, value, high = last.loc[key, ["low", "value", "high"]]
        assert low <= value <= high, key
        assert high > low or value in (0.0, 1.0), key  # 8 probes give a real interval
    for key in ("embedding/mean", "alignment/probes", "faithfulness/probes"):
        assert math.isnan(last.loc[key, "low"]) and math.isnan(last.loc[key, "high"])
    assert last.loc["alignment/probes", "value"] == 8  # every probe entered
    assert last.loc["probe/accuracy_probes", "value"] == 8
    assert last.loc["faithfulness/probes", "value"] == 6
    assert last.loc["faithfulness/degenerate_cells", "value"] == 0  # nearest rule
    # The per-probe faithfulness record names how tokens were removed.
    table = run.faithfulness
    at = table[table.step == table.step.max()]
    assert len(at) == 2 * 6 and set(at.method) == {"normxlogit", "random"}
    assert set(at.replacement) == {"eos"} and set(at.replacement_token) == {"<|endoftext|>"}
    assert set(at.removal) == {"nearest"} and (at.n_candidates >= 2).all()
    mean = at[at.method == "normxlogit"].comprehensiveness.mean()
    assert mean == pytest.approx(last.loc["faithfulness/normxlogit/comprehensiveness", "value"])
    # The report's curves draw the intervals as bands.
    fig = plots.alignment_curves(run)
    # Bands: NormXLogit's AP and the target-minus-foil AP; DP_z; cue over attractor.
    assert [len(ax.collections) for ax in fig.axes] == [2, 1, 1]
    fig = plots.metric_history(run, ["faithfulness/normxlogit/comprehensiveness"])
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert np.isclose(band, last.loc["faithfulness/normxlogit/comprehensiveness", "low"]).any()
    assert callback.last_metrics["alignment/dp_random"] == pytest.approx(
        last.loc["alignment/dp_random", "value"])


def test_a_probe_left_out_of_alignment_is_named_once(dm, tmp_path, caplog):
    probes = [{"text": "the keys near the cabinet", "target": "are", "foil": "is",
               "cues": ["keys"], "id": "fine"},
              # Its only cue is a special token: never ranked, so it cannot enter AP.
              {"text": "<|endoftext|> the keys near the cabinet", "target": "are",
               "foil": "is", "cues": ["<|endoftext|>"], "id": "special-cue"}]
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        callback = _fit(dm, tmp_path, probes=probes)
    named = [r for r in caplog.records if "special-cue" in r.getMessage()]
    assert len(named) == 1 and "left out of alignment" in named[0].getMessage()
    assert len(callback.snapshot_steps) > 1
    assert callback.last_metrics["alignment/probes"] == 1
    assert math.isfinite(callback.last_metrics["alignment/ap"])


def test_special_tokens_are_not_ranked_by_alignment(dm, tmp_path):
    probes = [{"text": "<|endoftext|> the keys near the cabinet", "target": "are",
               "foil": "is", "cues": ["keys"], "id": "bos"}]
    callback = _fit(dm, tmp_path, probes=probes, max_steps=1)
    attr = callback.last_attribution
    # N excludes the special token and the explained word: the baseline counts the 4 ranked
    # words before it (the, keys, near, the), and the cue's AP matches a ranking of those.
    assert callback.last_metrics["alignment/dp_random"] == pytest.approx(1 / 4)
    scores = attr.scores[0, 1:5]
    rank = int((scores > scores[1]).sum()) + 1
    assert callback.last_metrics["alignment/ap"] == pytest.approx(1 / rank)
    assert torch.isfinite(attr.scores[0, 0])  # it was scored, just not ranked


def _ap(scores: list[float], relevant: list[bool]) -> float:
    """Average precision by hand: descending score, ties in position order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if relevant[i]:
            hits += 1
            total += hits / rank
    return total / hits if hits else math.nan


def test_the_store_recomputes_alignment_without_the_explained_position_with_its_controls(
        dm, tmp_path):
    options = dict(faithfulness_every=2, faithfulness_probes=3,
                   faithfulness_methods=("normxlogit", "random"),
                   alignment_methods=("input_x_gradient", "saliency", "integrated_gradients"))
    _fit(dm, tmp_path / "process", **options)  # faithfulness and gradients in the helper
    _fit(dm, tmp_path / "thread", writer="thread", **options)  # ... on the training thread
    run = load_run(tmp_path / "process" / "store")
    tokens = run.tokens[run.tokens.layer == run.tokens.layer.max()]
    probes = run.probes.set_index(["step", "probe_id"])
    for (step, probe_id), rows in tokens.groupby(["step", "probe_id"]):
        explained = int(rows.position[rows.is_explained].iloc[0])
        rows = rows[(rows.position < explained) & ~rows.is_special].sort_values("position")
        row = probes.loc[(step, probe_id)]
        assert _ap(rows.score.tolist(), rows.is_cue.tolist()) == pytest.approx(
            row.ap, nan_ok=True)
        assert _ap((rows.norm * rows.contrast).tolist(), rows.is_cue.tolist()) == pytest.approx(
            row.ap_contrast, rel=1e-5, nan_ok=True)
        cue, attractor = rows.score[rows.is_cue].max(), rows.score[rows.is_attractor].max()
        expected = math.nan if math.isnan(cue) or math.isnan(attractor) else float(
            cue > attractor) + 0.5 * (cue == attractor)
        assert row.cue_over_attractor == pytest.approx(expected, nan_ok=True)
    metrics = run.metrics.set_index(["step", "key"])
    last = int(run.metrics.step.max())
    for step in run.steps:  # the logged mean is the mean of the per-probe column
        assert metrics.loc[(step, "alignment/ap"), "value"] == pytest.approx(
            run.probes[run.probes.step == step].ap.mean())
    assert 0 < probes.cue_over_attractor.notna().sum() < len(probes)  # sv-pp: attractor at t
    keys = ["alignment/ap", "alignment/ap_vs_random", "alignment/ap_contrast",
            "alignment/ap_contrast_vs_random", "alignment/cue_over_attractor",
            "alignment/cue_over_attractor_vs_random", "alignment/ap_vs_reference",
            "alignment/input_x_gradient/ap", "alignment/input_x_gradient/ap_vs_random",
            "alignment/integrated_gradients/ap", "alignment/saliency/ap",
            "embedding/norm_infogain_spearman", "embedding/norm_logfreq_spearman"]
    for key in keys:
        low, value, high = metrics.loc[(last, key), ["low", "value", "high"]]
        assert low <= value <= high and math.isfinite(high), key
    assert metrics.loc[(last, "alignment/input_x_gradient/seconds"), "value"] > 0
    depth = run.probes[run.probes.step == last].prediction_depth
    assert metrics.loc[(last, "probe/prediction_depth_never"), "value"] == depth.isna().sum()
    assert metrics.loc[(0, "alignment/ap_vs_reference"), "value"] == 0  # step 0 is the reference
    assert metrics.loc[(last, "embedding/infogain_types"), "value"] >= 3
    assert metrics.loc[(last, "embedding/unseen_tokens"), "value"] > 0
    # Gradient APs at the faithfulness steps only, the same in the helper and on the thread.
    grad = run.probes.dropna(subset=["ap_input_x_gradient"])
    assert sorted(grad.step.unique()) == [0, 2, 4]
    other = load_run(tmp_path / "thread" / "store").probes.dropna(subset=["ap_input_x_gradient"])
    np.testing.assert_allclose(grad.ap_input_x_gradient, other.ap_input_x_gradient, rtol=1e-5)
    assert run.embedding.infogain.notna().sum() >= 3
