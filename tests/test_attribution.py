"""normxlogit invariants on every supported family, and its errors."""

from __future__ import annotations

import models
import pytest
import torch
from torch import nn

from normx_callbacks import (
    mask_positions,
    normxlogit,
    resolve_adapter,
)

LM = sorted(models.CAUSAL) + sorted(models.MASKED)
EVERY = sorted(models.ALL)


def _batch(name, batch=3, length=7):
    ids = models.random_ids(batch, length)
    mask = torch.ones_like(ids)
    positions = None
    if models.ALL[name] == "masked":
        positions = torch.tensor([2, 3, 4][:batch])
    return ids, mask, positions


@pytest.mark.parametrize("name", LM)
def test_last_layer_logat_equals_model_logits(name):
    model = models.build(name)
    ids, mask, positions = _batch(name)
    attr = normxlogit(model, ids, mask, positions=positions, layers="all")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    expected = logits[torch.arange(3)[:, None], torch.arange(7)[None, :], attr.targets[:, None]]
    expected = torch.where(attr.valid, expected, torch.nan)
    torch.testing.assert_close(attr.logat, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    # Layer-wise output at the last layer is the same number (final norm not applied twice).
    torch.testing.assert_close(attr.layer_logat[:, -1], attr.logat, equal_nan=True)
    # Default target: the model's argmax at the explained position.
    rows = torch.arange(3)
    assert torch.equal(attr.targets, logits[rows, attr.positions].argmax(-1))
    probs = logits[rows, attr.positions].softmax(-1)[rows, attr.targets]
    torch.testing.assert_close(attr.target_probs, probs)
    torch.testing.assert_close(attr.scores, attr.norms * attr.logat, equal_nan=True)


@pytest.mark.parametrize("name", sorted(models.CLASSIFIER) + sorted(models.REGRESSION))
def test_classifier_logat_at_pooled_token_equals_model_logits(name):
    model = models.build(name)
    ids = models.random_ids(1, 6)
    attr = normxlogit(model, ids, layers="all")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()[0]
    pooled = attr.positions[0]
    if attr.kind == "regression":
        # |HoT(x_i) - HoT(x_pool)| is zero at the pooled token by construction.
        assert attr.logat[0, pooled].item() == pytest.approx(0.0, abs=1e-6)
        torch.testing.assert_close(attr.target_logits[0], logits[0])
        assert (attr.logat[0] >= 0).all()
    else:
        torch.testing.assert_close(attr.logat[0, pooled], logits[attr.targets[0]])
    expected_pool = 0 if name.startswith(("bert", "roberta")) else 5
    assert pooled.item() == expected_pool


# Left padding is a decoder convention; encoders are tested with right padding.
PADDING_CASES = [(n, "right") for n in EVERY] + [(n, "left") for n in sorted(models.CAUSAL)]


@pytest.mark.parametrize("name, side", PADDING_CASES)
def test_padded_batch_matches_each_row_alone(name, side):
    model = models.build(name)
    lengths = [7, 4, 5]
    rows = [models.random_ids(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.full((3, width), 1)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, sl] = row
        mask[i, sl] = 1
    positions = None
    if models.ALL[name] == "masked":
        positions = torch.tensor([1, 1, 1])
    batched = normxlogit(model, ids, mask, positions=positions, layers="all")
    for i, row in enumerate(rows):
        alone = normxlogit(model, row[None], positions=None if positions is None else positions[i:i + 1],
                           layers="all")
        keep = mask[i].bool()
        torch.testing.assert_close(batched.scores[i, keep], alone.scores[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(batched.layer_logat[i][:, keep], alone.layer_logat[0],
                                   atol=2e-5, rtol=1e-4)
        assert torch.isnan(batched.scores[i, ~keep]).all()
        assert batched.targets[i] == alone.targets[0]


def _model_state(model: nn.Module):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "bert_cls"])
def test_model_state_untouched_even_when_the_call_raises(name):
    model = models.build(name)
    model.train()
    model.get_input_embeddings().training = False  # a mixed flag that must survive
    first = next(model.parameters())
    first.requires_grad_(False)
    model(input_ids=models.random_ids(2, 5)).logits.sum().backward()
    before = _model_state(model)
    ids, mask, positions = _batch(name)
    attr = normxlogit(model, ids, mask, positions=positions, layers="all")
    assert not attr.scores.requires_grad
    after = _model_state(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for a, b in zip(after["grad"], before["grad"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    adapter = resolve_adapter(model)
    original = adapter.hidden_states
    layer = [m for m in model.modules() if isinstance(m, nn.ModuleList)][0][-1]
    handle = layer.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            normxlogit(model, ids, mask, positions=positions)
    finally:
        handle.remove()
    assert adapter.hidden_states is original
    assert _model_state(model)["training"] == before["training"]
    assert _model_state(model)["hooks"] == before["hooks"]


def _lens_reference(model, ids, final_norm, head_rows):
    """Logit lens computed directly from Hugging Face's hidden states."""
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    out = []
    for layer, h in enumerate(hs):
        x = h if layer == len(hs) - 1 else final_norm(h)
        out.append(x @ head_rows.T)
    return torch.stack(out, 1)  # (B, L+1, T, n)


def test_layerwise_and_contrastive_against_direct_computation_gpt2():
    model = models.build("gpt2")
    ids = models.random_ids(2, 6)
    targets = torch.tensor([5, 9])
    foils = torch.tensor([7, 11])
    attr = normxlogit(model, ids, targets=targets, foils=foils, layers="all")
    W = model.lm_head.weight
    ref = _lens_reference(model, ids, model.transformer.ln_f, W)  # (B, L+1, T, V)
    rows = torch.arange(2)
    lens_t = ref[rows, :, :, targets]  # (B, L+1, T)
    lens_f = ref[rows, :, :, foils]
    torch.testing.assert_close(attr.layer_logat, lens_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attr.layer_contrast, lens_t - lens_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attr.contrast_logat, lens_t[:, -1] - lens_f[:, -1], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(attr.contrast_scores, attr.norms * attr.contrast_logat)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(attr.norms, hs[0].norm(dim=-1))
    each = torch.stack([h.norm(dim=-1) for h in hs], 1) * lens_t
    torch.testing.assert_close(attr.layer_each, each, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attr.layer_scores, attr.norms[:, None] * lens_t, atol=1e-5,
                               rtol=1e-5)


def test_layer_subset_and_word_norm_llama():
    model = models.build("llama")
    ids = models.random_ids(2, 6)
    attr = normxlogit(model, ids, layers=[0, -1], norm="word")
    full = normxlogit(model, ids, layers="all", norm="word")
    assert attr.layers == (0, 2)
    torch.testing.assert_close(attr.layer_logat, full.layer_logat[:, [0, 2]])
    rows = model.get_input_embeddings().weight[ids].norm(dim=-1)
    torch.testing.assert_close(attr.norms, rows.detach())
    # Llama's layer 0 is the raw embedding, so both norm choices agree there.
    layer0 = normxlogit(model, ids)
    torch.testing.assert_close(layer0.norms, attr.norms)


def test_gemma2_softcapping_is_reproduced():
    model = models.build("gemma2")
    ids = models.random_ids(1, 5)
    attr = normxlogit(model, ids)
    assert attr.logat.abs().max() <= 5.0  # the cap from the config


def test_masked_lm_needs_positions_and_mask_positions_finds_them():
    model = models.build("bert")
    ids = models.random_ids(2, 6)
    with pytest.raises(ValueError, match="positions is required for masked LMs"):
        normxlogit(model, ids)
    ids[ids == 3] = 4  # 3 plays the mask token
    ids[0, 2] = 3
    ids[1, 4] = 3
    assert mask_positions(ids, 3).tolist() == [2, 4]
    attr = normxlogit(model, ids, positions=mask_positions(ids, 3))
    assert attr.positions.tolist() == [2, 4]
    # Bidirectional: tokens after the masked position are scored too.
    assert not torch.isnan(attr.scores).any()
    with pytest.raises(ValueError, match="mask tokens"):
        mask_positions(ids, 5000)


def test_micro_batching_gives_identical_numbers():
    model = models.build("gpt2")
    ids = models.random_ids(7, 6)
    a = normxlogit(model, ids, layers="all", batch_size=2)
    b = normxlogit(model, ids, layers="all", batch_size=None)
    torch.testing.assert_close(a.layer_scores, b.layer_scores)
    torch.testing.assert_close(a.scores, b.scores)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(norm="l2"), "norm='l2' is not one of"),
        (dict(layers=[5]), r"valid indices are 0\.\.2"),
        (dict(layers="some"), "layers='some'"),
        (dict(positions=[9, 9]), r"positions must lie in 0\.\.5"),
        (dict(targets=[1, 2, 3]), "targets has 3 entries but input_ids has 2 rows"),
        (dict(targets=[1000, 1]), r"targets must lie in 0\.\.96"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(attention_mask=torch.ones(2, 3)), "attention_mask shape"),
    ],
)
def test_argument_errors(kwargs, message):
    model = models.build("gpt2")
    ids = models.random_ids(2, 6)
    with pytest.raises(ValueError, match=message):
        normxlogit(model, ids, **kwargs)


def test_vocabulary_mismatch_is_named():
    model = models.build("gpt2")
    with pytest.raises(ValueError, match="outside the model's vocabulary of 97"):
        normxlogit(model, torch.tensor([[1, 2, 500]]))


def test_padding_position_error():
    model = models.build("gpt2")
    ids = models.random_ids(1, 4)
    with pytest.raises(ValueError, match="positions point at padding"):
        normxlogit(model, ids, torch.tensor([[1, 1, 0, 0]]), positions=[3])


@pytest.mark.parametrize("name", ["gpt2", "gemma2", "roberta"])
def test_without_probabilities_only_target_rows_are_read(name):
    model = models.build(name)
    ids, mask, positions = _batch(name)
    targets = torch.tensor([5, 9, 11])
    full = normxlogit(model, ids, mask, positions=positions, targets=targets, layers="all")
    rows_only = normxlogit(model, ids, mask, positions=positions, targets=targets, layers="all",
                           probabilities=False)
    torch.testing.assert_close(rows_only.layer_scores, full.layer_scores, equal_nan=True)
    torch.testing.assert_close(rows_only.target_logits, full.target_logits)
    assert torch.isnan(rows_only.target_probs).all()


def test_bfloat16_model_keeps_the_logit_invariant_within_bf16_precision():
    model = models.build("llama").to(torch.bfloat16)
    ids = models.random_ids(2, 6)
    attr = normxlogit(model, ids, layers="all")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    expected = logits[torch.arange(2)[:, None], torch.arange(6)[None], attr.targets[:, None]]
    # bf16 has 8 bits of mantissa: the head's dot products agree to ~1e-2 relative.
    torch.testing.assert_close(attr.logat, expected, atol=2e-2, rtol=2e-2)
    assert attr.scores.dtype == torch.float32


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prediction_depth_is_the_first_layer_whose_logit_lens_ranks_the_target_first(name):
    model = models.build(name)
    ids, mask, _ = _batch(name, batch=4)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    norm = model.transformer.ln_f if name == "gpt2" else model.model.norm
    last = len(hidden.hidden_states) - 1
    with torch.no_grad():  # the lens by hand: final norm below the last layer only
        lens = torch.stack([model.lm_head(h[:, -1] if i == last else norm(h[:, -1]))
                            for i, h in enumerate(hidden.hidden_states)])  # (L+1, B, V)
    top = lens.argmax(-1)  # (L+1, B)
    # Planted targets: row 0 the layer-0 top token, rows 1-2 the model's own prediction
    # (ranked first at the last layer at the latest), row 3 a token no layer ranks first.
    never = next(t for t in range(models.VOCAB) if not (top[:, 3] == t).any())
    targets = torch.tensor([int(top[0, 0]), int(top[-1, 1]), int(top[-1, 2]), never])
    attr = normxlogit(model, ids, mask, targets=targets, prediction_depth=True)
    expected = [next((float(i) for i in range(last + 1) if top[i, b] == targets[b]),
                     float("nan")) for b in range(4)]
    assert attr.prediction_depth[0].item() == 0.0
    assert attr.prediction_depth[1:3].tolist() == expected[1:3] and max(expected[1:3]) <= last
    assert torch.isnan(attr.prediction_depth[3])
    # Without the option nothing is computed; batching changes nothing.
    assert normxlogit(model, ids, mask, targets=targets).prediction_depth is None
    small = normxlogit(model, ids, mask, targets=targets, prediction_depth=True, batch_size=1)
    torch.testing.assert_close(small.prediction_depth, attr.prediction_depth, equal_nan=True)
