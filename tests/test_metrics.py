import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from normx_callbacks.metrics import (
    alignment_per_probe,
    average_precision,
    bootstrap_interval,
    cue_over_attractor,
    dot_product,
    dot_product_z,
    evidence_alignment,
    random_average_precision,
    random_dot_product,
    rank_stability,
    ranked_positions,
    spearman,
    spearman_interval,
    standardised,
)
from normx_callbacks.removal import candidate_mask

NAN = float("nan")
T, F = True, False


def _ap_bruteforce(order_relevant: list[bool]) -> float:
    """AP of a ranking given as relevance flags in rank order."""
    hits, total = 0, 0.0
    for k, rel in enumerate(order_relevant, start=1):
        if rel:
            hits += 1
            total += hits / k
    return total / hits


# --- average precision -------------------------------------------------------


def test_ap_hand_computed():
    # Ranking 0, 2, 1: the cue is third, precision 1/3.
    ap = average_precision(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([F, T, F]))
    assert ap.item() == pytest.approx(1 / 3)
    # Ranking 0, 2, 3, 1: cues at ranks 2 and 4 -> (1/2 + 2/4) / 2.
    ap = average_precision(torch.tensor([0.9, 0.1, 0.8, 0.4]), torch.tensor([F, T, T, F]))
    assert ap.item() == pytest.approx(0.5)
    # Cue first -> 1.
    ap = average_precision(torch.tensor([5.0, 1.0, 2.0]), torch.tensor([T, F, F]))
    assert ap.item() == pytest.approx(1.0)


def test_ap_batched_shape_and_no_cue_is_nan():
    scores = torch.tensor([[[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]]])  # (1, 2, 3)
    relevant = torch.tensor([[F, T, F]])  # broadcast over the layer axis
    ap = average_precision(scores, relevant[:, None, :])
    assert ap.shape == (1, 2)
    assert torch.allclose(ap, torch.tensor([[1 / 3, 1 / 2]]))
    assert math.isnan(average_precision(torch.tensor([1.0, 2.0]), torch.tensor([F, F])).item())


def test_ap_ignores_nan_and_invalid_positions():
    # Position 3 is NaN, position 4 invalid: both would outrank the cue if counted.
    scores = torch.tensor([3.0, 1.0, 2.0, NAN, 9.0])
    relevant = torch.tensor([F, T, F, F, F])
    valid = torch.tensor([T, T, T, T, F])
    assert average_precision(scores, relevant, valid).item() == pytest.approx(1 / 3)
    # A cue sitting on a NaN position does not count as relevant.
    relevant_nan = torch.tensor([F, F, F, T, F])
    assert math.isnan(average_precision(scores, relevant_nan, valid).item())


def test_ap_ties_rank_by_position():
    # All tied: the ranking is position order, so the cue at 1 is second.
    ap = average_precision(torch.zeros(4), torch.tensor([F, T, F, F]))
    assert ap.item() == pytest.approx(1 / 2)
    # -inf scores are valid and tie among themselves the same way.
    ap = average_precision(torch.full((3,), float("-inf")), torch.tensor([F, F, T]))
    assert ap.item() == pytest.approx(1 / 3)


def test_ap_matches_bruteforce_on_random_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 9, generator=g)
    relevant = torch.rand(50, 9, generator=g) < 0.3
    relevant[:, 0] = True
    ap = average_precision(scores, relevant)
    for row in range(50):
        order = torch.argsort(scores[row], descending=True)
        assert ap[row].item() == pytest.approx(_ap_bruteforce(relevant[row][order].tolist()))


def test_ap_half_precision_scores():
    ap = average_precision(
        torch.tensor([3.0, 1.0, 2.0], dtype=torch.bfloat16), torch.tensor([F, T, F])
    )
    assert ap.dtype == torch.float32
    assert ap.item() == pytest.approx(1 / 3)


# --- random AP ----------------------------------------------------------------


