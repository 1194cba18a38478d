"""What NormXLogit needs from a model, and the checks that it is read right.

`ModelAdapter` holds how a model is read: its input embedding, a function that returns the
L+1 hidden states, the final norm applied to the inner layers, and the head-on-top (with a
fast path that reads only the target rows of the unembedding). Adapters are built by
`discovery.resolve_adapter` (a Hugging Face model through `hf_reading.py`, any other
language model by tracing it) or by hand, and every one is checked the same way: its head
on its last hidden state must reproduce the model's own logits (`verify_adapter`,
`check_logits`), or it is refused with the largest difference, never used to produce wrong
numbers. `model_signature` is what an adapter depends on and training code can change.
"""

from __future__ import annotations

import contextlib
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
        return w is e or storage_start(w) == storage_start(e)

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


def storage_start(t: Tensor) -> int | None:
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


def first_tensor(output) -> Tensor:
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
    config = text_config(module)
    for source in (module, config):
        for key in CONTEXT_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def apply_chain(chain: Sequence[nn.Module]) -> Callable[[Tensor], Tensor] | None:
    if not chain:
        return None

    def final_norm(x: Tensor) -> Tensor:
        for m in chain:
            x = m(x)
        return x

    return final_norm




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
            tied = w is not None and (w is i.weight or storage_start(w) == storage_start(i.weight))
        except Exception:  # noqa: BLE001 - a model whose accessors raise: left out
            tied = None
    return (tuple(modules), tuple(shapes), tied)


def dummy_tokens(embedding: nn.Embedding, context: int | None) -> tuple[Tensor, Tensor]:
    """A few fixed, varied token ids [1, T] (and an all-ones mask) to check a model on."""
    length = max(2, min(8, (context or 8) - 2))  # RoBERTa offsets positions by padding_idx + 1
    vocab = embedding.num_embeddings
    dummy = torch.arange(1, length + 1, device=embedding.weight.device) * 7919 % max(vocab - 1, 1)
    dummy = dummy.view(1, -1)
    return dummy, torch.ones_like(dummy)


def logits_of(output, name: str) -> Tensor:
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
    dummy, mask = dummy_tokens(adapter.embedding, adapter.context_length)
    with probe_mode(module):
        try:
            output = forward(dummy)
        except Exception as error:  # noqa: BLE001 - reported with the way out
            raise UnsupportedModelError(
                f"calling the forward of {name} on input_ids of shape {tuple(dummy.shape)} "
                f"failed ({type(error).__name__}: {error}); pass ModelAdapter(forward=lambda "
                "ids: <logits [B, T, C]>)"
            ) from error
        check_logits(logits_of(output, name), adapter, dummy, mask, name)


def check_logits(expected: Tensor, adapter: ModelAdapter, dummy: Tensor, mask: Tensor,
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
