"""RSU stage 1 over whole histories: exact and ScaNN backends, updates, edge cases, threads."""
import threading
import time

import numpy as np
import pytest

from common import features
from serving.behaviour_index import Stage1Config, Stage1Searcher, select_top_k

DIM = features.DEFAULT_EMBEDDING_DIM


def reference_top_k(table, items, times, query, k, before_ms=None, threshold=None):
    """Hand-written reference: full sort by (cosine desc, recency desc); returns chronological
    rows most recent first. Histories are given already sorted by time."""
    items, times = np.asarray(items), np.asarray(times)
    visible = len(times) if before_ms is None else int(np.sum(times < before_ms))
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-30)
    unit[np.linalg.norm(table, axis=1) == 0] = 0
    q = np.asarray(query, np.float64)
    q = q / np.linalg.norm(q) if np.linalg.norm(q) > 0 else q
    scores = (unit[items[:visible]].astype(np.float32) @ q.astype(np.float32))
    rows = np.arange(visible)
    if threshold is not None:
        rows = rows[scores >= np.float32(threshold)]
    order = sorted(rows.tolist(), key=lambda r: (-scores[r], -r))[:k]
    return np.array(sorted(order, reverse=True), dtype=np.int64)


def clustered_table(rng, num_items, num_topics=40, noise=0.35):
    centres = rng.normal(size=(num_topics, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = rng.integers(0, num_topics, num_items)
    table = centres[topic] + noise * rng.normal(size=(num_items, DIM)) / np.sqrt(DIM)
    return np.vstack([np.zeros((1, DIM)), table]).astype(np.float32), centres


def history(rng, length, num_items, start_ms=1_000_000):
    items = rng.integers(1, num_items + 1, length)
    times = start_ms + np.cumsum(rng.integers(1, 5000, length))
    return items, times


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    table, centres = clustered_table(rng, 5000)
    return rng, table, centres


def small_scann_config(**overrides):
    settings = dict(scann_min_history=1000, delta_rebuild_size=200, delta_rebuild_fraction=0.0,
                    background_rebuild=False, min_reorder=200)
    settings.update(overrides)
    return Stage1Config(**settings)


def test_select_top_k_breaks_ties_by_recency_and_orders_most_recent_first():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5], np.float32)
    rows = np.arange(5)
    chosen = select_top_k(scores, rows, 3)
    # 0.9 (row 1) then the two most recent 0.5 (rows 4, 2); output most recent first.
    assert rows[chosen].tolist() == [4, 2, 1]
    assert rows[select_top_k(scores, rows, 10, threshold=0.5)].tolist() == [4, 2, 1, 0]
    assert select_top_k(scores, rows, 0).shape == (0,)


def test_exact_backend_matches_reference_with_time_cut_and_threshold(data):
    rng, table, centres = data
    items, times = history(rng, 1500, 5000)
    searcher = Stage1Searcher(table, Stage1Config(scann_min_history=100_000))
    searcher.set_history("u", items, times)
    for trial in range(20):
        query = centres[trial % len(centres)] + 0.2 * rng.normal(size=DIM)
        before = int(times[rng.integers(0, len(times))]) if trial % 2 else None
        threshold = 0.3 if trial % 3 == 0 else None
        got = searcher.top_k("u", query, 50, before_ms=before, threshold=threshold)
        want = reference_top_k(table, items, times, query, 50, before, threshold)
        assert got.backend == "exact"
        np.testing.assert_array_equal(got.rows, want)
        np.testing.assert_array_equal(got.item_indices, items[want])
        np.testing.assert_array_equal(got.timestamps_ms, times[want])
        assert np.all(np.diff(got.timestamps_ms) <= 0), "most recent first"
        np.testing.assert_array_equal(got.positions, got.history_length - 1 - got.rows)
        if before is not None:
            assert np.all(got.timestamps_ms < before)
        if threshold is not None:
            assert np.all(got.scores >= threshold)