@pytest.mark.parametrize(("n", "r"), [(1, 1), (2, 1), (4, 2), (6, 1), (6, 3), (7, 7)])
def test_random_ap_closed_form_is_exact(n, r):
    # Average of AP over every placement of the R relevant items.
    placements = list(itertools.combinations(range(n), r))
    exact = sum(_ap_bruteforce([k in p for k in range(n)]) for p in placements) / len(placements)
    relevant = torch.tensor([k < r for k in range(n)])
    assert random_average_precision(relevant).item() == pytest.approx(exact, rel=1e-6)


def test_random_ap_matches_monte_carlo():
    n, r, trials = 12, 3, 20000
    g = torch.Generator().manual_seed(1234)
    scores = torch.rand(trials, n, generator=g)
    relevant = torch.zeros(trials, n, dtype=torch.bool)
    relevant[:, :r] = True
    monte_carlo = average_precision(scores, relevant).mean().item()
    expected = random_average_precision(relevant[0]).item()
    assert monte_carlo == pytest.approx(expected, abs=0.005)


def test_random_ap_uses_valid_count_and_nan_without_cue():
    relevant = torch.tensor([[T, F, F, F, F], [F, F, F, F, F]])
    valid = torch.tensor([[T, T, F, F, F], [T, T, T, T, T]])
    out = random_average_precision(relevant, valid)
    assert out[0].item() == pytest.approx((1 + 1 / 2) / 2)  # N=2, R=1: E[1/rank]
    assert math.isnan(out[1].item())


# --- dot product ----------------------------------------------------------------


def test_dot_product_values():
    scores = torch.tensor([0.0, math.log(2.0), math.log(3.0), 50.0])
    relevant = torch.tensor([F, T, T, F])
    valid = torch.tensor([T, T, T, F])  # softmax over exp = 1, 2, 3
    assert dot_product(scores, relevant, valid).item() == pytest.approx(5 / 6)
    assert dot_product(torch.zeros(4), torch.tensor([T, F, F, F])).item() == pytest.approx(1 / 4)


def test_dot_product_nan_handling():
    scores = torch.tensor([0.0, NAN, 0.0])
    assert dot_product(scores, torch.tensor([T, F, F])).item() == pytest.approx(1 / 2)
    assert math.isnan(dot_product(scores, torch.tensor([F, T, F])).item())
    assert math.isnan(dot_product(torch.full((3,), NAN), torch.tensor([T, T, T])).item())


def test_random_dot_product():
    relevant = torch.tensor([[T, T, F, F, F], [F, F, F, F, F]])
    valid = torch.tensor([[T, T, T, T, F], [T, T, T, T, T]])
    out = random_dot_product(relevant, valid)
    assert out[0].item() == pytest.approx(2 / 4)
    assert math.isnan(out[1].item())


# --- evidence alignment -----------------------------------------------------------


def test_evidence_alignment_shapes_means_and_exclude():
    # Probe 0: cue at 1, target at 3 (which would outrank everything).
    # Probe 1: padding at 3, no cue -> left out of the means.
    scores = torch.tensor(
        [
            [[1.0, 2.0, 0.0, 9.0], [2.0, 1.0, 0.0, 9.0]],
            [[1.0, 2.0, 3.0, NAN], [1.0, 2.0, 3.0, NAN]],
        ]
    )  # (B=2, L=2, T=4)
    cue = torch.tensor([[F, T, F, F], [F, F, F, F]])
    valid = torch.tensor([[T, T, T, T], [T, T, T, F]])
    out = evidence_alignment(scores, cue, valid, exclude=torch.tensor([3, 2]))
    assert set(out) == {"ap", "ap_random", "dp_raw", "dp_z", "dp_random"}
    assert all(v.shape == (2,) for v in out.values())
    # N = 3 after excluding the target.
    assert torch.allclose(out["ap"], torch.tensor([1.0, 0.5]))
    h3 = 1 + 1 / 2 + 1 / 3
    assert torch.allclose(out["ap_random"], torch.full((2,), h3 / 3))
    e = math.e
    dp = torch.tensor([e**2 / (e + e**2 + 1), e / (e**2 + e + 1)])
    assert torch.allclose(out["dp_raw"], dp)
    assert torch.allclose(out["dp_random"], torch.full((2,), 1 / 3))

    # Without exclusion the target at 3 is ranked first.
    out = evidence_alignment(scores, cue, valid, exclude=None)
    assert torch.allclose(out["ap"], torch.tensor([0.5, 1 / 3]))
    assert torch.allclose(out["dp_random"], torch.full((2,), 1 / 4))


