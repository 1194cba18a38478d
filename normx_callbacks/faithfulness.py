"""Faithfulness by AOPC: remove the tokens a method ranks highest, or keep only them, and
measure how much the probability of the original prediction drops.

For each fraction k (default 10%..90%) and each row with n candidate tokens, the top
c(k, n) candidates (descending signed score; ties: earlier position first) are removed:

    comprehensiveness_k = p(y | x) - p(y | x without its top-c tokens)    (higher: better)
    sufficiency_k       = p(y | x) - p(y | x with only its top-c tokens)  (lower: better)

and AOPC is the mean over the k values (and over rows). `y` is the model's argmax at the
explained position on the unmasked input unless `targets` is given; `faithfulness_rows`
gives each probe's own target where it has one (the prediction the probe is about, as
evidence alignment explains it) and records which (`explained`).

How many tokens are removed at each k, how a token is removed and which tokens are
candidates is `removal.py`.

Every variant of a batch (2 x K x B rows) is evaluated in batched forward passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .adapters import ModelAdapter, probe_mode
from .attribution import prepare_inputs
from .discovery import resolve_adapter
from .methods import METHODS, attribute, batched_logits, resolve_targets
from .metrics import bootstrap_interval
from .removal import (
    FRACTIONS,
    REMOVALS,
    Replacement,
    as_replacement,
    candidate_mask,
    check_fractions,
    protect_mask,
    removal_masks,
)

log = logging.getLogger(__name__)

# The random baseline's AOPC is the mean over this many seeded draws: its standard deviation
# halves, and each draw costs one method's AOPC.
RANDOM_PERMUTATIONS = 4
EXPLAIN = ("target", "argmax")


def aopc(
    model: nn.Module | ModelAdapter,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor | Sequence[int] | None,
    scores: Tensor,
    *,
    replacement: Replacement | int | str,
    targets: Tensor | Sequence[int] | None = None,
    gold: Tensor | Sequence[int] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    batch_size: int = 64,
    protect: Tensor | str | None = "special",
    tokenizer: Any = None,
    removal: str = "nearest",
) -> dict[str, Any]:
    """Comprehensiveness and sufficiency AOPC of `scores` [B, T] for the model's predictions.

    Args:
        positions: [B] explained positions (defaults as in `normxlogit`).
        scores: [B, T] token scores, NaN where a token has none.
        replacement: how a token is removed: a `Replacement` (`resolve_replacement`), a
            token id, or "attention" (attention mask 0, positions kept; needs a model
            that takes an attention mask and right-padded inputs).
        targets: [B] explained token/class; None or -1: the argmax on the unmasked input.
        gold: [B] gold labels (-1: unknown, row left out of the accuracies).
        batch_size: rows per forward pass over the 2 x K x B variants.
        protect: tokens never removed: "special" (default: the `tokenizer`'s special
            tokens, else those a Hugging Face config names), a [B, T] bool tensor, or None.
        removal: "nearest" (default) or "floor" (module docstring).

    Returns a dict: "comprehensiveness", "sufficiency" (floats, mean over rows and k);
    "*_curve" [K] (mean over rows per k); "*_rows" [B] (mean over k per row); "*_probs"
    [B, K] target probability on each variant and "*_preds" [B, K] its argmax; "original_probs" [B]; "targets" [B];
    "n_candidates" [B]; "degenerate_cells" [B] (k values whose count is 0 or n);
    "predicted" [B] (the argmax on the unmasked input);
    "removal_counts" [B, K]; "fractions"; "removal"; "replacement" (a `Replacement`). With
    `gold`: "accuracy" (unmasked), "comprehensiveness_accuracy" / "sufficiency_accuracy"
    (mean over k) and their "*_accuracy_curve" [K]. Tensors are on the CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    check_fractions(fractions)
    if removal not in REMOVALS:
        raise ValueError(f"removal={removal!r} is not one of {REMOVALS}")
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
    replacement = as_replacement(replacement, adapter.embedding.num_embeddings)
    if replacement.strategy == "attention":
        _check_attention_deletion(adapter, mask)
    protect = protect_mask(protect, adapter, ids, tokenizer)
    if protect is not None and tuple(protect.shape) != (batch, length):
        raise ValueError(
            f"protect shape {tuple(protect.shape)} != input_ids shape {(batch, length)}"
        )
    targets = _rows(targets, "targets", batch, device)
    gold = _rows(gold, "gold", batch, device)

    causal = adapter.kind == "causal"
    protect = None if protect is None else protect.to(device)
    scores = scores.to(device)
    top, rest, counts = removal_masks(mask, positions, scores, fractions=fractions,
                                      causal=causal, protect=protect, removal=removal)
    removed = torch.stack([top, rest])  # (2, K, B, T)
    k = len(fractions)
    rows_ids = ids[None, None].expand_as(removed)
    rows_mask = mask[None, None].expand_as(removed)
    if replacement.strategy == "attention":
        rows_mask = rows_mask.masked_fill(removed, 0)
    else:
        rows_ids = rows_ids.masked_fill(removed, replacement.token_id)
    with probe_mode(adapter.module):
        logits = batched_logits(adapter, ids, mask, positions, batch_size)  # (B, C)
        targets = resolve_targets(logits, targets)
        original = logits.softmax(dim=-1)[torch.arange(batch, device=device), targets]
        predicted = logits.argmax(dim=-1)
        # Short inputs give the same variant at several fractions (and comprehensiveness and
        # sufficiency meet at the extremes): each distinct row is evaluated once.
        variant = torch.cat([rows_ids.reshape(2 * k * batch, length),
                             rows_mask.reshape(2 * k * batch, length).long(),
                             positions.repeat(2 * k)[:, None], targets.repeat(2 * k)[:, None]],
                            dim=1)
        unique, inverse = torch.unique(variant, dim=0, return_inverse=True)
        with _positions_kept(adapter, replacement.strategy == "attention"):
            probs, preds = _target_probs(
                adapter, unique[:, :length], unique[:, length: 2 * length].to(mask.dtype),
                unique[:, -2], unique[:, -1], batch_size)
        probs, preds = probs[inverse], preds[inverse]
    probs = probs.reshape(2, k, batch).transpose(1, 2)  # (2, B, K)
    preds = preds.reshape(2, k, batch).transpose(1, 2)
    drops = original[None, :, None] - probs  # (2, B, K)
    out: dict[str, Any] = {"fractions": tuple(fractions), "removal": removal,
                           "replacement": replacement}
    for i, name in enumerate(("comprehensiveness", "sufficiency")):
        out[name] = float(drops[i].mean())
        out[f"{name}_curve"] = drops[i].mean(dim=0).cpu()
        out[f"{name}_rows"] = drops[i].mean(dim=1).cpu()
        out[f"{name}_probs"] = probs[i].cpu()
        out[f"{name}_preds"] = preds[i].cpu()
    out["original_probs"] = original.cpu()
    out["targets"] = targets.cpu()
    out["predicted"] = predicted.cpu()
    n = candidate_mask(mask, positions, scores, causal=causal, protect=protect).sum(dim=1)
    out["n_candidates"] = n.cpu()
    out["removal_counts"] = counts.T.cpu()
    out["degenerate_cells"] = ((counts == 0) | (counts == n[None, :])).sum(dim=0).cpu()
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


