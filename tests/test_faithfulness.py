"""AOPC on models whose answer is known exactly, the masking rules, batching, and the table."""

from __future__ import annotations

import math
from types import SimpleNamespace

import models
import numpy as np
import pytest
import torch
from torch import nn

from normx_callbacks.adapters import ModelAdapter
from normx_callbacks.encoding import EncodedProbes
from normx_callbacks.faithfulness import (
    RANDOM_PERMUTATIONS,
    aopc,
    faithfulness_rows,
    faithfulness_table,
)
from normx_callbacks.removal import (
    FRACTIONS,
    Replacement,
    ranks,
    removal_counts,
    removal_masks,
    resolve_replacement,
    special_token_mask,
)

V, C, R = 12, 3, 0  # vocabulary, classes, replacement id (its weight row is zero)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, C, generator=g)
    w[R] = 0.0
    return w


class BagOfWords(nn.Module):
    """logits(row) = sum of W[id] over the real tokens (causal: over tokens 0..t)."""

    def __init__(self, weight, causal=False):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.emb.weight.data.copy_(weight)
        self.causal = causal
        self.calls = []  # input_ids of every forward pass, to inspect the batches

    def states(self, ids, mask):
        self.calls.append(ids.clone())
        x0 = self.emb(ids) * mask[..., None]  # (B, T, C)
        last = x0.cumsum(1) if self.causal else x0.sum(1, keepdim=True).expand_as(x0)
        return [x0, last]


def _adapter(model, kind="classifier"):
    return ModelAdapter(
        module=model,
        embedding=model.emb,
        hidden_states=model.states,
        head=lambda x: x,
        kind=kind,
        pool_position="first",
        num_layers=1,
    )


def _count(k, n, removal):
    """Tokens removed at fraction k of n candidates, written out per rule."""
    if removal == "floor":
        return int(n * k)
    if n < 2:
        return n
    return min(max(math.floor(k * n + 0.5), 1), n - 1)


def _reference(weight, ids, mask, pos, scores, causal=False, protect=None, targets=None,
               removal="nearest"):
    """AOPC written out independently: Python sort, explicit loops, numpy softmax."""
    w = weight.double().numpy()
    comp, suff = [], []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        last = pos[b] if causal else len(row) - 1

        def prob(tokens, b=b, last=last):
            z = sum(w[tokens[j]] for j in range(last + 1) if mask[b, j])
            p = np.exp(z - z.max())
            return p / p.sum()

        p0 = prob(row)
        y = int(p0.argmax()) if targets is None or targets[b] is None else targets[b]
        cands = [
            j
            for j in range(len(row))
            if mask[b, j]
            and j != pos[b]
            and not math.isnan(scores[b, j])
            and not (causal and j > pos[b])
            and not (protect is not None and protect[b, j])
        ]
        order = sorted(cands, key=lambda j, b=b: (-float(scores[b, j]), j))
        c_row, s_row = [], []
        for k in FRACTIONS:
            top = set(order[: _count(k, len(cands), removal)])
            removed = [R if j in top else t for j, t in enumerate(row)]
            kept = [R if (j in cands and j not in top) else t for j, t in enumerate(row)]
            c_row.append(p0[y] - prob(removed)[y])
            s_row.append(p0[y] - prob(kept)[y])
        comp.append(c_row)
        suff.append(s_row)
    return np.array(comp), np.array(suff)


