"""Tests for normx_callbacks.probes: parsing, validation errors, and encoding with two
tokenizers built in code (byte-level BPE and BERT-style WordPiece)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from normx_callbacks.encoding import EncodedProbes
from normx_callbacks.probes import Probe, ProbeError, ProbeSet

CORPUS = [
    "The keys to the cabinet are on the table.",
    "The key to the cabinets is on the table.",
    "The cat sat on the mat.",
    "The cats sat on the mats.",
    "The dog runs in the park.",
    "The dogs run in the park.",
    "A girl reads a book in the garden.",
    "The girls read books in the garden.",
    "The author that the guards like is tall.",
    "The authors that the guard likes are tall.",
    "She said that the keys are lost.",
    "He said that the key is lost.",
    "Paris is the capital of France.",
    "Rome is the capital of Italy.",
    "The table is near the window.",
    "The windows are open in the morning.",
    "My brother walks to school every day.",
    "My brothers walk to school every day.",
    "The bird sings in the tree.",
    "The birds sing in the trees.",
]


def byte_level_tokenizer(pad: bool = True, mask: bool = False) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE; vocabulary large enough that corpus words are whole tokens.

    ``mask=True`` adds a RoBERTa-style ``<mask>`` that absorbs the space before it.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    extra = {"mask_token": AddedToken("<mask>", lstrip=True, special=True)} if mask else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>" if pad else None, **extra
    )


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-style WordPiece with [CLS] text [SEP] and a [MASK] token."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    return wordpiece_tokenizer()


def cue_text(tokenizer: PreTrainedTokenizerFast, enc: EncodedProbes, row: int) -> str:
    """Decode exactly the cue-masked tokens of one probe."""
    ids = enc.input_ids[row][enc.cue_mask[row]].tolist()
    return tokenizer.decode(ids).strip()


def word(tokenizer: PreTrainedTokenizerFast, token_id: int) -> str:
    return tokenizer.decode([token_id]).strip()


# --- building and parsing ------------------------------------------------------------------

AGREEMENT = {
    "id": "agree",
    "text": "The keys to the cabinet",
    "target": "are",
    "foil": "is",
    "cues": ["keys"],
}


def test_strings_mappings_and_probes_get_ids_filled_by_index() -> None:
    probes = ProbeSet(["The cat sat on the", AGREEMENT, Probe(text="The dogs run in the")])
    assert [p.id for p in probes] == ["probe-0", "agree", "probe-2"]
    assert len(probes) == 3
    assert probes[1] == Probe(
        text="The keys to the cabinet", target="are", foil="is", cues=("keys",), id="agree"
    )
    assert probes[0] == Probe(text="The cat sat on the", id="probe-0")


def test_cues_accept_a_list_or_a_single_word() -> None:
    probes = ProbeSet([{"text": "The keys are", "cues": "keys"}, Probe("The key is", cues=["key"])])
    assert probes[0].cues == ("keys",)
    assert probes[1].cues == ("key",)
    hash(probes[1])  # list cues were turned into a tuple, so the frozen probe stays hashable


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


EXPECTED = [
    Probe(text="The keys to the cabinet", target="are", foil="is", cues=("keys",), id="agree"),
    Probe(text="The cat sat on the", id="probe-1"),
]

YAML_LIST = """\
- id: agree
  text: The keys to the cabinet
  target: are
  foil: is
  cues: [keys]