def faithfulness_rows(
    model: nn.Module | ModelAdapter,
    encoded_probes: Any,
    methods: Sequence[str] = METHODS,
    *,
    replacement: Replacement | int | str,
    n_steps: int = 50,
    seed: int = 0,
    batch_size: int = 16,
    aopc_batch_size: int = 64,
    fractions: Sequence[float] = FRACTIONS,
    protect: Tensor | str | None = "special",
    tokenizer: Any = None,
    removal: str = "nearest",
    explain: str = "target",
    permutations: int = RANDOM_PERMUTATIONS,
):
    """One row per (method, probe): AOPC of each method on `encoded_probes` (an
    `EncodedProbes`) and the attribution's cost; `summarise_faithfulness` turns it into
    one row per method. Rows of several calls (e.g. equal-length probe groups) may be
    concatenated before summarising.

    Columns: method, probe_id, explained ("target" or "argmax"), comprehensiveness,
    sufficiency, [correct (the argmax is the target), comprehensiveness_correct,
    sufficiency_correct: accuracies' per-probe parts, where the probe has a target],
    n_candidates, degenerate_cells, cells (k values), seconds (this call's attribution wall
    time for the method, spread evenly over its probes), peak_memory_mb, replacement,
    replacement_token, removal.

    The prediction explained (`explain`): "target" (default) explains each probe's own
    target where it has one and the model's argmax elsewhere, so faithfulness and evidence
    alignment are about the same prediction; "argmax" explains the argmax everywhere (the
    original protocol). The "random" method's rows are the mean over `permutations` seeded
    random rankings (seeds ``seed .. seed + permutations - 1``), its expectation rather than
    one draw.
    `batch_size` bounds the attribution's forward passes, `aopc_batch_size` the evaluation's.

    peak_memory_mb is the CUDA allocator's peak during the attribution minus what was
    allocated before it, on a CUDA model only. On the CPU it is NaN: the process's peak
    RSS is a lifetime high-water mark that cannot be reset, and tracemalloc does not see
    PyTorch's allocator.
    """
    import pandas as pd

    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods contains {method!r}: valid names are {METHODS}")
    if explain not in EXPLAIN:
        raise ValueError(f"explain={explain!r} is not one of {EXPLAIN}")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations={permutations!r} must be a positive integer")
    adapter = resolve_adapter(model)  # resolved once, outside the timed region
    device = adapter.embedding.weight.device
    probes = encoded_probes.to(device)
    ids, mask, positions = probes.input_ids, probes.attention_mask, probes.positions
    protect = protect_mask(protect, adapter, ids, tokenizer)
    gold = probes.targets if bool((probes.targets >= 0).any()) else None
    # -1 (no target given): the model's argmax, resolved by `attribute` and `aopc`.
    targets = probes.targets if explain == "target" else torch.full_like(probes.targets, -1)
    explained = np.where((targets >= 0).cpu().numpy(), "target", "argmax")
    n = ids.shape[0]
    cuda = device.type == "cuda"
    frames = []
    for method in methods:
        # Untimed warm-up on one row: imports (captum), lazy initialisation and allocator
        # growth would otherwise be charged to whichever method runs first.
        attribute(method, adapter, ids[:1], mask[:1], positions[:1], targets[:1], seed=seed,
                  n_steps=n_steps, batch_size=batch_size)
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        draws = permutations if method == "random" else 1
        start = time.perf_counter()
        scores = torch.cat([attribute(method, adapter, ids, mask, positions, targets,
                                      seed=seed + i, n_steps=n_steps, batch_size=batch_size)
                            for i in range(draws)])  # (draws * B, T)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / draws
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else float("nan")
        # The draws of the random ranking are rows of one call (variants shared by several
        # draws are evaluated once), averaged per probe below.
        result = aopc(adapter, ids.repeat(draws, 1), mask.repeat(draws, 1),
                      positions.repeat(draws), scores, replacement=replacement,
                      targets=targets.repeat(draws),
                      gold=None if gold is None else gold.repeat(draws),
                      fractions=fractions, batch_size=aopc_batch_size,
                      protect=None if protect is None else protect.repeat(draws, 1),
                      removal=removal)
        used = result["replacement"]

        def per_probe(values: Tensor, draws: int = draws) -> np.ndarray:
            return values.double().reshape(draws, n, *values.shape[1:]).mean(0).numpy()

        frame = pd.DataFrame({
            "method": method,
            "probe_id": list(probes.ids),
            "explained": explained,
            "comprehensiveness": per_probe(result["comprehensiveness_rows"]),
            "sufficiency": per_probe(result["sufficiency_rows"]),
        })
        if gold is not None:
            known = (gold >= 0).cpu()
            predicted = result["predicted"][:n]  # the argmax on the unmasked input
            for name in ("comprehensiveness", "sufficiency"):
                variant = _variant_correct(result, name, gold.repeat(draws).cpu())
                frame[f"{name}_correct"] = np.where(known, per_probe(torch.from_numpy(variant)),
                                                    np.nan)
            frame["correct"] = np.where(known, (predicted == gold.cpu()).double(), np.nan)
        frame["n_candidates"] = result["n_candidates"][:n].numpy()
        frame["degenerate_cells"] = result["degenerate_cells"][:n].numpy()
        frame["cells"] = len(fractions)
        frame["seconds"] = seconds / n
        frame["peak_memory_mb"] = peak
        frame["replacement"] = used.strategy
        frame["replacement_token"] = used.token if used.token is not None else (
            "" if used.token_id is None else str(used.token_id))
        frame["removal"] = removal
        frames.append(frame)
        log.info("faithfulness %s: comprehensiveness %.4f, sufficiency %.4f", method,
                 result["comprehensiveness"], result["sufficiency"])
    return pd.concat(frames, ignore_index=True)


