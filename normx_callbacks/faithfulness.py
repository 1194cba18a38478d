"""Faithfulness by AOPC (PAPER.md section 2): mask the tokens a method ranks highest, or keep
only them, and measure how much the probability of the original prediction drops.

For each fraction k (default 10%..90%) and each row with n candidate tokens, the top
`int(n * k)` candidates (descending signed score; ties: earlier position first) are
replaced by `replacement_id`:

    comprehensiveness_k = p(y | x) - p(y | x without its top-k tokens)    (higher: better)
    sufficiency_k       = p(y | x) - p(y | x with only its top-k tokens)  (lower: better)

and AOPC is the mean over the k values (and over rows). `y` is the model's argmax at the
explained position on the unmasked input unless `targets` is given. The attention mask is
never changed, so a replaced token still occupies its position.

Candidates are the tokens that carry a score (not NaN), are real (attention mask 1) and are
not protected. Never a candidate: the explained position itself (for a causal LM the token
AT t whose next-token prediction is explained: masking it would change the question rather
than remove evidence; for a masked LM the mask token; for a classifier the pooled [CLS] or
last token), for causal LMs every position after t (they cannot influence the prediction),
and whatever `protect` marks (e.g. special tokens, see `special_token_mask`). `n` counts
candidates only.

Every masked variant of a batch (2 x K x B rows) is evaluated in batched forward passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .attribution import prepare_inputs
from .heads import ModelAdapter, probe_mode, resolve_adapter
from .methods import METHODS, attribute, batched_logits, resolve_targets

log = logging.getLogger(__name__)

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def replacement_for(tokenizer: Any) -> int:
    """The id that stands in for a removed token: the tokenizer's mask token if it has one
    (what the paper uses), else unk, else pad, else eos (GPT-2-style tokenizers have only
    the last). Raises ValueError if it has none of them."""
    for name in ("mask_token_id", "unk_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"{type(tokenizer).__name__} has no mask, unk, pad or eos token; pass "
        "replacement_id=... explicitly"
    )


def special_token_mask(input_ids: Tensor, tokenizer: Any) -> Tensor:
    """[B, T] bool, True on the tokenizer's special tokens: pass as `protect=`."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    return torch.isin(input_ids, special.to(input_ids.device))


def candidate_mask(
    attention_mask: Tensor,
    positions: Tensor,
    scores: Tensor,
    *,
    causal: bool = False,
    protect: Tensor | None = None,
) -> Tensor:
    """[B, T] bool: tokens that may be masked (see the module docstring)."""
    b, t = scores.shape
    idx = torch.arange(t, device=scores.device)[None, :]
    candidates = ~torch.isnan(scores) & attention_mask.bool() & (idx != positions[:, None])
    if causal:
        candidates &= idx < positions[:, None]
    if protect is not None:
        candidates &= ~protect.bool()
    return candidates


