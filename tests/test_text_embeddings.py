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


# ---- feed co-engagement item pairs -----------------------------------------------------------
def test_coengagement_pairs_follow_window_depth_and_cutoff():
    from preprocessing.text_embeddings import coengagement_pairs

    feed = [  # (user, time ms, item, watch ratio, liked), deliberately out of order
        ("u1", 40, "D", 1.0, False),
        ("u1", 10, "A", 0.9, False),
        ("u2", 5, "X", 0.8, False),   # the threshold itself is deep
        ("u1", 120, "E", 1.0, True),  # after the cutoff: never in a pair
        ("u1", 20, "B", 0.2, False),  # shallow: counts towards the window, makes no pair
        ("u1", 30, "C", 0.1, True),   # liked: deep
        ("u2", 5, "Y", 0.95, False),  # same time as X, after it in the input
        ("u1", 50, "A", 0.85, False),
        ("u2", 99, "X", 1.0, False),
        ("u2", 60, "Z", 0.79, False),  # just below the threshold
    ]
    # u1 by time: A B C D A (E dropped); u2: X Y Z X
    assert coengagement_pairs(feed, window=2, cutoff_ms=100) == [
        ("A", "C"), ("C", "D"), ("C", "A"), ("D", "A"), ("X", "Y"), ("Y", "X")]
    assert coengagement_pairs(feed, window=3, cutoff_ms=100) == [
        ("A", "C"), ("A", "D"), ("C", "D"), ("C", "A"), ("D", "A"), ("X", "Y"), ("Y", "X")]
    # a gap limit stops the window at the first behaviour too far away
    assert coengagement_pairs(feed, window=3, cutoff_ms=100, max_gap_ms=15) == [
        ("C", "D"), ("D", "A"), ("X", "Y")]
    # an earlier cutoff drops A@50 and X@99: nothing of theirs pairs any more
    assert coengagement_pairs(feed, window=3, cutoff_ms=50) == [
        ("A", "C"), ("A", "D"), ("C", "D"), ("X", "Y")]
    # E (at 120) pairs as soon as the cutoff lets it in, never at or before its time
    assert ("A", "E") in coengagement_pairs(feed, 10, cutoff_ms=121)
    assert all("E" not in pair for pair in coengagement_pairs(feed, 10, cutoff_ms=120))
    assert coengagement_pairs(feed, 2, cutoff_ms=100, min_watch_ratio=0.79)[-4:] == [
        ("X", "Z"), ("Y", "Z"), ("Y", "X"), ("Z", "X")]


def test_mix_item_pairs_draws_the_asked_share_deterministically():
    from preprocessing.text_embeddings import mix_item_pairs

    assert mix_item_pairs(100, 500, 0.0, 0) == []
    drawn = mix_item_pairs(100, 500, 0.5, 3)
    assert len(drawn) == 100 and drawn == sorted(set(drawn)) and drawn == mix_item_pairs(
        100, 500, 0.5, 3)
    assert drawn != mix_item_pairs(100, 500, 0.5, 4)
    assert len(mix_item_pairs(300, 500, 0.25, 0)) == 100
    assert mix_item_pairs(100, 30, 0.5, 0) == list(range(30))  # fewer available: all of them
    assert mix_item_pairs(0, 30, 0.5, 0) == list(range(30))


def test_item_pairs_are_ignored_unless_a_share_is_set(trained):
    encoder, _, _ = trained
    pairs, keys, captions = _clicks()
    item_pairs = [(captions[0], captions[4])] * 50
    again, stats = train_text_encoder(pairs, TextTowerConfig(**CONFIG), keys, (), item_pairs,
                                      ["4"] * 50)
    np.testing.assert_array_equal(again.table, encoder.table)  # today's training, bit for bit
    assert "coengagement_pairs_used" not in stats
    with pytest.raises(ValueError, match="coengagement_share"):
        TextTowerConfig(coengagement_share=1.0).validate()
    config = TextTowerConfig.from_options({"text_tower_coengagement_share": "0.3",
                                           "text_tower_coengagement_window": 4})
    assert (config.coengagement_share, config.coengagement_window) == (0.3, 4)


