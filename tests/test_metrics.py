"""trainer.metrics against small references written in plain Python (pairwise AUC, explicit
DCG loops), including tied scores, single-class groups and requests without any click."""
import math
import random

import numpy as np
import pytest

from trainer import metrics as M


# ---- plain-Python references ---------------------------------------------------------------
def ref_auc(labels, scores):
    pos = [s for y, s in zip(labels, scores) if y > 0.5]
    neg = [s for y, s in zip(labels, scores) if y <= 0.5]
    if not pos or not neg:
        return None
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def ref_gauc(labels, scores, groups):
    by = {}
    for y, s, g in zip(labels, scores, groups):
        by.setdefault(g, []).append((y, s))
    total, weight = 0.0, 0
    for rows in by.values():
        a = ref_auc([r[0] for r in rows], [r[1] for r in rows])
        if a is None:
            continue
        total += a * len(rows)
        weight += len(rows)
    return total / weight if weight else None


def ref_ranked(rel, scores):
    # stable: ties keep the listed order
    idx = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [rel[i] for i in idx]


def ref_ndcg(rel, scores, k):
    ranked = ref_ranked(rel, scores)
    dcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ranked[:k]))
    ideal = sorted(rel, reverse=True)
    idcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
    return dcg / idcg


def ref_mrr(rel, scores):
    for i, r in enumerate(ref_ranked(rel, scores)):
        if r > 0:
            return 1.0 / (i + 1)


def ref_hit(rel, scores, k):
    return 1.0 if any(r > 0 for r in ref_ranked(rel, scores)[:k]) else 0.0


# ---- AUC / log loss ------------------------------------------------------------------------
def test_auc_hand_computed_with_ties():
    labels = [1, 0, 1, 0, 0]
    scores = [0.9, 0.9, 0.3, 0.1, 0.3]
    # pairs (pos, neg): (0.9,0.9)=.5 (0.9,0.1)=1 (0.9,0.3)=1 (0.3,0.9)=0 (0.3,0.1)=1 (0.3,0.3)=.5
    assert M.auc(labels, scores) == pytest.approx(4.0 / 6.0)
    assert M.auc(labels, scores) == pytest.approx(ref_auc(labels, scores))


def test_auc_random_against_reference_and_extremes():
    rng = random.Random(3)
    labels = [rng.random() < 0.3 for _ in range(200)]
    scores = [round(rng.random(), 1) for _ in range(200)]  # many ties
    assert M.auc(labels, scores) == pytest.approx(ref_auc(labels, scores))
    assert M.auc([0, 1, 1], [0.1, 0.5, 0.7]) == pytest.approx(1.0)
    assert M.auc([0, 1, 1], [0.9, 0.5, 0.7]) == pytest.approx(0.0)
    assert M.auc([1, 1], [0.2, 0.3]) != M.auc([1, 1], [0.2, 0.3])  # NaN: one class only


def test_log_loss_hand_computed_and_clipped():
    labels = [1, 0, 1]
    probs = [0.8, 0.4, 0.5]
    expected = -(math.log(0.8) + math.log(0.6) + math.log(0.5)) / 3
    assert M.log_loss(labels, probs) == pytest.approx(expected)
    assert math.isfinite(M.log_loss([1, 0], [0.0, 1.0]))  # clipped, not infinite


def test_non_finite_inputs_and_length_mismatch_raise():
    with pytest.raises(ValueError, match="NaN"):
        M.auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="same length"):
        M.grouped_auc([0, 1], [0.1, 0.2], ["a"])


# ---- GAUC ----------------------------------------------------------------------------------
def test_grouped_auc_weights_by_group_size_and_skips_single_class_groups():
    labels = [1, 0, 0, 1, 0, 1, 1, 0, 0]
    scores = [0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.4, 0.4, 0.1]
    groups = ["a", "a", "a", "b", "b", "c", "c", "d", "d"]
    # a: AUC 1 over 3 rows; b: AUC 0 over 2 rows; c: all positive (skipped); d: all negative
    result = M.grouped_auc(labels, scores, groups)
    assert result.value == pytest.approx((1.0 * 3 + 0.0 * 2) / 5)
    assert (result.groups_used, result.groups_skipped, result.samples_used) == (2, 2, 5)
    assert result.value == pytest.approx(ref_gauc(labels, scores, groups))


