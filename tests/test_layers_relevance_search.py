"""RSU and masking helpers against small NumPy references."""
import numpy as np
import pytest
import tensorflow as tf

from trainer.layers import masking
from trainer.layers.relevance_search import RelevanceSearchUnit
from trainer.model import cosine_similarity


def np_cos(a, b):
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return (a * b).sum(-1)


def reference_rsu(query, contents, length, targets, k1, k2, eps=None):
    """Per request: list (per target) of selected positions, in selection order."""
    valid = list(range(length))
    rel = np_cos(query[None], contents)
    if eps is not None:
        valid = [i for i in valid if rel[i] >= eps]
    stage1 = sorted(valid, key=lambda i: -rel[i])[:k1]
    out = []
    for t in targets:
        rel2 = np_cos(t[None], contents)
        out.append(sorted(stage1, key=lambda i: -rel2[i])[:k2])
    return out


def random_case(seed, batch=3, length=12, num_cand=4, dim=6):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    contents = rng.normal(size=(batch, length, dim)).astype(np.float32)
    targets = rng.normal(size=(batch, num_cand, dim)).astype(np.float32)
    lengths = np.array([length, 5, 0][:batch], np.int64)
    return query, contents, lengths, targets


def run_rsu(rsu, query, contents, lengths, targets):
    mask = masking.length_mask(lengths, contents.shape[1])
    positions, valid = rsu(tf.constant(query), tf.constant(contents), mask, tf.constant(targets))
    return positions.numpy(), valid.numpy()


@pytest.mark.parametrize("k1,k2,eps", [(6, 3, None), (20, 4, None), (6, 6, 0.0), (3, 2, -0.2)])
def test_rsu_matches_numpy_reference(k1, k2, eps):
    query, contents, lengths, targets = random_case(seed=k1 + k2)
    rsu = RelevanceSearchUnit(k1=k1, k2=k2, threshold=eps)
    positions, valid = run_rsu(rsu, query, contents, lengths, targets)
    for b in range(len(lengths)):
        expected = reference_rsu(query[b], contents[b], lengths[b], targets[b], k1, k2, eps)
        for n, want in enumerate(expected):
            got = positions[b, n][valid[b, n]].tolist()
            assert got == want, (b, n)
            assert np.all(positions[b, n][~valid[b, n]] == -1)


def test_padding_is_never_selected_even_when_most_relevant():
    query, contents, lengths, targets = random_case(seed=1)
    # Padded slots hold the query / target itself: cosine 1, the best possible score.
    contents[1, 5:] = query[1]
    contents[2, :] = targets[2, 0]
    positions, valid = run_rsu(RelevanceSearchUnit(k1=8, k2=4), query, contents, lengths,
                               targets)
    assert np.all(positions[1][valid[1]] < 5)
    assert valid[1].sum(-1).tolist() == [4] * targets.shape[1]
    assert not valid[2].any() and np.all(positions[2] == -1)


def test_k_larger_than_length_keeps_every_valid_behaviour():
    query, contents, lengths, targets = random_case(seed=2)
    rsu = RelevanceSearchUnit(k1=500, k2=200)
    positions, valid = run_rsu(rsu, query, contents, lengths, targets)
    assert positions.shape[-1] == contents.shape[1]  # min(k, L)
    for b, length in enumerate(lengths):
        for n in range(targets.shape[1]):
            assert sorted(positions[b, n][valid[b, n]].tolist()) == list(range(length))


def test_threshold_masks_irrelevant_behaviours():
    query, contents, lengths, targets = random_case(seed=3)
    rel = np_cos(query[:, None, :], contents)
    rsu = RelevanceSearchUnit(k1=12, k2=12, threshold=0.3)
    positions, valid = run_rsu(rsu, query, contents, lengths, targets)
    for b, length in enumerate(lengths):
        expected = {i for i in range(length) if rel[b, i] >= 0.3}
        for n in range(targets.shape[1]):
            assert set(positions[b, n][valid[b, n]].tolist()) == expected


def test_precomputed_stage1_is_identity_on_first_k1():
    query, contents, lengths, targets = random_case(seed=4)
    rsu = RelevanceSearchUnit(k1=4, k2=2, precomputed_stage1=True)
    mask = masking.length_mask(lengths, contents.shape[1])
    pos1, valid1 = rsu.stage1(tf.constant(query), tf.constant(contents), mask)
    assert pos1.numpy().tolist() == [[0, 1, 2, 3]] * 3
    assert valid1.numpy().tolist() == [[True] * 4, [True] * 4, [False] * 4]
    positions, valid = run_rsu(rsu, query, contents, lengths, targets)
    assert np.all(positions[valid] < 4)
    # stage 2 still ranks the first K1 by target cosine
    rel2 = np_cos(targets[0][:, None, :], contents[0][None, :4])
    assert positions[0, :, 0].tolist() == rel2.argmax(-1).tolist()


