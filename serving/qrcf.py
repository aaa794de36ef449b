"""QRCF, query-relevant collaborative filtering: PR2's personalised retrieval source
(Kuaishou, arXiv 2409.11281).

PR2 keeps the user's behaviours whose pretrained video embedding is among the top-K most similar
to the query and above a relevance threshold eps, and retrieves videos similar to those
behaviours by item-to-item similarity: only query-relevant behaviours seed the collaborative
filtering. This module is that step at query time.

1. Seeds. The user's behaviours strictly before `now`, most recent first (the feature store's
   order), are scored by cosine between the query embedding and the behaviour item's content
   embedding, and the top `seed_k` with cosine >= `seed_eps` are kept: exactly
   `common.relevance.stage1_top_k`, the RSU stage 1 that builds QIN's training data, so
   retrieval and ranking agree on which behaviours are "about the query" (equal cosines: the
   more recent behaviour wins). A selected behaviour whose item has no embedding (a zero row)
   is counted and skipped.
2. Expansion. Each seed's item brings its `neighbours_per_seed` strongest neighbours from the
   item-to-item table (preprocessing/item_to_item.py, ItemCF-IUF weights).
3. Scoring. score(j) = sum over seeds s reaching j of
       relevance(s) * engagement_weight(s) * i2i(item(s), j),
   relevance(s) = the seed's cosine to the query (>= seed_eps >= 0, so every term is >= 0).
   engagement_weight(s) = engagement_base + sum_k engagement_coefficients[k] * clip(e_k, 0, 1)
   over the behaviour's engagement vector e (metadata.json `engagement_names`: watch ratio, like,
   follow, share for the canonical format; click, follow, cart, order for JDsearch). Clipping
   keeps a replayed video (watch ratio > 1) from outweighing a like; the base keeps a plain
   view a positive vote. With the defaults a skipped view (watch ratio 0.1) weighs 1.1 and a
   full watch with a like 3: deep engagement says more, as in QIN's engagement weighting.
   A behaviour of the same item watched twice seeds twice: repeated interest counts.
4. Filter and rank. A neighbour is kept only if its own cosine to the query is >=
   `min_relevance` (collaborative neighbours of a relevant seed can be off-topic); neighbours
   without an embedding (zero rows) or outside the embedding table are counted and skipped.
   Ranked by score descending (equal scores: lower item index first), at most `max_results`.

Each retrieved item carries the seed behaviours that drove it (position in the history,
item, time, relevance, engagement weight, i2i weight, contribution), strongest first, for
explanation. An unknown user, an empty history, a query without embedding, no relevant
behaviour, no neighbour or no relevant neighbour give an empty result whose `reason` says which
(REASONS), never an exception. Previously seen items are not removed: in search a user may look
for a video they have watched.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from common.relevance import cosine_to_query, stage1_top_k

ItemToItemTable = Mapping[int, Sequence[Tuple[int, float]]]

UNKNOWN_USER = "unknown_user"
EMPTY_HISTORY = "empty_history"
QUERY_WITHOUT_EMBEDDING = "query_without_embedding"
NO_RELEVANT_BEHAVIOURS = "no_relevant_behaviours"
NO_NEIGHBOURS = "no_neighbours"
NO_RELEVANT_NEIGHBOURS = "no_relevant_neighbours"
REASONS = {
    UNKNOWN_USER: "the user is not in the feature store",
    EMPTY_HISTORY: "the user has no behaviour before the request time",
    QUERY_WITHOUT_EMBEDDING: "the query embedding is all zeros (no known query token)",
    NO_RELEVANT_BEHAVIOURS: "no behaviour with an embedding has cosine >= seed_eps to the query",
    NO_NEIGHBOURS: "the relevant behaviours' items have no item-to-item neighbours",
    NO_RELEVANT_NEIGHBOURS: "no neighbour has cosine >= min_relevance to the query",
}


@dataclasses.dataclass(frozen=True)
class QRCFConfig:
    """Settings of QRCF retrieval (see the module docstring for how each is used)."""

    seed_k: int = 20  # K: relevant behaviours kept as seeds (stage1_top_k's k)
    seed_eps: float = 0.3  # eps: a seed's cosine to the query must be >= this
    neighbours_per_seed: int = 50  # strongest i2i neighbours taken from each seed's item
    min_relevance: float = 0.3  # a retrieved item's own cosine to the query must be >= this
    max_results: int = 200
    engagement_base: float = 1.0
    engagement_coefficients: Tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    history_limit: Optional[int] = None  # most recent behaviours considered (None: all)

    def __post_init__(self):
        object.__setattr__(self, "engagement_coefficients",
                           tuple(float(c) for c in self.engagement_coefficients))
        for name in ("seed_k", "neighbours_per_seed", "max_results"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        # relevance multiplies the score, so a negative one would vote against an item
        if not 0.0 <= self.seed_eps <= 1.0:
            raise ValueError(f"seed_eps is a cosine threshold in [0, 1], got {self.seed_eps!r}")
        if not -1.0 <= self.min_relevance <= 1.0:
            raise ValueError(f"min_relevance is a cosine in [-1, 1], got {self.min_relevance!r}")
        if self.engagement_base < 0 or any(c < 0 for c in self.engagement_coefficients):
            raise ValueError("engagement_base and engagement_coefficients must be >= 0")
        if self.engagement_base == 0 and not any(self.engagement_coefficients):
            raise ValueError("engagement weights would all be 0: set engagement_base > 0")
        if self.history_limit is not None and self.history_limit < 1:
            raise ValueError(f"history_limit must be >= 1 or None, got {self.history_limit!r}")


def engagement_weight(engagement, config: QRCFConfig = QRCFConfig()) -> np.ndarray:
    """float64 [L]: engagement_base + sum_k coefficients[k] * clip(engagement[:, k], 0, 1)."""
    engagement = np.asarray(engagement, np.float64)
    coefficients = np.asarray(config.engagement_coefficients, np.float64)
    if engagement.ndim != 2 or engagement.shape[1] != coefficients.shape[0]:
        raise ValueError(f"engagement must be [L, {coefficients.shape[0]}] (one value per "
                         f"engagement coefficient), got shape {engagement.shape}")
    return config.engagement_base + np.clip(engagement, 0.0, 1.0) @ coefficients


@dataclasses.dataclass(frozen=True)
class SeedBehaviour:
    """A behaviour kept by the seed step."""

    position: int  # in the history, most recent first (stage1_top_k's index)
    item_index: int
    timestamp_ms: Optional[int]
    relevance: float  # cosine to the query
    engagement_weight: float


@dataclasses.dataclass(frozen=True)
class SeedContribution:
    seed: SeedBehaviour
    i2i_weight: float
    contribution: float  # relevance * engagement_weight * i2i_weight


@dataclasses.dataclass(frozen=True)
class RetrievedItem:
    item_index: int
    score: float
    relevance: float  # the item's own cosine to the query
    seeds: Tuple[SeedContribution, ...]  # strongest contribution first


@dataclasses.dataclass
class QRCFResult:
    """Ranked items (empty with a `reason` from REASONS when nothing could be retrieved), the
    seed step's output and counts of what was skipped."""

    items: List[RetrievedItem]
    reason: Optional[str] = None
    seed_positions: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0,), np.int64))  # stage1_top_k's output
    seeds: List[SeedBehaviour] = dataclasses.field(default_factory=list)
    counts: Dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def item_indices(self) -> List[int]:
        return [item.item_index for item in self.items]

    @property
    def explanation(self) -> Optional[str]:
        return None if self.reason is None else REASONS[self.reason]


