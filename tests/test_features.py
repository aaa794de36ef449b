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
    assert F.DatasetMetadata.load(str(tmp_path)) == F.DatasetMetadata(**{**md.__dict__, "tasks": ["click", "cart"], "engagement_names": list(md.engagement_names)})
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
