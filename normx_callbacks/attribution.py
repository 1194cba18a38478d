"""NormXLogit and LogAt: one forward pass of the body, then a dot product per token.

    LogAt(i)      = HoT(x_i^L)[y]            the head-on-top applied to token i's own vector
    NormXLogit(i) = ||x_i^0||_2 * LogAt(i)

Layer-wise (logit lens for a fixed target), with the final norm applied to every
layer except the last, which already carries it:

    LogAt_l(i) = HoT(norm(x_i^l))[y],  NormXLogit_l = ||x_i^0|| * LogAt_l,
    EachLayer_l = ||x_i^l|| * LogAt_l.

See docs/method.md for the definitions; `adapters.py` for how a model is read.

Past 400 lines as one module: the method itself (hidden states, the final norm, head rows,
the logit lens) kept in one place, so the math is read in one file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from .adapters import ModelAdapter, probe_mode
from .discovery import resolve_adapter

NormKind = Literal["layer0", "word"]
NORMS = get_args(NormKind)


@dataclass
class Attribution:
    """Scores for a batch; padding (and, for causal LMs, positions after the
    explained one) hold NaN so they can never be mistaken for scores.

    Shapes: B rows, T positions, K requested layers. All float32 except the
    integer index tensors.
    """

    scores: Tensor  # (B, T) NormXLogit at the last layer
    logat: Tensor  # (B, T) LogAt at the last layer
    norms: Tensor  # (B, T) ||x_i^0|| ("layer0") or ||E[id_i]|| ("word")
    positions: Tensor  # (B,) explained position
    targets: Tensor  # (B,) explained token/class (0 for regression)
    target_logits: Tensor  # (B,) the model's logit of the target at `positions`
    target_probs: Tensor  # (B,) its softmax probability (NaN for regression)
    valid: Tensor  # (B, T) bool: positions that carry a score
    norm: str = "layer0"
    kind: str = "causal"
    foils: Tensor | None = None  # (B,) -1 where a row has no foil
    contrast_logat: Tensor | None = None  # (B, T) LogAt(target) - LogAt(foil)
    contrast_scores: Tensor | None = None  # (B, T) norm * contrast_logat
    layers: tuple[int, ...] | None = None  # requested layer indices, 0..L
    layer_logat: Tensor | None = None  # (B, K, T)
    layer_scores: Tensor | None = None  # (B, K, T) ||x^0|| * LogAt_l
    # (B, K, T) ||h_l|| * LogAt_l ("EachLayer"), h_l the hidden state as the model returns
    # it: the raw residual stream for l < L, the final-normed output at l = L (so the norm's
    # kind changes at the last layer).
    layer_each: Tensor | None = None
    layer_contrast: Tensor | None = None  # (B, K, T) LogAt_l(target) - LogAt_l(foil)
    # (B,) the first layer 0..L whose logit lens ranks the target first at the explained
    # position (float; NaN where no layer does): when the prediction forms in depth.
    prediction_depth: Tensor | None = None

    def cpu(self) -> Attribution:
        """A copy with every tensor on the CPU."""
        moved = {
            f.name: (v.cpu() if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in fields(self)
        }
        return Attribution(**moved)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (right or left padding). [B, T] -> [B]."""
    t = attention_mask.shape[1]
    idx = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(dim=1).values


def first_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's first real token. [B, T] -> [B]."""
    t = attention_mask.shape[1]
    idx = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, t).min(dim=1).values


def mask_positions(input_ids: Tensor, mask_token_id: int) -> Tensor:
    """Position of the (single) mask token in each row, for masked LMs. [B, T] -> [B]."""
    hits = input_ids == mask_token_id
    count = hits.sum(dim=1)
    if bool((count != 1).any()):
        bad = int((count != 1).nonzero()[0, 0])
        raise ValueError(
            f"row {bad} of input_ids has {int(count[bad])} mask tokens (id {mask_token_id}); "
            "each row needs exactly one, or pass positions= explicitly"
        )
    return hits.float().argmax(dim=1)


def resolve_layers(layers, num_layers: int) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r}: use None, 'all' or a list of indices")
        return tuple(range(num_layers + 1))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if not isinstance(layer, int) or not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"layers contains {layer!r}: valid indices are 0..{num_layers} "
                f"(0 = embedding output, {num_layers} = last layer) or negative from the end"
            )
        out.append(layer % (num_layers + 1))
    if not out:
        raise ValueError("layers is empty: use None, 'all' or a non-empty list of indices")
    return tuple(out)


def as_rows(value, name: str, batch: int, device) -> Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, device=device).long().reshape(-1)
    if t.numel() == 1 and batch > 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{name} has {t.numel()} entries but input_ids has {batch} rows")
    return t