def _empty(reason: str, counts: Dict[str, int], **fields: Any) -> QRCFResult:
    return QRCFResult(items=[], reason=reason, counts=counts, **fields)


def _has_embedding(rows: np.ndarray) -> np.ndarray:
    return np.any(rows != 0, axis=1)


def qrcf_from_history(query_embedding, history_items, history_engagement,
                      item_embeddings: np.ndarray, item_to_item: ItemToItemTable,
                      config: QRCFConfig = QRCFConfig(),
                      history_timestamps_ms=None) -> QRCFResult:
    """QRCF on one user's history given as arrays, most recent first.

    history_items [L] item indices; history_engagement [L, E]; item_embeddings [num_items + 1,
    D] (row = item index, zero rows = no embedding); item_to_item {item: [(neighbour, weight),
    ...] strongest first} (common.item_to_item.read_item_to_item)."""
    items = np.asarray(history_items, np.int64).reshape(-1)
    counts: Dict[str, int] = {"history": int(items.shape[0])}
    if items.shape[0] == 0:
        return _empty(EMPTY_HISTORY, counts)
    query = np.asarray(query_embedding, np.float32).reshape(-1)
    if not np.any(query != 0):
        return _empty(QUERY_WITHOUT_EMBEDDING, counts)
    table = np.asarray(item_embeddings, np.float32)
    in_table = (items > 0) & (items < table.shape[0])
    counts["history_unknown_items"] = int((~in_table).sum())
    history_embeddings = np.zeros((items.shape[0], table.shape[1]), np.float32)
    history_embeddings[in_table] = table[items[in_table]]

    seed_positions = stage1_top_k(query, history_embeddings, config.seed_k, config.seed_eps)
    with_embedding = _has_embedding(history_embeddings[seed_positions])
    counts["seeds_without_embedding"] = int((~with_embedding).sum())
    positions = seed_positions[with_embedding]
    relevance = cosine_to_query(query, history_embeddings[positions])
    weights = engagement_weight(np.asarray(history_engagement)[positions], config)
    times = (None if history_timestamps_ms is None
             else np.asarray(history_timestamps_ms, np.int64)[positions])
    seeds = [SeedBehaviour(position=int(p), item_index=int(items[p]),
                           timestamp_ms=None if times is None else int(times[n]),
                           relevance=float(relevance[n]), engagement_weight=float(weights[n]))
             for n, p in enumerate(positions)]
    counts["seeds"] = len(seeds)
    result_fields = {"seed_positions": seed_positions, "seeds": seeds}
    if not seeds:
        return _empty(NO_RELEVANT_BEHAVIOURS, counts, **result_fields)

    reached: Dict[int, List[SeedContribution]] = {}
    counts["seeds_without_neighbours"] = 0
    for seed in seeds:  # most recent first: a fixed summation order, reproducible scores
        neighbours = item_to_item.get(seed.item_index, ())[:config.neighbours_per_seed]
        if not neighbours:
            counts["seeds_without_neighbours"] += 1
        for neighbour, i2i in neighbours:
            reached.setdefault(int(neighbour), []).append(SeedContribution(
                seed, float(i2i), seed.relevance * seed.engagement_weight * float(i2i)))
    counts["neighbours"] = len(reached)
    if not reached:
        return _empty(NO_NEIGHBOURS, counts, **result_fields)

    candidates = np.asarray(sorted(reached), np.int64)
    known = (candidates > 0) & (candidates < table.shape[0])
    counts["neighbours_unknown"] = int((~known).sum())
    candidates = candidates[known]
    rows = table[candidates]
    with_embedding = _has_embedding(rows)
    counts["neighbours_without_embedding"] = int((~with_embedding).sum())
    candidates, rows = candidates[with_embedding], rows[with_embedding]
    item_relevance = cosine_to_query(query, rows)
    relevant = item_relevance >= np.float32(config.min_relevance)
    counts["neighbours_below_min_relevance"] = int((~relevant).sum())
    ranked = []
    for item, cosine in zip(candidates[relevant].tolist(), item_relevance[relevant].tolist()):
        contributions = reached[item]
        ranked.append(RetrievedItem(
            item_index=item, score=float(sum(c.contribution for c in contributions)),
            relevance=float(cosine),
            seeds=tuple(sorted(contributions, key=lambda c: (-c.contribution, c.seed.position)))))
    if not ranked:
        return _empty(NO_RELEVANT_NEIGHBOURS, counts, **result_fields)
    ranked.sort(key=lambda r: (-r.score, r.item_index))
    counts["truncated"] = max(len(ranked) - config.max_results, 0)
    return QRCFResult(items=ranked[:config.max_results], **result_fields, counts=counts)