def test_scann_backend_recall_and_exact_scores(data):
    rng, table, centres = data
    items, times = history(rng, 6000, 5000)
    searcher = Stage1Searcher(table, small_scann_config(scann_min_history=2000))
    searcher.set_history("u", items, times)
    assert searcher.user_stats("u")["base_rows"] == 6000
    recalls = []
    for trial in range(30):
        query = centres[trial % len(centres)] + 0.3 * rng.normal(size=DIM)
        got = searcher.top_k("u", query, 100)
        want = reference_top_k(table, items, times, query, 100)
        assert got.backend == "scann" and len(got) == 100
        recalls.append(len(set(got.rows.tolist()) & set(want.tolist())) / 100)
        # Scores are exact cosines of the returned behaviours.
        unit = table[items[got.rows]] / np.linalg.norm(table[items[got.rows]], axis=1,
                                                        keepdims=True)
        q = query / np.linalg.norm(query)
        np.testing.assert_allclose(got.scores, unit @ q, atol=1e-5)
        assert np.all(np.diff(got.rows) < 0)
    # Small, harsh clustered data (40 topics); the benchmark measures recall at 10^4 and 10^5.
    assert np.mean(recalls) >= 0.9, recalls


def test_scann_searching_every_leaf_equals_exact_including_time_cut(data):
    rng, table, centres = data
    items, times = history(rng, 3000, 5000)
    exhaustive = small_scann_config(leaves_to_search_fraction=1.0, reorder_multiplier=100.0,
                                    min_reorder=3000)
    searcher = Stage1Searcher(table, exhaustive)
    searcher.set_history("u", items, times)
    for trial in range(10):
        query = centres[trial] + 0.3 * rng.normal(size=DIM)
        before = int(times[-1 - 50 * trial])  # hides up to 450 rows of the base
        got = searcher.top_k("u", query, 64, before_ms=before)
        assert got.backend == "scann"
        np.testing.assert_array_equal(got.rows, reference_top_k(table, items, times, query, 64,
                                                                before))


def test_incremental_delta_then_rebuild(data):
    rng, table, centres = data
    items, times = history(rng, 4000, 5000)
    exhaustive = small_scann_config(leaves_to_search_fraction=1.0, reorder_multiplier=100.0,
                                    min_reorder=5000, delta_rebuild_size=300)
    searcher = Stage1Searcher(table, exhaustive)
    searcher.set_history("u", items[:3000], times[:3000])
    searcher.add_behaviours("u", items[3000:3200], times[3000:3200])
    stats = searcher.user_stats("u")
    assert (stats["base_rows"], stats["delta_rows"]) == (3000, 200), "no rebuild below the limit"
    query = centres[3]
    np.testing.assert_array_equal(searcher.top_k("u", query, 80).rows,
                                  reference_top_k(table, items[:3200], times[:3200], query, 80))
    # The newest behaviours are found even though they are only in the exact delta buffer.
    newest = searcher.top_k("u", table[items[3199]], 1)
    assert newest.rows.tolist() == [int(np.flatnonzero(items[:3200] == items[3199]).max())]
    searcher.add_behaviours("u", items[3200:], times[3200:])
    stats = searcher.user_stats("u")
    assert (stats["base_rows"], stats["delta_rows"]) == (4000, 0), "delta over limit rebuilds"
    assert searcher.counters["rebuilds"] == 1
    np.testing.assert_array_equal(searcher.top_k("u", query, 80).rows,
                                  reference_top_k(table, items, times, query, 80))


def test_crossing_the_scann_threshold_by_appends_builds_an_index(data):
    rng, table, _ = data
    items, times = history(rng, 1200, 5000)
    searcher = Stage1Searcher(table, small_scann_config())
    searcher.set_history("u", items[:900], times[:900])
    assert searcher.top_k("u", table[5], 10).backend == "exact"
    searcher.add_behaviours("u", items[900:], times[900:])
    assert searcher.user_stats("u")["base_rows"] == 1200
    assert searcher.top_k("u", table[5], 10).backend == "scann"


def test_out_of_order_behaviour_is_placed_by_time(data):
    rng, table, _ = data
    items, times = history(rng, 300, 5000)
    searcher = Stage1Searcher(table)
    searcher.set_history("u", items, times)
    late_item, late_time = 17, int(times[10]) + 1  # arrives last, happened early
    searcher.add_behaviours("u", [late_item], [late_time])
    assert searcher.counters["out_of_order_appends"] == 1
    all_items = np.insert(items, 11, late_item)
    all_times = np.insert(times, 11, late_time)
    got = searcher.top_k("u", table[late_item], 300)
    np.testing.assert_array_equal(
        got.rows, reference_top_k(table, all_items, all_times, table[late_item], 300))
    assert 11 in got.rows.tolist()