def test_evidence_alignment_averages_over_probes_with_cues():
    scores = torch.tensor([[[3.0, 1.0, 2.0]], [[1.0, 2.0, 3.0]], [[1.0, 1.0, 1.0]]])
    cue = torch.tensor([[T, F, F], [T, F, F], [F, F, F]])
    valid = torch.ones(3, 3, dtype=torch.bool)
    out = evidence_alignment(scores, cue, valid)
    assert out["ap"].item() == pytest.approx((1.0 + 1 / 3) / 2)


def test_evidence_alignment_validates_arguments():
    scores = torch.zeros(2, 1, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="scores"):
        evidence_alignment(torch.zeros(2, 3), mask, mask)
    with pytest.raises(ValueError, match="cue_mask"):
        evidence_alignment(scores, mask[:, :2], mask)
    with pytest.raises(ValueError, match="exclude"):
        evidence_alignment(scores, mask, mask, exclude=torch.tensor([0, 3]))


# --- Spearman and rank stability ------------------------------------------------


def test_spearman_with_ties_matches_scipy():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0])
    b = torch.tensor([2.0, 1.0, 4.0, 4.0, 3.0, 6.0, 6.0, 1.0])
    expected = scipy.stats.spearmanr(a.numpy(), b.numpy()).statistic
    assert spearman(a, b) == pytest.approx(expected)


def test_spearman_ignores_non_finite_pairs():
    a = torch.tensor([1.0, 2.0, NAN, 3.0, 4.0, float("inf")])
    b = torch.tensor([1.0, 3.0, 0.0, 2.0, NAN, 9.0])
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr([1, 2, 3], [1, 3, 2]).statistic)


def test_spearman_undefined_cases():
    assert math.isnan(spearman(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])))
    assert math.isnan(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3)))
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.ones(3), torch.ones(4))


def test_rank_stability():
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(4, 10, generator=g)
    prev[1, 7:] = NAN  # padding
    assert rank_stability(prev, prev.clone()) == pytest.approx(1.0)
    assert rank_stability(prev, -prev) == pytest.approx(-1.0)
    # A row with no defined correlation is left out of the mean.
    cur = prev.clone()
    cur[0] = 1.0
    assert rank_stability(prev, cur) == pytest.approx(1.0)
    assert math.isnan(rank_stability(torch.full((2, 3), NAN), torch.zeros(2, 3)))


# --- which positions are ranked, scale-free DP, intervals -------------------------


def test_ranked_positions_exclude_the_explained_position_for_every_objective():
    valid = torch.tensor([[T, T, T, T, F], [T, T, T, T, T]])
    pos = torch.tensor([3, 2])
    special = torch.tensor([[F, F, F, F, F], [T, F, F, F, F]])
    causal = ranked_positions(valid, pos, "causal", special)
    assert causal.tolist() == [[T, T, T, F, F], [F, T, F, F, F]]  # before t only
    masked = ranked_positions(valid, pos, "masked")
    assert masked.tolist() == [[T, T, T, F, F], [T, T, F, T, T]]  # all but the slot
    with pytest.raises(ValueError, match="positions"):
        ranked_positions(valid, torch.tensor([0, 5]), "causal")


