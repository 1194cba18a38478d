"""BLiMP-format probe suites and probe groups: loading, encoding, per-group metrics.

The BLiMP-format files are generated here from the demo's agreement vocabulary; no BLiMP
sentence is shipped.
"""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
import yaml
from blimp_files import PARADIGMS, pair, write_blimp
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from normx_callbacks import NormXLogitCallback, ProbeError, load_run
from normx_callbacks.demo import LanguageModel
from normx_callbacks.metrics import group_contrast
from normx_callbacks.probes import ProbeSet


def test_from_blimp_and_the_blimp_string_load_one_probe_per_pair(tmp_path):
    root = write_blimp(tmp_path / "blimp", extras=True)
    with pytest.warns(UserWarning) as record:
        probes = ProbeSet.from_blimp(root)
    skipped = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert len(skipped) == 1  # reported once, with the counts
    # It points at the caller's line, not into the package.
    assert [w.filename for w in record if "skipped" in str(w.message)] == [__file__]
    assert "1 pair(s) with no one_prefix_method" in skipped[0]
    assert "1 pair(s) with same good and bad word" in skipped[0]
    assert [p.id for p in probes] == ["det_noun-0", "det_noun-1", "sv_agreement-0",
                                      "sv_agreement-1", "sv_agreement-2"]
    first = probes[2]
    assert (first.text, first.target, first.foil, first.group) == (
        "the key near the cabinets", "is", "are", "sv_agreement")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in (f"blimp:{root}", f"blimp:{root}/*.jsonl"):
            assert [p.id for p in ProbeSet.coerce(spec)] == [p.id for p in probes]
    one = ProbeSet.coerce(f"blimp:{root / 'sv_agreement.jsonl'}")
    assert {p.group for p in one} == {"sv_agreement"} and len(one) == 3


def test_blimp_encodes_masked_as_the_good_sentence_with_the_word_masked(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from normx_callbacks.demo import train_tokenizer

    root = write_blimp(tmp_path / "blimp")
    rows = json.loads((root / "det_noun.jsonl").read_text().splitlines()[0])
    # A pair whose sentences differ in two words has no masked form: skipped, counted.
    two = {**pair("two_words", 0, "the boy", "is", "are", "red"),
           "sentence_bad": "a boy are red."}
    (root / "two_words.jsonl").write_text(json.dumps(two) + "\n", "utf-8")
    text = " ".join(s for uid in PARADIGMS for p in PARADIGMS[uid] for s in p) * 20
    tok = train_tokenizer([text], objective="masked", vocab_size=300,
                          cache_dir=str(tmp_path / "tok"))
    assert isinstance(tok, PreTrainedTokenizerFast)
    probes = ProbeSet.from_blimp(root)
    # (det_noun-1, " box" a leading piece of " boxes" here, is skipped too: counted apart.)
    with pytest.warns(UserWarning, match=r"of 6 BLiMP probes: 1 pair\(s\) whose sentences do "
                      r"not differ in exactly one word have no masked form \(e.g. two_words-0\)"):
        enc = probes.encode(tok, objective="masked")
    assert enc.ids[0] == "det_noun-0" and "two_words-0" not in enc.ids
    assert enc.probes[0].text == rows["sentence_good"].replace(" books ", " [MASK] ")
    assert int(enc.input_ids[0, enc.positions[0]]) == tok.mask_token_id
    assert int(enc.targets[0]) == tok(" books", add_special_tokens=False)["input_ids"][0]
    with pytest.warns(UserWarning, match=r"skipped 1 of 6 BLiMP probes: 1 pair\(s\) whose good"
                      ) as record:
        causal = probes.encode(tok, objective="causal")
    assert [w.filename for w in record] == [__file__]  # the caller's line
    assert "two_words-0" in causal.ids and causal.probes[0].text == "the girl saw these"


def test_pairs_the_tokenizer_cannot_tell_apart_are_skipped_and_counted(tmp_path, dm):
    root = tmp_path / "blimp"
    root.mkdir()
    rows = [pair("p", 0, "the boy", "is", "are", "red"),
            # " qz" is a leading piece of " qzx" under the demo tokenizer: no differing token.
            pair("p", 1, "the boy", "qz", "qzx", "red")]
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 BLiMP probes: 1 pair\(s\) whose good "
                      r"and bad words this tokenizer cannot tell apart \(e.g. p-1\)"):
        enc = ProbeSet.from_blimp(root).encode(dm.tokenizer)
    assert enc.ids == ["p-0"]
    # The same pair written by hand is still refused: its author must fix it.
    with pytest.raises(ProbeError, match="never differ"):
        ProbeSet([{"text": "the boy", "target": "qz", "foil": "qzx"}]).encode(dm.tokenizer)


