"""Every script in benchmarks/ runs at its smallest size and reports finite numbers (#24).

Nothing in the package imports a benchmark script, so nothing else notices when one reads a
metric key the store no longer writes (ddp_probes.py read `snapshot/seconds` and printed
NaN) or passes an option that was renamed. The tests here run each script at its smallest
size through its `main(argv)`, in this process where the script does not start processes of
its own (a process that imports lightning costs 5-8 s of CPU), and check what it printed and
the JSON it wrote with `--out`: the numbers it reports are there and finite. At these sizes
the numbers themselves mean nothing.

- floor.py, scaling.py, compare.py (timing in one run; memory, one fresh process per
  method, in another), emergence.py (`--smoke`), replay.py and long_run.py's part 1 (its
  part 2, in the fresh process it starts, is tests/test_long_run.py's second test).
- ddp_probes.py, overhead.py and memory.py run each arm as a training process of its own
  (on 2 cores about 25 s, 18 s and 60 s at their smallest, more than the suite's 5-minute
  budget leaves): end to end they are the `end_to_end` tests, run by `make benchmark-smoke`
  and left out of `make test`. In `make test` the part of each that a renamed key or option
  breaks runs: ddp_probes.py's one-process run and the store keys it reads, overhead.py's
  timed fit of the "with" arm and the costs it reads from the store, and every training
  command memory.py builds, parsed by train.py's own parser.
- Every script in benchmarks/ but harness.py has a test here, and each imports harness.py.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# The script's arms are training processes of their own: end to end it takes longer than the
# suite's budget leaves, so `make test` deselects it and `make benchmark-smoke` runs it.
end_to_end = pytest.mark.end_to_end


# The scripts each test below covers; a new script without a test fails the last test.
COVERED = {"floor", "scaling", "compare", "emergence", "replay", "long_run", "ddp_probes",
           "overhead", "memory"}


def script(name: str):
    """benchmarks/<name>.py as a module (its `__file__` the script's, for the processes it
    starts), with benchmarks/ on sys.path for `import harness`."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(tmp_path, capsys):
    """Runs a script's `main(argv)` here with one thread and `--out`; returns (the JSON it
    wrote, what it printed). Logger levels a script sets are put back."""
    lightning_level = logging.getLogger("lightning.pytorch").level

    def go(name: str, *args: str) -> tuple[dict, str]:
        out = tmp_path / f"{name}.json"
        assert script(name).main([*args, "--threads", "1", "--out", str(out)]) == 0
        return json.loads(out.read_text()), capsys.readouterr().out

    yield go
    logging.getLogger("lightning.pytorch").setLevel(lightning_level)


def finite(*values) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def printed(pattern: str, text: str) -> float:
    """The number the first line matching ``pattern`` (one group) printed."""
    found = re.search(pattern, text)
    assert found, f"no line matches {pattern!r} in:\n{text[-3000:]}"
    return float(found.group(1))


def test_floor_reports_every_method_against_the_floor(run):
    """floor.py, both shapes: every method's ratio to the floor (the parts of nx-all and
    the naive lens included) is finite, and the printed worst nx-all ratio is the JSON's."""
    result, text = run("floor", "--quick", "--models", "gpt2", "llama", "--vocabs", "256",
                       "--lengths", "8", "--repeats", "1")
    rows = result["rows"]
    assert [(r["model"], r["vocab"], r["length"]) for r in rows] == [
        ("gpt2", 256, 8), ("llama", 256, 8)]
    methods = {"predict", "nx-last", "nx-all", "nx-fast", "nx-all-fast", "part:body",
               "part:head", "part:lens", "naive", "nx-all min/min", "nx-all/predict"}
    for r in rows:
        assert set(r["ratio"]) == methods and finite(*r["ratio"].values()), r["ratio"]
        assert finite(*r["ms"].values(), r["floor_jitter"])
    worst = printed(r"nx-all / floor: worst (\d+\.\d+)", text)
    assert worst == pytest.approx(max(r["ratio"]["nx-all"] for r in rows), abs=0.01)


