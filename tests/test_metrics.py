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
