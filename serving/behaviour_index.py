"""Per-user behaviour index for RSU stage 1 over lifelong histories (QIN, arXiv 2310.xxxxx RSU).

QIN's Relevance Search Unit keeps, in stage 1, the top-K1 behaviours of a user's history by cosine
similarity between the query's pretrained embedding and the behaviour item's pretrained embedding.
Kuaishou users have 10^4 to 10^5 behaviours: no ranking graph attends over that many, so online
the RSU "stores the pretrained vectors, indexes them and retrieves the top-K historical actions".
This module is that store and index. It runs next to the ranking model (in the serving client
process), never inside the SavedModel, which must stay loadable by stock TF Serving (ScaNN ops
are not registered there).

Semantics (identical for every backend, and identical to `common.relevance.stage1_top_k`, which
preprocessing uses to build the training examples):

* score(i) = cos(query, embedding of behaviour i); a zero vector (unknown item) scores 0.
* Only behaviours strictly before `before_ms` take part (point in time), all when it is None.
* With a threshold, only behaviours with score >= threshold take part.
* The k highest scores are kept; equal scores are broken by recency (the more recent wins).
* The kept behaviours are returned ordered most recent first, the order of the model's
  long-term sequence.

Backends (chosen per user by history length, behind one interface):

* exact: brute-force NumPy over all rows. Used for histories shorter than
  `Stage1Config.scann_min_history`; ScaNN gains nothing there and exact is the training truth.
* scann: a ScaNN tree + asymmetric-hashing index over the distinct items of a "base" of rows
  (see `ScannBase`: duplicates stay exact ties broken by recency; a long history of few
  distinct items is scored exactly per item instead), plus a small exact
  "delta" buffer of rows appended since the base was built. A query searches the base with
  ScaNN (over-fetching to survive the point-in-time filter), scores the delta exactly, and
  merges both with the exact tie rule. When the delta grows past `delta_rebuild_size` the base
  is rebuilt (in the background by default) and swapped in atomically.

Thread safety: each user's state is an immutable snapshot; readers take the current snapshot
without a lock, writers (appends, rebuild swaps) replace it under the user's lock. A request
that arrives during a rebuild is answered by the previous snapshot (base + delta), so it is
never blocked and never sees a half-built index.

Rows: behaviours of a user are stored in time order (row 0 = oldest, ties in arrival order), the
order of the feature store's histories. Results carry `rows` (chronological positions,
stable under appends), `positions` (positions in the most-recent-first sequence of the
behaviours before `before_ms`, the index convention of `stage1_top_k`), `item_indices`,
`timestamps_ms` and `scores`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from common import features as F
from common.relevance import row_dot

logger = logging.getLogger(__name__)

# A history as (item vocabulary indices, timestamps in ms[, behaviour features]), oldest first:
# what a loader returns for a user.
History = Tuple[Sequence[int], ...]

# Behaviour features an index can carry per row (names and widths from common.features), so a
# stage-1 result becomes the model's long-term sequence without another store lookup.
BEHAVIOUR_FEATURES = {field: (F.SEQ_FIELD_DTYPE[field], F.SEQ_FIELD_WIDTH[field])
                      for field in F.STORED_SEQ_FIELDS if field != F.SEQ_ITEM}


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    """Settings of the stage-1 index. The defaults are the ones measured in docs/LIFELONG.md."""

    # Histories shorter than this are searched exactly (NumPy): ScaNN's gain is small there and
    # exact search is what training sees. Longer ones get a base index over their distinct items,
    # searched by ScaNN when it holds at least this many distinct items, exactly otherwise.
    scann_min_history: int = 20_000
    # Rebuild a ScaNN base when its exact delta buffer holds more rows than
    # max(delta_rebuild_size, delta_rebuild_fraction * base rows).
    delta_rebuild_size: int = 2_000
    delta_rebuild_fraction: float = 0.05
    background_rebuild: bool = True
    # ScaNN partitioning: num_leaves = leaves_per_sqrt_rows * sqrt(rows); a query searches
    # leaves_to_search_fraction of the leaves (at least min_leaves_to_search).
    leaves_per_sqrt_rows: float = 1.0
    leaves_to_search_fraction: float = 0.2
    min_leaves_to_search: int = 32
    # Asymmetric hashing (anisotropic quantization, the ScaNN paper's score-aware loss).
    ah_dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    # Candidates re-scored exactly after the quantized search: reorder_multiplier * k, at least
    # min_reorder. Exact re-scoring is what makes scores (and thresholds) match the exact path.
    reorder_multiplier: float = 4.0
    min_reorder: int = 400
    # Over-fetch when the point-in-time filter hides base rows; beyond this many hidden rows
    # (or half the base) the exact path is cheaper and exactly right.
    max_hidden_rows_for_scann: int = 2_000
    # Number of users kept in memory (least recently used evicted; reloaded through the loader).
    max_users: int = 10_000
    # ScaNN threads per search; 1 keeps a request on one core next to the model server.
    search_threads: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.scann_min_history < 16:
            raise ValueError("scann_min_history must be >= 16 (ScaNN needs rows to partition)")
        if not 0.0 < self.leaves_to_search_fraction <= 1.0:
            raise ValueError("leaves_to_search_fraction must be in (0, 1]")
        if self.delta_rebuild_size < 1 or self.max_users < 1:
            raise ValueError("delta_rebuild_size and max_users must be >= 1")

    def num_leaves(self, rows: int) -> int:
        return int(max(2, min(rows // 8, round(self.leaves_per_sqrt_rows * np.sqrt(rows)))))

    def leaves_to_search(self, num_leaves: int) -> int:
        wanted = int(np.ceil(self.leaves_to_search_fraction * num_leaves))
        return int(min(num_leaves, max(self.min_leaves_to_search, wanted)))

    def reorder(self, k: int) -> int:
        return int(max(self.min_reorder, np.ceil(self.reorder_multiplier * k)))


@dataclasses.dataclass(frozen=True)
class Stage1Result:
    """The behaviours kept by stage 1, most recent first (all arrays aligned)."""

    rows: np.ndarray  # int64, chronological positions in the user's history (0 = oldest)
    positions: np.ndarray  # int64, positions in the most-recent-first history before before_ms
    item_indices: np.ndarray  # int64 item vocabulary indices
    timestamps_ms: np.ndarray  # int64
    scores: np.ndarray  # float32 cosine(query, behaviour)
    backend: str  # "exact", "scann" or "none" (no history)
    history_length: int  # behaviours of the user before before_ms
    features: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per behaviour

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def as_long_term(self):
        """(UserHistory of the kept behaviours oldest first, their positions most recent first):
        the `long_term` argument of `common.point_in_time.join_request`. Needs an index built
        with behaviour features (Stage1Searcher.from_feature_store builds one)."""
        from common import point_in_time as pit

        missing = [name for name in BEHAVIOUR_FEATURES if name not in self.features]
        if len(self) and missing:
            raise ValueError(f"the index carries no behaviour features {missing}: build it with "
                             "features (Stage1Searcher.from_feature_store does)")
        n = len(self)
        columns = {F.SEQ_ITEM: self.item_indices[::-1]}
        for name, (dtype, width) in BEHAVIOUR_FEATURES.items():
            empty = np.zeros((0,) if width == 1 else (0, width), dtype)
            columns[name] = np.asarray(self.features.get(name, empty), dtype)[::-1]
        history = pit.make_history(self.timestamps_ms[::-1], columns)
        return history, np.arange(n - 1, -1, -1, dtype=np.int64)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalises rows in float32; all-zero rows stay zero (cosine 0 with anything)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def select_top_k(scores: np.ndarray, rows: np.ndarray, k: int,
                 threshold: Optional[float] = None) -> np.ndarray:
    """Indices into `scores` of the k best by (score desc, row desc = more recent first).

    `rows` are the chronological rows of the scored behaviours (the larger, the more recent).
    Returns indices ordered by row descending (most recent first). Deterministic for ties.
    """
    if threshold is not None:
        keep = np.flatnonzero(scores >= np.float32(threshold))
        scores, rows_kept = scores[keep], rows[keep]
    else:
        keep, rows_kept = None, rows
    n = scores.shape[0]
    if k <= 0 or n == 0:
        chosen = np.zeros(0, dtype=np.int64)
    elif n <= k:
        chosen = np.arange(n)
    else:
        part = np.argpartition(-scores, k - 1)[:k]
        kth = scores[part].min()
        above = np.flatnonzero(scores > kth)
        tied = np.flatnonzero(scores == kth)
        need = k - above.shape[0]
        # Among the tied, the most recent win.
        tied = tied[np.argsort(-rows_kept[tied], kind="stable")[:need]]
        chosen = np.concatenate([above, tied])
    chosen = chosen[np.argsort(-rows_kept[chosen], kind="stable")]
    return chosen if keep is None else keep[chosen]


class _Snapshot:
    """An immutable view of one user's index. Arrays may be shared with newer snapshots, which
    only ever write past this snapshot's `size`."""

    __slots__ = ("embeddings", "items", "timestamps", "size", "base", "base_size", "generation",
                 "features")

    def __init__(self, embeddings, items, timestamps, size, base=None, base_size=0,
                 generation=0, features=None):
        self.embeddings, self.items, self.timestamps = embeddings, items, timestamps
        # Optional per-row behaviour feature columns (author, category, engagement, source).
        self.features = features or {}
        self.size, self.base, self.base_size = size, base, base_size
        # Bumped when the history is replaced (set_history): a rebuild started on an older
        # generation must not attach its base to different rows.
        self.generation = generation

    @property
    def delta_size(self) -> int:
        return self.size - self.base_size if self.base is not None else self.size


