"""NormXLogitCallback under FSDP2 (Lightning's ModelParallelStrategy, data parallel) on two
CPU processes (gloo), launched once from a subprocess: a litgpt-shaped GPT sharded with
`fully_shard` in `configure_model`, fitted to step 2 with a checkpoint and resumed to step 4;
then GPT-2 and Llama sharded per block and at the root, and Llama at the root only. One-process
runs of the same weights are the references."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from launch import run_ranks
from lm_shapes import Config, GPTModule, LitGPT

from normx_callbacks import NormXLogitCallback, load_run
from normx_callbacks.demo import TextDataModule

DATA = dict(corpus="agreement", bpe_vocab_size=512, num_train=64, num_probes=4, batch_size=8)

# One launch (two ranks) runs both parts: the litgpt-shaped model with a resume, then the HF
# models; each rank imports Lightning once, not once per test.
SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, {tests!r})
from hf_shapes import HFModule, SHARDINGS
from lm_shapes import Config, GPTModule, LitGPT
from normx_callbacks import NormXLogitCallback
from normx_callbacks.demo import TextDataModule

top, cache = sys.argv[1], sys.argv[2]
root = top + "/litgpt"
os.makedirs(root, exist_ok=True)


class Sharded(GPTModule):
    def configure_model(self):
        if self.model is not None:
            return
        torch.manual_seed(0)
        self.model = LitGPT(Config(vocab_size=self.tokenizer_size, block_size=64))
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def fit(max_steps, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(cache_dir=cache, **{data!r})
    module = Sharded(tokenizer=dm.tokenizer)
    module.tokenizer_size = dm.vocab_size
    callback = NormXLogitCallback(dm.probes, every_n_steps=2, media_probes=0,
                                  faithfulness_every=1, store_dir=root + "/store")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=max_steps, logger=False, callbacks=[callback],
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, callback


trainer, first = fit(2)
trainer.save_checkpoint(root + "/step2.ckpt")
trainer, second = fit(4, ckpt_path=root + "/step2.ckpt")
with open(root + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump({{"first": first.snapshot_steps, "second": second.snapshot_steps,
               "global_step": trainer.global_step}}, f)

root = top + "/hf"
os.makedirs(root, exist_ok=True)
dm = TextDataModule(cache_dir=cache, **{data!r})
steps = {{}}
for name in SHARDINGS:
    family, how = name.split("-")
    pl.seed_everything(0, verbose=False)
    module = HFModule(family, dm.vocab_size, dm.tokenizer, shard=how)
    callback = NormXLogitCallback(dm.probes, every_n_steps=2, media_probes=0,
                                  faithfulness_every=1, store_dir=f"{{root}}/{{name}}")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=2, logger=False, callbacks=[callback],
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root,
    )
    trainer.fit(module, dm)
    steps[name] = callback.snapshot_steps


class AroundTheModel(HFModule):  # fully_shard applied to the LightningModule itself
    def configure_model(self):
        super().configure_model()
        fully_shard(self, mesh=self.device_mesh["data_parallel"])


trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False,
                     callbacks=[NormXLogitCallback(dm.probes, store_dir=root + "/around")],
                     strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=root)
try:
    trainer.fit(AroundTheModel("gpt2", dm.vocab_size, dm.tokenizer, shard="block"), dm)
    steps["around"] = "trained"
except RuntimeError as error:
    steps["around"] = str(error)
with open(root + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump(steps, f)
"""


def single_process(cache_dir: str, root: Path):
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(cache_dir=cache_dir, **DATA)
    torch.manual_seed(0)
    module = GPTModule(LitGPT(Config(vocab_size=dm.vocab_size, block_size=64)),
                       tokenizer=dm.tokenizer)
    callback = NormXLogitCallback(dm.probes, every_n_steps=2, media_probes=0,
                                  faithfulness_every=1, store_dir=root / "store")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False,
                         callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=str(root))
    trainer.fit(module, dm)
    return load_run(root / "store")


def test_fsdp2_litgpt_and_hf_models_equal_one_process_and_resume(cache_dir, tmp_path):
    """One two-rank launch (each rank imports Lightning once) holds both parts; each is
    checked against one process of the same weights."""
    TextDataModule(cache_dir=cache_dir, **DATA)  # the shared tokenizer, trained before the ranks
    launched = tmp_path / "launch"
    launched.mkdir()
    script = launched / "fsdp_run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), data=DATA))
    run_ranks(script, str(launched), cache_dir, cwd=launched, timeout=400, what="FSDP2")
    _check_litgpt_with_resume(launched / "litgpt", cache_dir, tmp_path)
    _check_hf_shardings(launched / "hf", cache_dir, tmp_path)


