"""Reading a model whose parameters FSDP2 (`fully_shard`) shards.

Under FSDP2 a sharded group's parameters are DTensor shards outside its forward; its own
forward hooks gather them and free them again. Two rules follow for a probe:

1. **Through the model's own forward.** FSDP2 makes the first module to run a forward the
   root of the sharding (it sets up the shared state there). Calling a submodule first, the
   transformer body for instance, would make that submodule the root and break training
   (`FSDP requires running forward through the root module first`). So the hidden states of
   a sharded model are always read by running the model itself (`reads_through_forward`),
   never its body: every block is then gathered and freed by FSDP exactly as in training.
2. **Gather what is read outside a forward.** The probe also reads tensors directly: the
   embedding rows (norms) and the head's target rows. Their groups may be sharded at that
   moment; `gather` unshards them (`FSDPModule.unshard`, on every rank together: each rank
   runs the same probes in the same order) and, when the outermost `reading` context ends,
   reshards the groups that were sharded when it began, so the model is left as it was.

Sharding the LightningModule (or any module around the watched model) is not supported:
the model's forward would then not be the root's. `outer_sharding` finds that case so the
drivers refuse it by name.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

_depth: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> open `reading`s
_sharded_before: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> groups
_lock = threading.Lock()


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return None
    return FSDPModule


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def class_name(module: object) -> str:
    """The user's class name of a module (`fully_shard` swaps in a subclass named
    ``FSDP<name>``)."""
    cls = _fsdp_module_class()
    if cls is not None and isinstance(module, cls):
        for base in type(module).__mro__[1:]:
            if not issubclass(base, cls):
                return base.__name__
    return type(module).__name__


def fsdp_groups(model: nn.Module | None) -> list[nn.Module]:
    """The modules `fully_shard` was applied to inside ``model`` (itself included), in
    module order: the same order on every rank."""
    cls = _fsdp_module_class()
    if model is None or cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def is_sharded(model: nn.Module | None) -> bool:
    """Whether FSDP2 shards (part of) ``model``."""
    return bool(fsdp_groups(model))


def reads_through_forward(model: nn.Module | None) -> bool:
    """Whether hidden states must be read by running ``model`` itself (rule 1)."""
    return is_sharded(model)


def outer_sharding(owner: nn.Module, model: nn.Module) -> nn.Module | None:
    """A sharded module of ``owner`` that contains ``model`` without being it (a sharded
    LightningModule around the watched model), or None."""
    inside = set(map(id, model.modules()))
    for group in fsdp_groups(owner):
        if group is not model and id(group) not in inside and any(
                m is model for m in group.modules()):
            return group
    return None


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(module) -> the sharded group that holds its own parameters (its nearest
    `fully_shard`-ed ancestor, itself included)."""
    cls = _fsdp_module_class()
    owner: dict[int, nn.Module] = {}

    def walk(module: nn.Module, current: nn.Module | None) -> None:
        if cls is not None and isinstance(module, cls):
            current = module
        if current is not None:
            owner[id(module)] = current
        for child in module.children():
            walk(child, current)

    walk(model, None)
    return owner


def _holds_shards(group: nn.Module, owners: dict[int, nn.Module]) -> bool:
    """Whether the group's own parameters are DTensor shards right now."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return False
    for module in group.modules():
        if owners.get(id(module)) is not group:
            continue
        for param in module.parameters(recurse=False):
            return isinstance(param, dtensor)
    return False


@contextmanager
def reading(model: nn.Module | None) -> Iterator[None]:
    """A probe of ``model``: on leaving the outermost one, the groups `gather` unsharded are
    sharded again if they were sharded when it began. A no-op for an unsharded model."""
    if not is_sharded(model):
        yield
        return
    with _lock:
        depth = _depth.get(model, 0)
        _depth[model] = depth + 1
        if depth == 0:
            owners = _owners(model)
            _sharded_before[model] = [g for g in fsdp_groups(model) if _holds_shards(g, owners)]
    try:
        yield
    finally:
        with _lock:
            _depth[model] -= 1
            outermost = _depth[model] == 0
            before = _sharded_before.pop(model, []) if outermost else []
        if outermost:
            owners = _owners(model)
            for group in before:
                if not _holds_shards(group, owners):
                    group.reshard()  # local: frees the gathered copy, no collective


def gather(model: nn.Module | None, modules: Iterable[nn.Module | None]) -> None:
    """Unshard the groups holding the parameters of ``modules`` (read outside a forward).
    Call it after the model's own forward (rule 1) and on every rank together; an
    unsharded group is left as it is."""
    if not is_sharded(model):
        return
    owners = _owners(model)
    seen: list[nn.Module] = []
    for module in modules:
        group = owners.get(id(module)) if module is not None else None
        if group is not None and all(group is not s for s in seen):
            seen.append(group)
    order = {id(g): i for i, g in enumerate(fsdp_groups(model))}
    for group in sorted(seen, key=lambda g: order[id(g)]):  # the same order on every rank
        if _holds_shards(group, owners):
            group.unshard()
