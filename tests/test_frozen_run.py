"""The numbers a run writes do not change unless a change means to change them.

`configs/tiny.yaml` through `train.py`, as `make demo` runs it, shrunk to 12 steps (every
snapshot kind: the log schedule, faithfulness, the gradient reference, media): its store's
tables must equal the frozen ones in `tests/data/frozen/` (every number except timings, to
1e-5 relative and 1e-6 absolute: the same float32 arithmetic, whose last bits can differ
between processes because a kernel's summation order follows the memory alignment of its
inputs; seen: 2.8e-8 on logits of about 0.01). A refactoring that changes a number fails.

To freeze a new reference after a change that is meant to change the numbers, run
`NORMX_FREEZE=1 .venv/bin/python -m pytest tests/test_frozen_run.py` and commit
`tests/data/frozen/` with the reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from launch import train_args

import train
from normx_callbacks import load_run

FROZEN = Path(__file__).parent / "data" / "frozen"
TABLES = ("tokens", "probes", "embedding", "metrics", "faithfulness")
STEPS = 12


def _comparable(run, name: str) -> pd.DataFrame:
    frame = run[name].copy()
    if name == "metrics":  # timings are not numbers a run computes
        frame = frame[~frame.key.str.contains("seconds")]
    frame = frame.drop(columns=[c for c in frame.columns if "seconds" in c], errors="ignore")
    keys = {"tokens": ["step", "probe_id", "layer", "position"], "probes": ["step", "probe_id"],
            "embedding": ["step", "token_id"], "metrics": ["step", "key"],
            "faithfulness": ["step", "method", "probe_id"]}[name]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def test_a_small_demo_run_writes_the_frozen_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI reads it
    cache = tmp_path / "cache"
    train.main(train_args("tiny.yaml", tmp_path, cache, steps=STEPS)
               + ["--trainer.callbacks.init_args.faithfulness_every", "2"])
    run = load_run(tmp_path)
    if os.environ.get("NORMX_FREEZE"):
        FROZEN.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            _comparable(run, name).to_parquet(FROZEN / f"{name}.parquet", index=False)
    assert run.steps == [0, 1, 2, 4, 8, STEPS]
    for name in TABLES:
        got, want = _comparable(run, name), pd.read_parquet(FROZEN / f"{name}.parquet")
        assert list(got.columns) == list(want.columns), name
        assert len(got) == len(want), name
        for column in want.columns:
            a, b = got[column], want[column]
            if pd.api.types.is_numeric_dtype(b) and not pd.api.types.is_bool_dtype(b):
                np.testing.assert_allclose(a.to_numpy(dtype=float), b.to_numpy(dtype=float),
                                           rtol=1e-5, atol=1e-6, equal_nan=True,
                                           err_msg=f"{name}.{column}")
            else:
                assert a.astype(str).tolist() == b.astype(str).tolist(), f"{name}.{column}"
