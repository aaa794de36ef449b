"""End to end: tiny canonical logs with adversarial timing and bad rows -> `python -m
preprocessing` (in-process runner) -> TFRecords read back with tf.data and the trainer's
parsing spec, checked against a brute-force point-in-time reference."""
import glob
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from common import features as F
from common.feature_store import SqliteFeatureStore
from common.relevance import stage1_top_k
from preprocessing import pipeline as P
from tests.helpers import read_examples
from tests.preprocessing_canonical_files import (BASE_MS, DIM, _emb, behaviour, request,
                                                 write_canonical)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ITEMS, NUM_USERS = 12, 6
LONG, RT = 6, 3


def adversarial_tables(seed=0):
    rng = random.Random(seed)
    items = [{"item_id": f"i{k:02d}", "author_id": f"a{k % 4}", "category_l1": f"c{k % 3}",
              "category_l2": f"f{k % 2}", "duration_s": 5.0 + k, "embedding": _emb(k)}
             for k in range(NUM_ITEMS)]
    items.append(dict(items[0]))  # exact duplicate row
    bad_items = [{**items[1], "item_id": "i_nan", "embedding": [float("nan")] * DIM},
                 {**items[1], "item_id": "i_short", "embedding": [0.1] * (DIM - 1)},
                 {**items[1], "item_id": "i_neg", "duration_s": -2.0}]
    users = [{"user_id": f"u{k}", "age_bucket": "x", "gender": "m", "activity_level": "a",
              "city_tier": str(k)} for k in range(NUM_USERS)]
    users.append(dict(users[0]))
    behaviours, requests = [], []
    for u in range(NUM_USERS):
        times = [BASE_MS + rng.randrange(0, 40) * 100 for _ in range(rng.randrange(8, 25))]
        for t in times:
            behaviours.append(behaviour(f"u{u}", f"i{rng.randrange(NUM_ITEMS):02d}", t,
                                        source=rng.choice(["feed", "search"]),
                                        watch_ratio=rng.choice([0.1, 0.5, 1.2])))
        for r in range(3):
            t = rng.choice(times)  # requests at the exact time of some behaviours
            cands = [f"i{rng.randrange(NUM_ITEMS):02d}" for _ in range(rng.randrange(1, 5))]
            requests.append(request(f"r{u}_{r}", f"u{u}", t, cands,
                                    clicks=[1] + [0] * (len(cands) - 1),
                                    embedding=_emb(500 + 10 * u + r)))
            # its own search click in the same ms, and one 1 ms before
            behaviours.append(behaviour(f"u{u}", cands[0], t, source="search"))
            behaviours.append(behaviour(f"u{u}", cands[-1], t - 1, source="feed"))
    behaviours.append(dict(behaviours[0]))  # exact duplicate
    behaviours += [behaviour("u0", "ghost", BASE_MS), behaviour("u0", "i_nan", BASE_MS),
                   behaviour("u1", "i01", -5), {**behaviour("u1", "i01", BASE_MS),
                                                "watch_ratio": float("nan")},
                   {**behaviour("u1", "i01", BASE_MS), "play_time_s": -3.0}]
    requests.append(dict(requests[0]))  # duplicate request id
    requests += [
        {**request("bad_len", "u0", BASE_MS + 9000, ["i01", "i02"]), "click": [1]},
        request("bad_dim", "u0", BASE_MS + 9000, ["i01"], embedding=[0.5] * (DIM + 1)),
        request("bad_nan", "u0", BASE_MS + 9000, ["i01"], embedding=[float("nan")] * DIM),
        request("partly_unknown", "u2", BASE_MS + 9999, ["ghost", "i03", "i_short", "i04"],
                clicks=[0, 1, 0, 1]),
        request("new_user", "u_new", BASE_MS + 100, ["i05"]),
    ]
    rng.shuffle(behaviours)
    rng.shuffle(requests)
    return {"items": items + bad_items, "users": users, "behaviours": behaviours,
            "requests": requests}