def test_scaling_runs_every_sweep(run):
    """scaling.py: one point per sweep (length, vocabulary, depth, probes), each with finite
    ratios and time per token for its methods, and a table per sweep printed."""
    result, text = run("scaling", "--quick", "--width", "32", "--layers", "1",
                       "--lengths", "8", "--vocabs", "256", "--depths", "1", "--probes", "2",
                       "--tokens-per-call", "16", "--repeats", "1")
    module = script("scaling")
    rows = result["rows"]
    assert [(r["sweep"], r["value"]) for r in rows] == [
        ("length", 8), ("vocab", 256), ("depth", 1), ("probes", 2)]
    for r in rows:
        assert set(r["ratio"]) == set(module.METHODS[r["sweep"]])
        assert finite(*r["ratio"].values(), *r["us_per_token"].values())
    for sweep in module.SWEEPS:
        assert f"\n{sweep}:\n" in text


COMPARE_SIZE = ("--layers", "1", "--width", "32", "--vocab", "256", "--length", "8",
                "--probes", "2", "--batch-size", "2", "--repeats", "1")


def test_compare_times_every_method_against_normxlogit(run):
    """compare.py's timing (`--quick`): every method (the gradient ones where Captum is
    installed) has a finite time per instance and ratio to normxlogit, and the headline
    prints each gradient method's ratio."""
    result, text = run("compare", "--quick", *COMPARE_SIZE)
    module = script("compare")
    methods = [m for m in module.METHODS if module.HAVE_CAPTUM or m not in module.GRADIENT]
    res = result["results"]
    assert set(res["s_per_instance"]) == set(res["x_normxlogit"]) == set(methods)
    assert finite(*res["s_per_instance"].values(), *res["x_normxlogit"].values())
    assert "peak_timed_call" not in res  # --quick: timing only
    for m in (m for m in module.GRADIENT if m in methods):  # the headline, per method
        assert printed(rf"{m}\s+time / normxlogit\s+(\d+\.\d+)x", text) == pytest.approx(
            res["x_normxlogit"][m], abs=0.05)


def test_compare_measures_memory_and_the_largest_batch_in_a_fresh_process(run):
    """compare.py's memory (`--no-timing`), normxlogit only (each method's is a fresh
    process, about 6 s here, most of it imports): a finite peak of the timed call and of
    each one-pass size, and a largest batch that `slope-only` predicts from them without
    more processes."""
    module = script("compare")
    result, text = run("compare", "--no-timing", "--search", "slope-only", *COMPARE_SIZE,
                       "--skip", *(m for m in module.METHODS if m != "normxlogit"))
    res = result["results"]
    assert set(res["peak_timed_call"]) == set(res["largest_batch"]) == {"normxlogit"}
    batch = res["largest_batch"]["normxlogit"]
    assert finite(res["peak_timed_call"]["normxlogit"], *batch["trials"].values())
    assert batch["unverified"] and batch["batch"] >= 1, batch
    assert "s_per_instance" not in res  # --no-timing
    assert "| normxlogit |" in text


def test_emergence_smoke_measures_each_cost(run, cache_dir):
    """emergence.py --smoke: the forward, counting and folding rows, the per-interval sums,
    the gradient reference per method and the snapshot builder's time are all finite."""
    result, text = run("emergence", "--smoke", "--cache-dir", cache_dir)
    rows = result["rows"]
    assert [r[0].split()[0] for r in rows] == ["probe", "counting", "folding"]
    assert finite(*(float(x) for r in rows for x in r[1:]))
    assert finite(*result["interval_ms"].values(), result["build_seconds"])
    assert {"input_x_gradient", "saliency"} <= set(result["gradient_seconds"])
    assert finite(*result["gradient_seconds"].values())
    assert "Per snapshot interval of 100 steps" in text


