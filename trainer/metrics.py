"""Offline ranking metrics over flattened candidates (NumPy / pandas).

Inputs are 1-D arrays with one entry per *real* candidate (padding already removed) plus the
group key of each candidate (request id or user id).

Why hand-written: scikit-learn is not part of the pinned stack, `tf.keras.metrics.AUC`
approximates AUC with a fixed number of thresholds (200 by default), which is too coarse for
per-request AUC over ten candidates, and there is no grouped AUC (GAUC) or per-request
NDCG/MRR/HIT in the stack. These implementations are exact, vectorised (pandas group-by ranks)
and are checked against plain-Python references in tests/test_metrics.py.

Conventions
-----------
* AUC is the Mann-Whitney statistic with tied scores counted as one half (average ranks), i.e.
  the probability that a random positive outranks a random negative. A one-class input has no
  AUC: `auc` returns NaN.
* GAUC (grouped AUC, as in DIN/TWIN): the AUC of every group that has both a positive and a
  negative, averaged with weights equal to the group's number of candidates. Groups with a
  single class (no click at all, or all clicked) carry no ranking information and are skipped;
  how many were used and skipped is returned so that it can be reported.
* Ranking metrics (NDCG@k, MRR, HIT@k) are computed per request over its candidate list and
  averaged over requests that have at least one relevant candidate (relevance > 0); requests
  without one are skipped and counted. Candidates are sorted by descending score; tied scores
  keep the order in which the candidates were listed (a stable sort), so the result never
  depends on the labels.
* NDCG uses the exponential gain 2^rel - 1 and discount 1 / log2(rank + 1) (rank from 1); with
  0/1 labels the gain is the label itself. Graded relevance (e.g. click + long_view + like)
  can be passed instead of the click label.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

EPSILON = 1e-7


def _as_1d(x, name: str, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(x, dtype=dtype).reshape(-1)
    if dtype is np.float64 and arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_same_length(**arrays) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def auc(labels, scores) -> float:
    """Exact ROC AUC (ties count 1/2); NaN when only one class is present."""
    y = _as_1d(labels, "labels") > 0.5
    s = _as_1d(scores, "scores")
    _check_same_length(labels=y, scores=s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    import pandas as pd

    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels, probabilities, eps: float = EPSILON) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps]."""
    y = _as_1d(labels, "labels")
    p = np.clip(_as_1d(probabilities, "probabilities"), eps, 1.0 - eps)
    _check_same_length(labels=y, probabilities=p)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


@dataclasses.dataclass
class GroupedAuc:
    value: float  # NaN when no group has both classes
    groups_used: int
    groups_skipped: int  # single-class groups
    samples_used: int


def grouped_auc(labels, scores, groups) -> GroupedAuc:
    """GAUC: per-group AUC weighted by group sample count; single-class groups skipped."""
    import pandas as pd

    y = (_as_1d(labels, "labels") > 0.5).astype(np.float64)
    s = _as_1d(scores, "scores")
    g = np.asarray(groups).reshape(-1)
    _check_same_length(labels=y, scores=s, groups=g)
    if len(y) == 0:
        return GroupedAuc(float("nan"), 0, 0, 0)
    df = pd.DataFrame({"g": g, "y": y, "s": s})
    df["r"] = df.groupby("g", sort=False)["s"].rank(method="average")
    df["rpos"] = df["r"] * df["y"]
    agg = df.groupby("g", sort=False).agg(n=("y", "size"), pos=("y", "sum"), rpos=("rpos", "sum"))
    neg = agg["n"] - agg["pos"]
    valid = (agg["pos"] > 0) & (neg > 0)
    used = agg[valid]
    if used.empty:
        return GroupedAuc(float("nan"), 0, int(len(agg)), 0)
    group_auc = (used["rpos"] - used["pos"] * (used["pos"] + 1) / 2.0) / (used["pos"] * neg[valid])
    value = float(np.average(group_auc.to_numpy(), weights=used["n"].to_numpy()))
    return GroupedAuc(value, int(valid.sum()), int((~valid).sum()), int(used["n"].sum()))


