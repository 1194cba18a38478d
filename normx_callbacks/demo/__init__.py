"""A complete small pre-training setup: corpora, tokenizer, LightningModule, DataModule.

Lives in the package (as Lightning keeps `lightning.pytorch.demos`) so `train.py`,
the tests and users import the same code.
"""

from .corpora import CORPORA, Corpus, load_corpus
from .data import TextDataModule
from .model import ARCHITECTURES, LanguageModel, build_model
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "ARCHITECTURES",
    "CORPORA",
    "Corpus",
    "LanguageModel",
    "TextDataModule",
    "build_model",
    "load_corpus",
    "load_tokenizer",
    "train_tokenizer",
]