def summarise_faithfulness(rows, *, seed: int = 0):
    """One row per method from `faithfulness_rows` output: means over probes with seeded
    95% bootstrap intervals over probes.

    Columns: method, comprehensiveness, comprehensiveness_low, comprehensiveness_high,
    sufficiency (and its _low/_high), [accuracy, comprehensiveness_accuracy,
    sufficiency_accuracy], seconds_per_instance (attribution only), peak_memory_mb,
    n_instances, n_candidates_min, n_candidates_median, degenerate_cells, cells,
    replacement, replacement_token, removal.
    """
    import pandas as pd

    out = []
    for method, group in rows.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method}
        for name in ("comprehensiveness", "sufficiency"):
            values = group[name].to_numpy(dtype=float)
            row[name] = float(np.nanmean(values)) if np.isfinite(values).any() else np.nan
            row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(values, seed=seed)
        if "correct" in group and group["correct"].notna().any():
            row["accuracy"] = float(group["correct"].mean())
            for name in ("comprehensiveness", "sufficiency"):
                row[f"{name}_accuracy"] = float(group[f"{name}_correct"].mean())
        row.update(
            seconds_per_instance=float(group["seconds"].mean()),
            peak_memory_mb=float(group["peak_memory_mb"].max()),
            n_instances=len(group),
            n_candidates_min=int(group["n_candidates"].min()),
            n_candidates_median=float(group["n_candidates"].median()),
            degenerate_cells=int(group["degenerate_cells"].sum()),
            cells=int(group["cells"].sum()),
            replacement=group["replacement"].iloc[0],
            replacement_token=group["replacement_token"].iloc[0],
            removal=group["removal"].iloc[0],
        )
        out.append(row)
    return pd.DataFrame(out)


