"""Attribution methods: shapes and NaN layout on every kind of model, known answers on a
linear model, IG completeness, and that gradient methods leave the model untouched."""

from __future__ import annotations

import dataclasses
import sys

import models
import pytest
import torch
from torch import nn

from normx_callbacks import normxlogit, resolve_adapter
from normx_callbacks.adapters import ModelAdapter
from normx_callbacks.attribution import prepare_inputs
from normx_callbacks.methods import (
    GRADIENT_METHODS,
    METHODS,
    attribute,
    batched_logits,
    gradient_attributions,
    resolve_alignment_methods,
)

NAMES = ("gpt2", "llama", "bert", "bert_cls")


def _batch(name):
    ids = models.random_ids(3, 6)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0  # right padding
    positions = torch.tensor([2, 5, 1]) if name in ("bert", "gpt2") else None
    return ids, mask, positions


def _expected_valid(model, ids, mask, positions):
    adapter = resolve_adapter(model)
    if positions is None:
        positions = normxlogit(model, ids, mask).positions
    valid = mask.bool()
    if adapter.kind == "causal":
        valid &= torch.arange(ids.shape[1])[None, :] <= positions[:, None]
    return valid


@pytest.mark.parametrize("name", NAMES)
def test_every_method_scores_exactly_the_valid_positions(name):
    model = models.build(name)
    ids, mask, positions = _batch(name)
    valid = _expected_valid(model, ids, mask, positions)
    for method in METHODS:
        scores = attribute(method, model, ids, mask, positions, n_steps=4)
        assert scores.shape == ids.shape and scores.dtype == torch.float32, method
        assert torch.equal(torch.isnan(scores), ~valid), method
        assert torch.isfinite(scores[valid]).all(), method
        if method in GRADIENT_METHODS + ("norm", "random"):
            assert (scores[valid] >= 0).all(), method  # L1 norms, norms, uniforms


def test_forward_only_methods_read_normxlogit():
    model = models.build("gpt2")
    ids, mask, positions = _batch("gpt2")
    attr = normxlogit(model, ids, mask, positions=positions)
    for method, expected in (
        ("normxlogit", attr.scores),
        ("logat", attr.logat),
        ("norm", attr.norms),
    ):
        got = attribute(method, model, ids, mask, positions)
        torch.testing.assert_close(got, expected, equal_nan=True)


def test_random_is_reproducible_and_leaves_the_global_rng_alone():
    model = models.build("llama")
    ids, mask, _ = _batch("llama")
    state = torch.random.get_rng_state()
    a = attribute("random", model, ids, mask, seed=7)
    b = attribute("random", model, ids, mask, seed=7)
    c = attribute("random", model, ids, mask, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a, b, equal_nan=True)
    assert not torch.allclose(a.nan_to_num(), c.nan_to_num())


