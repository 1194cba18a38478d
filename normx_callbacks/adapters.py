"""How NormXLogit reads a model: the layer stack, the final norm and the head-on-top.

`resolve_adapter(model)` turns any Hugging Face causal LM, masked LM or sequence
classifier into a `ModelAdapter` without a table of model families. It relies on
what every HF model has: `base_model` (the transformer body), the one
`nn.ModuleList` holding its layers, `get_input_embeddings()` /
`get_output_embeddings()`, and the head module(s) beside the body. Two things are
*discovered* by running the model once on a tiny input with temporary hooks:

- the final transform (e.g. GPT-2's `ln_f`, Llama's `norm`, OPT's
  `final_layer_norm` + `project_out`): the modules the body applies to the last
  layer's output to produce `last_hidden_state`. It is applied to intermediate
  layers (the logit lens), never twice to the last one (a known trap: `last_hidden_state` is already normed).
- whether the reconstruction is exact: the adapter's head applied to
  `last_hidden_state` must reproduce the model's own logits (soft-capping, biases,
  tied or untied weights, MLM transforms, poolers). If it does not, resolution
  fails with an error instead of producing wrong numbers.

The only named special cases are logit post-processing that lives in a model's
`forward` rather than in a module (`final_logit_softcapping`, `logit_scale`,
`logits_scaling`) and the BERT-style pooler that a classifier applies first.

Any other language model (a nanoGPT- or litgpt-shaped `GPT`) is discovered by
`discovery.discover_adapter`; anything else works through a `ModelAdapter` the user builds.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import sharding

KINDS = ("causal", "masked", "classifier", "regression")


class UnsupportedModelError(ValueError):
    """The model's layers, final norm or head could not be found or verified."""


