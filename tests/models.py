"""Tiny random-weight models of every supported family, built from configs in code."""

from __future__ import annotations

import torch
import transformers as T

T.logging.set_verbosity_error()

VOCAB = 97
_COMMON = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=VOCAB,
               max_position_embeddings=64)
_DEC = dict(intermediate_size=64, num_key_value_heads=1, **_COMMON)

CAUSAL = {
    "gpt2": lambda: T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                 bos_token_id=0, eos_token_id=0),
    "llama": lambda: T.LlamaConfig(**_DEC),
    "mistral": lambda: T.MistralConfig(**_DEC),
    "qwen2": lambda: T.Qwen2Config(**_DEC),
    "gemma2": lambda: T.Gemma2Config(head_dim=16, final_logit_softcapping=5.0, **_DEC),
    "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=64, **_COMMON),
    "opt": lambda: T.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **_COMMON),
    "opt_post_ln_proj": lambda: T.OPTConfig(ffn_dim=64, word_embed_proj_dim=16,
                                            do_layer_norm_before=False, **_COMMON),
    "phi": lambda: T.PhiConfig(intermediate_size=64, **_COMMON),
    "bloom": lambda: T.BloomConfig(n_layer=2, hidden_size=32, n_head=2, vocab_size=VOCAB),
    "llama_untied_bias_free": lambda: T.LlamaConfig(tie_word_embeddings=False, **_DEC),
}
MASKED = {
    "bert": lambda: T.BertConfig(intermediate_size=64, **_COMMON),
    "roberta": lambda: T.RobertaConfig(intermediate_size=64, pad_token_id=1, **_COMMON),
}
CLASSIFIER = {
    "bert_cls": lambda: T.BertConfig(intermediate_size=64, num_labels=3, **_COMMON),
    "roberta_cls": lambda: T.RobertaConfig(intermediate_size=64, num_labels=3, pad_token_id=1,
                                           **_COMMON),
    "gpt2_cls": lambda: T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                     n_positions=64, num_labels=3, pad_token_id=0),
    "llama_cls": lambda: T.LlamaConfig(num_labels=3, pad_token_id=0, **_DEC),
}
REGRESSION = {
    "bert_reg": lambda: T.BertConfig(intermediate_size=64, num_labels=1, **_COMMON),
}

_AUTO = {
    "causal": (CAUSAL, T.AutoModelForCausalLM),
    "masked": (MASKED, T.AutoModelForMaskedLM),
    "classifier": (CLASSIFIER, T.AutoModelForSequenceClassification),
    "regression": (REGRESSION, T.AutoModelForSequenceClassification),
}
ALL = {name: kind for kind, (table, _) in _AUTO.items() for name in table}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny model of family `name`, in eval mode."""
    kind = ALL[name]
    table, auto = _AUTO[kind]
    torch.manual_seed(seed)
    return auto.from_config(table[name]()).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)
