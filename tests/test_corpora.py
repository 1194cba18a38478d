"""Tests for the demo corpora (normx_callbacks.demo.corpora) and their tokenizer."""

import json
import re
import sys
from collections import Counter

import pytest

from normx_callbacks.demo import corpora
from normx_callbacks.demo.corpora import CONSTRUCTIONS, CORPORA, MASK, NUMBER, Corpus, load_corpus
from normx_callbacks.demo.tokenizer import (
    FINGERPRINT_FILE,
    fingerprint,
    load_tokenizer,
    train_tokenizer,
)
from normx_callbacks.probes import MASK_PLACEHOLDER, ProbeSet

PROBE_KEYS = {"id", "text", "target", "foil", "cues", "attractors"}


def _whole_word_count(text: str, word: str) -> int:
    return len(re.findall(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text))


def _assert_held_out(corpus: Corpus) -> None:
    train_text = "\n".join(" ".join(doc.split()) for doc in corpus.train)
    for p in corpus.probes:
        assert f"{p['text']} {p['target']}" not in train_text, p["id"]


@pytest.fixture(scope="module")
def agreement() -> Corpus:
    return load_corpus("agreement")


@pytest.fixture(scope="module")
def docs() -> Corpus:
    return load_corpus("docs")


# --- agreement -----------------------------------------------------------------------------


def test_agreement_sizes_and_balance(agreement):
    assert agreement.name == "agreement"
    assert len(agreement.train) == 20_000
    # val_fraction is the share of train + val.
    assert len(agreement.val) == round(20_000 * 0.05 / 0.95)
    assert len(agreement.probes) == 64
    meta = [agreement.meta[p["id"]] for p in agreement.probes]
    cells = Counter((m["construction"], m["number"]) for m in meta)
    assert cells == {(c, n): 8 for c in CONSTRUCTIONS for n in ("sg", "pl")}
    ids = [p["id"] for p in agreement.probes]
    assert len(set(ids)) == 64 and "sv-pp-003" in ids and "anaphor-015" in ids
    assert all(p.keys() == PROBE_KEYS for p in agreement.probes)


def test_agreement_is_deterministic():
    a = load_corpus("agreement", seed=3, num_train=500)
    b = load_corpus("agreement", seed=3, num_train=500)
    c = load_corpus("agreement", seed=4, num_train=500)
    assert a == b
    assert a.train != c.train and a.probes != c.probes


def test_agreement_num_probes_does_not_change_train():
    a = load_corpus("agreement", num_train=300, num_probes=8)
    b = load_corpus("agreement", num_train=300, num_probes=64)
    assert a.probes == b.probes[:8]
    # Separate random streams: here no training sentence hit a probe, so train is the same.
    assert a.train == b.train


def test_agreement_probes_held_out(agreement):
    _assert_held_out(agreement)
    full = {f"{p['text']} {p['target']}" for p in agreement.probes}
    assert not full & {s.rsplit(" ", 1)[0] for s in agreement.train}


def test_agreement_cues_agree_by_construction(agreement):
    pairs = {w: pair for pair in corpora._NOUNS for w in pair}
    for p in agreement.probes:
        meta = agreement.meta[p["id"]]
        (cue,) = p["cues"]
        assert _whole_word_count(p["text"], cue) == 1, p
        assert NUMBER[cue] == NUMBER[p["target"]] == meta["number"], p
        assert NUMBER[p["foil"]] != meta["number"], p
        # The attractor has the other number and is a different noun from the cue.
        attractor = meta["attractor"]
        assert _whole_word_count(p["text"], attractor) == 1, p
        assert NUMBER[attractor] != meta["number"], p
        if meta["construction"] != "det-noun":  # there the cue is a determiner
            assert attractor not in pairs[cue], p
        # The probe names every word of the other number as an attractor: the distractor
        # noun, and a relative clause's verb too.
        wrong = [w for w in p["text"].split() if NUMBER.get(w, meta["number"]) != meta["number"]]
        assert p["attractors"] == wrong and attractor in wrong, p
        assert len(wrong) == (2 if meta["construction"] == "sv-rc" else 1), p
        if meta["construction"] == "anaphor" and meta["number"] == "sg":
            assert p["target"] == corpora._REFLEXIVE_SINGULAR[cue], p  # himself / herself
        assert p["id"].startswith(meta["construction"] + "-")