class _UserIndex:
    """One user's behaviour vectors, chronological, with an optional ScaNN base."""

    def __init__(self, dim: int):
        self.lock = threading.Lock()
        self.rebuilding = False
        self.snapshot = _Snapshot(np.zeros((0, dim), np.float32), np.zeros(0, np.int64),
                                  np.zeros(0, np.int64), 0)


class Stage1Searcher:
    """RSU stage 1 over whole behaviour histories: exact below a size, ScaNN above it.

    Args:
      item_embeddings: float32 [num_items + 1, D] pretrained item embeddings (row 0 = unknown),
        e.g. `FeatureStore.item_embeddings()` or preprocessing's item_embeddings.npy.
      config: Stage1Config.
      history_loader: optional callable user_id -> (item_indices, timestamps_ms) giving the
        user's whole history in time order; used for users not indexed yet (and after eviction).
        Without it, a user never indexed has an empty history.
    """

    def __init__(self, item_embeddings: np.ndarray, config: Optional[Stage1Config] = None,
                 history_loader: Optional[Callable[[str], History]] = None):
        table = np.asarray(item_embeddings, dtype=np.float32)
        if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"item_embeddings must be [num_items + 1, D], got {table.shape}")
        if not np.all(np.isfinite(table)):
            raise ValueError("item_embeddings contain NaN or infinite values")
        self.config = config or Stage1Config()
        self.dim = int(table.shape[1])
        self._table = normalize_rows(table)
        self._loader = history_loader
        self._users: "collections.OrderedDict[str, _UserIndex]" = collections.OrderedDict()
        self._users_lock = threading.Lock()
        self._rebuild_threads: Dict[str, threading.Thread] = {}
        self.counters = collections.Counter()

    # ---- building and updating ---------------------------------------------------------------
    @classmethod
    def from_feature_store(cls, store, config: Optional[Stage1Config] = None,
                           users: Iterable[str] = (),
                           progress: Optional[Callable[[int], None]] = None) -> "Stage1Searcher":
        """A searcher over a `common.feature_store.FeatureStore` (`item_embeddings()`,
        `behaviours_before()`), or any store with the `serving.client.FeatureStoreView` methods
        (`items()`, `behaviours()`). The given `users` are indexed now, every other user on its
        first request, with all of its behaviour features."""
        if hasattr(store, "item_embeddings"):
            table = np.asarray(store.item_embeddings(), np.float32)
        else:
            items = store.items()
            index = np.asarray(items["item_index"], np.int64)
            vectors = np.asarray(items["embedding"], np.float32)
            table = np.zeros((int(index.max(initial=0)) + 1, vectors.shape[1]), np.float32)
            table[index] = vectors
        searcher = cls(table, config, history_loader=store_history_loader(store))
        for n, user in enumerate(users):
            searcher.set_history(user, *searcher._loader(user))
            if progress:
                progress(n + 1)
        return searcher

    def set_history(self, user_id: str, item_indices: Sequence[int],
                    timestamps_ms: Sequence[int],
                    features: Optional[Mapping[str, Sequence]] = None) -> None:
        """(Re)indexes a user's whole history, given oldest first (any order is accepted; rows
        are stored sorted by time, stably). `features` optionally maps behaviour feature names
        (see BEHAVIOUR_FEATURES) to per-behaviour arrays returned with the results."""
        items, times = self._validate(item_indices, timestamps_ms)
        columns = _validate_features(features, items.shape[0])
        order = np.argsort(times, kind="stable")
        items, times = items[order], times[order]
        columns = {name: column[order] for name, column in columns.items()}
        embeddings = self._table[items]
        snapshot = _Snapshot(embeddings, items, times, items.shape[0], features=columns)
        if snapshot.size >= self.config.scann_min_history:
            snapshot = self._with_base(snapshot, snapshot.size)
        user = self._user(user_id, create=True, load=False)
        with user.lock:
            snapshot.generation = user.snapshot.generation + 1
            user.snapshot = snapshot
        self.counters["histories_set"] += 1

    def add_behaviours(self, user_id: str, item_indices: Sequence[int],
                       timestamps_ms: Sequence[int],
                       features: Optional[Mapping[str, Sequence]] = None) -> None:
        """Appends new behaviours. They go to the exact delta buffer at once (visible to the next
        request); the ScaNN base is rebuilt when the delta is large. A behaviour older than the
        user's latest one re-sorts the history and rebuilds the user's index synchronously.

        With a history loader (a feature store), write the behaviours to the store first: a user
        not in memory is not loaded here but on its next request, from the store."""
        items, times = self._validate(item_indices, timestamps_ms)
        columns = _validate_features(features, items.shape[0])
        if items.shape[0] == 0:
            return
        if self._loader is not None and not self._resident(user_id):
            # Not in memory: the store (already holding these behaviours) is loaded whole on the
            # user's next request; appending here as well would count them twice.
            self.counters["appends_left_to_the_store"] += int(items.shape[0])
            return
        user = self._user(user_id, create=True, load=False)
        with user.lock:
            old = user.snapshot
            if old.size and set(columns) != set(old.features):
                raise ValueError(f"new behaviours of {user_id!r} carry features "
                                 f"{sorted(columns)}, the indexed ones {sorted(old.features)}")
            if (old.size and times.min() < old.timestamps[old.size - 1]) or \
                    np.any(np.diff(times) < 0):
                self.counters["out_of_order_appends"] += 1
                all_items = np.concatenate([old.items[:old.size], items])
                all_times = np.concatenate([old.timestamps[:old.size], times])
                all_features = {name: np.concatenate([old.features[name][:old.size], column])
                                for name, column in columns.items()}
            else:
                all_items = None
            if all_items is None:
                if not old.size and columns:  # first rows define the feature columns
                    old = _Snapshot(old.embeddings, old.items, old.timestamps, 0,
                                    generation=old.generation,
                                    features={name: column[:0].copy()
                                              for name, column in columns.items()})
                user.snapshot = self._appended(old, items, times, columns)
        if all_items is not None:
            self.set_history(user_id, all_items, all_times, all_features)
            return
        self.counters["behaviours_appended"] += int(items.shape[0])
        self._maybe_rebuild(user_id, user)

    def rebuild(self, user_id: str) -> None:
        """Rebuilds a user's ScaNN base over all current rows now (synchronously)."""
        user = self._user(user_id, create=False, load=False)
        if user is None:
            return
        self._rebuild(user_id, user)

    def wait_for_rebuilds(self, timeout_s: float = 60.0) -> None:
        """Blocks until background rebuilds started so far are done (tests, clean shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._users_lock:
            threads = list(self._rebuild_threads.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ---- querying ----------------------------------------------------------------------------
    def top_k(self, user_id: str, query_embedding, k: int, before_ms: Optional[int] = None,
              threshold: Optional[float] = None) -> Stage1Result:
        """The top-k behaviours of `user_id` by cosine with `query_embedding` (see module doc).

        Never raises for a user without history (empty result) nor for k above the history
        length (all behaviours are returned); raises ValueError for a malformed query or k < 0.
        """
        query = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise ValueError(f"query_embedding has {query.shape[0]} values, expected {self.dim}")
        if not np.all(np.isfinite(query)):
            raise ValueError("query_embedding contains NaN or infinite values")
        if int(k) != k or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        k = int(k)
        norm = float(np.linalg.norm(query))
        query = query / norm if norm > 0 else query
        user = self._user(user_id, create=False, load=True)
        if user is None:
            self.counters["unknown_users"] += 1
            return _empty("none", 0)
        snap = user.snapshot
        visible = _visible_rows(snap, before_ms)
        if visible == 0 or k == 0:
            return _empty("none" if visible == 0 else "exact", visible)
        if snap.base is not None:
            hidden = snap.base_size - min(visible, snap.base_size)
            if hidden <= min(self.config.max_hidden_rows_for_scann, snap.base_size // 2):
                return self._scann_top_k(snap, query, k, visible, threshold)
            self.counters["scann_fallback_point_in_time"] += 1
        return self._exact_top_k(snap, query, k, visible, threshold)

    def _resident(self, user_id: str) -> bool:
        with self._users_lock:
            return user_id in self._users

    def history_length(self, user_id: str) -> int:
        user = self._user(user_id, create=False, load=False)
        return 0 if user is None else user.snapshot.size

    def user_stats(self, user_id: str) -> Dict[str, int]:
        """Rows, base/delta split and bytes held for one user (benchmarks, monitoring)."""
        user = self._user(user_id, create=False, load=False)
        if user is None:
            return {"rows": 0, "base_rows": 0, "delta_rows": 0, "vector_bytes": 0,
                    "scann_bytes": 0, "distinct_items_indexed": 0}
        snap = user.snapshot
        return {"rows": snap.size, "base_rows": snap.base_size if snap.base is not None else 0,
                "delta_rows": snap.delta_size,
                "vector_bytes": int(snap.embeddings[:snap.size].nbytes + 16 * snap.size),
                "scann_bytes": snap.base.nbytes() if snap.base is not None else 0,
                "distinct_items_indexed": snap.base.num_points if snap.base is not None else 0}

    # ---- internals ---------------------------------------------------------------------------
    def _validate(self, item_indices, timestamps_ms) -> Tuple[np.ndarray, np.ndarray]:
        items = np.asarray(item_indices, dtype=np.int64).reshape(-1)
        times = np.asarray(timestamps_ms, dtype=np.int64).reshape(-1)
        if items.shape != times.shape:
            raise ValueError(f"{items.shape[0]} item indices but {times.shape[0]} timestamps")
        bad = (items < 0) | (items >= self._table.shape[0])
        if np.any(bad):
            raise ValueError(
                f"{int(bad.sum())} item indices outside [0, {self._table.shape[0]}) "
                f"(first: {int(items[bad][0])}); map unknown items to 0 (OOV) first")
        return items, times

    def _user(self, user_id: str, create: bool, load: bool) -> Optional[_UserIndex]:
        with self._users_lock:
            user = self._users.get(user_id)
            if user is not None:
                self._users.move_to_end(user_id)
                return user
        if load and self._loader is not None:
            # Unseen at index time (or evicted): index what the store knows, even nothing, so
            # the next request does not ask the store again.
            history = self._loader(user_id)
            self.counters["users_loaded"] += 1
            self.set_history(user_id, *history)
            with self._users_lock:
                user = self._users.get(user_id)
            if user is not None:
                return user
        if not create:
            return None
        with self._users_lock:
            user = self._users.get(user_id)
            if user is None:
                user = self._users[user_id] = _UserIndex(self.dim)
                while len(self._users) > self.config.max_users:
                    self._users.popitem(last=False)
                    self.counters["users_evicted"] += 1
            return user

    def _appended(self, old: _Snapshot, items: np.ndarray, times: np.ndarray,
                  features: Dict[str, np.ndarray]) -> _Snapshot:
        n, m = old.size, items.shape[0]
        embeddings, all_items, all_times = old.embeddings, old.items, old.timestamps
        if n + m > embeddings.shape[0]:  # grow geometrically; old snapshots keep old arrays
            capacity = max(n + m, int(1.5 * embeddings.shape[0]) + 64)
            embeddings = _grown(embeddings, capacity, n)
            all_items, all_times = _grown(all_items, capacity, n), _grown(all_times, capacity, n)
        embeddings[n:n + m] = self._table[items]
        all_items[n:n + m], all_times[n:n + m] = items, times
        all_features = {}
        for name, column in old.features.items():
            if n + m > column.shape[0]:
                column = _grown(column, embeddings.shape[0], n)
            column[n:n + m] = features[name]
            all_features[name] = column
        return _Snapshot(embeddings, all_items, all_times, n + m, old.base, old.base_size,
                         old.generation, all_features)

    def _maybe_rebuild(self, user_id: str, user: _UserIndex) -> None:
        snap = user.snapshot
        cfg = self.config
        if snap.base is None:
            due = snap.size >= cfg.scann_min_history
        else:
            due = snap.delta_size > max(cfg.delta_rebuild_size,
                                        cfg.delta_rebuild_fraction * snap.base_size)
        if not due:
            return
        with user.lock:
            if user.rebuilding:
                return
            user.rebuilding = True
        if cfg.background_rebuild:
            thread = threading.Thread(target=self._rebuild, args=(user_id, user, True),
                                      name=f"stage1-rebuild-{user_id}", daemon=True)
            with self._users_lock:
                self._rebuild_threads[user_id] = thread
            thread.start()
        else:
            self._rebuild(user_id, user, True)

    def _rebuild(self, user_id: str, user: _UserIndex, claimed: bool = False) -> None:
        try:
            snap = user.snapshot
            built = self._with_base(snap, snap.size)
            with user.lock:
                current = user.snapshot
                if current.generation != snap.generation or built.base is None:
                    self.counters["rebuilds_discarded"] += 1
                    return
                # Rows appended while building stay in the delta of the new snapshot.
                user.snapshot = _Snapshot(current.embeddings, current.items, current.timestamps,
                                          current.size, built.base, built.base_size,
                                          current.generation, current.features)
            self.counters["rebuilds"] += 1
        except Exception:  # keep serving from the previous snapshot, but say so
            self.counters["rebuild_failures"] += 1
            logger.exception("stage-1 index rebuild failed for user %r", user_id)
        finally:
            if claimed:
                with user.lock:
                    user.rebuilding = False
                with self._users_lock:
                    if self._rebuild_threads.get(user_id) is threading.current_thread():
                        del self._rebuild_threads[user_id]

    def _with_base(self, snap: _Snapshot, rows: int) -> _Snapshot:
        """A snapshot whose first `rows` rows are indexed by ScaNN (exact if ScaNN cannot be
        built on these vectors, e.g. too few distinct items: counted in `scann_build_failures`)."""
        if rows < self.config.scann_min_history:
            return snap
        try:
            base = ScannBase.build(snap.items[:rows], self._table, self.config)
        except (ValueError, RuntimeError) as err:  # degenerate data: exact stays correct
            self.counters["scann_build_failures"] += 1
            logger.warning("no ScaNN index over %d rows (%s); searching them exactly", rows, err)
            base = ScannBase.build(snap.items[:rows], self._table, self.config, exact=True)
        self.counters["scann_builds" if base.searcher is not None else "exact_bases"] += 1
        return _Snapshot(snap.embeddings, snap.items, snap.timestamps, snap.size, base, rows,
                         snap.generation, snap.features)

    def _exact_top_k(self, snap, query, k, visible, threshold) -> Stage1Result:
        self.counters["exact_searches"] += 1
        scores = row_dot(snap.embeddings[:visible], query)
        rows = np.arange(visible, dtype=np.int64)
        chosen = select_top_k(scores, rows, k, threshold)
        return _result(snap, rows[chosen], scores[chosen], visible, "exact")

    def _scann_top_k(self, snap, query, k, visible, threshold) -> Stage1Result:
        self.counters[f"{snap.base.backend}_base_searches"] += 1
        base_visible = min(visible, snap.base_size)
        hidden = snap.base_size - base_visible
        base_rows = snap.base.candidate_rows(query, k + hidden, self.config)
        base_rows = base_rows[base_rows < base_visible]
        delta_rows = np.arange(snap.base_size, visible, dtype=np.int64)
        rows = np.concatenate([base_rows, delta_rows])
        # Exact re-scoring of the few candidates: same scores, threshold and ties as exact.
        scores = row_dot(snap.embeddings[rows], query)
        chosen = select_top_k(scores, rows, k, threshold)
        return _result(snap, rows[chosen], scores[chosen], visible, snap.base.backend)


class ScannBase:
    """Index over the DISTINCT items of a user's first `rows` behaviours.

    Indexing distinct items rather than behaviours makes ties exact: re-watched items (same
    vector, same cosine) are one point, and a hit expands to all of that item's behaviours, so
    the recency tie rule sees every copy. It also shrinks the index for users who re-watch.
    Behaviours of one item are kept as CSR arrays: rows_by_item[starts[j]:starts[j]+counts[j]].

    With at least `scann_min_history` distinct items the points are searched by ScaNN; with
    fewer (long histories of re-watched items) they are scored exactly with NumPy, which is
    then both cheaper than scoring every behaviour and exact (`searcher` is None).
    """

    # Below this many distinct items, ScaNN's k-means has too little to partition.
    MIN_DISTINCT_ITEMS = 64

    def __init__(self, searcher, num_leaves, vectors, rows_by_item, starts, counts, rows):
        self.searcher, self.num_leaves, self.vectors = searcher, num_leaves, vectors
        self.rows_by_item, self.starts, self.counts, self.rows = rows_by_item, starts, counts, rows

    @property
    def num_points(self) -> int:
        return int(self.starts.shape[0])

    @property
    def backend(self) -> str:
        return "exact" if self.searcher is None else "scann"

    @classmethod
    def build(cls, items: np.ndarray, unit_table: np.ndarray, config: Stage1Config,
              exact: bool = False) -> "ScannBase":
        rows_by_item = np.argsort(items, kind="stable").astype(np.int64)
        distinct, starts, counts = np.unique(items[rows_by_item], return_index=True,
                                             return_counts=True)
        data = np.ascontiguousarray(unit_table[distinct])
        if exact or distinct.shape[0] < max(config.scann_min_history, cls.MIN_DISTINCT_ITEMS):
            searcher, leaves, vectors = None, 0, data
        else:
            (searcher, leaves), vectors = build_scann(data, config), None
        return cls(searcher, leaves, vectors, rows_by_item, starts.astype(np.int64),
                   counts.astype(np.int64), int(items.shape[0]))

    def candidate_rows(self, query: np.ndarray, min_rows: int, config: Stage1Config) -> np.ndarray:
        """Behaviour rows of the best distinct items, at least `min_rows` of them when the index
        holds that many (each item found brings all of its behaviours)."""
        fetch = int(min(self.num_points, max(1, min_rows)))
        if self.searcher is not None:
            hits, _ = self.searcher.search(query, fetch, max(fetch, config.reorder(fetch)),
                                           config.leaves_to_search(self.num_leaves))
            hits = hits.astype(np.int64)
        elif fetch >= self.num_points:
            hits = np.arange(self.num_points)
        else:  # exact: every item scoring at least the fetch-th best (boundary ties included)
            scores = row_dot(self.vectors, query)
            kth = scores[np.argpartition(-scores, fetch - 1)[fetch - 1]]
            hits = np.flatnonzero(scores >= kth)
        counts = self.counts[hits]
        total = int(counts.sum())
        # Vectorised concatenation of rows_by_item[starts[h]:starts[h] + counts[h]] for each hit.
        offsets = np.repeat(self.starts[hits] - (np.cumsum(counts) - counts), counts)
        return self.rows_by_item[offsets + np.arange(total)]

    def nbytes(self) -> int:
        """Approximate bytes: ScaNN's serialized assets plus the row mapping."""
        import os
        import tempfile

        mapping = self.rows_by_item.nbytes + self.starts.nbytes + self.counts.nbytes
        if self.searcher is None:
            return mapping + self.vectors.nbytes
        with tempfile.TemporaryDirectory() as tmp:
            self.searcher.serialize(tmp, False)
            scann = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        return scann + mapping


