"""Generated logs through the public-format paths: a small generated dataset is converted to
KuaiSAR's and JDsearch's layouts, preprocessed by the real pipeline (in-process Beam), and
checked against the canonical path: every request accounted for, the same clicks, a side-file
row for every candidate, and the same oracle GAUC on the same requests."""
import csv
import glob
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import common  # noqa: F401
from common import features as F
from preprocessing import jdsearch, kuaisar
from preprocessing import pipeline as P
from preprocessing import synthetic as syn
from preprocessing import synthetic_layouts as SL
from trainer.metrics import grouped_auc
from tests.public_format_files import JD_BEHAVIOUR_COLUMNS, KUAISAR_COLUMNS

# enough users that JDsearch (one test query per user) has ~80 requests
GENERATED = dict(users=80, items=400, requests=320, seed=5, embedding_dim=8, mean_history=50)
PIPELINE_OPTIONS = ["--embedding-dim", "8", "--eval-fraction", "0.1", "--test-fraction", "0.3",
                    "--no-feature-store"]


def preprocess(input_format, input_dir, output_dir):
    return P.run(["--input-format", input_format, "--input", input_dir, "--output", output_dir]
                 + PIPELINE_OPTIONS, progress=lambda _m: None)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_layouts")
    raw = str(root / "raw")
    syn.generate(raw, **GENERATED)
    canonical = {"raw": raw, "truth_dir": str(root / "canonical_truth"),
                 "prep": str(root / "canonical_prep")}
    SL.convert(raw, canonical["truth_dir"], "canonical")
    canonical["stats"] = preprocess("canonical", raw, canonical["prep"])
    return {"root": root, "raw": raw, "logs": SL.load_generated(raw), "canonical": canonical}


def convert_and_preprocess(generated, layout):
    out = str(generated["root"] / layout)
    summary = SL.convert(generated["raw"], out, layout)
    prep = str(generated["root"] / f"{layout}_prep")
    stats = preprocess(layout, out, prep)
    return {"dir": out, "summary": summary, "prep": prep, "stats": stats,
            "truth": pq.read_table(os.path.join(out, SL.TRUTH_FILE)).to_pandas()}


@pytest.fixture(scope="module")
def kuaisar_run(generated):
    return convert_and_preprocess(generated, "kuaisar")


@pytest.fixture(scope="module")
def jdsearch_run(generated):
    return convert_and_preprocess(generated, "jdsearch")


def preprocessed_candidates(prep):
    """{(request id, item id): click label} and {request id: split} of a preprocessed dataset."""
    labels, splits = {}, {}
    for split, request_id, items, clicks in SL.read_examples(prep, F.SPLITS):
        splits[request_id] = split
        for item, click in zip(items, clicks):
            assert (request_id, item) not in labels, "a candidate appears twice"
            labels[(request_id, item)] = click
    return labels, splits


def canonical_path_oracle(canonical_prep, canonical_request_ids):
    """Oracle click GAUC by request from the canonical TFRecords' own true probabilities."""
    import tensorflow as tf

    wanted = set(canonical_request_ids)
    metadata = F.DatasetMetadata.load(canonical_prep)
    assert metadata.has_true_probabilities
    groups, labels, probs = [], [], []
    files = [f for s in F.SPLITS for f in glob.glob(F.tfrecord_pattern(canonical_prep, s))]
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        request_id = feature[F.REQUEST_ID].bytes_list.value[0].decode()
        if request_id not in wanted:
            continue
        wanted.discard(request_id)
        clicks = feature[F.label_feature("click")].float_list.value
        groups += [request_id] * len(clicks)
        labels += list(clicks)
        probs += list(feature[F.true_prob_feature("click")].float_list.value)
    assert not wanted, f"requests missing from the canonical path: {sorted(wanted)[:5]}"
    return grouped_auc(labels, probs, groups).value


def canonical_candidates(logs):
    """{(canonical request id, canonical item id): click} of the generated requests."""
    return {(logs.request_ids[r], logs.item_ids[i]): int(c) for r, i, c in
            zip(logs.candidate_request, logs.candidate_item, logs.candidate_click)}


