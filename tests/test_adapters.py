"""Reading a model: a hand-built `ModelAdapter`, the refusal of models no adapter fits, and
discovery of plain-PyTorch language models (no Hugging Face, no hand-built adapter)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos import LightningTransformer, Transformer
from lm_shapes import Config, GPTModule, LitGPT, NanoGPT
from torch import nn
from training import fit

from normx_callbacks import ModelAdapter, NormXLogitCallback, UnsupportedModelError, normxlogit
from normx_callbacks.adapters import probe_mode
from normx_callbacks.discovery import discover_adapter


class ToyTransformer(nn.Module):
    """A hand-written pre-LN decoder that is not a Hugging Face model."""

    def __init__(self, vocab=50, d=16, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def states(self, ids, mask):
        x = self.tok(ids)
        out = [x]
        for block in self.blocks:
            x = x + block(x)
            out.append(x)
        out[-1] = self.ln_f(x)
        return out

    def forward(self, ids):
        return self.head(self.states(ids, None)[-1])


def test_adapter_path_on_a_hand_written_model():
    torch.manual_seed(0)
    toy = ToyTransformer()
    adapter = ModelAdapter(module=toy, embedding=toy.tok, hidden_states=toy.states,
                           final_norm=toy.ln_f, head=toy.head, kind="causal", num_layers=2)
    ids = torch.randint(0, 50, (2, 5))
    attr = normxlogit(adapter, ids, layers="all", foils=torch.tensor([1, 2]))
    with torch.no_grad():
        logits = toy(ids)
        states = toy.states(ids, None)
    rows = torch.arange(2)
    expected = logits[rows[:, None], torch.arange(5)[None], attr.targets[:, None]]
    torch.testing.assert_close(attr.logat, expected)
    lens0 = toy.head(toy.ln_f(states[0])).detach()[rows[:, None], torch.arange(5)[None],
                                                    attr.targets[:, None]]
    torch.testing.assert_close(attr.layer_logat[:, 0], lens0)
    assert toy.training  # restored


def test_unsupported_model_error_says_how_to_fix():
    with pytest.raises(UnsupportedModelError, match="ModelAdapter"):
        normxlogit(nn.Linear(3, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="kind"):
        ModelAdapter(module=None, embedding=nn.Embedding(2, 2), hidden_states=None, head=None,
                     kind="seq2seq")



def full_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Every position's logits from the model's own forward (eval mode)."""
    with probe_mode(model):
        if isinstance(model, NanoGPT):
            return model(ids, torch.zeros_like(ids))[0]
        return model(ids)


def own_logat(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = full_logits(model, ids)
    return logits.gather(-1, targets.view(-1, 1, 1).expand(-1, ids.shape[1], 1)).squeeze(-1)


@pytest.mark.parametrize("cls", [NanoGPT, LitGPT])
def test_discovered_adapter_matches_the_models_own_logits(cls):
    torch.manual_seed(0)
    model = cls(Config())
    adapter = discover_adapter(model)
    blocks = model.transformer.h
    assert adapter.embedding is model.transformer.wte and adapter.num_layers == len(blocks)
    assert adapter.tied == (cls is NanoGPT) and adapter.kind == "causal"
    assert adapter.context_length == 32 and not adapter.accepts_mask
    ids = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    with probe_mode(model):
        states = adapter.hidden_states(ids, torch.ones_like(ids))
        # hidden_states[0] is what the first block receives: position embedding / scaling in.
        first = model.transformer.wte(ids)
        first = first + model.transformer.wpe(torch.arange(7)) if cls is NanoGPT else \
            first * math.sqrt(32)
    torch.testing.assert_close(states[0], first)
    targets = torch.tensor([5, 9, 11])
    attr = normxlogit(adapter, ids, targets=targets, layers="all")
    torch.testing.assert_close(attr.logat, own_logat(model, ids, targets), atol=1e-5, rtol=1e-5)
    # The logit lens applies the discovered final norm to inner layers.
    with torch.no_grad():
        lens = model.lm_head(model.transformer.ln_f(states[1]))
    torch.testing.assert_close(attr.layer_logat[:, 1], lens.gather(
        -1, targets.view(-1, 1, 1).expand(-1, 7, 1)).squeeze(-1), atol=1e-5, rtol=1e-5)
    assert model.training and not model.transformer.wte._forward_hooks  # left as found


class SoftCapped(LitGPT):
    """Caps its logits in forward, outside any module: the head cannot be reproduced."""

    def forward(self, idx):
        return torch.tanh(super().forward(idx) / 2.0) * 2.0


class SharedBlock(LitGPT):
    """Runs one block twice (weight sharing): not a stack of blocks run once each."""

    def forward(self, idx):
        self.transformer.h = nn.ModuleList([self.transformer.h[0]] * 2)
        return super().forward(idx)


@pytest.mark.parametrize("cls, match", [
    (SoftCapped, r"the head of SoftCapped could not be reproduced: largest difference"),
    (SharedBlock, r"SharedBlock has no nn.ModuleList of blocks that its forward runs once"),
    (Transformer, r"Transformer is an encoder-decoder model \(it contains Transformer\)"),
])
def test_wrong_structures_are_refused(cls, match):
    torch.manual_seed(0)
    model = cls(Config()) if cls is not Transformer else cls(vocab_size=97, ninp=16, nhid=16)
    with pytest.raises(UnsupportedModelError, match=match):
        discover_adapter(model)


@pytest.mark.parametrize("cls, built_in_configure_model", [(NanoGPT, False), (LitGPT, True)])
def test_trainer_attaches_to_a_plain_gpt_without_an_adapter(dm, tmp_path, cls,
                                                            built_in_configure_model):
    config = Config(vocab_size=dm.vocab_size, block_size=64)
    pl.seed_everything(0, verbose=False)
    module = (GPTModule(build=lambda: cls(config), tokenizer=dm.tokenizer)
              if built_in_configure_model else GPTModule(cls(config), tokenizer=dm.tokenizer))
    assert (module.model is None) == built_in_configure_model
    callback = NormXLogitCallback(dm.probes, every_n_steps=2, media_probes=0,
                                  faithfulness_every=None, store_dir=tmp_path / "store")
    trainer = fit(module, dm, tmp_path, [callback], max_steps=2)
    assert trainer.global_step == 2 and callback.snapshot_steps == [0, 1, 2]
    assert callback.adapter.module is module.model
    # The last snapshot's last-layer logits are the trained model's own, probe by probe.
    enc, attr = callback.engine.ctx.encoded, callback.last_attribution
    module.model.eval()
    for b in range(len(enc)):
        n = int(enc.attention_mask[b].sum())
        ids = enc.input_ids[b, :n][None]
        expected = own_logat(module.model, ids, attr.targets[b: b + 1])[0]
        torch.testing.assert_close(attr.logat[b, :n], expected, atol=1e-5, rtol=1e-5)


class OfflineTransformerDemo(LightningTransformer):
    def prepare_data(self):  # the demo downloads WikiText-2 here; our data module feeds it
        pass


def test_trainer_refuses_lightnings_encoder_decoder_demo(dm, tmp_path):
    module = OfflineTransformerDemo(vocab_size=dm.vocab_size)
    module.tokenizer = dm.tokenizer
    callback = NormXLogitCallback(dm.probes, media_probes=0, store_dir=tmp_path / "store")
    with pytest.raises(RuntimeError, match=r"cannot read the model: Transformer is an "
                                           r"encoder-decoder model"):
        fit(module, dm, tmp_path, [callback], max_steps=2)
    assert not (tmp_path / "store").exists()
