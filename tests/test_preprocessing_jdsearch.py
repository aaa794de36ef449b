"""JDsearch reader: records produced from tiny files in the published layout, on Beam's
in-process runner."""
import json

import numpy as np
import pytest

import common  # noqa: F401
import apache_beam as beam
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from common import features as F
from preprocessing import jdsearch
from preprocessing.records import BehaviourRecord, ItemRecord, RequestRecord
from tests.helpers import item_vocabulary, labels, long_sequence, read_examples
from tests.public_format_files import jd_line, jd_product, write_jdsearch

RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
B, S = jdsearch.BASE_TIME_MS, jdsearch.TIME_UNIT_MS
BIG = "98765432109876543210"  # 20 digits, larger than int64: must stay an exact string
E = jdsearch.ENGAGEMENT_BY_TYPE

LINES = [
    jd_line([11, 12], [BIG, "200", "201", "202"], [1, 0, 3, 2],
            history=[(None, "300", "CLICK"), ([11, 13], "301", "ORD"), ([14], "200", "FLW")],
            gaps=[0, 5, 7, 3]),
    jd_line([15], ["203"], [0], history=[], gaps=[5]),  # empty history
    jd_line([1], ["1"], [0], history=[(None, "1", "CLICK")], gaps=[0, 1]).replace(
        "\t1\tCLICK", "\t1_2\tCLICK"),  # ragged history lists
    "only\ttwo",
    jd_line([1], ["1", "2"], [0], history=[], gaps=[0]).replace("0.0", "0.0_1.0_0.0"),
    jd_line([], [], [], history=[(None, "204", "CART")], gaps=[0, 9]),  # history-only user
    jd_line([1], ["1"], [0], history=[(None, "2", "VIEW")], gaps=[0, 1]),
    jd_line([1], ["1"], [5], history=[], gaps=[0]),
]
PRODUCTS = [jd_product("200", [11, 21], "b1", "1", "2"),
            jd_product("201", [13], "", "", "3"),
            jd_product("300", [16], "b3", "4", "5"),
            jd_product("300", [17], "b0", "4", "5"),  # duplicate wid
            jd_product("999", [18], "b9", "6", "7"),  # never referenced, still an item
            "300\tbroken"]


def _read(directory, encoder=None):
    pipeline = test_pipeline.TestPipeline(runner=RUNNER)
    return pipeline, pipeline | jdsearch.ReadJDsearch(directory, text_encoder=encoder)


def test_records_from_published_layout(tmp_path):
    directory = write_jdsearch(str(tmp_path), LINES, PRODUCTS)
    pipeline, out = _read(directory)
    t = B + 15 * S
    assert_that(out["requests"], equal_to([
        RequestRecord("r2", "u2", t, (11, 12), None, (BIG, "200", "201", "202"),
                      {"click": [1.0, 0.0, 1.0, 1.0], "cart": [0.0, 0.0, 1.0, 1.0],
                       "purchase": [0.0, 0.0, 1.0, 0.0]}),
        RequestRecord("r3", "u3", B + 5 * S, (15,), None, ("203",),
                      {"click": [0.0], "cart": [0.0], "purchase": [0.0]}),
    ]), label="requests")
    assert_that(out["behaviours"], equal_to([
        BehaviourRecord("u2", "300", B, F.SOURCE_FEED, E["CLICK"]),
        BehaviourRecord("u2", "301", B + 5 * S, F.SOURCE_SEARCH, E["ORD"]),
        BehaviourRecord("u2", "200", B + 12 * S, F.SOURCE_SEARCH, E["FLW"]),
        BehaviourRecord("u2", BIG, t, F.SOURCE_SEARCH, (1.0, 0.0, 0.0, 0.0)),
        BehaviourRecord("u2", "201", t, F.SOURCE_SEARCH, (1.0, 1.0, 1.0, 1.0)),
        BehaviourRecord("u2", "202", t, F.SOURCE_SEARCH, (1.0, 1.0, 1.0, 0.0)),
        BehaviourRecord("u7", "204", B, F.SOURCE_FEED, E["CART"]),
    ]), label="behaviours")
    assert_that(out["items"], equal_to([
        ItemRecord("200", "b1", ("1:1", "2:2"), None, (11, 21)),
        ItemRecord("201", "", ("", "2:3"), None, (13,)),
        ItemRecord("300", "b3", ("1:4", "2:5"), None, (16,)),  # first row by text wins
        ItemRecord("999", "b9", ("1:6", "2:7"), None, (18,)),
        *[ItemRecord(w, "", (), None, ()) for w in (BIG, "202", "203", "204", "301")],
    ]), label="items")
    assert_that(out["users"], equal_to([]), label="users")
    assert_that(out["dead_letter"] | beam.Map(lambda d: (d.source, d.reason, d.row[:7])),
                equal_to([
                    ("user_behavior_data.txt", "history_length_mismatch", "line 4:"),
                    ("user_behavior_data.txt", "wrong_field_count", "line 5:"),
                    ("user_behavior_data.txt", "candidate_label_length_mismatch", "line 6:"),
                    ("user_behavior_data.txt", "unknown_behaviour_type", "line 8:"),
                    ("user_behavior_data.txt", "bad_label", "line 9:"),
                    ("product_meta_data.txt", "duplicate_item", "300\t17\t"),
                    ("product_meta_data.txt", "wrong_field_count", "300\tbro"),
                ]), label="dead_letter")
    result = pipeline.run()
    result.wait_until_finish()
    counters = {r.key.metric.name: r.committed for r in result.metrics().query()["counters"]
                if r.key.metric.namespace == jdsearch.METRICS_NAMESPACE}
    assert counters["items_without_metadata"] == 5
    assert counters["lines_without_request"] == 1
    assert counters["requests_without_positive"] == 1