def reference(tables, mode="recent", k=None):
    """Brute-force expected sequences per request id: [(item_index, gap_s, source)]."""
    good = sorted({i["item_id"] for i in tables["items"] if i["item_id"].startswith("i")
                   and len(i["item_id"]) == 3})
    index = {iid: n + 1 for n, iid in enumerate(good)}
    emb = {index[i["item_id"]]: np.asarray(i["embedding"]) for i in tables["items"]
           if i["item_id"] in index}
    valid = set()
    for b in tables["behaviours"]:
        if b["item_id"] in index and b["timestamp"] >= 0 and b["play_time_s"] >= 0 \
                and math.isfinite(b["watch_ratio"]):
            valid.add((b["user_id"], b["timestamp"], index[b["item_id"]],
                       F.SOURCE_NAMES[b["source"]],
                       (float(np.float32(b["watch_ratio"])), float(b["like"]), 0.0, 0.0)))
    out = {}
    for r in tables["requests"]:
        if len(r["query_embedding"]) != DIM or not np.all(np.isfinite(r["query_embedding"])):
            continue  # rejected requests (dead letters)
        rows = sorted((v for v in valid if v[0] == r["user_id"] and v[1] < r["timestamp"]),
                      key=lambda v: (v[1], v[2], v[3], v[4]), reverse=True)
        if mode == "stage1" and rows:
            chosen = stage1_top_k(r["query_embedding"], np.stack([emb[v[2]] for v in rows]), k)
            long_rows = [rows[c] for c in chosen]
        else:
            long_rows = rows[:LONG]
        seq = lambda rs: [(v[2], (r["timestamp"] - v[1]) / 1000.0, v[3]) for v in rs]  # noqa
        out[r["request_id"]] = {"long": seq(long_rows), "rt": seq(rows[:RT])}
    return out, index


def sequence(row, seq):
    n = int(row[F.seq_feature(seq, F.SEQ_LENGTH)])
    return [(int(i), float(g), int(s)) for i, g, s in zip(
        row[F.seq_feature(seq, F.SEQ_ITEM)][:n], row[F.seq_feature(seq, F.SEQ_TIME_GAP)][:n],
        row[F.seq_feature(seq, F.SEQ_SOURCE)][:n])]


def assert_sequences_equal(actual, expected):
    assert [(i, s) for i, _, s in actual] == [(i, s) for i, _, s in expected]
    np.testing.assert_allclose([g for _, g, _ in actual], [g for _, g, _ in expected],
                               rtol=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    tables = adversarial_tables()
    raw = write_canonical(str(base / "raw"), tables)
    out = str(base / "out")
    messages = []
    stats = P.run(["--input-format", "canonical", "--input", raw, "--output", out,
                   "--long-term-length", str(LONG), "--real-time-length", str(RT),
                   "--max-candidates", "3", "--eval-fraction", "0.2", "--test-fraction",
                   "0.2"], progress=messages.append)
    return tables, out, stats, messages


def test_examples_match_the_point_in_time_reference(run):
    tables, out, stats, _ = run
    metadata, examples = read_examples(out)
    expected, index = reference(tables)
    assert metadata.long_term_length == LONG and metadata.real_time_length == RT
    assert metadata.num_items == NUM_ITEMS and metadata.num_users == NUM_USERS + 1
    rejected = {"bad_len", "bad_dim", "bad_nan"}
    assert set(examples) == {r["request_id"] for r in tables["requests"]} - rejected
    nonempty = 0
    for rid, (split, row) in examples.items():
        request = next(r for r in tables["requests"] if r["request_id"] == rid)
        for seq in (F.LONG_TERM, F.REAL_TIME):
            actual = sequence(row, seq)
            assert_sequences_equal(actual, expected[rid][seq])
            assert all(g > 0 for _, g, _ in actual)  # never at or after the request
        nonempty += bool(expected[rid]["long"])
        assert int(row[F.REQUEST_TIME]) == request["timestamp"]
        n = int(row[F.NUM_CANDIDATES])
        if rid != "partly_unknown":
            assert row[F.CANDIDATE_ITEM][:n].tolist() == [
                index[c] for c in request["candidate_item_ids"]][:3]
    assert nonempty >= NUM_USERS * 2  # the reference is not trivially empty
    # unknown candidates removed, the others keep their labels
    _, row = examples["partly_unknown"]
    assert row[F.NUM_CANDIDATES] == 2
    assert row[F.CANDIDATE_ITEM][:2].tolist() == [index["i03"], index["i04"]]
    assert row[F.label_feature("click")][:2].tolist() == [1.0, 1.0]
    _, row = examples["new_user"]
    assert row[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)] == 0
    assert row[F.USER_PROFILE].tolist() == [0] * F.USER_PROFILE_DIM
    assert examples["r1_0"][1][F.USER_PROFILE].min() > 0


