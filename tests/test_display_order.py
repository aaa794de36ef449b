"""Display order: the readers keep the order candidates were shown in, examples carry each
candidate's display position, metadata.json says whether the order is known, and the model
learns a position bias in training only (serving never needs or uses a position)."""
import glob
import json
import os
import random

import numpy as np
import pytest

import common  # noqa: F401
from common import features as F
from preprocessing import jdsearch, kuaisar, pipeline as P
from preprocessing.records import ItemRecord, RequestRecord
from tests.helpers import item_vocabulary, read_examples
from tests.public_format_files import (item_row, jd_line, jd_product, src_row, write_jdsearch,
                                       write_kuaisar)

T0 = 1_653_184_800_000
RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def _shown_items(row, items):
    n = int(row[F.NUM_CANDIDATES])
    return [items[i] for i in row[F.CANDIDATE_ITEM][:n]], row[F.CANDIDATE_POSITION][:n].tolist()


# ---- KuaiSAR: file row order within a session ---------------------------------------------------
# Two sessions interleaved in the file; item ids deliberately not in sorted order, item 12
# shown twice in session 500 (one candidate at its first position, clicked if either row was).
SRC_ROWS = [src_row(1, 500, T0, "[20, 34]", 30, 0),
            src_row(2, 600, T0 + 50, "[7]", 5, 1),
            src_row(1, 500, T0, "[20, 34]", 12, 0),
            src_row(1, 500, T0, "[20, 34]", 25, 1),
            src_row(2, 600, T0 + 50, "[7]", 41, 0),
            src_row(1, 500, T0, "[20, 34]", 12, 1),
            src_row(2, 600, T0 + 50, "[7]", 3, 0),
            src_row(1, 500, T0, "[20, 34]", 7, 0)]
EXPECTED = {  # written by hand from SRC_ROWS: (items as shown, their positions, clicks)
    "500": (("30", "12", "25", "7"), (0, 1, 2, 4), [0.0, 1.0, 1.0, 0.0]),
    "600": (("5", "41", "3"), None, [1.0, 0.0, 0.0]),  # None: positions are the list index
}


def _session_rows(order_offsets):
    """(session, [(row order, user, time, keyword, item, clicked)]) as ParseSearchRow emits."""
    by_session = {}
    for offset, row in zip(order_offsets, SRC_ROWS):
        parsed = kuaisar.parse_search_row(dict(zip(
            ["user_id", "search_session_id", "search_session_time", "search_session_timestamp",
             "keyword", "search_source", "item_id", "click_cnt", "item_type"],
            [str(v) for v in row])))
        session, values = parsed
        by_session.setdefault(session, []).append((("src_inter.csv", offset),) + values)
    return by_session


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kuaisar_sessions_keep_file_row_order_whatever_order_rows_arrive_in(seed):
    """GroupByKey hands a session's rows over in any order (bundles read in parallel): the
    request must still list the items in file order, with their display positions."""
    offsets = [100 + 37 * k for k in range(len(SRC_ROWS))]  # byte offsets, increasing
    rng = random.Random(seed)
    for session, rows in _session_rows(offsets).items():
        rows = list(reversed(rows))
        if seed:
            rng.shuffle(rows)
        out = [r for r in kuaisar.BuildSearchRequests().process((session, rows))
               if isinstance(r, RequestRecord)]
        items, positions, clicks = EXPECTED[session]
        assert [(r.candidate_item_ids, r.candidate_positions, r.labels["click"])
                for r in out] == [(items, positions, clicks)]


