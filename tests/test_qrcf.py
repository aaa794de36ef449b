"""QRCF retrieval (serving/qrcf.py) and its item-to-item table (preprocessing/item_to_item.py,
Beam on the in-process runner), against hand-computed expectations."""
import json
import math
import os

import numpy as np
import pytest

from common import features as F
from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore
from common.item_to_item import read_item_to_item, read_manifest
from common.relevance import stage1_top_k
from preprocessing import item_to_item as I2I
from serving import qrcf as Q

HOUR = 3_600_000
T0 = 1_700_000_000_000
CUTOFF = T0 + 40 * HOUR  # the eval split's start in the hand-written log
DIM = 3

# ---- a tiny feature store -----------------------------------------------------------------------
# Item embeddings (query = x axis): cosines to the query are written next to each item.
EMBEDDINGS = {
    1: (1.0, 0.0, 0.0),  # 1.0
    2: (0.8, 0.6, 0.0),  # 0.8
    3: (0.0, 1.0, 0.0),  # 0.0
    4: (0.6, 0.8, 0.0),  # 0.6
    5: (0.0, 0.0, 1.0),  # 0.0
    6: (0.0, 0.0, 1.0),
    7: (0.0, 0.0, 0.0),  # no embedding
    10: (1.0, 0.0, 0.0),  # 1.0
    11: (0.6, 0.8, 0.0),  # 0.6
    12: (0.0, 0.0, 1.0),  # 0.0
    13: (0.0, 0.0, 0.0),  # no embedding
    14: (1.0, 0.0, 0.0),  # 1.0
}
NUM_ITEMS = 14
QUERY = np.asarray([1.0, 0.0, 0.0], np.float32)


def _engagement(watch=0.0, like=0.0, follow=0.0, share=0.0):
    return (watch, like, follow, share)


# The co-occurrence log (hours after T0, item). Window 2 h; cutoff at 40 h.
LOG = {
    "u1": [(0, 1), (1, 2), (2, 3), (10, 4)],
    "u2": [(0, 1), (0.5, 2), (1, 1), (30, 5)],
    "u3": [(0, 2), (3, 3), (4, 5), (39, 5), (40, 4), (41, 3)],  # 40 h: exactly at the cutoff
    "u4": [(0, 1), (45, 6), (45.5, 1)],
    "u5": [],
}


def _embedding_table():
    table = np.zeros((NUM_ITEMS + 1, DIM), np.float32)
    for index, vector in EMBEDDINGS.items():
        table[index] = vector
    return table


def _write_output_dir(directory, histories):
    """A preprocessing output with just what the i2i build and QRCF read: the feature store
    and vocab/users.txt. `histories`: user -> [(timestamp_ms, item, engagement)] oldest first."""
    os.makedirs(os.path.join(directory, F.VOCAB_DIR), exist_ok=True)
    users = sorted(histories)
    with open(os.path.join(directory, F.VOCAB_DIR, "users.txt"), "w") as f:
        f.write("".join(f"{u}\n" for u in users))
    metadata = F.DatasetMetadata(embedding_dim=DIM, num_items=NUM_ITEMS, num_authors=1,
                                 num_categories=1, num_users=len(users))
    table = _embedding_table()
    store = SqliteFeatureStore.create(os.path.join(directory, FEATURE_STORE_FILE), metadata)
    store.write_items((i, f"item{i}", 1, (1, 1), table[i]) for i in range(1, NUM_ITEMS + 1))
    store.write_users((u, k + 1, (1, 1, 1, 1)) for k, u in enumerate(users))
    for user in users:
        store.write_behaviours((user, t, item, 1, (1, 1), engagement, F.SOURCE_FEED)
                               for t, item, engagement in histories[user])
    store.close()
    return directory


def _log_histories():
    return {u: [(T0 + int(h * HOUR), item, _engagement(watch=1.0)) for h, item in rows]
            for u, rows in LOG.items()}


@pytest.fixture(scope="module")
def log_output(tmp_path_factory):
    directory = _write_output_dir(str(tmp_path_factory.mktemp("i2i_log")), _log_histories())
    with open(os.path.join(directory, "stats.json"), "w") as f:
        json.dump({"split_cutoffs_ms": {"eval": CUTOFF, "test": CUTOFF + 100 * HOUR}}, f)
    return directory


@pytest.fixture(scope="module")
def built_table(log_output):
    """The CLI on the log: cutoff read from stats.json, 2 h window, 2 neighbours per item."""
    code = I2I.main(["--data", log_output, "--window-hours", "2", "--neighbours", "2"])
    assert code == 0
    return read_item_to_item(log_output), read_manifest(log_output)