# ---- edge cases: each gives a correct answer, none an error --------------------------------
def test_empty_history_and_unseen_user(data):
    _, table, _ = data
    searcher = Stage1Searcher(table)
    searcher.set_history("empty", [], [])
    for user in ("empty", "never-seen"):
        got = searcher.top_k(user, table[1], 100)
        assert len(got) == 0 and got.history_length == 0 and got.backend == "none"
    assert searcher.counters["unknown_users"] == 1


def test_unseen_user_is_loaded_once_through_the_loader(data):
    rng, table, centres = data
    items, times = history(rng, 2500, 5000)
    calls = []

    def loader(user_id):
        calls.append(user_id)
        return (items, times) if user_id == "late" else ([], [])

    searcher = Stage1Searcher(table, small_scann_config(), history_loader=loader)
    got = searcher.top_k("late", centres[0], 30)
    assert got.backend == "scann" and got.history_length == 2500
    assert len(searcher.top_k("nobody", centres[0], 30)) == 0
    searcher.top_k("late", centres[1], 30)
    searcher.top_k("nobody", centres[1], 30)
    assert calls == ["late", "nobody"], "each user is loaded once"


def test_fewer_behaviours_than_k(data):
    rng, table, centres = data
    items, times = history(rng, 7, 5000)
    searcher = Stage1Searcher(table)
    searcher.set_history("u", items, times)
    got = searcher.top_k("u", centres[0], 100)
    assert got.rows.tolist() == [6, 5, 4, 3, 2, 1, 0]
    assert got.positions.tolist() == list(range(7))
    # The point-in-time cut leaves fewer still; k = 0 gives nothing.
    assert len(searcher.top_k("u", centres[0], 100, before_ms=int(times[3]))) == 3
    assert len(searcher.top_k("u", centres[0], 0)) == 0
    assert len(searcher.top_k("u", centres[0], 5, before_ms=int(times[0]))) == 0


def test_duplicate_behaviours_keep_the_most_recent_and_scann_survives_them(data):
    rng, table, _ = data
    # 3000 behaviours over only 6 distinct items: massive exact ties and degenerate clusters.
    items = np.tile(np.arange(1, 7), 500)
    times = 1_000 + np.arange(3000) * 10
    for config in (Stage1Config(), small_scann_config()):
        searcher = Stage1Searcher(table, config)
        searcher.set_history("u", items, times)
        got = searcher.top_k("u", table[3], 5)
        np.testing.assert_array_equal(got.rows, reference_top_k(table, items, times, table[3], 5))
        assert set(got.item_indices.tolist()) == {3}, "all five copies of the best item"
        assert got.backend == "exact", "6 distinct items are scored exactly, never by ScaNN"
        if config.scann_min_history <= 3000:
            assert searcher.user_stats("u")["base_rows"] == 3000
            assert searcher.user_stats("u")["distinct_items_indexed"] == 6
        assert got.rows.tolist() == [2996, 2990, 2984, 2978, 2972]


def test_unknown_items_and_zero_query_score_zero_and_fall_back_to_recency(data):
    _, table, _ = data
    searcher = Stage1Searcher(table)
    searcher.set_history("u", [0, 0, 5, 0], [1, 2, 3, 4])
    got = searcher.top_k("u", np.zeros(DIM), 2)
    assert got.rows.tolist() == [3, 2] and np.all(got.scores == 0)