def test_hand_computed_two_token_example():
    # [CLS] a b: logit_1 = 2 (a) + 1 (b), class 0 fixed at 0; a outranks b.
    w = torch.zeros(V, 2)
    w[3, 1], w[4, 1] = 2.0, 1.0
    model = BagOfWords(torch.zeros(V, C))
    model.emb = nn.Embedding(V, 2)
    model.emb.weight.data.copy_(w)
    ids = torch.tensor([[5, 3, 4]])
    scores = torch.tensor([[9.0, 1.0, 0.5]])
    out = aopc(_adapter(model), ids, None, [0], scores, replacement=R, removal="floor")
    s = torch.sigmoid
    # n = 2 candidates: int(2k) = 0 for k < 0.5 (nothing / everything removed), 1 after.
    comp = 5 / 9 * (s(torch.tensor(3.0)) - s(torch.tensor(1.0)))
    suff = 4 / 9 * (s(torch.tensor(3.0)) - 0.5) + 5 / 9 * (
        s(torch.tensor(3.0)) - s(torch.tensor(2.0))
    )
    assert out["comprehensiveness"] == pytest.approx(float(comp), abs=1e-6)
    assert out["sufficiency"] == pytest.approx(float(suff), abs=1e-6)
    assert out["targets"].tolist() == [1]
    assert out["n_candidates"].tolist() == [2]
    assert out["degenerate_cells"].tolist() == [4]  # floor: nothing removed for k < 0.5
    # nearest: exactly one of the two removed at every k, so no cell is degenerate.
    out = aopc(_adapter(model), ids, None, [0], scores, replacement=R)
    assert out["comprehensiveness"] == pytest.approx(float(s(torch.tensor(3.0))
                                                          - s(torch.tensor(1.0))), abs=1e-6)
    assert out["sufficiency"] == pytest.approx(float(s(torch.tensor(3.0))
                                                     - s(torch.tensor(2.0))), abs=1e-6)
    assert out["degenerate_cells"].tolist() == [0]
    assert out["removal_counts"].tolist() == [[1] * 9]