@dataclass
class ModelAdapter:
    """Everything NormXLogit needs from a model.

    Build one by hand for a model that is not a Hugging Face `PreTrainedModel`:

    ```python
    adapter = ModelAdapter(
        module=model,                                   # flags are saved/restored around probes
        embedding=model.tok_emb,                        # nn.Embedding: the raw token rows
        hidden_states=lambda ids, mask: model.states(ids, mask),  # L+1 tensors [B, T, d]
        final_norm=model.ln_f,                          # applied to layers 0..L-1 only
        head=model.lm_head,                             # [..., d] -> logits [..., C]
        kind="causal",
    )
    ```

    Attributes:
        module: the model; its submodules' train/eval flags are restored after a probe.
        embedding: the input embedding (`nn.Embedding`); its rows give `norm="word"`.
        hidden_states: `(input_ids, attention_mask) -> sequence of L+1 [B, T, d]`,
            entry 0 the embedding output and entry L the body's final output with the
            final norm already applied (the Hugging Face convention).
        final_norm: the transform between a layer's raw output and the head's input,
            applied to entries 0..L-1; None when the body has none (post-LN models).
        head: head-on-top, `[..., d] -> [..., C]` logits (vocabulary or classes).
        kind: one of "causal", "masked", "classifier", "regression".
        unembedding: optional fast path for large vocabularies: `(pre, weight, bias,
            post)` so that `head(x) == post(pre(x) @ weight.T + bias)`; only the
            target rows of `weight` are then ever used.
        pool_position: for classifiers, the token whose vector the model classifies:
            "first" (BERT-style [CLS]) or "last" (decoder-style).
        num_layers: L.
        forward: `input_ids -> logits [B, T, C]` (or a tuple / output with `.logits`
            whose first element is the logits): the model's own forward, which
            `verify_adapter` checks the adapter against. Default: `module(input_ids)`.
        context_length: the longest input the model takes; None reads `block_size`,
            `max_position_embeddings`, `n_positions` or `n_ctx` from the module or its
            config (see `context_length_of`).
        accepts_mask: False for models that take no attention mask / position ids (they
            see padding as text): `normxlogit` then batches rows of equal length only, so
            padding never changes a number.
    """

    module: nn.Module | None
    embedding: nn.Embedding
    hidden_states: Callable[[Tensor, Tensor], Sequence[Tensor]]
    head: Callable[[Tensor], Tensor]
    final_norm: Callable[[Tensor], Tensor] | None = None
    kind: str = "causal"
    unembedding: tuple | None = None
    pool_position: str = "last"
    num_layers: int | None = None
    output_embedding: nn.Module | None = field(default=None, repr=False)
    forward: Callable[[Tensor], object] | None = field(default=None, repr=False)
    context_length: int | None = None
    accepts_mask: bool = True
    # True when `resolve_adapter` read it off the model (so it can be read again when the
    # model changes); a hand-built adapter is verified again instead.
    resolved: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        # A head read from its module at every call: a sharded model swaps the parameter
        # objects between shards and gathered copies, and a resized head is a new tensor.
        out = self.output_embedding
        self._live_head = (self.unembedding is not None and out is not None
                           and self.unembedding[1] is getattr(out, "weight", None))
        if self.context_length is not None and (
            isinstance(self.context_length, bool) or not isinstance(self.context_length, int)
            or self.context_length < 1
        ):
            raise ValueError(
                f"ModelAdapter(context_length={self.context_length!r}) must be a positive int "
                "or None (read from the module)"
            )
        if self.context_length is None:
            self.context_length = context_length_of(self.module)
        if self.kind not in KINDS:
            raise ValueError(f"ModelAdapter(kind={self.kind!r}) is not one of {KINDS}")
        if self.pool_position not in ("first", "last"):
            raise ValueError(
                f"ModelAdapter(pool_position={self.pool_position!r}) must be 'first' or 'last'"
            )

    @property
    def tied(self) -> bool:
        """Whether the input and output embeddings share storage."""
        w = getattr(self.output_embedding, "weight", None)
        if w is None:
            return False
        e = self.embedding.weight
        return w is e or _storage(w) == _storage(e)

    def unembedding_parts(self) -> tuple:
        """``(pre, weight, bias, post)`` of the fast path, with the weight and bias as the
        output embedding holds them now (see ``__post_init__``)."""
        pre, weight, bias, post = self.unembedding
        if self._live_head:
            out = self.output_embedding
            weight, bias = out.weight, getattr(out, "bias", None)
        return pre, weight, bias, post

    def target_logits(self, states: Tensor, targets: Tensor) -> Tensor:
        """Head logits of `targets[b]` for every vector of row b.

        states: [K, B, T, d] (K layers), targets: [B] -> [K, B, T] float32.
        With an unembedding fast path only the B target rows are read, so cost and
        memory do not grow with the vocabulary.
        """
        if self.unembedding is not None:
            pre, weight, bias, post = self.unembedding_parts()
            h = pre(states).float()  # (K, B, T, d')
            w = weight[targets].float()  # (B, d')
            logits = torch.einsum("kbtd,bd->kbt", h, w)
            if bias is not None:
                logits = logits + bias[targets].float()[None, :, None]
            return post(logits) if post is not None else logits
        full = self.head(states).float()  # (K, B, T, C)
        index = targets.view(1, -1, 1, 1).expand(full.shape[0], -1, full.shape[2], 1)
        return full.gather(-1, index).squeeze(-1)

    def full_logits(self, x: Tensor) -> Tensor:
        """All logits for a few vectors: [N, d] -> [N, C] float32."""
        if self.unembedding is not None:
            pre, weight, bias, post = self.unembedding_parts()
            # The model's own dtype, as its head computes them: a float32 copy of a large
            # bf16 unembedding would cost more than the whole probe.
            logits = torch.nn.functional.linear(pre(x), weight, bias).float()
            return post(logits) if post is not None else logits
        return self.head(x).float()


def _storage(t: Tensor) -> int | None:
    """Where a tensor's data starts (a DTensor's local shard); None if it has none."""
    local = getattr(t, "_local_tensor", t)  # public to_local() would build a new view
    try:
        return local.data_ptr() if local.numel() else None
    except RuntimeError:  # a tensor without storage (meta, some subclasses)
        return None


# --------------------------------------------------------------------------- helpers


