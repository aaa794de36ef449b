"""Feature store: what serving needs to build a request example outside of training data.

`python -m preprocessing` writes OUT/feature_store.sqlite with the same vocabularies and
embeddings as the TFRecords:

* items         item_index, raw item_id, author_index, category indices, content embedding
* users         raw user_id, user_index, hashed profile indices
* behaviours    every user's full history: item_index, author_index, category indices,
                engagement [ENGAGEMENT_DIM], source, timestamp_ms
* query_vocab   token_id, word, embedding (only when the input has a query vocabulary)
* meta          the DatasetMetadata of the run (metadata.json)

`FeatureStore` is the interface; `SqliteFeatureStore` is the single-file implementation on the
standard library's sqlite3 (one process or a few threads). A networked key-value store
(Bigtable, Redis, ...) implements the same methods: keys are raw user ids, item indices and
token ids, so a row layout per key maps directly.

Ordering rule shared with the preprocessing pipeline: a user's behaviours are ordered by
timestamp, and behaviours with equal timestamps by the order they were added (the pipeline adds
them sorted by (timestamp, item_index, source, engagement)); "most recent first" is the reverse
of that order. `behaviours_before(user, t)` returns only behaviours with timestamp_ms < t
(strictly before), exactly the point-in-time rule of the training examples.
"""
from __future__ import annotations

import abc
import json
import os
import sqlite3
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from common import features as F

