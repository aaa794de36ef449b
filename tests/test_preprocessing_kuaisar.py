"""KuaiSAR reader: records produced from tiny files in the published layout, on Beam's
in-process runner."""
import numpy as np
import pytest

import common  # noqa: F401
import apache_beam as beam
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from common import features as F
from preprocessing import kuaisar
from preprocessing.records import BehaviourRecord, DeadLetter, ItemRecord, RequestRecord, UserRecord
from preprocessing.text_embeddings import TextEncoder
from tests.helpers import item_vocabulary, labels, long_sequence, read_examples
from tests.public_format_files import item_row, rec_row, src_row, write_kuaisar

RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
T0 = 1_653_184_800_000
BIG_USER = "12345678901234567890"  # 20 digits: must stay an exact string
ZERO = (0.0, 0.0, 0.0, 0.0)


def _files(directory):
    return write_kuaisar(
        directory,
        rec_rows=[rec_row(1, 101, 5000, 10000, T0, like=1),
                  rec_row(1, 102, 25000, 5000, T0 + 1000, follow=1, forward=1),  # ratio 5 -> cap
                  rec_row(BIG_USER, 103, 1000, 0, f"{T0 + 2000}.0"),  # no duration
                  rec_row(2, 104, "abc", 1000, T0 + 3000),  # malformed playing time
                  rec_row(2, 106, 15000, 10000, T0 + 4000),  # ratio 1.5: above 1, kept
                  rec_row(1, 107, 0, 10000, T0 + 500, click=0),  # shown, not opened
                  rec_row(2, 108, 1000, 1000, T0 + 600, click="")],  # click unknown
        src_rows=[src_row(1, 500, T0 + 5000, "[20, 34, 3]", 11, 1),
                  src_row(1, 500, T0 + 5000, "[20, 34, 3]", 12, 0),
                  src_row(1, 500, T0 + 5000, "[20, 34, 3]", 13, 2),
                  src_row(BIG_USER, 501, T0 + 6000, "[]", 14, 0),
                  src_row(BIG_USER, 501, T0 + 6000, "[]", 14, 1),  # shown twice: one candidate
                  src_row(2, 502, T0 + 7000, "[5, x]", 15, 0),  # malformed keyword
                  src_row(2, 503, T0 + 8000, "['5']", 16, 0)],
        item_rows=[item_row(11, "[20, 7]", 900, 1, 2),
                   item_row(12, "[]", 901, "1.0", ""),
                   item_row(13, "[34, 8]", "", "", 3),
                   item_row(13, "[99]", 902, 4, 4),  # duplicate id
                   item_row(99, "[7]", 903, 5, 6),  # never referenced, still an item
                   item_row(98, "[7, oops]", 903, 5, 6)],  # malformed caption
        user_rows=[[1, 2, 3, 0, 1], [BIG_USER, "", "1.0", 1, 0], [1, 9, 9, 9, 9]],
        raw={"rec_inter.csv": ["1,105,7"]})


def _read(directory, encoder=None):
    pipeline = test_pipeline.TestPipeline(runner=RUNNER)
    out = pipeline | kuaisar.ReadKuaiSAR(directory, text_encoder=encoder)
    return pipeline, out


