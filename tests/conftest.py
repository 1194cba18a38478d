import os
import sys

# Tests import helper modules from tests/: models.py (tiny HF models), training.py (the demo
# model and Trainer), lm_shapes.py, launch.py.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# A probe whose text holds HTML markup: reports must show it as text.
MARKUP_PROBE = {"id": "markup", "text": "the <b>bold</b> key near the cabinets",
                "target": "is", "foil": "are", "cues": ["key"]}


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    # Every model in the suite is tiny: a second intra-op thread only adds OpenMP
    # synchronisation (and contention with DDP subprocesses) on the 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    # Shared by every test that builds a TextDataModule: the tokenizer is trained once per session.
    return str(tmp_path_factory.getbasetemp() / "tokenizer_cache")


@pytest.fixture(scope="module")
def dm(cache_dir):
    """The agreement corpus with 4 probes, batches of 16 (a test module may define its own)."""
    from normx_callbacks.demo import TextDataModule

    data = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=400, num_probes=4,
                          batch_size=16, cache_dir=cache_dir)
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def measurement(dm):
    """A prepared `measure.Measurement` of the demo GPT-2 (`training.make_model`) on `dm`'s
    probes, all layers, no faithfulness: what snapshots are taken with, for the unit tests of
    what follows a measurement (the writer, the execution, the helper's pipe)."""
    from training import make_model

    from normx_callbacks import ProbeSet, Settings
    from normx_callbacks.discovery import find_model
    from normx_callbacks.measure import prepare_measurement

    return prepare_measurement(find_model(make_model(dm)), dm.tokenizer,
                               ProbeSet.coerce(dm.probes),
                               Settings(faithfulness_every=None, writer="thread"),
                               owner="test")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 20-step run (2-layer, 32-wide GPT-2 on the agreement corpus, the markup
    probe first) with TensorBoard logs, a store and `tiny.ckpt`; built once per session."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from training import fit, make_model

    from normx_callbacks import NormXLogitCallback
    from normx_callbacks.demo import TextDataModule

    root = tmp_path_factory.mktemp("normx-tiny-run")
    data = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=320, num_probes=4,
                          batch_size=16, context=32, cache_dir=str(root / "tokenizer_cache"))
    callback = NormXLogitCallback(probes=[MARKUP_PROBE, *data.probes], every_n_steps=8,
                                  media_probes=1)
    trainer = fit(make_model(data, context=32), data, root, [callback], max_steps=20,
                  logger=TensorBoardLogger(str(root)), log_every_n_steps=2)
    trainer.save_checkpoint(str(root / "tiny.ckpt"))
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run) -> Path:
    """The Lightning checkpoint of `tiny_run`, whose tokenizer is found from it."""
    return tiny_run / "tiny.ckpt"
