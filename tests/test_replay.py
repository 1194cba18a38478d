"""`normx replay`: a checkpoint series becomes the store the callback writes, with its numbers."""

from __future__ import annotations

import copy
import json
import shutil

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
import transformers as T
from blimp_files import PARADIGMS, write_blimp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from normx_callbacks import NormXLogitCallback, load_run
from normx_callbacks.cli import main
from normx_callbacks.demo import LanguageModel
from normx_callbacks.replay import ReplayError, replay, reproduces, resolve_checkpoints

SAVED = (4, 8)
# Metrics that depend on the snapshots before (drift, stability), the batches seen (the
# frequency correlation) or the clock; a replay has none of these. Every other must agree.
def _history(key: str) -> bool:
    return not reproduces(key)


class SaveHF(Callback):
    """Saves the HF model and tokenizer like an HF Trainer's output_dir: checkpoint-N/."""

    def __init__(self, root):
        self.root = root

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in SAVED:
            out = self.root / f"checkpoint-{trainer.global_step}"
            pl_module.model.save_pretrained(out)
            pl_module.tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def trained(dm, tmp_path_factory):
    """A real run: the callback records while HF folders and .ckpt files are saved at 4, 8."""
    root = tmp_path_factory.mktemp("run")
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer)
    callback = NormXLogitCallback(dm.probes, media_probes=0, faithfulness_every=None,
                                  store_dir=root / "callback")
    ckpts = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4, save_top_k=-1)
    pl.Trainer(accelerator="cpu", max_steps=8, logger=False,
               callbacks=[callback, SaveHF(root / "hf"), ckpts], enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0,
               num_sanity_val_steps=0).fit(model, dm)
    return root, load_run(root / "callback")


def assert_same_scores(replayed, recorded, steps):
    assert replayed.steps == list(steps)
    for step in steps:
        a = replayed["tokens"][replayed["tokens"].step == step].reset_index(drop=True)
        b = recorded["tokens"][recorded["tokens"].step == step].reset_index(drop=True)
        assert len(a) == len(b) > 0
        pd.testing.assert_frame_equal(a[["probe_id", "layer", "position", "token"]],
                                      b[["probe_id", "layer", "position", "token"]])
        for col in ("norm", "logat", "score", "contrast"):
            assert (a[col] - b[col]).abs().max() <= 1e-5, col
        ma = replayed["metrics"][replayed["metrics"].step == step].set_index("key")["value"]
        mb = recorded["metrics"][recorded["metrics"].step == step].set_index("key")["value"]
        same = [k for k in mb.index if not _history(k)]
        assert {"probe/accuracy", "probe/contrast", "alignment/ap"} <= set(same)
        assert set(same) <= set(ma.index)
        for key in same:
            assert ma[key] == pytest.approx(mb[key], abs=1e-5, nan_ok=True), key


def test_replay_of_hf_folders_equals_what_the_callback_recorded(trained, dm, tmp_path):
    root, recorded = trained
    code = main(["replay", str(root / "hf"), "-o", str(tmp_path / "store"), "--probes",
                 str(_probe_file(dm, tmp_path)), "--device", "cpu", "-q"])
    assert code == 0
    replayed = load_run(tmp_path / "store")
    assert_same_scores(replayed, recorded, SAVED)
    assert set(replayed["probes"].columns) == set(recorded["probes"].columns)
    assert set(replayed["embedding"]["count"]) == {0}  # no batches seen: counts say so
    text = tmp_path / "corpus.txt"
    text.write_text("the keys near the cabinet are red\n\nthe key is red\n", "utf-8")
    replay(root / "hf" / "checkpoint-8", probes=dm.probes, store_dir=tmp_path / "counted",
           count_corpus=text, progress=False)
    counted = load_run(tmp_path / "counted")
    ids = dm.tokenizer(["the keys near the cabinet are red", "the key is red"],
                       add_special_tokens=False)["input_ids"]
    expected = pd.Series([i for line in ids for i in line]).value_counts()
    got = counted["embedding"].set_index("token_id")["count"]
    assert got[got > 0].sort_index().to_dict() == expected.sort_index().to_dict()
    rho = counted["metrics"].set_index("key")["value"]["embedding/norm_logfreq_spearman"]
    assert rho == rho  # defined once counts exist