def test_records_from_published_layout(tmp_path):
    directory = _files(str(tmp_path))
    pipeline, out = _read(directory)
    assert_that(out["behaviours"], equal_to([
        BehaviourRecord("1", "101", T0, F.SOURCE_FEED, (0.5, 1.0, 0.0, 0.0)),
        BehaviourRecord("1", "102", T0 + 1000, F.SOURCE_FEED,
                        (kuaisar.WATCH_RATIO_CAP, 0.0, 1.0, 1.0)),
        BehaviourRecord(BIG_USER, "103", T0 + 2000, F.SOURCE_FEED, ZERO),
        BehaviourRecord("2", "106", T0 + 4000, F.SOURCE_FEED, (1.5, 0.0, 0.0, 0.0)),
        BehaviourRecord("1", "11", T0 + 5000, F.SOURCE_SEARCH, ZERO),
        BehaviourRecord("1", "13", T0 + 5000, F.SOURCE_SEARCH, ZERO),
        BehaviourRecord(BIG_USER, "14", T0 + 6000, F.SOURCE_SEARCH, ZERO),
    ]), label="behaviours")
    assert_that(out["requests"], equal_to([
        RequestRecord("500", "1", T0 + 5000, (20, 34, 3), None, ("11", "12", "13"),
                      {"click": [1.0, 0.0, 1.0]}),
        RequestRecord("501", BIG_USER, T0 + 6000, (), None, ("14",), {"click": [1.0]}),
        RequestRecord("503", "2", T0 + 8000, (5,), None, ("16",), {"click": [0.0]}),
    ]), label="requests")
    assert_that(out["items"], equal_to([
        ItemRecord("11", "900", ("1:1", "2:2"), None, (20, 7)),
        ItemRecord("12", "901", ("1:1",), None, ()),
        ItemRecord("13", "", ("", "2:3"), None, (34, 8)),
        ItemRecord("99", "903", ("1:5", "2:6"), None, (7,)),
        # referenced but without (usable) metadata: bare records; 107 (an unclicked
        # impression only) is referenced by nothing
        *[ItemRecord(i, "", (), None, ()) for i in ("101", "102", "103", "106", "14", "16")],
    ]), label="items")
    assert_that(out["users"], equal_to([
        UserRecord("1", ("2", "3", "0", "1")),
        UserRecord(BIG_USER, ("", "1", "1", "0")),
    ]), label="users")
    reasons = out["dead_letter"] | beam.Map(lambda d: (d.source, d.reason))
    assert_that(reasons, equal_to([
        ("rec_inter.csv", "bad_playing_time"), ("rec_inter.csv", "wrong_field_count"),
        ("rec_inter.csv", "missing_click"),
        ("src_inter.csv", "bad_keyword"), ("item_features.csv", "duplicate_item"),
        ("item_features.csv", "bad_caption"), ("user_features.csv", "duplicate_user"),
    ]), label="dead_letter")
    result = pipeline.run()
    result.wait_until_finish()
    counters = {r.key.metric.name: r.committed
                for r in result.metrics().query()["counters"]
                if r.key.metric.namespace == kuaisar.METRICS_NAMESPACE}
    assert counters["items_without_metadata"] == 6
    assert counters["watch_ratio_clipped"] == 1
    assert counters["missing_duration"] == 1
    assert counters["duplicate_candidates_merged"] == 1
    assert counters["feed_impressions_without_click"] == 1
    assert counters["feed_behaviours"] == 4


def test_dead_letters_keep_the_offending_row(tmp_path):
    directory = _files(str(tmp_path))
    pipeline, out = _read(directory)
    assert_that(out["dead_letter"] | beam.Filter(lambda d: d.reason == "wrong_field_count"),
                equal_to([DeadLetter("rec_inter.csv", "wrong_field_count", "1,105,7")]))
    pipeline.run().wait_until_finish()


def test_embeddings_come_from_the_text_encoder(tmp_path):
    directory = _files(str(tmp_path))
    table = np.zeros((4, 2), np.float32)
    table[1], table[2], table[3] = [3.0, 4.0], [1.0, 0.0], [0.0, 1.0]
    encoder = TextEncoder(np.array([20, 34, 7]), table)  # 20 -> (3,4), 34 -> x, 7 -> y
    pipeline, out = _read(directory, encoder)

    def check_items(items):
        by_id = {i.item_id: i.embedding for i in items}
        # caption [20, 7]: mean((3,4),(0,1)) = (1.5, 2.5) normalised
        np.testing.assert_allclose(by_id["11"], np.array([1.5, 2.5]) / np.hypot(1.5, 2.5),
                                   rtol=1e-6)
        assert by_id["12"] == (0.0, 0.0)  # empty caption -> zero vector
        assert by_id["14"] == (0.0, 0.0)  # no metadata -> zero vector
        np.testing.assert_allclose(by_id["13"], [1.0, 0.0])  # token 8 unknown, 34 known

    def check_requests(requests):
        by_id = {r.request_id: r.query_embedding for r in requests}
        expected = np.array([4.0, 4.0]) / 3 / np.linalg.norm(np.array([4.0, 4.0]) / 3)
        np.testing.assert_allclose(by_id["500"], expected, rtol=1e-6)  # [20, 34, 3]
        assert by_id["501"] == (0.0, 0.0)  # empty keyword

    assert_that(out["items"], check_items, label="items")
    assert_that(out["requests"], check_requests, label="requests")
    pipeline.run().wait_until_finish()


