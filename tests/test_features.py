"""The shared feature spec: what preprocessing writes is what the trainer parses."""
import numpy as np
import pytest

from common import features as F


def _request(n_candidates, long_len, rt_len, dim=4):
    r = {F.REQUEST_ID: "r", F.USER_ID: "u", F.USER_INDEX: 7, F.REQUEST_TIME: 5,
         F.QUERY_TOKENS: [3, 4, 5], F.QUERY_EMBEDDING: np.arange(dim),
         F.USER_PROFILE: [1, 2, 3, 4], F.CANDIDATE_ITEM: np.arange(1, n_candidates + 1),
         F.CANDIDATE_AUTHOR: [9] * n_candidates,
         F.CANDIDATE_CATEGORY: [[1, 2]] * n_candidates}
    for task in F.DEFAULT_TASKS:
        r[F.label_feature(task)] = [1] * n_candidates
    for seq, length in ((F.LONG_TERM, long_len), (F.REAL_TIME, rt_len)):
        r[F.seq_feature(seq, F.SEQ_ITEM)] = np.arange(1, length + 1)
        r[F.seq_feature(seq, F.SEQ_AUTHOR)] = [1] * length
        r[F.seq_feature(seq, F.SEQ_CATEGORY)] = [[3, 4]] * length
        r[F.seq_feature(seq, F.SEQ_ENGAGEMENT)] = np.full((length, F.ENGAGEMENT_DIM), 0.5)
        r[F.seq_feature(seq, F.SEQ_SOURCE)] = [F.SOURCE_FEED] * length
        r[F.seq_feature(seq, F.SEQ_TIME_GAP)] = np.arange(1, length + 1)
    return r


def test_round_trip_pads_and_truncates_with_explicit_lengths():
    import tensorflow as tf

    md = F.DatasetMetadata(embedding_dim=4, long_term_length=5, real_time_length=3)
    batch = [F.make_example(_request(2, 2, 0)).SerializeToString(),
             F.make_example(_request(3, 7, 3)).SerializeToString()]
    out = F.parse_examples(tf.constant(batch), md)
    assert out[F.CANDIDATE_ITEM].shape == (2, 3)
    assert out[F.CANDIDATE_CATEGORY].shape == (2, 3, F.NUM_CATEGORY_LEVELS)
    assert out["long_engagement"].shape == (2, 5, F.ENGAGEMENT_DIM)
    assert out["long_length"].numpy().tolist() == [2, 5]  # 7 behaviours truncated to 5
    assert out["rt_length"].numpy().tolist() == [0, 3]
    assert out["long_item"].numpy()[1].tolist() == [1, 2, 3, 4, 5]  # most recent kept
    assert F.candidate_mask(out).numpy().tolist() == [[True, True, False], [True] * 3]
    np.testing.assert_array_equal(out[F.CANDIDATE_CATEGORY].numpy()[0, 2], [0, 0])


def test_make_example_names_the_inconsistent_field():
    r = _request(2, 2, 1)
    r[F.CANDIDATE_AUTHOR] = [1]
    with pytest.raises(ValueError, match="candidate_author"):
        F.make_example(r)
    r = _request(2, 2, 1)
    del r[F.label_feature("click")]
    with pytest.raises(ValueError, match="label_click"):
        F.make_example(r)