class QRCFRetriever:
    """QRCF over a feature store (any `common.feature_store.FeatureStore`) and an item-to-item
    table; `retrieve(user_id, query_embedding, now_ms)` answers one search request."""

    def __init__(self, store, item_to_item: ItemToItemTable, config: QRCFConfig = QRCFConfig(),
                 item_embeddings: Optional[np.ndarray] = None):
        self.store = store
        self.item_to_item = item_to_item
        self.config = config
        self.item_embeddings = (store.item_embeddings() if item_embeddings is None
                                else np.asarray(item_embeddings, np.float32))

    @classmethod
    def from_preprocessing_output(cls, data_dir: str, config: QRCFConfig = QRCFConfig(),
                                  item_to_item: Optional[str] = None) -> "QRCFRetriever":
        """Opens DATA/feature_store.sqlite and the table at `item_to_item` (default
        DATA/item_to_item, built by `python -m preprocessing.item_to_item --data DATA`)."""
        import os

        from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore
        from common.item_to_item import read_item_to_item

        return cls(SqliteFeatureStore(os.path.join(data_dir, FEATURE_STORE_FILE)),
                   read_item_to_item(item_to_item or data_dir), config)

    def retrieve(self, user_id: str, query_embedding, now_ms: int) -> QRCFResult:
        """QRCF for `user_id`'s behaviours strictly before `now_ms`."""
        if self.store.user(user_id) is None:
            return _empty(UNKNOWN_USER, {"history": 0})
        history = self.store.behaviours_before(user_id, now_ms, limit=self.config.history_limit)
        return qrcf_from_history(query_embedding, history["item_index"], history["engagement"],
                                 self.item_embeddings, self.item_to_item, self.config,
                                 history_timestamps_ms=history["timestamp_ms"])