def test_headerless_release_file_and_non_utf8_line(tmp_path):
    bad = b"\xff\xfe\tx\n"
    directory = write_jdsearch(str(tmp_path), LINES[:2], PRODUCTS[:2], header=False)
    with open(f"{directory}/user_behavior_data.txt", "ab") as f:
        f.write(bad)
    pipeline, out = _read(directory)
    assert_that(out["requests"] | beam.Map(lambda r: (r.request_id, r.user_id)),
                equal_to([("r1", "u1"), ("r2", "u2")]), label="ids")
    assert_that(out["dead_letter"] | beam.Map(lambda d: d.reason), equal_to(["not_utf8"]),
                label="dead")
    pipeline.run().wait_until_finish()


def test_term_ids_and_huge_terms():
    assert jdsearch.parse_terms("12\x1834\x18") == (12, 34)
    huge = "9" * 30
    value = jdsearch.term_id(huge)
    assert 0 <= value < 2 ** 63 and value == jdsearch.term_id(huge)


def test_validate_fails_fast_with_actionable_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    canonical = tmp_path / "canonical"
    canonical.mkdir()
    pq.write_table(pa.table({"item_id": ["a"]}), str(canonical / "requests.parquet"))
    with pytest.raises(ValueError, match="needs user_behavior_data.txt.*--input-format canonical"):
        jdsearch.validate(str(canonical))
    directory = write_jdsearch(str(tmp_path / "jd"), LINES[:1], PRODUCTS[:1])
    with open(f"{directory}/product_meta_data.txt", "w") as f:
        f.write("wid,name,brand\n1,2,3\n")
    with pytest.raises(ValueError, match="product_meta_data.txt: first line is neither"):
        jdsearch.validate(directory)
    pq.write_table(pa.table({"x": [1]}), f"{directory}/user_behavior_data.txt")
    with pytest.raises(ValueError, match="user_behavior_data.txt"):
        jdsearch.validate(directory)


def test_prepare_trains_embeddings_and_reader_uses_them(tmp_path):
    rng = np.random.default_rng(0)
    products = [jd_product(str(w), [100 * (w % 2 + 1) + int(t) for t in rng.integers(0, 4, 3)],
                           "b", "c", "d") for w in range(40)]
    lines = []
    for n in range(150):
        topic = n % 2
        query = [1 + 2 * topic + int(rng.integers(0, 2))]
        clicked = str(int(rng.integers(0, 20)) * 2 + topic)
        other = str(int(rng.integers(0, 20)) * 2 + 1 - topic)
        history_item = str(int(rng.integers(0, 20)) * 2 + topic)
        lines.append(jd_line(query, [clicked, other], [1, 0],
                             history=[(query, history_item, "CLICK")], gaps=[0, 3 + n]))
    directory = write_jdsearch(str(tmp_path / "in"), lines, products)
    prepared = jdsearch.prepare(directory, str(tmp_path / "work"),
                                {"embedding_dim": 8, "text_tower_epochs": 4,
                                 "text_tower_batch_size": 32, "seed": 1})
    assert prepared["tasks"] == F.JDSEARCH_TASKS
    stats = prepared["text_tower_stats"]
    # default split 0.1 / 0.1 by request time: the 30 latest requests are held out; every
    # history search (all at the base time) is before the eval cutoff and stays in
    assert (stats["requests"], stats["held_out_requests"]) == (150, 30)
    assert stats["pairs_used"] == 150 + 120 and stats["held_out_click_pairs"] == 30
    assert stats["split_cutoffs_ms"] == {"eval": B + 123 * S, "test": B + 138 * S}
    encoder = prepared["text_encoder"]
    pipeline = test_pipeline.TestPipeline(runner=RUNNER)
    out = pipeline | jdsearch.ReadJDsearch(directory, **prepared)

    def check(requests):
        assert len(requests) == 150
        for r in requests:
            q = np.asarray(r.query_embedding)
            topic = (r.query_tokens[0] - 1) // 2
            assert q @ encoder.encode([100 * (topic + 1)]) > q @ encoder.encode([100 * (2 - topic)])

    def check_items(items):
        assert len(items) == 40
        for item in items:
            assert abs(np.linalg.norm(item.embedding) - 1.0) < 1e-5

    assert_that(out["requests"], check, label="requests")
    assert_that(out["items"], check_items, label="items")
    pipeline.run().wait_until_finish()


