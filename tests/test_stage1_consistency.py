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