@dataclasses.dataclass
class RankingMetrics:
    values: Dict[str, float]  # e.g. {"ndcg@5": ..., "mrr": ..., "hit@1": ...}
    requests_used: int
    requests_skipped: int  # no relevant candidate


def _ranked_lists(relevance: np.ndarray, scores: np.ndarray, groups: np.ndarray):
    """Yields (relevance sorted by descending score, stable) for every group, in first-seen
    order."""
    # Sort by group (first appearance order), then by -score; lexsort is stable, so ties keep
    # the listed order of the candidates.
    _, first_index, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_order = np.argsort(np.argsort(first_index))[inverse]
    order = np.lexsort((np.arange(len(scores)), -scores, group_order))
    sorted_groups = group_order[order]
    bounds = np.flatnonzero(np.diff(sorted_groups)) + 1
    return np.split(relevance[order], bounds)


def ranking_metrics(relevance, scores, groups, ks: Sequence[int] = (5, 10),
                    hit_ks: Sequence[int] = (1, 5, 10)) -> RankingMetrics:
    """Mean NDCG@k, MRR and HIT@k over requests that have at least one relevant candidate."""
    rel = _as_1d(relevance, "relevance")
    s = _as_1d(scores, "scores")
    g = np.asarray(groups).reshape(-1)
    _check_same_length(relevance=rel, scores=s, groups=g)
    if np.any(rel < 0):
        raise ValueError("relevance must be >= 0")
    names = [f"ndcg@{k}" for k in ks] + ["mrr"] + [f"hit@{k}" for k in hit_ks]
    if len(rel) == 0:
        return RankingMetrics({n: float("nan") for n in names}, 0, 0)
    sums = {n: 0.0 for n in names}
    used = skipped = 0
    discounts = 1.0 / np.log2(np.arange(2, len(rel) + 2))
    for ranked in _ranked_lists(rel, s, g):
        if not np.any(ranked > 0):
            skipped += 1
            continue
        used += 1
        gains = np.power(2.0, ranked) - 1.0
        ideal = np.sort(gains)[::-1]
        for k in ks:
            dcg = float(np.sum(gains[:k] * discounts[:min(k, len(gains))]))
            idcg = float(np.sum(ideal[:k] * discounts[:min(k, len(ideal))]))
            sums[f"ndcg@{k}"] += dcg / idcg
        first = int(np.argmax(ranked > 0))
        sums["mrr"] += 1.0 / (first + 1)
        for k in hit_ks:
            sums[f"hit@{k}"] += float(first < k)
    values = {n: (sums[n] / used if used else float("nan")) for n in names}
    return RankingMetrics(values, used, skipped)


def lift_captured(value: float, oracle_value: float, random_value: float = 0.5) -> float:
    """Share of the oracle's lift over random that a model captures: (v - r) / (oracle - r)."""
    denominator = oracle_value - random_value
    if not np.isfinite(denominator) or abs(denominator) < 1e-12 or not np.isfinite(value):
        return float("nan")
    return float((value - random_value) / denominator)


def task_metrics(labels, predictions, request_ids, user_ids) -> Dict[str, float]:
    """AUC, log loss, GAUC by request and by user of one task (flattened candidates)."""
    by_request = grouped_auc(labels, predictions, request_ids)
    by_user = grouped_auc(labels, predictions, user_ids)
    y = _as_1d(labels, "labels")
    return {
        "auc": auc(labels, predictions),
        "logloss": log_loss(labels, predictions),
        "gauc_request": by_request.value,
        "gauc_user": by_user.value,
        "gauc_request_groups": by_request.groups_used,
        "gauc_request_groups_skipped": by_request.groups_skipped,
        "gauc_user_groups": by_user.groups_used,
        "gauc_user_groups_skipped": by_user.groups_skipped,
        "positives": int((y > 0.5).sum()),
        "candidates": int(len(y)),
    }


