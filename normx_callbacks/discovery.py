"""Reading any language model: `resolve_adapter` (a Hugging Face model through
`hf_reading.read_hf_model`, any other by tracing it, cached per model while its signature
holds) and `find_model` (which module inside a LightningModule is the model being trained).

Discovery for any PyTorch language model, not only Hugging Face ones.

`discover_adapter(model)` reads a module whose forward takes token ids alone and returns
logits (a tensor, the first element of a tuple, or an output with `.logits`), such as a
nanoGPT- or litgpt-shaped `GPT`. It runs the model once on a few dummy ids with temporary
hooks on every submodule and finds, from what actually ran:

- the embedding: the `nn.Embedding` that received the ids themselves;
- the blocks: the one `nn.ModuleList` whose every entry ran exactly once, in order;
- `hidden_states[0]`: the input of the first block, so position embeddings, scaling and
  dropout count exactly as the model applies them;
- the final transform: the modules that map the last block's output, in order, to the
  head's input (`ln_f`, `norm`);
- the head: the `nn.Linear` onto the vocabulary that produced the logits, tied or not.

The adapter is then verified: its head on its last hidden state must reproduce the
model's own logits, or the model is refused with the largest difference. Logit
post-processing done in `forward` outside a module (soft-capping, a log-softmax) and
encoder-decoder models are refused with a message that says how to build a
`ModelAdapter` instead. Discovered models take no attention mask (`accepts_mask=False`):
probes run in groups of equal length, so padding never reaches them.

Past 400 lines as one module: resolving, caching, re-verifying and tracing adapters are one
decision (which adapter reads this model, now).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import sharding
from .adapters import (
    ModelAdapter,
    UnsupportedModelError,
    apply_chain,
    check_logits,
    context_length_of,
    dummy_tokens,
    first_tensor,
    logits_of,
    model_signature,
    probe_mode,
    verify_adapter,
)
from .hf_reading import read_hf_model

HOW = ("build a normx_callbacks.ModelAdapter(module=..., embedding=..., hidden_states=..., "
       "final_norm=..., head=...) and pass it as adapter=...")
_ENCODER_DECODER = (nn.Transformer, nn.TransformerDecoder, nn.TransformerDecoderLayer)

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from the head's pre-hook: a probe needs the head's input, not all logits."""


class _Call:
    """One module call seen by the tracing hooks."""

    __slots__ = ("module", "x", "out", "order")

    def __init__(self, module: nn.Module, x: Tensor | None, order: int):
        self.module, self.x, self.out, self.order = module, x, None, order


def _first_arg(args, kwargs) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def _trace(model: nn.Module, ids: Tensor) -> tuple[list[_Call], object]:
    """Every module call of `model(ids)` in the order the calls started, and the output."""
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}

    def pre(module, args, kwargs):
        call = _Call(module, _first_arg(args, kwargs), len(calls))
        calls.append(call)
        open_calls.setdefault(id(module), []).append(call)

    def post(module, args, kwargs, output):
        stack = open_calls.get(id(module))
        if stack:
            stack.pop().out = output

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        output = model(ids)
    finally:
        for h in handles:
            h.remove()
    return calls, output


def _refuse_encoder_decoder(model: nn.Module, name: str) -> None:
    config = getattr(model, "config", None)
    found = next((m for m in model.modules() if isinstance(m, _ENCODER_DECODER)), None)
    if getattr(config, "is_encoder_decoder", False) or found is not None:
        part = f" (it contains {type(found).__name__})" if found is not None else ""
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model{part}: NormXLogit explains a decoder-only or "
            "encoder-only language model, whose every token has its own last-layer vector "
            f"under the head. To explain one of its stacks, {HOW}"
        )


def _block_stack(model: nn.Module, calls: list[_Call], name: str) -> nn.ModuleList:
    """The outermost `nn.ModuleList` whose entries each ran once, in index order."""
    count: dict[int, list[int]] = {}
    for call in calls:
        count.setdefault(id(call.module), []).append(call.order)
    stacks = []
    for m in model.modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        orders = [count.get(id(child), []) for child in m]
        if all(len(o) == 1 for o in orders) and orders == sorted(orders):
            stacks.append(m)
    inside = {id(sub) for s in stacks for child in s for sub in child.modules()}
    outer = [s for s in stacks if id(s) not in inside]
    if not outer:
        raise UnsupportedModelError(
            f"{name} has no nn.ModuleList of blocks that its forward runs once each, in order "
            f"(blocks shared or called twice, or kept in another container); {HOW}"
        )
    if len(outer) > 1:
        raise UnsupportedModelError(
            f"{name} runs {len(outer)} separate stacks of blocks ({[len(s) for s in outer]} "
            f"blocks): an encoder-decoder or a multi-stack model is not one layer stack; {HOW}"
        )
    return outer[0]


