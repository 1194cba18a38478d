import logging
import math

import numpy as np
import pytest
import torch

from normx_callbacks import embeddings
from normx_callbacks.embeddings import (
    EmbeddingSnapshot,
    TokenCounter,
    embedding_norms,
    information_gain,
    snapshot_embeddings,
    summarise_norms,
)


def _weight(v: int = 50, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


# --- norms ------------------------------------------------------------------------


def test_embedding_norms_match_linalg():
    w = _weight()
    norms = embedding_norms(w)
    assert norms.dtype == torch.float32 and norms.device.type == "cpu"
    assert torch.allclose(norms, torch.linalg.norm(w, dim=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embedding_norms_half_precision_chunked(monkeypatch, dtype):
    monkeypatch.setattr(embeddings, "_CHUNK_ELEMENTS", 8 * 7)  # 7 rows per chunk, uneven tail
    w = _weight().to(dtype)
    norms = embedding_norms(w)
    assert norms.dtype == torch.float32 and norms.shape == (50,)
    assert torch.allclose(norms, torch.linalg.norm(w.float(), dim=1), rtol=1e-6)


def test_embedding_norms_of_parameter_needs_no_grad():
    w = torch.nn.Parameter(_weight())
    assert not embedding_norms(w).requires_grad


def test_embedding_norms_rejects_non_matrix():
    with pytest.raises(ValueError, match="weight"):
        embedding_norms(torch.ones(3))


# --- snapshot -----------------------------------------------------------------------


def test_snapshot_stats_top_bottom():
    # Row i has norm i (a single non-zero entry), so order and stats are known.
    w = torch.zeros(11, 3)
    w[:, 1] = torch.arange(11.0)
    snap = snapshot_embeddings(w, counts=None, previous=None, top_k=3, tied=True)
    assert isinstance(snap, EmbeddingSnapshot)
    assert snap.top == [(10, 10.0), (9, 9.0), (8, 8.0)]
    assert snap.bottom == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert snap.stats["mean"] == pytest.approx(5.0)
    assert snap.stats["std"] == pytest.approx(math.sqrt(10.0))  # population std of 0..10
    assert snap.stats["min"] == 0.0 and snap.stats["max"] == 10.0
    assert snap.stats["median"] == pytest.approx(5.0)
    assert snap.stats["p05"] == pytest.approx(0.5)
    assert snap.stats["p95"] == pytest.approx(9.5)
    assert snap.drift is None
    assert math.isnan(snap.norm_logfreq_spearman)
    assert snap.tied is True


def test_snapshot_top_k_larger_than_vocab_and_zero():
    w = _weight(v=4)
    assert len(snapshot_embeddings(w, top_k=10).top) == 4
    assert snapshot_embeddings(w, top_k=0).bottom == []
    with pytest.raises(ValueError, match="top_k"):
        snapshot_embeddings(w, top_k=-1)


def test_drift_against_previous_norms():
    prev = _weight()
    first = snapshot_embeddings(prev)
    cur = 2 * prev  # every norm doubles: relative drift exactly 1
    snap = snapshot_embeddings(cur, previous=first.norms)
    assert snap.drift == pytest.approx(1.0, rel=1e-6)
    # A rotation moves the matrix but not the norms.
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2)))
    assert snapshot_embeddings(prev @ q, previous=first.norms).drift == pytest.approx(0.0, abs=1e-6)
    assert snapshot_embeddings(2 * prev @ q, previous=first.norms).drift == pytest.approx(1.0)


def test_drift_shape_mismatch():
    with pytest.raises(ValueError, match="previous"):
        snapshot_embeddings(_weight(), previous=torch.ones(49, 8))
    with pytest.raises(ValueError, match="previous"):
        snapshot_embeddings(_weight(), previous=torch.ones(49))
    # The norms path the writer takes checks the same.
    with pytest.raises(ValueError, match="previous"):
        summarise_norms(torch.ones(50), previous=torch.ones(49))


def test_norm_logfreq_spearman():
    w = torch.zeros(6, 2)
    w[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 9.0])
    counts = torch.tensor([1, 3, 10, 100, 1000, 0])  # norm rises with count; last unseen
    assert snapshot_embeddings(w, counts=counts).norm_logfreq_spearman == pytest.approx(1.0)
    falling = torch.tensor([1000, 100, 10, 3, 1, 0])
    assert snapshot_embeddings(w, counts=falling).norm_logfreq_spearman == pytest.approx(-1.0)
    # Fewer than three seen tokens: undefined.
    sparse = torch.tensor([0, 0, 0, 0, 5, 7])
    assert math.isnan(snapshot_embeddings(w, counts=sparse).norm_logfreq_spearman)
    with pytest.raises(ValueError, match="counts"):
        snapshot_embeddings(w, counts=torch.ones(5))


# --- token counter ---------------------------------------------------------------------