def test_alignment_and_faithfulness_share_one_candidate_rule():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    pos = torch.tensor([5, 2, 3])
    scores = torch.randn(3, 6, generator=g)
    scores[0, 1] = NAN  # a position without a score is no candidate
    protect = torch.zeros(3, 6, dtype=torch.bool)
    protect[1, 0] = True
    for causal, objective in ((True, "causal"), (False, "masked")):
        expected = ranked_positions(mask.bool() & ~torch.isnan(scores), pos, objective, protect)
        assert torch.equal(candidate_mask(mask, pos, scores, causal=causal, protect=protect),
                           expected)


def test_a_causal_probe_whose_only_cue_is_at_the_explained_position_cannot_enter():
    # "the mother liked those" -> cue "those" at the explained position 3: last-layer LogAt
    # there is the model's own target logit, so it is not a candidate and AP is undefined.
    scores = torch.tensor([[[0.1, 0.5, 0.2, 0.9]]])
    cue = torch.tensor([[F, F, F, T]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    for objective in ("causal", "masked"):
        out = alignment_per_probe(scores, cue, ranked_positions(valid, torch.tensor([3]),
                                                                objective))
        assert math.isnan(out["ap"].item()) and math.isnan(out["ap_random"].item())
    # A cue before t enters, ranked among the three earlier positions only.
    cue = torch.tensor([[F, T, F, T]])
    out = alignment_per_probe(scores, cue, ranked_positions(valid, torch.tensor([3]), "causal"))
    assert out["ap"].item() == pytest.approx(1.0)
    assert out["dp_random"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(("cue", "attractor", "win"), [(0.9, 0.4, 1.0), (0.2, 0.4, 0.0),
                                                       (0.4, 0.4, 0.5)])
def test_cue_over_attractor_planted_win_loss_and_tie(cue, attractor, win):
    # Positions: the, <cue>, near, the, <attractor>, (explained). Scores built so that the
    # cue wins, loses or ties; a higher score elsewhere (position 2) changes nothing.
    scores = torch.tensor([[[0.0, cue, 5.0, 0.1, attractor, 9.0]]])
    cues = torch.tensor([[F, T, F, F, F, F]])
    attractors = torch.tensor([[F, F, F, F, T, F]])
    keep = ranked_positions(torch.ones(1, 6, dtype=torch.bool), torch.tensor([5]), "causal")
    got, random = cue_over_attractor(scores, cues, attractors, keep)
    assert got.item() == win
    assert random.item() == pytest.approx(0.5)  # one cue, one attractor


def test_cue_over_attractor_takes_the_best_of_each_and_its_exact_random_baseline():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(40, 1, 7, generator=g, dtype=torch.float64)
    cues = torch.zeros(40, 7, dtype=torch.bool)
    cues[:, 1] = True
    attractors = torch.zeros(40, 7, dtype=torch.bool)
    attractors[:, [3, 4]] = True
    keep = torch.ones(40, 7, dtype=torch.bool)
    keep[0, 1] = False  # no cue left: undefined
    keep[1, [3, 4]] = False  # no attractor left: undefined
    win, random = cue_over_attractor(scores, cues, attractors, keep)
    expected = (scores[:, 0, 1] > scores[:, 0, [3, 4]].max(-1).values).double()
    assert torch.isnan(win[:2]).all() and torch.isnan(random[:2]).all()
    assert torch.equal(win[2:, 0], expected[2:])
    assert torch.allclose(random[2:], torch.full((38, 1), 1 / 3, dtype=torch.float64))
    # The baseline is the exact mean over every ordering of the three positions.
    orders = list(itertools.permutations([0.0, 1.0, 2.0]))
    mean = sum(float(o[0] > max(o[1], o[2])) for o in orders) / len(orders)
    assert random[2, 0].item() == pytest.approx(mean)


def test_dp_z_is_scale_free_and_its_baseline_is_exact():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 1, 7, generator=g)
    cue = torch.zeros(5, 7, dtype=torch.bool)
    cue[:, 2] = True
    cue[1, 5] = True
    keep = torch.ones(5, 7, dtype=torch.bool)
    keep[3, 6] = False
    base = alignment_per_probe(scores, cue, keep)
    scaled = alignment_per_probe(scores * 10 + 3, cue, keep)
    torch.testing.assert_close(scaled["dp_z"], base["dp_z"])
    assert not torch.allclose(scaled["dp_raw"], base["dp_raw"])  # the paper's DP moves
    # Exact baseline: the mean DP_z over every placement of R cues among the N positions.
    row = scores[1, 0]
    placements = list(itertools.combinations(range(7), 2))
    mean = sum(dot_product_z(row, torch.isin(torch.arange(7), torch.tensor(c))).item()
               for c in placements) / len(placements)
    assert base["dp_random"][1, 0].item() == pytest.approx(mean)
    assert base["dp_random"][3, 0].item() == pytest.approx(1 / 6)


def test_standardised_rows():
    z = standardised(torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, 4.0, 4.0, 4.0]]))
    assert torch.allclose(z[0, :3], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5))
    assert math.isnan(z[0, 3].item())
    assert torch.equal(z[1], torch.zeros(4))


