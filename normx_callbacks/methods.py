"""Token-attribution methods behind one verb, for comparing NormXLogit with its baselines.

    attribute(method, model, input_ids, attention_mask, positions, targets) -> [B, T]

Forward-only methods read `normxlogit()`: "normxlogit" (||x_i^0|| * LogAt),
"logat" (signed), "norm" (||x_i^0||, unsigned). "random" draws uniform scores from
its own `torch.Generator`, i.e. a random permutation, never touching the global RNG.

Gradient methods (see docs/method.md): "saliency" (|gradient|, Captum's `Saliency`) and
"input_x_gradient" (gradient x input, Captum's `InputXGradient`) are one backward pass each,
computed here with `torch.autograd.grad`, so they need no optional package and serve as the
gradient reference of evidence alignment (importing Captum costs a process seconds);
"integrated_gradients" (zero baseline, `n_steps`) uses Captum (an optional extra). All are
taken with respect to the output of the model's input embedding module, i.e. the word
embedding *before* position/type embeddings are added (what HF calls
`inputs_embeds`; for Gemma-style scaled embeddings, before the scaling done in the
model's forward). The token score is the L1 norm of that attribution over the
hidden dimension. The function differentiated is the *logit* (pre-softmax) of the
explained target at the explained position, as LogAt reads it; for a regression
head, the single output. Gradients are taken with `torch.autograd.grad` on the
embedding output only (by Captum, or here), so no parameter `.grad` is ever written; the embedding output is
replaced through a temporary forward hook (removed in a `finally`), dropout is off
during the computation and every submodule's train/eval flag is restored after.

Every method returns NaN where a token carries no score: padding, and for causal LMs
the positions after the explained one (the same `valid` as `normxlogit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .adapters import ModelAdapter, probe_mode
from .attribution import as_rows, normxlogit, prepare_inputs
from .discovery import resolve_adapter

METHODS = (
    "normxlogit",
    "logat",
    "norm",
    "random",
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
)
GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients")
CAPTUM_METHODS = ("integrated_gradients",)  # the others need no optional extra
# Forward-only methods are cheap enough to evaluate during training by default; gradient
# methods (a backward pass per probe, x n_steps for IG) are opt-in.
FORWARD_METHODS = tuple(m for m in METHODS if m not in GRADIENT_METHODS)
INSTALL_HINT = "pip install 'normx-callbacks[baselines]'"


def attribute(
    method: str,
    model: nn.Module | ModelAdapter,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    positions: Tensor | Sequence[int] | None = None,
    targets: Tensor | Sequence[int] | None = None,
    *,
    seed: int = 0,
    n_steps: int = 50,
    batch_size: int = 16,
) -> Tensor:
    """Token scores of `method` for each row's prediction at `positions`.

    Args:
        method: one of `METHODS`.
        input_ids, attention_mask: [B, T]; right or left padding.
        positions: [B] explained positions; defaults as in `normxlogit` (required for
            masked LMs).
        targets: [B] token/class explained; None or -1 in a row: the model's argmax.
        seed: seed of the "random" method's own generator.
        n_steps: integration steps of "integrated_gradients".
        batch_size: rows per forward pass (for integrated gradients: interpolated rows
            per forward pass, so `batch_size` bounds memory for every method).

    Returns: [B, T] float32 on the model's device, NaN at positions without a score.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} must be a positive integer")
    if method in CAPTUM_METHODS:
        _captum_class(method)  # fail on a missing backend before any work
    adapter = resolve_adapter(model)
    ids, mask, positions = prepare_inputs(adapter, input_ids, attention_mask, positions)
    targets = as_rows(targets, "targets", ids.shape[0], ids.device)
    valid = valid_positions(adapter.kind, mask, positions)

    if method in ("normxlogit", "logat", "norm"):
        attr = normxlogit(
            adapter, ids, mask, positions=positions, targets=targets, batch_size=batch_size
        )
        return {"normxlogit": attr.scores, "logat": attr.logat, "norm": attr.norms}[method]
    if method == "random":
        generator = torch.Generator().manual_seed(seed)  # CPU: same numbers on every device
        scores = torch.rand(ids.shape, generator=generator).to(ids.device)
        return torch.where(valid, scores, torch.nan)

    raw = gradient_attributions(
        method, adapter, ids, mask, positions, targets, n_steps=n_steps, batch_size=batch_size
    )
    scores = raw.float().abs().sum(dim=-1)  # (B, T) L1 norm over the hidden dimension
    return torch.where(valid, scores, torch.nan)


def valid_positions(kind: str, attention_mask: Tensor, positions: Tensor) -> Tensor:
    """[B, T] bool: real tokens, and for causal LMs only those at or before the position."""
    valid = attention_mask.bool()
    if kind == "causal":
        idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        valid = valid & (idx[None, :] <= positions[:, None])
    return valid