def test_line_offsets_source_reads_each_line_once_whatever_the_split(tmp_path):
    from apache_beam.io import source_test_utils

    path = write_kuaisar(str(tmp_path), src_rows=SRC_ROWS) + "/src_inter.csv"
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")[1:-1]  # data lines, header and final newline left out
    source = kuaisar._LinesWithOffsetsSource(path)
    whole = source_test_utils.read_from_source(source)
    assert [line for _, _, line in whole] == raw
    with open(path, "rb") as f:
        data = f.read()
    assert all(data[offset:offset + len(line)] == line for _, offset, line in whole)
    for size in (1, 7, 40, 1000):
        bundles = list(source.split(desired_bundle_size=size))
        random.Random(size).shuffle(bundles)  # bundles finish in any order
        lines = [r for b in bundles for r in source_test_utils.read_from_source(
            b.source, b.start_position, b.stop_position)]
        assert sorted(lines, key=lambda r: r[1]) == whole, size  # each line exactly once
    bundle = next(iter(source.split(desired_bundle_size=10 ** 6)))
    source_test_utils.assert_split_at_fraction_exhaustive(
        bundle.source, bundle.start_position, bundle.stop_position)


def test_kuaisar_reader_keeps_row_order_across_small_bundles(tmp_path):
    import apache_beam as beam
    from apache_beam.testing import test_pipeline
    from apache_beam.testing.util import assert_that, equal_to

    directory = write_kuaisar(str(tmp_path), src_rows=SRC_ROWS)
    pipeline = test_pipeline.TestPipeline(runner=RUNNER)
    out = pipeline | kuaisar.ReadKuaiSAR(directory, min_bundle_size=1)
    assert_that(out["requests"] | beam.Map(lambda r: (r.request_id, r.candidate_item_ids,
                                                      r.candidate_positions)),
                equal_to([(k, v[0], v[1]) for k, v in EXPECTED.items()]))
    pipeline.run().wait_until_finish()


def test_kuaisar_end_to_end_examples_carry_display_positions(tmp_path):
    from preprocessing.__main__ import main

    raw = write_kuaisar(str(tmp_path / "raw"), src_rows=SRC_ROWS,
                        item_rows=[item_row(i, "[20, 7]", 900, 1, 2)
                                   for i in (30, 12, 25, 7, 5, 41, 3)])
    out = str(tmp_path / "out")
    assert main(["--input-format", "kuaisar", "--input", raw, "--output", out,
                 "--embedding-dim", "4", "--eval-fraction", "0", "--test-fraction", "0"]) == 0
    metadata, examples = read_examples(out)
    assert metadata.display_order and "src_inter.csv" in metadata.display_order_source
    items = item_vocabulary(out)
    for request_id, (shown, positions, clicks) in EXPECTED.items():
        row = examples[request_id][1]
        assert _shown_items(row, items) == (list(shown),
                                            list(positions or range(len(shown))))
        assert row[F.label_feature("click")][:len(shown)].tolist() == clicks
    with open(os.path.join(out, "stats.json")) as f:
        assert json.load(f)["display_order"] is True


# ---- JDsearch: candidate_wid_list order --------------------------------------------------------
def test_jdsearch_keeps_the_candidate_list_order(tmp_path):
    from preprocessing.__main__ import main

    shown = ["500", "12", "98765432109876543210", "7", "300"]  # not sorted in any way
    line = jd_line([11], shown, [0, 1, 0, 3, 0], history=[], gaps=[5])
    request, _, _ = jdsearch.parse_behaviour_line(2, line)
    assert request.candidate_item_ids == tuple(shown)
    raw = write_jdsearch(str(tmp_path / "raw"), [line],
                         [jd_product(w, [11], "b", "1", "2") for w in shown])
    out = str(tmp_path / "out")
    assert main(["--input-format", "jdsearch", "--input", raw, "--output", out,
                 "--embedding-dim", "4", "--eval-fraction", "0", "--test-fraction", "0"]) == 0
    metadata, examples = read_examples(out)
    assert metadata.display_order and "candidate_wid_list" in metadata.display_order_source
    row = examples["r2"][1]
    assert _shown_items(row, item_vocabulary(out)) == (shown, [0, 1, 2, 3, 4])
    assert row[F.label_feature("purchase")][:5].tolist() == [0, 0, 0, 1, 0]