def test_grouped_auc_random_with_ties_matches_reference():
    rng = random.Random(11)
    n = 300
    groups = [f"r{rng.randrange(40)}" for _ in range(n)]
    labels = [int(rng.random() < 0.25) for _ in range(n)]
    scores = [rng.choice([0.1, 0.2, 0.3, 0.5]) for _ in range(n)]
    assert M.grouped_auc(labels, scores, groups).value == pytest.approx(
        ref_gauc(labels, scores, groups))
    # integer/bytes group keys behave the same as strings
    as_bytes = [g.encode() for g in groups]
    assert M.grouped_auc(labels, scores, as_bytes).value == pytest.approx(
        ref_gauc(labels, scores, groups))


def test_grouped_auc_all_groups_single_class_is_nan():
    result = M.grouped_auc([1, 1, 0], [0.1, 0.2, 0.3], ["a", "a", "b"])
    assert math.isnan(result.value) and result.groups_used == 0 and result.groups_skipped == 2


# ---- NDCG / MRR / HIT ----------------------------------------------------------------------
def test_ranking_metrics_hand_computed():
    # request a: scores rank c2 (rel 0), c1 (rel 1), c3 (rel 0) -> first hit at rank 2
    rel = [1, 0, 0, 0, 0, 1]
    scores = [0.5, 0.9, 0.1, 0.3, 0.2, 0.8]
    groups = ["a", "a", "a", "b", "b", "b"]
    result = M.ranking_metrics(rel, scores, groups, ks=(1, 5), hit_ks=(1, 2))
    assert result.values["ndcg@5"] == pytest.approx(((1 / math.log2(3)) + 1.0) / 2)
    assert result.values["ndcg@1"] == pytest.approx(0.5)
    assert result.values["mrr"] == pytest.approx((0.5 + 1.0) / 2)
    assert result.values["hit@1"] == pytest.approx(0.5)
    assert result.values["hit@2"] == pytest.approx(1.0)
    assert (result.requests_used, result.requests_skipped) == (2, 0)


def test_ranking_ties_keep_listed_order_and_no_click_requests_are_skipped():
    rel = [0, 1, 0, 0, 0]
    scores = [0.5, 0.5, 0.5, 0.2, 0.1]
    groups = [7, 7, 7, 8, 8]  # request 8 has no relevant candidate
    result = M.ranking_metrics(rel, scores, groups, ks=(5,), hit_ks=(1,))
    # all tied: listed order, the clicked candidate is second
    assert result.values["mrr"] == pytest.approx(0.5)
    assert result.values["hit@1"] == pytest.approx(0.0)
    assert result.values["ndcg@5"] == pytest.approx(1 / math.log2(3))
    assert (result.requests_used, result.requests_skipped) == (1, 1)


def test_ranking_metrics_graded_relevance_random_against_reference():
    rng = random.Random(5)
    rel, scores, groups = [], [], []
    for r in range(30):
        for _ in range(rng.randint(1, 12)):
            rel.append(rng.choice([0, 0, 0, 1, 2, 3]))
            scores.append(rng.choice([0.1, 0.2, 0.4, 0.8, 0.9]))
            groups.append(f"q{r}")
    # interleave the rows of different requests: grouping must not depend on contiguity
    order = list(range(len(rel)))
    rng.shuffle(order)
    rel_s = [rel[i] for i in order]
    scores_s = [scores[i] for i in order]
    groups_s = [groups[i] for i in order]
    result = M.ranking_metrics(rel_s, scores_s, groups_s, ks=(5, 10), hit_ks=(1, 5))
    per = {}
    for y, s, g in zip(rel_s, scores_s, groups_s):
        per.setdefault(g, ([], []))
        per[g][0].append(y)
        per[g][1].append(s)
    used = [v for v in per.values() if any(y > 0 for y in v[0])]
    for k in (5, 10):
        expected = sum(ref_ndcg(y, s, k) for y, s in used) / len(used)
        assert result.values[f"ndcg@{k}"] == pytest.approx(expected)
    assert result.values["mrr"] == pytest.approx(sum(ref_mrr(y, s) for y, s in used) / len(used))
    for k in (1, 5):
        assert result.values[f"hit@{k}"] == pytest.approx(
            sum(ref_hit(y, s, k) for y, s in used) / len(used))
    assert result.requests_used == len(used)
    assert result.requests_skipped == len(per) - len(used)