- The cat sat on the
"""


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("list.yaml", YAML_LIST),
        (
            "nested.yml",
            "probes:\n" + "".join("  " + line + "\n" for line in YAML_LIST.splitlines()),
        ),
        (
            "lines.jsonl",
            json.dumps(AGREEMENT) + "\n\n   \n" + json.dumps("The cat sat on the") + "\n",
        ),
        ("list.json", json.dumps([AGREEMENT, "The cat sat on the"], indent=2)),
    ],
)
def test_from_file_reads_every_format(tmp_path: Path, name: str, content: str) -> None:
    probes = ProbeSet.from_file(write(tmp_path, name, content))
    assert probes.probes == EXPECTED


def test_from_file_accepts_a_utf8_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps(["Ein Bär ist"]).encode())
    assert ProbeSet.from_file(path)[0].text == "Ein Bär ist"


def test_coerce_accepts_set_list_and_paths(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", YAML_LIST)
    probes = ProbeSet(["The cat sat on the"])
    assert ProbeSet.coerce(probes) is probes
    assert ProbeSet.coerce(["The cat sat on the"])[0].text == "The cat sat on the"
    assert ProbeSet.coerce(str(path)).probes == EXPECTED
    assert ProbeSet.coerce(path).probes == EXPECTED
    with pytest.raises(ProbeError, match=r"probes must be a ProbeSet, a list .* got int"):
        ProbeSet.coerce(3)


# --- validation errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "pattern"),
    [
        ([{"target": "are"}], r"probe \(index 0\): missing required key 'text'"),
        (["ok", "   "], r"probe 'probe-1' \(index 1\): text must be a non-empty string"),
        ([{"text": 5}], r"text must be a non-empty string, got 5"),
        (
            [{"id": "k", "text": "The keys to the cabinet", "cues": ["key"]}],
            r"probe 'k' \(index 0\): cue 'key' does not occur as a whole word .*case-sensitive",
        ),
        ([{"text": "The keys are", "cues": ["Keys"]}], r"cue 'Keys' does not occur"),
        ([], r"the probe set is empty; give at least one probe"),
        (
            [{"id": "a", "text": "x y"}, {"id": "a", "text": "y z"}],
            r"probe 'a' \(index 1\): duplicate id 'a', already used by the probe at index 0",
        ),
        (
            [{"text": "x y", "tgt": "z"}],
            r"unknown key 'tgt'; valid keys are attractors, cues, foil, group, id, target, text",
        ),
        (
            [{"text": "The keys", "foil": "is"}],
            r"foil 'is' is given without a target; .* add the target word or drop the foil",
        ),
        ([{"text": "The keys", "target": ""}], r"target must be a non-empty string"),
        ([{"text": "The keys", "target": 1}], r"target must be a non-empty string .*got 1"),
        ([{"text": "The keys", "target": " are"}], r"target ' are' has surrounding whitespace"),
        ([{"text": "The keys", "id": 7}], r"id must be a string, got 7"),
        ([42], r"probe \(index 0\): got int 42; a probe is a text string, a mapping"),
        (
            [{"id": "k", "text": "The keys to the cabinets", "attractors": ["cabinet"]}],
            r"probe 'k' \(index 0\): attractor 'cabinet' does not occur as a whole word",
        ),
        ([{"text": "The keys", "attractors": [" keys"]}],
         r"attractor ' keys' must be a non-empty word without surrounding whitespace"),
        ([{"text": "The keys", "attractors": 3}], r"attractors must be a list of words, got 3"),
        ([{"text": "The keys near it", "cues": ["keys"], "attractors": ["keys"]}],
         r"'keys' is listed as a cue and as an attractor; .* keep it in one list"),
    ],
)
def test_bad_probes_raise_naming_probe_problem_and_fix(items: list, pattern: str) -> None:
    with pytest.raises(ProbeError, match=pattern):
        ProbeSet(items)


def test_probe_error_is_a_value_error() -> None:
    assert issubclass(ProbeError, ValueError)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "- text: ok\n- text: [unclosed\n")
    with pytest.raises(ProbeError, match=r"bad\.yaml' line \d+: malformed YAML"):
        ProbeSet.from_file(path)


def test_yaml_item_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "p.yaml", "probes:\n  - The cat sat\n  - text: The dog runs\n    cues: [cat]\n"
    )
    with pytest.raises(
        ProbeError, match=r"probe 'probe-1' \(index 1, .*p\.yaml line 3\): cue 'cat'"
    ):
        ProbeSet.from_file(path)


def test_yaml_top_level_must_be_list_or_probes_mapping(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match=r"single key 'probes'"):
        ProbeSet.from_file(write(tmp_path, "a.yaml", "probe:\n  - x y\n"))
    with pytest.raises(ProbeError, match=r"expected a list of probes, got str"):
        ProbeSet.from_file(write(tmp_path, "b.yaml", "just text\n"))
    with pytest.raises(ProbeError, match=r"b\.yaml': the probe set is empty"):
        ProbeSet.from_file(write(tmp_path, "b.yaml", "# nothing here\n"))


def test_malformed_jsonl_line_names_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '"The cat sat"\n\n{"text": "The dog",\n')
    with pytest.raises(ProbeError, match=r"p\.jsonl' line 3: malformed JSON"):
        ProbeSet.from_file(path)


def test_jsonl_item_error_names_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '"The cat sat"\n{"text": "x", "cue": ["x"]}\n')
    with pytest.raises(ProbeError, match=r"\(index 1, .*p\.jsonl line 2\): unknown key 'cue'"):
        ProbeSet.from_file(path)


def test_json_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match=r"expected a JSON list of probes, got dict"):
        ProbeSet.from_file(write(tmp_path, "p.json", json.dumps(AGREEMENT)))
    with pytest.raises(ProbeError, match=r"p\.json' line 2: malformed JSON"):
        ProbeSet.from_file(write(tmp_path, "p.json", '[\n "a" "b"]'))


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "latin1.yaml", "- Ein Bär ist\n".encode("latin-1"))
    with pytest.raises(ProbeError, match=r"latin1\.yaml' is not valid UTF-8 .*re-save it"):
        ProbeSet.from_file(path)


def test_unknown_suffix_lists_valid_suffixes(tmp_path: Path) -> None:
    path = write(tmp_path, "probes.txt", "The cat sat\n")
    with pytest.raises(
        ProbeError, match=r"suffix '\.txt'; use one of \.yaml, \.yml, \.jsonl, \.json"
    ):
        ProbeSet.from_file(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml' does not exist"):
        ProbeSet.from_file(tmp_path / "nope.yaml")


# --- encoding: causal ----------------------------------------------------------------------


def test_causal_byte_level_cues_targets_positions_and_padding(bpe) -> None:
    probes = ProbeSet(
        [
            AGREEMENT,
            {"text": "Paris is the capital of", "target": "France", "cues": ["Paris", "capital"]},
            {"text": "The cat"},
        ]
    )
    enc = probes.encode(bpe)
    assert enc.ids == ["agree", "probe-1", "probe-2"]
    lengths = [len(bpe(p.text)["input_ids"]) for p in probes]
    assert enc.input_ids.shape == (3, max(lengths))
    for row, (probe, n) in enumerate(zip(probes, lengths, strict=True)):
        assert enc.input_ids[row, :n].tolist() == bpe(probe.text)["input_ids"]
        assert (enc.input_ids[row, n:] == bpe.pad_token_id).all()  # right padding
        assert enc.attention_mask[row].tolist() == [1] * n + [0] * (enc.input_ids.shape[1] - n)
        assert not enc.cue_mask[row, n:].any()
        assert enc.positions[row].item() == n - 1  # last real token
        # Byte-level tokens are shown with spaces instead of 'Ġ' and spell the text back.
        assert "".join(enc.tokens[row]) == probe.text
    assert cue_text(bpe, enc, 0) == "keys"
    ids = enc.input_ids[1][enc.cue_mask[1]].tolist()
    assert [word(bpe, i) for i in ids] == ["Paris", "capital"]
    assert not enc.cue_mask[2].any()
    assert word(bpe, enc.targets[0].item()) == "are"
    assert word(bpe, enc.foils[0].item()) == "is"
    # The id is the in-context, leading-space form of the word.
    assert enc.targets[0].item() == bpe(" are", add_special_tokens=False)["input_ids"][0]
    assert word(bpe, enc.targets[1].item()) == "France"
    assert enc.foils[1].item() == -1
    assert enc.targets[2].item() == enc.foils[2].item() == -1
    assert enc.input_ids.dtype == enc.positions.dtype == enc.targets.dtype == torch.long
    assert enc.cue_mask.dtype == torch.bool
    assert enc.probes == probes.probes


def test_attractors_are_aligned_to_tokens_like_cues(bpe, wordpiece) -> None:
    probes = ProbeSet([
        {"text": "The key near the cabinets", "target": "is", "foil": "are", "cues": ["key"],
         "attractors": "cabinets"},  # a single word may be written bare
        {"text": "The cat", "cues": ["cat"]},
    ])
    assert probes[0].attractors == ("cabinets",)
    enc = probes.encode(bpe)
    ids = enc.input_ids[0][enc.attractor_mask[0]].tolist()
    assert [word(bpe, i) for i in ids] == ["cabinets"]
    assert not (enc.attractor_mask & enc.cue_mask).any() and not enc.attractor_mask[1].any()
    assert enc.select([0]).attractor_mask.shape == (1, enc.input_ids.shape[1])
    masked = ProbeSet([{"text": "The key near the cabinets [MASK] here.", "target": "is",
                        "cues": ["key"], "attractors": ["cabinets"]}])
    enc = masked.encode(wordpiece, objective="masked")
    ids = enc.input_ids[0][enc.attractor_mask[0]].tolist()
    assert [word(wordpiece, i) for i in ids] == ["cabinets"]
    # Without attractors anywhere there is no mask at all.
    assert ProbeSet(["The cat sat"]).encode(bpe).attractor_mask is None


def test_causal_cue_split_into_several_tokens_is_fully_marked(bpe) -> None:
    enc = ProbeSet([{"text": "The cabinetry keys", "cues": ["cabinetry"]}]).encode(bpe)
    assert enc.cue_mask[0].sum().item() >= 2  # "cabinetry" is not a whole token in this vocab
    assert cue_text(bpe, enc, 0) == "cabinetry"


def test_causal_word_piece_keeps_cls_and_drops_trailing_sep(wordpiece) -> None:
    enc = ProbeSet([AGREEMENT]).encode(wordpiece)
    tokens = enc.tokens[0]
    assert tokens == ["[CLS]", "The", "keys", "to", "the", "cabinet"]
    assert enc.positions[0].item() == len(tokens) - 1
    assert enc.cue_mask[0].tolist() == [False, False, True, False, False, False]
    assert word(wordpiece, enc.targets[0].item()) == "are"
    assert word(wordpiece, enc.foils[0].item()) == "is"


def test_causal_cue_on_the_last_token_is_kept(bpe) -> None:
    # The prediction at the last position sees that token, so it may be a cue.
    enc = ProbeSet([{"text": "The keys", "cues": ["keys"]}]).encode(bpe)
    assert enc.cue_mask[0, enc.positions[0]].item()


def test_pad_id_defaults_to_zero_without_pad_token() -> None:
    tokenizer = byte_level_tokenizer(pad=False)
    assert tokenizer.pad_token_id is None
    enc = ProbeSet(["The cat sat on the mat", "The cat"]).encode(tokenizer)
    n = len(tokenizer("The cat")["input_ids"])
    assert (enc.input_ids[1, n:] == 0).all()
    assert enc.attention_mask[1, n:].sum().item() == 0


def test_to_returns_a_moved_copy(bpe) -> None:
    enc = ProbeSet([AGREEMENT]).encode(bpe)
    moved = enc.to("cpu")
    assert moved is not enc
    assert isinstance(moved, EncodedProbes)
    for name in ("input_ids", "attention_mask", "cue_mask", "positions", "targets", "foils"):
        assert torch.equal(getattr(moved, name), getattr(enc, name))
        assert getattr(moved, name).device.type == "cpu"
    assert moved.tokens == enc.tokens and moved.ids == enc.ids and len(moved) == 1


def test_too_long_probe_names_count_and_limit(bpe) -> None:
    probes = ProbeSet([{"id": "long", "text": "The keys to the cabinet are on the table"}])
    n = len(bpe(probes[0].text)["input_ids"])
    assert len(probes.encode(bpe, max_length=n)) == 1  # exactly max_length is fine
    with pytest.raises(
        ProbeError,
        match=rf"probe 'long' \(index 0\): {n} tokens exceed max_length={n - 1}; shorten the probe "
        "or use a model with a longer context",
    ):
        probes.encode(bpe, max_length=n - 1)


def test_every_too_long_probe_is_named_or_counted_in_one_error(bpe) -> None:
    """Not one per start: the count, the first five with their lengths, the rest counted."""
    long_text = "The keys to the cabinet are on the table near the old red door"
    items = [{"id": f"long-{i}", "text": long_text + " again" * (i % 3)} for i in range(12)]
    items.insert(3, {"id": "short", "text": "The keys"})
    n = [len(bpe(item["text"])["input_ids"]) for item in items]
    limit = n[3]
    with pytest.raises(ProbeError) as caught:
        ProbeSet(items).encode(bpe, max_length=limit)
    named = "; ".join(f"probe '{items[i]['id']}' (index {i}): {n[i]} tokens"
                      for i in (0, 1, 2, 4, 5))
    assert str(caught.value) == (
        f"12 of 13 probes exceed max_length={limit} tokens (the longest has {max(n)}): "
        f"{named}; and 7 more; shorten or drop them, or use a model with a context of at "
        f"least {max(n)} tokens")


def test_multi_token_target_and_foil_explain_their_first_differing_token(bpe) -> None:
    # Unseen Cyrillic words start with the same bare-space byte token in this vocabulary.
    probes = ProbeSet([{"id": "bug", "text": "The cat", "target": "жук", "foil": "жаба"},
                       {"id": "solo", "text": "The cat", "target": "жук"},
                       {"id": "one", "text": "The cat", "target": "sat", "foil": "is"}])
    with pytest.warns(UserWarning, match=r"2 probe\(s\) have a target or foil of several "
                                         r"tokens: bug \(target 'жук' -> \[.*\]\); solo"
                      ) as record:
        enc = probes.encode(bpe)
    assert [w.filename for w in record] == [__file__]  # the caller's line
    prefix = bpe("The cat")["input_ids"]
    target = bpe(" жук", add_special_tokens=False)["input_ids"]
    foil = bpe(" жаба", add_special_tokens=False)["input_ids"]
    k = next(i for i, (a, b) in enumerate(zip(target, foil, strict=False)) if a != b)
    assert k >= 1
    # Shared pieces join the prefix; the explained token is the first that differs.
    n = len(prefix) + k
    assert enc.input_ids[0, :n].tolist() == prefix + target[:k]
    assert enc.attention_mask[0].sum() == n and enc.positions[0] == n - 1
    assert (enc.targets[0], enc.foils[0]) == (target[k], foil[k])
    assert not enc.cue_mask[0, len(prefix):].any()
    assert len(enc.target_tokens[0]) == len(target) and len(enc.foil_tokens[0]) == len(foil)
    # No foil: the target's first piece, prefix unchanged.
    assert enc.positions[1] == len(prefix) - 1 and enc.targets[1] == target[0]
    assert enc.foil_tokens[1] == [] and enc.target_tokens[2] == [" sat"]


def test_indistinguishable_target_and_foil_are_rejected(bpe) -> None:
    probes = ProbeSet([{"text": "The cat", "target": "жук", "foil": "жук"}])
    with pytest.raises(ProbeError, match=r"never differ token by token .* contrast .* "
                                         r"meaningless"):
        probes.encode(bpe)


def test_bad_encode_arguments(bpe) -> None:
    probes = ProbeSet(["The cat"])
    with pytest.raises(ValueError, match=r"objective must be one of causal, masked, got 'mlm'"):
        probes.encode(bpe, objective="mlm")
    with pytest.raises(ValueError, match=r"max_length must be a positive int or None, got 0"):
        probes.encode(bpe, max_length=0)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match=r"fast \(Rust-backed\) tokenizer, got SlowTokenizer"):
        probes.encode(SlowTokenizer())


# --- encoding: masked ----------------------------------------------------------------------


def test_masked_word_piece_position_target_and_cues(wordpiece) -> None:
    probes = ProbeSet(
        [
            {"text": "The keys to the [MASK] are lost.", "target": "cabinet", "cues": ["keys"]},
            {
                "text": "The key to the cabinets [MASK] on the table.",
                "target": "is",
                "foil": "are",
                "cues": ["key", "cabinets"],
            },
        ]
    )
    enc = probes.encode(wordpiece, objective="masked")
    for row in range(2):
        position = enc.positions[row].item()
        assert enc.input_ids[row, position].item() == wordpiece.mask_token_id
        assert enc.tokens[row][position] == "[MASK]"
        assert enc.tokens[row][0] == "[CLS]"
        n = enc.attention_mask[row].sum().item()
        assert enc.tokens[row][n - 1] == "[SEP]"  # masked input keeps its special tokens
        assert not enc.cue_mask[row, position].item()
    assert enc.positions[0].item() == 5
    assert cue_text(wordpiece, enc, 0) == "keys"
    ids = enc.input_ids[1][enc.cue_mask[1]].tolist()
    assert [word(wordpiece, i) for i in ids] == ["key", "cabinets"]
    assert word(wordpiece, enc.targets[0].item()) == "cabinet"
    assert enc.foils[0].item() == -1
    assert word(wordpiece, enc.targets[1].item()) == "is"
    assert word(wordpiece, enc.foils[1].item()) == "are"


def test_masked_byte_level_uses_space_form_after_a_space() -> None:
    masked = byte_level_tokenizer(mask=True)
    probes = ProbeSet(
        [
            {"text": "The keys to the cabinet [MASK] lost.", "target": "are", "cues": ["keys"]},
            {"text": "[MASK] is the capital of France.", "target": "Paris", "cues": ["France"]},
        ]
    )
    enc = probes.encode(masked, objective="masked")
    assert enc.targets[0].item() == masked(" are", add_special_tokens=False)["input_ids"][0]
    assert enc.targets[1].item() == masked("Paris", add_special_tokens=False)["input_ids"][0]
    assert enc.positions.tolist() == [5, 0]
    assert enc.input_ids[0, 5].item() == masked.mask_token_id
    # Cue spans are shifted past "<mask>", which is one character longer than "[MASK]".
    assert cue_text(masked, enc, 1) == "France"
    assert cue_text(masked, enc, 0) == "keys"


def test_masked_placeholder_must_occur_exactly_once(wordpiece) -> None:
    with pytest.raises(ProbeError, match=r"probe 'probe-0' .*\[MASK\] exactly once, found 0"):
        ProbeSet(["The keys are lost"]).encode(wordpiece, objective="masked")
    with pytest.raises(ProbeError, match=r"exactly once, found 2"):
        ProbeSet(["The [MASK] are [MASK]"]).encode(wordpiece, objective="masked")


def test_masked_cue_inside_placeholder_is_rejected(wordpiece) -> None:
    probes = ProbeSet([{"text": "The [MASK] are lost", "cues": ["MASK"]}])
    with pytest.raises(ProbeError, match=r"cue 'MASK' only occurs inside the \[MASK\] placeholder"):
        probes.encode(wordpiece, objective="masked")


def test_encode_errors_name_file_and_line(tmp_path: Path, wordpiece) -> None:
    probes = ProbeSet.from_file(write(tmp_path, "p.jsonl", '"The [MASK] sat"\n\n"The cat sat"\n'))
    with pytest.raises(
        ProbeError, match=r"probe 'probe-1' \(index 1, .*p\.jsonl line 3\): .*found 0"
    ):
        probes.encode(wordpiece, objective="masked")


def test_masked_needs_a_mask_token(bpe) -> None:
    with pytest.raises(ProbeError, match=r"has none; use objective=\"causal\" or a tokenizer"):
        ProbeSet(["The [MASK] sat"]).encode(bpe, objective="masked")


def test_masked_indistinguishable_pair_is_rejected(wordpiece) -> None:
    # Both words are out of vocabulary, so both become [UNK].
    probes = ProbeSet([{"text": "The [MASK] sat", "target": "жук", "foil": "жаба"}])
    with pytest.raises(ProbeError, match=r"never differ token by token \(shared pieces "
                                         r"\['\[UNK\]'\]"):
        probes.encode(wordpiece, objective="masked")


def test_masked_multi_token_pieces_go_before_the_mask(wordpiece) -> None:
    target = wordpiece("cabinetry", add_special_tokens=False)["input_ids"]
    foil = wordpiece("cabineta", add_special_tokens=False)["input_ids"]
    k = next(i for i, (a, b) in enumerate(zip(target, foil, strict=False)) if a != b)
    assert k >= 1, (target, foil)
    probes = ProbeSet([{"text": "The [MASK] sat", "target": "cabinetry", "foil": "cabineta"}])
    with pytest.warns(UserWarning, match="several tokens"):
        enc = probes.encode(wordpiece, objective="masked")
    position = int(enc.positions[0])
    assert enc.input_ids[0, position] == wordpiece.mask_token_id
    assert enc.input_ids[0, position - k : position].tolist() == target[:k]
    assert (enc.targets[0], enc.foils[0]) == (target[k], foil[k])
