"""Point-in-time behaviour sequences of a search request: one builder for training and serving.

The Beam pipeline (preprocessing/pipeline.py) builds every training example's sequences with
`join_request`; the serving client (serving/client.py) builds a live request's sequences with
the same function from the feature store's history (and, for lifelong histories, the behaviour
index's stage-1 selection). What shapes the result (sequence lengths, long-term mode, stage-1 K
and threshold) is read from `common.features.DatasetMetadata`, recorded by preprocessing, so
the two paths cannot disagree on a setting.

Order: a user's behaviours are sorted ascending by (timestamp, item, source, engagement): a total
order, so the result does not depend on the order of the input logs, and the feature store
(common/feature_store.py) keeps the same order for equal timestamps. For a request at time t the
history is the prefix with timestamp < t (binary search, `side="left"`): a behaviour at exactly
t (e.g. the request's own search click logged in the same millisecond) or later never enters
the request's sequences.

* real-time sequence: the last `real_time_length` behaviours before t, most recent first;
* long-term sequence, mode "recent": the last `long_term_length` behaviours before t, most
  recent first; mode "stage1": the top-`stage1_k` of the whole history before t by
  cosine(query embedding, item content embedding), only those >= `stage1_threshold` when set
  (common.relevance.stage1_top_k, ties to the more recent), still most recent first.
Every behaviour carries the stored fields of `common.features.STORED_SEQ_FIELDS` and its time
gap in seconds before the request (> 0).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from common import features as F
from common.relevance import stage1_top_k


class BehaviourRow(NamedTuple):
    """One resolved behaviour (vocabulary indices). The first four fields are the sort key."""

    timestamp_ms: int
    item: int
    source: int
    engagement: Tuple[float, ...]
    author: int
    category: Tuple[int, ...]

    def sort_key(self):
        return (self.timestamp_ms, self.item, self.source, tuple(self.engagement))

    def to_json(self) -> Dict[str, Any]:
        return {"timestamp_ms": int(self.timestamp_ms), "item": int(self.item),
                "source": int(self.source), "engagement": [float(v) for v in self.engagement],
                "author": int(self.author), "category": [int(c) for c in self.category]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "BehaviourRow":
        return cls(int(d["timestamp_ms"]), int(d["item"]), int(d["source"]),
                   tuple(d["engagement"]), int(d["author"]), tuple(d["category"]))


class UserHistory(NamedTuple):
    """A user's behaviours as columns, ascending in time (see the module docstring):
    `timestamp_ms` int64 [L] and one column per stored sequence field (item, author, category
    [L, LEVELS], engagement [L, ENGAGEMENT_DIM], source), keyed by field name."""

    timestamp_ms: np.ndarray
    columns: Dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.timestamp_ms.shape[0])

    @property
    def item(self) -> np.ndarray:
        return self.columns[F.SEQ_ITEM]


def _field_shape(field: str, n: int) -> Tuple[int, ...]:
    width = F.SEQ_FIELD_WIDTH[field]
    return (n,) if width == 1 else (n, width)


def make_history(timestamp_ms, columns: Mapping[str, Any]) -> UserHistory:
    """A UserHistory from a time column and the stored field columns, validated: every stored
    field present, as many rows as timestamps, of its width; rows already in time order."""
    times = np.asarray(timestamp_ms, np.int64).reshape(-1)
    n = times.shape[0]
    missing = [f for f in F.STORED_SEQ_FIELDS if f not in columns]
    if missing:
        raise ValueError(f"history lacks the behaviour fields {missing}")
    out = {}
    for field in F.STORED_SEQ_FIELDS:
        column = np.asarray(columns[field], F.SEQ_FIELD_DTYPE[field])
        if column.size != int(np.prod(_field_shape(field, n))):
            raise ValueError(f"history field {field!r} has {column.size} values for {n} "
                             f"behaviours of width {F.SEQ_FIELD_WIDTH[field]}")
        out[field] = column.reshape(_field_shape(field, n))
    if n > 1 and np.any(np.diff(times) < 0):
        raise ValueError("history rows must be ascending in time (oldest first)")
    return UserHistory(times, out)


def sort_behaviours(rows: Iterable[BehaviourRow]
                    ) -> Tuple[List[BehaviourRow], List[BehaviourRow]]:
    """(unique rows in time order, exact duplicates removed). Duplicates are rows identical in
    the sort key (a logging retry); the first copy is kept."""
    ordered = sorted((BehaviourRow(*r) for r in rows), key=BehaviourRow.sort_key)
    unique: List[BehaviourRow] = []
    duplicates: List[BehaviourRow] = []
    for row in ordered:
        if unique and unique[-1].sort_key() == row.sort_key():
            duplicates.append(row)
        else:
            unique.append(row)
    return unique, duplicates


def to_history(rows: Sequence[BehaviourRow]) -> UserHistory:
    """Columns of rows already in time order (sort_behaviours)."""
    n = len(rows)
    return make_history(
        np.fromiter((r.timestamp_ms for r in rows), np.int64, n),
        {F.SEQ_ITEM: np.fromiter((r.item for r in rows), np.int64, n),
         F.SEQ_SOURCE: np.fromiter((r.source for r in rows), np.int64, n),
         F.SEQ_ENGAGEMENT: np.asarray([r.engagement for r in rows], np.float32),
         F.SEQ_AUTHOR: np.fromiter((r.author for r in rows), np.int64, n),
         F.SEQ_CATEGORY: np.asarray([r.category for r in rows], np.int64)})


# The feature store's behaviour arrays (common.feature_store.BEHAVIOUR_ARRAYS) per field.
STORE_COLUMNS = {F.SEQ_ITEM: "item_index", F.SEQ_AUTHOR: "author_index",
                 F.SEQ_CATEGORY: "category", F.SEQ_ENGAGEMENT: "engagement",
                 F.SEQ_SOURCE: "source"}


def history_from_store(arrays: Mapping[str, Any]) -> UserHistory:
    """A UserHistory from `FeatureStore.behaviours_before` arrays (most recent first)."""
    return make_history(np.asarray(arrays["timestamp_ms"])[::-1],
                        {field: np.asarray(arrays[column])[::-1]
                         for field, column in STORE_COLUMNS.items()})


def history_from_behaviours(rows: Sequence[Mapping[str, Any]]) -> UserHistory:
    """A UserHistory from behaviour dicts, most recent first (`FeatureStore.behaviours`, the
    `serving.client.FeatureStoreView` protocol): timestamp_ms and the STORE_COLUMNS keys."""
    arrays = {"timestamp_ms": np.asarray([int(r["timestamp_ms"]) for r in rows], np.int64)}
    for field, column in STORE_COLUMNS.items():
        arrays[column] = np.asarray([r[column] for r in rows], F.SEQ_FIELD_DTYPE[field])
    return history_from_store(arrays)


def positions_before(history: UserHistory, request_ms: int) -> int:
    """Number of behaviours strictly before request_ms (they are history[:n])."""
    return int(np.searchsorted(history.timestamp_ms, int(request_ms), side="left"))


def most_recent(history: UserHistory, request_ms: int, length: int) -> np.ndarray:
    """Positions of the last `length` behaviours before request_ms, most recent first."""
    n = positions_before(history, request_ms)
    return np.arange(n - 1, max(n - length, 0) - 1, -1, dtype=np.int64)


def stage1_positions(history: UserHistory, request_ms: int, query_embedding,
                     item_embeddings: np.ndarray, k: int,
                     threshold: Optional[float] = None) -> np.ndarray:
    """RSU stage 1 over the whole history before request_ms: positions, most recent first."""
    if item_embeddings is None or query_embedding is None:
        raise ValueError("stage1 mode needs the query embedding and the item embedding table")
    before = most_recent(history, request_ms, len(history))
    if before.size == 0:
        return before
    chosen = stage1_top_k(query_embedding, item_embeddings[history.item[before]], k, threshold)
    return before[chosen]


def long_term_positions(history: UserHistory, request_ms: int, metadata: F.DatasetMetadata,
                        query_embedding=None, item_embeddings: Optional[np.ndarray] = None
                        ) -> np.ndarray:
    """Positions in `history` of the long-term sequence, most recent first."""
    if metadata.long_term_mode == "recent":
        return most_recent(history, request_ms, metadata.long_term_length)
    return stage1_positions(history, request_ms, query_embedding, item_embeddings,
                            metadata.stage1_k, metadata.stage1_threshold)


def sequence_features(history: UserHistory, positions: np.ndarray, sequence: str,
                      request_ms: int) -> Dict[str, np.ndarray]:
    """The `<sequence>_<field>` features of common.features for the given positions."""
    positions = np.asarray(positions, np.int64)
    gaps = (int(request_ms) - history.timestamp_ms[positions]) / 1000.0
    if gaps.size and not np.all(gaps > 0):  # the join's invariant, checked on every example
        raise AssertionError(f"behaviour at or after the request time {request_ms} selected")
    out = {F.seq_feature(sequence, field): history.columns[field][positions]
           for field in F.STORED_SEQ_FIELDS}
    out[F.seq_feature(sequence, F.SEQ_TIME_GAP)] = gaps.astype(np.float32)
    return out


def join_request(history: UserHistory, request_ms: int, metadata: F.DatasetMetadata,
                 query_embedding=None, item_embeddings: Optional[np.ndarray] = None,
                 long_term: Optional[Tuple[UserHistory, np.ndarray]] = None
                 ) -> Dict[str, np.ndarray]:
    """Both sequences of one request as make_example features.

    `long_term`, when given, is a precomputed (history, positions) of the long-term sequence:
    the serving behaviour index's stage-1 selection over a lifelong history, which has the same
    semantics as `stage1_positions` (tested against it) without loading the whole history.
    """
    if long_term is None:
        long_term = (history, long_term_positions(history, request_ms, metadata,
                                                  query_embedding, item_embeddings))
    out = sequence_features(long_term[0], long_term[1], F.LONG_TERM, request_ms)
    out.update(sequence_features(
        history, most_recent(history, request_ms, metadata.real_time_length), F.REAL_TIME,
        request_ms))
    return out