def gradient_attributions(
    method: str,
    model: nn.Module | ModelAdapter,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    positions: Tensor | Sequence[int] | None = None,
    targets: Tensor | Sequence[int] | None = None,
    *,
    n_steps: int = 50,
    batch_size: int = 16,
    return_delta: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Raw attributions at the input-embedding output, [B, T, d] (before the L1 norm).

    With `return_delta` (integrated gradients only) also Captum's convergence delta [B]:
    sum of attributions minus (f(x) - f(baseline)).
    """
    if method not in GRADIENT_METHODS:
        raise ValueError(f"method={method!r} is not one of {GRADIENT_METHODS}")
    if return_delta and method != "integrated_gradients":
        raise ValueError("return_delta=True needs method='integrated_gradients'")
    algorithm = _captum_class(method) if method in CAPTUM_METHODS else None
    adapter = resolve_adapter(model)
    ids, mask, positions = prepare_inputs(adapter, input_ids, attention_mask, positions)
    targets = as_rows(targets, "targets", ids.shape[0], ids.device)
    parts, deltas = [], []
    with probe_mode(adapter.module, grad=True):
        # Inference tensors (made under inference_mode) cannot enter autograd: copy them.
        ids, mask, positions = ids.clone(), mask.clone(), positions.clone()
        targets = None if targets is None else targets.clone()
        if adapter.kind == "regression":
            targets = torch.zeros_like(positions)  # unused: the single output is explained
        else:
            with torch.no_grad():
                logits = batched_logits(adapter, ids, mask, positions, batch_size)
            targets = resolve_targets(logits, targets)
        for start in range(0, ids.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            raw, delta = _gradient_chunk(
                algorithm,
                method,
                adapter,
                ids[sl],
                mask[sl],
                positions[sl],
                targets[sl],
                n_steps,
                batch_size,
                return_delta,
            )
            parts.append(raw)
            deltas.append(delta)
    raw = torch.cat(parts)
    if return_delta:
        return raw, torch.cat(deltas)
    return raw


def _gradient_chunk(
    algorithm, method, adapter, ids, mask, positions, targets, n_steps, batch_size, return_delta
):
    with torch.no_grad():
        # Detached copy: the attribution's graph starts here, not at the parameters.
        embeds = adapter.embedding(ids).detach().clone()  # (b, T, d)
    embeds.requires_grad_(True)
    regression = adapter.kind == "regression"

    def forward(x: Tensor, ids_: Tensor, mask_: Tensor, positions_: Tensor) -> Tensor:
        logits = batched_logits(adapter, ids_, mask_, positions_, None, embeds=x)  # (n, C)
        return logits[:, 0] if regression else logits

    if algorithm is None:  # saliency or input x gradient, without Captum: one backward
        logits = forward(embeds, ids, mask, positions)
        chosen = logits[:, 0] if regression else logits.gather(1, targets[:, None])[:, 0]
        # Rows are independent (attention stays within a row): the gradient of the sum is
        # each row's own gradient.
        (grad,) = torch.autograd.grad(chosen.sum(), embeds)
        raw = grad.abs() if method == "saliency" else grad * embeds
        return raw.detach(), None
    explainer = algorithm(forward)
    kwargs = {
        "target": None if regression else targets,
        "additional_forward_args": (ids, mask, positions),
    }
    delta = None
    if method == "integrated_gradients":
        out = explainer.attribute(
            embeds,
            baselines=torch.zeros_like(embeds),
            n_steps=n_steps,
            internal_batch_size=batch_size,
            return_convergence_delta=return_delta,
            **kwargs,
        )
        raw, delta = out if return_delta else (out, None)
    else:
        raw = explainer.attribute(embeds, **kwargs)
    return raw.detach(), None if delta is None else delta.detach()


def batched_logits(
    adapter: ModelAdapter,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    batch_size: int | None,
    *,
    embeds: Tensor | None = None,
) -> Tensor:
    """The model's logits at each row's position, [B, C] float32 (C = 1 for regression).

    With `embeds` [B, T, d], the input embedding module's output is replaced by it (a
    temporary hook), so gradients can flow to it. The caller sets no_grad/eval.
    """
    step = input_ids.shape[0] if batch_size is None else batch_size
    out = []
    for start in range(0, input_ids.shape[0], max(step, 1)):
        sl = slice(start, start + step)
        ids, mask, pos = input_ids[sl], attention_mask[sl], positions[sl]
        if embeds is None:
            states = adapter.hidden_states(ids, mask)
        else:
            states = _with_embeddings(adapter, ids, mask, embeds[sl])
        last = states[-1]  # (b, T, d)
        rows = torch.arange(ids.shape[0], device=ids.device)
        out.append(adapter.full_logits(last[rows, pos]))  # (b, C)
    return torch.cat(out)


def _with_embeddings(adapter: ModelAdapter, ids: Tensor, mask: Tensor, embeds: Tensor):
    calls = []

    def replace(module, args, output):
        if output.shape != embeds.shape:
            raise RuntimeError(
                f"the input embedding returned shape {tuple(output.shape)}, expected "
                f"{tuple(embeds.shape)}: gradient baselines need one embedding call per forward"
            )
        calls.append(1)
        return embeds.to(output.dtype)

    handle = adapter.embedding.register_forward_hook(replace)
    try:
        states = adapter.hidden_states(ids, mask)
    finally:
        handle.remove()
    if len(calls) != 1:
        raise RuntimeError(
            f"the input embedding module ran {len(calls)} times in one forward pass; "
            "gradient baselines need the model to embed its input_ids exactly once"
        )
    return states


def require_captum(method: str) -> None:
    """Raise the install hint for gradient `method` now if it needs Captum and Captum is
    missing (the callback checks at setup)."""
    if method in CAPTUM_METHODS:
        _captum_class(method)


def captum_installed() -> bool:
    """Whether Captum can be imported, without importing it (seconds per process)."""
    import importlib.util

    return importlib.util.find_spec("captum") is not None


ALIGNMENT_DEFAULT = "installed"


def resolve_alignment_methods(methods: str | Sequence[str] | None) -> tuple[str, ...]:
    """The gradient methods evidence alignment is also measured with (a reference for
    NormXLogit's): "installed" (default) is input x gradient and Saliency (one backward pass
    each, no optional package); Integrated Gradients (Captum; 50 forward and backward passes
    per probe) only when a list names it; None or () measures none."""
    if methods is None:
        return ()
    if isinstance(methods, str):
        if methods != ALIGNMENT_DEFAULT:
            raise ValueError(f"alignment_methods={methods!r}: use {ALIGNMENT_DEFAULT!r}, None or "
                             f"a list of {GRADIENT_METHODS}")
        return ("input_x_gradient", "saliency")
    methods = tuple(methods)
    unknown = [m for m in methods if m not in GRADIENT_METHODS]
    if unknown:
        raise ValueError(f"alignment_methods={list(methods)!r}: {unknown} are not gradient "
                         f"methods; choose from {GRADIENT_METHODS}")
    for method in methods:
        require_captum(method)
    return methods


def probe_attributions(adapter: ModelAdapter, encoded, methods: Sequence[str], *,
                       batch_size: int = 16, n_steps: int = 50) -> dict[str, tuple[Tensor, float]]:
    """Scores of each gradient method for every probe of `encoded` (an `EncodedProbes`): the
    probe's target where it has one, the model's argmax elsewhere, as NormXLogit explains.

    Returns ``{method: ((B, T) float32 CPU scores, NaN where a token has none; seconds)}``.
    A model that takes no attention mask sees padding as text: probes of each length are
    attributed apart and put back in place.
    """
    import time

    device = adapter.embedding.weight.device
    encoded = encoded.to(device)
    groups = ([(list(range(len(encoded))), encoded)] if adapter.accepts_mask
              else encoded.equal_length_groups())
    out = {}
    for method in methods:
        scores = torch.full(tuple(encoded.input_ids.shape), float("nan"))
        start = time.perf_counter()
        for rows, group in groups:
            part = attribute(method, adapter, group.input_ids, group.attention_mask,
                             group.positions, group.targets, n_steps=n_steps,
                             batch_size=batch_size)
            scores[rows, : part.shape[1]] = part.float().cpu()
        out[method] = (scores, time.perf_counter() - start)
    return out


def _captum_class(method: str):
    try:
        from captum import attr
    except ImportError as err:
        raise ImportError(
            f"method={method!r} needs Captum, which is not installed; {INSTALL_HINT}"
        ) from err
    return {
        "saliency": attr.Saliency,
        "input_x_gradient": attr.InputXGradient,
        "integrated_gradients": attr.IntegratedGradients,
    }[method]


def resolve_targets(logits: Tensor, targets: Tensor | None) -> Tensor:
    """`targets` [B] with None / -1 rows replaced by the argmax of `logits` [B, C]."""
    predicted = logits.argmax(dim=-1)
    if targets is None:
        return predicted
    if bool((targets < -1).any()) or bool((targets >= logits.shape[-1]).any()):
        raise ValueError(f"targets must lie in 0..{logits.shape[-1] - 1} (or -1 for the argmax)")
    return torch.where(targets < 0, predicted, targets)