def test_perfect_and_reversed_rankings():
    rel = np.array([2, 1, 0, 0])
    perfect = M.ranking_metrics(rel, [4, 3, 2, 1], [0] * 4)
    reversed_ = M.ranking_metrics(rel, [1, 2, 3, 4], [0] * 4)
    assert perfect.values["ndcg@5"] == pytest.approx(1.0)
    assert reversed_.values["ndcg@5"] < 0.6
    assert reversed_.values["mrr"] == pytest.approx(1 / 3)


def test_lift_captured():
    assert M.lift_captured(0.7, 0.9) == pytest.approx(0.5)
    assert M.lift_captured(0.5, 0.9) == pytest.approx(0.0)
    assert math.isnan(M.lift_captured(0.7, 0.5))


# ---- calibration and top-k objectives ----------------------------------------------------------
def _ece_reference(labels, predictions, bins=15):
    """Plain-Python ECE: equal-width bins over [0, 1], the last bin closed."""
    total, n = 0.0, len(labels)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [(y, p) for y, p in zip(labels, predictions)
                   if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if members:
            mean_y = sum(y for y, _ in members) / len(members)
            mean_p = sum(p for _, p in members) / len(members)
            total += len(members) / n * abs(mean_p - mean_y)
    return total


def test_expected_calibration_error_hand_computed_and_against_reference():
    # two bins used: {0.1, 0.1} with labels {0, 1}; {0.9} with label 1
    assert M.expected_calibration_error([0, 1, 1], [0.1, 0.1, 0.9], bins=2) == pytest.approx(
        2 / 3 * 0.4 + 1 / 3 * 0.1)
    rng = np.random.default_rng(5)
    p = rng.random(500)
    p[:5] = [0.0, 1.0, 1 / 15, 2 / 15, 0.5]  # edges
    y = (rng.random(500) < p ** 1.5).astype(float)
    assert M.expected_calibration_error(y, p) == pytest.approx(_ece_reference(y, p), abs=1e-12)
    # perfectly calibrated in every bin -> 0
    assert M.expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0


def test_reliability_bins_and_relative_error_for_unbounded_values():
    rb = M.reliability_bins([0, 1, 1, 1], [0.05, 0.1, 0.92, 0.95], bins=10)
    np.testing.assert_array_equal(rb.count, [1, 1, 2])
    np.testing.assert_allclose(rb.mean_prediction, [0.05, 0.1, 0.935])
    np.testing.assert_allclose(rb.mean_label, [0.0, 1.0, 1.0])
    seconds = np.array([1.0, 2.0, 3.0, 40.0])
    watched = np.array([0.0, 2.0, 3.0, 60.0])
    mean = watched.mean()
    ece = M.expected_calibration_error(watched, seconds, bins=2, relative_to=mean)
    # equal-mass bins {1, 2} and {3, 40}: gaps |1.5 - 1| and |21.5 - 31.5|
    assert ece == pytest.approx((0.5 * 0.5 + 0.5 * 10.0) / mean)


def test_top_k_mean_sum_against_reference():
    rng = np.random.default_rng(6)
    groups = np.repeat(np.arange(30), 7)
    scores = rng.integers(0, 4, len(groups)).astype(float)  # ties keep the listed order
    values = rng.random(len(groups))
    expected = []
    for g in range(30):
        idx = np.flatnonzero(groups == g)
        order = sorted(idx, key=lambda i: (-scores[i], i))[:3]
        expected.append(values[order].sum())
    assert M.top_k_mean_sum(values, scores, groups, 3) == pytest.approx(np.mean(expected))