def test_replay_is_timed_against_its_floor(run):
    """replay.py on 2 checkpoints: each arm's time per checkpoint and the ratios are finite,
    and the printed replay / floor ratio is the JSON's."""
    result, text = run("replay", "--checkpoints", "2", "--every", "1", "--rounds", "1",
                       "--probes", "4")
    assert set(result["ms_per_checkpoint"]) == {"floor", "reused", "replay"}
    assert finite(*result["ms_per_checkpoint"].values(), result["replay_over_floor"],
                  result["replay_over_reused"], result["reused_over_floor"])
    assert printed(r"median ratio replay / floor .*: (\d+\.\d+)", text) == pytest.approx(
        result["replay_over_floor"], abs=0.01)
    assert "checkpoints: 2 " in text


def test_long_run_samples_every_snapshot_of_a_run(run, tmp_path):
    """long_run.py part 1 with media and faithfulness on: every snapshot is stored and
    sampled, and the summary's memory, time and store figures are there. (Part 2, in the
    fresh process it starts, is tests/test_long_run.py's second test.)"""
    result, _ = run("long_run", "--snapshots", "3", "--media-probes", "1",
                    "--faithfulness-every", "2", "--sample-every", "1",
                    "--root", str(tmp_path / "run"))
    summary = result["summary"]
    assert summary["snapshots"] == 3 and summary["missing"] == 0
    assert [s["snapshot"] for s in result["long_run"]["samples"]] == [1, 2, 3]
    assert set(summary["rss_mb"]) == set(summary["fds"]) == {"1", "2", "3"}
    assert finite(*summary["rss_mb"].values(), summary["rss_growth_after_warmup_mb"],
                  summary["seconds_per_snapshot"], summary["load_run_seconds"])
    assert summary["store_files"] > 0 and summary["token_rows"] > 0
    assert "large_vocab" not in result


# ------------------------------------------------------------------ arms in processes


@end_to_end
def test_ddp_probes_compares_one_and_two_processes(run):
    """ddp_probes.py end to end: both runs stored their snapshots, and the medians of
    `snapshot/train_seconds` and `snapshot/worker_seconds` and the printed ratio are finite
    (they were NaN while it read `snapshot/seconds`)."""
    result, text = run("ddp_probes", "--probes", "4", "--steps", "2")
    r = result["result"]
    assert r["snapshots"] == {"1": 2, "2": 2}  # steps 1 and 2 (0 is left out)
    keys = [f"median_{k}_{n}" for k in ("train_seconds", "worker_seconds")
            for n in ("1_process", "2_processes")]
    assert finite(*(r[k] for k in keys), r["ratio_2_over_1"]), r
    assert f'"ratio_2_over_1": {r["ratio_2_over_1"]}' in text


def test_ddp_probes_run_reads_the_training_thread_time_from_the_store(tmp_path, capsys):
    """The one-process run ddp_probes.py starts for its first arm, here: the store has a
    finite value of each key it reads for every snapshot after step 0."""
    module = script("ddp_probes")
    assert module.main(["--child", "--devices", "1", "--root", str(tmp_path),
                        "--cache", str(tmp_path / "cache"), "--probes", "4",
                        "--steps", "2"]) == 0
    seconds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(seconds) == set(module.KEYS)
    for key in module.KEYS:
        assert len(seconds[key]) == 2 and finite(*seconds[key]), (key, seconds)


@end_to_end
def test_overhead_compares_runs_with_and_without_the_callback(run, tmp_path):
    """overhead.py --smoke end to end: one round of both arms, a finite fit ratio (the one
    printed) and finite sums of the costs it reads from the store."""
    result, text = run("overhead", "--smoke", "--keep", str(tmp_path / "runs"))
    module = script("overhead")
    [round_] = result["rounds"]
    assert set(round_) == {"without", "with"}
    assert round_["with"]["snapshots"] == 3  # steps 0, 1 and the last
    s = result["summary"]["with"]
    assert finite(s["ratio_fit"], s["ratio_process"], s["fit_s"], s["fit_without_s"])
    assert finite(*(s[k] for k in module.COSTS)), s  # None: the store lacks the key
    assert printed(r"fit time with / without: (\d+\.\d+)", text) == pytest.approx(
        s["ratio_fit"], abs=0.001)