def test_session_with_two_keywords_becomes_two_requests(tmp_path):
    directory = write_kuaisar(str(tmp_path), src_rows=[
        src_row(1, 7, T0, "[1]", 11, 1), src_row(1, 7, T0 + 10, "[2]", 12, 0)])
    pipeline, out = _read(directory)
    assert_that(out["requests"] | beam.Map(lambda r: (r.request_id, r.query_tokens,
                                                      r.candidate_item_ids)),
                equal_to([("7#0", (1,), ("11",)), ("7#1", (2,), ("12",))]))
    pipeline.run().wait_until_finish()


def test_missing_user_features_is_allowed(tmp_path):
    directory = write_kuaisar(str(tmp_path), rec_rows=[rec_row(1, 101, 1, 2, T0)],
                              with_users=False)
    pipeline, out = _read(directory)
    assert_that(out["users"], equal_to([]), label="users")
    assert_that(out["behaviours"] | beam.Map(lambda b: b.item_id), equal_to(["101"]))
    pipeline.run().wait_until_finish()


def test_validate_fails_fast_with_actionable_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    canonical = tmp_path / "canonical"
    canonical.mkdir()
    pq.write_table(pa.table({"item_id": ["a"]}), str(canonical / "items.parquet"))
    with pytest.raises(ValueError, match="needs rec_inter.csv.*--input-format canonical"):
        kuaisar.validate(str(canonical))
    directory = _files(str(tmp_path / "k"))
    with open(f"{directory}/src_inter.csv", "w") as f:
        f.write("user_id,session,keyword\n1,2,[3]\n")
    with pytest.raises(ValueError, match=r"src_inter.csv: header lacks .*search_session_id"):
        kuaisar.validate(directory)
    pq.write_table(pa.table({"x": [1]}), f"{directory}/src_inter.csv")
    with pytest.raises(ValueError, match="src_inter.csv"):
        kuaisar.validate(directory)


