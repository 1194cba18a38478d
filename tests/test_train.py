"""train.py and every config: 3-step runs shrunk by command-line overrides."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import PROSE
from launch import train_args as _args

import train
from normx_callbacks import load_run
from normx_callbacks.demo import LanguageModel, TextDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    # LightningCLI(args=...) warns when pytest's own flags sit in sys.argv.
    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "ddp-cpu.yaml"])
# The docs probes include a multi-token target: the callback's warning about it is expected.
@pytest.mark.filterwarnings("ignore:.*have a target or foil of several tokens")
def test_config_runs_three_steps(config, tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train.main(_args(config, tmp_path, cache))
    if "wandb" in config:
        import wandb

        wandb.finish()
    run = load_run(tmp_path)
    assert run.steps == [0, 1, 2, 3]
    assert set(run.tables) >= {"tokens", "probes", "embedding", "metrics"}
    assert run.probes.probe_id.nunique() == 4
    err = capsys.readouterr().err
    assert "snapshots:" in err and "Run finished:" in err
    assert "NormXLogitCallback is not attached" not in err  # the config's callback is there
    # Headline numbers and the next commands for the logger actually used.
    assert "Next:" in err
    if config not in PROSE:  # the agreement probes have cue words and foils
        assert "cue AP:" in err and "probe accuracy:" in err
    if config == "tiny.yaml":  # no empty hp_metric card ahead of the normx ones
        from tensorboard.backend.event_processing import event_accumulator as ea

        acc = ea.EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
        acc.Reload()
        assert "normx/alignment/ap" in acc.Tags()["scalars"]
        assert "hp_metric" not in acc.Tags()["scalars"]
        # train.py's checkpoint (LightningCLI adds `_instantiator` to its hyper-parameters)
        # replays, to the numbers the callback recorded at its step.
        import torch

        from normx_callbacks.demo import TextDataModule
        from normx_callbacks.replay import replay

        ckpt = next(tmp_path.rglob("*.ckpt"))
        hints = torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]
        data = TextDataModule(**{k: v for k, v in hints.items() if k != "_instantiator"})
        data.setup("fit")
        (step,) = replay([ckpt], probes=data.probes, store_dir=tmp_path / "replayed",
                         progress=False)
        assert step in run.steps
        replayed = load_run(tmp_path / "replayed")
        got = replayed["tokens"].score.to_numpy()
        want = run["tokens"][run["tokens"].step == step].score.to_numpy()
        assert len(got) == len(want) > 0 and abs(got - want).max() <= 1e-5
    if "wandb" in config:
        assert " sync " in err and "tensorboard" not in err
    else:
        assert "tensorboard --logdir" in err or "make dashboard" in err


def test_one_callback_on_the_command_line_replaces_the_list_and_says_so(tmp_path, cache,
                                                                       capsys):
    """Lightning takes one callback as well as a list; `=` replaces the config's list (which
    attached NormXLogitCallback), and one line says so."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    train.main(_args("tiny.yaml", tmp_path, cache)
               + ["--trainer.callbacks=lightning.pytorch.callbacks.LearningRateMonitor"])
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == [f"train.py: note: --trainer.callbacks replaced the callbacks of "
                     f"{ROOT / 'configs' / 'tiny.yaml'}, so NormXLogitCallback is not attached "
                     "and this run takes no snapshots; use --trainer.callbacks+=CLASS to add a "
                     "callback to the config's"], err
    assert "Run finished:" in err and "snapshots:" not in err
    assert not list(tmp_path.rglob("_commits"))  # no store: the callback was not attached
    acc = ea.EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    acc.Reload()
    assert any(tag.startswith("lr-") for tag in acc.Tags()["scalars"])  # the one given ran


def test_mlm_objective_trains_a_masked_model(tmp_path, cache):
    train.main(_args("mlm-tiny.yaml", tmp_path, cache, steps=2))
    run = load_run(tmp_path)
    probes = run.probes
    assert (probes.target_given).all()
    # The explained position is the <mask> token of each probe.
    explained = run.tokens[run.tokens.is_explained & (run.tokens.step == 0)]
    assert set(explained.token.str.strip()) == {"<mask>"}


