"""Corpus -> tokenizer -> fixed-length token blocks, plus the held-out probe suite."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..probes import ProbeSet
from .corpora import load_corpus
from .tokenizer import load_tokenizer, train_tokenizer


def tokenizer_cache_dir(cache_dir, *, corpus, objective, bpe_vocab_size, seed, num_train=None):
    """Where a DataModule keeps the tokenizer it trained (checkpoints.py finds it here):
    one directory per corpus setting, so runs on different data never overwrite each
    other's tokenizer."""
    name = "".join(c if c.isalnum() else "_" for c in str(corpus))[-40:]
    size = "all" if num_train is None else str(num_train)
    return Path(str(cache_dir)) / f"tokenizer-{name}-{objective}-{bpe_vocab_size}-s{seed}-n{size}"


class _Blocks(Dataset):
    """One training example per document, truncated/padded to `context` tokens."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


class TextDataModule(pl.LightningDataModule):
    """Builds the corpus and its tokenizer at construction, so the model can be sized
    from `vocab_size` and the callback gets `tokenizer` and `probes` before training.
    """

    def __init__(
        self,
        corpus: str = "agreement",  # "agreement", "docs", a .txt file/dir, or hf:<name>
        objective: str = "causal",  # "causal" (next token) or "masked" (MLM)
        bpe_vocab_size: int = 512,  # size of the BPE vocabulary trained on the corpus
        tokenizer_path: str | None = None,  # a local HF tokenizer dir instead of training
        context: int = 64,  # tokens per training example
        pack: bool = False,  # causal: join documents and cut full blocks (for long prose)
        batch_size: int = 32,
        num_train: int | None = None,  # documents to use (None: corpus default)
        num_probes: int = 64,
        mlm_probability: float = 0.15,
        seed: int = 0,  # corpus generation and shuffling
        cache_dir: str = ".normx_cache",  # tokenizer cache, reused across runs and resumes
        num_workers: int = 0,
    ):
        super().__init__()
        if objective not in ("causal", "masked"):
            raise ValueError(f"objective={objective!r} is not one of ('causal', 'masked')")
        self.save_hyperparameters()
        self.corpus = load_corpus(corpus, seed=seed, num_train=num_train, num_probes=num_probes)
        if tokenizer_path:
            self.tokenizer = load_tokenizer(tokenizer_path)
        else:
            cache = tokenizer_cache_dir(cache_dir, corpus=corpus, objective=objective,
                                        bpe_vocab_size=bpe_vocab_size, seed=seed,
                                        num_train=num_train)
            self.tokenizer = train_tokenizer(
                self.corpus.train, vocab_size=bpe_vocab_size, objective=objective, cache_dir=cache
            )
        raw = self.corpus.probes if objective == "causal" else self.corpus.masked_probes()
        self.probes = ProbeSet(raw)
        self._train: _Blocks | None = None
        self._val: _Blocks | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _encode(self, texts: list[str]) -> _Blocks:
        if self.hparams.pack and self.hparams.objective == "causal":
            return self._pack(texts)
        tok = self.tokenizer
        suffix = tok.eos_token if self.hparams.objective == "causal" and tok.eos_token else ""
        enc = tok(
            [t + suffix for t in texts],
            max_length=self.hparams.context,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        return _Blocks(ids, mask, labels)

    def _pack(self, texts: list[str]) -> _Blocks:
        """GPT-style packing: documents joined by EOS, cut into full `context` blocks, so
        long prose is trained on whole instead of truncated to its first block."""
        tok, context = self.tokenizer, self.hparams.context
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        stream = [i for ids in tok(list(texts), add_special_tokens=False)["input_ids"]
                  for i in ids + eos]
        blocks = len(stream) // context
        if blocks == 0:
            raise ValueError(f"the corpus holds {len(stream)} tokens, fewer than one block of "
                             f"context={context}; use more text or set pack: false")
        ids = torch.tensor(stream[: blocks * context]).view(blocks, context)  # (N, context)
        return _Blocks(ids, torch.ones_like(ids), ids.clone())

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = self._encode(self.corpus.train)
            self._val = self._encode(self.corpus.val)

    def _masking(self, batch):
        """BERT-style MLM corruption: 15% of real tokens, 80/10/10 mask/random/keep."""
        ids = torch.stack([b["input_ids"] for b in batch])
        mask = torch.stack([b["attention_mask"] for b in batch])
        tok = self.tokenizer
        special_ids = torch.tensor(tok.all_special_ids)
        candidates = (mask == 1) & ~torch.isin(ids, special_ids)
        chosen = candidates & (torch.rand(ids.shape) < self.hparams.mlm_probability)
        labels = ids.masked_fill(~chosen, -100)
        corrupt = ids.clone()
        replace = chosen & (torch.rand(ids.shape) < 0.8)
        corrupt[replace] = tok.mask_token_id
        randomise = chosen & ~replace & (torch.rand(ids.shape) < 0.5)
        corrupt[randomise] = torch.randint(len(tok), ids.shape)[randomise]
        return {"input_ids": corrupt, "attention_mask": mask, "labels": labels}

    def _loader(self, data: _Blocks, shuffle: bool) -> DataLoader:
        collate = self._masking if self.hparams.objective == "masked" else None
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            generator=generator if shuffle else None,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val, shuffle=False)