def test_split_by_time_holds_out_the_latest_requests(run):
    _, out, stats, _ = run
    _, examples = read_examples(out)
    times = {s: [int(r[F.REQUEST_TIME]) for sp, r in examples.values() if sp == s]
             for s in F.SPLITS}
    assert times["test"] and times["train"]
    assert max(times["train"]) < min(times["eval"] or [np.iinfo(np.int64).max])
    assert max(times["train"] + times["eval"]) < min(times["test"])
    assert len(times["test"]) >= math.ceil(0.2 * len(examples))
    assert stats["examples_by_split"] == {s: len(v) for s, v in times.items() if v}
    # the cutoffs later steps must not learn past are recorded, and are the split's edges
    cut = json.load(open(os.path.join(out, "stats.json")))["split_cutoffs_ms"]
    assert cut["test"] == min(times["test"])
    assert cut["eval"] == min(times["eval"] or times["test"])


def test_dead_letters_and_stats_count_every_reject(run):
    _, out, stats, messages = run
    letters = []
    for path in glob.glob(os.path.join(out, "dead_letter", "*.jsonl")):
        with open(path) as f:
            letters += [json.loads(line) for line in f]
    reasons = sorted((d["source"], d["reason"]) for d in letters)
    expected = sorted([
        ("items.parquet", "nan_embedding"), ("items.parquet", "wrong_embedding_dim"),
        ("items.parquet", "negative_duration"), ("items", "duplicate_item"),
        ("users", "duplicate_user"), ("behaviours", "unknown_item"),
        ("behaviours", "unknown_item"), ("behaviours.parquet", "negative_timestamp"),
        ("behaviours.parquet", "nan_watch_ratio"), ("behaviours.parquet", "negative_duration"),
        ("behaviours", "duplicate_behaviour"), ("requests", "duplicate_request"),
        ("requests.parquet", "label_length_mismatch"), ("requests.parquet", "wrong_embedding_dim"),
        ("requests.parquet", "nan_embedding"), ("requests", "unknown_candidate_item"),
        ("requests", "unknown_candidate_item")])
    dup_behaviours = [r for r in reasons if r[1] == "duplicate_behaviour"]
    assert [r for r in reasons if r[1] != "duplicate_behaviour"] == [
        r for r in expected if r[1] != "duplicate_behaviour"]
    assert len(dup_behaviours) >= 1  # the planted copy (random rows may collide too)
    assert all(d["row"] for d in letters)
    assert sum(stats["dead_letters"].values()) == len(letters)
    assert stats["behaviours_rejected"]["unknown_item"] == 2
    assert stats["behaviours_rejected"]["duplicate_behaviour"] == len(dup_behaviours)
    assert stats["candidates_rejected"] == {"unknown_item": 2}
    assert stats["requests_rejected"] == {"duplicate_request": 1}
    on_disk = json.load(open(os.path.join(out, "stats.json")))
    assert on_disk["examples"] == stats["examples"] > 0
    for seq in ("long", "rt"):
        d = on_disk["sequence_length"][seq]
        assert d["count"] == stats["examples"] and d["min"] <= d["p50"] <= d["max"]
    assert on_disk["sequence_length"]["long"]["max"] == LONG
    assert any("dead letters" in m for m in messages)