def test_overhead_arm_times_its_fit_and_reads_the_costs_from_the_store(tmp_path, capsys,
                                                                        monkeypatch):
    """The "with" arm overhead.py starts in a process, here: its fit is timed, and the sum
    of each cost it reads from the store is finite (None where the key is gone)."""
    module = script("overhead")
    monkeypatch.setattr(sys, "argv", ["overhead.py"])  # LightningCLI reads it too
    root = tmp_path / "01-with"
    assert module.main(["--child", "with", "--root", str(root), "--smoke", "--threads", "1",
                        "--max-steps", "2"]) == 0
    timed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert finite(timed["fit_s"]) and timed["fit_s"] > 0
    costs = module.store_costs(root)
    assert costs["snapshots"] == 3
    assert finite(*(costs[k] for k in module.COSTS)), costs


@end_to_end
def test_memory_compares_the_process_trees_fresh_and_resumed(run):
    """memory.py --smoke end to end: each of the four runs has a peak PSS (the "with" runs
    with the helper among the children), and the printed worst ratio is the JSON's."""
    result, text = run("memory", "--smoke")
    runs = result["results"]
    assert set(runs) == {f"{a}/{s}" for a in ("without", "with") for s in ("fresh", "resumed")}
    for arm, peak in runs.items():
        assert peak["total"] > 0 and peak["total"] == peak["main"] + peak["children"], arm
    assert runs["with/fresh"]["count"] >= 1  # the snapshot helper
    assert finite(result["worst"])
    assert printed(r"\(worst (\d+\.\d+)\)", text) == pytest.approx(result["worst"], abs=0.001)


def test_memory_training_commands_parse(tmp_path, monkeypatch):
    """Every `train.py fit` command memory.py builds (full size, --quick, --smoke; with and
    without the callback; fresh and resumed) is accepted by train.py's parser and means
    what memory.py wants: no option it passes is unknown. Nothing is instantiated."""
    module = script("memory")  # puts the checkout on sys.path (harness.py), for train.py
    import train
    from normx_callbacks.demo import LanguageModel, TextDataModule

    class ParseOnly(train.NormXCLI):
        def instantiate_classes(self):
            pass

        def _run_subcommand(self, subcommand):
            pass

    monkeypatch.chdir(ROOT)  # the commands name configs/ relative to the checkout
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI reads it too
    ckpt, parser = tmp_path / "step.ckpt", None
    for config, quick, smoke in (("gpt2-small.yaml", False, False), ("tiny.yaml", True, False),
                                 ("tiny.yaml", True, True)):
        for callback in (False, True):
            for resume in (None, ckpt):
                cmd = module.train_cmd(config, tmp_path, tmp_path / "cache", callback=callback,
                                       steps=2, ckpt=resume, quick=quick, smoke=smoke)
                assert cmd[:3] == [sys.executable, "train.py", "fit"]
                if parser is None:  # built once (a second of CPU each)
                    parser = ParseOnly(LanguageModel, TextDataModule, args=cmd[2:],
                                       parser_class=train.OneLineParser).parser
                fit = parser.parse_args(cmd[2:]).fit
                assert fit.trainer.max_steps == 2
                assert (fit.ckpt_path is not None) == (resume is not None)
                assert bool(fit.trainer.callbacks) == callback, cmd


def test_every_benchmark_script_is_run_here_and_imports_the_harness():
    """Each script in benchmarks/ but harness.py has a test above, and imports harness.py
    (which is not run on its own: every test above goes through it)."""
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"harness"}
    assert scripts == COVERED, "add a test for each new script in benchmarks/"
    for name in sorted(scripts):
        tree = ast.parse((BENCH / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        assert "harness" in imported, f"{name}.py does not import harness.py"