def test_demo_ckpt_series_replays_and_a_second_call_skips_committed_steps(trained, dm, tmp_path,
                                                                         caplog):
    root, recorded = trained
    store = tmp_path / "store"
    series = resolve_checkpoints([root / "ckpt" / "*.ckpt"])
    assert [c.step for c in series] == list(SAVED)
    # Only the first: the second call must add step 8 and skip step 4.
    assert replay([series[0].path], probes=dm.probes, store_dir=store, progress=False) == [4]
    marker = _marker_ids(store)
    assert replay([root / "ckpt"], probes=dm.probes, store_dir=store, progress=False) == [8]
    assert replay([root / "ckpt"], probes=dm.probes, store_dir=store, progress=False) == []
    assert "already in" in caplog.text
    assert _marker_ids(store)[4] == marker[4]  # the committed snapshot was not rewritten
    assert_same_scores(load_run(store), recorded, SAVED)


class CountingLanguageModel(LanguageModel):
    """The demo's LightningModule, counting how often replay rebuilds it."""

    built = 0

    @classmethod
    def load_from_checkpoint(cls, *args, **kwargs):
        cls.built += 1
        return super().load_from_checkpoint(*args, **kwargs)


@pytest.mark.parametrize("kind", ["ckpt", "hf", "model_class"])
def test_a_series_loads_into_one_model_with_the_numbers_of_each_checkpoint_alone(
        trained, dm, tmp_path, monkeypatch, kind):
    """Checkpoints after the first go into the model built for it: bit-identical tables to
    replaying each checkpoint alone (a fresh build), and only one build for the series."""
    import normx_callbacks.replay as replay_module

    root, _ = trained
    builds = []
    for name in ("build_lightning", "load_hf_dir"):
        real = getattr(replay_module, name)
        monkeypatch.setattr(replay_module, name,
                            lambda *a, _real=real: builds.append(a[0]) or _real(*a))
    CountingLanguageModel.built = 0
    options = {"probes": dm.probes, "progress": False}
    if kind == "model_class":
        options.update(model_class=CountingLanguageModel, tokenizer=root / "hf" / "checkpoint-4")
    series = resolve_checkpoints([root / ("hf" if kind == "hf" else "ckpt")])
    assert replay([c.path for c in series], store_dir=tmp_path / "series", **options) == list(SAVED)
    assert len(builds) + CountingLanguageModel.built == 1, builds
    together = load_run(tmp_path / "series")
    for checkpoint in series:
        replay([checkpoint.path], store_dir=tmp_path / f"alone{checkpoint.step}", **options)
        alone = load_run(tmp_path / f"alone{checkpoint.step}")
        for table in ("tokens", "probes", "embedding"):
            part = together[table][together[table].step == checkpoint.step]
            pd.testing.assert_frame_equal(part.reset_index(drop=True), alone[table])
    assert len(builds) + CountingLanguageModel.built == 1 + len(series)


class HookedLanguageModel(CountingLanguageModel):
    """Its own on_load_checkpoint may change the module beyond its weights."""

    def on_load_checkpoint(self, checkpoint):
        self.loaded_step = checkpoint["global_step"]


def test_a_class_with_its_own_load_hook_or_another_tie_is_rebuilt(trained, dm, tmp_path):
    """No reuse where the loaded model could differ from a fresh one: a LightningModule
    whose on_load_checkpoint could compound on a used module; an HF head saved apart from
    the embedding it was tied to (transformers unties it, so the series changes shape and
    that checkpoint is refused by name, not measured with its head written over the
    embedding)."""
    from safetensors.torch import load_file, save_file

    root, _ = trained
    HookedLanguageModel.built = 0
    replay([root / "ckpt"], probes=dm.probes, store_dir=tmp_path / "hooked", progress=False,
           model_class=HookedLanguageModel, tokenizer=root / "hf" / "checkpoint-4")
    assert HookedLanguageModel.built == len(SAVED)

    untied = tmp_path / "checkpoint-12"
    shutil.copytree(root / "hf" / "checkpoint-8", untied)
    weights = load_file(untied / "model.safetensors")
    assert "lm_head.weight" not in weights  # saved tied: the head once, as the embedding
    weights["lm_head.weight"] = weights["transformer.wte.weight"].flip(0).contiguous()
    save_file(weights, untied / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReplayError, match=r"checkpoint-12: another model shape .*tied"):
        replay([root / "hf" / "checkpoint-4", untied], probes=dm.probes,
               store_dir=tmp_path / "series", progress=False)
    assert load_run(tmp_path / "series").steps == [4]
    assert replay([untied], probes=dm.probes, store_dir=tmp_path / "alone",
                  progress=False) == [12]