def prepare_inputs(
    adapter: ModelAdapter,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor | Sequence[int] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated ids, mask and explained positions [B] on the model's device.

    Default positions: the last real token (causal LMs), the pooled token (classifiers);
    masked LMs must name theirs.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a [batch, length] tensor, got {shape}")
    device = adapter.embedding.weight.device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}"
        )
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("attention_mask has a row with no real token")
    vocab = adapter.embedding.num_embeddings
    if bool((ids >= vocab).any()) or bool((ids < 0).any()):
        raise ValueError(
            f"input_ids contain ids outside the model's vocabulary of {vocab}: is the "
            "tokenizer the one this model was built for?"
        )
    batch, length = ids.shape
    positions = as_rows(positions, "positions", batch, device)
    if positions is None:
        if adapter.kind == "masked":
            raise ValueError(
                "positions is required for masked LMs: pass "
                "positions=normx_callbacks.mask_positions(input_ids, tokenizer.mask_token_id)"
            )
        if adapter.kind in ("classifier", "regression") and adapter.pool_position == "first":
            positions = first_positions(mask)
        else:
            positions = last_positions(mask)
    if bool((positions < 0).any()) or bool((positions >= length).any()):
        raise ValueError(f"positions must lie in 0..{length - 1}")
    rows = torch.arange(batch, device=device)
    if not bool(mask[rows, positions].bool().all()):
        raise ValueError("positions point at padding: each explained position must be a real token")
    return ids, mask, positions


def normxlogit(
    model: nn.Module | ModelAdapter,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    positions: Tensor | Sequence[int] | None = None,
    targets: Tensor | Sequence[int] | None = None,
    foils: Tensor | Sequence[int] | None = None,
    layers: str | Sequence[int] | None = None,
    norm: str = "layer0",
    batch_size: int | None = 64,
    probabilities: bool = True,
    prediction_depth: bool = False,
) -> Attribution:
    """NormXLogit attribution of each row's prediction at `positions`.

    Args:
        model: a Hugging Face causal LM, masked LM or sequence classifier, or a
            `ModelAdapter` for anything else.
        input_ids, attention_mask: [B, T]; right or left padding.
        positions: [B] the prediction explained. Default: the last real token for
            causal LMs, the pooled token for classifiers; required for masked LMs
            (see `mask_positions`).
        targets: [B] token/class whose logit is read. Default (or -1 in a row): the
            model's argmax.
        foils: [B] optional contrast token: adds `contrast_logat`/`contrast_scores`
            (-1 in a row: no foil, NaN contrasts there).
        layers: None (last layer), "all", or indices 0..L for the layer-wise variants.
        norm: "layer0" (`hidden_states[0]`, the paper's choice) or "word" (raw row).
        batch_size: rows per forward pass, bounding memory; None = all at once.
        probabilities: compute `target_probs` (a softmax over the whole vocabulary at the
            B explained positions). With False and every target given, only target rows
            of the unembedding are read and `target_probs` is NaN.
        prediction_depth: also compute `prediction_depth`: the logit lens of every layer
            over the whole vocabulary at the explained positions only, one layer of one
            batch at a time, so memory stays ``batch_size x vocabulary`` (language models
            and classifiers; NaN for regression).

    No gradients are computed; the model's flags, hooks and grads are unchanged.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
    adapter = resolve_adapter(model)
    input_ids, attention_mask, positions = prepare_inputs(adapter, input_ids, attention_mask,
                                                          positions)
    device = input_ids.device
    batch = input_ids.shape[0]
    num_layers = adapter.num_layers
    if num_layers is None:
        raise ValueError("ModelAdapter.num_layers must be set (the number of layers L)")
    layer_ids = resolve_layers(layers, num_layers)
    targets = as_rows(targets, "targets", batch, device)
    foils = as_rows(foils, "foils", batch, device)
    for name, ids in (("targets", targets), ("foils", foils)):
        if ids is not None and adapter.kind != "regression":
            limit = _num_outputs(adapter)
            if limit is not None and (bool((ids < -1).any()) or bool((ids >= limit).any())):
                raise ValueError(f"{name} must lie in 0..{limit - 1} (or -1 for none)")
    if foils is not None and adapter.kind == "regression":
        raise ValueError("foils make no sense for a regression head (single output)")

    step = batch if batch_size is None else batch_size
    parts = []
    with probe_mode(adapter.module):
        if not adapter.accepts_mask:
            return _by_length(adapter, input_ids, attention_mask, positions, targets, foils,
                              layer_ids, norm, probabilities, step, prediction_depth)
        for start in range(0, batch, step):
            sl = slice(start, start + step)
            parts.append(
                _attribute_chunk(
                    adapter,
                    input_ids[sl],
                    attention_mask[sl],
                    positions[sl],
                    None if targets is None else targets[sl],
                    None if foils is None else foils[sl],
                    layer_ids,
                    norm,
                    probabilities,
                    prediction_depth,
                )
            )
    return _concat(parts, layer_ids, norm, adapter.kind)


def _by_length(adapter, ids, mask, positions, targets, foils, layer_ids, norm, probabilities,
               step, depth=False) -> Attribution:
    """For models that take no attention mask: run rows of equal length together, each
    trimmed to its real tokens, so no row ever sees padding; results go back in place."""
    batch, width = ids.shape
    lengths = mask.sum(dim=1)
    starts = first_positions(mask)
    arange = torch.arange(width, device=ids.device)
    contiguous = (mask.bool() == ((arange >= starts[:, None])
                                  & (arange < (starts + lengths)[:, None])))
    if not bool(contiguous.all()):
        raise ValueError("attention_mask has gaps inside a row: a model that takes no mask "
                         "(ModelAdapter(accepts_mask=False)) needs each row's tokens contiguous")
    parts, order = [], []
    for length in torch.unique(lengths).tolist():
        rows_all = torch.nonzero(lengths == length).flatten()
        for rows in rows_all.split(step):
            cols = starts[rows, None] + torch.arange(length, device=ids.device)  # (n, length)
            out = _attribute_chunk(
                adapter, ids[rows].gather(1, cols), torch.ones_like(cols),
                positions[rows] - starts[rows],
                None if targets is None else targets[rows],
                None if foils is None else foils[rows],
                layer_ids, norm, probabilities, depth,
            )
            parts.append(_place(out, cols, width, starts[rows]))
            order.append(rows)
    inverse = torch.argsort(torch.cat(order))
    merged = {key: None if parts[0][key] is None else torch.cat([p[key] for p in parts])[inverse]
              for key in parts[0]}
    return _concat([merged], layer_ids, norm, adapter.kind)


def _place(out: dict, cols: Tensor, width: int, starts: Tensor) -> dict:
    """Put a trimmed chunk's per-token results back at their columns of a [n, width] batch."""
    placed = {}
    for key, value in out.items():
        if value is None or value.dim() == 1:
            placed[key] = value
            continue
        index = cols if value.dim() == 2 else cols[:, None, :].expand_as(value)
        full = value.new_zeros(*value.shape[:-1], width)  # bool `valid` stays False there
        placed[key] = full.scatter(-1, index, value)
    placed["positions"] = out["positions"] + starts
    return placed