@pytest.mark.parametrize("removal", ["nearest", "floor"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_independent_reference(causal, removal):
    weight = _weights()
    model = BagOfWords(weight, causal=causal)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 8:] = 0
    pos = torch.tensor([0, 5, 4, 7]) if causal else torch.zeros(4, dtype=torch.long)
    scores = torch.randn(4, 9, generator=g)
    scores[0, 2] = scores[0, 5] = scores[0, 7]  # ties: earlier position first
    scores[2, 3] = float("nan")
    protect = torch.zeros_like(ids, dtype=torch.bool)
    protect[2, 1] = True
    targets = torch.tensor([-1, 2, -1, 0])
    kind = "causal" if causal else "classifier"
    out = aopc(
        _adapter(model, kind),
        ids,
        mask,
        pos,
        scores,
        replacement=R,
        targets=targets,
        protect=protect,
        removal=removal,
    )
    comp, suff = _reference(
        weight,
        ids,
        mask,
        pos.tolist(),
        scores,
        causal,
        protect,
        [None if t < 0 else int(t) for t in targets],
        removal=removal,
    )
    assert out["targets"][1] == 2 and out["targets"][3] == 0
    np.testing.assert_allclose(out["comprehensiveness_rows"].numpy(), comp.mean(1), atol=1e-6)
    np.testing.assert_allclose(out["sufficiency_rows"].numpy(), suff.mean(1), atol=1e-6)
    np.testing.assert_allclose(out["comprehensiveness_curve"].numpy(), comp.mean(0), atol=1e-6)
    np.testing.assert_allclose(out["sufficiency_curve"].numpy(), suff.mean(0), atol=1e-6)
    assert out["comprehensiveness"] == pytest.approx(comp.mean(), abs=1e-6)
    assert out["sufficiency"] == pytest.approx(suff.mean(), abs=1e-6)


def test_explained_position_never_masked_and_all_variants_batched():
    model = BagOfWords(_weights(), causal=True)
    ids = torch.randint(1, V, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    pos = torch.tensor([7, 3, 5])
    scores = torch.arange(8.0).flip(0).expand(3, 8).clone()
    scores[:, :] += 100 * (torch.arange(8) == pos[:, None])  # explained token ranked first
    comp, suff, counts = removal_masks(mask, pos, scores, causal=True, removal="floor")
    assert comp.shape == suff.shape == (9, 3, 8)
    rows = torch.arange(3)
    after = torch.arange(8)[None, :] > pos[:, None]
    for removed in (comp, suff):
        assert not removed[:, rows, pos].any()  # the explained token: never removed
        assert not removed[:, after].any()  # causal: what follows it is untouched
        assert not removed[:, mask == 0].any()  # padding
    n = torch.tensor([7, 3, 5])
    for k, frac in enumerate(FRACTIONS):
        expected = torch.tensor([int(int(v) * frac) for v in n])
        assert torch.equal(comp[k].sum(1), expected) and torch.equal(counts[k], expected)
        assert torch.equal(comp[k].sum(1) + suff[k].sum(1), n)  # they partition candidates
        assert not (comp[k] & suff[k]).any()
        # Highest scores first: the lowest positions here.
        for b in range(3):
            assert comp[k, b].nonzero().flatten().tolist() == list(range(expected[b]))

    # aopc forwards exactly these variants, each distinct one once, stacked in batches of
    # at most 10 after 1 pass for the originals (short rows repeat across fractions).
    model.calls.clear()
    aopc(_adapter(model, "causal"), ids, mask, pos, scores, replacement=R, batch_size=10,
         removal="floor")
    variants = torch.where(torch.stack([comp, suff]), R, ids)  # removed tokens overwritten
    distinct = torch.unique(variants.reshape(-1, 8), dim=0)
    assert len(distinct) < 54  # duplicates exist here, so the test shows they are skipped
    sizes = [len(c) for c in model.calls]
    assert sizes[0] == 3 and all(s <= 10 for s in sizes[1:]) and sum(sizes[1:]) == len(distinct)
    seen = torch.cat(model.calls[1:])
    assert torch.equal(torch.unique(seen, dim=0), distinct) and len(seen) == len(distinct)


def test_ranks_are_deterministic_with_ties_and_candidates_first():
    scores = torch.tensor([[1.0, 3.0, 3.0, -torch.inf, 3.0, float("nan")]])
    cand = torch.tensor([[True, True, True, True, True, False]])
    assert ranks(scores, cand).tolist() == [[3, 0, 1, 4, 2, 5]]


def test_batched_equals_one_at_a_time_on_gpt2():
    model = models.build("gpt2")
    ids = models.random_ids(4, 9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 7:] = 0
    scores = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    gold = torch.tensor([5, -1, 7, 9])
    big = aopc(model, ids, mask, None, scores, replacement=1, gold=gold, batch_size=64)
    small = aopc(model, ids, mask, None, scores, replacement=1, gold=gold, batch_size=1)
    for key in ("comprehensiveness_probs", "sufficiency_probs", "original_probs"):
        torch.testing.assert_close(big[key], small[key], atol=1e-6, rtol=1e-5)
    for b in range(4):
        length = int(mask[b].sum())
        one = aopc(
            model, ids[b : b + 1, :length], None, None, scores[b : b + 1, :length], replacement=1
        )
        torch.testing.assert_close(
            one["comprehensiveness_probs"][0],
            big["comprehensiveness_probs"][b],
            atol=1e-6,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            one["sufficiency_probs"][0], big["sufficiency_probs"][b], atol=1e-6, rtol=1e-5
        )
    assert "accuracy" in big and 0.0 <= big["accuracy"] <= 1.0
    assert big["comprehensiveness_accuracy_curve"].shape == (9,)


def test_accuracy_against_gold_known():
    weight = _weights(1)
    model = BagOfWords(weight)
    ids = torch.tensor([[5, 3, 4, 6], [7, 8, 9, 10]])
    logits = weight[ids].sum(1)
    predicted = logits.argmax(1)
    gold = torch.tensor([int(predicted[0]), (int(predicted[1]) + 1) % C])
    out = aopc(_adapter(model), ids, None, [0, 0], torch.randn(2, 4), replacement=R, gold=gold)
    assert out["accuracy"] == pytest.approx(0.5)
    no_gold = aopc(
        _adapter(model),
        ids,
        None,
        [0, 0],
        torch.randn(2, 4),
        replacement=R,
        gold=torch.tensor([-1, -1]),
    )
    assert "accuracy" not in no_gold


def test_errors_name_the_parameter():
    model = _adapter(BagOfWords(_weights()))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="replacement token id"):
        aopc(model, ids, None, [0], torch.zeros(1, 3), replacement=V)
    with pytest.raises(ValueError, match="removal='round'"):
        aopc(model, ids, None, [0], torch.zeros(1, 3), replacement=R, removal="round")
    with pytest.raises(ValueError, match="accepts_mask=False"):
        no_mask = _adapter(BagOfWords(_weights()))
        no_mask.accepts_mask = False
        aopc(no_mask, ids, None, [0], torch.zeros(1, 3), replacement="attention")
    with pytest.raises(ValueError, match="scores"):
        aopc(model, ids, None, [0], torch.zeros(1, 4), replacement=R)
    with pytest.raises(ValueError, match="fractions"):
        aopc(model, ids, None, [0], torch.zeros(1, 3), replacement=R, fractions=(0.0,))
    with pytest.raises(ValueError, match="regression"):
        aopc(models.build("bert_reg"), ids, None, None, torch.zeros(1, 3), replacement=R)


def test_resolve_replacement_and_special_token_mask():
    gpt2 = SimpleNamespace(mask_token_id=None, unk_token_id=None, pad_token_id=None,
                           eos_token_id=50256, eos_token="<|endoftext|>")
    found = resolve_replacement(gpt2)
    assert found == Replacement("eos", 50256, "<|endoftext|>")  # auto without a mask token
    assert "eos token '<|endoftext|>' (id 50256)" in found.describe()
    bert = SimpleNamespace(mask_token_id=103, mask_token="[MASK]", unk_token_id=100)
    assert resolve_replacement(bert).token_id == 103
    assert resolve_replacement(bert, "unk").token_id == 100
    assert resolve_replacement(SimpleNamespace()).strategy == "attention"
    assert resolve_replacement(bert, "attention").token_id is None
    with pytest.raises(ValueError, match="no pad token .*it has: mask, unk"):
        resolve_replacement(bert, "pad")
    with pytest.raises(ValueError, match="not one of"):
        resolve_replacement(bert, "zero")


def test_auto_replacement_for_a_model_without_attention_mask_falls_back_to_a_token():
    # A word-level tokenizer with only [UNK] and [PAD], as a hand-written run may have.
    words = SimpleNamespace(unk_token_id=0, unk_token="[UNK]", pad_token_id=1, pad_token="[PAD]")
    assert resolve_replacement(words).strategy == "attention"
    assert resolve_replacement(words, attention=False) == Replacement("unk", 0, "[UNK]")
    pad_only = SimpleNamespace(pad_token_id=1, pad_token="[PAD]")
    assert resolve_replacement(pad_only, attention=False) == Replacement("pad", 1, "[PAD]")
    with pytest.raises(ValueError, match="no eos token"):
        resolve_replacement(SimpleNamespace(), attention=False)
    tok = SimpleNamespace(all_special_ids=[0, 2, 2])
    assert special_token_mask(torch.tensor([[0, 1, 2, 3]]), tok).tolist() == [
        [True, False, True, False]
    ]


@pytest.mark.parametrize("n", range(1, 13))
def test_nearest_rule_leaves_no_degenerate_cell_from_two_candidates(n):
    counts = removal_counts(torch.tensor([n]), FRACTIONS)[:, 0]
    if n >= 2:
        assert ((counts >= 1) & (counts <= n - 1)).all()  # neither nothing nor everything
    else:
        assert counts.tolist() == [1] * len(FRACTIONS)
    floor = removal_counts(torch.tensor([n]), FRACTIONS, "floor")[:, 0]
    assert floor.tolist() == [int(n * k) for k in FRACTIONS]


def test_special_tokens_are_protected_by_default():
    model = BagOfWords(_weights())
    ids = torch.tensor([[5, 3, 4, 7, 6]])
    scores = torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]])  # 4 and 7 rank highest
    tok = SimpleNamespace(all_special_ids=[4, 7])
    out = aopc(_adapter(model), ids, None, [0], scores, replacement=R, tokenizer=tok)
    assert out["n_candidates"].tolist() == [2]  # 3 and 6: the special 4 and 7 never removed
    bare = aopc(_adapter(model), ids, None, [0], scores, replacement=R, tokenizer=tok,
                protect=None)
    assert bare["n_candidates"].tolist() == [4]
    # Without a tokenizer, a Hugging Face config's special ids are protected.
    gpt2 = models.build("gpt2")
    gpt2.config.eos_token_id = 7
    out = aopc(gpt2, ids, None, None, scores, replacement=1)
    assert out["n_candidates"].tolist() == [3]  # 5, 3, 4 (7 is eos; 6 is explained)