def test_bootstrap_interval_is_seeded_covers_the_mean_and_skips_nan():
    x = np.random.default_rng(1).normal(0.3, 0.2, 64)
    low, high = bootstrap_interval(x)
    assert low < x.mean() < high
    assert (low, high) == bootstrap_interval(x)  # seeded
    assert bootstrap_interval(np.append(x, np.nan)) == (low, high)
    # 1.96 standard errors either side, within bootstrap noise.
    se = x.std() / math.sqrt(len(x))
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert all(math.isnan(v) for v in bootstrap_interval([0.5]))
    assert bootstrap_interval([0.2, 0.2, 0.2]) == (0.2, 0.2)


def test_rank_stability_is_the_mean_of_the_per_row_spearman_with_nan_and_ties():
    gen = torch.Generator().manual_seed(3)
    prev = torch.randn(12, 9, generator=gen).round(decimals=1)  # ties
    cur = prev + 0.5 * torch.randn(12, 9, generator=gen).round(decimals=1)
    prev[0, :4] = NAN  # padding-like NaN runs, different per side
    cur[1, 6:] = NAN
    cur[2, 2] = float("inf")
    prev[3, 2:] = NAN  # 2 finite pairs: undefined, left out
    cur[4] = 1.0  # no rank variance: undefined, left out
    rhos = [spearman(p, c) for p, c in zip(prev, cur, strict=True)]
    defined = [r for r in rhos if not math.isnan(r)]
    assert len(defined) == 10
    assert rank_stability(prev, cur) == pytest.approx(sum(defined) / len(defined), rel=1e-12)


def test_bootstrap_interval_keeps_resamples_that_miss_an_infinite_value():
    """An fp16 overflow can make one per-probe value infinite: the resamples without it
    still have finite means (about 37% of them for 64 values), so the low bound is finite."""
    import warnings

    values = np.linspace(-1.0, 1.0, 64)
    values[10] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = bootstrap_interval(values)
    assert math.isfinite(low) and -1.0 < low < 1.0
    assert not math.isfinite(high)


def test_spearman_interval_is_the_bootstrap_of_spearman_over_items_with_ties():
    # The same draws resampled by hand, ranked with scipy (ties and repeated items averaged).
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    x[::5] = 1.0  # ties
    y[::7] = np.round(y[::7])
    draws = np.random.default_rng(0).integers(0, 60, size=(2000, 60))
    rhos = [scipy.stats.spearmanr(x[i], y[i]).statistic for i in draws]
    expected = np.percentile(rhos, [2.5, 97.5])
    low, high = spearman_interval(torch.tensor(x), torch.tensor(y))
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    assert low < spearman(torch.tensor(x), torch.tensor(y)) < high
    assert all(math.isnan(v) for v in spearman_interval(torch.ones(2), torch.ones(2)))