def test_prepare_trains_embeddings_and_reader_uses_them(tmp_path):
    rng = np.random.default_rng(0)
    src, items = [], []
    for item in range(40):  # two topics: caption tokens 100+/200+, queries 1-2 / 3-4
        topic = item % 2
        items.append(item_row(item, str([100 * (topic + 1) + int(t) for t in
                                         rng.integers(0, 4, 3)]), 1, topic, topic))
    for session in range(300):
        topic = session % 2
        clicked = int(rng.integers(0, 20)) * 2 + topic
        other = int(rng.integers(0, 20)) * 2 + 1 - topic
        keyword = str([1 + 2 * topic + int(rng.integers(0, 2))])
        src += [src_row(1, session, T0 + session, keyword, clicked, 1),
                src_row(1, session, T0 + session, keyword, other, 0)]
    directory = write_kuaisar(str(tmp_path / "in"), src_rows=src, item_rows=items)
    prepared = kuaisar.prepare(directory, str(tmp_path / "work"),
                               {"embedding_dim": 8, "text_tower_epochs": 4,
                                "text_tower_batch_size": 32, "seed": 1})
    assert prepared["tasks"] == F.KUAISAR_TASKS
    encoder = prepared["text_encoder"]
    assert encoder.dim == 8 and set(prepared["query_vocab"]["token_id"]) >= {1, 2, 3, 4}
    stats = prepared["text_tower_stats"]
    # default split 0.1 / 0.1 by time: the 60 latest sessions are held out of the text tower
    assert (stats["requests"], stats["held_out_requests"]) == (300, 60)
    assert (stats["pairs_used"], stats["held_out_click_pairs"]) == (240, 60)
    assert stats["split_cutoffs_ms"] == {"eval": T0 + 240, "test": T0 + 270}
    assert (tmp_path / "work" / "text_encoder.npz").exists()
    pipeline = test_pipeline.TestPipeline(runner=RUNNER)
    out = pipeline | kuaisar.ReadKuaiSAR(directory, **prepared)

    def check(requests):
        assert len(requests) == 300
        for r in requests:
            q = np.asarray(r.query_embedding)
            assert abs(np.linalg.norm(q) - 1.0) < 1e-5
            same = encoder.encode([100 * ((r.query_tokens[0] - 1) // 2 + 1)])
            other = encoder.encode([100 * (2 - (r.query_tokens[0] - 1) // 2)])
            assert q @ same > q @ other

    assert_that(out["requests"], check)
    pipeline.run().wait_until_finish()


def _sessions_with_held_out_tail():
    """15 train sessions, 10 later ones with the keyword 77 clicking item 88 (caption 880), and
    one session with the keyword 66 clicking item 66 (caption 660) at the time of the first
    later one. With eval 0.15 / test 0.2, 10 of the 26 sessions are asked for; the tie makes
    it 11."""
    src = []
    for k in range(15):
        src += [src_row(1, f"s{k}", T0 + 10 * k, f"[{1 + k % 2}]", k % 3, 1),
                src_row(1, f"s{k}", T0 + 10 * k, f"[{1 + k % 2}]", 3, 0)]
    for j in range(10):
        src.append(src_row(2, f"h{j}", T0 + 1000 + 10 * j, "[77]", 88, 1))
    src.append(src_row(3, "tie", T0 + 1000, "[66]", 66, 1))
    items = [item_row(i, f"[{100 + i}]", 1, 1, 1) for i in range(4)]
    items += [item_row(88, "[880]", 1, 1, 1), item_row(66, "[660]", 1, 1, 1)]
    return src, items


def test_prepare_trains_the_text_tower_on_train_sessions_only(tmp_path, monkeypatch):
    from preprocessing import text_embeddings

    src, items = _sessions_with_held_out_tail()
    directory = write_kuaisar(str(tmp_path), src_rows=src, item_rows=items)
    headers = kuaisar.validate(directory)
    unfiltered, _, _, _ = kuaisar.click_pairs(directory, headers, (0.0, 0.0))
    assert ((77,), (880,)) in unfiltered and ((66,), (660,)) in unfiltered  # present in the data

    fed = []
    real = text_embeddings.train_text_encoder
    monkeypatch.setattr(text_embeddings, "train_text_encoder",
                        lambda pairs, *a, **k: fed.extend(pairs) or real(pairs, *a, **k))
    prepared = kuaisar.prepare(directory, None, {
        "embedding_dim": 4, "text_tower_epochs": 1, "eval_fraction": 0.15,
        "test_fraction": 0.2})
    assert sorted(fed) == sorted(((1 + k % 2,), (100 + k % 3,)) for k in range(15))
    stats = prepared["text_tower_stats"]
    assert (stats["requests"], stats["held_out_requests"]) == (26, 11)
    assert stats["held_out_click_pairs"] == 11
    assert stats["split_cutoffs_ms"] == {"eval": T0 + 1000, "test": T0 + 1040}
    assert (stats["eval_fraction"], stats["test_fraction"]) == (0.15, 0.2)
    # held-out keywords are in the query vocabulary (the serving client sees the same tokens)
    # but untrained; held-out captions are not in it at all
    encoder = prepared["text_encoder"]
    assert not encoder.encode([77]).any() and not encoder.encode([66]).any()
    assert encoder.encode([1]).any()
    assert encoder.rows([880, 660]) == []


def test_prepare_rejects_split_fractions_that_leave_nothing_to_train(tmp_path):
    src, items = _sessions_with_held_out_tail()
    directory = write_kuaisar(str(tmp_path), src_rows=src, item_rows=items)
    with pytest.raises(ValueError, match="nothing would be left to train on"):
        kuaisar.prepare(directory, None, {"eval_fraction": 0.5, "test_fraction": 0.5})
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        kuaisar.prepare(directory, None, {"test_fraction": -0.1})


# ---- end to end: `python -m preprocessing` on the tiny files, TFRecords read back ------------
def _read_back(out_dir):
    metadata, examples = read_examples(out_dir, batch_size=8)
    return (metadata, item_vocabulary(out_dir), {rid: row for rid, (_, row) in examples.items()},
            {rid: split for rid, (split, _) in examples.items()})


def test_end_to_end_cli_writes_examples_with_labels_and_sequences(tmp_path):
    import json

    from common.feature_store import SqliteFeatureStore
    from preprocessing.__main__ import main

    raw = write_kuaisar(
        str(tmp_path / "raw"),
        rec_rows=[rec_row(1, 101, 5000, 10000, T0, like=1),
                  rec_row(1, 102, 15000, 10000, T0 + 1000, follow=1),
                  rec_row(1, 109, 0, 10000, T0 + 2000, click=0),  # shown, not opened
                  rec_row(2, 103, 1000, 1000, T0 + 500)],
        src_rows=[src_row(1, 500, T0 + 5000, "[20, 34]", 11, 1),
                  src_row(1, 500, T0 + 5000, "[20, 34]", 12, 0),
                  src_row(1, 500, T0 + 5000, "[20, 34]", 13, 3),
                  src_row(1, 600, T0 + 9000, "[20, 7]", 11, 0),
                  src_row(1, 600, T0 + 9000, "[20, 7]", 14, 1),
                  src_row(2, 700, T0 + 9500, "[99]", 12, 1)],  # the test split
        item_rows=[item_row(11, "[20, 5]", 900, 1, 2), item_row(12, "[34, 6]", 901, 1, 3),
                   item_row(13, "[34, 5]", 900, 1, 2), item_row(14, "[7, 20]", 902, 4, 5)],
        user_rows=[[1, 2, 3, 0, 1], [2, 1, 1, 1, 1]])
    out = str(tmp_path / "out")
    assert main(["--input-format", "kuaisar", "--input", raw, "--output", out,
                 "--embedding-dim", "8", "--eval-fraction", "0", "--test-fraction", "0.2"]) == 0
    metadata, items, examples, splits = _read_back(out)
    assert splits == {"500": "train", "600": "train", "700": "test"}
    with open(f"{out}/stats.json") as f:
        text_tower = json.load(f)["text_tower"]
    # prepare() held out the very request the pipeline put in test, and only it
    assert text_tower["split_cutoffs_ms"] == {"eval": T0 + 9500, "test": T0 + 9500}
    assert (text_tower["held_out_requests"], text_tower["held_out_click_pairs"]) == (1, 1)
    assert text_tower["pairs"] == 3
    assert "109" not in items  # the unclicked impression is no behaviour, so no item either
    assert tuple(metadata.tasks) == F.KUAISAR_TASKS
    assert tuple(metadata.engagement_names) == F.ENGAGEMENT_NAMES["kuaisar"]
    assert metadata.embedding_dim == 8 and set(examples) == {"500", "600", "700"}

    first, second = examples["500"], examples["600"]
    assert labels(first, items, "click") == {"11": 1.0, "12": 0.0, "13": 1.0}
    assert labels(examples["700"], items, "click") == {"12": 1.0}
    assert labels(second, items, "click") == {"11": 0.0, "14": 1.0}
    feed_102 = ("102", 4.0, F.SOURCE_FEED, (1.5, 0.0, 1.0, 0.0))
    feed_101 = ("101", 5.0, F.SOURCE_FEED, (0.5, 1.0, 0.0, 0.0))
    # session 500's own clicks happen at its time: not in its features, in the next session's;
    # the unclicked impression 109 (T0 + 2000) is in no sequence
    assert long_sequence(first, items) == [feed_102, feed_101]
    later = long_sequence(second, items)
    assert sorted(later[:2]) == [("11", 4.0, F.SOURCE_SEARCH, (0.0,) * 4),
                                 ("13", 4.0, F.SOURCE_SEARCH, (0.0,) * 4)]
    assert later[2:] == [("102", 8.0, F.SOURCE_FEED, (1.5, 0.0, 1.0, 0.0)),
                         ("101", 9.0, F.SOURCE_FEED, (0.5, 1.0, 0.0, 0.0))]
    assert int(examples["700"][F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)]) == 1

    # the serving client's query encoding (query vocabulary in the feature store) reproduces the
    # query embedding the ranker was trained with
    store = SqliteFeatureStore(f"{out}/feature_store.sqlite")
    for request_id, tokens in (("500", [20, 34]), ("600", [20, 7]), ("700", [99])):
        _, embedding = store.encode_query(tokens)
        np.testing.assert_allclose(embedding, examples[request_id][F.QUERY_EMBEDDING],
                                   rtol=1e-5, atol=1e-6)
    assert abs(np.linalg.norm(examples["500"][F.QUERY_EMBEDDING]) - 1.0) < 1e-5
    # 99 is the keyword of the test session only: known to the vocabulary, never trained
    assert not examples["700"][F.QUERY_EMBEDDING].any()
    table = np.load(f"{out}/{F.ITEM_EMBEDDINGS_FILE}")
    assert table.shape == (metadata.num_items + 1, 8)
    assert abs(np.linalg.norm(table[items.index("11")]) - 1.0) < 1e-5
    assert not table[items.index("101")].any()  # no caption: zero vector
    store.close()
