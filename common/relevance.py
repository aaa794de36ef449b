"""RSU stage 1, the reference definition shared by training data and serving (QIN's RSU).

Stage 1 keeps the K1 behaviours of a user's history most relevant to the query: cosine
similarity between the query's pretrained embedding and each behaviour item's pretrained
embedding, optionally only those with cosine >= threshold (PR2's relevance threshold eps).
Equal cosines are broken by recency: the more recent behaviour wins (re-watched items have the
same vector, so ties are common, not a corner case).

Preprocessing (`--long-term-mode stage1`) calls `stage1_top_k` point in time per request to build
training examples; the serving behaviour index (`serving.behaviour_index`) answers the same
question over whole histories and is tested against this function, so training and serving
select the same behaviours (exactly below the ScaNN size, within the measured recall above it).
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def cosine_to_query(query_emb, behaviour_embs) -> np.ndarray:
    """float32 [L] cosine of each behaviour embedding with the query; zero vectors give 0."""
    query = np.asarray(query_emb, dtype=np.float32).reshape(-1)
    behaviours = np.asarray(behaviour_embs, dtype=np.float32)
    if behaviours.ndim != 2 or behaviours.shape[1] != query.shape[0]:
        raise ValueError(f"behaviour_embs must be [L, {query.shape[0]}], got {behaviours.shape}")
    if not (np.all(np.isfinite(query)) and np.all(np.isfinite(behaviours))):
        raise ValueError("embeddings contain NaN or infinite values")
    q_norm = float(np.linalg.norm(query))
    query = query / q_norm if q_norm > 0 else query
    norms = np.linalg.norm(behaviours, axis=1)
    unit = np.divide(behaviours, norms[:, None], out=np.zeros_like(behaviours),
                     where=norms[:, None] > 0)
    return row_dot(unit, query)


def row_dot(matrix, vector) -> np.ndarray:
    """float32 [L] dot product of each row with `vector`, bit-identical for identical rows.

    A BLAS matrix-vector product may round a row differently depending on where it sits in the
    matrix (blocked kernels), which breaks exact ties between copies of a re-watched item and
    makes training (preprocessing) and serving (the behaviour index) keep different copies.
    An elementwise product reduced along each row does the same operations for every row.
    """
    return np.multiply(matrix, vector, dtype=np.float32).sum(axis=1, dtype=np.float32)


def stage1_top_k(query_emb, behaviour_embs, k: int, threshold: Optional[float] = None
                 ) -> np.ndarray:
    """Indices (int64, ascending) of the top-k behaviours by cosine with the query.

    `behaviour_embs` is [L, D], most recent first (the layout of every behaviour sequence in
    common.features), so a lower index is a more recent behaviour and wins ties. With
    `threshold`, behaviours with cosine < threshold are never selected (fewer than k may be
    returned). The result is ascending, i.e. the kept behaviours most recent first, ready to be
    the long-term sequence.
    """
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    scores = cosine_to_query(query_emb, behaviour_embs)
    candidates = np.arange(scores.shape[0], dtype=np.int64)
    if threshold is not None:
        candidates = candidates[scores >= np.float32(threshold)]
    k = int(k)
    if k >= candidates.shape[0]:
        return candidates
    if k == 0:
        return candidates[:0]
    kept = scores[candidates]
    # O(L) selection: everything above the k-th best cosine, then the most recent of the tied.
    kth = kept[np.argpartition(-kept, k - 1)[k - 1]]
    above = candidates[kept > kth]
    tied = candidates[kept == kth]  # ascending, so the most recent come first
    return np.sort(np.concatenate([above, tied[:k - above.shape[0]]]))