class Linear(nn.Module):
    """Classifier with logits = sum_j E[id_j] @ U: gradient w.r.t. every embedding is U[:, y]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.emb.weight.data.copy_(torch.randn(10, 4, generator=g))
        self.out = nn.Linear(4, 3, bias=False)
        self.out.weight.data.copy_(torch.randn(3, 4, generator=g))

    def states(self, ids, mask):
        x0 = self.emb(ids) * mask[..., None]
        return [x0, x0.sum(1, keepdim=True).expand_as(x0)]


def test_gradient_methods_known_answer_on_a_linear_model():
    model = Linear()
    adapter = ModelAdapter(
        module=model,
        embedding=model.emb,
        hidden_states=model.states,
        head=model.out,
        kind="classifier",
        pool_position="first",
        num_layers=1,
    )
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    targets = torch.tensor([2, 0])
    u = model.out.weight.detach()[targets]  # (B, d): the gradient at every real token
    e = model.emb.weight.detach()[ids]  # (B, T, d)
    sal = attribute("saliency", adapter, ids, mask, [0, 0], targets)
    ixg = attribute("input_x_gradient", adapter, ids, mask, [0, 0], targets)
    ig = attribute("integrated_gradients", adapter, ids, mask, [0, 0], targets, n_steps=5)
    expected_sal = u.abs().sum(-1)[:, None].expand(2, 4)
    expected_ixg = (e * u[:, None, :]).abs().sum(-1)
    nan = torch.tensor([[False] * 4, [False] * 3 + [True]])
    torch.testing.assert_close(sal, expected_sal.masked_fill(nan, torch.nan), equal_nan=True)
    torch.testing.assert_close(ixg, expected_ixg.masked_fill(nan, torch.nan), equal_nan=True)
    # Linear model, zero baseline: IG equals input x gradient exactly.
    torch.testing.assert_close(ig, ixg, equal_nan=True)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_integrated_gradients_completeness(name):
    model = models.build(name)
    ids, mask, positions = _batch(name)
    positions = torch.tensor([2, 5, 1])
    raw, delta = gradient_attributions(
        "integrated_gradients", model, ids, mask, positions, n_steps=50, return_delta=True
    )
    adapter = resolve_adapter(model)
    with torch.no_grad():
        targets = batched_logits(adapter, ids, mask, positions, None).argmax(-1)
        embeds = adapter.embedding(ids)
        rows = torch.arange(3)
        fx = batched_logits(adapter, ids, mask, positions, None, embeds=embeds)[rows, targets]
        zero = torch.zeros_like(embeds)
        f0 = batched_logits(adapter, ids, mask, positions, None, embeds=zero)[rows, targets]
    total = raw.sum(dim=(1, 2))
    torch.testing.assert_close(total, fx - f0, atol=1e-3, rtol=1e-3)
    assert delta.abs().max() < 1e-3


def _snapshot(model):
    return {
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for m in model.modules()
        ],
        "weights": [p.detach().clone() for p in model.parameters()],
    }


def _assert_same(model, before):
    after = _snapshot(model)
    for (obj0, val0), (obj1, val1) in zip(before["grads"], after["grads"], strict=True):
        assert obj0 is obj1
        assert (val0 is None and val1 is None) or torch.equal(val0, val1)
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    for w0, w1 in zip(before["weights"], after["weights"], strict=True):
        assert torch.equal(w0, w1)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_gradient_methods_leave_the_model_untouched(name):
    model = models.build(name)
    model.train()
    next(iter(model.modules())).get_submodule(
        "transformer.h.0" if name == "gpt2" else "bert.encoder.layer.0"
    ).eval()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    for i, p in enumerate(params):
        if i % 3 == 0:
            p.grad = torch.randn(p.shape, generator=g)  # a half-done accumulation step
    params[1].requires_grad_(False)
    ids, mask, positions = _batch(name)
    before = _snapshot(model)
    for method in GRADIENT_METHODS:
        plain = attribute(method, model, ids, mask, positions, n_steps=3)
        _assert_same(model, before)
        # Also from inside no_grad / inference_mode, as a validation-loop hook would call it.
        with torch.no_grad():
            quiet = attribute(method, model, ids, mask, positions, n_steps=3)
        with torch.inference_mode():
            inference = attribute(method, model, ids, mask, positions, n_steps=3)
        _assert_same(model, before)
        torch.testing.assert_close(plain, quiet, equal_nan=True)
        torch.testing.assert_close(plain, inference, equal_nan=True)


def test_hooks_and_flags_restored_when_the_method_raises():
    model = models.build("bert_cls").train()
    adapter = resolve_adapter(model)
    head = adapter.head

    def failing_head(x):
        if x.requires_grad:
            raise RuntimeError("boom")
        return head(x)

    broken = dataclasses.replace(adapter, head=failing_head)
    before = _snapshot(model)
    for method in GRADIENT_METHODS:
        with pytest.raises(RuntimeError, match="boom"):
            attribute(method, broken, *_batch("bert_cls")[:2], n_steps=2)
        _assert_same(model, before)


def test_missing_captum_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    model = models.build("gpt2")
    ids, mask, _ = _batch("gpt2")
    with pytest.raises(ImportError, match=r"pip install 'normx-callbacks\[baselines\]'"):
        attribute("integrated_gradients", model, ids, mask)
    # Forward-only methods need no Captum.
    assert attribute("normxlogit", model, ids, mask).shape == ids.shape


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_saliency_and_input_x_gradient_need_no_captum_and_equal_captums(name, monkeypatch):
    from captum.attr import InputXGradient, Saliency

    model = models.build(name)
    ids, mask, positions = _batch(name)
    adapter = resolve_adapter(model)
    _, _, pos = prepare_inputs(adapter, ids, mask, positions)
    targets = batched_logits(adapter, ids, mask, pos, None).argmax(-1)
    embeds = adapter.embedding(ids).detach().requires_grad_(True)

    def forward(x):
        return batched_logits(adapter, ids, mask, pos, None, embeds=x)

    for method, captum_class in (("input_x_gradient", InputXGradient),
                                 ("saliency", Saliency)):
        ours = gradient_attributions(method, model, ids, mask, positions)
        theirs = captum_class(forward).attribute(embeds, target=targets).detach()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    for method in ("input_x_gradient", "saliency"):
        blocked = attribute(method, model, ids, mask, positions)
        torch.testing.assert_close(blocked, attribute(method, model, ids, mask, positions,
                                                      batch_size=1), equal_nan=True)
        assert torch.isfinite(blocked[_expected_valid(model, ids, mask, positions)]).all()
    assert resolve_alignment_methods("installed") == ("input_x_gradient", "saliency")
    with pytest.raises(ImportError, match=r"method='integrated_gradients' needs Captum"):
        resolve_alignment_methods(["integrated_gradients"])


def test_alignment_methods_are_validated():
    assert resolve_alignment_methods(None) == ()
    assert resolve_alignment_methods("installed") == ("input_x_gradient", "saliency")
    assert resolve_alignment_methods(GRADIENT_METHODS) == GRADIENT_METHODS
    with pytest.raises(ValueError, match=r"\['normxlogit'\] are not gradient methods"):
        resolve_alignment_methods(["normxlogit"])
    with pytest.raises(ValueError, match="alignment_methods='all'"):
        resolve_alignment_methods("all")


def test_bad_arguments():
    model = models.build("gpt2")
    ids, mask, _ = _batch("gpt2")
    with pytest.raises(ValueError, match="valid|one of"):
        attribute("lime", model, ids, mask)
    with pytest.raises(ValueError, match="batch_size"):
        attribute("saliency", model, ids, mask, batch_size=0)
    with pytest.raises(ValueError, match="targets"):
        attribute("saliency", model, ids, mask, targets=[models.VOCAB] * 3)
    with pytest.raises(ValueError, match="positions is required"):
        attribute("saliency", models.build("bert"), ids, mask)
