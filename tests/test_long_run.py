"""Long runs and large vocabularies: benchmarks/long_run.py, shortened for CI.

- 60 snapshots in a row (one per training step, TensorBoard and the store): memory after
  warm-up, open file descriptors and threads do not grow; the store loads whole.
- A 256k vocabulary whose full logits for the probe set would take 12.6 GB: probe
  micro-batching keeps the peak of `normxlogit(layers="all")` to tens of MB.

RELIABILITY.md has the full-size numbers (500 snapshots; 256 probes, 100.7 GB of logits).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def _load_bench():
    spec = importlib.util.spec_from_file_location("long_run", ROOT / "benchmarks" / "long_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("long_run", module)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sixty_snapshots_keep_memory_fds_and_threads_flat(tmp_path):
    # Media and faithfulness off to fit the CI budget (heatmap rendering is most of a
    # snapshot's cost); the 500-snapshot benchmark in RELIABILITY.md runs the defaults.
    result = bench.long_run(60, tmp_path, media_probes=0, faithfulness_every=None,
                            sample_every=10)
    assert result["snapshots"] == 60 and result["missing"] == 0
    samples = result["samples"]
    assert [s["snapshot"] for s in samples] == [1, 10, 20, 30, 40, 50, 60]
    after_warmup = samples[2:]  # snapshots 20..60
    growth = after_warmup[-1]["rss"] - after_warmup[0]["rss"]
    assert growth < 4 * MB, [round(s["rss"] / MB, 1) for s in samples]
    fds = {s["fds"] for s in after_warmup}
    assert max(fds) <= after_warmup[0]["fds"] + 1, fds  # +1: an event file flush in flight
    # Not growing (threads other tests left behind may end meanwhile).
    for key in ("threads", "os_threads"):
        series = [s[key] for s in samples[1:]]
        assert max(series) <= series[0] + 1 and series[-1] <= series[0], (key, series)
    assert result["load_run_seconds"] < 5


def test_probe_micro_batching_bounds_peak_memory_with_a_large_vocabulary():
    if not bench.reset_peak():
        pytest.skip("/proc/self/clear_refs is not writable here: peak memory not measurable")
    out = bench.large_vocab_peak(vocab=256_000, probes=32, length=128, batch_size=8)
    assert out["full_logits_gb"] == 12.6  # what materialising every logit would take
    assert out["finite"]
    # Observed ~20 MB: per batch, 3 layers of (8, 128, 64) states and (8, 256k) logits at
    # the explained positions only.
    assert out["peak_delta_mb"] < 150, out
