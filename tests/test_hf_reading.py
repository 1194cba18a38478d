"""`hf_reading.read_hf_model`: any Hugging Face causal LM, masked LM or sequence classifier
read into a verified `ModelAdapter` without a table of model families.

Checks the kind read off each model (causal, masked, classifier, regression), that the
L+1 hidden states are the model's own (the inner layers raw, the last one with the final
transform applied, never twice), the discovered final transform (GPT-2's ``ln_f``, a
post-LN OPT's ``project_out`` alone), that reading leaves no hook and the train flags as
they were, the refusals of a bare body, an encoder-decoder and a module that is no
Hugging Face model, and `find_layer_stack`. (Every family's logits and LogAt are checked
against the model's own in test_attribution.py.)
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from models import VOCAB, build, random_ids
from torch import nn

from normx_callbacks import UnsupportedModelError
from normx_callbacks.hf_reading import find_layer_stack, read_hf_model

HOOKS = ("_forward_hooks", "_forward_pre_hooks")


def hooks(model: nn.Module) -> int:
    return sum(len(getattr(m, attr)) for m in model.modules() for attr in HOOKS)


@pytest.mark.parametrize(("name", "kind"), [
    ("gpt2", "causal"), ("llama", "causal"), ("bert", "masked"), ("roberta", "masked"),
    ("bert_cls", "classifier"), ("gpt2_cls", "classifier"), ("bert_reg", "regression"),
])
def test_the_kind_and_layers_are_read_off_the_model(name, kind):
    model = build(name)
    adapter = read_hf_model(model)
    assert (adapter.kind, adapter.num_layers, adapter.module) == (kind, 2, model)
    assert adapter.embedding is model.get_input_embeddings()
    assert (adapter.output_embedding is not None) == (kind in ("causal", "masked"))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_the_hidden_states_are_the_models_own_with_the_final_transform_applied_once(name):
    model = build(name)
    adapter = read_hf_model(model)
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        states = adapter.hidden_states(ids, mask)
        own = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(states) == len(own.hidden_states) == 3
    for got, expected in zip(states, own.hidden_states, strict=True):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(adapter.full_logits(states[-1]), own.logits, atol=1e-5,
                               rtol=1e-5)


def test_the_final_transform_is_discovered_from_what_runs_after_the_last_layer():
    gpt2 = build("gpt2")
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(read_hf_model(gpt2).final_norm(x), gpt2.transformer.ln_f(x))
    # Post-LN OPT: no final norm, a projection down to the embedding width instead.
    opt = build("opt_post_ln_proj")
    assert opt.model.decoder.final_layer_norm is None
    adapter = read_hf_model(opt)
    with torch.no_grad():
        projected = adapter.final_norm(x)
        torch.testing.assert_close(projected, opt.model.decoder.project_out(x))
    assert projected.shape[-1] == adapter.embedding.embedding_dim == 16


def test_reading_leaves_no_hook_and_the_train_flags_as_they_were():
    model = build("gpt2").train()
    model.transformer.drop.eval()  # a flag the user set: kept
    before = hooks(model)
    adapter = read_hf_model(model)
    adapter.hidden_states(random_ids(1, 4), torch.ones(1, 4, dtype=torch.long))
    assert hooks(model) == before == 0
    assert model.training and not model.transformer.drop.training


def test_a_bare_body_an_encoder_decoder_and_a_plain_module_are_refused():
    with pytest.raises(UnsupportedModelError, match=r"GPT2Model is a bare transformer body "
                                                    r"without a head: .* \(e\.g\. "
                                                    r"GPT2ForCausalLM or \.\.\.ForMaskedLM\)"):
        read_hf_model(build("gpt2").transformer)
    bart = T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=64))
    with pytest.raises(UnsupportedModelError, match=r"BartForConditionalGeneration is an "
                                                    r"encoder-decoder model"):
        read_hf_model(bart)
    with pytest.raises(UnsupportedModelError, match=r"Linear is not a Hugging Face model with a "
                                                    r"head \(no base_model / get_input_embeddings"):
        read_hf_model(nn.Linear(2, 2))


def test_find_layer_stack_prefers_the_list_of_the_configured_length():
    body = nn.Module()
    body.small = nn.ModuleList([nn.Linear(2, 2)] * 2)
    body.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    assert find_layer_stack(body, 2) is body.small
    assert find_layer_stack(body, None) is body.layers  # unknown count: the longest
    assert find_layer_stack(body, 5) is body.layers
    with pytest.raises(UnsupportedModelError, match=r"no nn.ModuleList of transformer layers "
                                                    r"found in Linear"):
        find_layer_stack(nn.Linear(2, 2), 2)
