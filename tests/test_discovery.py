"""`discovery`: `resolve_adapter` (any language model, Hugging Face or plain PyTorch, cached
per model while its signature holds) and `find_model` (which module inside a
LightningModule or wrapper is the model being trained).

Checks that a Hugging Face model and a plain PyTorch LM are both read and verified, a
bidirectional plain model read as masked, an adapter passed through, the cache kept until
the vocabulary is resized, and a module that is no language model refused by name; and
that `find_model` picks the trainable model beside a frozen one, refuses a frozen model
while something else trains, two candidates, or none, each with the way out. (Every
family's numbers are checked in test_attribution.py, discovery's refusals of odd shapes
in test_adapters.py.)
"""

from __future__ import annotations

import logging

import pytest
import torch
from lm_shapes import Config, LitGPT, NanoGPT
from models import build, random_ids
from torch import nn

from normx_callbacks import ModelAdapter, UnsupportedModelError
from normx_callbacks.discovery import find_model, resolve_adapter


class _MixingBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mix = nn.Linear(d, d)

    def forward(self, x):  # every position sees every other (the mean over the sequence)
        return x + torch.tanh(self.mix(x + x.mean(dim=1, keepdim=True)))


class Bidirectional(nn.Module):
    """A plain encoder-only LM, not a Hugging Face model."""

    def __init__(self, vocab=50, d=16, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_MixingBlock(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Owner(nn.Module):
    """A LightningModule-like wrapper holding the given children."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module


def test_a_hugging_face_model_is_read_once_and_again_after_a_resize():
    model = build("gpt2")
    adapter = resolve_adapter(model)
    assert adapter.resolved and adapter.module is model and adapter.kind == "causal"
    assert adapter.accepts_mask and adapter.num_layers == 2 and adapter.tied
    assert adapter.embedding is model.get_input_embeddings()
    assert resolve_adapter(model) is adapter  # cached while the signature holds
    assert resolve_adapter(model, check=True) is adapter  # verified again, still agrees
    assert resolve_adapter(adapter) is adapter  # an adapter is passed through
    model.resize_token_embeddings(101)
    resized = resolve_adapter(model)
    assert resized is not adapter and resized.embedding.num_embeddings == 101
    ids = random_ids(2, 5)
    with torch.no_grad():
        expected = model(ids).logits
        states = resized.hidden_states(ids, torch.ones_like(ids))
    torch.testing.assert_close(resized.full_logits(states[-1]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [NanoGPT, LitGPT])
def test_a_plain_pytorch_lm_is_discovered_and_cached(cls):
    torch.manual_seed(0)
    model = cls(Config())
    adapter = resolve_adapter(model)
    assert adapter.resolved and adapter.kind == "causal" and not adapter.accepts_mask
    assert adapter.embedding is model.transformer.wte and adapter.num_layers == 2
    assert resolve_adapter(model) is adapter


def test_a_bidirectional_plain_model_is_read_as_masked():
    torch.manual_seed(0)
    model = Bidirectional()
    adapter = resolve_adapter(model)
    assert adapter.kind == "masked" and adapter.num_layers == 2
    assert adapter.output_embedding is model.head and not adapter.tied


@pytest.mark.parametrize(("model", "match"), [
    (nn.Sequential(nn.Linear(4, 4)), r"Sequential has no nn.Embedding for token ids; build a "
                                     r"normx_callbacks.ModelAdapter"),
    (Owner(emb=nn.Embedding(10, 4)), r"calling Owner\(input_ids\) on ids of shape .* failed"),
], ids=["no embedding", "no forward"])
def test_a_module_that_is_no_language_model_is_refused_with_the_way_out(model, match):
    with pytest.raises(UnsupportedModelError, match=match) as caught:
        resolve_adapter(model)
    assert "pass it as adapter=..." in str(caught.value)


# --------------------------------------------------------------------------- find_model


def test_find_model_watches_the_model_inside_or_the_model_itself():
    gpt = build("gpt2")
    assert find_model(Owner(model=gpt)).module is gpt
    assert find_model(gpt).module is gpt  # a Fabric or plain loop passes the model
    assert find_model(Owner(wrapper=Owner(lm=gpt)), "wrapper.lm").module is gpt
    nano = NanoGPT(Config())
    assert find_model(Owner(net=nano, loss=nn.CrossEntropyLoss())).module is nano
    with pytest.raises(RuntimeError, match=r"^Who\(model_attr='wrapper.nope'\): Owner has no such "
                                           r"attribute"):
        find_model(Owner(wrapper=Owner(lm=gpt)), "wrapper.nope", who="Who")
    with pytest.raises(RuntimeError, match=r"^Who cannot read the model: Linear has no "
                                           r"nn.Embedding"):
        find_model(Owner(model=gpt), "model.lm_head", who="Who")


def test_the_trainable_model_is_chosen_beside_a_frozen_teacher(caplog):
    student, teacher = build("gpt2", seed=1), frozen(build("llama"))
    with caplog.at_level(logging.INFO, logger="normx_callbacks"):
        assert find_model(Owner(teacher=teacher, student=student), who="Who").module is student
    assert "Who: watching 'student', the only Hugging Face model with trainable parameters " \
           "(frozen: ['teacher'])" in caplog.text
    plain_student = NanoGPT(Config())
    both = Owner(teacher=frozen(NanoGPT(Config())), student=plain_student)
    assert find_model(both).module is plain_student


def test_a_frozen_model_while_another_module_trains_is_refused():
    owner = Owner(model=frozen(build("gpt2")), adapter_head=nn.Linear(32, 97))
    with pytest.raises(RuntimeError, match=r"^Who: the only Hugging Face model, 'model' "
                                           r"\(GPT2LMHeadModel\), has no trainable parameters, "
                                           r"while 'adapter_head' \(Linear\) trains"):
        find_model(owner, who="Who")
    # Named on purpose: watched although frozen.
    assert find_model(owner, "model").module is owner.model


@pytest.mark.parametrize(("owner", "match"), [
    (lambda: Owner(a=build("gpt2"), b=build("gpt2", seed=1)),
     r"^Who found 2 Hugging Face models in Owner \(\['a', 'b'\]\); pass model_attr='name'"),
    (lambda: Owner(a=NanoGPT(Config()), b=LitGPT(Config())),
     r"^Who found 2 language models in Owner \(\['a', 'b'\]\); pass model_attr='name'"),
    (lambda: Owner(head=nn.Linear(3, 3)),
     r"^Who found no language model in Owner: no Hugging Face model and no module holding"),
], ids=["two Hugging Face models", "two plain models", "none"])
def test_two_candidates_or_none_are_refused_by_name(owner, match):
    with pytest.raises(RuntimeError, match=match):
        find_model(owner(), who="Who")


def test_a_hand_built_adapter_is_not_read_again():
    model = build("gpt2")
    read = resolve_adapter(model)
    hand = ModelAdapter(module=model, embedding=read.embedding, hidden_states=read.hidden_states,
                        head=read.head, final_norm=read.final_norm, num_layers=2)
    assert not hand.resolved and resolve_adapter(hand) is hand