def test_vocab_embeddings_and_feature_store_agree_with_examples(run):
    tables, out, _, _ = run
    items = F.read_vocabulary(out, "items")
    assert items == sorted(items) and len(items) == NUM_ITEMS
    table = np.load(os.path.join(out, F.ITEM_EMBEDDINGS_FILE))
    assert table.shape == (NUM_ITEMS + 1, DIM) and not table[0].any()
    np.testing.assert_allclose(table[items.index("i03") + 1], _emb(3), rtol=1e-6)
    # durations by vocabulary index, row 0 (unknown) zero; the rejected item has none
    durations = np.load(os.path.join(out, F.ITEM_DURATIONS_FILE))
    assert durations.shape == (NUM_ITEMS + 1,) and durations[0] == 0
    assert durations[items.index("i03") + 1] == 5.0 + 3
    assert F.DatasetMetadata.load(out).item_durations
    assert json.load(open(os.path.join(out, "stats.json")))["items_with_duration"] == NUM_ITEMS
    _, examples = read_examples(out)
    store = SqliteFeatureStore(os.path.join(out, "feature_store.sqlite"))
    assert store.metadata().num_items == NUM_ITEMS
    np.testing.assert_array_equal(store.item_embeddings(), table)
    for rid, (_, row) in examples.items():
        history = store.behaviours_before(row[F.USER_ID].decode(), int(row[F.REQUEST_TIME]),
                                          LONG)
        assert history["item_index"].tolist() == [i for i, _, _ in sequence(row, F.LONG_TERM)]
        user = store.user(row[F.USER_ID].decode())
        if user is not None:
            assert user["user_index"] == row[F.USER_INDEX]
            assert user["user_profile"] == row[F.USER_PROFILE].tolist()
    tokens, emb = store.encode_query("w3 w5")
    assert tokens == [F.query_token_index(3), F.query_token_index(5)]
    assert abs(np.linalg.norm(emb) - 1) < 1e-5


def test_stage1_mode_selects_by_query_point_in_time(tmp_path):
    tables = adversarial_tables(seed=3)
    raw = write_canonical(str(tmp_path / "raw"), tables)
    out = str(tmp_path / "out")
    P.run(["--input-format", "canonical", "--input", raw, "--output", out,
           "--long-term-mode", "stage1", "--stage1-k", "4", "--real-time-length", str(RT),
           "--no-feature-store"], progress=lambda m: None)
    metadata, examples = read_examples(out)
    assert metadata.long_term_mode == "stage1" and metadata.long_term_length == 4
    expected, _ = reference(tables, mode="stage1", k=4)
    assert any(len(v["long"]) == 4 for v in expected.values())
    for rid, (_, row) in examples.items():
        assert_sequences_equal(sequence(row, F.LONG_TERM), expected[rid]["long"])
        assert_sequences_equal(sequence(row, F.REAL_TIME), expected[rid]["rt"])
    assert not os.path.exists(os.path.join(out, "feature_store.sqlite"))


def test_unusable_inputs_fail_fast_with_a_fix(tmp_path):
    with pytest.raises(P.InputError, match="does not exist"):
        P.run(["--input-format", "canonical", "--input", str(tmp_path / "nope"),
               "--output", str(tmp_path / "o")], progress=lambda m: None)
    kuaisar_like = tmp_path / "kuaisar"
    kuaisar_like.mkdir()
    (kuaisar_like / "rec_inter.csv").write_text("user_id,item_id\n1,2\n")
    with pytest.raises(P.InputError, match="--input-format kuaisar"):
        P.run(["--input-format", "canonical", "--input", str(kuaisar_like),
               "--output", str(tmp_path / "o")], progress=lambda m: None)
    tables = adversarial_tables()
    for row in tables["behaviours"]:
        row.pop("watch_ratio")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tests.preprocessing_canonical_files import SCHEMAS

    raw = write_canonical(str(tmp_path / "raw"), {k: v for k, v in tables.items()
                                                  if k != "behaviours"})
    schema = pa.schema([f for f in SCHEMAS["behaviours"] if f.name != "watch_ratio"])
    pq.write_table(pa.Table.from_pylist(tables["behaviours"], schema=schema),
                   os.path.join(raw, "behaviours.parquet"))
    result = subprocess.run([sys.executable, "-m", "preprocessing", "--input-format",
                             "canonical", "--input", raw, "--output", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "lacks columns ['watch_ratio']" in result.stderr
    assert not os.path.exists(tmp_path / "o" / "train")


def test_cli_help_explains_itself():
    result = subprocess.run([sys.executable, "-m", "preprocessing", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--input-format", "--long-term-mode", "--stage1-k", "--workers",
                 "--eval-fraction", "--num-shards", "DataflowRunner"):
        assert flag in result.stdout
    bad = subprocess.run([sys.executable, "-m", "preprocessing", "--input-format", "canonical",
                          "--input", "x", "--output", "y", "--eval-fraction", "0.6",
                          "--test-fraction", "0.5"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "must be < 1" in bad.stderr