def _same(a: Tensor | None, b: Tensor) -> bool:
    return isinstance(a, Tensor) and (a is b or (a.shape == b.shape and torch.equal(a, b)))


def _final_chain(calls: list[_Call], stack: nn.ModuleList, head: _Call,
                 name: str) -> list[nn.Module]:
    """Modules applied, in order, to the last block's output to give the head's input."""
    last = max((c for c in calls if c.module is stack[-1]), key=lambda c: c.order)
    raw = first_tensor(last.out)
    end = max(c.order for c in calls if any(c.module is m for m in stack[-1].modules()))
    between = [c for c in calls if end < c.order < head.order and isinstance(c.out, Tensor)]
    # Outermost calls only: a norm's own submodules are not separate steps.
    spans = []
    chain, current = [], raw
    for call in between:
        if any(a < call.order <= b for a, b in spans):
            continue
        inner = [c.order for c in between if any(c.module is s for s in call.module.modules())]
        spans.append((call.order, max(inner)))
        if _same(call.x, current) and call.out.shape[:-1] == current.shape[:-1]:
            chain.append(call.module)
            current = call.out
    head_in = head.x
    if not (_same(head_in, current) or (head_in is not None and head_in.dim() == current.dim()
                                        and _same(head_in, current[..., -head_in.shape[-2]:, :]))):
        raise UnsupportedModelError(
            f"could not identify the final transform of {name}: no chain of modules maps the "
            f"last block's output to the input of its head; {HOW}"
        )
    return chain


def _head_call(calls: list[_Call], stack: nn.ModuleList, logits: Tensor, name: str) -> _Call:
    """The last `nn.Linear` call after the blocks whose output has the logits' width."""
    end = max(c.order for c in calls if c.module is stack[-1])
    width = logits.shape[-1]
    found = [c for c in calls if c.order > end and isinstance(c.module, nn.Linear)
             and c.module.out_features == width]
    if not found:
        raise UnsupportedModelError(
            f"{name} applies no nn.Linear onto its {width} logits after its last block; {HOW}"
        )
    return found[-1]


def _is_causal(model: nn.Module, ids: Tensor, logits: Tensor) -> bool:
    """Whether earlier positions ignore a change to the last token (a causal LM)."""
    if logits.dim() != 3 or logits.shape[1] != ids.shape[1]:
        return True  # returns the last position only: a generative forward
    changed = ids.clone()
    changed[0, -1] = ids[0, 0] if int(ids[0, -1]) != int(ids[0, 0]) else ids[0, 1]
    other = logits_of(model(changed), type(model).__name__)
    return torch.allclose(other[:, :-1].float(), logits[:, :-1].float(), atol=1e-5, rtol=1e-4)


class _StackReader:
    """`(input_ids, mask) -> L+1 hidden states` for a discovered model, read with temporary
    hooks; the head is never applied (its pre-hook stops the forward)."""

    def __init__(self, model: nn.Module, stack: nn.ModuleList, head: nn.Module,
                 final: Callable[[Tensor], Tensor] | None):
        self.model, self.stack, self.head, self.final = model, stack, head, final
        # Stopping a forward early would skip FSDP2's post-forward hooks: a sharded model
        # runs to the end, and then the groups of the tensors read directly are gathered.
        self.stop_at_head = not sharding.reads_through_forward(model)
        self.gathered: list[nn.Module] = []

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        states: list[Tensor | None] = [None] * (len(self.stack) + 1)

        def grab_input(module, args, kwargs):
            states[0] = _first_arg(args, kwargs)

        def grab_output(i):
            def hook(module, args, output):
                states[i + 1] = first_tensor(output)

            return hook

        def stop(module, args):
            raise _Stop

        handles = [self.stack[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
        handles += [b.register_forward_hook(grab_output(i)) for i, b in enumerate(self.stack)]
        if self.stop_at_head:
            handles.append(self.head.register_forward_pre_hook(stop))
        try:
            self.model(input_ids)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        sharding.gather(self.model, self.gathered)
        if any(s is None for s in states):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} did not run every block of its layer stack"
            )
        if self.final is not None:
            states[-1] = self.final(states[-1])
        return states


