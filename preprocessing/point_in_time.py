"""Point-in-time join of a search request with its user's behaviours.

A user's behaviours are sorted ascending by (timestamp, item_index, source, engagement): a total
order, so the result does not depend on the order of the input logs, and the feature store
(common/feature_store.py) keeps the same order for equal timestamps. For a request at time t
the history is the prefix with timestamp < t (binary search, `side="left"`): a behaviour at
exactly t (e.g. the request's own search click logged in the same millisecond) or later never
enters the request's sequences.

* real-time sequence: the last `real_time_length` behaviours before t, most recent first;
* long-term sequence, mode "recent": the last `long_term_length` behaviours before t, most
  recent first; mode "stage1": the top-K1 of the whole history before t by
  cosine(query embedding, item content embedding) (common.relevance.stage1_top_k, ties to the
  more recent), still most recent first.
Every behaviour carries item/author/category indices, its engagement vector, its source and its
time gap in seconds before the request (> 0).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from common import features as F
from common.relevance import stage1_top_k

# One resolved behaviour: (timestamp_ms, item_index, source, engagement tuple, author_index,
# category indices tuple). The first four fields are the sort key.
Behaviour = Tuple[int, int, int, Tuple[float, ...], int, Tuple[int, ...]]


class UserHistory(NamedTuple):
    """A user's behaviours as columns, ascending in time (see the module docstring)."""

    timestamp_ms: np.ndarray  # int64 [L]
    item: np.ndarray  # int64 [L]
    author: np.ndarray  # int64 [L]
    category: np.ndarray  # int64 [L, NUM_CATEGORY_LEVELS]
    engagement: np.ndarray  # float32 [L, ENGAGEMENT_DIM]
    source: np.ndarray  # int64 [L]

    def __len__(self) -> int:
        return int(self.timestamp_ms.shape[0])


def sort_behaviours(rows: Iterable[Behaviour]) -> Tuple[List[Behaviour], List[Behaviour]]:
    """(unique rows in time order, exact duplicates removed). Duplicates are rows identical in
    every field (a logging retry); the first copy is kept."""
    ordered = sorted(rows, key=lambda r: (r[0], r[1], r[2], tuple(r[3])))
    unique: List[Behaviour] = []
    duplicates: List[Behaviour] = []
    for row in ordered:
        if unique and tuple(unique[-1][:4]) == tuple(row[:4]):
            duplicates.append(row)
        else:
            unique.append(row)
    return unique, duplicates


def to_history(rows: Sequence[Behaviour]) -> UserHistory:
    """Columns of rows already in time order (sort_behaviours)."""
    n = len(rows)
    return UserHistory(
        timestamp_ms=np.fromiter((r[0] for r in rows), np.int64, n),
        item=np.fromiter((r[1] for r in rows), np.int64, n),
        source=np.fromiter((r[2] for r in rows), np.int64, n),
        engagement=np.asarray([r[3] for r in rows], np.float32).reshape(n, F.ENGAGEMENT_DIM),
        author=np.fromiter((r[4] for r in rows), np.int64, n),
        category=np.asarray([r[5] for r in rows], np.int64).reshape(n, F.NUM_CATEGORY_LEVELS))


def positions_before(history: UserHistory, request_ms: int) -> int:
    """Number of behaviours strictly before request_ms (they are history[:n])."""
    return int(np.searchsorted(history.timestamp_ms, int(request_ms), side="left"))


def select_long_term(history: UserHistory, request_ms: int, length: int, mode: str = "recent",
                     query_embedding=None, item_embeddings: Optional[np.ndarray] = None,
                     k: Optional[int] = None, threshold: Optional[float] = None) -> np.ndarray:
    """Positions in `history` of the long-term sequence, most recent first."""
    n = positions_before(history, request_ms)
    if mode == "recent":
        return np.arange(n - 1, max(n - length, 0) - 1, -1, dtype=np.int64)
    if mode != "stage1":
        raise ValueError(f"unknown long-term mode {mode!r}; expected recent or stage1")
    if item_embeddings is None or query_embedding is None:
        raise ValueError("stage1 mode needs the query embedding and the item embedding table")
    before = np.arange(n - 1, -1, -1, dtype=np.int64)  # most recent first
    if n == 0:
        return before
    chosen = stage1_top_k(query_embedding, item_embeddings[history.item[before]],
                          length if k is None else k, threshold)
    return before[chosen]


def select_real_time(history: UserHistory, request_ms: int, length: int) -> np.ndarray:
    n = positions_before(history, request_ms)
    return np.arange(n - 1, max(n - length, 0) - 1, -1, dtype=np.int64)


def sequence_features(history: UserHistory, positions: np.ndarray, sequence: str,
                      request_ms: int) -> Dict[str, np.ndarray]:
    """The `<sequence>_<field>` features of common.features for the given positions."""
    name = lambda field: F.seq_feature(sequence, field)  # noqa: E731
    gaps = (int(request_ms) - history.timestamp_ms[positions]) / 1000.0
    if gaps.size and not np.all(gaps > 0):  # the join's invariant, checked on every example
        raise AssertionError(f"behaviour at or after the request time {request_ms} selected")
    return {name(F.SEQ_ITEM): history.item[positions],
            name(F.SEQ_AUTHOR): history.author[positions],
            name(F.SEQ_CATEGORY): history.category[positions],
            name(F.SEQ_ENGAGEMENT): history.engagement[positions],
            name(F.SEQ_SOURCE): history.source[positions],
            name(F.SEQ_TIME_GAP): gaps.astype(np.float32)}


def join_request(history: UserHistory, request_ms: int, long_term_length: int,
                 real_time_length: int, mode: str = "recent", query_embedding=None,
                 item_embeddings: Optional[np.ndarray] = None, stage1_k: Optional[int] = None,
                 stage1_threshold: Optional[float] = None) -> Dict[str, np.ndarray]:
    """Both sequences of one request as make_example features."""
    long_pos = select_long_term(history, request_ms, long_term_length, mode, query_embedding,
                                item_embeddings, stage1_k, stage1_threshold)
    rt_pos = select_real_time(history, request_ms, real_time_length)
    out = sequence_features(history, long_pos, F.LONG_TERM, request_ms)
    out.update(sequence_features(history, rt_pos, F.REAL_TIME, request_ms))
    return out