def test_ablations_skip_stages():
    query, contents, lengths, targets = random_case(seed=5)
    no_stage1 = RelevanceSearchUnit(k1=2, k2=2, use_stage1=False)
    positions, valid = run_rsu(no_stage1, query, contents, lengths, targets)
    rel2 = np_cos(targets[0][:, None, :], contents[0][None])  # over all 12, not the top-2 by query
    assert positions[0, :, 0].tolist() == rel2.argmax(-1).tolist()
    no_stage2 = RelevanceSearchUnit(k1=3, k2=2, use_stage2=False)
    positions, valid = run_rsu(no_stage2, query, contents, lengths, targets)
    assert positions.shape[-1] == 3  # every candidate keeps all of stage 1
    rel = np_cos(query[0][None], contents[0])
    assert positions[0, 0].tolist() == np.argsort(-rel)[:3].tolist()
    assert np.all(positions[0] == positions[0, :1])


@pytest.mark.parametrize("use_stage2", [True, False])
def test_stage2_scored_returns_the_kept_behaviours_target_cosine(use_stage2):
    query, contents, lengths, targets = random_case(seed=6)
    rsu = RelevanceSearchUnit(k1=5, k2=3, use_stage2=use_stage2)
    mask = masking.length_mask(lengths, contents.shape[1])
    pos1, valid1 = rsu.stage1(tf.constant(query), tf.constant(contents), mask)
    stage1_contents = tf.gather(tf.constant(contents), pos1, batch_dims=1)
    idx, valid = rsu.stage2(tf.constant(targets), stage1_contents, valid1)
    idx2, valid2, rel = rsu.stage2_scored(tf.constant(targets), stage1_contents, valid1)
    assert np.array_equal(idx.numpy(), idx2.numpy()) and np.array_equal(valid, valid2)
    chosen = np.take_along_axis(stage1_contents.numpy()[:, None], idx.numpy()[..., None],
                                axis=2)  # [B, N, K, D]
    expected = np_cos(targets[:, :, None, :], chosen)
    np.testing.assert_allclose(rel.numpy(), np.where(valid.numpy(), expected, 0), atol=1e-6)
    assert np.all(rel.numpy()[~valid.numpy()] == 0)


def test_cosine_similarity_and_zero_vectors():
    a = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]], np.float32)
    b = np.array([[2.0, 0.0], [-4.0, 3.0], [1.0, 1.0]], np.float32)
    np.testing.assert_allclose(cosine_similarity(a, b).numpy(), [1.0, 0.0, 0.0], atol=1e-6)


def test_masked_softmax_and_top_k_helpers():
    logits = tf.constant([[1.0, 5.0, 2.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = tf.constant([[True, True, True, False], [False] * 4])
    w = masking.masked_softmax(logits, mask).numpy()
    e = np.exp([1.0, 5.0, 2.0])
    np.testing.assert_allclose(w[0], np.append(e / e.sum(), 0.0), rtol=1e-6)
    assert np.all(w[1] == 0)
    idx, valid = masking.masked_top_k(logits, mask, 3)
    assert idx.numpy()[0].tolist() == [1, 2, 0] and valid.numpy()[0].all()
    assert not valid.numpy()[1].any()
    padded = masking.pad_last_dim(tf.constant([[1, 2]]), 4, -1)
    assert padded.numpy().tolist() == [[1, 2, -1, -1]]
    assert masking.pad_last_dim(tf.constant([[1, 2, 3]]), 2, -1).numpy().tolist() == [[1, 2]]


def test_relevance_is_bit_identical_whatever_the_batch_and_padding():
    """A request scored alone and the same request batched with others and padded further get
    exactly the same relevances, so top-k ties break the same way in every signature."""
    rng = np.random.default_rng(3)
    d = 32
    query = rng.normal(size=(16, d)).astype(np.float32)
    contents = rng.normal(size=(16, 300, d)).astype(np.float32)
    contents[:, 5] = contents[:, 40]  # a re-watched item: an exact tie
    targets = rng.normal(size=(16, 7, d)).astype(np.float32)
    rsu = RelevanceSearchUnit(k1=10, k2=4)
    batched_q = rsu.query_relevance(query, contents).numpy()
    batched_t = rsu.target_relevance(targets, contents).numpy()
    for b in (0, 9):
        alone_q = rsu.query_relevance(query[b:b + 1], contents[b:b + 1, :17]).numpy()
        alone_t = rsu.target_relevance(targets[b:b + 1, :3], contents[b:b + 1, :17]).numpy()
        assert np.array_equal(alone_q[0], batched_q[b, :17])
        assert np.array_equal(alone_t[0], batched_t[b, :3, :17])
        assert batched_q[b, 5] == batched_q[b, 40]
    np.testing.assert_allclose(batched_q, np.einsum(
        "bd,bld->bl", query / np.linalg.norm(query, axis=-1, keepdims=True),
        contents / np.linalg.norm(contents, axis=-1, keepdims=True)), atol=1e-5)