@contextmanager
def probe_mode(module: nn.Module | None, *, grad: bool = False):
    """Eval mode for a probe; each submodule's own flag restored after.

    grad=False: no autograd (NormXLogit). grad=True: autograd on, also inside a caller's
    `no_grad`/`inference_mode` (gradient baselines differentiate w.r.t. inputs only).
    """
    flags = [(m, m.training) for m in module.modules()] if module is not None else []
    autograd = (torch.inference_mode(False), torch.enable_grad()) if grad else (torch.no_grad(),)
    try:
        if module is not None:
            module.eval()
        with contextlib.ExitStack() as stack:
            for context in autograd:
                stack.enter_context(context)
            stack.enter_context(sharding.reading(module))
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _first_tensor(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    raise UnsupportedModelError(f"cannot read a hidden state from a {type(output).__name__}")


CONTEXT_KEYS = ("block_size", "max_position_embeddings", "n_positions", "n_ctx")


def context_length_of(module: nn.Module | None) -> int | None:
    """The longest input `module` takes: the first of `CONTEXT_KEYS` found on the module,
    then on its (text) config; None when neither says."""
    if module is None:
        return None
    config = _text_config(module)
    for source in (module, config):
        for key in CONTEXT_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


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
                states[i + 1] = _first_tensor(output)

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
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else _first_tensor(out)
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


def _apply_chain(chain: Sequence[nn.Module]) -> Callable[[Tensor], Tensor] | None:
    if not chain:
        return None

    def final_norm(x: Tensor) -> Tensor:
        for m in chain:
            x = m(x)
        return x

    return final_norm


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


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (signature, adapter)


def model_signature(model: nn.Module | None) -> tuple:
    """What an adapter depends on and training code can change: which modules the model is
    made of (`resize_token_embeddings` puts in new embedding and head modules), the shape of
    every embedding and linear weight (a resize in place), and whether the head is tied.
    Stable across FSDP2's swaps of sharded and gathered parameters (module identities and
    global shapes only)."""
    if model is None:
        return ()
    modules, shapes = [], []
    for m in model.modules():
        modules.append(id(m))
        if isinstance(m, (nn.Embedding, nn.Linear)):
            shapes.append(tuple(m.weight.shape))
    tied = None
    inputs, outputs = getattr(model, "get_input_embeddings", None), getattr(
        model, "get_output_embeddings", None)
    if callable(inputs) and callable(outputs):
        try:
            i, o = inputs(), outputs()
            w = getattr(o, "weight", None)
            tied = w is not None and (w is i.weight or _storage(w) == _storage(i.weight))
        except Exception:  # noqa: BLE001 - a model whose accessors raise: left out
            tied = None
    return (tuple(modules), tuple(shapes), tied)


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
        from .discovery import discover_adapter

        adapter = discover_adapter(model)
    else:
        adapter = _resolve_hf(model)
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


def _resolve_hf(model: nn.Module) -> ModelAdapter:
    name = type(model).__name__
    how = (
        "build a normx_callbacks.ModelAdapter(module=..., embedding=..., hidden_states=..., "
        "final_norm=..., head=...) and pass it instead of the model"
    )
    if getattr(_text_config(model), "is_encoder_decoder", False):
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
    config = _text_config(model)
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
    dummy, mask = _dummy_tokens(embedding, context_length_of(model))

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
                final_norm=_apply_chain(chain),
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
                final_norm=_apply_chain(chain),
                kind=kind,
                num_layers=len(layers),
            )
        expected = model(input_ids=dummy, attention_mask=mask).logits
        _verify(expected, adapter, dummy, mask, type(model).__name__)
    return adapter


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else bool(getattr(model.config, "is_decoder", False))


def _dummy_tokens(embedding: nn.Embedding, context: int | None) -> tuple[Tensor, Tensor]:
    """A few fixed, varied token ids [1, T] (and an all-ones mask) to check a model on."""
    length = max(2, min(8, (context or 8) - 2))  # RoBERTa offsets positions by padding_idx + 1
    vocab = embedding.num_embeddings
    dummy = torch.arange(1, length + 1, device=embedding.weight.device) * 7919 % max(vocab - 1, 1)
    dummy = dummy.view(1, -1)
    return dummy, torch.ones_like(dummy)