@pytest.mark.parametrize("family", ["bert", "llama", "opt"])
def test_weights_loaded_into_the_kept_model_equal_a_fresh_from_pretrained(family, tmp_path):
    """A masked LM with a tied decoder and its bias, an untied RMSNorm model, a model with
    projection dims: the second checkpoint, loaded into the model kept from the first, has
    the state and logits from_pretrained gives it."""
    from normx_callbacks.checkpoints import load_hf_dir
    from normx_callbacks.replay import _SeriesLoader

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                 max_position_embeddings=64)
    cls, config = {
        "bert": (T.BertForMaskedLM, T.BertConfig(intermediate_size=64, **small)),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(intermediate_size=64,
                                                    num_key_value_heads=2, **small)),
        "opt": (T.OPTForCausalLM, T.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **small)),
    }[family]
    for step in (1, 2):
        T.set_seed(step)
        cls(config).save_pretrained(tmp_path / f"step{step}")
    loader = _SeriesLoader(None, "cpu", torch.float32)
    kept = loader.load(tmp_path / "step1")
    second = loader.load(tmp_path / "step2")
    assert second is kept
    fresh = load_hf_dir(tmp_path / "step2").eval()
    want = fresh.state_dict()
    assert all(torch.equal(second.state_dict()[k], want[k]) for k in want)
    ids = torch.arange(1, 20).view(1, -1)
    with torch.no_grad():
        assert torch.equal(second(ids).logits, fresh(ids).logits)


def test_a_model_whose_weights_transformers_converts_on_load_is_rebuilt(dm, tmp_path,
                                                                        monkeypatch):
    """Mixtral's experts are fused by from_pretrained: only it may load them."""
    import normx_callbacks.replay as replay_module

    builds = []
    real = replay_module.load_hf_dir
    monkeypatch.setattr(replay_module, "load_hf_dir", lambda p: builds.append(p) or real(p))
    config = T.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                             vocab_size=dm.vocab_size, max_position_embeddings=64)
    for step in (1, 2):
        T.set_seed(step)
        T.MixtralForCausalLM(config).save_pretrained(tmp_path / f"step{step}")
    steps = replay([tmp_path / "step1", tmp_path / "step2"], probes=dm.probes[:4],
                   tokenizer=dm.tokenizer, store_dir=tmp_path / "store", progress=False)
    assert steps == [1, 2] and len(builds) == 2


