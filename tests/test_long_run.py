"""Long runs and large vocabularies: benchmarks/long_run.py's command line, shortened for CI.

- 60 snapshots in a row (one per training step, TensorBoard and the store): memory after
  warm-up, open file descriptors and threads do not grow; the store loads whole.
- A 256k vocabulary whose full logits for the probe set would take 12.6 GB: probe
  micro-batching keeps the peak of `normxlogit(layers="all")` to tens of MB.

RELIABILITY.md has the full-size numbers (500 snapshots; 256 probes, 100.7 GB of logits).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def run_benchmark(tmp_path: Path, *args: str) -> dict:
    """The benchmark's command line in a fresh process (one torch thread); its JSON output."""
    out = tmp_path / "long_run.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "long_run.py"), *args,
                           "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_sixty_snapshots_keep_memory_fds_and_threads_flat(tmp_path):
    # Media and faithfulness off to fit the CI budget (heatmap rendering is most of a
    # snapshot's cost); the 500-snapshot benchmark in RELIABILITY.md runs the defaults.
    result = run_benchmark(tmp_path, "--snapshots", "60", "--media-probes", "0",
                           "--faithfulness-every", "0", "--sample-every", "10",
                           "--root", str(tmp_path / "run"))["long_run"]
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


def test_probe_micro_batching_bounds_peak_memory_with_a_large_vocabulary(tmp_path):
    out = run_benchmark(tmp_path, "--large-vocab", "--vocab", "256000", "--probes", "32",
                        "--length", "128", "--batch-size", "8")["large_vocab"]
    if out["peak_delta_mb"] is None:
        pytest.skip("/proc/self/clear_refs is not writable here: peak memory not measurable")
    assert out["full_logits_gb"] == 12.6  # what materialising every logit would take
    assert out["finite"]
    # Observed ~20 MB: per batch, 3 layers of (8, 128, 64) states and (8, 256k) logits at
    # the explained positions only.
    assert out["peak_delta_mb"] < 150, out