def test_agreement_number_lookup_is_unambiguous():
    words = [w for pair in corpora._NOUNS + corpora._COPULA + corpora._DETERMINERS for w in pair]
    assert len(words) == len(set(words))
    assert set(NUMBER.values()) == {"sg", "pl"}


def test_agreement_training_sentences_agree():
    """Every training sentence is grammatical: parse each construction and check agreement."""
    corpus = load_corpus("agreement", num_train=2000)
    checked = Counter()
    for s in corpus.train:
        words = s.rstrip(".").split()
        if words[2] == "who":  # the author who the guards like laughs
            pairs = [(words[1], words[6]), (words[4], words[5])]
            kind = "sv-rc"
        elif words[-1] in ("himself", "herself", "themselves"):  # the boys (near the king) hurt
            pairs = [(words[1], words[-1])]
            kind = "anaphor"
        elif words[2] in corpora._PAST_OBJECT:  # the boys bought this (old) book
            pairs = [(words[3], words[-1])]
            kind = "det-noun"
        else:  # the key (near the cabinets) is small
            pairs = [(words[1], words[2] if words[2] in NUMBER else words[5])]
            kind = "sv-pp"
        for cue, word in pairs:
            assert NUMBER[cue] == NUMBER[word], s
        checked[kind] += 1
    assert sum(checked.values()) == 2000 and min(checked.values()) > 300


def test_masked_probes(agreement):
    masked = agreement.masked_probes()
    assert len(masked) == len(agreement.probes)
    for causal, m in zip(agreement.probes, masked, strict=True):
        assert m["text"].count(MASK) == 1
        assert m["text"].startswith(causal["text"] + " " + MASK)
        assert {k: v for k, v in m.items() if k != "text"} == {
            k: v for k, v in causal.items() if k != "text"
        }
        # Putting the target back gives a training-style sentence.
        sentence = m["text"].replace(MASK, causal["target"])
        assert sentence.endswith(".") and sentence.startswith("the ")
    first = next(m for m in masked if m["id"] == "sv-pp-000")
    rest = agreement.meta["sv-pp-000"]["rest"]
    assert first["text"] == f"{agreement.probes[0]['text']} {MASK}{rest}"


def test_probes_validate_with_probeset(agreement, docs):
    """The corpora's probe dicts become ProbeSets that keep every probe and field: targets
    everywhere, a foil of the other number and cue words present in the text for agreement,
    neither foil nor cue for docs, and the masked forms holding the placeholder once."""
    for corpus in (agreement, docs):
        causal, masked = ProbeSet(corpus.probes), ProbeSet(corpus.masked_probes())
        assert len(causal) == len(masked) == len(corpus.probes) == 64
        ids = [p["id"] for p in corpus.probes]
        assert [p.id for p in causal] == [p.id for p in masked] == ids
        for raw, probe, masked_probe in zip(corpus.probes, causal, masked, strict=True):
            assert probe.text == raw["text"] and probe.target == raw["target"]
            assert probe.target and probe.target.strip() == probe.target
            assert MASK_PLACEHOLDER not in probe.text
            assert masked_probe.text.count(MASK_PLACEHOLDER) == 1
            assert masked_probe.text.startswith(f"{probe.text} {MASK_PLACEHOLDER}")
            # The masked form differs in its text only.
            assert (masked_probe.target, masked_probe.foil, masked_probe.cues,
                    masked_probe.attractors) == (probe.target, probe.foil, probe.cues,
                                                 probe.attractors)
            assert probe.group == ""
            if corpus is docs:
                assert probe.foil is None and probe.cues == () and probe.attractors == ()
                continue
            (cue,) = probe.cues
            assert isinstance(probe.cues, tuple) and isinstance(probe.attractors, tuple)
            assert probe.foil and probe.foil != probe.target
            assert NUMBER[probe.foil] != NUMBER[probe.target] == NUMBER[cue]
            assert _whole_word_count(probe.text, cue) == 1
            assert probe.attractors and all(_whole_word_count(probe.text, a) >= 1
                                            for a in probe.attractors)
            assert cue not in probe.attractors