# ---- the core: positions survive removed candidates, and only with display order -------------
def _resolve(display_order, record):
    metadata = F.DatasetMetadata(
        input_format="canonical", embedding_dim=2, tasks=("click",), max_candidates=3,
        display_order=display_order,
        display_order_source="test" if display_order else "")
    config = P.PipelineConfig(metadata=metadata, eval_fraction=0.0, test_fraction=0.0)
    catalog = P.build_catalog([ItemRecord(i, "a", ("c", "d"), (1.0, 0.0)) for i in "abcde"])
    out = list(P.ResolveRequests(config).process((record.request_id, [record]), catalog))
    return [x for x in out if isinstance(x, tuple)], [
        x.value for x in out if getattr(x, "tag", None) == P.DEAD]


def test_core_keeps_shown_positions_of_the_kept_candidates():
    record = RequestRecord("r", "u", 5, (1,), (1.0, 0.0), ("b", "unknown", "a", "e", "d"),
                           {"click": [0.0, 1.0, 1.0, 0.0, 0.0]})
    (user, resolved), = _resolve(True, record)[0]
    # the unknown item leaves a gap, max_candidates cuts the last: never renumbered
    assert resolved[F.CANDIDATE_POSITION] == [0, 2, 3]
    (user, resolved), = _resolve(True, record._replace(candidate_positions=(0, 1, 3, 5, 9)))[0]
    assert resolved[F.CANDIDATE_POSITION] == [0, 3, 5]
    (user, resolved), = _resolve(False, record)[0]
    assert F.CANDIDATE_POSITION not in resolved  # order unknown: no position is written
    kept, dead = _resolve(True, record._replace(candidate_positions=(0, 1, 1, 2, 3)))
    assert not kept and [d.reason for d in dead] == ["bad_candidate_positions"]


# ---- the feature table and metadata ------------------------------------------------------------
def test_examples_with_and_without_positions_parse_together():
    import tensorflow as tf

    md = F.DatasetMetadata(embedding_dim=3, num_items=9, num_authors=3, num_categories=3,
                           num_users=2, long_term_length=4, real_time_length=2,
                           display_order=True, display_order_source="test")
    rng = np.random.default_rng(0)
    with_pos = F.random_request(md, rng, 3)
    with_pos[F.CANDIDATE_POSITION] = [0, 4, 7]
    without = F.random_request(md, rng, 4)
    del without[F.CANDIDATE_POSITION]
    parsed = F.parse_examples(tf.constant([F.make_example(r).SerializeToString()
                                           for r in (with_pos, without)]), md)
    assert parsed[F.CANDIDATE_POSITION].numpy().tolist() == [[0, 4, 7, -1], [-1] * 4]
    assert F.CANDIDATE_POSITION not in F.model_input_names(md)
    from serving import signatures as S

    assert F.CANDIDATE_POSITION not in S.listwise_input_shapes(md)
    for bad in ([0, 1], [0, 0, 1], [-1, 0, 1]):
        with pytest.raises(ValueError, match=F.CANDIDATE_POSITION):
            F.make_example({**with_pos, F.CANDIDATE_POSITION: bad})


def test_metadata_records_display_order_and_round_trips(tmp_path):
    md = F.DatasetMetadata(input_format="kuaisar", display_order=True,
                           display_order_source=F.DISPLAY_ORDER_SOURCES["kuaisar"])
    md.save(str(tmp_path))
    back = F.DatasetMetadata.load(str(tmp_path))
    assert (back.display_order, back.display_order_source) == (
        True, F.DISPLAY_ORDER_SOURCES["kuaisar"])
    raw = json.loads((tmp_path / F.METADATA_FILE).read_text())
    del raw["display_order"], raw["display_order_source"]  # written before it was recorded
    (tmp_path / F.METADATA_FILE).write_text(json.dumps(raw))
    assert F.DatasetMetadata.load(str(tmp_path)).display_order is False
    with pytest.raises(ValueError, match="display_order_source"):
        F.DatasetMetadata(display_order=True)
    with pytest.raises(ValueError, match="true or false"):
        F.DatasetMetadata(display_order="yes", display_order_source="x")


# ---- the model: position bias in training only -------------------------------------------------
BATCH = 16