def build_scann(data: np.ndarray, config: Stage1Config):
    """Builds a ScaNN searcher over L2-normalised rows; returns (pybind searcher, num_leaves).

    Dot product on unit vectors is cosine. Tree (k-means) partitioning + anisotropic AH
    scoring + exact float32 reordering; the per-query leaves and reorder counts are passed at
    search time so they can follow k."""
    from scann.scann_ops.py import scann_ops_pybind

    rows = data.shape[0]
    leaves = config.num_leaves(rows)
    builder = scann_ops_pybind.builder(data, 10, "dot_product")
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=config.leaves_to_search(leaves),
                           training_sample_size=rows, quantize_centroids=False)
    builder = builder.score_ah(
        config.ah_dims_per_block,
        anisotropic_quantization_threshold=config.anisotropic_quantization_threshold)
    builder = builder.reorder(config.reorder(100))
    searcher = builder.build()
    searcher.set_num_threads(config.search_threads)
    return searcher.searcher, leaves


def store_history_loader(store) -> Callable[[str], History]:
    """user_id -> (items, timestamps, features) oldest first, from a store's whole history:
    `behaviours_before(user_id, before_ms)` arrays (common.feature_store) or
    `behaviours(user_id, before_ms, limit)` dicts (serving.client.FeatureStoreView), both most
    recent first (equal timestamps latest-arrived first, so reversing keeps arrival order)."""
    everything = int(np.iinfo(np.int64).max)

    def load(user_id: str) -> History:
        if hasattr(store, "behaviours_before"):
            arrays = store.behaviours_before(user_id, everything)
            feats = {F.SEQ_AUTHOR: arrays["author_index"], F.SEQ_CATEGORY: arrays["category"],
                     F.SEQ_ENGAGEMENT: arrays["engagement"], F.SEQ_SOURCE: arrays["source"]}
            return (np.asarray(arrays["item_index"])[::-1],
                    np.asarray(arrays["timestamp_ms"])[::-1],
                    {name: np.asarray(column)[::-1] for name, column in feats.items()})
        rows = list(store.behaviours(user_id, everything, 2**31 - 1))[::-1]
        return behaviours_to_history(rows)

    return load