def all_metrics(labels: Dict[str, np.ndarray], predictions: Dict[str, np.ndarray],
                ranking_scores: np.ndarray, request_ids, user_ids,
                tasks: Iterable[str], ks=(5, 10), hit_ks=(1, 5, 10),
                graded_relevance: Optional[np.ndarray] = None) -> Dict[str, object]:
    """Every offline metric of one model (or the oracle) on flattened candidates.

    Ranking metrics use `ranking_scores` (the fused score the service ranks by) against the
    click label (first task), and against `graded_relevance` when given.
    """
    tasks = list(tasks)
    out: Dict[str, object] = {"tasks": {t: task_metrics(labels[t], predictions[t], request_ids,
                                                        user_ids) for t in tasks}}
    ranking = ranking_metrics(labels[tasks[0]], ranking_scores, request_ids, ks, hit_ks)
    out["ranking"] = dict(ranking.values, requests_used=ranking.requests_used,
                          requests_skipped=ranking.requests_skipped, relevance=tasks[0])
    if graded_relevance is not None:
        graded = ranking_metrics(graded_relevance, ranking_scores, request_ids, ks, hit_ks)
        out["ranking_graded"] = dict(graded.values, requests_used=graded.requests_used,
                                     requests_skipped=graded.requests_skipped,
                                     relevance="+".join(tasks))
    return out


# ---- calibration ---------------------------------------------------------------------------
ECE_BINS = 15  # Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017)


@dataclasses.dataclass
class ReliabilityBins:
    """One row per non-empty bin: candidates, mean prediction, mean label, bin edges."""

    count: np.ndarray
    mean_prediction: np.ndarray
    mean_label: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def reliability_bins(labels, predictions, bins: int = ECE_BINS, equal_mass: bool = False
                     ) -> ReliabilityBins:
    """Bins of a reliability diagram: equal-width bins over [0, 1] (probabilities), or
    equal-mass bins over the predictions' quantiles (`equal_mass`, for unbounded values such
    as the expected watch time). A value on an inner edge belongs to the upper bin."""
    y = _as_1d(labels, "labels")
    p = _as_1d(predictions, "predictions")
    _check_same_length(labels=y, predictions=p)
    if equal_mass:
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, bins + 1))) if len(p) else \
            np.array([0.0, 1.0])
    else:
        edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    count = np.bincount(index, minlength=len(edges) - 1)
    sum_p = np.bincount(index, weights=p, minlength=len(edges) - 1)
    sum_y = np.bincount(index, weights=y, minlength=len(edges) - 1)
    kept = count > 0
    return ReliabilityBins(count[kept], sum_p[kept] / count[kept], sum_y[kept] / count[kept],
                           edges[:-1][kept], edges[1:][kept])


def expected_calibration_error(labels, predictions, bins: int = ECE_BINS,
                               relative_to: Optional[float] = None) -> float:
    """ECE = sum over bins of (bin share) * |mean prediction - mean label|.

    Probabilities use equal-width bins over [0, 1]. With `relative_to` (a real-valued target
    such as watch time) the bins are equal-mass and the error is divided by that value (e.g.
    the mean label), so it reads as a fraction of it.
    """
    rb = reliability_bins(labels, predictions, bins, equal_mass=relative_to is not None)
    total = rb.count.sum()
    if total == 0:
        return float("nan")
    gap = float(np.sum(rb.count * np.abs(rb.mean_prediction - rb.mean_label)) / total)
    return gap / relative_to if relative_to is not None else gap


# ---- objectives of a ranking: what the top of each list is worth -----------------------------
def top_k_mean_sum(values, scores, groups, k: int = 10) -> float:
    """Mean over requests of the sum of `values` over the k highest-scored candidates of the
    request (ties keep the listed order). With values = p(click) this is the expected clicks in
    the top k, with values = expected watch time the expected watch time of the top k."""
    v = _as_1d(values, "values")
    s = _as_1d(scores, "scores")
    g = np.asarray(groups).reshape(-1)
    _check_same_length(values=v, scores=s, groups=g)
    if len(v) == 0:
        return float("nan")
    lists = _ranked_lists(v, s, g)
    return float(np.mean([float(np.sum(ranked[:k])) for ranked in lists]))