def discover_adapter(model: nn.Module) -> ModelAdapter:
    """A verified `ModelAdapter` for any module whose forward maps token ids to logits."""
    name = type(model).__name__
    _refuse_encoder_decoder(model, name)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise UnsupportedModelError(f"{name} has no nn.Embedding for token ids; {HOW}")
    smallest = min(embeddings, key=lambda e: e.num_embeddings)
    dummy, mask = dummy_tokens(smallest, context_length_of(model))
    with probe_mode(model):
        try:
            calls, output = _trace(model, dummy)
        except Exception as error:  # noqa: BLE001 - reported with the way out
            raise UnsupportedModelError(
                f"calling {name}(input_ids) on ids of shape {tuple(dummy.shape)} failed "
                f"({type(error).__name__}: {error}): discovery needs a forward that takes token "
                f"ids alone and returns logits; {HOW}"
            ) from error
        logits = logits_of(output, name)
        receiving = {id(c.module): c.module for c in calls
                     if isinstance(c.module, nn.Embedding) and _same(c.x, dummy)}
        if len(receiving) != 1:
            raise UnsupportedModelError(
                f"{name}: {len(receiving)} nn.Embedding modules received the token ids "
                f"(expected exactly one); {HOW}"
            )
        embedding = next(iter(receiving.values()))
        stack = _block_stack(model, calls, name)
        head = _head_call(calls, stack, logits, name)
        chain = _final_chain(calls, stack, head, name)
        final = apply_chain(chain)
        reader = _StackReader(model, stack, head.module, final)
        linear: nn.Linear = head.module
        reader.gathered = [embedding, linear, *chain]
        adapter = ModelAdapter(
            module=model,
            embedding=embedding,
            hidden_states=reader,
            head=lambda x: ModelAdapter.full_logits(adapter, x),
            final_norm=final,
            kind="causal" if _is_causal(model, dummy, logits) else "masked",
            unembedding=(lambda x: x, linear.weight, linear.bias, None),
            num_layers=len(stack),
            output_embedding=linear,
            accepts_mask=False,
        )
        check_logits(logits, adapter, dummy, mask, name)
    return adapter


# --------------------------------------------------------------------------- any model


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (signature, adapter)


def resolve_adapter(model: nn.Module | ModelAdapter, *, check: bool = False) -> ModelAdapter:
    """A verified `ModelAdapter` for a Hugging Face model, or for any other module whose
    forward maps token ids to logits (`discovery.discover_adapter`).

    Cached per model while `model_signature` is unchanged: a model whose modules or
    embedding shapes changed (a resized vocabulary) is read again. ``check`` verifies a
    cached adapter against the model's own logits once more (the weights may have changed
    in a way no signature sees) and reads the model again if it no longer agrees.
    """
    if isinstance(model, ModelAdapter):
        return model
    signature = model_signature(model) if isinstance(model, nn.Module) else None
    try:
        cached_signature, adapter = _CACHE[model]
    except (KeyError, TypeError):
        pass
    else:
        if cached_signature == signature:
            if not check:
                return adapter
            try:
                verify_adapter(adapter)
                return adapter
            except UnsupportedModelError:
                pass  # read again below; a model that no longer reads at all raises there
    if isinstance(model, nn.Module) and not _is_hf(model):
        adapter = discover_adapter(model)
    else:
        adapter = read_hf_model(model)
    adapter.resolved = True  # read off the model: it can be read again when the model changes
    try:
        _CACHE[model] = (signature, adapter)
    except TypeError:  # not weak-referenceable: never cached
        pass
    return adapter


def _is_hf(model: nn.Module) -> bool:
    """A Hugging Face model: it has `base_model` and `get_input_embeddings`."""
    return getattr(model, "base_model", None) is not None and hasattr(
        model, "get_input_embeddings")


# --------------------------------------------------------------------------- finding the model