def test_token_counter_update_with_mask_is_pending_until_collected():
    counter = TokenCounter(5)
    ids = torch.tensor([[0, 1, 1, 4], [2, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    counter.update({"input_ids": ids, "attention_mask": mask})
    assert counter.counts.tolist() == [0, 0, 0, 0, 0]  # pending on the batch's device
    assert counter.collect().tolist() == [1, 2, 2, 0, 0]
    counter.update((ids.to(torch.int32),))  # a tuple batch: its 2-D integer tensor
    counter.update({"input_ids": ids, "attention_mask": mask})
    assert counter.collect(reduce=lambda t: 2 * t).tolist() == [7, 10, 10, 2, 2]
    assert counter.counts.dtype == torch.int64 and counter.pending is None
    assert counter.collect().tolist() == [7, 10, 10, 2, 2]  # nothing pending: unchanged


def test_token_counter_first_batch_problems_are_named():
    counter = TokenCounter(3)
    batch = {"input_ids": torch.tensor([[0, 5, 2, -100]])}
    counter.update(batch)
    problem = counter.first_batch_problem(batch)
    assert "vocab_size=3" in problem and "max 5" in problem
    assert counter.collect().tolist() == [1, 0, 1]  # the out-of-range id is not counted
    fine = {"input_ids": torch.tensor([[0, 1]])}
    counter.update(fine)
    assert counter.first_batch_problem(fine) is None
    nothing = {"tokens": torch.tensor([[0, 1]])}
    counter.collect()
    counter.update(nothing)
    assert "batch_key='input_ids'" in counter.first_batch_problem(nothing)


def test_token_counter_state_round_trip_and_merge():
    counter = TokenCounter(4)
    counter.update(torch.tensor([[0, 3, 3]]))
    counter.collect()
    restored = TokenCounter(4)
    restored.load_state_dict(counter.state_dict())
    assert torch.equal(restored.counts, counter.counts)
    restored.update(torch.tensor([[1]]))
    restored.collect()
    assert counter.counts.tolist() == [1, 0, 0, 2]  # the state is a copy
    restored.merge_(torch.tensor([1, 1, 1, 1]))
    assert restored.counts.tolist() == [2, 2, 1, 3]
    with pytest.raises(ValueError, match="vocab_size"):
        TokenCounter(5).load_state_dict(counter.state_dict())
    with pytest.raises(ValueError, match="other_counts"):
        restored.merge_(torch.ones(3))


def test_token_counter_validates():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenCounter(0)
    with pytest.raises(ValueError, match="count_fn"):
        TokenCounter(3, count_fn="input_ids")
    with pytest.raises(TypeError, match="count_fn returned"):
        TokenCounter(3, count_fn=lambda b: b.float()).update(torch.tensor([[0, 1]]))


# --- next-token pairs and information gain ------------------------------------------------


def _markov(n: int, rng: np.random.Generator, transition: np.ndarray) -> np.ndarray:
    """A chain of ``n`` tokens drawn from ``transition`` (rows: p(next | w))."""
    cumulative = transition.cumsum(1)
    x = np.empty(n, dtype=np.int64)
    x[0] = 0
    u = rng.random(n)
    for i in range(1, n):
        x[i] = min(int(np.searchsorted(cumulative[x[i - 1]], u[i])), len(transition) - 1)
    return x


def _known_kl(transition: np.ndarray) -> np.ndarray:
    """KL(p(next | w) || p(next)) per w, p(next) the chain's stationary distribution."""
    values, vectors = np.linalg.eig(transition.T)
    pi = np.real(vectors[:, np.argmin(abs(values - 1))])
    pi /= pi.sum()
    return (transition * np.log(transition / pi)).sum(1)


def test_information_gain_on_a_synthetic_bigram_corpus_matches_the_known_kl():
    rng = np.random.default_rng(0)
    transition = rng.dirichlet(np.full(5, 0.7), size=5)
    truth = _known_kl(transition)
    tokens = _markov(100_000, rng, transition)
    counter = TokenCounter(5)
    for rows in np.split(tokens.reshape(50, -1), 5):  # pairs are counted within rows
        counter.update(torch.from_numpy(rows))
    counter.collect()
    estimate = information_gain(counter.pair_keys, counter.pair_counts, 5)
    np.testing.assert_allclose(estimate.numpy(), truth, atol=0.02)
    assert truth.max() - truth.min() > 0.3  # the types differ, so matching them means something


def test_information_gain_bias_correction_and_minimum_count():
    # Short samples: the plug-in KL is too large by about (K - 1) / (2 n); the estimator
    # removes that term, so its mean error over many samples is far smaller.
    rng = np.random.default_rng(1)
    transition = rng.dirichlet(np.full(5, 0.7), size=5)
    truth = _known_kl(transition)
    corrected, plug_in = [], []
    for _ in range(150):
        counter = TokenCounter(5)
        counter.update(torch.from_numpy(_markov(300, rng, transition))[None])
        counter.collect()
        keys, counts, _ = counter.pairs()
        estimate = information_gain(keys, counts, 5, min_count=1).numpy()
        left = (keys // 5).numpy()
        n_w = np.bincount(left, weights=counts.numpy(), minlength=5)
        distinct = np.bincount(left, minlength=5)
        corrected.append(estimate - truth)
        plug_in.append(estimate + (distinct - 1) / (2 * n_w) - truth)
    bias, plug_in_bias = np.mean(corrected, 0), np.mean(plug_in, 0)
    assert np.abs(bias).mean() < 0.5 * np.abs(plug_in_bias).mean(), (bias, plug_in_bias)
    assert (plug_in_bias > 0).all()  # the plug-in errs upward for every type
    # A type seen as the first word of fewer than min_count pairs gets no estimate.
    counter = TokenCounter(4)
    counter.update(torch.tensor([[0, 1] * 25 + [2, 3]]))
    counter.collect()
    gain = information_gain(counter.pair_keys, counter.pair_counts, 4)
    assert torch.isfinite(gain[[0, 1]]).all() and torch.isnan(gain[[2, 3]]).all()  # 2: one pair
    assert information_gain(counter.pair_keys, counter.pair_counts, 4, min_count=1)[2].item() == pytest.approx(
        math.log(51))  # 2 -> 3 always; 3 is the next token in 1 of the 51 pairs


def test_pairs_stay_within_rows_and_skip_padding_and_the_mask_token():
    counter = TokenCounter(6, masked=True, mask_token_id=5)
    ids = torch.tensor([[0, 5, 2, 3], [1, 2, 4, 4]])
    labels = torch.tensor([[-100, 1, -100, -100], [-100, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    counter.update({"input_ids": ids, "labels": labels, "attention_mask": mask})
    counter.collect()
    keys, counts, _ = counter.pairs()
    pairs = {(int(k) // 6, int(k) % 6): int(c) for k, c in zip(keys, counts, strict=True)}
    # Row 0 read uncorrupted (0 1 2 3); row 1 stops at padding; no pair spans two rows.
    assert pairs == {(0, 1): 1, (1, 2): 2, (2, 3): 1, (2, 4): 1}


def test_pair_counts_fold_on_the_device_gather_over_ranks_and_survive_a_checkpoint():
    batches = [torch.tensor([[0, 1, 2, 1, 0]]), torch.tensor([[2, 2, 1, 0, 1]])] * 3
    whole = TokenCounter(3)
    folding = TokenCounter(3, fold_keys=5)  # folds at every batch: the same counts
    for batch in batches:
        whole.update(batch)
        folding.update(batch)
    whole.collect()
    folding.collect()
    assert torch.equal(whole.pair_keys, folding.pair_keys)
    assert torch.equal(whole.pair_counts, folding.pair_counts)
    assert int(whole.pair_counts.sum()) == 6 * 4
    # Two "ranks": the writer gets both ranks' pending pairs, the other keeps none.
    rank0, rank1 = TokenCounter(3), TokenCounter(3)
    for i, batch in enumerate(batches):
        (rank0 if i % 2 == 0 else rank1).update(batch)
    box: list = []
    rank1.collect(gather=lambda mine: box.append(mine))  # a non-writer: nothing kept
    rank0.collect(gather=lambda mine: [mine, box[0]])
    assert rank1.pair_keys.numel() == 0
    assert torch.equal(rank0.pair_keys, whole.pair_keys)
    assert torch.equal(rank0.pair_counts, whole.pair_counts)
    restored = TokenCounter(3)
    restored.load_state_dict(whole.state_dict())
    assert torch.equal(restored.pair_counts, whole.pair_counts)
    old = {"vocab_size": 3, "counts": whole.counts}  # a checkpoint from before pairs
    restored.load_state_dict(old)
    assert restored.pair_keys.numel() == 0 and restored.pairs_dropped == 0


def test_past_max_pairs_the_rarest_are_dropped_counted_and_warned_once(caplog):
    counter = TokenCounter(4, max_pairs=2)
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        counter.update(torch.tensor([[0, 1, 0, 1, 0, 1, 2, 3, 0, 2]]))
        counter.collect()
        counter.update(torch.tensor([[3, 1, 3, 1]]))
        counter.collect()
    keys = [(int(k) // 4, int(k) % 4) for k in counter.pair_keys]
    # Counts: (0,1) x3, (1,0) x2, (1,2), (2,3), (3,0), (0,2) once; then (3,1) x2, (1,3).
    assert keys == [(0, 1), (1, 0)] and counter.pair_counts.tolist() == [3, 2]
    assert counter.pairs_dropped == 4 + 3
    assert len([r for r in caplog.records if "max_pairs=2" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="max_pairs must be a positive int, got 0"):
        TokenCounter(4, max_pairs=0)
