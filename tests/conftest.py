import os
import sys

# Tests import tiny model builders from tests/models.py.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


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