def assert_side_file_joins(run, logs):
    truth = run["truth"]
    labels, _ = preprocessed_candidates(run["prep"])
    side_keys = set(zip(truth["request_id"], truth["item_id"]))
    assert len(side_keys) == len(truth), "side-file keys are not unique"
    assert side_keys == set(labels), (
        f"{len(side_keys - set(labels))} side-file rows join no preprocessed candidate, "
        f"{len(set(labels) - side_keys)} candidates have no side-file row")
    canonical = canonical_candidates(logs)
    for request_id, item_id, canonical_request, canonical_item, click in zip(
            truth["request_id"], truth["item_id"], truth["canonical_request_id"],
            truth["canonical_item_id"], truth["click"]):
        assert labels[(request_id, item_id)] == click == canonical[(canonical_request,
                                                                    canonical_item)]


def assert_nothing_rejected(stats):
    assert stats["requests_rejected"] == {} and stats["dead_letters"] == {}, (
        stats["requests_rejected"], stats["dead_letters"])
    assert stats["candidates_rejected"] == {} and stats["candidates_truncated"] == 0
    assert stats["behaviours_rejected"] == {}


# ---- the side file's probabilities ----------------------------------------------------------
def test_nonpersonalized_probability_replaces_only_the_user_term(generated):
    logs = generated["logs"]
    personalized, nonpersonalized = SL.click_probabilities(logs)
    np.testing.assert_allclose(personalized, logs.candidate_p_click, atol=SL.PROBABILITY_TOLERANCE)
    request = logs.candidate_request
    topic = logs.request_query_topic[request]
    relevant = logs.item_topic[logs.candidate_item] == topic
    preferred = logs.preferred_subtopic[logs.request_user[request], topic]
    affinity = relevant & (logs.item_subtopic[logs.candidate_item] == preferred)
    assert relevant.any() and affinity.any() and (relevant & ~affinity).any()
    # no user term outside the query topic; inside it the population average lies between the
    # user's own probability with and without affinity
    np.testing.assert_array_equal(nonpersonalized[~relevant], personalized[~relevant])
    assert np.all(nonpersonalized[affinity] < personalized[affinity])
    assert np.all(nonpersonalized[relevant & ~affinity] > personalized[relevant & ~affinity])
    # the population average over the uniform preferred subtopic, computed the long way
    cfg = logs.config
    quality = logs.item_quality[logs.candidate_item[relevant]]
    base = cfg["click_bias"] + cfg["relevance_effect"] + quality
    average = np.mean([SL._sigmoid(base + cfg["affinity_effect"] * (s == 0))
                       for s in range(cfg["subtopics"])], axis=0)
    np.testing.assert_allclose(nonpersonalized[relevant], average, rtol=1e-12)


def test_a_changed_click_model_is_refused(generated, tmp_path):
    raw = str(tmp_path / "raw")
    shutil.copytree(generated["raw"], raw)
    path = os.path.join(raw, syn.TRUTH_DIR, SL.GENERATOR_FILE)
    with open(path) as f:
        info = json.load(f)
    info["config"]["affinity_effect"] += 0.5
    with open(path, "w") as f:
        json.dump(info, f)
    with pytest.raises(ValueError, match="click model"):
        SL.convert(raw, str(tmp_path / "out"), "kuaisar")