def test_attention_deletion_keeps_positions():
    model = models.build("gpt2")
    ids = models.random_ids(1, 6)
    scores = torch.tensor([[9.0, 1.0, 2.0, 8.0, 0.5, 0.0]])  # positions 0 and 3 rank first
    out = aopc(model, ids, None, None, scores, replacement="attention", fractions=(0.4,),
               protect=None)
    assert out["replacement"] == Replacement("attention")
    assert out["removal_counts"].tolist() == [[2]]  # round(0.4 * 5)
    with torch.no_grad():
        full = model(ids).logits[0, -1].softmax(-1)
        target = int(full.argmax())
        kept = torch.tensor([[0, 1, 1, 0, 1, 1]])
        comp = model(ids, attention_mask=kept, position_ids=torch.arange(6)[None]).logits
        suff = model(ids, attention_mask=1 - kept + torch.eye(6, dtype=torch.long)[5],
                     position_ids=torch.arange(6)[None]).logits
    expected_comp = full[target] - comp[0, -1].softmax(-1)[target]
    expected_suff = full[target] - suff[0, -1].softmax(-1)[target]
    assert out["comprehensiveness"] == pytest.approx(float(expected_comp), abs=1e-5)
    assert out["sufficiency"] == pytest.approx(float(expected_suff), abs=1e-5)