def _num_outputs(adapter: ModelAdapter) -> int | None:
    if adapter.unembedding is not None:
        return adapter.unembedding[1].shape[0]
    return None


def _attribute_chunk(
    adapter, ids, mask, positions, targets, foils, layer_ids, norm, probabilities, depth=False
) -> dict:
    states = adapter.hidden_states(ids, mask)  # L+1 x (B, T, d)
    last = states[-1]
    b = ids.shape[0]
    rows = torch.arange(b, device=ids.device)

    valid = mask.bool()
    if adapter.kind == "causal":
        # The prediction after position t sees tokens 0..t only.
        idx = torch.arange(ids.shape[1], device=ids.device)
        valid = valid & (idx[None, :] <= positions[:, None])

    if norm == "layer0":
        norms = states[0].float().norm(dim=-1)  # (B, T)
    else:
        norms = adapter.embedding.weight[ids].float().norm(dim=-1)

    if adapter.kind == "regression":
        pooled = adapter.head(last[rows, positions]).float().reshape(b)  # (B,)
        target_logits = pooled
        target_probs = torch.full_like(pooled, float("nan"))
        targets = torch.zeros(b, dtype=torch.long, device=ids.device)
    elif not probabilities and targets is not None and bool((targets >= 0).all()):
        # Targets given and no probabilities asked for: the target rows suffice, so the
        # cost stays flat in the vocabulary size.
        explained = last[rows, positions].view(1, b, 1, -1)  # (1, B, 1, d)
        target_logits = adapter.target_logits(explained, targets).view(b)
        target_probs = torch.full_like(target_logits, float("nan"))
    else:
        full = adapter.full_logits(last[rows, positions])  # (B, C)
        predicted = full.argmax(dim=-1)
        targets = predicted if targets is None else torch.where(targets < 0, predicted, targets)
        target_logits = full[rows, targets]
        # exp(logit - logsumexp), not softmax(...)[rows, targets]: one (B, C) matrix per batch
        # instead of two, which also halves the CPU heap growth in RELIABILITY.md.
        target_probs = (target_logits - full.logsumexp(dim=-1)).exp()

    def head_scores(layer_states: Tensor, ids_: Tensor, pool_states: Tensor | None) -> Tensor:
        if adapter.kind == "regression":
            per_token = adapter.head(layer_states).float().squeeze(-1)  # (K, B, T)
            pool = adapter.head(pool_states).float().reshape(per_token.shape[0], b, 1)
            # Documented choice: importance = distance from the pooled prediction.
            return (per_token - pool).abs()
        return adapter.target_logits(layer_states, ids_)  # (K, B, T)

    last_stack = last.unsqueeze(0)
    pool_last = last[rows, positions].unsqueeze(0) if adapter.kind == "regression" else None
    logat = head_scores(last_stack, targets, pool_last)[0]
    out = {
        "norms": norms,
        "logat": logat,
        "positions": positions,
        "targets": targets,
        "target_logits": target_logits,
        "target_probs": target_probs,
        "valid": valid,
        "foils": foils,
    }
    no_foil = None
    if foils is not None:
        no_foil = (foils < 0)[None, :, None]  # rows without a foil get NaN contrasts
        foils = foils.clamp(min=0)
        contrast = logat - adapter.target_logits(last_stack, foils)[0]
        out["contrast_logat"] = contrast.masked_fill(no_foil[0], float("nan"))

    if depth:
        out["prediction_depth"] = _prediction_depth(adapter, states, rows, positions, targets)

    if layer_ids is not None:
        lens = _lens_states(adapter, states, layer_ids)  # (K, B, T, d)
        pools = lens[:, rows, positions].unsqueeze(2) if adapter.kind == "regression" else None
        layer_logat = head_scores(lens, targets, pools)  # (K, B, T)
        raw_norms = torch.stack([states[i].float().norm(dim=-1) for i in layer_ids])  # (K, B, T)
        out["layer_logat"] = layer_logat.transpose(0, 1)
        out["layer_each"] = (raw_norms * layer_logat).transpose(0, 1)
        if foils is not None:
            foil_logat = adapter.target_logits(lens, foils)
            contrast = (layer_logat - foil_logat).masked_fill(no_foil, float("nan"))
            out["layer_contrast"] = contrast.transpose(0, 1)
    return out


