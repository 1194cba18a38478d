"""`sharding`: reading a model whose parameters FSDP2 (`fully_shard`) shards, on one CPU
process (a one-rank gloo group started in this process, torn down after).

Checks that an unsharded model passes through every function untouched; that the user's
class name is kept under FSDP2's swapped-in subclass; that the sharded groups are listed in
module order; that sharding applied around the watched model is found (and refused by
`find_model` with the way out); that `gather` unshards exactly the groups of the modules
read, and that leaving the outermost `reading` reshards what was sharded when it began,
leaving what was already gathered as it was. (Two-rank FSDP2 training with the callback:
test_sharded.py.)
"""

from __future__ import annotations

import pytest
import torch
from lm_shapes import Config, NanoGPT
from torch import nn

from normx_callbacks import sharding
from normx_callbacks.discovery import find_model

dist = torch.distributed


class Owner(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@pytest.fixture(scope="module")
def mesh():
    assert dist.is_available(), "the pinned torch (2.13.0, CPU) has torch.distributed"
    assert not dist.is_initialized()
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def shard_blocks_and_model(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def test_an_unsharded_model_passes_through_untouched():
    model = NanoGPT(Config())
    assert sharding.class_name(model) == "NanoGPT"
    assert sharding.fsdp_groups(model) == [] and sharding.fsdp_groups(None) == []
    assert not sharding.is_sharded(model) and not sharding.reads_through_forward(None)
    assert sharding.outer_sharding(Owner(model), model) is None
    weight = model.transformer.wte.weight
    with sharding.reading(model):
        sharding.gather(model, [model.transformer.wte, None])
    assert model.transformer.wte.weight is weight


def test_class_names_groups_and_sharding_around_the_model(mesh):
    torch.manual_seed(0)
    model = shard_blocks_and_model(NanoGPT(Config()), mesh)
    assert type(model).__name__ == "FSDPNanoGPT" and sharding.class_name(model) == "NanoGPT"
    groups = sharding.fsdp_groups(Owner(model))
    assert groups == [model, *model.transformer.h]  # module order: the same on every rank
    assert sharding.is_sharded(model) and sharding.reads_through_forward(model)
    assert sharding.outer_sharding(Owner(model), model) is None  # sharded itself: fine

    from torch.distributed.fsdp import fully_shard

    around = fully_shard(Owner(NanoGPT(Config())), mesh=mesh)
    assert sharding.class_name(sharding.outer_sharding(around, around.model)) == "Owner"
    with pytest.raises(RuntimeError, match=r"^Who: fully_shard was applied to Owner, around the "
                                           r"watched model NanoGPT; .* not to the module around "
                                           r"it"):
        find_model(around, who="Who")


def test_gather_unshards_what_is_read_and_reading_reshards_it_after(mesh):
    torch.manual_seed(0)
    model = shard_blocks_and_model(NanoGPT(Config()), mesh)
    embedding, block = model.transformer.wte, model.transformer.h[0]
    assert sharded(embedding.weight) and sharded(block.attn.qkv.weight)
    with sharding.reading(model):
        with sharding.reading(model):  # nested: only the outermost reshards
            sharding.gather(model, [embedding])
        assert not sharded(embedding.weight)  # the root group (embedding, ln_f, head)
        assert sharded(block.attn.qkv.weight)  # a block's group: not asked for
        assert not sharded(model.lm_head.weight)  # the same group as the embedding
    assert sharded(embedding.weight) and sharded(model.lm_head.weight)

    # A group already gathered when the probe began is left gathered.
    model.unshard()
    with sharding.reading(model):
        sharding.gather(model, [embedding, block])
        assert not sharded(block.attn.qkv.weight)
    assert not sharded(embedding.weight) and sharded(block.attn.qkv.weight)
    model.reshard()
    assert sharded(embedding.weight)