FEATURE_STORE_FILE = "feature_store.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_index INTEGER PRIMARY KEY, item_id TEXT NOT NULL UNIQUE, author_index INTEGER NOT NULL,
    category BLOB NOT NULL, embedding BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY, user_index INTEGER NOT NULL, profile BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS behaviours (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, timestamp_ms INTEGER NOT NULL,
    item_index INTEGER NOT NULL, author_index INTEGER NOT NULL, category BLOB NOT NULL,
    engagement BLOB NOT NULL, source INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS behaviours_by_user_time ON behaviours (user_id, timestamp_ms, seq);
CREATE TABLE IF NOT EXISTS query_vocab (
    token_id INTEGER PRIMARY KEY, word TEXT NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS query_vocab_by_word ON query_vocab (word);
"""

BEHAVIOUR_ARRAYS = ("item_id", "item_index", "author_index", "category", "engagement", "source",
                    "timestamp_ms")


def _i64(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.int64)


def _f32(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


def _blob(values, dtype) -> bytes:
    return np.ascontiguousarray(np.asarray(values, dtype=dtype).reshape(-1)).tobytes()


def normalised_mean(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised mean of token embeddings (the query embedding rule); zeros if none."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        return np.zeros((vectors.shape[-1] if vectors.ndim == 2 else 0,), np.float32)
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm).astype(np.float32) if norm > 0 else mean.astype(np.float32)


class FeatureStore(abc.ABC):
    """Read/write interface of the online feature store (raw ids are strings, times in ms)."""

    @abc.abstractmethod
    def metadata(self) -> F.DatasetMetadata:
        """The DatasetMetadata of the preprocessing run that wrote the store."""

    @abc.abstractmethod
    def user(self, user_id: str) -> Optional[Dict[str, Any]]:
        """{'user_index': int, 'user_profile': [USER_PROFILE_DIM ints]} or None if unknown."""

    @abc.abstractmethod
    def behaviours_before(self, user_id: str, before_ms: int, limit: Optional[int] = None
                          ) -> Dict[str, np.ndarray]:
        """The user's behaviours with timestamp_ms < before_ms, most recent first, as arrays:
        item_id [L] str, item_index [L], author_index [L], category [L, NUM_CATEGORY_LEVELS],
        engagement [L, ENGAGEMENT_DIM] float32, source [L], timestamp_ms [L]. Unknown user ->
        empty arrays. `limit` keeps the most recent ones."""

    @abc.abstractmethod
    def items(self, indices: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
        """item_id [M] str, item_index [M], author_index [M], category [M, LEVELS],
        embedding [M, D] of the given item indices (all items, by index, when None).
        Unknown indices raise KeyError."""

    @abc.abstractmethod
    def item_index(self, raw_ids: Sequence[str]) -> np.ndarray:
        """int64 vocabulary indices of raw item ids; OOV_INDEX (0) for unknown ids."""

    @abc.abstractmethod
    def item_embeddings(self) -> np.ndarray:
        """float32 [num_items + 1, D] table, row = item index, row 0 zeros (item_embeddings.npy)."""

    @abc.abstractmethod
    def encode_query(self, query: Union[str, Sequence[str], Sequence[int]]
                     ) -> Tuple[List[int], np.ndarray]:
        """(hashed token indices as the model sees them, L2-normalised query embedding [D]).

        `query` is text (split on whitespace), a list of words, or a list of raw token ids.
        Words / token ids not in the query vocabulary are skipped; if none is known the result
        is ([], zeros)."""

    @abc.abstractmethod
    def add_behaviours(self, user_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Appends behaviours (dicts with item_index or item_id, timestamp_ms, and optionally
        engagement, source; author/category are looked up from the item). Returns the count.
        Rows naming an unknown item raise KeyError before anything is written."""

    # ---- the serving.client.FeatureStoreView protocol ------------------------------------
    def behaviours(self, user_id: str, before_ms: int, limit: Optional[int] = None
                   ) -> List[Dict[str, Any]]:
        """`behaviours_before` as a list of dicts (one per behaviour, most recent first)."""
        arrays = self.behaviours_before(user_id, before_ms, limit)
        return [{name: (arrays[name][i].tolist() if arrays[name].ndim > 1
                        else arrays[name][i].item() if name != "item_id" else arrays[name][i])
                 for name in BEHAVIOUR_ARRAYS} for i in range(len(arrays["item_index"]))]


class SqliteFeatureStore(FeatureStore):
    """FeatureStore in one SQLite file (stdlib sqlite3); safe to share between threads."""

    def __init__(self, path: str, create: bool = False):
        if not create and not os.path.exists(path):
            raise FileNotFoundError(f"feature store {path} not found: `python -m preprocessing` "
                                    f"writes it as OUT/{FEATURE_STORE_FILE}")
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        if create:
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
            self._db.commit()
        else:
            try:
                row = self._db.execute(
                    "SELECT value FROM meta WHERE key='schema_version'").fetchone()
            except sqlite3.DatabaseError as exc:
                raise ValueError(f"{path} is not a feature store written by preprocessing: "
                                 f"{exc}") from exc
            if row is None or int(row[0]) != SCHEMA_VERSION:
                raise ValueError(f"{path} has feature-store schema {row and row[0]}, expected "
                                 f"{SCHEMA_VERSION}: rerun `python -m preprocessing`")
        self._metadata: Optional[F.DatasetMetadata] = None
        self._item_cache: Optional[Dict[str, np.ndarray]] = None

    # ---- writing (used by preprocessing) --------------------------------------------------
    @classmethod
    def create(cls, path: str, metadata: F.DatasetMetadata) -> "SqliteFeatureStore":
        """A new, empty store at `path` (an existing file there is replaced)."""
        if os.path.exists(path):
            os.remove(path)
        store = cls(path, create=True)
        store.set_metadata(metadata)
        return store

    def set_metadata(self, metadata: F.DatasetMetadata) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dataset_metadata', ?)",
                             (metadata.to_json(),))
            self._db.commit()
            self._metadata = None

    def write_items(self, rows: Iterable[Tuple[int, str, int, Sequence[int], Sequence[float]]]
                    ) -> int:
        """Rows of (item_index, item_id, author_index, category indices, embedding)."""
        data = ((int(i), str(raw), int(a), _blob(c, np.int64), _blob(e, np.float32))
                for i, raw, a, c, e in rows)
        with self._lock:
            cur = self._db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", data)
            self._db.commit()
            self._item_cache = None
            return cur.rowcount

    def write_users(self, rows: Iterable[Tuple[str, int, Sequence[int]]]) -> int:
        """Rows of (user_id, user_index, profile indices [USER_PROFILE_DIM])."""
        data = ((str(u), int(i), _blob(p, np.int64)) for u, i, p in rows)
        with self._lock:
            cur = self._db.executemany("INSERT OR REPLACE INTO users VALUES (?, ?, ?)", data)
            self._db.commit()
            return cur.rowcount

    def write_behaviours(self, rows: Iterable[Tuple[str, int, int, int, Sequence[int],
                                                    Sequence[float], int]]) -> int:
        """Bulk rows of (user_id, timestamp_ms, item_index, author_index, category, engagement,
        source), appended in the given order (give each user's rows oldest first)."""
        data = ((str(u), int(t), int(i), int(a), _blob(c, np.int64), _blob(e, np.float32),
                 int(s)) for u, t, i, a, c, e, s in rows)
        with self._lock:
            cur = self._db.executemany(
                "INSERT INTO behaviours (user_id, timestamp_ms, item_index, author_index, "
                "category, engagement, source) VALUES (?, ?, ?, ?, ?, ?, ?)", data)
            self._db.commit()
            return cur.rowcount

    def write_query_vocab(self, rows: Iterable[Tuple[int, str, Sequence[float]]]) -> int:
        """Rows of (raw token_id, word, embedding [D])."""
        data = ((int(t), str(w), _blob(e, np.float32)) for t, w, e in rows)
        with self._lock:
            cur = self._db.executemany("INSERT OR REPLACE INTO query_vocab VALUES (?, ?, ?)",
                                       data)
            self._db.commit()
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- reading ----------------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence = ()) -> List[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def metadata(self) -> F.DatasetMetadata:
        if self._metadata is None:
            row = self._query("SELECT value FROM meta WHERE key='dataset_metadata'")
            if not row:
                raise ValueError(f"{self.path} holds no dataset metadata")
            raw = json.loads(row[0][0])
            self._metadata = F.DatasetMetadata(**raw)
        return self._metadata

    def counts(self) -> Dict[str, int]:
        """Rows per table (items, users, behaviours, query_vocab)."""
        return {t: self._query(f"SELECT COUNT(*) FROM {t}")[0][0]
                for t in ("items", "users", "behaviours", "query_vocab")}

    def user(self, user_id: str) -> Optional[Dict[str, Any]]:
        row = self._query("SELECT user_index, profile FROM users WHERE user_id=?", (str(user_id),))
        if not row:
            return None
        return {"user_index": int(row[0][0]), "user_profile": _i64(row[0][1]).tolist()}

    def behaviours_before(self, user_id: str, before_ms: int, limit: Optional[int] = None
                          ) -> Dict[str, np.ndarray]:
        sql = ("SELECT b.item_index, b.author_index, b.category, b.engagement, b.source, "
               "b.timestamp_ms, COALESCE(i.item_id, '') FROM behaviours b "
               "LEFT JOIN items i ON i.item_index = b.item_index "
               "WHERE b.user_id=? AND b.timestamp_ms < ? ORDER BY b.timestamp_ms DESC, b.seq DESC")
        params: List[Any] = [str(user_id), int(min(int(before_ms), np.iinfo(np.int64).max))]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(int(limit), 0))
        rows = self._query(sql, params)
        levels, dim = F.NUM_CATEGORY_LEVELS, F.ENGAGEMENT_DIM
        return {
            "item_id": np.asarray([r[6] for r in rows], dtype=object),
            "item_index": np.asarray([r[0] for r in rows], np.int64),
            "author_index": np.asarray([r[1] for r in rows], np.int64),
            "category": np.asarray([_i64(r[2]) for r in rows], np.int64).reshape(-1, levels),
            "engagement": np.asarray([_f32(r[3]) for r in rows], np.float32).reshape(-1, dim),
            "source": np.asarray([r[4] for r in rows], np.int64),
            "timestamp_ms": np.asarray([r[5] for r in rows], np.int64),
        }

    def _all_items(self) -> Dict[str, np.ndarray]:
        if self._item_cache is None:
            rows = self._query("SELECT item_index, item_id, author_index, category, embedding "
                               "FROM items ORDER BY item_index")
            dim = self.metadata().embedding_dim
            self._item_cache = {
                "item_id": np.asarray([r[1] for r in rows], dtype=object),
                "item_index": np.asarray([r[0] for r in rows], np.int64),
                "author_index": np.asarray([r[2] for r in rows], np.int64),
                "category": np.asarray([_i64(r[3]) for r in rows], np.int64).reshape(
                    -1, F.NUM_CATEGORY_LEVELS),
                "embedding": np.asarray([_f32(r[4]) for r in rows], np.float32).reshape(-1, dim),
            }
        return self._item_cache

    def items(self, indices: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
        table = self._all_items()
        if indices is None:
            return {k: v.copy() for k, v in table.items()}
        wanted = np.asarray(indices, np.int64).reshape(-1)
        pos = np.searchsorted(table["item_index"], wanted)
        ok = (pos < len(table["item_index"])) & (
            table["item_index"][np.minimum(pos, max(len(table["item_index"]) - 1, 0))] == wanted
            if len(table["item_index"]) else np.zeros_like(wanted, bool))
        if not np.all(ok):
            raise KeyError(f"unknown item indices {wanted[~ok][:10].tolist()}")
        return {k: v[pos] for k, v in table.items()}

    def item_index(self, raw_ids: Sequence[str]) -> np.ndarray:
        table = self._all_items()
        lookup = dict(zip(table["item_id"].tolist(), table["item_index"].tolist()))
        return np.asarray([lookup.get(str(r), F.OOV_INDEX) for r in raw_ids], np.int64)

    def item_embeddings(self) -> np.ndarray:
        table = self._all_items()
        size = int(max(self.metadata().num_items, table["item_index"].max(initial=0))) + 1
        out = np.zeros((size, self.metadata().embedding_dim), np.float32)
        out[table["item_index"]] = table["embedding"]
        return out

    def encode_query(self, query: Union[str, Sequence[str], Sequence[int]]
                     ) -> Tuple[List[int], np.ndarray]:
        dim = self.metadata().embedding_dim
        buckets = self.metadata().query_token_buckets
        if isinstance(query, str):
            query = query.split()
        query = list(query)
        found: List[Tuple[int, np.ndarray]] = []
        for term in query:
            if isinstance(term, (int, np.integer)):
                row = self._query("SELECT token_id, embedding FROM query_vocab WHERE token_id=?",
                                  (int(term),))
            else:
                row = self._query("SELECT token_id, embedding FROM query_vocab WHERE word=? "
                                  "ORDER BY token_id LIMIT 1", (str(term),))
            if row:
                found.append((int(row[0][0]), _f32(row[0][1])))
        found = found[:F.MAX_QUERY_TOKENS]
        if not found:
            return [], np.zeros((dim,), np.float32)
        tokens = [F.query_token_index(t, buckets) for t, _ in found]
        return tokens, normalised_mean(np.stack([e for _, e in found]))

    def add_behaviours(self, user_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
        table = self._all_items()
        by_index = {int(i): k for k, i in enumerate(table["item_index"].tolist())}
        by_id = dict(zip(table["item_id"].tolist(), table["item_index"].tolist()))
        out = []
        for row in rows:
            if "item_index" in row:
                index = int(row["item_index"])
            elif str(row.get("item_id")) in by_id:
                index = int(by_id[str(row["item_id"])])
            else:
                raise KeyError(f"unknown item {row.get('item_id')!r} in behaviour {dict(row)}")
            if index not in by_index:
                raise KeyError(f"unknown item index {index} in behaviour {dict(row)}")
            k = by_index[index]
            timestamp = int(row["timestamp_ms"])
            if timestamp < 0:
                raise ValueError(f"negative timestamp in behaviour {dict(row)}")
            engagement = np.asarray(row.get("engagement", np.zeros(F.ENGAGEMENT_DIM)), np.float32)
            if engagement.reshape(-1).shape[0] != F.ENGAGEMENT_DIM:
                raise ValueError(f"engagement must have {F.ENGAGEMENT_DIM} values: {dict(row)}")
            out.append((user_id, timestamp, index, int(table["author_index"][k]),
                        table["category"][k], engagement,
                        int(row.get("source", F.SOURCE_UNKNOWN))))
        out.sort(key=lambda r: r[1])  # stable: equal timestamps keep the given order
        return self.write_behaviours(out)