# ---- the item-to-item table ---------------------------------------------------------------------
def test_beam_table_equals_the_hand_count(built_table):
    table, manifest = built_table
    # Before the 40 h cutoff, with a 2 h window (inclusive):
    #   u1 items {1,2,3,4} (vote 1/ln 5), pairs {1,2} (1 h), {1,3} (2 h: on the boundary), {2,3}
    #   u2 items {1,2,5}   (vote 1/ln 4), pair {1,2} (twice, counted once); 5 is 29 h later
    #   u3 items {2,3,5}   (vote 1/ln 4), pair {3,5}; {2,3} is 3 h apart
    #   u4 items {1}, no pair;  u5 nothing
    # Users per item: U1 = 3 (u1,u2,u4), U2 = 3, U3 = 2, U4 = 1, U5 = 2.
    a, b = 1 / math.log(5), 1 / math.log(4)
    w12 = (a + b) / math.sqrt(3 * 3)
    w13 = a / math.sqrt(3 * 2)
    w23 = a / math.sqrt(3 * 2)
    w35 = b / math.sqrt(2 * 2)
    expected = {
        1: [(2, w12), (3, w13)],
        2: [(1, w12), (3, w23)],
        3: [(5, w35), (1, w13)],  # (2, w23) ties with (1, w13) and loses on index: top 2 only
        5: [(3, w35)],
    }
    assert sorted(table) == sorted(expected)
    for item, neighbours in expected.items():
        assert [j for j, _ in table[item]] == [j for j, _ in neighbours], item
        np.testing.assert_allclose([w for _, w in table[item]], [w for _, w in neighbours],
                                   rtol=1e-12, err_msg=str(item))
    assert manifest["before_ms"] == CUTOFF
    assert manifest["cutoff_source"] == "stats.json: split_cutoffs_ms.eval"
    assert manifest["neighbours"] == 2 and manifest["window_hours"] == 2.0
    counts = manifest["counts"]
    assert counts["users"] == 5
    assert counts["users_without_history_before_cutoff"] == 1  # u5
    assert counts["behaviours_before_cutoff"] == 13
    assert counts["behaviours_at_or_after_cutoff"] == 4
    assert counts["item_pairs"] == 4


def test_behaviours_at_or_after_the_cutoff_never_enter_the_table(built_table, log_output,
                                                                 tmp_path):
    table, _ = built_table
    # After the cutoff u3 pairs 5-4 (40 h) and 4-3 (41 h), u4 pairs 6-1: none may appear.
    assert 4 not in table and 6 not in table
    assert all(j not in (4, 6) for neighbours in table.values() for j, _ in neighbours)
    # The same log with a later cutoff does produce them, so the check above can fail.
    later = _write_output_dir(str(tmp_path / "later"), _log_histories())
    I2I.build_item_to_item(later, T0 + 50 * HOUR, I2I.ItemToItemSettings(window_hours=2),
                           progress=lambda _: None)
    with_future = read_item_to_item(later)
    assert {j for j, _ in with_future[4]} == {3, 5}
    assert [j for j, _ in with_future[6]] == [1]


def test_window_pairs_respects_the_window_and_the_per_behaviour_cap():
    times = np.asarray([0, 1, 2, 10], np.int64) * HOUR
    items = np.asarray([1, 2, 3, 4])
    pairs = I2I.window_pairs(times, items, 2 * HOUR, max_window_behaviours=100)
    assert pairs.tolist() == [[1, 2], [1, 3], [2, 3]]
    capped = I2I.window_pairs(times, items, 2 * HOUR, max_window_behaviours=1)
    assert capped.tolist() == [[1, 2], [2, 3]]
    whole = I2I.window_pairs(times, items, I2I.NO_WINDOW, max_window_behaviours=100)
    assert len(whole) == 6
    assert I2I.window_pairs(times[:1], items[:1], 2 * HOUR, 100).shape == (0, 2)