# ---- KuaiSAR ----------------------------------------------------------------------------------
def test_kuaisar_files_have_the_published_columns_and_display_order(generated, kuaisar_run):
    logs = generated["logs"]
    for name, columns in KUAISAR_COLUMNS.items():
        with open(os.path.join(kuaisar_run["dir"], name)) as f:
            assert next(csv.reader(f)) == columns, name
    with open(os.path.join(kuaisar_run["dir"], kuaisar.SRC_INTER)) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(logs.candidate_item)
    shown = {}
    for row in rows:
        shown.setdefault(row["search_session_id"], []).append(row["item_id"])
    truth = kuaisar_run["truth"].sort_values(["request_id", "position"])
    for session, group in truth.groupby("request_id"):
        assert shown[session] == list(group["item_id"])  # display order kept in the file
    # ... and kept by the reader (the file's row order within a session), in every split
    checked = 0
    for split, request_id, items, _ in SL.read_examples(kuaisar_run["prep"], list(F.SPLITS)):
        first_views = list(dict.fromkeys(shown[request_id]))  # an item shown twice: first slot
        assert items == first_views, (split, request_id)
        checked += 1
    assert checked == len(shown)
    # captions name their topic: the topic words they carry point to the item's topic
    with open(os.path.join(kuaisar_run["dir"], kuaisar.ITEM_FEATURES)) as f:
        captions = [kuaisar.parse_token_list(row["caption"], "caption")
                    for row in csv.DictReader(f)]
    words_per_topic = logs.config["words_per_topic"]
    topic_of_token = {int(t): int((t - 1) // words_per_topic) for t in logs.vocab_token
                      if t <= logs.config["topics"] * words_per_topic}
    votes = [[topic_of_token[t] for t in c if t in topic_of_token] for c in captions]
    named = [max(set(v), key=v.count) == topic for v, topic in zip(votes, logs.item_topic) if v]
    assert len(named) > 0.8 * len(captions) and np.mean(named) > 0.8


def test_kuaisar_path_carries_every_request_and_click(generated, kuaisar_run):
    logs, stats = generated["logs"], kuaisar_run["stats"]
    assert_nothing_rejected(stats)
    assert stats["requests"] == stats["examples"] == len(logs.request_ids)
    assert stats["candidates"] == len(logs.candidate_item)
    # feed behaviours from rec_inter, search behaviours from the clicks of src_inter
    assert stats["behaviours"] == len(logs.behaviour_time) == generated["canonical"]["stats"][
        "behaviours"]
    assert kuaisar_run["summary"]["written"]["requests_written"] == len(logs.request_ids)
    assert_side_file_joins(kuaisar_run, logs)


def test_kuaisar_oracle_equals_the_canonical_oracle_on_the_same_requests(generated, kuaisar_run):
    result = SL.oracle_gauc(kuaisar_run["prep"], os.path.join(kuaisar_run["dir"], SL.TRUTH_FILE))
    canonical = SL.oracle_gauc(generated["canonical"]["prep"], os.path.join(
        generated["canonical"]["truth_dir"], SL.TRUTH_FILE))
    # request times are kept, so the time split holds out the same requests
    assert sorted(result.canonical_request_ids) == sorted(canonical.canonical_request_ids)
    assert result.requests > 20 and result.click_mismatches == 0 and result.groups_used > 20
    expected = canonical_path_oracle(generated["canonical"]["prep"], result.canonical_request_ids)
    assert result.oracle == pytest.approx(expected, abs=1e-6)
    assert canonical.nonpersonalized_oracle == pytest.approx(result.nonpersonalized_oracle,
                                                             abs=1e-9)
    assert result.oracle > result.nonpersonalized_oracle > 0.5


# ---- JDsearch ---------------------------------------------------------------------------------
def test_jdsearch_has_each_users_last_request_with_its_history(generated, jdsearch_run):
    logs, stats = generated["logs"], jdsearch_run["stats"]
    assert_nothing_rejected(stats)
    users_with_requests = np.unique(logs.request_user)
    written = jdsearch_run["summary"]["written"]
    assert stats["requests"] == written["requests_written"] == len(users_with_requests)
    # the other requests are no requests in this layout: counted, their clicks kept as history
    assert written["requests_dropped_not_last_of_user"] == len(logs.request_ids) - len(
        users_with_requests)
    assert written["search_behaviours_without_request"] == 0
    truth = jdsearch_run["truth"]
    last = {}
    for r in np.lexsort((logs.request_time, logs.request_user)):
        last[logs.request_user[r]] = logs.request_ids[r]
    assert set(truth["canonical_request_id"]) == set(last.values())
    assert_side_file_joins(jdsearch_run, logs)

    # every line's history is the user's behaviours strictly before the request, by source,
    # and a search behaviour carries the query it was clicked from
    tokens_of = dict(zip(logs.request_ids, logs.request_tokens))
    clicked_from = {(logs.request_user[r], logs.item_ids[i], tuple(tokens_of[logs.request_ids[r]]))
                    for r, i, c in zip(logs.candidate_request, logs.candidate_item,
                                       logs.candidate_click) if c}
    canonical_of = dict(zip(truth["request_id"], truth["canonical_request_id"]))
    user_of = dict(zip(logs.request_ids, logs.request_user))
    time_of = dict(zip(logs.request_ids, logs.request_time))
    checked = 0
    with open(os.path.join(jdsearch_run["dir"], jdsearch.BEHAVIOUR_FILES[0])) as f:
        assert next(f).rstrip("\n").split("\t") == JD_BEHAVIOUR_COLUMNS
        for number, line in enumerate(f, start=2):
            request, behaviours, _ = jdsearch.parse_behaviour_line(number, line)
            if request is None:
                continue
            canonical = canonical_of[request.request_id]
            user, t = user_of[canonical], time_of[canonical]
            history = [b for b in behaviours if b.timestamp_ms < request.timestamp_ms]
            before = (logs.behaviour_user == user) & (logs.behaviour_time < t)
            assert sum(b.source == F.SOURCE_SEARCH for b in history) == int(
                (before & logs.behaviour_search).sum())
            assert sum(b.source == F.SOURCE_FEED for b in history) == int(
                (before & ~logs.behaviour_search).sum())
            assert request.query_tokens == tuple(int(x) for x in tokens_of[canonical])
            checked += 1
        assert checked == len(users_with_requests)
    searched = [line.split("\t") for line in open(os.path.join(
        jdsearch_run["dir"], jdsearch.BEHAVIOUR_FILES[0])).read().splitlines()[1:]]
    item_ids = logs.item_ids
    for number, fields in enumerate(searched, start=2):
        user_index = number - 2
        for query, wid in zip(fields[3].split("_"), fields[4].split("_")):
            if query not in ("", jdsearch.NO_QUERY):
                assert (user_index, item_ids[int(wid)], jdsearch.parse_terms(query)) in \
                    clicked_from


def test_jdsearch_oracle_equals_the_canonical_oracle_on_the_same_requests(generated,
                                                                          jdsearch_run):
    truth_file = os.path.join(jdsearch_run["dir"], SL.TRUTH_FILE)
    test = SL.oracle_gauc(jdsearch_run["prep"], truth_file, "test")
    assert test.requests >= 10 and test.click_mismatches == 0
    expected = canonical_path_oracle(generated["canonical"]["prep"], test.canonical_request_ids)
    assert test.oracle == pytest.approx(expected, abs=1e-6)
    everything = SL.oracle_gauc(jdsearch_run["prep"], truth_file, "all")
    assert everything.requests == jdsearch_run["stats"]["requests"]
    assert everything.oracle == pytest.approx(canonical_path_oracle(
        generated["canonical"]["prep"], everything.canonical_request_ids), abs=1e-6)
    assert everything.oracle > everything.nonpersonalized_oracle > 0.5


# ---- evaluation and CLI -----------------------------------------------------------------------
def test_oracle_refuses_the_side_file_of_another_layout(generated, kuaisar_run):
    with pytest.raises(ValueError, match="no row in"):
        SL.oracle_gauc(kuaisar_run["prep"], os.path.join(generated["canonical"]["truth_dir"],
                                                         SL.TRUTH_FILE))


def test_cli_explains_itself_converts_and_evaluates(generated, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SL.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--layout", "kuaisar", "jdsearch", "--oracle-gauc", "non-personalized",
                  "Display order"):
        assert words in text, words
    out = str(tmp_path / "truth")
    assert SL.main(["--input", generated["raw"], "--output", out, "--layout", "canonical"]) == 0
    captured = capsys.readouterr()
    assert "[synthetic_layouts] read" in captured.err and "done in" in captured.err
    written = json.loads(captured.out)["written"]
    assert written["truth_rows"] == len(generated["logs"].candidate_item)
    assert SL.main(["--oracle-gauc", generated["canonical"]["prep"], "--truth",
                    os.path.join(out, SL.TRUTH_FILE)]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = SL.oracle_gauc(generated["canonical"]["prep"], os.path.join(out, SL.TRUTH_FILE))
    assert printed["oracle"] == pytest.approx(expected.oracle)
    assert printed["requests"] == expected.requests
    # not a generated directory: refused with the reason
    assert SL.main(["--input", str(tmp_path), "--output", str(tmp_path / "x"),
                    "--layout", "kuaisar"]) == 2
    assert "truth" in capsys.readouterr().err