def test_an_hf_directory_missing_a_weight_is_refused_not_filled_at_random(trained, dm,
                                                                          tmp_path, capsys):
    """from_pretrained would initialise the weight at random and only log it."""
    from safetensors.torch import load_file, save_file

    root, _ = trained
    broken = tmp_path / "checkpoint-12"
    shutil.copytree(root / "hf" / "checkpoint-8", broken)
    weights = load_file(broken / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    truncated = tmp_path / "checkpoint-16"
    shutil.copytree(root / "hf" / "checkpoint-8", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    code = main(["replay", str(root / "hf" / "checkpoint-4"), str(broken), str(truncated), "-o",
                 str(tmp_path / "store"), "--probes", str(_probe_file(dm, tmp_path)), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 2, err
    assert ("checkpoint-12: the weights do not fit the GPT2LMHeadModel its config.json "
            "describes: 1 weights missing from its files (transformer.h.1.mlp.c_fc.weight)"
            in err[0])
    assert "checkpoint-16: cannot load the model in" in err[1]
    assert load_run(tmp_path / "store").steps == [4]


def test_folders_without_a_tokenizer_are_one_line_before_any_checkpoint_loads(trained, dm,
                                                                          tmp_path, capsys):
    """Checked before the progress bar starts: one line, once, naming --tokenizer DIR."""
    root, _ = trained
    for step in SAVED:
        shutil.copytree(root / "hf" / f"checkpoint-{step}", tmp_path / "hf" / f"checkpoint-{step}",
                        ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    capsys.readouterr()
    argv = ["replay", str(tmp_path / "hf"), "-o", str(tmp_path / "store"), "--probes",
            str(_probe_file(dm, tmp_path))]
    assert main(argv) == 1  # with the progress bar: it must not have started
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"normx replay: error: no tokenizer found with the checkpoints: {tmp_path}/hf/"
        "checkpoint-4 holds no tokenizer files (tokenizer.json), nor does the other; pass "
        "--tokenizer DIR (tokenizer= in Python), a directory with tokenizer.json"], err
    assert not (tmp_path / "store").exists()
    assert main([*argv, "--tokenizer", str(root / "hf" / "checkpoint-4"), "-q"]) == 0
    assert load_run(tmp_path / "store").steps == list(SAVED)
    # A --model-class .ckpt names its tokenizer through its DataModule's hyper-parameters.
    assert main(["replay", str(root / "ckpt"), "-o", str(tmp_path / "classed"), "--probes",
                 str(_probe_file(dm, tmp_path)), "--model-class",
                 "normx_callbacks.demo:LanguageModel", "-q"]) == 0, capsys.readouterr().err


class _Mkdir:
    """Unpickled, this would call os.mkdir(path): what a malicious weight file does."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_a_pickle_weight_file_that_would_run_code_or_is_cut_short_is_one_line(trained, dm,
                                                                             tmp_path, capsys):
    """HF directories whose pytorch_model.bin torch.load(weights_only=True) refuses (a pickle
    that would call os.mkdir) or that is truncated: one line each, never run, and the series
    goes on with the good checkpoints around them."""
    root, _ = trained
    pwned = tmp_path / "pwned"
    unsafe = tmp_path / "checkpoint-6"
    shutil.copytree(root / "hf" / "checkpoint-8", unsafe)
    (unsafe / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": _Mkdir(pwned)}, unsafe / "pytorch_model.bin")
    cut = tmp_path / "checkpoint-12"
    shutil.copytree(root / "hf" / "checkpoint-8", cut)
    (cut / "model.safetensors").unlink()
    torch.save(T.GPT2LMHeadModel.from_pretrained(root / "hf" / "checkpoint-8").state_dict(),
               cut / "pytorch_model.bin")
    data = (cut / "pytorch_model.bin").read_bytes()
    (cut / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    code = main(["replay", str(root / "hf" / "checkpoint-4"), str(unsafe),
                 str(root / "hf" / "checkpoint-8"), str(cut), "-o", str(tmp_path / "store"),
                 "--probes", str(_probe_file(dm, tmp_path)), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 2, err
    assert err[0] == (f"normx replay: error: {unsafe}/pytorch_model.bin holds objects other than "
                      "tensors and plain containers, so it cannot be loaded safely "
                      "(weights_only=True; nothing in it was run): Trying to load unsupported "
                      "GLOBAL posix.mkdir whose module posix is blocked; use a copy saved with "
                      "save_pretrained() (safetensors) from a source you trust")
    assert err[1] == (f"normx replay: error: {cut}/pytorch_model.bin is truncated or corrupt "
                      "(torch.save writes a zip archive and this is not a complete one); copy it "
                      "again or use another checkpoint")
    assert load_run(tmp_path / "store").steps == [4, 8]
    assert not pwned.exists()
    torch.load(unsafe / "pytorch_model.bin", weights_only=False)  # what an unsafe load does
    assert pwned.is_dir()


def _marker_ids(store) -> dict[int, str]:
    return {json.loads(p.read_text())["step"]: json.loads(p.read_text())["id"]
            for p in (store / "_commits").glob("*.json")}


def _probe_file(dm, tmp_path):
    path = tmp_path / "probes.json"
    path.write_text(json.dumps([{k: v for k, v in (p.__dict__ if not isinstance(p, dict)
                                                   else p).items() if v not in ((), "", None)}
                                for p in dm.probes]), "utf-8")
    return path


def test_bad_inputs_get_one_line_each_and_a_nonzero_exit(trained, dm, tmp_path, capsys):
    root, _ = trained
    not_ckpt = tmp_path / "notes_step=3.ckpt"
    not_ckpt.write_text("not a checkpoint", "utf-8")
    other = tmp_path / "step12"  # another architecture: one layer
    T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=dm.vocab_size,
                                   n_positions=64)).save_pretrained(other)
    capsys.readouterr()
    code = main(["replay", str(root / "hf" / "checkpoint-4"), str(other), str(not_ckpt),
                 "-o", str(tmp_path / "store"), "--probes", str(_probe_file(dm, tmp_path)),
                 "--tokenizer", str(root / "hf" / "checkpoint-4"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 2, err
    assert "notes_step=3.ckpt is truncated, corrupt or not a PyTorch checkpoint" in err[0]
    assert "step12: another architecture (GPT2LMHeadModel, 1 layers" in err[1]
    assert load_run(tmp_path / "store").steps == [4]  # the good one is kept
    with pytest.raises(ReplayError, match=r"step12: another architecture .* than the store"):
        replay(other, probes=dm.probes, store_dir=tmp_path / "store", progress=False,
               tokenizer=root / "hf" / "checkpoint-4")

    big = copy.deepcopy(dm.tokenizer)
    big.add_tokens([f"extra{i}" for i in range(40)])
    code = main(["replay", str(root / "hf"), str(tmp_path / "nowhere"), "-o",
                 str(tmp_path / "s2"), "--probes", str(_probe_file(dm, tmp_path)), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "nowhere: no such file, directory or glob" in err[0]
    with pytest.raises(ReplayError, match=f"the tokenizer has {len(big)} tokens but the model's "
                       f"embedding has {dm.vocab_size} rows"):
        replay(root / "hf" / "checkpoint-4", probes=dm.probes, tokenizer=big,
               store_dir=tmp_path / "s3", progress=False)
    unnamed = tmp_path / "final_model"
    shutil.copytree(root / "hf" / "checkpoint-4", unnamed)
    with pytest.raises(ReplayError, match="final_model: cannot tell its training step"):
        resolve_checkpoints([root / "hf" / "checkpoint-8", unnamed])
    assert [c.step for c in resolve_checkpoints([unnamed], steps=[12])] == [12]
    assert main(["replay", str(root / "hf"), "-o", str(tmp_path / "s5"), "--probes",
                 str(_probe_file(dm, tmp_path)), "--count-corpus", "nope.txt", "-q"]) == 1
    assert "--count-corpus 'nope.txt': no such file" in capsys.readouterr().err
    assert main(["replay", str(root / "hf"), "-o", str(tmp_path / "s4"), "--probes",
                 "blimp:/nonexistent", "-q"]) == 1
    assert "--probes: BLiMP path '/nonexistent' matches no .jsonl file" in capsys.readouterr().err


def test_blimp_suite_replays_through_a_model_class_and_reaches_the_report(trained, dm, tmp_path):
    root, _ = trained
    blimp = write_blimp(tmp_path / "blimp")
    store = tmp_path / "store"
    code = main(["replay", str(root / "ckpt"), "-o", str(store), "--probes", f"blimp:{blimp}",
                 "--model-class", "normx_callbacks.demo:LanguageModel", "--tokenizer",
                 str(root / "hf" / "checkpoint-4"), "--layers", "last", "-q"])
    assert code == 0
    run = load_run(store)
    assert run.steps == list(SAVED)
    metrics = run["metrics"][run["metrics"].step == 8].set_index("key")["value"]
    probes = run["probes"][run["probes"].step == 8]
    for group in PARADIGMS:
        rows = probes[probes.group == group]
        assert metrics[f"probe/accuracy/{group}"] == pytest.approx(float((rows.contrast > 0).mean()))
    assert set(run["tokens"]["layer"]) == {2}  # --layers last
    assert main(["report", str(store), "-o", str(tmp_path / "r.html"), "-q"]) == 0
    assert 'alt="accuracy per group"' in (tmp_path / "r.html").read_text("utf-8")
    assert main(["replay", str(root / "ckpt"), "-o", str(store), "--probes", f"blimp:{blimp}",
                 "--model-class", "normx_callbacks.demo:Nope", "-q"]) == 1
    ckpt = next((root / "ckpt").glob("*step=8.ckpt"))
    assert main(["faithfulness", str(ckpt), "--probes", f"blimp:{blimp}", "--methods",
                 "normxlogit,random", "--tokenizer", str(root / "hf" / "checkpoint-4"),
                 "-o", str(tmp_path / "f.csv")]) == 0
    assert set(pd.read_csv(tmp_path / "f.csv")["method"]) == {"normxlogit", "random"}
