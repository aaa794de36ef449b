"""Text two-tower: learns a shared query/item space from clicks, deterministically, bounded."""
import pickle

import numpy as np
import pytest

import common  # noqa: F401
from preprocessing.text_embeddings import TextEncoder, TextTowerConfig, train_text_encoder

TOPICS = 4


def _clicks(seed=0, num_pairs=800, items_per_topic=15):
    """Queries use topic words 100+10t..; captions use item words 1000+10t.. plus shared noise
    words, so only the clicks tie the two vocabularies together."""
    rng = np.random.default_rng(seed)
    captions = {}
    for item in range(TOPICS * items_per_topic):
        topic = item % TOPICS
        captions[item] = ([1000 + 10 * topic + int(x) for x in rng.integers(0, 5, 3)]
                          + [int(x) for x in rng.integers(5000, 5040, 2)])
    pairs, keys = [], []
    for _ in range(num_pairs):
        topic = int(rng.integers(0, TOPICS))
        query = [100 + 10 * topic + int(x) for x in rng.integers(0, 3, 2)]
        item = int(rng.integers(0, items_per_topic)) * TOPICS + topic
        pairs.append((query, captions[item]))
        keys.append(str(item))
    return pairs, keys, captions


CONFIG = dict(embedding_dim=16, epochs=4, batch_size=64, seed=7)


@pytest.fixture(scope="module")
def trained():
    pairs, keys, captions = _clicks()
    encoder, stats = train_text_encoder(pairs, TextTowerConfig(**CONFIG), keys)
    return encoder, stats, captions


def test_query_is_closer_to_its_clicked_items_than_to_random_items(trained):
    encoder, stats, captions = trained
    assert stats["pairs_used"] == 800 and stats["steps"] == 4 * 13
    assert stats["mean_loss_last_epoch"] < stats["mean_loss_first_epoch"]
    item_vectors = {i: encoder.encode(c) for i, c in captions.items()}
    for topic in range(TOPICS):
        query = encoder.encode([100 + 10 * topic, 101 + 10 * topic])
        assert abs(np.linalg.norm(query) - 1.0) < 1e-5
        same = [query @ v for i, v in item_vectors.items() if i % TOPICS == topic]
        other = [query @ v for i, v in item_vectors.items() if i % TOPICS != topic]
        assert np.mean(same) > np.mean(other) + 0.3, (topic, np.mean(same), np.mean(other))
        assert np.mean([s > o for s in same for o in other]) > 0.9


def test_training_is_deterministic_per_seed(trained):
    encoder, _, _ = trained
    pairs, keys, _ = _clicks()
    again, _ = train_text_encoder(pairs, TextTowerConfig(**CONFIG), keys)
    np.testing.assert_array_equal(again.token_ids, encoder.token_ids)
    np.testing.assert_array_equal(again.table, encoder.table)
    other, _ = train_text_encoder(pairs, TextTowerConfig(**{**CONFIG, "seed": 8}), keys)
    assert not np.allclose(other.table, encoder.table)


def test_max_steps_bounds_training():
    pairs, keys, _ = _clicks(num_pairs=300)
    _, stats = train_text_encoder(pairs, TextTowerConfig(**{**CONFIG, "max_steps": 3}), keys)
    assert stats["steps"] == 3


def test_unknown_or_missing_tokens_encode_to_zero_and_count_as_skipped():
    table = np.array([[9, 9], [3, 4], [1, 0]], np.float32)
    encoder = TextEncoder(np.array([5, 6]), table)
    assert encoder.table[0].tolist() == [0.0, 0.0]  # row 0 is the unknown token, always zero
    np.testing.assert_allclose(encoder.encode([5]), [0.6, 0.8])
    np.testing.assert_allclose(encoder.encode([5, 6, 77]), np.array([4, 4]) / np.hypot(4, 4))
    assert encoder.encode([]).tolist() == [0.0, 0.0]
    assert encoder.encode([77]).tolist() == [0.0, 0.0]
    _, stats = train_text_encoder([([1], [])], TextTowerConfig(embedding_dim=2))
    assert stats["pairs_used"] == 0 and stats["pairs_skipped_no_tokens"] == 1


def test_encoder_round_trips_and_exposes_the_query_vocabulary(trained, tmp_path):
    encoder, _, _ = trained
    vocab = encoder.query_vocab()
    assert vocab["embedding"].shape == (encoder.vocab_size, 16)
    assert vocab["word"][0] == str(vocab["token_id"][0])
    k = int(np.where(vocab["token_id"] == 101)[0][0])
    np.testing.assert_array_equal(vocab["embedding"][k], encoder.table[k + 1])
    loaded = TextEncoder.load(encoder.save(str(tmp_path / "enc.npz")))
    unpickled = pickle.loads(pickle.dumps(encoder))
    for copy in (loaded, unpickled):
        np.testing.assert_array_equal(copy.encode([101, 1002]), encoder.encode([101, 1002]))


def test_options_are_read_and_validated():
    config = TextTowerConfig.from_options({"embedding_dim": 8, "text_tower_epochs": 2,
                                           "seed": 3, "batch_size": 1})
    assert (config.embedding_dim, config.epochs, config.seed) == (8, 2, 3)
    assert config.batch_size == TextTowerConfig().batch_size  # the caller's own batch size
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TextTowerConfig.from_options({"text_tower_epochs": 0})


def test_untrained_query_tokens_join_the_vocabulary_with_zero_vectors():
    from common import features as F
    from common.feature_store import normalised_mean

    pairs, keys, _ = _clicks(num_pairs=200)
    encoder, stats = train_text_encoder(pairs, TextTowerConfig(**{**CONFIG, "epochs": 1}), keys,
                                        query_tokens=[100, 101, 424242])
    assert stats["untrained_query_tokens"] == 1
    assert encoder.table[encoder.rows([424242])[0]].tolist() == [0.0] * 16
    np.testing.assert_allclose(encoder.encode_query([100, 424242, 101]),
                               encoder.encode([100, 101]), rtol=1e-6)
    # the serving client's rule: first MAX_QUERY_TOKENS vocabulary tokens, normalised mean
    long_query = [424242, 9999999] + [100 + 10 * (k % 4) for k in range(30)]
    known = [t for t in long_query if encoder.rows([t])][:F.MAX_QUERY_TOKENS]
    expected = normalised_mean(np.stack([encoder.table[encoder.rows([t])[0]] for t in known]))
    np.testing.assert_allclose(encoder.encode_query(long_query), expected, rtol=1e-5, atol=1e-7)
