"""AOPC on models whose answer is known exactly, the masking rules, batching, and the table."""

from __future__ import annotations

import math
from types import SimpleNamespace

import models
import numpy as np
import pytest
import torch
from torch import nn

from normx_callbacks.faithfulness import (
    FRACTIONS,
    aopc,
    faithfulness_table,
    masked_variants,
    ranks,
    replacement_for,
    special_token_mask,
)
from normx_callbacks.heads import ModelAdapter
from normx_callbacks.probes import EncodedProbes

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


def _reference(weight, ids, mask, pos, scores, causal=False, protect=None, targets=None):
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
            top = set(order[: int(len(cands) * k)])
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
    out = aopc(_adapter(model), ids, None, [0], torch.tensor([[9.0, 1.0, 0.5]]), replacement_id=R)
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


@pytest.mark.parametrize("causal", [False, True])
def test_matches_independent_reference(causal):
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
        replacement_id=R,
        targets=targets,
        protect=protect,
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
    comp, suff = masked_variants(ids, mask, pos, scores, replacement_id=R, causal=True)
    assert comp.shape == suff.shape == (9, 3, 8)
    rows = torch.arange(3)
    for variant in (comp, suff):
        assert torch.equal(variant[:, rows, pos], ids[rows, pos].expand(9, 3))  # never masked
        after = torch.arange(8)[None, :] > pos[:, None]
        assert torch.equal(variant[:, after], ids[after].expand(9, -1))  # causal: untouched
        assert torch.equal(variant[:, mask == 0], ids[mask == 0].expand(9, -1))  # padding
    n = torch.tensor([7, 3, 5])
    for k, frac in enumerate(FRACTIONS):
        removed_c = (comp[k] != ids).sum(1)
        removed_s = (suff[k] != ids).sum(1)
        expected = torch.tensor([int(int(v) * frac) for v in n])
        assert torch.equal(removed_c, expected)
        assert torch.equal(removed_c + removed_s, n)  # the two variants partition candidates
        # Highest scores first: the lowest positions here.
        for b in range(3):
            assert (comp[k, b] != ids[b]).nonzero().flatten().tolist() == list(range(expected[b]))

    # aopc forwards exactly these variants, stacked: 1 pass for the originals plus
    # ceil(2 * 9 * 3 / 10) = 6 for the 54 variant rows.
    model.calls.clear()
    aopc(_adapter(model, "causal"), ids, mask, pos, scores, replacement_id=R, batch_size=10)
    assert [len(c) for c in model.calls] == [3, 10, 10, 10, 10, 10, 4]
    seen = torch.cat(model.calls[1:])
    assert torch.equal(seen, torch.stack([comp, suff]).reshape(-1, 8))


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
    big = aopc(model, ids, mask, None, scores, replacement_id=1, gold=gold, batch_size=64)
    small = aopc(model, ids, mask, None, scores, replacement_id=1, gold=gold, batch_size=1)
    for key in ("comprehensiveness_probs", "sufficiency_probs", "original_probs"):
        torch.testing.assert_close(big[key], small[key], atol=1e-6, rtol=1e-5)
    for b in range(4):
        length = int(mask[b].sum())
        one = aopc(
            model, ids[b : b + 1, :length], None, None, scores[b : b + 1, :length], replacement_id=1
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
    out = aopc(_adapter(model), ids, None, [0, 0], torch.randn(2, 4), replacement_id=R, gold=gold)
    assert out["accuracy"] == pytest.approx(0.5)
    no_gold = aopc(
        _adapter(model),
        ids,
        None,
        [0, 0],
        torch.randn(2, 4),
        replacement_id=R,
        gold=torch.tensor([-1, -1]),
    )
    assert "accuracy" not in no_gold


def test_errors_name_the_parameter():
    model = _adapter(BagOfWords(_weights()))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="replacement_id"):
        aopc(model, ids, None, [0], torch.zeros(1, 3), replacement_id=V)
    with pytest.raises(ValueError, match="scores"):
        aopc(model, ids, None, [0], torch.zeros(1, 4), replacement_id=R)
    with pytest.raises(ValueError, match="fractions"):
        aopc(model, ids, None, [0], torch.zeros(1, 3), replacement_id=R, fractions=(0.0,))
    with pytest.raises(ValueError, match="regression"):
        aopc(models.build("bert_reg"), ids, None, None, torch.zeros(1, 3), replacement_id=R)


def test_replacement_for_and_special_token_mask():
    tok = SimpleNamespace(
        mask_token_id=None, unk_token_id=None, pad_token_id=None, eos_token_id=50256
    )
    assert replacement_for(tok) == 50256
    assert replacement_for(SimpleNamespace(mask_token_id=103, unk_token_id=100)) == 103
    assert replacement_for(SimpleNamespace(mask_token_id=None, unk_token_id=100)) == 100
    with pytest.raises(ValueError, match="replacement_id"):
        replacement_for(SimpleNamespace())
    tok = SimpleNamespace(all_special_ids=[0, 2, 2])
    assert special_token_mask(torch.tensor([[0, 1, 2, 3]]), tok).tolist() == [
        [True, False, True, False]
    ]


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
        model, probes, ("normxlogit", "random", "saliency"), replacement_id=1, n_steps=4
    )
    assert list(table["method"]) == ["normxlogit", "random", "saliency"]
    assert list(table.columns) == [
        "method",
        "comprehensiveness",
        "sufficiency",
        "accuracy",
        "comprehensiveness_accuracy",
        "sufficiency_accuracy",
        "seconds_per_instance",
        "peak_memory_mb",
        "n_instances",
    ]
    assert table["peak_memory_mb"].isna().all()  # CPU: see the docstring
    assert (table["seconds_per_instance"] > 0).all()
    # Same numbers as aopc on the method's scores.
    from normx_callbacks.methods import attribute

    scores = attribute("random", model, ids, mask, positions, seed=0)
    direct = aopc(model, ids, mask, positions, scores, replacement_id=1)
    assert table["comprehensiveness"][1] == pytest.approx(direct["comprehensiveness"])
    no_gold = faithfulness_table(
        model, _encoded(ids, mask, positions, torch.full((3,), -1)), ("norm",), replacement_id=1
    )
    assert "accuracy" not in no_gold.columns
    with pytest.raises(ValueError, match="valid names"):
        faithfulness_table(model, probes, ("lime",), replacement_id=1)
