"""`helper`: what crosses the pipe to the helper process and back (`dumps`, read with plain
`pickle.loads` as the helper reads it).

Checks that a measured `Snapshot` (attribution, norms, counts, faithfulness rows) and a
`Written` reply (metrics with NaN, media holding arrays and frames) come back whole, with
every tensor's dtype, shape and values, and that the snapshot's tensors travel as NumPy
arrays (smaller than torch's own pickling). The helper process itself, forked for the
callback's runs, is tested in test_pipeline.py and test_faults.py; every tensor kind in
test_pipeline.py::test_tensors_reach_the_helper_with_their_dtype_shape_and_values.
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pandas as pd
import torch

from normx_callbacks.helper import HelperDied, dumps
from normx_callbacks.writer import Written


def test_a_measured_snapshot_crosses_the_pipe_whole(measurement, dm):
    snap = measurement.take(4, final=True, faith_due=False)
    snap.counts = torch.arange(len(dm.tokenizer), dtype=torch.long)
    snap.faithfulness = [pd.DataFrame({"probe_id": ["a", "b"], "aopc": [0.5, float("nan")]})]
    data = dumps(snap)
    back = pickle.loads(data)
    assert (back.step, back.final, back.error) == (4, True, None)
    pd.testing.assert_frame_equal(back.faithfulness[0], snap.faithfulness[0])
    for name in ("norms", "counts"):
        assert getattr(back, name).dtype == getattr(snap, name).dtype
        assert torch.equal(getattr(back, name), getattr(snap, name)), name
    for field in dataclasses.fields(snap.attribution):
        sent, got = getattr(snap.attribution, field.name), getattr(back.attribution, field.name)
        if isinstance(sent, torch.Tensor):
            assert got.dtype == sent.dtype and got.shape == sent.shape, field.name
            torch.testing.assert_close(got, sent, rtol=0, atol=0, equal_nan=True)
        else:
            assert got == sent, field.name
    # As NumPy arrays: far smaller than torch's own reduction of each storage.
    assert len(data) < len(pickle.dumps(snap, pickle.HIGHEST_PROTOCOL))


def test_the_writers_reply_crosses_back_whole():
    media = [("scalars", None, {"normx/probe/target_prob": 0.25}),
             ("histogram", "normx/embedding/norms", np.linspace(0, 1, 5, dtype=np.float32)),
             ("table", "normx/embedding/top", pd.DataFrame({"token": ["<b>"], "norm": [1.5]}))]
    written = Written(7, {"a": 1.0, "b": float("nan")}, media, None, [5, 6], {3: "disk full"})
    back = pickle.loads(dumps(written))
    assert (back.step, back.failed, back.held, back.lost) == (7, None, [5, 6], {3: "disk full"})
    assert back.metrics["a"] == 1.0 and math.isnan(back.metrics["b"])
    assert back.media[0] == media[0]
    np.testing.assert_array_equal(back.media[1][2], media[1][2])
    assert back.media[1][2].dtype == np.float32
    pd.testing.assert_frame_equal(back.media[2][2], media[2][2])


def test_a_dead_helper_is_a_runtime_error_the_engine_catches():
    assert issubclass(HelperDied, RuntimeError)
    error = pickle.loads(dumps(HelperDied("gone")))  # errors cross the pipe too
    assert isinstance(error, HelperDied) and str(error) == "gone"