def _prediction_depth(adapter: ModelAdapter, states, rows: Tensor, positions: Tensor,
                      targets: Tensor) -> Tensor:
    """(B,) the first layer whose logit lens ranks the target first at the explained
    position; NaN where none does. The final norm is applied below the last layer, never
    twice at it; one layer's (B, C) logits at a time."""
    b = rows.shape[0]
    if adapter.kind == "regression":
        return torch.full((b,), float("nan"), device=rows.device)
    depth = torch.full((b,), float("nan"), device=rows.device)
    last_index = len(states) - 1
    for layer in range(len(states)):
        x = states[layer][rows, positions]  # (B, d)
        if layer != last_index and adapter.final_norm is not None:
            x = adapter.final_norm(x)
        top = adapter.full_logits(x).argmax(dim=-1) == targets  # (B,)
        depth = torch.where(top & torch.isnan(depth), float(layer), depth)
    return depth


def _lens_states(adapter: ModelAdapter, states, layer_ids) -> Tensor:
    """Head-ready vectors per requested layer: final norm on all but the last."""
    last_index = len(states) - 1
    picked = []
    for i in layer_ids:
        x = states[i]
        if i != last_index and adapter.final_norm is not None:
            x = adapter.final_norm(x)
        picked.append(x)
    return torch.stack(picked)


def _concat(parts: list[dict], layer_ids, norm: str, kind: str) -> Attribution:

    def cat(key):
        if parts[0].get(key) is None:
            return None
        return torch.cat([p[key] for p in parts])

    valid = cat("valid")
    nan = torch.tensor(float("nan"), device=valid.device)

    def masked(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        mask = valid if t.dim() == 2 else valid[:, None, :]
        return torch.where(mask, t.float(), nan)

    norms = masked(cat("norms"))
    logat = masked(cat("logat"))
    contrast = masked(cat("contrast_logat"))
    layer_logat = masked(cat("layer_logat"))
    layer_contrast = masked(cat("layer_contrast"))
    return Attribution(
        scores=norms * logat,
        logat=logat,
        norms=norms,
        positions=cat("positions"),
        targets=cat("targets"),
        target_logits=cat("target_logits").float(),
        target_probs=cat("target_probs").float(),
        valid=valid,
        norm=norm,
        kind=kind,
        foils=cat("foils"),
        contrast_logat=contrast,
        contrast_scores=None if contrast is None else norms * contrast,
        layers=layer_ids,
        layer_logat=layer_logat,
        layer_scores=None if layer_logat is None else norms[:, None, :] * layer_logat,
        layer_each=masked(cat("layer_each")),
        layer_contrast=layer_contrast,
        prediction_depth=cat("prediction_depth"),
    )