def _planted_groups(seed=0, items_per_group=12, num_pairs=600):
    """Two topics of two groups each. Captions: a topic word (shared by both groups of the
    topic, which queries also use), a group word and a filler word; queries click items of
    both groups of their topic alike, so clicks alone have no reason to tell the groups apart.
    Feed co-engagement pairs two items of the same group (a user's preferred sub-interest)."""
    rng = np.random.default_rng(seed)
    captions, group_of = {}, {}
    for item in range(4 * items_per_group):
        group = item % 4
        topic = group // 2
        captions[item] = [100 + 10 * topic + int(rng.integers(0, 2)),
                          500 + 10 * group + int(rng.integers(0, 2)),
                          5000 + int(rng.integers(0, 40))]
        group_of[item] = group
    clicks, click_keys, item_pairs, item_keys = [], [], [], []
    for _ in range(num_pairs):
        topic = int(rng.integers(0, 2))
        item = int(rng.integers(0, items_per_group)) * 4 + 2 * topic + int(rng.integers(0, 2))
        clicks.append(([100 + 10 * topic + int(rng.integers(0, 2))], captions[item]))
        click_keys.append(str(item))
        group = int(rng.integers(0, 4))
        a, b = rng.choice(items_per_group, 2, replace=False) * 4 + group
        item_pairs.append((captions[int(a)], captions[int(b)]))
        item_keys.append(str(int(b)))
    return clicks, click_keys, item_pairs, item_keys, captions, group_of


