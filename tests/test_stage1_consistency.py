"""The served-vs-exact stage-1 replay: sequence replacement and agreement on real parsed batches."""
import numpy as np
import pytest

from benchmarks import stage1_consistency as C
from common import features
from serving.behaviour_index import Stage1Searcher

DIM = features.DEFAULT_EMBEDDING_DIM


def behaviour_columns(items, times):
    return {features.SEQ_AUTHOR: items % 13 + 1,
            features.SEQ_CATEGORY: np.stack([items % 3 + 1, items % 5 + 1], axis=1),
            features.SEQ_ENGAGEMENT: np.stack([items / 100.0, items % 2, times % 2, 0 * items],
                                              axis=1),
            features.SEQ_SOURCE: times % 2 + 1}


def parsed_batch(metadata, rows):
    import tensorflow as tf

    serialized = [features.make_example(r).SerializeToString() for r in rows]
    parsed = features.parse_examples(tf.constant(serialized), metadata)
    return {k: v.numpy() for k, v in parsed.items()}


def test_replaced_long_term_sequence_matches_an_example_written_with_it():
    """Examples written with the exact stage 1 (as preprocessing does) and the served
    replacement computed from the index must agree field by field after parsing."""
    rng = np.random.default_rng(3)
    table = np.vstack([np.zeros((1, DIM)), rng.normal(size=(400, DIM))]).astype(np.float32)
    metadata = features.DatasetMetadata(num_items=400, long_term_length=30, long_term_mode="stage1")
    searcher = Stage1Searcher(table)
    rows, results, times = [], [], []
    for u in range(3):
        items = rng.integers(1, 401, 500 + 100 * u)
        stamps = 1_600_000_000_000 + np.cumsum(rng.integers(1_000, 9_000_000, len(items)))
        searcher.set_history(f"u{u}", items, stamps, features=behaviour_columns(items, stamps))
        now = int(stamps[-50])
        query = rng.normal(size=DIM)
        result = searcher.top_k(f"u{u}", query, 30 - 10 * u, before_ms=now)
        sequence = C.long_term_features(result, now)
        rows.append({features.REQUEST_ID: f"r{u}", features.USER_ID: f"u{u}",
                     features.REQUEST_TIME: now, features.QUERY_EMBEDDING: query,
                     features.CANDIDATE_ITEM: [1, 2], features.CANDIDATE_AUTHOR: [1, 1],
                     features.CANDIDATE_CATEGORY: [[1, 1], [1, 2]],
                     **{features.label_feature(t): [1, 0] for t in metadata.tasks}, **sequence})
        results.append(result)
        times.append(now)
    exact = parsed_batch(metadata, rows)
    # Start from a batch whose long-term sequences are something else, then replace them.
    other = dict(exact)
    other["long_item"] = np.full_like(exact["long_item"], 7)
    other["long_length"] = np.full_like(exact["long_length"], 30)
    served = C.with_long_term(other, results, np.array(times), metadata.long_term_length)
    for name in exact:
        if name.startswith("long_"):
            np.testing.assert_allclose(served[name], exact[name], rtol=1e-6, err_msg=name)
            assert served[name].shape == exact[name].shape and served[name].dtype == exact[
                name].dtype
    assert served["long_length"].tolist() == [30, 20, 10]
    same, recall = C.sequence_agreement(exact, results)
    assert same == [True] * 3 and recall == [1.0] * 3
    # A served answer that misses behaviours is measured as such.
    fewer = [searcher.top_k(f"u{u}", rng.normal(size=DIM), 10, before_ms=times[u])
             for u in range(3)]
    same, recall = C.sequence_agreement(exact, fewer)
    assert not any(same) and all(r < 1.0 for r in recall)


def test_cli_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exit_info:
        C.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "GAUC" in text and "--scann-min-history" in text and "--model-dir" in text
    with pytest.raises(SystemExit):
        C.parse_args(["--data", "d", "--model-dir", "m", "--scann-min-history", "3"])


class InMemoryStore:
    """The FeatureStoreView methods the replay reads: items() and behaviours()."""

    def __init__(self, table, histories):
        self.table, self.histories = table, histories

    def items(self):
        n = self.table.shape[0] - 1
        return {"item_id": [f"i{k}" for k in range(1, n + 1)], "item_index": np.arange(1, n + 1),
                "embedding": self.table[1:]}

    def behaviours(self, user_id, before_ms, limit):
        items, times, cols = self.histories.get(user_id, (np.zeros(0, int),) * 2 + ({},))
        keep = np.flatnonzero(times < before_ms)[::-1][:limit]
        return [{"item_index": int(items[i]), "timestamp_ms": int(times[i]),
                 "author_index": int(cols[features.SEQ_AUTHOR][i]),
                 "category": cols[features.SEQ_CATEGORY][i].tolist(),
                 "engagement": cols[features.SEQ_ENGAGEMENT][i].tolist(),
                 "source": int(cols[features.SEQ_SOURCE][i])} for i in keep]


