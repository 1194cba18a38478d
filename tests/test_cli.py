"""The `normx` command on a real tiny run: every subcommand, and every error as one line.

The run (20 steps of a 2-layer, 32-wide GPT-2 on the agreement corpus, with a probe whose
text holds HTML markup) is conftest.py's `tiny_run`, trained once per session. How checkpoints
load, and each way they fail, is tests/test_checkpoints.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from normx_callbacks import load_run
from normx_callbacks.checkpoints import load_model_and_tokenizer
from normx_callbacks.cli import main
from normx_callbacks.model_commands import colour_tokens
from normx_callbacks.report import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- subcommands


@pytest.mark.parametrize("command", ["report", "summary", "attribute", "export"])
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: normx {command}") and "--debug" in out


def test_no_subcommand_prints_help(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "report" in err and "attribute" in err


def test_summary_lists_every_snapshot_and_headline_metrics(tiny_run, capsys):
    code, out, err = run_cli(capsys, "summary", tiny_run)
    assert code == 0, err
    steps = load_run(tiny_run).steps
    assert steps == [0, 1, 2, 4, 8, 16, 20]
    header = next(line for line in out.splitlines() if line.strip().startswith("step"))
    for column in ("target_prob", "accuracy", "ap", "ap_random", "dp_raw", "dp_z", "stability",
                   "norm_logfreq_spearman", "ap_contrast", "cue_over_attractor",
                   "prediction_depth", "norm_infogain_spearman"):
        assert column in header.split()
    below = out.splitlines()[out.splitlines().index(header) + 1:]
    table = below[:below.index("")]  # the headline table ends at the first blank line
    rows = [line.split()[0] for line in table if line.split()[0].isdigit()]
    assert [int(s) for s in rows] == steps
    assert "GPT2LMHeadModel" in out and "5 probes" in out
    assert "paired tests over probes" in out and "cue AP - random" in out


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_export_writes_one_readable_file_per_table(fmt, tiny_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", tiny_run, "--format", fmt, "-o", tmp_path / "out")
    assert code == 0, err
    run = load_run(tiny_run)
    for name, table in run.tables.items():
        path = tmp_path / "out" / f"{name}.{fmt}"
        assert path.is_file(), out
        if fmt == "csv":
            back = pd.read_csv(path)
        elif fmt == "parquet":
            back = pd.read_parquet(path)
        else:
            back = pd.read_json(path, lines=True)
        assert len(back) == len(table)
        assert list(back.columns) == list(table.columns)
        assert back["step"].tolist() == table["step"].tolist()
    tokens = pd.read_parquet(tmp_path / "out" / f"tokens.{fmt}") if fmt == "parquet" else None
    if tokens is not None:
        assert "<" in set(tokens["token"])  # markup survives as data
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["run_meta"]["model"] == "GPT2LMHeadModel"


def test_report_of_two_runs_side_by_side(tiny_run, tmp_path, capsys):
    other = tmp_path / "other" / "version_1"
    shutil.copytree(load_run(tiny_run).path, other / "normx")
    out_file = tmp_path / "both.html"
    code, out, err = run_cli(capsys, "report", tiny_run, other, "-o", out_file,
                             "--max-probes", "2", "--step", "8")
    assert code == 0, err
    assert "normx report:" in err  # progress goes to stderr
    text = out_file.read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in text
    assert "repeat(2,minmax(0,1fr))" in text  # one column per run
    assert "other/version_1" in text
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert text.count('id="probe-') == 2
    assert "the layer views below use step 8" in text


def test_attribute_prints_plain_scores_when_not_a_tty(tiny_ckpt, capsys):
    code, out, err = run_cli(capsys, "attribute", tiny_ckpt, "--text", "the keys near the cabinet",
                             "--target", "are", "--foil", "is", "--layers", "all")
    assert code == 0, err
    assert "\x1b[" not in out  # captured output is not a terminal
    assert "' keys'" in out and "' cabinet'" in out and "<- explained" in out
    assert "target ' are'" in out and "foil ' is'" in out
    assert "layer 0" in out and "layer 2 (last)" in out


def test_colour_tokens_are_zero_centred_and_escape_control_characters():
    line = colour_tokens(["up", "zero", "down", "\x1b[31mevil"], [1.0, 0.0, -1.0, 0.5], 1.0)
    assert "\x1b[48;2;214;39;40m" in line  # +bound: full red
    assert "\x1b[48;2;255;255;255m" in line  # 0: white
    assert "\x1b[48;2;31;119;180m" in line  # -bound: full blue
    assert "\x1b[31m" not in line and "\\x1b[31mevil" in line


def test_attribute_writes_escaped_html(tiny_ckpt, tmp_path, capsys):
    out_file = tmp_path / "attr.html"
    code, out, err = run_cli(capsys, "attribute", tiny_ckpt, "--text", "the <b>bold</b> key near the",
                             "--layers", "all", "-o", out_file)
    assert code == 0, err
    text = out_file.read_text()
    assert "the &lt;b&gt;bold&lt;/b&gt; key near the" in text
    assert "<b>bold</b>" not in text
    assert "data:image/png;base64," in text


def test_attribute_reads_a_hugging_face_directory(tiny_ckpt, tmp_path, capsys):
    model, tokenizer = load_model_and_tokenizer(tiny_ckpt)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    code, out, err = run_cli(capsys, "attribute", tmp_path / "hf", "--text", "the keys near",
                             "--no-color")
    assert code == 0, err
    assert "GPT2LMHeadModel" in out and "' near'" in out
    code, _, err = run_cli(capsys, "attribute", tmp_path / "hf", "--text", "the", "--layers", "9")
    assert_one_line_error(code, err, "valid indices are 0..2")  # no loading bars around it


# --------------------------------------------------------------------------- errors


def test_not_a_run_directory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "summary", tmp_path)
    assert_one_line_error(code, err, "not a normx run directory")


def test_empty_store_directory(tmp_path, capsys):
    (tmp_path / "normx").mkdir()
    code, _, err = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "r.html")
    assert_one_line_error(code, err, "empty store")
    assert not (tmp_path / "r.html").exists()


def test_half_written_store(tiny_run, tmp_path, capsys):
    source = load_run(tiny_run).path / "tokens" / "step=000000000.parquet"
    (tmp_path / "normx" / "tokens").mkdir(parents=True)
    shutil.copy(source, tmp_path / "normx" / "tokens")
    for command in (["summary", tmp_path], ["export", tmp_path, "-o", tmp_path / "x"]):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, "half-written store", "commit marker")


def test_which_run_lists_the_ten_written_last_and_counts_the_others(tmp_path, capsys):
    """12 stores: one line naming the 10 written last (newest first) and how to pick."""
    from normx_callbacks import SnapshotStore
    from normx_callbacks.store import write_run_record

    for i in range(12):
        root = tmp_path / f"exp{i:02d}" / "normx"
        write_run_record(root, {"run_id": f"{i:02d}" + "ab" * 15})
        SnapshotStore(root).write(i, {"metrics": pd.DataFrame({"key": ["a"], "value": [1.0]})})
        os.utime(root / "_commits", (1_000_000 + i, 1_000_000 + i))  # exp11 written last
    code, _, err = run_cli(capsys, "summary", tmp_path)
    assert_one_line_error(code, err, f"{tmp_path} holds 12 normx stores, one run each: the 10 "
                          "written last: (1) run 11abab", "; and 2 more, not listed; choose one: "
                          "`normx ... --run ID`", "'latest' (the run written last)")
    listed = [f"exp{i:02d}/normx" for i in range(12) if f"exp{i:02d}/normx" in err]
    assert listed == [f"exp{i:02d}/normx" for i in range(2, 12)]
    code, _, err = run_cli(capsys, "summary", tmp_path, "--run", "nope")
    assert_one_line_error(code, err, "run 'nope' matches no run; the runs are: the 10 written "
                          "last: (1) run 11abab", "; and 2 more, not listed; pass a full run id")
    code, out, err = run_cli(capsys, "summary", tmp_path, "--run", "latest")
    assert code == 0, err
    assert f"store:     {tmp_path / 'exp11' / 'normx'}" in out


def test_skip_corrupt_leaves_out_bad_snapshots_with_one_warning_line_each(tiny_run, tmp_path,
                                                                        capsys, caplog):
    """summary, export and report read a store with an unreadable and a missing table file
    when asked to; without --skip-corrupt the one error line names the option."""
    store = tmp_path / "run" / "normx"
    shutil.copytree(load_run(tiny_run).path, store)
    (store / "metrics" / "step=000000008.parquet").write_bytes(b"not parquet")
    (store / "tokens" / "step=000000016.parquet").unlink()
    code, _, err = run_cli(capsys, "summary", store.parent)
    assert_one_line_error(code, err, "metrics/step=000000008.parquet is missing or unreadable",
                          "`normx ... --skip-corrupt` on the command line")
    proc = subprocess.run([sys.executable, "-m", "normx_callbacks.cli", "summary",
                           str(store.parent), "--skip-corrupt"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 2, proc.stderr
    assert warnings[0].startswith(f"normx: WARNING: skipping step 8: table file {store}/metrics/"
                                  "step=000000008.parquet is missing or unreadable")
    assert warnings[1].startswith(f"normx: WARNING: skipping step 16: table file {store}/tokens/"
                                  "step=000000016.parquet is missing or unreadable")
    assert "snapshots: 5 (steps 0..20)" in proc.stdout
    code, _, err = run_cli(capsys, "export", store.parent, "--skip-corrupt", "-o", tmp_path / "x")
    assert code == 0, err
    assert sorted(set(pd.read_csv(tmp_path / "x" / "tokens.csv")["step"])) == [0, 1, 2, 4, 20]
    caplog.clear()
    code, _, err = run_cli(capsys, "report", store.parent, "--skip-corrupt", "-q",
                           "--max-probes", "1", "-o", tmp_path / "r.html")
    assert code == 0, err
    assert [r.getMessage().split(":")[0] for r in caplog.records
            if r.name == "normx_callbacks.loading"] == ["skipping step 8", "skipping step 16"]
    for step in (8, 16):
        (store / "_commits" / f"step={step:09d}.json").unlink()
    for step in (0, 1, 2, 4, 20):
        (store / "metrics" / f"step={step:09d}.parquet").write_bytes(b"")
    code, _, err = run_cli(capsys, "summary", store.parent, "--skip-corrupt")
    assert_one_line_error(code, err, f"every snapshot in {store} is corrupt and was skipped")


def test_bad_arguments_are_one_line(tiny_ckpt, tiny_run, tmp_path, capsys):
    cases = [
        (["attribute", tiny_ckpt, "--text", "the", "--foil", "is"], "needs --target"),
        (["attribute", tiny_ckpt, "--text", "the", "--layers", "9"], "valid indices are 0..2"),
        (["report", tiny_run, "--probe", "nope", "-o", tmp_path / "r.html"], "'nope'"),
        (["report", tiny_run, "--max-probes", "-1", "-o", tmp_path / "r.html"], "--max-probes"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, needle)


def test_debug_shows_the_traceback(tmp_path):
    from normx_callbacks import StoreError

    with pytest.raises(StoreError):
        main(["--debug", "summary", str(tmp_path)])
    with pytest.raises(StoreError):
        main(["summary", "--debug", str(tmp_path)])


def test_library_warnings_are_shown_once_each_on_one_line(tiny_ckpt, tmp_path, capsys):
    probes = tmp_path / "multi.jsonl"
    probes.write_text("".join(json.dumps({"id": name, "text": text, "target": "cabinetry",
                                          "foil": foil}) + "\n"
                              for name, text, foil in (("a", "the keys near the", "is"),
                                                       ("b", "the key near the", "are"))))
    code, out, err = run_cli(capsys, "faithfulness", tiny_ckpt, "--probes", probes,
                             "--methods", "normxlogit,random")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("normx: warning:")]
    assert len(lines) == 1, err  # one warning, on one line
    assert lines[0].startswith("normx: warning: 2 probe(s) have a target or foil of several "
                               "tokens: a (target 'cabinetry' -> [' cabinet', 'r', 'y']")
    assert "normxlogit" in out and "random" in out


def test_an_error_that_is_not_about_the_input_keeps_its_traceback(tiny_run, capsys,
                                                                 monkeypatch):
    """A bug (here a numpy ValueError inside the summary) is not passed off as a message
    about the input: traceback, exit status 2."""
    import numpy as np

    from normx_callbacks import summary

    def broken(run):
        return np.zeros(2).reshape(3)

    monkeypatch.setattr(summary, "summary_paragraph", broken)
    code, _, err = run_cli(capsys, "summary", tiny_run)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "cannot reshape array" in err
    assert err.strip().splitlines()[-1] == ("normx summary: internal error (ValueError); the "
                                            "traceback above is what a bug report needs")


def test_real_process_exit_code_and_stderr(tiny_ckpt, tmp_path):
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(tiny_ckpt.read_bytes()[:1000])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "normx_callbacks.cli", "attribute", str(bad),
                           "--text", "the"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 1
    assert_one_line_error(proc.returncode, proc.stderr, "truncated")


def test_report_of_a_store_without_probe_tables(tmp_path, capsys):
    from normx_callbacks import SnapshotStore

    store = SnapshotStore(tmp_path / "normx")
    for step in (0, 10):
        store.write(step, {"metrics": pd.DataFrame({"key": ["probe/target_prob"],
                                                    "value": [0.1 + step / 100]})})
    code, out, err = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "r.html", "-q")
    assert code == 0, err
    text = (tmp_path / "r.html").read_text()
    assert "no &#x27;embedding&#x27; table" in text and "no TensorBoard event files" in text
    code, out, err = run_cli(capsys, "summary", tmp_path)
    assert code == 0 and "0.200" in out


def test_faithfulness_table_for_a_checkpoint(tiny_ckpt, tmp_path, capsys):
    csv, md = tmp_path / "t.csv", tmp_path / "t.md"
    code, out, err = run_cli(capsys, "faithfulness", tiny_ckpt, "--num-probes", "6", "--methods",
                             "normxlogit,random,integrated_gradients", "--n-steps", "4",
                             "-o", csv, "-o", md)
    assert code == 0, err
    table = pd.read_csv(csv)
    assert list(table.method) == ["normxlogit", "random", "integrated_gradients"]
    for column in ("comprehensiveness", "sufficiency"):
        assert table[column].between(-1, 1).all()
    assert (table.seconds_per_instance > 0).all()
    assert (table.n_instances == 6).all()
    assert md.read_text().startswith("| method | comprehensiveness |")
    assert "integrated_gradients" in out
    # The removal used is recorded in the table and said on the terminal.
    assert set(table.replacement) == {"eos"} and set(table.replacement_token) == {"<|endoftext|>"}
    assert (table.removal == "nearest").all() and (table.degenerate_cells == 0).all()
    assert "removal: eos token '<|endoftext|>'" in err


def test_faithfulness_rejects_an_unknown_method(tiny_ckpt, capsys):
    code, _, err = run_cli(capsys, "faithfulness", tiny_ckpt, "--num-probes", "2", "--methods",
                           "normxlogit,lime")
    assert_one_line_error(code, err, "lime", "valid names")