def _group_gap(encoder, captions, group_of):
    """Mean cosine of items of one group minus that of items of the other group of the same
    topic (the sub-interest separation), and the same-topic minus other-topic gap."""
    vectors = {i: encoder.encode(c) for i, c in captions.items()}
    same, sibling, other = [], [], []
    for i in vectors:
        for j in vectors:
            if i < j:
                cos = float(vectors[i] @ vectors[j])
                gi, gj = group_of[i], group_of[j]
                (same if gi == gj else sibling if gi // 2 == gj // 2 else other).append(cos)
    return np.mean(same) - np.mean(sibling), np.mean(sibling) - np.mean(other)


def test_coengagement_separates_groups_that_share_caption_words():
    clicks, click_keys, item_pairs, item_keys, captions, group_of = _planted_groups()
    config = dict(CONFIG, epochs=6)
    base, _ = train_text_encoder(clicks, TextTowerConfig(**config), click_keys)
    mixed, stats = train_text_encoder(
        clicks, TextTowerConfig(**config, coengagement_share=0.5), click_keys, (), item_pairs,
        item_keys)
    assert stats["coengagement_pairs_used"] == 600 and stats["coengagement_share_used"] == 0.5
    base_groups, base_topics = _group_gap(base, captions, group_of)
    mixed_groups, mixed_topics = _group_gap(mixed, captions, group_of)
    # measured: 0.05 without, 0.51 with co-engagement
    assert base_groups < 0.15 and mixed_groups > base_groups + 0.25, (base_groups, mixed_groups)
    assert mixed_topics > 0.2, mixed_topics  # topics stay apart (measured 0.69 -> 0.38)
    # the query tower is unchanged: a topic query is still closest to its own topic's items
    for topic in range(2):
        query = mixed.encode_query([100 + 10 * topic])
        own = [query @ mixed.encode(c) for i, c in captions.items() if group_of[i] // 2 == topic]
        rest = [query @ mixed.encode(c) for i, c in captions.items() if group_of[i] // 2 != topic]
        assert np.mean(own) > np.mean(rest) + 0.3


def test_kuaisar_prepare_feeds_coengaged_captions_before_the_eval_cutoff(tmp_path, monkeypatch):
    from preprocessing import kuaisar, text_embeddings
    from tests.public_format_files import item_row, rec_row, src_row, write_kuaisar

    t0 = 1_653_184_800_000
    src = [src_row(1, f"s{k}", t0 + 10 * k, "[1]", 1, 1) for k in range(8)]
    src += [src_row(1, f"h{k}", t0 + 1000 + 10 * k, "[1]", 1, 1) for k in range(2)]
    rec = [rec_row(1, 1, 9000, 10000, t0),            # deep
           rec_row(1, 2, 1000, 10000, t0 + 1),        # shallow
           rec_row(1, 3, 100, 10000, t0 + 2, like=1),  # liked
           rec_row(1, 4, 9000, 10000, t0 + 3, click=0),  # not opened: not a behaviour
           rec_row(1, 5, 10000, 10000, t0 + 1000),    # at the eval cutoff: held out
           rec_row(2, 6, 10000, 10000, t0 + 5), rec_row(2, 7, 10000, 10000, t0 + 6)]
    items = [item_row(i, f"[{100 + i}, 9]", 1, 1, 1) for i in range(1, 8)]
    directory = write_kuaisar(str(tmp_path), rec_rows=rec, src_rows=src, item_rows=items)
    fed = {}
    real = text_embeddings.train_text_encoder

    def spy(pairs, config, keys, query_tokens, item_pairs=(), item_pair_keys=None):
        fed.update(item_pairs=list(item_pairs), keys=list(item_pair_keys or []))
        return real(pairs, config, keys, query_tokens, item_pairs, item_pair_keys)

    monkeypatch.setattr(text_embeddings, "train_text_encoder", spy)
    options = {"embedding_dim": 4, "text_tower_epochs": 1, "eval_fraction": 0.1,
               "test_fraction": 0.1, "text_tower_coengagement_share": 0.5,
               "text_tower_coengagement_window": 3}
    stats = kuaisar.prepare(directory, None, options)["text_tower_stats"]
    assert stats["split_cutoffs_ms"]["eval"] == t0 + 1000
    assert fed["item_pairs"] == [((101, 9), (103, 9)), ((106, 9), (107, 9))]
    assert fed["keys"] == ["3", "7"] and stats["coengagement_item_pairs"] == 2
    monkeypatch.setattr(text_embeddings, "train_text_encoder", real)
    default = kuaisar.prepare(directory, None, {k: v for k, v in options.items()
                                                if "coengagement" not in k})
    assert "coengagement_item_pairs" not in default["text_tower_stats"]


def test_jdsearch_prepare_feeds_coengaged_names_before_the_eval_cutoff(tmp_path, monkeypatch):
    from preprocessing import jdsearch, text_embeddings
    from tests.public_format_files import jd_line, jd_product, write_jdsearch

    lines = [jd_line([1], ["p1"], [1], history=[(None, "p1", "FLW"), (None, "p2", "CLICK"),
                                                (None, "p3", "CART"), ([5], "p4", "ORD")],
                     gaps=[0, 10, 10, 10, 10])]  # feed p1 (deep), p2 (shallow), p3 (deep)
    lines += [jd_line([1], ["p1"], [1], gaps=[100 + 10 * k]) for k in range(8)]
    # requests at 40 s, 100..170 s and 501 s: T_eval = 170 s, so p6 (at 500 s) is held out
    lines.append(jd_line([1], ["p1"], [1], history=[(None, "p5", "FLW"), (None, "p6", "FLW")],
                         gaps=[0, 500, 1]))
    products = [jd_product(f"p{i}", [100 + i, 9], "b", "c1", "c2") for i in range(1, 7)]
    directory = write_jdsearch(str(tmp_path), lines, products)
    fed = {}
    real = text_embeddings.train_text_encoder

    def spy(pairs, config, keys, query_tokens, item_pairs=(), item_pair_keys=None):
        fed.update(item_pairs=list(item_pairs), keys=list(item_pair_keys or []))
        return real(pairs, config, keys, query_tokens, item_pairs, item_pair_keys)

    monkeypatch.setattr(text_embeddings, "train_text_encoder", spy)
    stats = jdsearch.prepare(directory, None, {
        "embedding_dim": 4, "text_tower_epochs": 1, "eval_fraction": 0.1, "test_fraction": 0.1,
        "text_tower_coengagement_share": 0.5})["text_tower_stats"]
    assert stats["split_cutoffs_ms"]["eval"] == jdsearch.BASE_TIME_MS + 170_000
    assert fed["item_pairs"] == [((101, 9), (103, 9))] and fed["keys"] == ["p3"]
    assert stats["coengagement_item_pairs"] == 1


def test_coengagement_settings_reach_the_text_tower_from_the_command_line():
    from preprocessing import options

    args, _ = options.parse_args(["--input-format", "kuaisar", "--input", "x", "--output", "y",
                                  "--text-tower-coengagement-share", "0.5",
                                  "--text-tower-coengagement-window", "7",
                                  "--text-tower-coengagement-min-watch-ratio", "0.9"])
    config = TextTowerConfig.from_options(args)
    assert (config.coengagement_share, config.coengagement_window,
            config.coengagement_min_watch_ratio) == (0.5, 7, 0.9)
    default, _ = options.parse_args(["--input-format", "kuaisar", "--input", "x", "--output", "y"])
    assert TextTowerConfig.from_options(default).coengagement_share == 0.0