def test_bad_input_is_a_clear_error(data):
    _, table, _ = data
    searcher = Stage1Searcher(table)
    searcher.set_history("u", [1, 2], [1, 2])
    with pytest.raises(ValueError, match="expected 32"):
        searcher.top_k("u", np.ones(DIM + 1), 3)
    with pytest.raises(ValueError, match="NaN"):
        searcher.top_k("u", np.full(DIM, np.nan), 3)
    with pytest.raises(ValueError, match="non-negative"):
        searcher.top_k("u", np.ones(DIM), -1)
    with pytest.raises(ValueError, match="outside"):
        searcher.add_behaviours("u", [len(table)], [5])
    with pytest.raises(ValueError, match="timestamps"):
        searcher.set_history("u", [1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        Stage1Searcher(np.full((3, DIM), np.nan))


def test_rebuild_while_requests_arrive_is_safe(data):
    """Readers run against a user whose index is appended to and rebuilt in the background.
    Behaviours appended during the test are newer than `before`, so every answer must equal the
    exact answer over the fixed prefix, whichever snapshot served it."""
    rng, table, centres = data
    items, times = history(rng, 5000, 5000)
    config = small_scann_config(leaves_to_search_fraction=1.0, reorder_multiplier=100.0,
                                min_reorder=5000, delta_rebuild_size=150,
                                background_rebuild=True)
    searcher = Stage1Searcher(table, config)
    searcher.set_history("u", items[:3000], times[:3000])
    before = int(times[2999]) + 1
    queries = [centres[i] + 0.3 * rng.normal(size=DIM) for i in range(8)]
    expected = [reference_top_k(table, items[:3000], times[:3000], q, 40) for q in queries]
    errors, answers = [], [0]
    stop = threading.Event()

    def reader(seed):
        local = np.random.default_rng(seed)
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            i = int(local.integers(0, len(queries)))
            try:
                got = searcher.top_k("u", queries[i], 40, before_ms=before)
                if not np.array_equal(got.rows, expected[i]):
                    errors.append(f"query {i}: {got.rows[:5]} vs {expected[i][:5]}")
                answers[0] += 1
            except Exception as err:  # noqa: BLE001 - any error fails the test below
                errors.append(repr(err))

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for start in range(3000, 5000, 100):
        searcher.add_behaviours("u", items[start:start + 100], times[start:start + 100])
        time.sleep(0.01)
    searcher.wait_for_rebuilds(60)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert answers[0] > 20
    assert searcher.counters["rebuilds"] >= 1 and searcher.counters["rebuild_failures"] == 0
    assert searcher.history_length("u") == 5000
    final = searcher.top_k("u", queries[0], 40)
    np.testing.assert_array_equal(final.rows, reference_top_k(table, items, times, queries[0], 40))


def test_least_recently_used_users_are_evicted_and_reloaded(data):
    rng, table, centres = data
    histories = {f"u{i}": history(rng, 50, 5000) for i in range(4)}
    searcher = Stage1Searcher(table, Stage1Config(max_users=2),
                              history_loader=lambda u: histories.get(u, ([], [])))
    for user in histories:
        searcher.top_k(user, centres[0], 5)
    assert searcher.counters["users_evicted"] == 2
    assert searcher.history_length("u0") == 0, "evicted"
    got = searcher.top_k("u0", centres[0], 5)
    items, times = histories["u0"]
    np.testing.assert_array_equal(got.rows, reference_top_k(table, items, times, centres[0], 5))


# ---- behaviour features and the feature-store adapter ---------------------------------------
class InMemoryStore:
    """The two FeatureStoreView methods the index reads (serving.client's protocol)."""

    def __init__(self, table, histories):
        self.table, self.histories, self.calls = table, histories, 0

    def items(self):
        n = self.table.shape[0] - 1
        return {"item_id": [f"i{k}" for k in range(1, n + 1)], "item_index": np.arange(1, n + 1),
                "embedding": self.table[1:]}

    def behaviours(self, user_id, before_ms, limit):
        self.calls += 1
        rows = [b for b in self.histories.get(user_id, []) if b["timestamp_ms"] < before_ms]
        return sorted(rows, key=lambda b: -b["timestamp_ms"])[:limit]


def behaviour_dicts(items, times):
    return [{"item_index": int(i), "timestamp_ms": int(t), "author_index": int(i) % 97 + 1,
             "category": [int(i) % 5 + 1, int(i) % 11 + 1],
             "engagement": [float(i % 7) / 7, 1.0, 0.0, float(t % 2)], "source": int(t % 2) + 1}
            for i, t in zip(items, times)]


def test_feature_store_searcher_returns_the_long_term_sequence_with_features(data):
    rng, table, centres = data
    items, times = history(rng, 2600, 5000)
    store = InMemoryStore(table, {"u": behaviour_dicts(items, times)})
    searcher = Stage1Searcher.from_feature_store(store, small_scann_config(), users=["u"])
    assert store.calls == 1 and searcher.user_stats("u")["base_rows"] == 2600
    # New behaviours (with features) arrive after indexing.
    new_items, new_times = np.array([11, 12]), times[-1] + np.array([10, 20])
    new = behaviour_dicts(new_items, new_times)
    searcher.add_behaviours("u", new_items, new_times, features={
        features.SEQ_AUTHOR: [b["author_index"] for b in new],
        features.SEQ_CATEGORY: [b["category"] for b in new],
        features.SEQ_ENGAGEMENT: [b["engagement"] for b in new],
        features.SEQ_SOURCE: [b["source"] for b in new]})
    all_dicts = behaviour_dicts(np.append(items, new_items), np.append(times, new_times))
    now = int(new_times[-1]) + 1000
    got = searcher.top_k("u", table[12], 50, before_ms=now)
    assert got.rows[0] == 2601, "the newest behaviour (item 12 itself) is kept, first"
    sequence = serving_long_term(got, now)
    for position, row in enumerate(got.rows):
        b = all_dicts[row]
        assert sequence["long_item"][position] == b["item_index"]
        assert sequence["long_author"][position] == b["author_index"]
        assert sequence["long_category"][position].tolist() == b["category"]
        np.testing.assert_allclose(sequence["long_engagement"][position], b["engagement"])
        assert sequence["long_source"][position] == b["source"]
        assert sequence["long_time_gap"][position] == pytest.approx((now - b["timestamp_ms"]) / 1e3)
    assert np.all(np.diff(sequence["long_time_gap"]) >= 0), "most recent first"
    # The sequence is a valid long-term sequence of the shared example layout.
    request = {features.REQUEST_ID: "r", features.USER_ID: "u", features.REQUEST_TIME: now,
               features.QUERY_EMBEDDING: table[12], features.CANDIDATE_ITEM: [1],
               features.CANDIDATE_AUTHOR: [1], features.CANDIDATE_CATEGORY: [[1, 1]],
               **{features.label_feature(t): [0] for t in features.DEFAULT_TASKS}, **sequence}
    example = features.make_example(request)
    assert example.features.feature["long_length"].int64_list.value[0] == 50


def serving_long_term(result, now):
    from serving.behaviour_index import long_term_features

    return long_term_features(result, now)


def test_features_follow_rows_through_out_of_order_appends_and_are_checked(data):
    rng, table, _ = data
    searcher = Stage1Searcher(table)
    searcher.set_history("u", [5, 6, 7], [10, 20, 30],
                         features={features.SEQ_SOURCE: [1, 2, 1]})
    searcher.add_behaviours("u", [8], [15], features={features.SEQ_SOURCE: [2]})
    got = searcher.top_k("u", np.zeros(DIM), 10)
    assert got.item_indices.tolist() == [7, 6, 8, 5]
    assert got.features[features.SEQ_SOURCE].tolist() == [1, 2, 2, 1]
    with pytest.raises(ValueError, match="carry features"):
        searcher.add_behaviours("u", [9], [40])
    with pytest.raises(ValueError, match="expected 4"):
        searcher.set_history("v", [1, 2], [1, 2], features={features.SEQ_CATEGORY: [1, 2]})
    with pytest.raises(ValueError, match="unknown behaviour feature"):
        searcher.set_history("v", [1], [1], features={"colour": [1]})
    searcher.set_history("w", [1], [1])
    with pytest.raises(ValueError, match="no behaviour features"):
        serving_long_term(searcher.top_k("w", table[1], 1), 5)


# ---- training/serving consistency: the index answers exactly what preprocessing computes ----
def test_exact_index_equals_the_shared_stage1_reference(data):
    from common.relevance import stage1_top_k

    rng, table, centres = data
    items, times = history(rng, 3000, 300)  # 300 items: many re-watched behaviours (ties)
    items[::97] = 0  # some unknown items (zero vectors)
    for config in (Stage1Config(), small_scann_config()):  # row-exact and item-exact paths
        searcher = Stage1Searcher(table, config)
        searcher.set_history("u", items, times)
        for trial in range(12):
            query = centres[trial] + 0.3 * rng.normal(size=DIM)
            before = int(times[rng.integers(100, 3000)])
            threshold = (None, 0.2, 0.9)[trial % 3]
            got = searcher.top_k("u", query, 100, before_ms=before, threshold=threshold)
            assert got.backend == "exact"
            visible = int(np.sum(times < before))
            most_recent_first = table[items[:visible][::-1]]
            want = stage1_top_k(query, most_recent_first, 100, threshold)
            np.testing.assert_array_equal(got.positions, want)
            np.testing.assert_array_equal(got.rows, reference_top_k(table, items, times, query,
                                                                    100, before, threshold))


def test_stage1_reference_semantics():
    from common.relevance import stage1_top_k

    behaviours = np.array([[1, 0], [0, 1], [2, 0], [0, 0], [1, 1]], np.float32)
    assert stage1_top_k([1, 0], behaviours, 2).tolist() == [0, 2], "tie: most recent first"
    assert stage1_top_k([1, 0], behaviours, 3).tolist() == [0, 2, 4]
    assert stage1_top_k([1, 0], behaviours, 9, threshold=0.5).tolist() == [0, 2, 4]
    assert stage1_top_k([0, 0], behaviours, 2).tolist() == [0, 1], "zero query: recency"
    assert stage1_top_k([1, 0], behaviours[:0], 5).tolist() == []
    with pytest.raises(ValueError):
        stage1_top_k([1, 0, 0], behaviours, 2)


def test_searcher_over_the_sqlite_feature_store(tmp_path, data):
    from common.feature_store import SqliteFeatureStore

    rng, table, centres = data
    metadata = features.DatasetMetadata(num_items=len(table) - 1)
    store = SqliteFeatureStore.create(str(tmp_path / "store.sqlite"), metadata)
    store.write_items((k, f"i{k}", k % 31 + 1, [k % 4 + 1, k % 9 + 1], table[k])
                      for k in range(1, len(table)))
    items, times = history(rng, 2500, 5000)
    times[100:103] = times[100]  # equal timestamps keep their arrival order
    store.write_behaviours(("u", int(t), int(i), int(i) % 31 + 1, [int(i) % 4 + 1, 1],
                            [0.5, 1, 0, 0], 1 + int(t) % 2) for i, t in zip(items, times))
    searcher = Stage1Searcher.from_feature_store(store, small_scann_config(), users=["u"])
    assert searcher.user_stats("u")["base_rows"] == 2500
    store.add_behaviours("u", [{"item_index": 42, "timestamp_ms": int(times[-1]) + 5,
                                "source": 2}])
    # A user first seen after indexing is loaded from the store on its first request.
    store.write_behaviours(("late", 100 + k, k + 1, 1, [1, 1], [0, 0, 0, 0], 1) for k in range(30))
    got = searcher.top_k("late", table[7], 5)
    assert got.history_length == 30 and got.item_indices[got.scores.argmax()] == 7
    # Point-in-time answers over the indexed user equal the store's own history.
    now = int(times[2000])
    got = searcher.top_k("u", centres[2], 100, before_ms=now)
    arrays = store.behaviours_before("u", now)
    exact_rows = reference_top_k(table, arrays["item_index"][::-1], arrays["timestamp_ms"][::-1],
                                 centres[2], 100)
    recall = len(np.intersect1d(got.rows, exact_rows)) / 100
    assert recall >= 0.8
    hit = np.isin(got.rows, exact_rows)
    most_recent_first = len(arrays["item_index"]) - 1 - got.rows[hit]
    np.testing.assert_array_equal(got.item_indices[hit], arrays["item_index"][most_recent_first])
    np.testing.assert_array_equal(got.features[features.SEQ_SOURCE][hit],
                                  arrays["source"][most_recent_first])
    np.testing.assert_array_equal(got.features[features.SEQ_CATEGORY][hit],
                                  arrays["category"][most_recent_first])
    store.close()


def test_appends_for_a_user_not_in_memory_are_left_to_the_store(data):
    rng, table, centres = data
    items, times = history(rng, 40, 5000)
    store_rows = {"u": (items, times)}
    searcher = Stage1Searcher(table, history_loader=lambda u: store_rows.get(u, ([], [])))
    # The store already holds the two newest behaviours when the index hears of them.
    searcher.add_behaviours("u", items[-2:], times[-2:])
    assert searcher.history_length("u") == 0, "not loaded by an append"
    got = searcher.top_k("u", centres[0], 100)
    assert got.history_length == 40, "loaded once from the store, nothing counted twice"
    searcher.add_behaviours("u", [3], [int(times[-1]) + 1])  # now resident: appended
    assert searcher.top_k("u", centres[0], 100).history_length == 41


def test_a_failing_scann_build_falls_back_to_exact_search(data, monkeypatch):
    import serving.behaviour_index as bi

    rng, table, centres = data
    items, times = history(rng, 2500, 5000)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated ScaNN failure")

    monkeypatch.setattr(bi, "build_scann", broken)
    searcher = Stage1Searcher(table, small_scann_config())
    searcher.set_history("u", items, times)
    assert searcher.counters["scann_build_failures"] == 1
    got = searcher.top_k("u", centres[4], 60)
    assert got.backend == "exact"
    np.testing.assert_array_equal(got.rows, reference_top_k(table, items, times, centres[4], 60))
