"""`report`: the data a report shows and the page `write_report` writes, on the session's
`tiny_run` (a 20-step run with TensorBoard logs).

Checks that `headline_table` has one row per snapshot with the stored values (NaN where a
metric was not recorded, also for a store without a metrics table), that the loss curves
come from the TensorBoard folder next to the store (a note when there is none), which
probes `select_probes` picks, and that `write_report` writes the page atomically with every
section, the probes' text escaped, progress counted to its total, and refuses what it
cannot report on. (test_report_browser.py renders the page in Chromium.)
"""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
from conftest import MARKUP_PROBE

from normx_callbacks.loading import load_run
from normx_callbacks.report import (
    HEADLINE,
    SECTIONS,
    headline_table,
    read_losses,
    render_report,
    select_probes,
    tensorboard_folders,
    write_report,
)
from normx_callbacks.store import SnapshotStore

STEPS = [0, 1, 2, 4, 8, 16, 20]  # every_n_steps=8 up to max_steps=20, the last one final


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


def test_headline_table_has_one_row_per_snapshot_with_the_stored_values(run):
    table = headline_table(run)
    assert list(table.columns) == ["step", *HEADLINE]
    assert table["step"].tolist() == run.steps == STEPS
    metrics = run["metrics"]
    for name in ("target_prob", "accuracy", "ap", "dp_z"):
        stored = metrics[metrics.key == HEADLINE[name]].set_index("step")["value"]
        assert table.set_index("step")[name].to_dict() == stored.to_dict(), name
    # The gradient reference runs at the faithfulness cadence only: NaN at the other steps.
    recorded = set(metrics[metrics.key == HEADLINE["ap_input_x_gradient"]].step)
    assert recorded and recorded < set(STEPS)
    for step, value in zip(table.step, table.ap_input_x_gradient, strict=True):
        assert math.isnan(value) == (step not in recorded), step
    # Stability needs a previous snapshot.
    assert math.isnan(table.stability[0]) and not table.stability[1:].isna().any()


def test_headline_table_of_a_store_without_metrics_lists_its_steps(tmp_path):
    store = SnapshotStore(tmp_path)
    for step in (0, 3):
        store.write(step, {"tokens": pd.DataFrame({"probe_id": ["p"], "score": [1.0]})})
    table = headline_table(load_run(tmp_path))
    assert table["step"].tolist() == [0, 3]
    assert list(table.columns) == ["step", *HEADLINE] and table[list(HEADLINE)].isna().all().all()


def test_the_loss_comes_from_the_tensorboard_folder_next_to_the_store(run, tmp_path):
    assert tensorboard_folders(run) == [run.path.parent]
    series, missing = read_losses(run)
    assert missing is None and list(series) == ["train/loss"]
    steps, values = series["train/loss"]
    assert steps == sorted(steps) and steps[-1] == 19 and len(steps) == len(values)
    assert all(math.isfinite(v) and v > 0 for v in values)
    # A copy of the store alone: no event files beside it, so a note instead of a curve.
    alone = tmp_path / "copy" / "normx"
    shutil.copytree(run.path, alone)
    copy = load_run(alone)
    assert tensorboard_folders(copy) == []
    assert read_losses(copy) == ({}, f"no TensorBoard event files next to the store (in "
                                     f"{alone.parent}): loss not shown")


def test_select_probes_takes_the_wanted_ones_else_the_first_up_to_the_maximum(run):
    ids = list(dict.fromkeys(run["probes"]["probe_id"]))
    assert ids[0] == MARKUP_PROBE["id"] and len(ids) == 5
    assert select_probes([run], 3) == ids[:3]
    assert select_probes([run, run], 12) == ids
    assert select_probes([run], 0) == []
    assert select_probes([run], 1, wanted=[ids[2], ids[2], ids[1]]) == [ids[2], ids[1]]
    with pytest.raises(ValueError, match=r"probe 'nope' is in none of the runs; probes: "
                                         r"\['markup', "):
        select_probes([run], 3, wanted=["nope"])


def test_write_report_writes_every_section_with_the_probe_text_escaped(run, tmp_path):
    progress = []
    out = write_report([run], tmp_path / "out" / "report.html", max_probes=1,
                       progress=lambda done, total, what: progress.append((done, total)))
    assert out == tmp_path / "out" / "report.html"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temp file
    html = out.read_text(encoding="utf-8")
    for key, title in SECTIONS.items():
        assert f'<section id="{key}"><h2>{title}</h2>' in html, key
    assert "Showing 1 of 5 probes" in html
    assert '<article class="probe" id="probe-0"><h3>markup</h3>' in html
    assert "the &lt;b&gt;bold&lt;/b&gt; key near the cabinets" in html
    assert "<b>bold</b>" not in html and "<script" not in html
    assert html.count("data:image/png;base64,") >= 6  # loss, predictions, alignment, ...
    dones = [d for d, _ in progress]
    assert dones == sorted(dones) and progress[-1][0] == progress[-1][1]


def test_the_report_refuses_what_it_cannot_show(run, tmp_path):
    with pytest.raises(ValueError, match="render_report needs at least one run"):
        render_report([])
    with pytest.raises(ValueError, match=r"max_probes=-1 must be >= 0"):
        render_report([run], max_probes=-1)
    empty = tmp_path / "empty"
    SnapshotStore(empty).mark_missing(0, "the probe forward failed")
    with pytest.raises(ValueError, match=r"empty has no committed snapshots to report on"):
        write_report([empty], tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()