# --- docs and local text -------------------------------------------------------------------


def test_docs_corpus(docs):
    assert docs.name == "docs" and len(docs.train) > 1000 and docs.val
    assert len(docs.probes) == 64
    _assert_held_out(docs)
    for p in docs.probes:
        n_words = len(p["text"].split()) + 1
        assert 8 <= n_words <= 40
        assert p["foil"] is None and p["cues"] == []
        assert re.fullmatch(r"[A-Za-z]+", p["target"])
    assert load_corpus("docs", seed=1).probes != docs.probes
    assert load_corpus("docs") == docs


def test_docs_num_train_caps_train():
    assert len(load_corpus("docs", num_train=100).train) == 100


def test_docs_without_pydoc_data(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(RuntimeError, match="pydoc_data.*local .txt"):
        load_corpus("docs")


def _write_paragraphs(path, n: int, start: int = 0) -> None:
    paragraphs = [
        f"Paragraph {i} talks about the river number {i} and its many quiet boats. "
        f"The boats on river {i} carry grain from the northern farms to the town market."
        for i in range(start, start + n)
    ]
    path.write_text("\n\n".join(paragraphs) + "\n")


def test_local_txt_file(tmp_path):
    path = tmp_path / "book.txt"
    _write_paragraphs(path, 40)
    corpus = load_corpus(str(path), num_probes=5)
    assert load_corpus(path, num_probes=5) == corpus  # a Path works too
    assert corpus.name == str(path)
    assert len(corpus.train) + len(corpus.val) == 40
    assert len(corpus.probes) == 5 and all(p["id"].startswith("text-") for p in corpus.probes)
    _assert_held_out(corpus)
    assert {p["target"] for p in corpus.probes} <= {"boats", "market"}
    assert load_corpus(str(path), num_probes=5) == corpus


def test_local_directory_recursive(tmp_path):
    _write_paragraphs(tmp_path / "a.txt", 10)
    (tmp_path / "sub").mkdir()
    _write_paragraphs(tmp_path / "sub" / "b.md", 10, start=10)
    (tmp_path / "ignored.json").write_text(json.dumps({"not": "text"}))
    corpus = load_corpus(str(tmp_path), num_probes=3)
    docs = corpus.train + corpus.val
    assert len(docs) == 20 and not any("not" in d for d in docs)
    assert any("river number 15" in d for d in docs)


def test_local_few_probes_warns(tmp_path, caplog):
    path = tmp_path / "short.txt"
    path.write_text("Too short.\n\nAlso short.\n")
    corpus = load_corpus(str(path))
    assert corpus.probes == [] and len(corpus.train) == 1
    assert "fewer than num_probes=64" in caplog.text


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt.*agreement, docs"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"unknown corpus 'wiki'.*agreement, docs.*hf:<dataset>"):
        load_corpus("wiki")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .md files"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("agreement", val_fraction=1.0)
    with pytest.raises(ValueError, match="num_train"):
        load_corpus("agreement", num_train=0)
    assert CORPORA == ("agreement", "docs")


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1")


# --- tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_tok(agreement):
    return train_tokenizer(agreement.train, vocab_size=512)


def test_causal_tokenizer(causal_tok, agreement):
    tok = causal_tok
    # The grammar needs fewer merges than allowed: BPE stops once every word is whole.
    assert 400 < len(tok) <= 512
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.convert_ids_to_tokens(tok.encode(" is")) == ["Ġis"]
    text = "the key near the cabinets is small. Ünïcode ✓ text"
    assert tok.decode(tok.encode(text)) == text
    batch = tok(["the key is", "the keys"], return_offsets_mapping=True, padding=True)
    assert batch["input_ids"][1][-1] == tok.pad_token_id
    # Offsets skip the space a token carries.
    assert batch["offset_mapping"][0] == [(0, 3), (4, 7), (8, 10)]


def test_agreement_words_are_single_tokens_at_512(causal_tok, agreement):
    # Otherwise target and foil ("laughs"/"laugh") could share their first token.
    words = {w for p in agreement.probes for w in (p["target"], p["foil"], *p["cues"])}
    for w in words:
        assert len(causal_tok.tokenize(" " + w)) == 1, w
    encoded = ProbeSet(agreement.probes).encode(causal_tok)
    assert (encoded.targets != encoded.foils).all()
    assert encoded.cue_mask.sum(-1).eq(1).all()


def test_masked_tokenizer(agreement):
    tok = train_tokenizer(agreement.train, vocab_size=512, objective="masked")
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.unk_token, tok.mask_token, tok.mask_token_id) == ("<unk>", "<mask>", 4)
    ids = tok("the keys <mask> small.")["input_ids"]
    # <s> ... </s>, and the mask absorbs the space before it.
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>",
        "the",
        "Ġkeys",
        "<mask>",
        "Ġsmall",
        ".",
        "</s>",
    ]
    encoded = ProbeSet(agreement.masked_probes()).encode(tok, objective="masked")
    assert (encoded.targets != encoded.foils).all()