def behaviours_to_history(rows: Sequence[Mapping[str, Any]]) -> History:
    """(item_index, timestamp_ms, features) arrays of behaviour dicts (client/store layout:
    item_index, timestamp_ms, author_index, category, engagement, source)."""
    items = np.asarray([int(r["item_index"]) for r in rows], np.int64)
    times = np.asarray([int(r["timestamp_ms"]) for r in rows], np.int64)
    feats = {}
    if rows and "author_index" in rows[0]:
        feats = {
            F.SEQ_AUTHOR: np.asarray([int(r["author_index"]) for r in rows], np.int64),
            F.SEQ_CATEGORY: np.asarray([list(r["category"]) for r in rows], np.int64).reshape(
                -1, F.NUM_CATEGORY_LEVELS),
            F.SEQ_ENGAGEMENT: np.asarray([list(r["engagement"]) for r in rows],
                                         np.float32).reshape(-1, F.ENGAGEMENT_DIM),
            F.SEQ_SOURCE: np.asarray([int(r["source"]) for r in rows], np.int64)}
    return items, times, feats


def long_term_features(result: Stage1Result, now_ms: int) -> Dict[str, np.ndarray]:
    """The model's long-term sequence (`long_*` features of common.features, most recent
    first) made of the behaviours stage 1 kept, built by common.point_in_time."""
    from common import point_in_time as pit

    history, positions = result.as_long_term()
    return pit.sequence_features(history, positions, F.LONG_TERM, now_ms)


