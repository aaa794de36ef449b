"""Retrieval metrics over a whole corpus (Facebook EBR's offline recall, arXiv 2006.11632).

* recall@K = (clicked items of the requests found in their top K) / (clicked items of the
  requests), pooled over requests (micro average: a request with three clicks counts three
  times). Retrieval is over the whole corpus, not over the logged impression list.
* expected clicks captured@K (generated data): sum over requests of the true p(click) of the
  retrieved K items / sum over requests of the true p(click) of the best K items of the corpus
  for that request; 1 for the oracle that ranks the corpus by p(click).

Inputs are item indices; a retrieved list shorter than K (a source that found fewer items) is
padded with -1, which never matches an item.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import numpy as np

KS = (50, 100, 200, 500)


def pad_lists(lists: Iterable[Sequence[int]], k: int) -> np.ndarray:
    """int64 [R, k]: each list cut to k and padded with -1."""
    lists = list(lists)
    out = np.full((len(lists), k), -1, np.int64)
    for r, items in enumerate(lists):
        items = np.asarray(items, np.int64).reshape(-1)[:k]
        out[r, :items.shape[0]] = items
    return out


def hits_at_k(retrieved: np.ndarray, relevant: Sequence[Sequence[int]], ks=KS
              ) -> Dict[int, np.ndarray]:
    """{K: int64 [R] clicked items of request r within its top K}."""
    retrieved = np.asarray(retrieved, np.int64)
    out = {k: np.zeros(len(relevant), np.int64) for k in ks}
    for r, items in enumerate(relevant):
        items = np.unique(np.asarray(items, np.int64))
        if not items.shape[0]:
            continue
        found = np.isin(retrieved[r], items)
        cumulative = np.cumsum(found)
        for k in ks:
            out[k][r] = int(cumulative[min(k, cumulative.shape[0]) - 1]) if k > 0 else 0
    return out


def recall_at_k(retrieved: np.ndarray, relevant: Sequence[Sequence[int]], ks=KS
                ) -> Dict[str, float]:
    """{"recall@K": pooled recall} (module docstring); requests without clicks add nothing."""
    total = sum(len(np.unique(np.asarray(items, np.int64))) for items in relevant)
    hits = hits_at_k(retrieved, relevant, ks)
    return {f"recall@{k}": (float(hits[k].sum()) / total if total else float("nan"))
            for k in ks}


def expected_clicks_captured(retrieved: np.ndarray, true_probability: np.ndarray, k: int
                             ) -> float:
    """Sum of true p(click) over the retrieved top k / the same sum over the best k items.

    true_probability [R, num_items + 1]: p(click) of every (request, item index) pair; column 0
    (the unknown item) is ignored."""
    p = np.asarray(true_probability, np.float64)
    retrieved = np.asarray(retrieved, np.int64)[:, :k]
    valid = (retrieved > 0) & (retrieved < p.shape[1])
    got = np.where(valid, np.take_along_axis(p, np.where(valid, retrieved, 0), axis=1), 0.0)
    best = -np.partition(-p[:, 1:], k - 1, axis=1)[:, :k] if k < p.shape[1] - 1 else p[:, 1:]
    return float(got.sum() / best.sum()) if best.sum() > 0 else float("nan")


def top_k_by_score(scores: np.ndarray, item_indices: np.ndarray, k: int) -> np.ndarray:
    """int64 [R, k]: the item indices of the k highest scores of each row (ties: lower
    position first). scores [R, M] over the items item_indices [M]."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.asarray(item_indices, np.int64)[np.take_along_axis(top, order, axis=1)]


def summarize(per_source: Dict[str, Dict[str, float]]) -> List[str]:
    """A markdown table of {source: {metric: value}}."""
    metrics = sorted({m for values in per_source.values() for m in values},
                     key=lambda m: (m.split("@")[0], int(m.split("@")[1]) if "@" in m else 0))
    lines = ["| source | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for source, values in per_source.items():
        lines.append(f"| {source} | " + " | ".join(
            f"{values[m]:.4f}" if m in values else "" for m in metrics) + " |")
    return lines