def test_tokenizer_cache(tmp_path, agreement):
    texts = agreement.train[:3000]
    cache = tmp_path / "tok"
    first = train_tokenizer(texts, vocab_size=400, cache_dir=cache)
    fp = (cache / FINGERPRINT_FILE).read_text().strip()
    assert fp == fingerprint(texts, vocab_size=400, objective="causal")
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    hit = train_tokenizer(texts, vocab_size=400, cache_dir=cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    assert hit.get_vocab() == first.get_vocab()
    assert hit("the keys are")["input_ids"] == first("the keys are")["input_ids"]

    miss = train_tokenizer(texts, vocab_size=420, cache_dir=cache)
    assert len(miss) == 420 and (cache / FINGERPRINT_FILE).read_text().strip() != fp
    assert len(load_tokenizer(cache)) == 420
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp dirs left behind


def test_tokenizer_cache_reload_keeps_masking(tmp_path, agreement):
    texts = agreement.train[:2000]
    fresh = train_tokenizer(texts, vocab_size=400, objective="masked", cache_dir=tmp_path / "m")
    cached = train_tokenizer(texts, vocab_size=400, objective="masked", cache_dir=tmp_path / "m")
    text = "the boys <mask> themselves."
    assert cached(text, return_offsets_mapping=True) == fresh(text, return_offsets_mapping=True)
    assert cached.mask_token_id == fresh.mask_token_id == 4


def test_fingerprint_depends_on_texts():
    base = fingerprint(["ab", "c"], vocab_size=300, objective="causal")
    assert base == fingerprint(["ab", "c"], vocab_size=300, objective="causal")
    assert base != fingerprint(["a", "bc"], vocab_size=300, objective="causal")
    assert base != fingerprint(["ab", "c"], vocab_size=300, objective="masked")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="objective must be one of causal, masked"):
        train_tokenizer(["a b"], vocab_size=400, objective="seq2seq")
    with pytest.raises(ValueError, match="vocab_size must be an int above 258"):
        train_tokenizer(["a b"], vocab_size=100)
    with pytest.raises(ValueError, match="texts is empty"):
        train_tokenizer([], vocab_size=400)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        train_tokenizer(["a b"], vocab_size=300, cache_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