def _validate_features(features: Optional[Mapping[str, Sequence]], n: int
                       ) -> Dict[str, np.ndarray]:
    columns = {}
    for name, values in (features or {}).items():
        if name not in BEHAVIOUR_FEATURES:
            raise ValueError(f"unknown behaviour feature {name!r}; expected some of "
                             f"{sorted(BEHAVIOUR_FEATURES)}")
        dtype, width = BEHAVIOUR_FEATURES[name]
        column = np.asarray(values, dtype)
        shape = (n,) if width == 1 else (n, width)
        if column.size != int(np.prod(shape)):
            raise ValueError(f"behaviour feature {name!r} has {column.size} values, expected "
                             f"{int(np.prod(shape))} ({n} behaviours x {width})")
        columns[name] = column.reshape(shape)
    return columns


def _visible_rows(snap: _Snapshot, before_ms: Optional[int]) -> int:
    if before_ms is None:
        return snap.size
    return int(np.searchsorted(snap.timestamps[:snap.size], int(before_ms), side="left"))


def _result(snap: _Snapshot, rows: np.ndarray, scores: np.ndarray, visible: int,
            backend: str) -> Stage1Result:
    return Stage1Result(rows=rows, positions=visible - 1 - rows, item_indices=snap.items[rows],
                        timestamps_ms=snap.timestamps[rows], scores=scores.astype(np.float32),
                        backend=backend, history_length=visible,
                        features={name: column[rows] for name, column in snap.features.items()})


def _empty(backend: str, visible: int) -> Stage1Result:
    none = np.zeros(0, np.int64)
    return Stage1Result(none, none, none, none, np.zeros(0, np.float32), backend, visible, {})


def _grown(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    out = np.zeros((capacity,) + array.shape[1:], dtype=array.dtype)
    out[:used] = array[:used]
    return out