def _encoded(ids, mask, positions, targets):
    n = ids.shape[0]
    return EncodedProbes(
        ids=[f"p{i}" for i in range(n)],
        input_ids=ids,
        attention_mask=mask,
        tokens=[[] for _ in range(n)],
        cue_mask=torch.zeros_like(ids, dtype=torch.bool),
        positions=positions,
        targets=targets,
        foils=torch.full((n,), -1),
        probes=[],
    )


def test_faithfulness_table_on_gpt2():
    model = models.build("gpt2")
    ids = models.random_ids(3, 6)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    positions = torch.tensor([5, 5, 3])
    probes = _encoded(ids, mask, positions, torch.tensor([4, -1, 8]))
    table = faithfulness_table(
        model, probes, ("normxlogit", "random", "saliency"), replacement=1, n_steps=4
    )
    assert list(table["method"]) == ["normxlogit", "random", "saliency"]
    assert list(table.columns) == [
        "method",
        "comprehensiveness",
        "comprehensiveness_low",
        "comprehensiveness_high",
        "sufficiency",
        "sufficiency_low",
        "sufficiency_high",
        "accuracy",
        "comprehensiveness_accuracy",
        "sufficiency_accuracy",
        "seconds_per_instance",
        "peak_memory_mb",
        "n_instances",
        "n_candidates_min",
        "n_candidates_median",
        "degenerate_cells",
        "cells",
        "replacement",
        "replacement_token",
        "removal",
    ]
    assert set(table["replacement"]) == {"token"} and set(table["replacement_token"]) == {"1"}
    assert set(table["removal"]) == {"nearest"}
    for name in ("comprehensiveness", "sufficiency"):  # intervals cover the estimate
        assert (table[f"{name}_low"] <= table[name]).all()
        assert (table[name] <= table[f"{name}_high"]).all()
    assert table["peak_memory_mb"].isna().all()  # CPU: see the docstring
    assert (table["seconds_per_instance"] > 0).all()
    # Same numbers as aopc on the method's scores.
    from normx_callbacks.methods import attribute

    # Each probe's own target where it has one (row 1 has none: the argmax); random is the
    # mean over RANDOM_PERMUTATIONS seeded rankings, not one draw.
    targets = torch.tensor([4, -1, 8])
    draws = [aopc(model, ids, mask, positions,
                  attribute("random", model, ids, mask, positions, seed=i),
                  replacement=1, targets=targets)["comprehensiveness"]
             for i in range(RANDOM_PERMUTATIONS)]
    assert table["comprehensiveness"][1] == pytest.approx(np.mean(draws), rel=1e-4)
    assert np.std(draws) > 0  # the draws differ, so the mean is not one of them
    rows = faithfulness_rows(model, probes, ("normxlogit",), replacement=1)
    assert rows["explained"].tolist() == ["target", "argmax", "target"]
    direct = aopc(model, ids, mask, positions,
                  attribute("normxlogit", model, ids, mask, positions, targets),
                  replacement=1, targets=targets)
    np.testing.assert_allclose(rows["comprehensiveness"], direct["comprehensiveness_rows"])
    argmax = faithfulness_rows(model, probes, ("normxlogit",), replacement=1, explain="argmax")
    assert set(argmax["explained"]) == {"argmax"}
    original = aopc(model, ids, mask, positions,
                    attribute("normxlogit", model, ids, mask, positions), replacement=1)
    np.testing.assert_allclose(argmax["comprehensiveness"],
                               original["comprehensiveness_rows"])
    assert rows["correct"].tolist()[::2] == argmax["correct"].tolist()[::2]
    no_gold = faithfulness_table(
        model, _encoded(ids, mask, positions, torch.full((3,), -1)), ("norm",), replacement=1
    )
    assert "accuracy" not in no_gold.columns
    with pytest.raises(ValueError, match="valid names"):
        faithfulness_table(model, probes, ("lime",), replacement=1)
