"""Reading a Hugging Face model: `read_hf_model` turns any causal LM, masked LM or sequence
classifier into a verified `ModelAdapter` without a table of model families.

It relies on what every HF model has: `base_model` (the transformer body), the one
`nn.ModuleList` holding its layers, `get_input_embeddings()` / `get_output_embeddings()`, and
the head module(s) beside the body. Two things are *discovered* by running the model once on
a tiny input with temporary hooks:

- the final transform (e.g. GPT-2's `ln_f`, Llama's `norm`, OPT's `final_layer_norm` +
  `project_out`): the modules the body applies to the last layer's output to produce
  `last_hidden_state`. It is applied to intermediate layers (the logit lens), never twice to
  the last one (a known trap: `last_hidden_state` is already normed).
- whether the reconstruction is exact: the adapter's head applied to `last_hidden_state` must
  reproduce the model's own logits (soft-capping, biases, tied or untied weights, MLM
  transforms, poolers). If it does not, reading fails with an error instead of producing
  wrong numbers.

The only named special cases are logit post-processing that lives in a model's `forward`
rather than in a module (`final_logit_softcapping`, `logit_scale`, `logits_scaling`) and the
BERT-style pooler that a classifier applies first. A model FSDP2 shards is read through its
own forward (`sharding.py`).
"""

from __future__ import annotations

import inspect
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
    probe_mode,
    text_config,
)


def _forward_kwargs(body: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(body.forward).parameters)
    except (TypeError, ValueError):
        return set()


class _BodyReader:
    """Runs the body once and returns L+1 hidden states, read with temporary hooks.

    Hugging Face's own `output_hidden_states=True` installs permanent capture hooks
    on the layers in transformers 5, which would leave the model changed after a
    probe. Our hooks are removed in a `finally`.

    A model sharded by FSDP2 is run whole instead (see `sharding.py`: its root must run
    first), the last hidden state read off the body's output and the head asked for one
    position only where the forward takes `logits_to_keep`; then the groups holding the
    tensors read directly (``gathered``: embedding, head) are gathered.
    """

    def __init__(self, body: nn.Module, layers: nn.ModuleList, causal: bool,
                 model: nn.Module | None = None):
        self.body = body
        self.layers = layers
        self.causal = causal
        self.model = model if sharding.reads_through_forward(model) else None
        self.gathered: list[nn.Module] = []
        params = _forward_kwargs(self.model if self.model is not None else body)
        self.accepts_position_ids = "position_ids" in params
        self.accepts_use_cache = "use_cache" in params
        self.accepts_logits_to_keep = "logits_to_keep" in params

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None):
        states: list[Tensor | None] = [None] * (len(self.layers) + 1)
        body_out: list = [None]

        def grab_input(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            states[0] = x

        def grab_output(i):
            def hook(module, args, output):
                states[i + 1] = first_tensor(output)

            return hook

        def grab_body(module, args, output):
            body_out[0] = output

        handles = [self.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
        handles += [
            layer.register_forward_hook(grab_output(i)) for i, layer in enumerate(self.layers)
        ]
        kwargs: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.accepts_use_cache:
            kwargs["use_cache"] = False
        if (
            self.causal
            and self.accepts_position_ids
            and attention_mask is not None
            and bool((attention_mask[:, 0] == 0).any())
        ):
            # Left padding: count positions from each row's first real token, as
            # `generate` does, so a padded row scores exactly like the row alone.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        try:
            if self.model is None:
                out = self.body(**kwargs)
            else:
                handles.append(self.body.register_forward_hook(grab_body))
                if self.accepts_logits_to_keep:
                    kwargs["logits_to_keep"] = 1
                self.model(**kwargs)
                out = body_out[0]
                sharding.gather(self.model, self.gathered)
        finally:
            for h in handles:
                h.remove()
        if out is None:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}'s forward did not run its body "
                f"{type(self.body).__name__}; build a normx_callbacks.ModelAdapter instead")
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else first_tensor(out)
        if any(s is None for s in states):
            raise UnsupportedModelError(
                f"{type(self.body).__name__} did not run every layer of its layer stack; "
                "build a normx_callbacks.ModelAdapter instead"
            )
        # Entry L is the body's output (final norm applied), as in Hugging Face.
        raw_last = states[-1]
        states[-1] = last
        return states, raw_last