def write_stage1_dataset(directory, rng, dim=8, num_items=120, long_term_length=16):
    """A dataset in preprocessing's layout whose long-term sequences are the exact point-in-time
    stage 1 of common.relevance over whole histories (what --long-term-mode stage1 writes)."""
    import os

    import tensorflow as tf

    from common.relevance import stage1_top_k

    topics = rng.normal(size=(4, dim))
    topic = rng.integers(0, 4, num_items + 1)
    table = (topics[topic] + 0.4 * rng.normal(size=(num_items + 1, dim))).astype(np.float32)
    table[0] = 0
    metadata = features.DatasetMetadata(
        embedding_dim=dim, num_items=num_items, num_authors=13, num_categories=8, num_users=6,
        query_token_buckets=50, profile_buckets=20, long_term_length=long_term_length,
        real_time_length=4, max_candidates=8, long_term_mode="stage1")
    os.makedirs(directory)
    metadata.save(directory)
    np.save(os.path.join(directory, features.ITEM_EMBEDDINGS_FILE), table)
    histories = {}
    for u in range(6):
        items = rng.integers(1, num_items + 1, int(rng.integers(200, 400)))
        times = 1_600_000_000_000 + np.cumsum(rng.integers(1_000, 5_000_000, len(items)))
        cols = behaviour_columns(items, times)
        cols[features.SEQ_CATEGORY] = np.stack([topic[items] + 1, topic[items] + 5], axis=1)
        histories[f"u{u}"] = (items, times, cols)
    counter = 0
    for split, count in zip(features.SPLITS, (96, 48, 8)):
        os.makedirs(os.path.join(directory, split))
        path = os.path.join(directory, split, "part-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for _ in range(count):
                counter += 1
                u = int(rng.integers(0, 6))
                items, times, cols = histories[f"u{u}"]
                now = int(times[int(rng.integers(50, len(times)))])
                visible = int(np.sum(times < now))
                recent = np.arange(visible)[::-1]  # rows, most recent first
                q_topic = int(rng.integers(0, 4))
                query = topics[q_topic] + 0.3 * rng.normal(size=dim)
                kept = recent[stage1_top_k(query, table[items[recent]], long_term_length)]
                cands = rng.integers(1, num_items + 1, int(rng.integers(2, 9)))
                request = {features.REQUEST_ID: f"r{counter}", features.USER_ID: f"u{u}",
                           features.USER_INDEX: u + 1, features.REQUEST_TIME: now,
                           features.QUERY_TOKENS: [q_topic + 1], features.QUERY_EMBEDDING: query,
                           features.CANDIDATE_ITEM: cands, features.CANDIDATE_AUTHOR: cands % 13,
                           features.CANDIDATE_CATEGORY: np.stack([topic[cands] + 1,
                                                                  topic[cands] + 5], axis=1)}
                for seq, rows in ((features.LONG_TERM, kept), (features.REAL_TIME, recent[:4])):
                    request[features.seq_feature(seq, features.SEQ_ITEM)] = items[rows]
                    request[features.seq_feature(seq, features.SEQ_TIME_GAP)] = (
                        now - times[rows]) / 1000.0
                    for name, column in cols.items():
                        request[features.seq_feature(seq, name)] = column[rows]
                p = 1 / (1 + np.exp(-(2.0 * (topic[cands] == q_topic) - 1.0)))
                for task in metadata.tasks:
                    request[features.label_feature(task)] = (rng.random(len(cands)) < p)
                writer.write(features.make_example(request, metadata.tasks).SerializeToString())
    return table, histories


def test_replay_end_to_end_on_a_trained_model(tmp_path):
    """Train a small QIN on stage-1 examples, then replay eval: with the exact backend the
    served sequences are the examples and GAUC cannot move; with ScaNN forced the report says
    how far stage 1 and GAUC moved."""
    from trainer import task

    rng = np.random.default_rng(11)
    data, model_dir = str(tmp_path / "data"), str(tmp_path / "model")
    table, histories = write_stage1_dataset(data, rng)
    assert task.main(["--data", data, "--model-dir", model_dir, "--model", "qin",
                      "--config", '{"k2": 4}', "--epochs", "1", "--batch-size", "32",
                      "--eval-batch-size", "32", "--seed", "1"]) == 0
    store = InMemoryStore(table, histories)
    exact = C.run(C.parse_args(["--data", data, "--model-dir", model_dir,
                                "--scann-min-history", str(10**12), "--batch-size", "16"]), store)
    assert exact["requests"] == 48
    assert exact["stage1_backends"] == {"exact": 48}
    assert exact["exact_sequence_match"] == 1.0 and exact["stage1_recall_vs_examples"] == 1.0
    assert exact["max_abs_delta_gauc"] == 0.0 and exact["within_target"]
    for row in exact["tasks"].values():
        assert 0.0 <= row["exact"]["gauc_request"] <= 1.0
    forced = C.run(C.parse_args(["--data", data, "--model-dir", model_dir,
                                 "--scann-min-history", "16", "--batch-size", "16",
                                 "--max-requests", "32"]), store)
    # Requests far in a user's past hide most of the index: those are answered exactly.
    assert forced["requests"] == 32 and sum(forced["stage1_backends"].values()) == 32
    assert forced["stage1_backends"]["scann"] >= 16
    assert 0.5 <= forced["stage1_recall_vs_examples"] <= 1.0
    assert "delta_gauc_user" in forced["tasks"]["click"]
    text = C.markdown(forced)
    assert "max |delta GAUC|" in text and "| click |" in text