def test_mismatched_objective_is_refused(tmp_path, cache):
    args = _args("tiny.yaml", tmp_path, cache) + ["--data.objective", "masked"]
    with pytest.raises(SystemExit, match="set --data.objective causal"):
        train.main(args)


def test_unknown_corpus_and_missing_path(tmp_path, cache):
    with pytest.raises(ValueError, match="unknown corpus 'nonsense'"):
        TextDataModule(corpus="nonsense", cache_dir=str(cache))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextDataModule(corpus=str(tmp_path / "missing.txt"), cache_dir=str(cache))


def test_local_text_corpus_and_tokenizer_cache(tmp_path, cache):
    text = tmp_path / "corpus.txt"
    sentences = [f"the {w} sat near the window number {i} and waited for a reply."
                 for i, w in enumerate(["cat", "dog", "bird", "fox", "owl"] * 40)]
    text.write_text("\n\n".join(sentences))
    first = TextDataModule(corpus=str(text), bpe_vocab_size=300, num_probes=4,
                           cache_dir=str(tmp_path / "c"))
    files = sorted((tmp_path / "c").rglob("*"))
    stamps = {f: f.stat().st_mtime_ns for f in files if f.is_file()}
    second = TextDataModule(corpus=str(text), bpe_vocab_size=300, num_probes=4,
                            cache_dir=str(tmp_path / "c"))
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # reused, not retrained
    assert len(first.probes) == 4


def test_demo_model_shapes_match_the_tokenizer(cache):
    dm = TextDataModule(num_train=200, num_probes=4, cache_dir=str(cache))
    model = LanguageModel(arch="llama", d_model=32, n_layers=2, n_heads=2,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id)
    assert model.model.get_input_embeddings().num_embeddings == dm.vocab_size
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.isfinite(out.loss)


def _printed_commands(err: str) -> list[str]:
    lines = err.split("Next:\n", 1)[1].splitlines()
    return [line.strip() for line in lines if line.startswith("  ")]