def _discover_final_chain(body, layers, reader, dummy, mask) -> list[nn.Module]:
    """Modules the body applies, in order, to the last layer's output."""
    parents: dict[nn.Module, nn.Module] = {}
    for parent in body.modules():
        for child in parent.children():
            parents.setdefault(child, parent)

    def ancestors(m):
        while m in parents:
            m = parents[m]
            yield m

    layer_ancestors = set(ancestors(layers)) | {layers}
    inside_layers = set(layers.modules())
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []
    started = [False]

    def after_last_layer(module, args, output):
        started[0] = True

    def record(module, args, kwargs, output):
        if started[0] and isinstance(output, Tensor):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, Tensor):
                calls.append((module, x, output))

    handles = [layers[-1].register_forward_hook(after_last_layer)]
    for m in body.modules():
        if m is body or m in layer_ancestors or m in inside_layers:
            continue
        handles.append(m.register_forward_hook(record, with_kwargs=True))
    try:
        states, raw_last = reader(dummy, mask)
    finally:
        for h in handles:
            h.remove()
    # Only outermost calls: a norm's own submodules are not separate chain steps.
    recorded = {id(m) for m, _, _ in calls}
    calls = [c for c in calls if not any(id(a) in recorded for a in ancestors(c[0]))]
    # Follow the tensor from the last layer's output through shape-preserving
    # per-token modules (OPT's project_out may change the width); a pooler, which
    # drops the sequence axis, or a sibling branch is not on the path.
    chain, current = [], raw_last
    for module, x, y in calls:
        same = x is current or (x.shape == current.shape and torch.equal(x, current))
        if same and y.shape[:-1] == x.shape[:-1]:
            chain.append(module)
            current = y
    final = states[-1]
    if current.shape != final.shape or not torch.allclose(
        current.float(), final.float(), atol=1e-5, rtol=1e-4
    ):
        raise UnsupportedModelError(
            f"could not identify the final norm of {type(body).__name__}: no chain of "
            "modules maps the last layer's output to last_hidden_state; build a "
            "normx_callbacks.ModelAdapter with final_norm=... instead"
        )
    return chain


def _logit_post(config) -> Callable[[Tensor], Tensor] | None:
    """Logit post-processing that models apply in `forward`, outside any module."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    divide = getattr(config, "logits_scaling", None)  # Granite divides
    ops = []
    if isinstance(scale, (int, float)) and scale != 1:
        ops.append(lambda z, s=float(scale): z * s)
    if isinstance(divide, (int, float)) and divide != 1:
        ops.append(lambda z, s=float(divide): z / s)
    if cap:
        ops.append(lambda z, c=float(cap): torch.tanh(z / c) * c)
    if not ops:
        return None

    def post(z: Tensor) -> Tensor:
        for op in ops:
            z = op(z)
        return z

    return post


class _HeadInput(Exception):
    """Raised from a pre-hook to stop a head module at its output projection."""

    def __init__(self, x: Tensor):
        super().__init__()
        self.x = x


def _head_modules(model: nn.Module, body: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.children()
        if m is not body
        and not isinstance(m, nn.Dropout)
        and any(True for _ in m.parameters())
    ]


def _lm_pre(head: nn.Module, output_embedding: nn.Module) -> Callable[[Tensor], Tensor]:
    """The head's transform before its output projection (identity for GPT-style)."""
    if head is output_embedding:
        return lambda x: x

    def stop(module, args):
        raise _HeadInput(args[0])

    def pre(x: Tensor) -> Tensor:
        handle = output_embedding.register_forward_pre_hook(stop)
        try:
            head(x)
        except _HeadInput as captured:
            return captured.x
        finally:
            handle.remove()
        raise UnsupportedModelError(
            f"{type(head).__name__} never called its output embedding; build a "
            "normx_callbacks.ModelAdapter with head=... instead"
        )

    return pre


def _classifier_head(head: nn.Module, pooler: nn.Module | None) -> Callable[[Tensor], Tensor]:
    """Apply a sequence classifier (and its pooler) to every token vector separately."""

    def apply(x: Tensor) -> Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        h = x.reshape(-1, 1, d)  # each vector as a length-1 sequence: [:, 0] picks it
        if pooler is not None:
            h = pooler(h)
        out = head(h)
        return out.reshape(*lead, -1)

    return apply


