"""Round trip of common.feature_store.SqliteFeatureStore (no Beam: the pipeline's own output is
checked against it in test_preprocessing_end_to_end)."""
import sqlite3
import threading

import numpy as np
import pytest

from common import features as F
from common.feature_store import FeatureStore, SqliteFeatureStore

DIM = 3


@pytest.fixture()
def store(tmp_path):
    path = str(tmp_path / "fs.sqlite")
    s = SqliteFeatureStore.create(path, F.DatasetMetadata(embedding_dim=DIM, num_items=3,
                                                           query_token_buckets=11))
    s.write_items([(2, "b", 1, [1, 2], [0, 1, 0]), (1, "a", 2, [2, 0], [1, 0, 0]),
                   (3, "c", 0, [0, 0], [0, 0, 2])])
    s.write_users([("u", 1, [4, 3, 2, 1])])
    s.write_behaviours([("u", 100, 1, 2, [2, 0], [0.5, 1, 0, 0], F.SOURCE_FEED),
                        ("u", 200, 2, 1, [1, 2], [0.1, 0, 0, 0], F.SOURCE_SEARCH),
                        ("u", 200, 3, 0, [0, 0], [0.2, 0, 0, 0], F.SOURCE_FEED),
                        ("v", 150, 3, 0, [0, 0], [0, 0, 0, 0], F.SOURCE_FEED)])
    s.write_query_vocab([(7, "cat", [1, 0, 0]), (30, "dog", [0, 3, 0])])
    s.close()
    reopened = SqliteFeatureStore(path)
    yield reopened
    reopened.close()


def test_users_items_and_metadata_round_trip(store):
    assert isinstance(store, FeatureStore)
    assert store.user("u") == {"user_index": 1, "user_profile": [4, 3, 2, 1]}
    assert store.user("nobody") is None
    assert store.metadata().embedding_dim == DIM and store.metadata().num_items == 3
    items = store.items()
    assert items["item_id"].tolist() == ["a", "b", "c"]
    assert items["category"].tolist() == [[2, 0], [1, 2], [0, 0]]
    some = store.items([3, 1])
    assert some["item_id"].tolist() == ["c", "a"] and some["author_index"].tolist() == [0, 2]
    with pytest.raises(KeyError):
        store.items([9])
    assert store.item_index(["c", "zz", "a"]).tolist() == [3, 0, 1]
    table = store.item_embeddings()
    assert table.shape == (4, DIM) and not table[0].any()
    np.testing.assert_array_equal(table[3], [0, 0, 2])
    assert store.counts() == {"items": 3, "users": 1, "behaviours": 4, "query_vocab": 2}


def test_behaviours_are_strictly_before_and_most_recent_first(store):
    assert store.behaviours_before("u", 100)["item_index"].size == 0
    h = store.behaviours_before("u", 200)
    assert h["item_index"].tolist() == [1] and h["timestamp_ms"].tolist() == [100]
    h = store.behaviours_before("u", 201)
    # equal timestamps: the later-added row is the more recent
    assert h["item_index"].tolist() == [3, 2, 1]
    assert h["item_id"].tolist() == ["c", "b", "a"]
    assert h["category"].shape == (3, F.NUM_CATEGORY_LEVELS)
    np.testing.assert_allclose(h["engagement"][2], [0.5, 1, 0, 0])
    assert h["source"].tolist() == [F.SOURCE_FEED, F.SOURCE_SEARCH, F.SOURCE_FEED]
    assert store.behaviours_before("u", 10**15, limit=2)["item_index"].tolist() == [3, 2]
    assert store.behaviours_before("stranger", 10**15)["item_index"].size == 0
    rows = store.behaviours("u", 201, 1)  # serving.client.FeatureStoreView layout
    assert rows == [{"item_id": "c", "item_index": 3, "author_index": 0, "category": [0, 0],
                     "engagement": pytest.approx([0.2, 0, 0, 0]), "source": F.SOURCE_FEED,
                     "timestamp_ms": 200}]


def test_add_behaviours_resolves_items_and_rejects_unknown(store):
    n = store.add_behaviours("u", [{"item_id": "b", "timestamp_ms": 300, "source": 2},
                                   {"item_index": 1, "timestamp_ms": 250,
                                    "engagement": [1, 1, 0, 0]}])
    assert n == 2
    h = store.behaviours_before("u", 301, 2)
    assert h["item_index"].tolist() == [2, 1]
    assert h["author_index"].tolist() == [1, 2] and h["category"].tolist() == [[1, 2], [2, 0]]
    with pytest.raises(KeyError):
        store.add_behaviours("u", [{"item_id": "b", "timestamp_ms": 1},
                                   {"item_id": "ghost", "timestamp_ms": 2}])
    with pytest.raises(ValueError):
        store.add_behaviours("u", [{"item_id": "b", "timestamp_ms": -1}])
    assert store.counts()["behaviours"] == 6  # nothing of the failed calls was written


def test_encode_query_words_ids_and_unknowns(store):
    tokens, emb = store.encode_query("cat dog unknown")
    assert tokens == [F.query_token_index(7, 11), F.query_token_index(30, 11)]
    np.testing.assert_allclose(emb, np.array([0.5, 1.5, 0]) / np.linalg.norm([0.5, 1.5, 0]),
                               rtol=1e-6)
    tokens2, emb2 = store.encode_query([7, 30])
    assert tokens2 == tokens and np.allclose(emb2, emb)
    assert store.encode_query(["cat"])[0] == [F.query_token_index(7, 11)]
    empty_tokens, empty = store.encode_query("zebra")
    assert empty_tokens == [] and empty.shape == (DIM,) and not empty.any()


def test_threads_share_one_store(store):
    errors = []

    def read():
        try:
            for _ in range(50):
                assert store.behaviours_before("u", 201)["item_index"].tolist() == [3, 2, 1]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors


def test_missing_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m preprocessing"):
        SqliteFeatureStore(str(tmp_path / "nope.sqlite"))
    other = str(tmp_path / "other.sqlite")
    sqlite3.connect(other).execute("CREATE TABLE t (x INTEGER)").connection.commit()
    with pytest.raises(ValueError, match="not a feature store"):
        SqliteFeatureStore(other)