@pytest.mark.parametrize("case, match", [
    ("missing", "matches no .jsonl file"),
    ("json", r"line 1: malformed JSON"),
    ("keys", r"missing \['one_prefix_prefix'\]"),
])
def test_bad_blimp_input_names_the_file_and_the_fix(tmp_path, case, match):
    path = tmp_path / "x.jsonl"
    if case == "json":
        path.write_text("{not json\n", "utf-8")
    elif case == "keys":
        row = pair("p", 0, "the boy", "is", "are", "red")
        del row["one_prefix_prefix"]
        path.write_text(json.dumps(row) + "\n", "utf-8")
    with pytest.raises((ProbeError, FileNotFoundError), match=match):
        ProbeSet.coerce(f"blimp:{path}")


def test_group_field_works_in_any_probe_file_and_is_validated(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump([{"text": "the key", "target": "is", "foil": "are",
                                     "group": "mine"}]), "utf-8")
    assert ProbeSet.from_file(path)[0].group == "mine"
    with pytest.raises(ProbeError, match="group 'a/b' must be a string of letters"):
        ProbeSet([{"text": "the key", "group": "a/b"}])


def test_group_contrast_is_per_group_accuracy_and_mean():
    contrast = torch.tensor([1.0, -1.0, 3.0, -2.0, 0.5])
    out = group_contrast(contrast, ["a", "a", "b", "", "b"])
    assert out == {"a": (0.5, 0.0), "b": (1.0, 1.75)}
    with pytest.raises(ValueError, match="groups has 1 entries for 5"):
        group_contrast(contrast, ["a"])


def test_blimp_suite_in_the_callback_reaches_tensorboard_and_the_store(tmp_path, dm):
    root = write_blimp(tmp_path / "blimp")
    # Agreement probes (with cues) and the BLiMP pairs (without): alignment skips the latter.
    mixed = list(dm.probes) + list(ProbeSet.from_blimp(root))
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer)
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    callback = NormXLogitCallback(mixed, media_probes=0, faithfulness_every=None)
    pl.Trainer(accelerator="cpu", max_steps=2, logger=logger, callbacks=[callback],
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               limit_val_batches=0, num_sanity_val_steps=0).fit(model, dm)
    run = load_run(callback.store.root)
    metrics = run["metrics"]
    last = metrics[metrics.step == 2].set_index("key")["value"]
    probes = run["probes"][run["probes"].step == 2]
    for group in PARADIGMS:
        rows = probes[probes.group == group]
        assert len(rows) == len(PARADIGMS[group])
        assert last[f"probe/accuracy/{group}"] == pytest.approx(float((rows.contrast > 0).mean()))
        assert last[f"probe/contrast/{group}"] == pytest.approx(float(rows.contrast.mean()))
    assert last["alignment/probes_without_cues"] == 5.0
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    for group in PARADIGMS:
        scalars = events.Scalars(f"normx/probe/accuracy/{group}")
        assert [s.step for s in scalars] == [0, 1, 2]
        assert scalars[-1].value == pytest.approx(last[f"probe/accuracy/{group}"])
    # The report's per-group curves: tests/test_replay.py renders one from a replayed store.