def _logits_of(output, name: str) -> Tensor:
    """The logits in a model output: a tensor, `.logits`, or a tuple's first element."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise UnsupportedModelError(
        f"the forward of {name} returned {type(output).__name__}, not logits (a tensor, a "
        "tuple starting with one, or an output with .logits); pass "
        "ModelAdapter(forward=lambda ids: <logits [B, T, C]>)"
    )


def verify_adapter(adapter: ModelAdapter) -> None:
    """Check a hand-built adapter as discovered heads are checked: its last-layer logits on a
    few dummy tokens must equal the model's own forward (`adapter.forward`, else
    `adapter.module(input_ids)`). Raises `UnsupportedModelError` with the largest difference."""
    module = adapter.module
    name = type(module).__name__ if module is not None else "the adapter's model"
    forward = adapter.forward if adapter.forward is not None else module
    if forward is None:
        raise UnsupportedModelError(
            "ModelAdapter(module=None) without forward=...: the adapter cannot be checked "
            "against the model; pass module=<the model> or forward=<input_ids -> logits>"
        )
    dummy, mask = _dummy_tokens(adapter.embedding, adapter.context_length)
    with probe_mode(module):
        try:
            output = forward(dummy)
        except Exception as error:  # noqa: BLE001 - reported with the way out
            raise UnsupportedModelError(
                f"calling the forward of {name} on input_ids of shape {tuple(dummy.shape)} "
                f"failed ({type(error).__name__}: {error}); pass ModelAdapter(forward=lambda "
                "ids: <logits [B, T, C]>)"
            ) from error
        _verify(_logits_of(output, name), adapter, dummy, mask, name)


def _verify(expected: Tensor, adapter: ModelAdapter, dummy: Tensor, mask: Tensor,
            name: str) -> None:
    """The adapter's head on last_hidden_state must reproduce the model's own logits."""
    expected = expected.float()
    last = adapter.hidden_states(dummy, mask)[-1]
    got = adapter.full_logits(last[0]) if adapter.kind in ("causal", "masked") else None
    tol = 1e-4 if last.dtype == torch.float32 else 3e-2
    scale = expected.abs().max().clamp(min=1.0)
    if got is not None:
        if expected.shape[1] == 1 and got.shape[0] > 1:
            got = got[-1:]  # a forward that returns the last position only (nanoGPT's inference)
        if got.shape != expected[0].shape:
            raise UnsupportedModelError(
                f"the adapter's logits for {name} have shape {tuple(got.shape)}, the model's "
                f"own {tuple(expected[0].shape)}; the head or hidden_states is wrong"
            )
        diff = (got - expected[0]).abs()
        err = diff.max() / scale
        if err > tol:
            t, c = divmod(int(diff.argmax()), diff.shape[-1])
            raise UnsupportedModelError(
                f"the head of {name} could not be reproduced: largest difference "
                f"{float(diff.max()):.4g} (relative error {float(err):.2e}) at position {t}, "
                f"logit {c}: adapter {float(got[t, c]):.4g}, model {float(expected[0, t, c]):.4g}; "
                "check the adapter's final_norm (applied to the last layer?) and head, or build "
                "a normx_callbacks.ModelAdapter with head=..."
            )
        return
    per_token = adapter.head(last[0]).float()  # (T, C)
    errors = []
    for position, index in (("first", 0), ("last", -1)):
        diff = (per_token[index] - expected[0]).abs().max()
        if diff / scale <= tol:
            adapter.pool_position = position
            return
        errors.append(float(diff))
    raise UnsupportedModelError(
        f"the classifier of {name} applied to single tokens reproduces "
        f"neither its first- nor last-token logits (largest differences {errors[0]:.4g}, "
        f"{errors[1]:.4g}); build a normx_callbacks.ModelAdapter with head=... and "
        "pool_position=..."
    )
