"""Loading a trained model and its tokenizer (`load_model_and_tokenizer`, `import_class`): a
real Lightning checkpoint (conftest.py's `tiny_ckpt`) and every way a checkpoint can fail,
each a `CheckpointError` or `FileNotFoundError` that names the file and the fix."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from normx_callbacks.checkpoints import CheckpointError, import_class, load_model_and_tokenizer
from normx_callbacks.demo import LanguageModel

ROOT = Path(__file__).resolve().parents[1]


def resaved(ckpt: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of `ckpt` with `change(state)` applied."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_a_lightning_checkpoint_loads_with_the_tokenizer_it_was_trained_with(tiny_ckpt):
    model, tokenizer = load_model_and_tokenizer(tiny_ckpt)
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    state = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"model.{key}"]), key
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope\.ckpt' does not exist"):
        load_model_and_tokenizer(tmp_path / "nope.ckpt")


def test_truncated_checkpoint(tiny_ckpt, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt is truncated, corrupt or not a "
                       r"PyTorch checkpoint .* copy it again or use another checkpoint"):
        load_model_and_tokenizer(cut)


def test_checkpoint_errors_are_value_errors(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint"):
        load_model_and_tokenizer(tmp_path / "x.ckpt")
    assert issubclass(CheckpointError, ValueError)


def test_checkpoint_of_another_architecture_names_the_weights(tiny_ckpt, tmp_path):
    llama = resaved(tiny_ckpt, tmp_path, "llama.ckpt",
                    lambda state: state["hyper_parameters"].update(arch="llama"))
    with pytest.raises(CheckpointError) as caught:
        load_model_and_tokenizer(llama)
    message = str(caught.value)
    for needle in ("another architecture", "missing", "unexpected", "transformer.h.0."):
        assert needle in message, message


def test_checkpoint_with_resized_weights(tiny_ckpt, tmp_path):
    wide = resaved(tiny_ckpt, tmp_path, "wide.ckpt",
                   lambda state: state["hyper_parameters"].update(d_model=64))
    with pytest.raises(CheckpointError, match=r"weight transformer\.wte\.weight has shape "
                       r"\(499, 32\) but the gpt2 model .* expects \(499, 64\)"):
        load_model_and_tokenizer(wide)


def test_checkpoint_of_another_lightning_module_is_named(tiny_ckpt, tmp_path):
    other = resaved(tiny_ckpt, tmp_path, "other.ckpt",
                    lambda state: state.update(hyper_parameters={"hidden": 8, "lr": 0.1}))
    with pytest.raises(CheckpointError, match=r"other\.ckpt is not a checkpoint of "
                       r"normx_callbacks\.demo\.LanguageModel \(its hyper_parameters names "
                       r"'hidden'\); .* save_pretrained\(\)"):
        load_model_and_tokenizer(other)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "unsafe.ckpt")
    with pytest.raises(CheckpointError, match=r"weights_only=True.*argparse\.Namespace"):
        load_model_and_tokenizer(tmp_path / "unsafe.ckpt")


def test_tokenizer_not_found_says_to_pass_one(tiny_ckpt, tmp_path):
    orphan = resaved(tiny_ckpt, tmp_path, "orphan.ckpt", lambda state: state[
        "datamodule_hyper_parameters"].update(cache_dir=str(tmp_path / "gone")))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer found for .*orphan\.ckpt .*"
                       r"--tokenizer DIR"):
        load_model_and_tokenizer(orphan)
    (tokenizer,) = (tiny_ckpt.parent / "tokenizer_cache").glob("tokenizer-agreement-causal-512-*")
    model, _ = load_model_and_tokenizer(orphan, tokenizer=tokenizer)
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_import_class_resolves_a_lightning_module_spec():
    assert import_class("normx_callbacks.demo:LanguageModel") is LanguageModel
    assert issubclass(import_class("lightning.pytorch.demos:LightningTransformer"),
                      pl.LightningModule)


@pytest.mark.parametrize("spec, message", [
    ("normx_callbacks.demo.LanguageModel",
     r"--model-class 'normx_callbacks\.demo\.LanguageModel': write it as pkg\.module:ClassName"),
    ("normx_callbacks.demo:Nope",
     r"--model-class 'normx_callbacks\.demo:Nope': cannot import it \(.*Nope"),
    ("no_such_package.models:Model",
     r"--model-class 'no_such_package\.models:Model': cannot import it \(No module named"),
    ("normx_callbacks.store:SnapshotStore",
     r"--model-class 'normx_callbacks\.store:SnapshotStore' is not a LightningModule subclass"),
])
def test_import_class_errors_name_the_spec(spec, message):
    with pytest.raises(CheckpointError, match=message):
        import_class(spec)