def test_metadata_round_trip_and_rejects_unknown_keys(tmp_path):
    md = F.DatasetMetadata(num_items=12, tasks=("click", "cart"))
    md.save(str(tmp_path))
    assert F.DatasetMetadata.load(str(tmp_path)) == F.DatasetMetadata(**{
        **md.__dict__, "tasks": ["click", "cart"], "engagement_names": list(md.engagement_names)})
    (tmp_path / F.METADATA_FILE).write_text('{"bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        F.DatasetMetadata.load(str(tmp_path))


def test_tiny_dataset_is_readable(tiny_dataset):
    import tensorflow as tf

    md = F.DatasetMetadata.load(tiny_dataset)
    files = tf.io.gfile.glob(F.tfrecord_pattern(tiny_dataset, "train"))
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(8)
    batch = F.parse_examples(next(iter(ds)), md)
    assert batch[F.QUERY_EMBEDDING].shape == (8, md.embedding_dim)
    assert batch["label_click"].shape[0] == 8


def test_every_layout_function_follows_the_one_feature_table():
    """Examples, parsing, dense shapes, dummy batches, listwise inputs and the example round trip
    all list exactly the table's features with the table's dtypes and widths."""
    import tensorflow as tf

    from serving import signatures as S
    from trainer.model import dummy_features

    md = F.DatasetMetadata(embedding_dim=6, num_items=40, num_authors=5, num_categories=9,
                           num_users=7, long_term_length=7, real_time_length=3)
    rng = np.random.default_rng(1)
    requests = [F.random_request(md, rng, n, {F.LONG_TERM: 5, F.REAL_TIME: 3}) for n in (4, 2)]
    serialized = [F.make_example(r, md.tasks).SerializeToString() for r in requests]
    parsed = F.parse_examples(tf.constant(serialized), md)
    layout = F.dense_layout(md, with_labels=True)
    table = {s.name: s for s in F.feature_specs(md, with_labels=True)}
    assert set(parsed) == set(layout) == set(table)
    for name, dense in layout.items():
        assert parsed[name].dtype.name == dense.dtype, name
        assert len(parsed[name].shape) == len(dense.shape), name
        for got, want in zip(parsed[name].shape[1:], dense.shape[1:]):
            assert want is None or got == want, name
    dummy = dummy_features(md, 2, 4, with_labels=True)
    assert {k: v.shape for k, v in dummy.items() if k in parsed} == {
        k: v.shape for k, v in parsed.items() if k in dummy}
    listwise = S.listwise_inputs(requests, md)
    assert set(listwise) == set(S.listwise_input_shapes(md)) == set(F.model_input_names(md))
    for name, (dtype, shape) in S.listwise_input_shapes(md).items():
        assert listwise[name].dtype == np.dtype(dtype) and listwise[name].ndim == len(shape)
        if table[name].level != F.REQUEST_LEVEL or table[name].counted_by:
            assert np.array_equal(listwise[name], parsed[name].numpy()[:, :listwise[name].shape[1]]
                                  if listwise[name].ndim > 1 else parsed[name].numpy()), name
    back = S.request_from_example(serialized[0])
    for name, value in back.items():
        if table[name].model_input:
            np.testing.assert_array_equal(np.asarray(value).reshape(-1),
                                          np.asarray(requests[0][name]).reshape(-1), name)
    # ids stay inside the vocabularies the table names
    for spec in table.values():
        if spec.vocabulary:
            assert 1 <= int(np.min(parsed[spec.name].numpy()[parsed[spec.name].numpy() > 0])) \
                and int(np.max(parsed[spec.name])) <= md.vocabulary_size(spec), spec.name


def test_watch_time_is_a_regression_task_with_label_and_truth_in_the_table():
    assert F.binary_tasks(F.WATCH_TIME_TASKS) == list(F.DEFAULT_TASKS)
    assert F.regression_tasks(F.WATCH_TIME_TASKS) == [F.WATCH_TIME]
    assert F.true_prob_feature("click") == "prob_click"
    assert F.true_prob_feature(F.WATCH_TIME) == "expected_watch_time"
    md = F.DatasetMetadata(tasks=F.WATCH_TIME_TASKS, has_true_probabilities=True,
                           embedding_dim=4, num_items=5, num_authors=2, num_categories=2,
                           num_users=2, long_term_length=3, real_time_length=2)
    names = [s.name for s in F.label_specs(md)]
    assert "label_watch_time" in names and "expected_watch_time" in names
    request = F.random_request(md, np.random.default_rng(0), num_candidates=3)
    request["label_watch_time"] = [0.0, 12.5, 3.25]
    request["expected_watch_time"] = [1.0, 2.0, 3.0]
    parsed = F.parse_examples(
        [F.make_example(request, md.tasks).SerializeToString()], md)
    np.testing.assert_allclose(parsed["label_watch_time"].numpy(), [[0.0, 12.5, 3.25]])
    np.testing.assert_allclose(parsed["expected_watch_time"].numpy(), [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="label_watch_time"):
        F.make_example({k: v for k, v in request.items() if k != "label_watch_time"},
                       md.tasks)