def test_end_of_run_commands_work_as_printed(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a directory without the repository's Makefile
    train.main(_args("tiny.yaml", tmp_path / "run", cache, steps=3))
    err = capsys.readouterr().err
    summary, report, dashboard = _printed_commands(err)[:3]
    assert summary.split()[1] == "summary" and "tensorboard" in dashboard
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    outputs = []
    for command in (summary, report + " --max-probes 1"):  # fewer figures: a faster test
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        outputs.append(proc.stdout)
    # `normx summary` prints the same generated paragraph as the end-of-run message.
    assert "Probe accuracy" in outputs[0] and "Probe accuracy" in err
    assert len(list(tmp_path.rglob("report.html"))) == 1


def test_make_targets_are_printed_where_the_makefile_is(tmp_path):
    from normx_callbacks.summary import next_commands

    store = ROOT / "runs" / "x" / "version_0" / "normx"
    lines = next_commands(store, tensorboard_dir=store.parent, cwd=ROOT)
    assert [line.split("  #")[0] for line in lines] == [
        "make summary RUN=runs/x/version_0", "make report RUN=runs/x/version_0",
                     "make dashboard RUN=runs/x/version_0"]
    proc = subprocess.run(["make", "-n", "summary", "report", "dashboard", "RUN=runs/x/version_0",
                           "STAMP=Makefile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '.venv/bin/normx summary "runs/x/version_0"' in proc.stdout
    assert '.venv/bin/tensorboard --logdir "runs/x/version_0"' in proc.stdout


def test_make_targets_without_run_use_the_newest_version_by_number(tmp_path):
    """version_10 is newer than version_9 (a text sort says otherwise); names Lightning does
    not write are not candidates. `make -n` prints what each target would run."""
    logs = tmp_path / "runs" / "tiny" / "lightning_logs"
    for version in ("2", "9", "10", "x"):
        (logs / f"version_{version}" / "normx").mkdir(parents=True)
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "stamp").touch()
    os.utime(tmp_path / "pyproject.toml", (0, 0))  # the stamp is newer: nothing to install
    proc = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-n", "STAMP=stamp", "summary",
                           "report", "dashboard"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    run = "runs/tiny/lightning_logs/version_10"
    assert f'.venv/bin/normx summary "{run}"' in proc.stdout
    assert f'.venv/bin/normx report "{run}" -o "{run}/report.html"' in proc.stdout
    assert f'.venv/bin/tensorboard --logdir "{run}"' in proc.stdout


def test_progress_bar_counts_steps_of_max_steps(tmp_path, cache, capsys):
    args = [a for a in _args("tiny.yaml", tmp_path, cache, steps=3)]
    args[args.index("--trainer.enable_progress_bar") + 1] = "true"
    train.main(args)
    out = capsys.readouterr().out
    assert "3/3" in out and "Step" in out
    assert "Epoch 0/-2" not in out


def _error_of(args: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return exit_info.value.code, err


def test_misspelled_option_in_a_config_names_the_closest(tmp_path, cache, capsys):
    text = (ROOT / "configs" / "tiny.yaml").read_text().replace("every_n_steps: 100",
                                                                "every_n_step: 100")
    (tmp_path / "typo.yaml").write_text(text)
    args = _args("tiny.yaml", tmp_path, cache)
    args[args.index("--config") + 1] = str(tmp_path / "typo.yaml")
    code, err = _error_of(args, capsys)
    assert code == 2
    assert err[0] == "train.py: error: unknown option 'every_n_step'; did you mean 'every_n_steps'?"
    assert len(err) == 2 and "--debug" in err[1]


def test_misspelled_option_on_the_command_line_names_the_closest(tmp_path, cache, capsys):
    code, err = _error_of(_args("tiny.yaml", tmp_path, cache) + ["--model.d_modle", "8"], capsys)
    assert code == 2
    assert err[0] == ("train.py: error: unknown option 'model.d_modle'; "
                      "did you mean 'model.d_model'?")
    assert len(err) == 2


def test_bad_input_refused_at_fit_start_is_one_line(tmp_path, cache, capsys):
    """Probes longer than the context, refused in the callback's setup before the first
    step: all of them in one line (not a traceback through Lightning); --debug raises."""
    import yaml

    probes = tmp_path / "long.yaml"
    long = "the farmer near the tables behind the old red houses near the kings and the dogs"
    probes.write_text(yaml.safe_dump([{"id": f"p{i}", "text": long * 2} for i in range(7)]
                                     + ["the keys"]))
    args = _args("tiny.yaml", tmp_path, cache) + [
        "--trainer.callbacks.init_args.probes", str(probes)]
    code, err = _error_of(args, capsys)
    assert code == 1 and len(err) == 2, err
    assert re.fullmatch(r"train\.py: error: 7 of 8 probes exceed max_length=32 tokens \(the "
                        r"longest has (\d+)\): probe 'p0' \(index 0, .*long\.yaml line \d+\): "
                        r"\1 tokens; .*; and 2 more; shorten or drop them, or use a model with a "
                        r"context of at least \1 tokens", err[0]), err[0]
    assert err[1] == "(--debug shows the traceback)"
    with pytest.raises(ValueError, match="7 of 8 probes exceed"):
        train.main([*args, "--debug"])


def test_invalid_choice_is_one_line_with_the_choices_and_debug_shows_the_traceback(
        tmp_path, cache, capsys):
    args = _args("tiny.yaml", tmp_path, cache) + [
        "--trainer.callbacks.init_args.schedule", "logarithmic"]
    code, err = _error_of(args, capsys)
    assert code == 2
    assert [e for e in err if "error" in e] == [
        "train.py: error: schedule='logarithmic' is not one of ('log', 'interval', 'steps')"]
    assert not any("Traceback" in e for e in err)
    # --debug: the parser's whole message (the value is refused by its type, before any class
    # is built), not one line.
    with pytest.raises(SystemExit):
        train.main([*args, "--debug"])
    full = capsys.readouterr().err
    assert "logarithmic" in full and len(full.splitlines()) > 3