def test_prepare_trains_the_text_tower_before_the_eval_cutoff_only(tmp_path, monkeypatch):
    from preprocessing import text_embeddings

    # 8 train requests at B + 10..17 s; 2 held-out ones at B + 105 / 106 s with the query 77
    # clicking product 88, a history search (query 3) at B and one (query 55) at the request time
    lines = [jd_line([1], ["10", "11"], [1, 0], history=[([2], "12", "CLICK")],
                     gaps=[0, 10 + k]) for k in range(8)]
    lines += [jd_line([77], ["88"], [2], history=[([3], "13", "CLICK"), ([55], "55", "CLICK")],
                      gaps=[0, 105 + j, 0]) for j in range(2)]
    products = [jd_product(w, [int(w) * 10], "b", "c", "d")
                for w in ("10", "11", "12", "13", "55", "88")]
    directory = write_jdsearch(str(tmp_path), lines, products)
    files = jdsearch.validate(directory)
    unfiltered, _, _, _ = jdsearch.click_pairs(files, (0.0, 0.0))
    assert ((77,), (880,)) in unfiltered and ((55,), (550,)) in unfiltered  # in the data

    fed = []
    real = text_embeddings.train_text_encoder
    monkeypatch.setattr(text_embeddings, "train_text_encoder",
                        lambda pairs, *a, **k: fed.extend(pairs) or real(pairs, *a, **k))
    prepared = jdsearch.prepare(directory, None, {"embedding_dim": 4, "text_tower_epochs": 1})
    # train candidate clicks, every history search before T_eval (held-out users' too)
    assert sorted(fed) == sorted([((1,), (100,))] * 8 + [((2,), (120,))] * 8
                                 + [((3,), (130,))] * 2)
    stats = prepared["text_tower_stats"]
    assert (stats["requests"], stats["held_out_requests"]) == (10, 2)
    assert stats["held_out_click_pairs"] == 4  # 2 candidate clicks + 2 late history searches
    assert stats["split_cutoffs_ms"] == {"eval": B + 105 * S, "test": B + 106 * S}
    encoder = prepared["text_encoder"]
    assert not encoder.encode([77]).any() and encoder.encode([1]).any()  # test query: untrained
    assert encoder.rows([55, 550, 880]) == []


# ---- end to end: `python -m preprocessing` on the tiny files, TFRecords read back ------------
def _read_back(out_dir):
    metadata, examples = read_examples(out_dir, batch_size=8)
    return metadata, item_vocabulary(out_dir), {rid: row for rid, (_, row) in examples.items()}


def test_end_to_end_cli_writes_examples_with_labels_and_sequences(tmp_path):
    from preprocessing.__main__ import main

    lines = [LINES[0], LINES[1], LINES[3],  # a malformed line is counted, not fatal
             jd_line([14], ["200", "300"], [2, 0],
                     history=[([14], "201", "CLICK")], gaps=[0, 30])]
    raw = write_jdsearch(str(tmp_path / "raw"), lines, PRODUCTS[:5])
    out = str(tmp_path / "out")
    assert main(["--input-format", "jdsearch", "--input", raw, "--output", out,
                 "--embedding-dim", "8", "--eval-fraction", "0", "--test-fraction", "0"]) == 0
    metadata, items, examples = _read_back(out)
    assert tuple(metadata.tasks) == F.JDSEARCH_TASKS
    assert tuple(metadata.engagement_names) == F.ENGAGEMENT_NAMES["jdsearch"]
    assert set(examples) == {"r2", "r3", "r5"}
    row = examples["r2"]
    assert labels(row, items, "click") == {BIG: 1.0, "200": 0.0, "201": 1.0, "202": 1.0}
    assert labels(row, items, "cart") == {BIG: 0.0, "200": 0.0, "201": 1.0, "202": 1.0}
    assert labels(row, items, "purchase") == {BIG: 0.0, "200": 0.0, "201": 1.0, "202": 0.0}
    # history (most recent first): gaps to the request are the remaining intervals, in seconds
    assert long_sequence(row, items) == [("200", 3.0, F.SOURCE_SEARCH, E["FLW"]),
                                          ("301", 10.0, F.SOURCE_SEARCH, E["ORD"]),
                                          ("300", 15.0, F.SOURCE_FEED, E["CLICK"])]
    assert list(row[F.QUERY_TOKENS][:int(row[F.QUERY_LENGTH])]) == [
        F.query_token_index(t, metadata.query_token_buckets) for t in (11, 12)]
    assert long_sequence(examples["r3"], items) == []  # empty history
    assert labels(examples["r5"], items, "cart") == {"200": 1.0, "300": 0.0}
    assert long_sequence(examples["r5"], items) == [("201", 30.0, F.SOURCE_SEARCH, E["CLICK"])]
    assert BIG in items  # the 20-digit product id survives as an exact string
    with open(f"{out}/stats.json") as f:
        stats = json.load(f)
    assert "user_behavior_data.txt:wrong_field_count" in json.dumps(stats)