def test_cli_requires_a_cutoff_when_none_is_recorded(tmp_path, capsys):
    directory = _write_output_dir(str(tmp_path / "no_cutoff"), {"u1": []})
    assert I2I.main(["--data", directory]) == 2
    assert "--before-ms" in capsys.readouterr().err
    assert I2I.main(["--data", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        I2I.main(["--data", directory, "--neighbours", "0"])
    with pytest.raises(FileNotFoundError):
        read_item_to_item(directory)  # nothing built: refused, not an empty table


# ---- QRCF ---------------------------------------------------------------------------------------
# History, most recent first: (item, engagement). Cosines to QUERY: 0, 1, .8, none, .8, .6.
HISTORY = [
    (3, _engagement(watch=1.0)),
    (1, _engagement(watch=1.5, like=1.0)),  # watch ratio clipped to 1: weight 1 + 1 + 1 = 3
    (2, _engagement(watch=0.2)),  # 1.2
    (7, _engagement(watch=1.0)),  # item without embedding
    (2, _engagement(watch=1.0)),  # 2
    (4, _engagement(watch=1.0)),
]
TABLE = {
    1: [(10, 0.5), (11, 0.4), (12, 0.3), (14, 0.2)],
    2: [(13, 0.9), (11, 0.5)],
    4: [(10, 1.0)],
}
CONFIG = Q.QRCFConfig(seed_k=3, seed_eps=0.5, neighbours_per_seed=3, min_relevance=0.5)


def _history_arrays():
    items = np.asarray([i for i, _ in HISTORY], np.int64)
    engagement = np.asarray([e for _, e in HISTORY], np.float32)
    return items, engagement


def test_qrcf_ranks_the_hand_computed_items_and_explains_them():
    items, engagement = _history_arrays()
    result = Q.qrcf_from_history(QUERY, items, engagement, _embedding_table(), TABLE, CONFIG)
    # Seeds: positions 1 (cos 1), 2 and 4 (cos .8, tied); position 5 (.6) is 4th, pos 0 < eps.
    assert result.seed_positions.tolist() == [1, 2, 4]
    f1, f2, f4 = 1.0 * 3.0, 0.8 * 1.2, 0.8 * 2.0  # relevance x engagement weight
    # 10: 3 x .5 = 1.5; 11: 3 x .4 + .96 x .5 + 1.6 x .5 = 2.48; 12 below min relevance;
    # 13 has no embedding; 14 is item 1's 4th neighbour (3 per seed); item 4 is no seed.
    assert result.reason is None
    assert result.item_indices == [11, 10]
    np.testing.assert_allclose([r.score for r in result.items],
                               [f1 * 0.4 + f2 * 0.5 + f4 * 0.5, f1 * 0.5], rtol=1e-6)
    np.testing.assert_allclose([r.relevance for r in result.items], [0.6, 1.0], rtol=1e-6)
    explained = result.items[0].seeds
    assert [c.seed.position for c in explained] == [1, 4, 2]  # strongest contribution first
    assert [c.seed.item_index for c in explained] == [1, 2, 2]
    np.testing.assert_allclose([c.i2i_weight for c in explained], [0.4, 0.5, 0.5])
    np.testing.assert_allclose([c.seed.engagement_weight for c in explained], [3.0, 2.0, 1.2],
                               rtol=1e-6)
    assert result.counts["neighbours_without_embedding"] == 1
    assert result.counts["neighbours_below_min_relevance"] == 1
    assert result.counts["seeds"] == 3


def test_qrcf_seed_step_is_stage1_top_k():
    items, engagement = _history_arrays()
    embeddings = _embedding_table()
    for k, eps in ((3, 0.5), (2, 0.5), (6, 0.0), (1, 0.9), (4, 0.95)):
        config = Q.QRCFConfig(seed_k=k, seed_eps=eps, min_relevance=0.0)
        result = Q.qrcf_from_history(QUERY, items, engagement, embeddings, TABLE, config)
        expected = stage1_top_k(QUERY, embeddings[items], k, eps)
        assert result.seed_positions.tolist() == expected.tolist(), (k, eps)
    # k = 2: the tie between positions 2 and 4 goes to the more recent one.
    two = Q.qrcf_from_history(QUERY, items, engagement, embeddings, TABLE,
                              Q.QRCFConfig(seed_k=2, seed_eps=0.5))
    assert two.seed_positions.tolist() == [1, 2]
    # eps = 0 selects the item without an embedding (cosine 0): counted and skipped as a seed.
    everything = Q.qrcf_from_history(QUERY, items, engagement, embeddings, TABLE,
                                     Q.QRCFConfig(seed_k=6, seed_eps=0.0))
    assert everything.seed_positions.tolist() == [0, 1, 2, 3, 4, 5]
    assert everything.counts["seeds_without_embedding"] == 1
    assert 3 not in [s.position for s in everything.seeds]
    # On random histories with many repeated items (ties), for several K and eps.
    rng = np.random.default_rng(3)
    catalog = rng.normal(size=(30, 8)).astype(np.float32)
    catalog[0] = 0
    for _ in range(20):
        history = rng.integers(0, 30, rng.integers(1, 60))
        query = rng.normal(size=8).astype(np.float32)
        k, eps = int(rng.integers(1, 10)), float(rng.choice([0.0, 0.1, 0.3]))
        result = Q.qrcf_from_history(query, history, np.ones((len(history), 4), np.float32),
                                     catalog, {}, Q.QRCFConfig(seed_k=k, seed_eps=eps))
        assert result.seed_positions.tolist() == stage1_top_k(query, catalog[history], k,
                                                               eps).tolist()


def test_qrcf_empty_results_carry_a_reason():
    embeddings = _embedding_table()
    empty = Q.qrcf_from_history(QUERY, np.zeros((0,), np.int64), np.zeros((0, 4), np.float32),
                                embeddings, TABLE, CONFIG)
    assert empty.items == [] and empty.reason == Q.EMPTY_HISTORY and empty.explanation
    items, engagement = _history_arrays()
    off_topic = Q.qrcf_from_history((0.0, 0.0, 1.0), items, engagement, embeddings, TABLE,
                                    CONFIG)
    assert off_topic.items == [] and off_topic.reason == Q.NO_RELEVANT_BEHAVIOURS
    no_query = Q.qrcf_from_history((0.0, 0.0, 0.0), items, engagement, embeddings, TABLE, CONFIG)
    assert no_query.reason == Q.QUERY_WITHOUT_EMBEDDING
    no_table = Q.qrcf_from_history(QUERY, items, engagement, embeddings, {}, CONFIG)
    assert no_table.reason == Q.NO_NEIGHBOURS and no_table.counts["seeds"] == 3
    strict = Q.qrcf_from_history(QUERY, items, engagement, embeddings, TABLE,
                                 Q.QRCFConfig(seed_k=3, seed_eps=0.5, min_relevance=1.0))
    # only the neighbours with cosine 1; item 14 now comes in (50 neighbours per seed)
    assert strict.item_indices == [10, 14]
    none_left = Q.qrcf_from_history(QUERY, items, engagement, embeddings, {1: [(12, 1.0)]},
                                    CONFIG)
    assert none_left.reason == Q.NO_RELEVANT_NEIGHBOURS


def test_retriever_reads_the_store_strictly_before_now(tmp_path):
    now = T0 + 100 * HOUR
    # Oldest first in the store; the last behaviour sits exactly at `now` and must not seed:
    # item 4 (cos .6) with full engagement would otherwise bring item 10 with weight 1.0.
    rows = [(now - (len(HISTORY) - k) * HOUR, item, engagement)
            for k, (item, engagement) in enumerate(reversed(HISTORY))]
    rows.append((now, 4, _engagement(1.0, 1.0, 1.0, 1.0)))
    directory = _write_output_dir(str(tmp_path / "store"), {"searcher": rows, "idle": []})
    store = SqliteFeatureStore(os.path.join(directory, FEATURE_STORE_FILE))
    retriever = Q.QRCFRetriever(store, TABLE, Q.QRCFConfig(seed_k=4, seed_eps=0.5,
                                                           neighbours_per_seed=3,
                                                           min_relevance=0.5))
    result = retriever.retrieve("searcher", QUERY, now)
    items, engagement = _history_arrays()
    direct = Q.qrcf_from_history(QUERY, items, engagement, _embedding_table(), TABLE,
                                 retriever.config)
    assert result.seed_positions.tolist() == [1, 2, 4, 5]
    # 10: 3 x .5 + (.6 x 2) x 1.0 = 2.7 (the seed at `now` would add 3 more); 11: 2.48
    assert result.item_indices == direct.item_indices == [10, 11]
    np.testing.assert_allclose([r.score for r in result.items],
                               [r.score for r in direct.items])
    assert result.items[0].seeds[0].seed.timestamp_ms == now - 2 * HOUR  # position 1
    assert retriever.retrieve("idle", QUERY, now).reason == Q.EMPTY_HISTORY
    assert retriever.retrieve("nobody", QUERY, now).reason == Q.UNKNOWN_USER
    assert retriever.retrieve("searcher", QUERY, T0).reason == Q.EMPTY_HISTORY
    store.close()


def test_config_rejects_unusable_settings():
    with pytest.raises(ValueError):
        Q.QRCFConfig(seed_k=0)
    with pytest.raises(ValueError):
        Q.QRCFConfig(seed_eps=-0.1)  # a negative relevance would vote against items
    with pytest.raises(ValueError):
        Q.QRCFConfig(engagement_base=0.0, engagement_coefficients=(0, 0, 0, 0))
    np.testing.assert_allclose(
        Q.engagement_weight([[0.1, 0, 0, 0], [1.5, 1, 0, 0], [-1, 0, 0, 2]]), [1.1, 3.0, 2.0])