@pytest.fixture(scope="module")
def position_data(tmp_path_factory):
    import tensorflow as tf

    from tests.tiny_dataset import write_tiny_dataset

    directory = write_tiny_dataset(str(tmp_path_factory.mktemp("position_data")),
                                   requests_per_split=(160, 16, 16), position_effect=0.4)
    metadata = F.DatasetMetadata.load(directory)
    files = sorted(glob.glob(os.path.join(directory, "train", "*.tfrecord.gz")))
    train = (tf.data.TFRecordDataset(files, compression_type="GZIP").batch(BATCH)
             .map(lambda s: F.parse_examples(s, metadata)).cache())
    return dict(dir=directory, metadata=metadata, train=train, batch=next(iter(train)),
                embeddings=np.load(os.path.join(directory, F.ITEM_EMBEDDINGS_FILE)))


def _config(**overrides):
    from trainer import config as C

    return C.ModelConfig(**{**C.preset("qin").to_dict(), "k1": 12, "k2": 5,
                            "id_embedding_dim": 8, "hidden_units": 16, "attention_units": 8,
                            "expert_units": [16], "tower_units": [8], **overrides}).validate()


def _build(data, metadata=None, **overrides):
    import tensorflow as tf

    from trainer import model as M

    tf.keras.utils.set_random_seed(0)
    model = M.build_model(_config(**overrides), metadata or data["metadata"],
                          data["embeddings"])
    model(data["batch"])
    return model


def _with_positions(batch, positions):
    import tensorflow as tf

    out = dict(batch)
    out[F.CANDIDATE_POSITION] = tf.constant(positions, tf.int64)
    return out


def test_position_bias_moves_training_logits_but_not_outputs(position_data):
    model = _build(position_data)
    assert model.uses_position_bias
    table = np.zeros(model.position_bias.embeddings.shape, np.float32)
    table[:, 0] = np.linspace(0.3, -2.0, table.shape[0])  # click bias by bucket
    model.position_bias.embeddings.assign(table)
    batch = position_data["batch"]
    b, n = batch[F.CANDIDATE_ITEM].shape
    shown = _with_positions(batch, np.tile(np.arange(n), (b, 1)))
    reversed_ = _with_positions(batch, np.tile(np.arange(n)[::-1], (b, 1)))
    unknown = _with_positions(batch, np.full((b, n), F.POSITION_UNKNOWN))
    base = model._forward(batch)[1]
    for features in (shown, reversed_):
        logits = model.training_logits(features)
        positions = np.minimum(features[F.CANDIDATE_POSITION].numpy(), table.shape[0] - 1)
        np.testing.assert_allclose(logits["click"].numpy() - base["click"].numpy(),
                                   table[positions, 0] - table[0, 0], atol=1e-5)
        np.testing.assert_allclose(logits["long_view"].numpy(), base["long_view"].numpy(),
                                   atol=1e-6)  # its bias is still zero
    assert not np.allclose(model.training_logits(shown)["click"].numpy(),
                           model.training_logits(reversed_)["click"].numpy())
    np.testing.assert_allclose(model.training_logits(unknown)["click"].numpy(),
                               base["click"].numpy(), atol=1e-6)
    # the loss sees the bias; the outputs (evaluation, calibration, serving) never do
    assert not np.isclose(float(model.compute_loss(shown)), float(model.compute_loss(reversed_)))
    served = {k: v.numpy() for k, v in model(shown).items()}
    for features in (reversed_, unknown, {k: v for k, v in batch.items()
                                          if k != F.CANDIDATE_POSITION}):
        for key, value in model(features).items():
            np.testing.assert_array_equal(value.numpy(), served[key], err_msg=key)


def test_training_learns_the_planted_position_effect(position_data):
    import tensorflow as tf

    model = _build(position_data)
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-2), run_eagerly=True)
    model.fit(position_data["train"], epochs=3, verbose=0)
    click = model.position_bias.embeddings.numpy()[:, 0]
    learned = click[:10] - click[0]  # bias of positions 0..9 (0 at position 0 by design)
    # shown lower, clicked less (the data's logit falls by 0.4 per slot)
    slope = np.polyfit(np.arange(10), learned, 1)[0]
    assert slope < -0.05, learned
    assert learned[6:10].mean() < learned[1:4].mean() - 0.3, learned
    # untrained model: the bias is zero everywhere
    assert not _build(position_data).position_bias.embeddings.numpy().any()