def ranks(scores: Tensor, candidates: Tensor) -> Tensor:
    """[B, T] long: 0 for the highest-scoring candidate; candidates rank before the rest.

    Descending signed score; equal scores keep position order (stable sorts), so the
    ranking is deterministic.
    """
    key = torch.where(candidates, scores.float(), -torch.inf)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    # Second stable sort on the candidate flag: a candidate scored -inf still precedes
    # a non-candidate.
    flags = candidates.gather(1, order).to(torch.int8)
    order = order.gather(1, torch.sort(flags, dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order)
    arange = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return rank.scatter_(1, order, arange)


def masked_variants(
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    scores: Tensor,
    *,
    replacement_id: int,
    fractions: Sequence[float] = FRACTIONS,
    causal: bool = False,
    protect: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The inputs AOPC evaluates: (comprehensive, sufficient), each [K, B, T] long.

    comprehensive[k]: the top int(n * fractions[k]) candidates replaced by `replacement_id`;
    sufficient[k]: every other candidate replaced. Non-candidates are never changed.
    """
    _check_fractions(fractions)
    candidates = candidate_mask(
        attention_mask, positions, scores, causal=causal, protect=protect
    )  # (B, T)
    rank = ranks(scores, candidates)  # (B, T)
    n = candidates.sum(dim=1).double()  # (B,)
    frac = torch.tensor(fractions, dtype=torch.float64, device=n.device)
    # float64 product then floor: exactly Python's int(n * k), as the paper computes it.
    counts = torch.floor(frac[:, None] * n[None, :]).long()  # (K, B)
    top = candidates[None] & (rank[None] < counts[:, :, None])  # (K, B, T)
    rest = candidates[None] & ~top
    ids = input_ids[None].expand_as(top)
    replacement = torch.full_like(ids, replacement_id)
    return torch.where(top, replacement, ids), torch.where(rest, replacement, ids)


def aopc(
    model: nn.Module | ModelAdapter,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor | Sequence[int] | None,
    scores: Tensor,
    *,
    replacement_id: int,
    targets: Tensor | Sequence[int] | None = None,
    gold: Tensor | Sequence[int] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    batch_size: int = 64,
    protect: Tensor | None = None,
) -> dict[str, Any]:
    """Comprehensiveness and sufficiency AOPC of `scores` [B, T] for the model's predictions.

    Args:
        positions: [B] explained positions (defaults as in `normxlogit`).
        scores: [B, T] token scores, NaN where a token has none.
        replacement_id: id written over removed tokens (see `replacement_for`).
        targets: [B] explained token/class; None or -1: the argmax on the unmasked input.
        gold: [B] gold labels (-1: unknown, row left out of the accuracies).
        batch_size: rows per forward pass over the 2 x K x B masked variants.
        protect: [B, T] bool, tokens never masked (e.g. `special_token_mask`).

    Returns a dict: "comprehensiveness", "sufficiency" (floats, mean over rows and k);
    "*_curve" [K] (mean over rows per k); "*_rows" [B] (mean over k per row); "*_probs"
    [B, K] target probability on each variant; "original_probs" [B]; "targets" [B];
    "n_candidates" [B]; "fractions". With `gold`: "accuracy" (unmasked),
    "comprehensiveness_accuracy" / "sufficiency_accuracy" (mean over k) and their
    "*_accuracy_curve" [K]. Tensors are on the CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    _check_fractions(fractions)
    adapter = resolve_adapter(model)
    if adapter.kind == "regression":
        raise ValueError(
            "aopc measures the drop in softmax probability of a prediction; a regression "
            "head has no probabilities"
        )
    ids, mask, positions = prepare_inputs(adapter, input_ids, attention_mask, positions)
    batch, length = ids.shape
    device = ids.device
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (batch, length):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a [{batch}, {length}] tensor, got {shape}")
    vocab = adapter.embedding.num_embeddings
    if (
        isinstance(replacement_id, bool)
        or not isinstance(replacement_id, int)
        or not (0 <= replacement_id < vocab)
    ):
        raise ValueError(f"replacement_id={replacement_id!r} must be a token id in 0..{vocab - 1}")
    if protect is not None and tuple(protect.shape) != (batch, length):
        raise ValueError(
            f"protect shape {tuple(protect.shape)} != input_ids shape {(batch, length)}"
        )
    targets = _rows(targets, "targets", batch, device)
    gold = _rows(gold, "gold", batch, device)

    causal = adapter.kind == "causal"
    protect = None if protect is None else protect.to(device)
    comp, suff = masked_variants(
        ids,
        mask,
        positions,
        scores.to(device),
        replacement_id=replacement_id,
        fractions=fractions,
        causal=causal,
        protect=protect,
    )
    k = len(fractions)
    with probe_mode(adapter.module):
        logits = batched_logits(adapter, ids, mask, positions, batch_size)  # (B, C)
        targets = resolve_targets(logits, targets)
        original = logits.softmax(dim=-1)[torch.arange(batch, device=device), targets]
        predicted = logits.argmax(dim=-1)
        variants = torch.stack([comp, suff]).reshape(2 * k * batch, length)
        probs, preds = _target_probs(
            adapter,
            variants,
            mask.repeat(2 * k, 1),
            positions.repeat(2 * k),
            targets.repeat(2 * k),
            batch_size,
        )
    probs = probs.reshape(2, k, batch).transpose(1, 2)  # (2, B, K)
    preds = preds.reshape(2, k, batch).transpose(1, 2)
    drops = original[None, :, None] - probs  # (2, B, K)
    out: dict[str, Any] = {"fractions": tuple(fractions)}
    for i, name in enumerate(("comprehensiveness", "sufficiency")):
        out[name] = float(drops[i].mean())
        out[f"{name}_curve"] = drops[i].mean(dim=0).cpu()
        out[f"{name}_rows"] = drops[i].mean(dim=1).cpu()
        out[f"{name}_probs"] = probs[i].cpu()
    out["original_probs"] = original.cpu()
    out["targets"] = targets.cpu()
    out["n_candidates"] = (
        candidate_mask(mask, positions, scores.to(device), causal=causal, protect=protect)
        .sum(dim=1)
        .cpu()
    )
    if gold is not None:
        known = gold >= 0
        if bool(known.any()):
            g = gold[known]
            out["accuracy"] = float((predicted[known] == g).float().mean())
            for i, name in enumerate(("comprehensiveness", "sufficiency")):
                hits = (preds[i][known] == g[:, None]).float()  # (B', K)
                out[f"{name}_accuracy"] = float(hits.mean())
                out[f"{name}_accuracy_curve"] = hits.mean(dim=0).cpu()
    return out


def faithfulness_table(
    model: nn.Module | ModelAdapter,
    encoded_probes: Any,
    methods: Sequence[str] = METHODS,
    *,
    replacement_id: int,
    n_steps: int = 50,
    seed: int = 0,
    batch_size: int = 16,
    aopc_batch_size: int = 64,
    fractions: Sequence[float] = FRACTIONS,
    protect: Tensor | None = None,
):
    """One row per method: AOPC on `encoded_probes` (an `EncodedProbes`) and its cost.

    The prediction explained is the model's argmax at each probe's position (the paper's
    protocol); the probes' targets (where given) are the gold labels for the accuracy
    columns, which appear only when at least one probe has a target. `batch_size` bounds the
    attribution's forward passes (the methods' memory), `aopc_batch_size` the evaluation's.

    Columns: method, comprehensiveness, sufficiency, [accuracy, comprehensiveness_accuracy,
    sufficiency_accuracy], seconds_per_instance (wall time of the attribution alone, not of
    the AOPC evaluation), peak_memory_mb, n_instances.

    peak_memory_mb is the CUDA allocator's peak during the attribution minus what was
    allocated before it (memory the method itself needed), on a CUDA model only. On the
    CPU it is NaN: the process's peak RSS (`resource.getrusage`) is a lifetime high-water
    mark that cannot be reset, so after the first method it says nothing about the next,
    and tracemalloc does not see PyTorch's allocator.
    """
    import pandas as pd

    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods contains {method!r}: valid names are {METHODS}")
    adapter = resolve_adapter(model)  # resolved once, outside the timed region
    device = adapter.embedding.weight.device
    probes = encoded_probes.to(device)
    ids, mask, positions = probes.input_ids, probes.attention_mask, probes.positions
    gold = probes.targets if bool((probes.targets >= 0).any()) else None
    n = ids.shape[0]
    cuda = device.type == "cuda"
    rows = []
    for method in methods:
        # Untimed warm-up on one row: imports (captum), lazy initialisation and allocator
        # growth would otherwise be charged to whichever method runs first.
        attribute(method, adapter, ids[:1], mask[:1], positions[:1], None, seed=seed,
                  n_steps=n_steps, batch_size=batch_size)
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        scores = attribute(
            method,
            adapter,
            ids,
            mask,
            positions,
            None,
            seed=seed,
            n_steps=n_steps,
            batch_size=batch_size,
        )
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else float("nan")
        result = aopc(
            adapter,
            ids,
            mask,
            positions,
            scores,
            replacement_id=replacement_id,
            gold=gold,
            fractions=fractions,
            batch_size=aopc_batch_size,
            protect=protect,
        )
        row = {
            "method": method,
            "comprehensiveness": result["comprehensiveness"],
            "sufficiency": result["sufficiency"],
        }
        if "accuracy" in result:
            for key in ("accuracy", "comprehensiveness_accuracy", "sufficiency_accuracy"):
                row[key] = result[key]
        row.update(seconds_per_instance=seconds / n, peak_memory_mb=peak, n_instances=n)
        rows.append(row)
        log.info("faithfulness %s: %s", method, row)
    return pd.DataFrame(rows)


def _target_probs(adapter, ids, mask, positions, targets, batch_size) -> tuple[Tensor, Tensor]:
    """Softmax probability of each row's target and the row's argmax, chunk by chunk so
    that full-vocabulary probabilities are never held for more than `batch_size` rows."""
    probs, preds = [], []
    for start in range(0, ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        logits = batched_logits(adapter, ids[sl], mask[sl], positions[sl], None)  # (b, C)
        rows = torch.arange(logits.shape[0], device=logits.device)
        probs.append(logits.softmax(dim=-1)[rows, targets[sl]])
        preds.append(logits.argmax(dim=-1))
    return torch.cat(probs), torch.cat(preds)


def _rows(value, name: str, batch: int, device) -> Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, device=device).long().reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"{name} has {t.numel()} entries but input_ids has {batch} rows")
    return t


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) == 0 or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fractions
    ):
        raise ValueError(f"fractions={tuple(fractions)!r} must be a non-empty list in (0, 1]")