def read_hf_model(model: nn.Module) -> ModelAdapter:
    name = type(model).__name__
    how = (
        "build a normx_callbacks.ModelAdapter(module=..., embedding=..., hidden_states=..., "
        "final_norm=..., head=...) and pass it instead of the model"
    )
    if getattr(text_config(model), "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model: NormXLogit explains a decoder-only or "
            f"encoder-only language model, whose every token has its own last-layer vector "
            f"under the head; to explain one of its stacks, {how}"
        )
    body = getattr(model, "base_model", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if body is model and get_in is not None:
        raise UnsupportedModelError(
            f"{name} is a bare transformer body without a head: it returns hidden states, "
            f"not logits, and NormXLogit explains a logit. Watch the model with its head "
            f"(e.g. {name.removesuffix('Model')}ForCausalLM or ...ForMaskedLM), or {how}"
        )
    if body is None or get_in is None or body is model:
        raise UnsupportedModelError(
            f"{name} is not a Hugging Face model with a head (no base_model / "
            f"get_input_embeddings found); {how}"
        )
    embedding = get_in()
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModelError(f"{name}.get_input_embeddings() is not an nn.Embedding; {how}")
    config = text_config(model)
    num_layers = getattr(config, "num_hidden_layers", None)
    layers = find_layer_stack(body, num_layers)
    output_embedding = model.get_output_embeddings()
    heads = _head_modules(model, body)

    if output_embedding is not None:
        kind = "causal" if _can_generate(model) else "masked"
    else:
        if len(heads) != 1:
            raise UnsupportedModelError(
                f"{name} has no output embeddings and {len(heads)} candidate head modules "
                f"({[type(h).__name__ for h in heads]}); {how}"
            )
        num_labels = getattr(model.config, "num_labels", None)
        kind = "regression" if num_labels == 1 else "classifier"

    reader = _BodyReader(body, layers, causal=kind == "causal", model=model)
    reader.gathered = [embedding, output_embedding, *heads]
    dummy, mask = dummy_tokens(embedding, context_length_of(model))

    with probe_mode(model):
        chain = _discover_final_chain(body, layers, reader, dummy, mask)
        if kind in ("causal", "masked"):
            head = next((h for h in heads if h is output_embedding), None)
            if head is None:
                owners = [h for h in heads if any(m is output_embedding for m in h.modules())]
                if len(owners) != 1:
                    raise UnsupportedModelError(
                        f"cannot find the head module holding {name}'s output embeddings; {how}"
                    )
                head = owners[0]
            pre = _lm_pre(head, output_embedding)
            weight = output_embedding.weight
            bias = getattr(output_embedding, "bias", None)
            post = _logit_post(config)
            adapter = ModelAdapter(
                module=model,
                embedding=embedding,
                hidden_states=lambda ids, m: reader(ids, m)[0],
                head=lambda x: ModelAdapter.full_logits(adapter, x),
                final_norm=apply_chain(chain),
                kind=kind,
                unembedding=(pre, weight, bias, post),
                num_layers=len(layers),
                output_embedding=output_embedding,
            )
        else:
            pooler = getattr(body, "pooler", None)
            adapter = ModelAdapter(
                module=model,
                embedding=embedding,
                hidden_states=lambda ids, m: reader(ids, m)[0],
                head=_classifier_head(heads[0], pooler if isinstance(pooler, nn.Module) else None),
                final_norm=apply_chain(chain),
                kind=kind,
                num_layers=len(layers),
            )
        expected = model(input_ids=dummy, attention_mask=mask).logits
        check_logits(expected, adapter, dummy, mask, type(model).__name__)
    return adapter


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else bool(getattr(model.config, "is_decoder", False))


def find_layer_stack(body: nn.Module, num_layers: int | None) -> nn.ModuleList:
    """The body's `nn.ModuleList` of transformer blocks."""
    lists = [m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if num_layers is not None:
        exact = [m for m in lists if len(m) == num_layers]
        if exact:
            return exact[0]
    if not lists:
        raise UnsupportedModelError(
            f"no nn.ModuleList of transformer layers found in {type(body).__name__}; "
            "build a normx_callbacks.ModelAdapter with a hidden_states function instead"
        )
    return max(lists, key=len)