def find_model(owner_module: nn.Module, model_attr: str | None = None, *,
               who: str = "NormXLogitCallback", check: bool = False) -> ModelAdapter:
    """The adapter of the language model being trained inside ``owner_module`` (a
    LightningModule, or any module wrapping the model; the model itself works too).

    ``model_attr`` (a dotted attribute path) names it; else the one outermost Hugging Face
    model, the trainable one when a frozen one sits beside it (a teacher, a reference);
    else the one plain PyTorch LM (a module holding an `nn.Embedding` and an
    `nn.ModuleList`), read by `discover_adapter`. Ambiguity and a frozen model while
    something else trains are refused with a message naming the fix, and so is FSDP2
    sharding applied around the model rather than to it (see `sharding.py`). ``check``:
    verify a cached adapter against the model's logits again (`resolve_adapter`).
    """
    from transformers import PreTrainedModel

    name = type(owner_module).__name__
    if model_attr:
        model = owner_module
        try:
            for part in model_attr.split("."):
                model = getattr(model, part)
        except AttributeError:
            raise RuntimeError(f"{who}(model_attr={model_attr!r}): {name} has no such "
                               "attribute") from None
    elif isinstance(owner_module, PreTrainedModel):
        model = owner_module  # the model itself (a Fabric or plain loop passes it directly)
    else:
        found = [(n, m) for n, m in owner_module.named_modules() if isinstance(m, PreTrainedModel)]
        # Outermost models only: a CausalLM contains its base model.
        outer = [(n, m) for n, m in found
                 if not any(n != o and n.startswith(o + ".") for o, _ in found if o)]
        if not outer:
            model = _plain_model(owner_module, who)
        else:
            # A frozen model (a teacher, a reference) is not the one being trained.
            trainable = [(n, m) for n, m in outer if _trainable(m)]
            if len(outer) > 1 and len(trainable) == 1:
                log.info("%s: watching %r, the only Hugging Face model with trainable "
                         "parameters (frozen: %s)", who, trainable[0][0],
                         [n for n, m in outer if m is not trainable[0][1]])
                outer = trainable
            if len(outer) != 1:
                names = [n or "<the module itself>" for n, _ in outer]
                raise RuntimeError(
                    f"{who} found {len(outer)} Hugging Face models in {name} ({names}); pass "
                    "model_attr='name' or adapter=ModelAdapter(...)")
            model = _choose_model(owner_module, outer, who)
    around = sharding.outer_sharding(owner_module, model)
    if around is not None:
        raise RuntimeError(
            f"{who}: fully_shard was applied to {sharding.class_name(around)}, around the "
            f"watched model {sharding.class_name(model)}; FSDP2 then takes the outer module's forward as its "
            "root and the model cannot be probed by its own forward. Apply fully_shard to the "
            "model's blocks and to the model itself (in configure_model), not to the module "
            "around it")
    try:
        return resolve_adapter(model, check=check)
    except UnsupportedModelError as error:
        raise RuntimeError(f"{who} cannot read the model: {error}") from error


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _choose_model(owner_module: nn.Module, outer: list, who: str) -> nn.Module:
    """The one Hugging Face model found, unless it is frozen while another module trains."""
    name, model = outer[0]
    if _trainable(model):
        return model
    inside = {id(p) for p in model.parameters()}
    training = [n for n, child in owner_module.named_children()
                if any(p.requires_grad and id(p) not in inside for p in child.parameters())]
    if training:
        raise RuntimeError(
            f"{who}: the only Hugging Face model, {name!r} ({type(model).__name__}), has no "
            f"trainable parameters, while {training[0]!r} "
            f"({type(getattr(owner_module, training[0])).__name__}) trains; its embeddings "
            "would never move. Watch the trained model with "
            f"adapter=ModelAdapter(module=pl_module.{training[0]}, ...), or pass "
            f"model_attr={name!r} to watch the frozen model on purpose")
    return model


def _plain_model(owner_module: nn.Module, who: str) -> nn.Module:
    """The one plain PyTorch language model in ``owner_module``: the outermost submodule
    holding an `nn.Embedding` and an `nn.ModuleList` (the module itself when none does),
    preferring the trainable one."""

    def is_lm(m: nn.Module) -> bool:
        if type(m).forward is nn.Module.forward:  # a container (ModuleDict), not a model
            return False
        kinds = {type(x) for x in m.modules()}
        return any(issubclass(k, nn.Embedding) for k in kinds) and any(
            issubclass(k, nn.ModuleList) for k in kinds)

    found = [(n, m) for n, m in owner_module.named_modules() if n and is_lm(m)]
    outer = [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o, _ in found)]
    if len(outer) > 1:
        outer = [(n, m) for n, m in outer if _trainable(m)] or outer
    if len(outer) > 1:
        raise RuntimeError(
            f"{who} found {len(outer)} language models in {type(owner_module).__name__} "
            f"({[n for n, _ in outer]}); pass model_attr='name' or adapter=ModelAdapter(...)")
    if outer:
        return outer[0][1]
    if is_lm(owner_module):
        return owner_module
    raise RuntimeError(
        f"{who} found no language model in {type(owner_module).__name__}: no Hugging Face "
        "model and no module holding an nn.Embedding and an nn.ModuleList of blocks (if the "
        "model is built in configure_model, build it there, not in a hook that runs later); "
        "pass model_attr='name' or adapter=ModelAdapter(...)")
