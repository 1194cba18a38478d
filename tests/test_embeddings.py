import math

import pytest
import torch

from normx_callbacks import embeddings
from normx_callbacks.embeddings import (
    EmbeddingSnapshot,
    TokenCounter,
    embedding_norms,
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
    # The norms path the snapshot worker takes checks the same.
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