def faithfulness_table(
    model: nn.Module | ModelAdapter,
    encoded_probes: Any,
    methods: Sequence[str] = METHODS,
    **kwargs: Any,
):
    """One row per method: `summarise_faithfulness(faithfulness_rows(...))`. Keyword
    arguments are `faithfulness_rows`'s (`replacement` required; `protect="special"` and
    `removal="nearest"` by default)."""
    return summarise_faithfulness(faithfulness_rows(model, encoded_probes, methods, **kwargs),
                                  seed=kwargs.get("seed", 0))


def _variant_correct(result: dict[str, Any], name: str, gold: Tensor) -> np.ndarray:
    """Per row, the share of k values whose variant still predicts the gold label."""
    preds = result[f"{name}_preds"]  # (B, K)
    return (preds == gold[:, None]).double().mean(dim=1).numpy()


def _check_attention_deletion(adapter: ModelAdapter, mask: Tensor) -> None:
    if not adapter.accepts_mask:
        raise ValueError("replacement='attention' deletes tokens through the attention mask, "
                         "but this model takes none (ModelAdapter(accepts_mask=False)); use a "
                         "replacement token")
    if bool((mask[:, 0] == 0).any()):
        raise ValueError("replacement='attention' keeps each token's position id as in a "
                         "right-padded input; pad the inputs on the right")


class _positions_kept:
    """While active, a causal Hugging Face body gets position ids 0..T-1 (those of the
    right-padded unmasked input) even when the attention mask has holes at the start,
    which the hidden-state reader would otherwise read as left padding."""

    def __init__(self, adapter: ModelAdapter, active: bool):
        body = getattr(adapter.module, "base_model", None) if active else None
        self.body = body if isinstance(body, nn.Module) else None
        self.handle = None

    def __enter__(self):
        if self.body is not None:
            def hook(module, args, kwargs):
                if kwargs.get("position_ids") is not None:
                    ids = kwargs["input_ids"]
                    kwargs["position_ids"] = torch.arange(
                        ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
                return args, kwargs

            self.handle = self.body.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
        return False


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