def _check_litgpt_with_resume(root: Path, cache_dir: str, tmp_path: Path) -> None:
    """Fitted to step 2 with a checkpoint, resumed to step 4: each step stored once, step 0
    equal to one process."""
    reference = single_process(cache_dir, tmp_path / "single")
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["first"] == [0, 1, 2] and ranks[0]["second"] == [0, 1, 2, 4]  # restored
    # Rank 1 never writes: it records no step itself, and holds what the checkpoint restored.
    assert ranks[1]["first"] == [] and ranks[1]["second"] == [0, 1, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    run = load_run(root / "store")
    assert run.steps == [0, 1, 2, 4] and not len(run.missing)
    for name in ("embedding", "metrics", "probes", "tokens"):
        assert len(list((root / "store" / name).glob("*.parquet"))) == 4, name  # each once
    # Step 0: the same weights, sharded over two ranks, give the one-process numbers.
    key = ["probe_id", "layer", "position"]
    got = run["tokens"][run["tokens"].step == 0].sort_values(key).reset_index(drop=True)
    want = reference["tokens"][reference["tokens"].step == 0].sort_values(key)
    want = want.reset_index(drop=True)
    assert got[key + ["token"]].equals(want[key + ["token"]])
    for column in ("norm", "logat", "score", "each"):
        np.testing.assert_allclose(got[column], want[column], rtol=1e-5, atol=1e-5)
    emb = [r["embedding"][r["embedding"].step == 0].sort_values("token_id") for r in (run,
                                                                                 reference)]
    np.testing.assert_allclose(emb[0]["norm"], emb[1]["norm"], rtol=1e-6)
    metrics = [r["metrics"][r["metrics"].step == 0].set_index("key")["value"]
               for r in (run, reference)]
    keys = [k for k in metrics[1].index if k.startswith("faithfulness/normxlogit/")
            and "seconds" not in k]
    assert keys
    np.testing.assert_allclose(metrics[0][keys], metrics[1][keys], rtol=1e-5, atol=1e-5)


def _check_hf_shardings(root: Path, cache_dir: str, tmp_path: Path) -> None:
    """GPT-2 and Llama (untied head) under FSDP2, sharded per block and at the root, and Llama
    at the root only: each step stored once, and step 0 equal to one process's numbers."""
    from hf_shapes import SHARDINGS, HFModule

    dm = TextDataModule(cache_dir=cache_dir, **DATA)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:  # refused by name before the first step, on every rank
        assert "fully_shard was applied to AroundTheModel, around the watched model" in \
            rank["around"], rank["around"]
    assert not (root / "around").exists()
    key = ["probe_id", "layer", "position"]
    for name in SHARDINGS:
        assert ranks[0][name] == [0, 1, 2] and ranks[1][name] == [], name
        run = load_run(root / name)
        assert run.steps == [0, 1, 2] and not len(run.missing), name
        for table in ("embedding", "metrics", "probes", "tokens"):
            assert len(list((root / name / table).glob("*.parquet"))) == 3, (name, table)
        # One process, the same seed and weights, no sharding: the reference at step 0.
        pl.seed_everything(0, verbose=False)
        module = HFModule(name.split("-")[0], dm.vocab_size, dm.tokenizer, shard=None)
        callback = NormXLogitCallback(dm.probes, every_n_steps=2, media_probes=0,
                                      faithfulness_every=1, store_dir=tmp_path / "one" / name)
        pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False,
                   callbacks=[callback], enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False,
                   limit_val_batches=0, num_sanity_val_steps=0,
                   default_root_dir=str(tmp_path / "one")).fit(module, dm)
        reference = load_run(tmp_path / "one" / name)
        got = run["tokens"][run["tokens"].step == 0].sort_values(key).reset_index(drop=True)
        want = reference["tokens"][reference["tokens"].step == 0].sort_values(key)
        want = want.reset_index(drop=True)
        assert got[key + ["token"]].equals(want[key + ["token"]]), name
        for column in ("norm", "logat", "score", "each", "contrast"):
            np.testing.assert_allclose(got[column], want[column], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} {column}")
        emb = [r["embedding"][r["embedding"].step == 0].sort_values("token_id")
               for r in (run, reference)]
        np.testing.assert_allclose(emb[0]["norm"], emb[1]["norm"], rtol=1e-6, err_msg=name)
        metrics = [r["metrics"][r["metrics"].step == 0].set_index("key")["value"]
                   for r in (run, reference)]
        keys = [k for k in metrics[1].index if k.startswith(("faithfulness/normxlogit/",
                                                             "alignment/", "probe/"))
                and "seconds" not in k]
        # The gradient reference needs a backward pass, skipped under FSDP2 (it would reduce
        # gradients into the sharded parameters): its keys only are absent.
        absent = [k for k in keys if k not in metrics[0].index]
        assert absent and all(k.startswith(("alignment/input_x_gradient/",
                                            "alignment/saliency/")) for k in absent), absent
        keys = [k for k in keys if k not in absent]
        np.testing.assert_allclose(metrics[0][keys], metrics[1][keys], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