def test_exported_signatures_need_no_position_and_ignore_it(position_data, tmp_path):
    import tensorflow as tf

    from serving import signatures as S

    model = _build(position_data)
    table = np.zeros(model.position_bias.embeddings.shape, np.float32)
    table[:, :] = np.linspace(0.0, -3.0, table.shape[0])[:, None]
    model.position_bias.embeddings.assign(table)
    metadata = position_data["metadata"]
    fns = S.save_servable(model, metadata, str(tmp_path / "1"))
    loaded = tf.saved_model.load(str(tmp_path / "1"))
    listwise = loaded.signatures[S.RANK_LISTWISE]
    assert F.CANDIDATE_POSITION not in listwise.structured_input_signature[1]
    files = sorted(glob.glob(os.path.join(position_data["dir"], "test", "*.tfrecord.gz")))
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")][:4]
    requests = [S.request_from_example(r) for r in records]
    inputs = {k: tf.constant(v) for k, v in S.listwise_inputs(requests, metadata).items()}
    ranked = {k: v.numpy() for k, v in listwise(**inputs).items()}
    parsed = F.parse_examples(tf.constant(records), metadata, with_labels=False)
    assert (parsed[F.CANDIDATE_POSITION].numpy()[:, 0] == 0).all()  # test data has positions
    direct = model(_with_positions(parsed, np.full(parsed[F.CANDIDATE_ITEM].shape, 5)))
    mask = F.candidate_mask(parsed).numpy()
    for task in list(metadata.tasks) + [F.SCORE]:
        np.testing.assert_allclose(ranked[task][mask], direct[task].numpy()[mask], rtol=1e-5,
                                   atol=1e-6, err_msg=task)
    # per-candidate examples with or without a position: the same served values
    example = records[0]
    one = S.per_candidate_examples(example, metadata)
    with_position = []
    for k, serialized in enumerate(one):
        from tensorflow.core.example import example_pb2

        e = example_pb2.Example.FromString(serialized)
        e.features.feature[F.CANDIDATE_POSITION].int64_list.value.append(7 + k)
        with_position.append(e.SerializeToString())
    serve = loaded.signatures[S.SERVING_DEFAULT]
    a = serve(inputs=tf.constant(one))
    b = serve(inputs=tf.constant(with_position))
    n = len(one)
    for task in list(metadata.tasks) + [F.SCORE]:
        np.testing.assert_array_equal(a[task].numpy(), b[task].numpy(), err_msg=task)
        np.testing.assert_allclose(a[task].numpy(), ranked[task][0, :n], rtol=1e-5, atol=1e-6)
    assert fns  # the in-process functions were built too


def test_no_display_order_or_option_off_builds_exactly_the_old_model(position_data, tmp_path):
    import dataclasses

    from trainer import config as C

    unordered = dataclasses.replace(position_data["metadata"], display_order=False,
                                    display_order_source="")
    reference = _build(position_data, unordered, position_bias=False)
    names = sorted(v.name for v in reference.variables)
    for model in (_build(position_data, unordered),  # the default config, data without order
                  _build(position_data, position_bias=False)):  # option off, ordered data
        assert not model.uses_position_bias and model.position_bias is None
        assert sorted(v.name for v in model.variables) == names
        assert float(model.compute_loss(position_data["batch"])) == pytest.approx(
            float(reference.compute_loss(position_data["batch"])))
    # a model_config.json saved before the option existed: trained without the term
    raw = json.loads(_config().to_json())
    del raw["position_bias"], raw["position_buckets"]
    (tmp_path / C.MODEL_CONFIG_FILE).write_text(json.dumps(raw))
    loaded = C.ModelConfig.load(str(tmp_path))
    assert loaded.position_bias is False
    assert C.ModelConfig().position_bias is True  # new models: on by default
